"""Job specs (``job.json``) and each job's canonical tensor order, cached per store.

A spec is read once per store object and then served from memory, kept with the version of
``job.json`` it was read at (:func:`stored_version`, taken by a HEAD before the read); writing
one (``job create``, or the default spec a job's first update creates) replaces it and forgets
the job's tensor order, since the declared model may have changed. Once the job has committed
rounds its model is part of what past answers mean (ARCHITECTURE §2): another model is refused
unless forced — and a forced change is seen by a reader at its next :meth:`JobSpecs.version`
(or :meth:`JobSpecs.exists`) check, which drops a cached spec of another version.
"""

from __future__ import annotations

import threading

from flstore_core.data import layout
from flstore_core.data.manifest import JobSpec
from flstore_core.errors import (
    ConflictError,
    NotFoundError,
    PreconditionFailedError,
    ValidationError,
)
from flstore_core.storage import catalog
from flstore_core.storage.blobs import BlobInfo
from flstore_core.storage.catalog import first_manifest
from flstore_core.storage.counted import CountedBlobs


def stored_version(info: BlobInfo | None) -> str:
    """A stored object's version tag from a HEAD or a listing: its ETag, else its size and
    write time; ``""`` when the object does not exist."""
    if info is None:
        return ""
    return info.etag or f"{info.size}@{info.modified}"


class JobSpecs:
    """The jobs of one store: their specs and canonical tensor orders, cached."""

    def __init__(self, io: CountedBlobs) -> None:
        self.io = io
        self._lock = threading.Lock()
        # job -> (the version of job.json the copy was read at, "" if unknown; the spec)
        self._specs: dict[str, tuple[str, JobSpec]] = {}
        self._orders: dict[str, tuple[str, ...]] = {}  # canonical tensor orders, by job

    def put(self, spec: JobSpec, *, force: bool = False) -> JobSpec:
        """Write ``job.json`` (replacing a previous spec of the job). Declaring another model
        than the stored spec's for a job with committed rounds is a :class:`ConflictError`
        unless ``force``.

        The write is conditional on what was checked (a create where no spec existed, else a
        replace of the version read): a concurrent writer's spec is never overwritten unseen,
        so the model check cannot be raced; the loser gets a :class:`ConflictError`."""
        key = layout.job_spec_key(spec.job)
        before = self.io.blobs.head(key)
        if not force:
            self._check_model_kept(spec, before)
        try:
            if before is None:
                self.io.put(key, spec.to_json(), "application/json", if_absent=True)
            else:
                self.io.put(key, spec.to_json(), "application/json", if_match=before.etag)
        except PreconditionFailedError as exc:
            raise ConflictError(
                f"job {spec.job!r}'s spec ({key}) was written by someone else while this one "
                "was being written; read it again and retry"
            ) from exc
        with self._lock:
            # the version written is unknown (a HEAD now could see a later writer's): the next
            # version check reads the spec again, which costs one GET, never staleness
            self._specs[spec.job] = ("", spec)
            self._orders.pop(spec.job, None)  # the declared model may have changed
        return spec

    def _check_model_kept(self, spec: JobSpec, before: BlobInfo | None) -> None:
        """Refuse a spec whose model differs from the stored spec's once the job has committed
        rounds (read afresh, never from the cache: another process may have written it)."""
        if before is None or not catalog.manifest_versions(self.io.blobs, spec.job):
            return
        key = layout.job_spec_key(spec.job)
        try:
            old = JobSpec.from_json(self.io.get(key, f"job {spec.job!r}"))
        except NotFoundError:
            return
        if old.model == spec.model:
            return
        raise ConflictError(
            f"job {spec.job!r} has committed rounds computed with model {old.model!r} "
            f"({key}); declaring model {spec.model!r} changes what past answers mean: force "
            "it to do so"
        )

    def get(self, job: str) -> JobSpec:
        """Read ``job.json``; :class:`NotFoundError` if the job was never declared."""
        key = layout.job_spec_key(job)
        with self._lock:
            cached = self._specs.get(job)
        if cached is not None:
            return cached[1]
        # the version known *before* the read: a rewrite in between leaves the copy tagged
        # older than it is, which costs one extra read at the next check, never staleness
        version = stored_version(self.io.blobs.head(key))
        spec = JobSpec.from_json(self.io.get(key, f"job {job!r}"))
        with self._lock:
            self._specs[job] = (version, spec)
        return spec

    def version(self, job: str) -> str:
        """The stored ``job.json``'s version (one HEAD; ``""`` if the job was never declared);
        a cached spec of another version is dropped (read again on the next :meth:`get`), and
        the job's tensor order with it."""
        version = stored_version(self.io.blobs.head(layout.job_spec_key(job)))
        with self._lock:
            cached = self._specs.get(job)
            if cached is not None and cached[0] != version:
                del self._specs[job]
                self._orders.pop(job, None)
        return version

    def exists(self, job: str) -> bool:
        """Whether ``job.json`` exists (a HEAD, never the cache; it checks the cached spec's
        version as :meth:`version` does)."""
        return self.version(job) != ""

    def ensure(self, job: str) -> JobSpec:
        """The job's spec, creating a default one (float32, no model) if it was never declared."""
        try:
            return self.get(job)
        except NotFoundError:
            pass
        try:
            return self.put(JobSpec(job=job))
        except ConflictError:  # another writer declared the job first: its spec stands
            return self.get(job)

    def tensor_order(self, job: str) -> tuple[str, ...] | None:
        """The job's canonical tensor order (ARCHITECTURE §2, :mod:`~flstore_core.storage.commit`),
        ``None`` while the job has none yet (its first round sets it).

        It is the registry model's state-dict order when the job declares a model: as recorded
        in ``job.json`` at ``job create`` (:attr:`JobSpec.state_names`, so no torch is needed
        here), else — a ``job.json`` written before that field existed — built from the
        registry once per process where torch is installed. Otherwise (no model, or an old
        spec and no torch) it is the tensor order of the job's first committed round — the
        lowest-numbered one, found with one delimited LIST — so every later round takes the
        order of the rounds before it.
        """
        with self._lock:
            known = self._orders.get(job)
        if known is not None:
            return known
        spec = self.get(job)
        order = spec.state_names if spec.state_names else model_order(spec.model)
        if order is None:
            manifest = first_manifest(self.io, job)
            if manifest is not None:
                order = tuple(s.name for s in manifest.tensors)
        if order is not None:
            with self._lock:
                self._orders[job] = order
        return order


def model_order(model: str | None) -> tuple[str, ...] | None:
    """The state-dict order of the registry model ``model``, ``None`` when there is no model or
    it cannot be built here."""
    if model is None:
        return None
    from flstore_core import models  # torch, lazily: only jobs that declare a model

    try:
        return models.state_names(model)
    except (ImportError, ValidationError):  # no torch here, or a model unknown to this build
        return None
