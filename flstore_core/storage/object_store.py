"""The object store: FLStore's durable data plane (ARCHITECTURE §2).

:class:`ObjectStore` writes and reads the canonical layout over a blob store
(:class:`~flstore_core.storage.blobs.BlobStore`: S3 through boto3 by default, memory in unit
tests, a Redis mirror in a baseline). It is one facade over small parts, each a module of this
package:

* :mod:`.counted` — the store's counted GETs and PUTs and its thread pool;
* :mod:`.jobs` — job specs and each job's canonical tensor order, cached;
* :mod:`.round_writer` — storing updates and committing rounds, applying the rules of
  :mod:`.commit`: updates first, the manifest last, so a failure never leaves a visible
  half-round; rewriting an update with the same content is a no-op in effect, changing a
  committed client's update is refused;
* :mod:`.round_reader` — verified reads of rounds, decoded straight into one
  ``(n_clients, n_params)`` float32 matrix (:class:`RoundMatrix`), the form every workload uses;
* :mod:`.stored_models` — initial and global models, the validation set;
* :mod:`.results` — result objects and raw objects by key;
* :mod:`.catalog` — listings: jobs, committed rounds and manifest versions, global models;
* :mod:`.verified` — the one place a stored object that fails verification becomes a 503.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, MutableMapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from flstore_core import config
from flstore_core.aws import s3_client
from flstore_core.data.codec import (
    DEFAULT_LIMITS,
    CodecLimits,
    DecodedRow,
    EncodedUpdate,
    Precision,
    ScratchBuffer,
    TensorSpec,
    Update,
    encode_update,
)
from flstore_core.data.manifest import JobSpec, RoundManifest, UpdateEntry
from flstore_core.ids import validate_client, validate_job, validate_round
from flstore_core.storage import catalog
from flstore_core.storage.blobs import BlobInfo, BlobStore
from flstore_core.storage.counted import CountedBlobs
from flstore_core.storage.jobs import JobSpecs
from flstore_core.storage.results import RESULT_TAGS, ResultObjects
from flstore_core.storage.round_reader import HeldRow, RoundMatrix, RoundReader, expected_header
from flstore_core.storage.round_writer import RoundWriter
from flstore_core.storage.s3 import S3BlobStore
from flstore_core.storage.stored_models import StoredModels

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

__all__ = ["RESULT_TAGS", "ObjectStore", "RoundMatrix", "expected_header"]


class ObjectStore:
    """FLStore's canonical layout on one S3 bucket."""

    def __init__(
        self,
        bucket: str | None = None,
        *,
        endpoint_url: str | None = None,
        client: S3Client | None = None,
        blobs: BlobStore | None = None,
        max_workers: int = 8,
        limits: CodecLimits = DEFAULT_LIMITS,
    ) -> None:
        """A store over ``blobs``, or over S3: ``bucket`` (default ``FLSTORE_BUCKET``) through
        ``client`` or a client of ``endpoint_url`` (default ``FLSTORE_S3_ENDPOINT``)."""
        if blobs is None:
            bucket = bucket or config.BUCKET.get() or ""
            s3 = client or s3_client(endpoint_url, max_pool=max(32, max_workers * 2))
            blobs = S3BlobStore(bucket, s3)
        self.blobs: BlobStore = blobs
        self.bucket = bucket or str(getattr(blobs, "bucket", ""))
        self.max_workers = max_workers
        self.limits = limits
        self._io = CountedBlobs(blobs, max_workers)
        self._jobs = JobSpecs(self._io)
        self._writer = RoundWriter(self._io, self._jobs, limits)
        self._reader = RoundReader(self._io, limits)
        self._models = StoredModels(self._io, self._jobs, limits)
        self._results = ResultObjects(self._io)

    # ------------------------------------------------------------------ counts and lifetime

    @property
    def gets(self) -> int:
        """GETs made through this object (whole, streamed and ranged): cache statistics, tests."""
        return self._io.gets

    @property
    def puts(self) -> int:
        """PUTs made through this object (a composed result counts one)."""
        return self._io.puts

    @property
    def range_bytes(self) -> int:
        """Stored bytes read by ranged GETs (framed column blocks)."""
        return self._io.range_bytes

    def close(self) -> None:
        """Release the thread pool (the boto3 client needs no closing)."""
        self._io.close()

    def view(self) -> ObjectStore:
        """A store over the same blobs with its own counters and thread pool: what one request
        of a shared process uses, so that its GET count is its own."""
        return ObjectStore(
            self.bucket, blobs=self.blobs, max_workers=self.max_workers, limits=self.limits
        )

    def ensure_bucket(self) -> None:
        """Create the bucket if it does not exist (local stacks and tests)."""
        self.blobs.prepare()

    # ------------------------------------------------------------------ jobs

    def put_job_spec(self, spec: JobSpec, *, force: bool = False) -> JobSpec:
        """Write ``job.json`` (replacing a previous spec of the job); another model for a job
        with committed rounds is a ConflictError unless ``force``."""
        return self._jobs.put(spec, force=force)

    def get_job_spec(self, job: str) -> JobSpec:
        """Read ``job.json``; :class:`NotFoundError` if the job was never declared."""
        return self._jobs.get(job)

    def job_exists(self, job: str) -> bool:
        """Whether the job was declared (its ``job.json`` exists)."""
        return self._jobs.exists(job)

    def ensure_job(self, job: str) -> JobSpec:
        """The job's spec, creating a default one (float32, no model) if it was never declared."""
        return self._jobs.ensure(job)

    def list_jobs(self) -> list[str]:
        """Every job in the bucket, sorted."""
        return catalog.job_names(self.blobs)

    def tensor_order(self, job: str) -> tuple[str, ...] | None:
        """The job's canonical tensor order, ``None`` while it has none yet
        (:meth:`~flstore_core.storage.jobs.JobSpecs.tensor_order`)."""
        return self._jobs.tensor_order(job)

    # ------------------------------------------------------------------ updates and rounds

    def put_update(
        self,
        job: str,
        round_: int,
        client: str,
        update: Update,
        *,
        precision: Precision | None = None,
        scratch: ScratchBuffer | None = None,
    ) -> UpdateEntry:
        """Encode and store one client's update; returns its manifest entry (not yet committed).

        Refused before any write if the round is already committed with other tensors, or with a
        different update for this client. ``scratch`` holds the serialized bytes while they are
        compressed (:func:`~flstore_core.data.codec.encode_update`): a writer storing update
        after update passes one per thread and spares each a fresh allocation.
        """
        validate_job(job)
        validate_round(round_)
        validate_client(client)
        spec = self.ensure_job(job)
        update.job, update.round, update.client, update.kind = job, round_, client, "update"
        encoded = encode_update(update, precision or spec.precision, scratch=scratch)
        return self.put_encoded(job, round_, client, encoded)

    def put_encoded(
        self, job: str, round_: int, client: str, encoded: EncodedUpdate
    ) -> UpdateEntry:
        """Store an already encoded update (ingestion encodes in its own workers)."""
        return self._writer.put_encoded(job, round_, client, encoded)

    def commit_round(
        self,
        job: str,
        round_: int,
        entries: Iterable[UpdateEntry] | None = None,
        *,
        summaries: dict[str, dict[str, float]] | None = None,
        specs: dict[str, tuple[TensorSpec, ...]] | None = None,
    ) -> RoundManifest:
        """Make a round visible by writing its manifest, once all its updates are stored;
        idempotent, and a late client joins a committed round where the job spec allows it
        (:meth:`~flstore_core.storage.round_writer.RoundWriter.commit_round`)."""
        return self._writer.commit_round(job, round_, entries, summaries, specs)

    def get_manifest(self, job: str, round_: int) -> RoundManifest:
        """The manifest of a committed round; :class:`NotFoundError` if it is not committed."""
        return catalog.get_manifest(self._io, job, round_)

    def find_manifest(self, job: str, round_: int) -> RoundManifest | None:
        """The manifest of a committed round, or ``None`` if the round is not committed."""
        return catalog.find_manifest(self._io, job, round_)

    def list_rounds(self, job: str) -> list[int]:
        """Committed rounds of a job, ascending (rounds without a manifest are invisible)."""
        return list(self.manifest_versions(job))

    def manifest_versions(self, job: str) -> dict[int, str]:
        """Every committed round of a job, ascending, with its manifest's version tag, from one
        delimited LIST (:func:`~flstore_core.storage.catalog.manifest_versions`)."""
        return catalog.manifest_versions(self.blobs, job)

    def get_update(self, job: str, round_: int, client: str) -> Update:
        """One committed client update, verified against the manifest."""
        return self._reader.get_update(job, round_, client)

    def read_round(
        self,
        job: str,
        round_: int,
        clients: Sequence[str] | None = None,
        *,
        manifest: RoundManifest | None = None,
        held: MutableMapping[str, HeldRow] | None = None,
        into: npt.NDArray[np.float32] | None = None,
    ) -> RoundMatrix:
        """A committed round as a :class:`RoundMatrix`, fetched with parallel GETs and verified,
        the rows in ``held`` taken as they are, into the matrix ``into`` when given
        (:meth:`~flstore_core.storage.round_reader.RoundReader.read_round`)."""
        return self._reader.read_round(job, round_, clients, manifest, held, into)

    def read_update_row(
        self,
        key: str,
        specs: tuple[TensorSpec, ...],
        who: str,
        out: npt.NDArray[np.float32] | None = None,
    ) -> tuple[npt.NDArray[np.float32], DecodedRow]:
        """An update not yet committed, verified and decoded into a row (``out`` when given),
        with its digest (:meth:`~flstore_core.storage.round_reader.RoundReader.read_update_row`)."""
        return self._reader.read_update_row(key, specs, who, out)

    def read_round_block(
        self,
        job: str,
        round_: int,
        columns: tuple[int, int],
        *,
        manifest: RoundManifest | None = None,
        clients: Sequence[str] | None = None,
        chunk_bytes: int = 1 << 20,
    ) -> RoundMatrix:
        """The columns ``[a, b)`` of a committed round as a ``(clients, b - a)``
        :class:`RoundMatrix`, framed updates read by ranged GETs of the frames that hold them
        (:meth:`~flstore_core.storage.round_reader.RoundReader.read_round_block`)."""
        return self._reader.read_round_block(job, round_, columns, manifest, clients, chunk_bytes)

    def read_base_block(
        self,
        job: str,
        round_: int,
        specs: Sequence[TensorSpec],
        columns: tuple[int, int],
        *,
        chunk_bytes: int = 1 << 20,
    ) -> npt.NDArray[np.float32] | None:
        """The columns ``[a, b)`` of a round's base model, ``None`` when there is none or it
        does not fit ``specs``
        (:meth:`~flstore_core.storage.round_reader.RoundReader.read_base_block`)."""
        return self._reader.read_base_block(job, round_, specs, columns, chunk_bytes)

    # ------------------------------------------------------------------ models and data

    def put_global(self, job: str, round_: int, update: Update) -> str:
        """Store the aggregated model after ``round_``, once (another one is a
        ConflictError); returns its key."""
        return self._models.put_global(job, round_, update)

    def list_global_rounds(self, job: str) -> list[int]:
        """Rounds that have a stored global model, ascending."""
        return catalog.global_rounds(self.blobs, job)

    def get_global(self, job: str, round_: int) -> Update:
        """The aggregated model after ``round_``."""
        return self._models.get_global(job, round_)

    def put_initial(self, job: str, update: Update) -> str:
        """Store the job's model before round 0, once (another one is a ConflictError);
        returns its key."""
        return self._models.put_initial(job, update)

    def get_initial(self, job: str) -> Update:
        """The job's model before round 0."""
        return self._models.get_initial(job)

    def get_base(self, job: str, round_: int) -> Update | None:
        """The model a round's clients started from (ARCHITECTURE §2), or ``None`` if unknown."""
        return self._models.get_base(job, round_)

    def put_validation_set(
        self,
        job: str,
        x: npt.NDArray[np.floating[Any]],
        y: npt.NDArray[np.integer[Any]],
        *,
        force: bool = False,
    ) -> str:
        """Store the server-side validation set (``x`` float32, ``y`` int64); another set for a
        job with committed rounds is a ConflictError unless ``force``."""
        return self._models.put_validation_set(job, x, y, force=force)

    def get_validation_set(self, job: str) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
        """The server-side validation set ``(x, y)``."""
        return self._models.get_validation_set(job)

    # ------------------------------------------------------------------ results and raw objects

    def put_result(self, key: str, body: bytes, content_type: str = "application/json") -> str:
        """Write a result object under a job's ``results/`` prefix."""
        return self._results.put_result(key, body, content_type)

    def compose_result(
        self, key: str, parts: Sequence[str], content_type: str = "application/octet-stream"
    ) -> str:
        """Write a result object as the concatenation of result objects ``parts`` (a model
        result written block by block: each part one zstd frame), without holding it whole."""
        return self._results.compose_result(key, parts, content_type)

    def delete_results(self, keys: Sequence[str]) -> None:
        """Remove result objects (the parts of a composed result once it is written)."""
        self._results.delete_results(keys)

    def put_object(
        self, key: str, body: bytes, content_type: str = "application/octet-stream"
    ) -> str:
        """Write any object under a job's prefix or the bucket's ``ingest/`` prefix (ingestion's
        dead letters); the canonical objects have their own methods, which check them."""
        return self._results.put_object(key, body, content_type)

    def get_object(self, key: str) -> bytes:
        """Raw bytes of any object (results, for instance)."""
        return self._io.get(key, f"object {key!r}")

    def stat(self, key: str) -> BlobInfo | None:
        """Size and content tag of an object without reading it, ``None`` if it does not exist."""
        return self.blobs.head(key)

    def list_keys(self, prefix: str) -> Iterator[str]:
        """Every key under ``prefix``, in key order."""
        return (info.key for info in self.blobs.list(prefix))
