"""Reading a committed round from the object store into the form workloads run on.

A cache node does this on a miss and the aggregator baselines do it for every request
(ARCHITECTURE §8): both call :func:`load_round`, so a workload sees identical data whichever
system fetched it, and a model result is written under the same key.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from flstore_core.cache.round_data import F32, ArtifactStats, JobContext, RoundData
from flstore_core.data.blocks import block_ranges
from flstore_core.data.manifest import RoundManifest
from flstore_core.data.rows import base_vector
from flstore_core.storage.object_store import ObjectStore, RoundMatrix

if TYPE_CHECKING:
    from flstore_core.cache.staging import StagedTake
from flstore_core.storage.stored_models import base_key


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
    held: Callable[[RoundManifest], StagedTake] | None = None,
    timing: dict[str, float] | None = None,
    manifest: RoundManifest | None = None,
) -> RoundData:
    """Read a committed round (and its base model, when stored) into a :class:`RoundData`;
    ``held(manifest)`` gives rows already decoded that this manifest names (a node's staged
    updates, :meth:`~flstore_core.cache.staging.StagedRounds.take`), which are not read again,
    and the base they are deltas from, used as the round's base while its object is the one
    they were staged against (one HEAD; else every row is read again). ``timing`` (when
    given) receives the milliseconds of each step: ``manifest``, ``rows`` (the staged rows
    copied in and the others read), ``staged`` (how many were staged), ``base`` (read and
    decoded, or its ETag checked) and ``deltas`` (the rows made deltas from it). ``manifest``:
    the round's manifest when the caller has just read it (it is not read again)."""
    marks = [time.perf_counter()]
    if manifest is None:
        manifest = store.get_manifest(job, round_)
    marks.append(time.perf_counter())
    taken = None if held is None else held(manifest)
    rows = {} if taken is None else taken.rows
    base_vec = None if taken is None else _staged_base(store, job, round_, taken)
    if taken is not None and taken.base is not None and base_vec is None:
        rows = {}  # deltas from a base rewritten since: every row is read again
    staged = set(rows)  # read_round lets each go once copied
    into = None if taken is None or not rows else taken.matrix
    rm = store.read_round(job, round_, manifest=manifest, held=rows, into=into)
    marks.append(time.perf_counter())
    deltas = base_vec is not None  # the staged rows are deltas from it
    if base_vec is None:
        base_vec = base_vector(store.get_base(job, round_), manifest.tensors)
    marks.append(time.perf_counter())
    if deltas:  # the rows read from S3 become deltas as the staged ones were
        assert base_vec is not None
        for i, client in enumerate(rm.clients):
            if client not in staged:
                rm.matrix[i] -= base_vec
    data = _round_data(store, manifest, rm, base_vec, stats, context, deltas=deltas)
    marks.append(time.perf_counter())
    if timing is not None:
        steps = ("manifest", "rows", "base", "deltas")
        spans = itertools.pairwise(marks)
        timing.update({k: (b - a) * 1000 for k, (a, b) in zip(steps, spans, strict=True)})
        timing["staged"] = len(staged)
    return data


def _staged_base(store: ObjectStore, job: str, round_: int, taken: StagedTake) -> F32 | None:
    """The base the staged rows are deltas from, while the stored base is still that object
    (its ETag now, by a HEAD, the one read at staging); else ``None``."""
    if taken.base is None or not taken.rows:
        return None
    info = store.stat(base_key(job, round_))
    return taken.base if info is not None and info.etag == taken.base_etag else None


def _round_data(
    store: ObjectStore,
    manifest: RoundManifest,
    rm: RoundMatrix,
    base: F32 | None,
    stats: ArtifactStats,
    context: JobContext | None,
    deltas: bool = False,
) -> RoundData:
    """The :class:`RoundData` of rows read from a round (whole or a block of columns);
    ``deltas``: the rows are deltas from ``base`` already."""
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
        deltas=deltas,
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
