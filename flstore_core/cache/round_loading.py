"""Reading a committed round from the object store into the form workloads run on.

A cache node does this on a miss and the aggregator baselines do it for every request
(ARCHITECTURE §8): both call :func:`load_round`, so a workload sees identical data whichever
system fetched it, and a model result is written under the same key.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, MutableMapping

from flstore_core.cache.round_data import F32, ArtifactStats, JobContext, RoundData
from flstore_core.data.blocks import block_ranges
from flstore_core.data.manifest import RoundManifest
from flstore_core.data.rows import base_vector
from flstore_core.storage.object_store import ObjectStore, RoundMatrix
from flstore_core.storage.round_reader import HeldRow


def job_context(store: ObjectStore, job: str, version: str = "") -> JobContext:
    """The job's spec, with its validation set loaded from S3 on first use; ``version`` names
    the versions of both it is read at (a cache node's
    :class:`~flstore_core.cache.spec_versions.SpecVersions`; ``""`` for one request's read)."""
    return JobContext(store.get_job_spec(job), lambda: store.get_validation_set(job), version)


def load_round(
    store: ObjectStore,
    job: str,
    round_: int,
    stats: ArtifactStats,
    context: JobContext | None = None,
    held: Callable[[RoundManifest], MutableMapping[str, HeldRow]] | None = None,
    timing: dict[str, float] | None = None,
) -> RoundData:
    """Read a committed round (and its base model, when stored) into a :class:`RoundData`;
    ``held(manifest)`` gives rows already decoded that this manifest names (a node's staged
    updates, :meth:`~flstore_core.cache.staging.StagedRounds.take`), which are not read again.
    ``timing`` (when given) receives the milliseconds of each step: ``manifest``, ``rows``
    (the staged rows copied in and the others read), ``staged`` (how many were staged),
    ``base`` (read and decoded) and ``deltas`` (the rows made deltas from it)."""
    marks = [time.perf_counter()]
    manifest = store.get_manifest(job, round_)
    marks.append(time.perf_counter())
    rows = None if held is None else held(manifest)
    staged = 0 if rows is None else len(rows)
    rm = store.read_round(job, round_, manifest=manifest, held=rows)
    marks.append(time.perf_counter())
    base_vec = base_vector(store.get_base(job, round_), manifest.tensors)
    marks.append(time.perf_counter())
    data = _round_data(store, manifest, rm, base_vec, stats, context)
    marks.append(time.perf_counter())
    if timing is not None:
        steps = ("manifest", "rows", "base", "deltas")
        spans = itertools.pairwise(marks)
        timing.update({k: (b - a) * 1000 for k, (a, b) in zip(steps, spans, strict=True)})
        timing["staged"] = staged
    return data


def _round_data(
    store: ObjectStore,
    manifest: RoundManifest,
    rm: RoundMatrix,
    base: F32 | None,
    stats: ArtifactStats,
    context: JobContext | None,
) -> RoundData:
    """The :class:`RoundData` of rows read from a round (whole or a block of columns)."""
    return RoundData(
        manifest.job,
        manifest.round,
        rm.clients,
        rm.matrix,
        rm.specs,
        rm.num_examples,
        rm.metrics,
        base=base,
        stats=stats,
        sha256={c: manifest.updates[c].sha256 for c in rm.clients},
        context=context or job_context(store, manifest.job),
    )


def load_round_block(
    store: ObjectStore,
    job: str,
    round_: int,
    block: int,
    blocks: int,
    stats: ArtifactStats,
    context: JobContext | None = None,
) -> RoundData:
    """Read column block ``block`` of ``blocks`` of a committed round (its columns follow from
    the manifest's tensors: :func:`flstore_core.data.blocks.block_ranges`), with the same
    columns of its base model, into a :class:`RoundData` over the block's columns.

    Each client's update is streamed and only the block's columns are kept, so the node holds
    the block plus bounded buffers, never a whole update.
    """
    manifest = store.get_manifest(job, round_)
    columns = block_ranges(manifest.tensors, blocks)[block]
    rm = store.read_round_block(job, round_, columns, manifest=manifest)
    base = store.read_base_block(job, round_, manifest.tensors, columns)
    return _round_data(store, manifest, rm, base, stats, context)
