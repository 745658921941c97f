"""The object store: FLStore's durable data plane (ARCHITECTURE §2).

:class:`ObjectStore` writes and reads the canonical layout over a blob store
(:class:`~flstore_core.storage.blobs.BlobStore`: S3 through boto3 by default, memory in unit
tests, a Redis mirror in a baseline); the commit rules it applies are
:mod:`flstore_core.storage.commit`. Writes are ordered so a
failure never leaves a visible half-round: updates first, the manifest last (a round exists for
readers only once its manifest does). Rewriting an update with the same content is a no-op in
effect; changing a committed client's update is refused. Reads verify every object against the
sha256 in its manifest. Rounds are read with parallel GETs and decoded straight into one
``(n_clients, n_params)`` float32 matrix (:class:`RoundMatrix`), the form every workload uses.
"""

from __future__ import annotations

import dataclasses
import hashlib
import threading
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from flstore_core import config
from flstore_core.aws import s3_client
from flstore_core.data import layout
from flstore_core.data.blocks import block_specs
from flstore_core.data.codec import (
    DEFAULT_LIMITS,
    CodecLimits,
    EncodedUpdate,
    FrameIndex,
    Precision,
    TensorMismatchError,
    TensorSpec,
    Update,
    decode_columns_into,
    decode_frames_columns_into,
    decode_into,
    decode_update,
    describe_frames,
    encode_update,
    header_prefix,
    parse_safetensors,
    row_sq_norm,
    slices_of,
    stored_specs,
    update_metadata,
)
from flstore_core.data.manifest import NORM, JobSpec, RoundManifest, UpdateEntry
from flstore_core.data.rows import unflatten
from flstore_core.errors import (
    CorruptUpdateError,
    NotFoundError,
    StoredObjectCorruptError,
    ValidationError,
)
from flstore_core.ids import validate_client, validate_job, validate_round
from flstore_core.storage.blobs import BlobInfo, BlobStore, BlobStream, Buffer
from flstore_core.storage.commit import (
    check_agreement,
    committed_entry,
    entry_of,
    round_reference,
)
from flstore_core.storage.s3 import S3BlobStore

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

# results carry this tag: the bucket's lifecycle rule expires them (infra/flstore_infra/storage.py)
RESULT_TAGS = {"flstore:kind": "result"}


