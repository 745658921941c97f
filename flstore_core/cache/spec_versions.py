"""The versions of each job's spec and validation set a cache node's shards were read at, and
the check that finds them changed.

A job's model (``job.json``) and its validation set (``jobs/{job}/validation.safetensors.zst``)
change once the job has rounds only when forced (ARCHITECTURE §2), and answers and model
artifacts computed with the old ones must then not be served. A node keeps, per job, the
version it read both at — ``"{spec}/{validation}"``, each the object's version tag
(:func:`~flstore_core.storage.jobs.stored_version`: its ETag) — which its shards' job contexts
and every memo key carry. The version is read (HEADs, no GET) when the node first builds a shard
of the job and checked again only at the node's refresh points (a ``load``, the ``REFRESH_S``
interval, ``evict all``), so a warm request between them makes no S3 call.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from flstore_core.data import layout
from flstore_core.storage.jobs import stored_version
from flstore_core.storage.object_store import ObjectStore


@dataclass(frozen=True)
class _Known:
    """A job's version as last read, and when."""

    spec: str  # job.json's version alone: a change of it makes the store read the spec again
    version: str
    checked_at: float


class SpecVersions:
    """The version of each job's spec and validation set on one node (module docstring).

    Parameters
    ----------
    store : ObjectStore
        The node's store; its cached copy of a changed ``job.json`` is dropped when a check
        finds the change (:meth:`~flstore_core.storage.jobs.JobSpecs.version`).
    interval_s : float
        How long a version read is used before a request's check reads it again.
    """

    def __init__(self, store: ObjectStore, interval_s: float) -> None:
        self.store = store
        self.interval_s = interval_s
        self._known: dict[str, _Known] = {}
        self._lock = threading.Lock()

    def current(self, job: str) -> str:
        """The version the node's shards of ``job`` are read at: the one known, else read now
        (before the shard's own reads: a change in between leaves the shard tagged older than
        it is, which costs one recompute at the next check, never a stale answer)."""
        with self._lock:
            known = self._known.get(job)
        if known is not None:
            return known.version
        spec, version = self._read(job)
        # the store may hold job.json from before this node knew the job (after ``evict
        # all``, or written by this process): a HEAD that drops that copy if it is not current
        self.store.job_exists(job)
        with self._lock:
            self._known[job] = _Known(spec, version, time.monotonic())
        return version

    def check(self, job: str, force: bool = False) -> bool:
        """A refresh point of ``job``: its version read again when ``force`` or last read
        ``interval_s`` ago or more (a dictionary lookup otherwise, and for a job the node holds
        nothing of); whether it changed."""
        now = time.monotonic()
        with self._lock:
            known = self._known.get(job)
        if known is None or (not force and now - known.checked_at < self.interval_s):
            return False
        spec, version = self._read(job)
        if spec != known.spec:
            self.store.job_exists(job)  # the store's copy of the old job.json is dropped
        with self._lock:
            self._known[job] = _Known(spec, version, now)
        return version != known.version

    def forget(self) -> None:
        """Forget every version (``evict all``): each is read again with the job's next shard."""
        with self._lock:
            self._known.clear()

    def _read(self, job: str) -> tuple[str, str]:
        """``(job.json's version, the job's version)``: a HEAD of each object."""
        spec = stored_version(self.store.stat(layout.job_spec_key(job)))
        validation = stored_version(self.store.stat(layout.validation_key(job)))
        return spec, f"{spec}/{validation}"
