"""Reading a committed round from the object store into the form workloads run on.

A cache node does this on a miss and the aggregator baselines do it for every request
(ARCHITECTURE §8): both call :func:`load_round`, so a workload sees identical data whichever
system fetched it, and a model result is written under the same key.
"""

from __future__ import annotations

from flstore_core.cache.round_data import ArtifactStats, JobContext, RoundData
from flstore_core.data.rows import base_vector
from flstore_core.storage.object_store import ObjectStore


def job_context(store: ObjectStore, job: str) -> JobContext:
    """The job's spec, with its validation set loaded from S3 on first use."""
    return JobContext(store.get_job_spec(job), lambda: store.get_validation_set(job))


def load_round(
    store: ObjectStore,
    job: str,
    round_: int,
    stats: ArtifactStats,
    context: JobContext | None = None,
) -> RoundData:
    """Read a committed round (and its base model, when stored) into a :class:`RoundData`."""
    manifest = store.get_manifest(job, round_)
    rm = store.read_round(job, round_, manifest=manifest)
    base_vec = base_vector(store.get_base(job, round_), manifest.tensors)
    return RoundData(
        job,
        round_,
        rm.clients,
        rm.matrix,
        rm.specs,
        rm.num_examples,
        rm.metrics,
        base=base_vec,
        stats=stats,
        sha256={c: manifest.updates[c].sha256 for c in rm.clients},
        context=context or job_context(store, job),
    )