@dataclass
class RoundMatrix:
    """A committed round as one contiguous float32 matrix, rows in ``clients`` order.

    ``specs`` give each column range's tensor name, source dtype and shape (``slices`` the
    ranges); ``sq_norms`` are the rows' squared L2 norms, computed while decoding.
    """

    job: str
    round: int
    clients: list[str]
    matrix: npt.NDArray[np.float32]
    specs: tuple[TensorSpec, ...]
    num_examples: npt.NDArray[np.int64]
    metrics: list[dict[str, Any]]
    sq_norms: npt.NDArray[np.float64]
    slices: list[tuple[int, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.slices:
            self.slices = slices_of(self.specs)

    @property
    def nbytes(self) -> int:
        return int(self.matrix.nbytes)

    def row_of(self, client: str) -> int:
        try:
            return self.clients.index(client)
        except ValueError:
            raise NotFoundError(
                f"client {client!r} is not in round {self.round} of job {self.job!r}"
            ) from None

    def tensors_of(self, vector: npt.NDArray[Any]) -> dict[str, npt.NDArray[Any]]:
        """Unflatten a row-shaped vector into named tensors with their source dtypes."""
        return unflatten(vector, self.specs)


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
        self._specs: dict[str, JobSpec] = {}
        self._orders: dict[str, tuple[str, ...]] = {}  # canonical tensor orders, by job
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        # specs of updates written through this object, so that commit need not read them back
        self._pending_specs: dict[tuple[str, int, str], tuple[TensorSpec, ...]] = {}
        self.gets = 0  # counted for cache statistics and tests
        self.puts = 0
        self.range_bytes = 0  # stored bytes read by ranged GETs (framed column blocks)

    # ------------------------------------------------------------------ primitives

    def _executor(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.max_workers, thread_name_prefix="s3")
            return self._pool

    def close(self) -> None:
        """Release the thread pool (the boto3 client needs no closing)."""
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None

    def view(self) -> ObjectStore:
        """A store over the same blobs with its own counters and thread pool: what one request
        of a shared process uses, so that its GET count is its own."""
        return ObjectStore(
            self.bucket, blobs=self.blobs, max_workers=self.max_workers, limits=self.limits
        )

    def ensure_bucket(self) -> None:
        """Create the bucket if it does not exist (local stacks and tests)."""
        self.blobs.prepare()

    def _put(
        self,
        key: str,
        body: bytes,
        content_type: str = "application/octet-stream",
        tags: dict[str, str] | None = None,
    ) -> None:
        self.blobs.put(key, body, content_type=content_type, tags=tags)
        with self._lock:
            self.puts += 1

    def _get(self, key: str, what: str) -> bytes:
        data = self.blobs.get(key)
        if data is None:
            raise NotFoundError(f"{what} not found")
        with self._lock:
            self.gets += 1
        return bytes(data) if isinstance(data, memoryview) else data

    def _open(self, key: str, what: str) -> BlobStream:
        stream = self.blobs.open(key)
        if stream is None:
            raise NotFoundError(f"{what} not found")
        with self._lock:
            self.gets += 1
        return stream

    def _exists(self, key: str) -> bool:
        return self.blobs.head(key) is not None

    # ------------------------------------------------------------------ jobs

    def put_job_spec(self, spec: JobSpec) -> JobSpec:
        """Write ``job.json`` (replacing a previous spec of the job)."""
        self._put(layout.job_spec_key(spec.job), spec.to_json(), "application/json")
        with self._lock:
            self._specs[spec.job] = spec
            self._orders.pop(spec.job, None)  # the declared model may have changed
        return spec

    def get_job_spec(self, job: str) -> JobSpec:
        """Read ``job.json``; :class:`NotFoundError` if the job was never declared."""
        key = layout.job_spec_key(job)
        with self._lock:
            cached = self._specs.get(job)
        if cached is not None:
            return cached
        spec = JobSpec.from_json(self._get(key, f"job {job!r}"))
        with self._lock:
            self._specs[job] = spec
        return spec

    def job_exists(self, job: str) -> bool:
        return self._exists(layout.job_spec_key(job))

    def ensure_job(self, job: str) -> JobSpec:
        """The job's spec, creating a default one (float32, no model) if it was never declared."""
        try:
            return self.get_job_spec(job)
        except NotFoundError:
            return self.put_job_spec(JobSpec(job=job))

    def list_jobs(self) -> list[str]:
        jobs = []
        for common in self.blobs.list_prefixes("jobs/", "/"):
            name = common[len("jobs/") :].rstrip("/")
            if name:
                jobs.append(name)
        return sorted(jobs)

    # ------------------------------------------------------------------ updates and rounds

    def put_update(
        self,
        job: str,
        round_: int,
        client: str,
        update: Update,
        *,
        precision: Precision | None = None,
    ) -> UpdateEntry:
        """Encode and store one client's update; returns its manifest entry (not yet committed).

        Refused before any write if the round is already committed with other tensors, or with a
        different update for this client.
        """
        validate_job(job)
        validate_round(round_)
        validate_client(client)
        spec = self.ensure_job(job)
        update.job, update.round, update.client, update.kind = job, round_, client, "update"
        encoded = encode_update(update, precision or spec.precision)
        return self.put_encoded(job, round_, client, encoded)

    def put_encoded(
        self, job: str, round_: int, client: str, encoded: EncodedUpdate
    ) -> UpdateEntry:
        """Store an already encoded update (ingestion encodes in its own workers)."""
        key = layout.update_key(job, round_, client)
        manifest = self.find_manifest(job, round_)
        if manifest is not None:
            check_agreement(manifest.tensors, encoded.specs, client)
            old = committed_entry(manifest, client, encoded.sha256)
            if old is not None:
                return old
        entry = entry_of(client, key, encoded)
        self._put(key, encoded.data)
        with self._lock:
            self._pending_specs[(job, round_, client)] = encoded.specs
        return entry

    def find_manifest(self, job: str, round_: int) -> RoundManifest | None:
        """The manifest of a committed round, or ``None`` if the round is not committed."""
        try:
            return self.get_manifest(job, round_)
        except NotFoundError:
            return None

    def commit_round(
        self,
        job: str,
        round_: int,
        entries: Iterable[UpdateEntry] | None = None,
        *,
        summaries: dict[str, dict[str, float]] | None = None,
        specs: dict[str, tuple[TensorSpec, ...]] | None = None,
    ) -> RoundManifest:
        """Make a round visible by writing its manifest, once all its updates are stored.

        Every update object under the round's prefix is included: those described by
        ``entries`` (what :meth:`put_update` returned) as given, any other (written by another
        process) read back and verified. Committing again is idempotent, and a late client is
        added to the manifest (the union). Names, shapes and dtypes must agree across the round,
        matched by name (clients may store their tensors in different orders); on a mismatch
        nothing is written and the error names the client and the tensor. A new round's tensors
        are laid out in the job's canonical order (:meth:`tensor_order`).
        """
        validate_job(job)
        validate_round(round_)
        spec = self.get_job_spec(job)
        existing = self.find_manifest(job, round_)
        given = {e.client: e for e in entries or ()}
        written_at = {
            c: info.modified
            for info in self.blobs.list(layout.updates_prefix(job, round_))
            if (c := layout.parse_client_from_update_key(info.key)) is not None
        }
        stored = set(written_at)
        missing = sorted(set(given) - stored)
        if missing:
            raise NotFoundError(
                f"round {round_} of job {job!r}: update of client {missing[0]!r} is not stored"
            )
        updates: dict[str, UpdateEntry] = dict(existing.updates) if existing else {}
        specs_of: dict[str, tuple[TensorSpec, ...]] = {}
        to_read = []
        for client in sorted(stored):
            if client in given:
                updates[client] = given[client]
                pending = (specs or {}).get(client) or self._pending_specs.get(
                    (job, round_, client)
                )
                if pending is not None:
                    specs_of[client] = pending
                else:
                    to_read.append(client)
            elif client not in updates:
                to_read.append(client)
        described = self._executor().map(lambda c: self._describe(job, round_, c), to_read)
        for client, (entry, read_specs) in zip(to_read, described, strict=True):
            updates[client] = given.get(client, entry)
            specs_of[client] = read_specs
        if not updates:
            raise NotFoundError(f"round {round_} of job {job!r} has no stored updates to commit")
        order = None if existing else self.tensor_order(job)
        reference = round_reference(existing, specs_of, written_at, order)
        for client in sorted(specs_of):
            check_agreement(reference, specs_of[client], client)
        for client, extra in (summaries or {}).items():
            if client in updates:  # a copy: the existing manifest's entries stay as they were
                old = updates[client]
                updates[client] = dataclasses.replace(old, summary={**old.summary, **extra})
        manifest = RoundManifest(job, round_, spec.precision, tuple(reference), updates)
        if existing is None or existing.to_json() != manifest.to_json():
            self._put(layout.manifest_key(job, round_), manifest.to_json(), "application/json")
        for client in specs_of:
            self._pending_specs.pop((job, round_, client), None)
        return manifest

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
        spec = self.get_job_spec(job)
        order = spec.state_names if spec.state_names else self._model_order(spec.model)
        if order is None:
            for prefix in self.blobs.list_prefixes(layout.rounds_prefix(job), "/"):
                r = layout.parse_round_from_key(job, prefix + "manifest.json")
                manifest = None if r is None else self.find_manifest(job, r)
                if manifest is not None:
                    order = tuple(s.name for s in manifest.tensors)
                    break
        if order is not None:
            with self._lock:
                self._orders[job] = order
        return order

    @staticmethod
    def _model_order(model: str | None) -> tuple[str, ...] | None:
        if model is None:
            return None
        from flstore_core import models  # torch, lazily: only jobs that declare a model

        try:
            return models.state_names(model)
        except (ImportError, ValidationError):  # no torch here, or a model unknown to this build
            return None

    def _describe(
        self, job: str, round_: int, client: str
    ) -> tuple[UpdateEntry, tuple[TensorSpec, ...]]:
        key = layout.update_key(job, round_, client)
        data = self._get(key, f"update of client {client!r}")
        # written by another process: its frame index is read off the object
        raw, frames, digests = describe_frames(data, self.limits)
        try:
            update = parse_safetensors(raw, self.limits)
        except CorruptUpdateError as exc:
            raise CorruptUpdateError(f"client {client!r}: {exc.message}") from exc
        sq = row_sq_norm(update)
        entry = UpdateEntry(
            client=client,
            key=key,
            sha256=hashlib.sha256(raw).hexdigest(),
            raw_bytes=len(raw),
            stored_bytes=len(data),
            num_examples=update.num_examples,
            metrics=update.metrics,
            summary={NORM: float(np.sqrt(sq))},
            frames=frames,
            frame_sha256=digests,
        )
        # reduced-precision storage widens back to float32, so specs carry the source dtypes
        return entry, tuple(update.specs())

    def get_manifest(self, job: str, round_: int) -> RoundManifest:
        """The manifest of a committed round; :class:`NotFoundError` if it is not committed."""
        data = self._get(
            layout.manifest_key(job, round_), f"round {round_} of job {job!r} (not committed?)"
        )
        return RoundManifest.from_json(data)

    def list_rounds(self, job: str) -> list[int]:
        """Committed rounds of a job, ascending (rounds without a manifest are invisible)."""
        return list(self.manifest_versions(job))

    def manifest_versions(self, job: str) -> dict[int, str]:
        """Every committed round of a job, ascending, with its manifest's version tag (the
        object's ETag) — from the one LIST that :meth:`list_rounds` makes anyway, so that a
        cache of manifests can tell a rewritten one (a backfill, a late client) from the copy
        it holds without a HEAD per manifest.

        The LIST is delimited by ``/updates/``: each round's update objects are rolled up into
        one common prefix, so the listing grows with the job's rounds, not with its update
        objects (50 rounds of 100 clients: one page, not six)."""
        prefix = layout.rounds_prefix(job)
        versions: dict[int, str] = {}
        for info in self.blobs.list(prefix, delimiter=layout.UPDATES_DELIMITER):
            key = info.key
            if key.endswith("/manifest.json"):
                r = layout.parse_round_from_key(job, key)
                if r is not None:
                    # a backend without ETags: size and write time stand in for one
                    versions[r] = info.etag or f"{info.size}@{info.modified}"
        return dict(sorted(versions.items()))

    def get_update(self, job: str, round_: int, client: str) -> Update:
        """One committed client update, verified against the manifest."""
        manifest = self.get_manifest(job, round_)
        entry = manifest.updates.get(validate_client(client))
        if entry is None:
            raise NotFoundError(f"client {client!r} is not in round {round_} of job {job!r}")
        data = self._get(entry.key, f"update of client {client!r}")
        try:
            return decode_update(data, expected_sha256=entry.sha256, limits=self.limits)
        except CorruptUpdateError as exc:
            raise StoredObjectCorruptError(f"{entry.key}: {exc.message}") from exc

    def read_round(
        self,
        job: str,
        round_: int,
        clients: Sequence[str] | None = None,
        *,
        manifest: RoundManifest | None = None,
    ) -> RoundMatrix:
        """A committed round as a :class:`RoundMatrix`, fetched with parallel GETs.

        Each update is decompressed straight into its row; every row is verified against the
        manifest's checksum and tensor specs.
        """
        manifest = manifest or self.get_manifest(job, round_)
        order = _clients_of(manifest, clients)
        specs = manifest.tensors
        matrix = np.empty((len(order), manifest.n_params), dtype=np.float32)
        sq = np.empty(len(order), dtype=np.float64)

        def load(i: int) -> None:
            entry = manifest.updates[order[i]]
            data = self._get(entry.key, f"update of client {order[i]!r}")
            try:
                row = decode_into(
                    data,
                    matrix[i],
                    specs,
                    expected_sha256=entry.sha256,
                    limits=self.limits,
                    who=f"client {order[i]!r}",
                )
            except CorruptUpdateError as exc:
                raise StoredObjectCorruptError(f"{entry.key}: {exc.message}") from exc
            sq[i] = row.sq_norm

        list(self._executor().map(load, range(len(order))))
        return _round_matrix(manifest, order, matrix, specs, sq)

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
        """The columns ``[a, b)`` of a committed round (a column block, :mod:`~flstore_core.
        data.blocks`) as a ``(clients, b - a)`` :class:`RoundMatrix`.

        A client whose manifest entry indexes its frames (an update stored in several zstd
        frames, :func:`~flstore_core.data.codec.encode_update`) is read by ranged GETs: its
        header frame, then the frames holding the block's bytes (one GET per run of
        consecutive frames), each verified against its digest in the manifest — a block costs
        its share of the stored bytes plus a frame or two at its edges, not the whole object
        (:func:`~flstore_core.data.codec.decode_frames_columns_into`). The whole row, and an
        entry without frames (one-frame updates, manifests from before frames), is streamed
        (one GET) and decoded with
        :func:`~flstore_core.data.codec.decode_columns_into`: verified whole against the
        manifest's checksum and tensor specs, only the block's columns kept. Clients are read in
        parallel on the store's pool, so at most ``max_workers`` streams are open: memory is the
        block plus ``max_workers`` × ``chunk_bytes`` (and a zstd window each). ``specs`` are the
        block's (:func:`~flstore_core.data.blocks.block_specs`), ``sq_norms`` the rows' parts.
        """
        manifest = manifest or self.get_manifest(job, round_)
        order = _clients_of(manifest, clients)
        a, b = columns
        if not 0 <= a < b <= manifest.n_params:
            raise ValidationError(
                f"columns [{a}, {b}) are not a block of round {round_}'s "
                f"{manifest.n_params} parameters"
            )
        specs = manifest.tensors
        matrix = np.empty((len(order), b - a), dtype=np.float32)
        sq = np.empty(len(order), dtype=np.float64)

        whole = (a, b) == (0, manifest.n_params)

        def load(i: int) -> None:
            entry = manifest.updates[order[i]]
            if entry.frames and not whole:
                head = expected_header(manifest, entry)
                sq[i] = self._read_frames(
                    entry, matrix[i], specs, columns, f"client {order[i]!r}", head
                )
                return
            stream = self._open(entry.key, f"update of client {order[i]!r}")
            try:
                row = decode_columns_into(
                    stream,
                    matrix[i],
                    specs,
                    columns,
                    expected_sha256=entry.sha256,
                    limits=self.limits,
                    who=f"client {order[i]!r}",
                    chunk_bytes=chunk_bytes,
                )
            except CorruptUpdateError as exc:
                raise StoredObjectCorruptError(f"{entry.key}: {exc.message}") from exc
            finally:
                stream.close()
            sq[i] = row.sq_norm

        list(self._executor().map(load, range(len(order))))
        return _round_matrix(manifest, order, matrix, block_specs(specs, columns), sq)

    def _read_frames(
        self,
        entry: UpdateEntry,
        out: npt.NDArray[np.float32],
        specs: Sequence[TensorSpec],
        columns: tuple[int, int],
        who: str,
        header: bytes | None = None,
    ) -> float:
        """Columns of a framed update by ranged GETs of the frames that hold them (the header
        frame, then one GET per run of consecutive frames), each checked against its digest in
        the manifest; the block's squared norm."""

        def fetch(start: int, end: int) -> Buffer:
            data = self.blobs.get_range(entry.key, start, end)
            if data is None:
                raise NotFoundError(f"update of {who} not found")
            with self._lock:
                self.gets += 1
                self.range_bytes += len(data)
            return data

        try:
            row = decode_frames_columns_into(
                fetch,
                FrameIndex.from_pairs(entry.frames, entry.frame_sha256),
                out,
                specs,
                columns,
                limits=self.limits,
                who=who,
                header=header,
            )
        except CorruptUpdateError as exc:
            raise StoredObjectCorruptError(f"{entry.key}: {exc.message}") from exc
        return row.sq_norm

    def read_base_block(
        self,
        job: str,
        round_: int,
        specs: Sequence[TensorSpec],
        columns: tuple[int, int],
        *,
        chunk_bytes: int = 1 << 20,
    ) -> npt.NDArray[np.float32] | None:
        """The columns ``[a, b)`` of a round's base model (ARCHITECTURE §2: ``global/{round-1}``,
        or the initial model at round 0), streamed like :meth:`read_round_block`; ``None`` when
        there is no base or it does not fit ``specs`` (the rule of
        :func:`~flstore_core.data.rows.base_vector`).

        The base is read whole (streamed), not by frames: it is in no manifest, so its frame
        index is unknown without reading it, and it is one object per block against a round's
        many clients."""
        key = layout.global_key(job, round_ - 1) if round_ > 0 else layout.initial_key(job)
        stream = self.blobs.open(key)
        if stream is None or not specs:
            return None
        with self._lock:
            self.gets += 1
        out = np.empty(columns[1] - columns[0], dtype=np.float32)
        try:
            decode_columns_into(
                stream,
                out,
                specs,
                columns,
                limits=self.limits,
                who=f"base model of round {round_}",
                chunk_bytes=chunk_bytes,
            )
        except TensorMismatchError:
            return None
        except CorruptUpdateError as exc:
            raise StoredObjectCorruptError(f"{key}: {exc.message}") from exc
        finally:
            stream.close()
        return out

    # ------------------------------------------------------------------ models and data

    def put_global(self, job: str, round_: int, update: Update) -> str:
        """Store the aggregated model after ``round_``; returns its key."""
        spec = self.ensure_job(job)
        update.job, update.round, update.client, update.kind = job, round_, None, "global"
        key = layout.global_key(job, round_)
        self._put(key, encode_update(update, spec.precision).data)
        return key

    def list_global_rounds(self, job: str) -> list[int]:
        """Rounds that have a stored global model, ascending."""
        prefix = layout.job_prefix(job) + "global/"
        rounds = []
        for info in self.blobs.list(prefix):
            name = info.key[len(prefix) :].removesuffix(layout.UPDATE_SUFFIX)
            if len(name) == 8 and name.isdigit():
                rounds.append(int(name))
        return sorted(rounds)

    def get_global(self, job: str, round_: int) -> Update:
        """The aggregated model after ``round_``."""
        data = self._get(layout.global_key(job, round_), f"global model of round {round_}")
        return self._decode_stored(data, layout.global_key(job, round_))

    def put_initial(self, job: str, update: Update) -> str:
        """Store the job's model before round 0; returns its key."""
        spec = self.ensure_job(job)
        update.job, update.round, update.client, update.kind = job, None, None, "initial"
        key = layout.initial_key(job)
        self._put(key, encode_update(update, spec.precision).data)
        return key

    def get_initial(self, job: str) -> Update:
        data = self._get(layout.initial_key(job), f"initial model of job {job!r}")
        return self._decode_stored(data, layout.initial_key(job))

    def get_base(self, job: str, round_: int) -> Update | None:
        """The model a round's clients started from (ARCHITECTURE §2), or ``None`` if unknown."""
        try:
            return self.get_global(job, round_ - 1) if round_ > 0 else self.get_initial(job)
        except NotFoundError:
            return None

    def put_validation_set(
        self, job: str, x: npt.NDArray[np.floating[Any]], y: npt.NDArray[np.integer[Any]]
    ) -> str:
        """Store the server-side validation set (``x`` float32, ``y`` int64)."""
        x = np.asarray(x, dtype=np.float32)
        y = np.asarray(y, dtype=np.int64)
        if x.ndim < 1 or y.ndim != 1 or len(x) != len(y) or len(y) == 0:
            raise ValidationError(
                f"validation set needs x of shape (n, ...) and y of shape (n,), got "
                f"{list(x.shape)} and {list(y.shape)}"
            )
        self.ensure_job(job)
        key = layout.validation_key(job)
        encoded = encode_update(
            Update({"x": x, "y": y}, num_examples=len(y), job=job, kind="initial")
        )
        self._put(key, encoded.data)
        return key

    def get_validation_set(self, job: str) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
        data = self._get(layout.validation_key(job), f"validation set of job {job!r}")
        update = self._decode_stored(data, layout.validation_key(job))
        if set(update.tensors) != {"x", "y"}:
            raise StoredObjectCorruptError("validation set must hold exactly 'x' and 'y'")
        return (
            np.asarray(update.tensors["x"], dtype=np.float32),
            np.asarray(update.tensors["y"], dtype=np.int64),
        )

    def put_result(self, key: str, body: bytes, content_type: str = "application/json") -> str:
        """Write a result object under a job's ``results/`` prefix."""
        if "/results/" not in key or not key.startswith("jobs/"):
            raise ValidationError(f"result key {key!r} is not under a job's results/ prefix")
        self._put(key, body, content_type, tags=RESULT_TAGS)
        return key

    def compose_result(
        self, key: str, parts: Sequence[str], content_type: str = "application/octet-stream"
    ) -> str:
        """Write a result object as the concatenation of result objects ``parts`` (a model
        result written block by block: each part one zstd frame), without holding it whole."""
        for name in (key, *parts):
            if "/results/" not in name or not name.startswith("jobs/"):
                raise ValidationError(f"result key {name!r} is not under a job's results/ prefix")
        self.blobs.compose(key, parts, content_type=content_type, tags=RESULT_TAGS)
        with self._lock:
            self.puts += 1
        return key

    def delete_results(self, keys: Sequence[str]) -> None:
        """Remove result objects (the parts of a composed result once it is written)."""
        for key in keys:
            if "/results/" not in key or not key.startswith("jobs/"):
                raise ValidationError(f"result key {key!r} is not under a job's results/ prefix")
            self.blobs.delete(key)

    def put_object(
        self, key: str, body: bytes, content_type: str = "application/octet-stream"
    ) -> str:
        """Write any object under a job's prefix or the bucket's ``ingest/`` prefix (ingestion's
        dead letters); the canonical objects have their own methods, which check them."""
        if not key.startswith(("jobs/", "ingest/")):
            raise ValidationError(f"key {key!r} is outside the jobs/ and ingest/ prefixes")
        self._put(key, body, content_type)
        return key

    def get_object(self, key: str) -> bytes:
        """Raw bytes of any object (results, for instance)."""
        return self._get(key, f"object {key!r}")

    def stat(self, key: str) -> BlobInfo | None:
        """Size and content tag of an object without reading it, ``None`` if it does not exist."""
        return self.blobs.head(key)

    def list_keys(self, prefix: str) -> Iterator[str]:
        """Every key under ``prefix``, in key order."""
        return (info.key for info in self.blobs.list(prefix))

    def _decode_stored(self, data: bytes, key: str) -> Update:
        try:
            return decode_update(data, limits=self.limits)
        except CorruptUpdateError as exc:
            raise StoredObjectCorruptError(f"{key}: {exc.message}") from exc


# ---------------------------------------------------------------------- helpers


def expected_header(manifest: RoundManifest, entry: UpdateEntry) -> bytes | None:
    """The header frame :func:`~flstore_core.data.codec.encode_update` writes for ``entry``'s
    update when its tensors are in the round's order: the manifest's specs in its storage
    precision and the metadata the manifest records. A framed block read compares it with the
    first frame's digest and, when they agree, skips the header GET; ``None`` when the
    metadata cannot be rebuilt (the header is then read)."""
    update = Update(
        {},
        num_examples=entry.num_examples,
        metrics=entry.metrics,
        job=manifest.job,
        round=manifest.round,
        client=entry.client,
    )
    try:
        meta = update_metadata(update, manifest.precision)
        return header_prefix(stored_specs(manifest.tensors, manifest.precision), meta)
    except ValidationError:
        return None


def _clients_of(manifest: RoundManifest, clients: Sequence[str] | None) -> list[str]:
    """The rows to read: ``clients`` (every client of the round if None), each in the round."""
    order = list(manifest.clients if clients is None else clients)
    for c in order:
        if c not in manifest.updates:
            raise NotFoundError(
                f"client {c!r} is not in round {manifest.round} of job {manifest.job!r}"
            )
    return order


def _round_matrix(
    manifest: RoundManifest,
    order: list[str],
    matrix: npt.NDArray[np.float32],
    specs: tuple[TensorSpec, ...],
    sq: npt.NDArray[np.float64],
) -> RoundMatrix:
    """The :class:`RoundMatrix` of rows read in ``order`` (whole rows or a block's columns)."""
    return RoundMatrix(
        job=manifest.job,
        round=manifest.round,
        clients=order,
        matrix=matrix,
        specs=specs,
        num_examples=np.array([manifest.updates[c].num_examples for c in order], dtype=np.int64),
        metrics=[manifest.updates[c].metrics for c in order],
        sq_norms=sq,
    )
