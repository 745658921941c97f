# mypy: disallow-untyped-calls=False
# (Apache Beam's transforms and filesystems are not annotated)
"""Encoding and storing what validation accepted — client updates and global/initial models —
each PUT skipped when the identical object is already in place, so a re-run stores nothing.
Nothing here commits: a stored update is invisible until its round's manifest is written."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

from flstore_core.data import layout
from flstore_core.data.codec import (
    CodecLimits,
    EncodedUpdate,
    Precision,
    ScratchBuffer,
    Update,
    encode_update,
    first_nonfinite,
    parse_safetensors,
)
from flstore_core.data.manifest import RoundManifest, UpdateEntry
from flstore_core.data.rawfile import check_identity
from flstore_core.errors import CorruptUpdateError, NonFiniteError, UnavailableError
from flstore_core.storage.commit import check_agreement, committed_entry, entry_of
from flstore_core.storage.object_store import ObjectStore
from pipelines.deadletters import DEAD, FileStep
from pipelines.ingest_config import IngestFn, IngestStep
from pipelines.memory_reuse import keep_freed_memory
from pipelines.metrics import counter
from pipelines.outputs import TaggedParDo
from pipelines.records import PlannedUpdate, RawHeader, RoundKey, StoredState, StoredUpdate
from pipelines.runtime import ProgressEvent, ensure_job_spec, report
from pipelines.sources import RawFileReader


def _read_update(
    reader: RawFileReader,
    path: str,
    job: str | None,
    limits: CodecLimits,
    into: tuple[ScratchBuffer, int] | None = None,
) -> Update:
    """Read and parse a whole raw file; raises the dead-letter reason. Values are checked by
    :func:`_encode` (the codec checks them while serializing; one pass, not two).

    ``job`` (``--job``) stands in for a missing ``job`` field, as in the header check. With
    ``into`` (a scratch buffer and the file's expected size) the file is read into the
    buffer and the update's tensors are views of it, valid until its next use.
    """
    raw = reader.read(path) if into is None else reader.read_into(path, *into)
    update = parse_safetensors(raw, limits)
    if update.job is None:
        update.job = job
    check_identity(update)
    return update


def _encode(
    update: Update, precision: Precision, scratch: ScratchBuffer | None = None
) -> EncodedUpdate:
    """Encode, turning the codec's NaN/Inf refusal into its own dead-letter code."""
    try:
        return encode_update(update, precision, scratch=scratch)
    except CorruptUpdateError:
        bad = first_nonfinite(update.tensors)
        if bad is not None:
            raise NonFiniteError(f"tensor {bad!r} contains NaN or Inf values") from None
        raise


def same_object_stored(store: ObjectStore, key: str, data: bytes) -> bool:
    """Whether ``key`` already holds exactly ``data`` (size, then the MD5 ETag of a single-part
    PUT); an unknown ETag form (multipart, SSE-KMS) counts as different, so the PUT happens."""
    try:
        info = store.stat(key)
    except UnavailableError:
        return False
    if info is None or info.size != len(data):
        return False
    return info.etag == hashlib.md5(data, usedforsecurity=False).hexdigest()


class _RawFileToStoreFn(IngestFn):
    """A DoFn that reads raw files and writes the store: one client of each per worker."""

    def setup(self) -> None:
        keep_freed_memory()  # the frames and objects of update after update, without faults
        self.reader = RawFileReader(self.config.s3_options)
        self.store = self.config.store.store()

    def teardown(self) -> None:
        self.reader.close()
        self.store.close()


class EncodeAndStoreFn(_RawFileToStoreFn):
    """Read, check values, encode with the job's precision and store one client update."""

    def setup(self) -> None:
        super().setup()
        self.manifests: dict[RoundKey, RoundManifest | None] = {}
        # the raw file and its serialized form, update after update, in memory mapped once:
        # a fresh 47 MB buffer per update measured ~110 ms of page faults and compaction
        # inside the pipeline against ~10 ms reused (nothing keeps either past one update)
        self.file_buffer = ScratchBuffer()
        self.raw_buffer = ScratchBuffer()
        self.counters = {
            n: counter(n, self.config.run_id)
            for n in (
                "updates_written",
                "updates_already_stored",
                "updates_unchanged",
                "raw_bytes",
                "stored_bytes",
                "deadletters",
            )
        }

    def process(self, p: PlannedUpdate) -> Iterator[Any]:
        step = FileStep(
            self.config.run_id,
            self.counters["deadletters"],
            "store",
            [(p.path, p.client)],
            p.job,
            p.round,
        )
        with step:
            update = _read_update(
                self.reader,
                p.path,
                self.config.job,
                self.config.data_limits,
                into=(self.file_buffer, p.size),
            )
            if (update.kind, update.job, update.round, update.client) != (
                "update",
                p.job,
                p.round,
                p.client,
            ):
                raise CorruptUpdateError("the file changed while it was being ingested")
            check_agreement(p.reference, tuple(update.specs()), p.client)
            encoded = _encode(update, p.precision, self.raw_buffer)  # type: ignore[arg-type]
            entry, state = self._store(p, encoded)
        if step.failed:
            yield from step.rejections()
            return
        self.counters[f"updates_{state}"].inc()
        self.counters["raw_bytes"].inc(p.size)
        self.counters["stored_bytes"].inc(entry.stored_bytes)
        report(self.config.run_id, ProgressEvent("stored", files=1, bytes=p.size, detail=p.path))
        yield StoredUpdate(
            p.path, p.job, p.round, p.client, entry, p.reference, encoded.specs, state
        )

    def _store(self, p: PlannedUpdate, encoded: EncodedUpdate) -> tuple[UpdateEntry, StoredState]:
        if p.committed:
            if p.key not in self.manifests:
                self.manifests[p.key] = self.store.find_manifest(p.job, p.round)
            old = committed_entry(self.manifests[p.key], p.client, encoded.sha256)
            if old is not None:
                return old, "unchanged"
        key = layout.update_key(p.job, p.round, p.client)
        if same_object_stored(self.store, key, encoded.data):
            return entry_of(p.client, key, encoded), "already_stored"
        return self.store.put_encoded(p.job, p.round, p.client, encoded), "written"


class EncodeAndStore(IngestStep):
    """Outputs ``stored`` (one :class:`StoredUpdate` per update) and ``dead``."""

    def expand(self, planned: Any) -> Any:
        return planned | "Encode" >> TaggedParDo(EncodeAndStoreFn(self.config), DEAD, main="stored")


class StoreModelFn(_RawFileToStoreFn):
    """Store a ``global`` or ``initial`` raw file with ``put_global``/``put_initial``, unless
    the identical object is already stored."""

    def setup(self) -> None:
        super().setup()
        self.written = counter("models_written", self.config.run_id)
        self.unchanged = counter("models_unchanged", self.config.run_id)
        self.rejected = counter("deadletters", self.config.run_id)

    def process(self, h: RawHeader) -> Iterator[Any]:
        step = FileStep(
            self.config.run_id, self.rejected, "model", [(h.path, None)], h.job, h.round
        )
        with step:
            update = _read_update(self.reader, h.path, self.config.job, self.config.data_limits)
            spec = ensure_job_spec(self.store, h.job, self.config.precision)
            if h.kind == "global":
                assert h.round is not None
                key = layout.global_key(h.job, h.round)
                update.round, update.client, update.kind = h.round, None, "global"
            else:
                key = layout.initial_key(h.job)
                update.round, update.client, update.kind = None, None, "initial"
            update.job = h.job
            data = _encode(update, spec.precision).data
            if same_object_stored(self.store, key, data):
                self.unchanged.inc()
            else:
                if h.kind == "global":
                    assert h.round is not None
                    self.store.put_global(h.job, h.round, update)
                else:
                    self.store.put_initial(h.job, update)
                self.written.inc()
        if step.failed:
            yield from step.rejections()
            return
        report(self.config.run_id, ProgressEvent("model", files=1, bytes=h.size, detail=h.path))
        yield key


class StoreModels(IngestStep):
    """Outputs ``stored`` (the keys of the stored models) and ``dead``."""

    def expand(self, headers: Any) -> Any:
        return headers | "Store" >> TaggedParDo(StoreModelFn(self.config), DEAD, main="stored")
