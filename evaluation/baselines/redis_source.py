"""Rounds read from Redis: what the ``cache-agg`` baseline fetches instead of S3 (ARCHITECTURE §8).

The cache holds exactly what S3 holds — each update's compressed bytes, the round's manifest and
its base model, under their S3 keys (:func:`populate_redis`) — so the baseline pays the same
decoding as FLStore's cold path and differs only in where the bytes come from.
:func:`load_round_from` mirrors :func:`flstore_core.cache.round_loading.load_round` over any
:class:`ByteSource`: the manifest first, then every update fetched and decoded straight into its
row of one float32 matrix in parallel (checked against the manifest's sha256), the base model
beside them, and the same :class:`~flstore_core.cache.round_data.RoundData`, so the workload
that runs next sees identical data and writes an identical result.

Why a hand-written GET for the big values: redis-py's pure-Python reply parser copies a bulk
reply three times through small ``recv`` chunks (measured here: ~450 MB/s for 45 MB values, the
whole round taking ~1 s), which would make the baseline slow for reasons no production
aggregator suffers (it would use hiredis). :class:`RespBulkReader` sends a plain RESP2 ``GET``
and reads the bulk reply with ``recv_into`` straight into one buffer, running at the rate the
server sends (~1 GB/s on loopback). ``reader="redis-py"`` keeps the library path for comparison.

Under the network model (:class:`RedisHop`), every Redis command waits ElastiCache's round trip
and its bytes' time through the interface the aggregator and the cache node share; the wait is
taken at the client side of the hop, after the local command returned, so parallel GETs overlap
their round trips and share the bandwidth as they would on AWS.
"""

from __future__ import annotations

import io
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Literal, Protocol
from urllib.parse import unquote, urlsplit

import numpy as np
import numpy.typing as npt
import redis

from flstore_core.cache.round_data import ArtifactStats, JobContext, RoundData, Validation
from flstore_core.data import layout
from flstore_core.data.codec import (
    DEFAULT_LIMITS,
    CodecLimits,
    TensorSpec,
    decode_into,
    decode_update,
)
from flstore_core.data.manifest import JobSpec, RoundManifest
from flstore_core.data.rows import base_vector
from flstore_core.errors import (
    CorruptUpdateError,
    NotFoundError,
    StoredObjectCorruptError,
    UnavailableError,
    ValidationError,
)
from flstore_core.storage.blobs import BlobInfo, BlobStream, ReadThroughBlobStore
from flstore_core.storage.object_store import ObjectStore
from lambdas.local_runtime.network import NetworkModel, redis_delay_s

Buffer = bytes | memoryview
RedisReader = Literal["resp", "redis-py"]


class ByteSource(Protocol):
    """Where a round's stored objects come from: their bytes by S3 key, ``None`` if absent."""

    def get(self, key: str) -> Buffer | None: ...


def base_key(job: str, round_: int) -> str:
    """S3 key of a round's base model: ``global/{round-1}``, or the initial model at round 0."""
    return layout.global_key(job, round_ - 1) if round_ > 0 else layout.initial_key(job)


# ---------------------------------------------------------------------- populating


def populate_redis(
    store: ObjectStore, client: redis.Redis, job: str, round_: int, *, with_base: bool = True
) -> list[str]:
    """Copy a committed round from S3 into Redis, keyed by S3 key; returns the keys written.

    Copies every update's compressed bytes as stored, the job's spec and validation set and the
    round's base model (deleting a stale copy of one S3 does not have, so the cache never
    disagrees with S3) and, last, the manifest: as in S3, a round becomes visible to readers
    only once it is complete.
    """
    manifest_key = layout.manifest_key(job, round_)
    manifest_raw = store.get_object(manifest_key)
    manifest = RoundManifest.from_json(manifest_raw)
    written: list[str] = []
    for client_id in manifest.clients:
        key = manifest.updates[client_id].key
        client.set(key, store.get_object(key))
        written.append(key)
    optional = [layout.job_spec_key(job), layout.validation_key(job)]
    if with_base:
        optional.append(base_key(job, round_))
    for key in optional:
        try:
            client.set(key, store.get_object(key))
            written.append(key)
        except NotFoundError:
            client.delete(key)
    client.set(manifest_key, manifest_raw)
    written.append(manifest_key)
    return written


# ---------------------------------------------------------------------- reading


class RespBulkReader:
    """``GET`` of large values over RESP2, each reply read with ``recv_into`` into one buffer.

    Connections are pooled (a request in flight holds one), opened lazily, authenticated and
    switched to the URL's database once; a connection that fails is dropped, never reused.
    """

    def __init__(self, url: str, timeout: float = 60.0) -> None:
        parts = urlsplit(url)
        if parts.scheme != "redis" or not parts.hostname:
            raise ValidationError(
                f"invalid Redis URL {url!r}: use redis://[:password@]host:port/db"
            )
        self.host = parts.hostname
        self.port = parts.port or 6379
        db = parts.path.strip("/") or "0"
        if not db.isdigit():
            raise ValidationError(f"invalid Redis URL {url!r}: the database must be a number")
        self.db = int(db)
        self.username = unquote(parts.username) if parts.username else None
        self.password = unquote(parts.password) if parts.password is not None else None
        self.timeout = timeout
        self._lock = threading.Lock()
        self._idle: list[_RespConnection] = []

    def get(self, key: str) -> memoryview | None:
        """The value of ``key`` (a view of a fresh buffer), or ``None`` if it does not exist."""
        with self._lock:
            conn = self._idle.pop() if self._idle else None
        try:
            if conn is None:
                conn = self._connect()
            value = conn.command(b"GET", key.encode())
        except OSError as exc:
            if conn is not None:
                conn.close()
            raise UnavailableError(f"Redis at {self.host}:{self.port} failed: {exc}") from exc
        with self._lock:
            self._idle.append(conn)
        return value

    def _connect(self) -> _RespConnection:
        conn = _RespConnection(socket.create_connection((self.host, self.port), self.timeout))
        if self.password is not None:
            auth = [self.username.encode()] if self.username else []
            conn.command(b"AUTH", *auth, self.password.encode())
        if self.db:
            conn.command(b"SELECT", str(self.db).encode())
        return conn

    def close(self) -> None:
        with self._lock:
            conns, self._idle = self._idle, []
        for conn in conns:
            conn.close()


class _RespConnection:
    """One socket speaking just enough RESP2 for GET, AUTH and SELECT."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        self.pending = bytearray()  # bytes received past the last reply's header

    def command(self, *parts: bytes) -> memoryview | None:
        request = b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)
        self.sock.sendall(request)
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return memoryview(rest)
        if kind == b"-":
            raise UnavailableError(f"Redis answered an error: {rest.decode(errors='replace')}")
        if kind != b"$":
            raise UnavailableError(f"unexpected Redis reply {line[:40]!r} to {parts[0]!r}")
        n = int(rest)
        if n < 0:
            return None
        return memoryview(self._exactly(n + 2))[:n]  # the value and its trailing CRLF

    def _line(self) -> bytes:
        while (end := self.pending.find(b"\r\n")) < 0:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("Redis closed the connection")
            self.pending += chunk
        line = bytes(self.pending[:end])
        del self.pending[: end + 2]
        return line

    def _exactly(self, n: int) -> bytearray:
        buf = bytearray(n)
        view = memoryview(buf)
        got = min(n, len(self.pending))
        view[:got] = self.pending[:got]
        del self.pending[:got]
        while got < n:
            k = self.sock.recv_into(view[got:])
            if not k:
                raise ConnectionError("Redis closed the connection mid-reply")
            got += k
        return buf

    def close(self) -> None:
        self.sock.close()


class RedisHop:
    """The Redis hop of the network model, at its client side: ``hop(nbytes)`` after each
    command sleeps ElastiCache's round trip plus ``nbytes`` through one interface, the
    slower of the aggregator's and the cache node's (:attr:`NetworkModel.redis_nic`), which
    every command of the aggregator's life shares."""

    def __init__(self, model: NetworkModel) -> None:
        self.model = model
        self.nic = model.redis_nic

    def __call__(self, nbytes: int) -> None:
        time.sleep(redis_delay_s(self.model, self.nic, nbytes))


class RedisObjects:
    """A read-only :class:`~flstore_core.storage.blobs.BlobStore` over a Redis mirror of the
    bucket (``reader`` picks the GET implementation); listings read the job's key index.

    ``hop`` (a :class:`RedisHop`), when given, is called once per command sent — a pipeline is
    one — with the bytes it brought back, after the command returned.
    """

    def __init__(
        self,
        url: str,
        reader: RedisReader = "resp",
        timeout: float = 60.0,
        hop: Callable[[int], None] | None = None,
    ) -> None:
        self.url = url
        self.reader = reader
        self.hop = hop
        self.client = redis.Redis.from_url(
            url, socket_timeout=timeout, socket_read_size=1 << 20, max_connections=64
        )
        self._resp = RespBulkReader(url, timeout) if reader == "resp" else None

    def get(self, key: str) -> Buffer | None:
        found: Buffer | None
        if self._resp is not None:
            found = self._resp.get(key)
        else:
            try:
                value = self.client.get(key)
            except redis.RedisError as exc:
                raise UnavailableError(f"Redis at {self.url} failed: {exc}") from exc
            assert value is None or isinstance(value, bytes)
            found = value
        if self.hop is not None:
            self.hop(0 if found is None else len(found))
        return found

    def open(self, key: str) -> BlobStream | None:
        """The mirrored blob as a stream (Redis sends a value whole: it is read, then streamed)."""
        value = self.get(key)
        return None if value is None else io.BytesIO(value)

    def get_range(self, key: str, start: int, end: int) -> Buffer | None:
        """The mirrored blob's bytes ``[start, end)`` (GETRANGE; a missing key is ``None``)."""
        if not 0 <= start < end:
            return b"" if self.head(key) is not None else None
        try:
            with self.client.pipeline(transaction=False) as pipe:
                pipe.exists(key)
                pipe.getrange(key, start, end - 1)
                exists, value = pipe.execute()
        except redis.RedisError as exc:
            raise UnavailableError(f"Redis at {self.url} failed: {exc}") from exc
        if self.hop is not None:  # one pipeline: one round trip
            self.hop(len(value) if isinstance(value, bytes) else 0)
        if not exists:
            return None
        assert isinstance(value, bytes)
        return value

    def head(self, key: str) -> BlobInfo | None:
        try:
            size = int(self.client.strlen(key))
            if self.hop is not None:
                self.hop(0)
            exists = size > 0 or bool(self.client.exists(key))
            if size == 0 and self.hop is not None:  # EXISTS was a second command
                self.hop(0)
        except redis.RedisError as exc:
            raise UnavailableError(f"Redis at {self.url} failed: {exc}") from exc
        return BlobInfo(key, size) if exists else None

    def list(self, prefix: str, delimiter: str | None = None) -> Iterator[BlobInfo]:
        for key in self._indexed(prefix):
            if not (delimiter and delimiter in key[len(prefix) :]):
                yield BlobInfo(key, -1)

    def list_prefixes(self, prefix: str, delimiter: str = "/") -> Iterator[str]:
        seen: set[str] = set()
        for key in self._indexed(prefix):
            rest = key[len(prefix) :]
            if delimiter in rest:
                common = prefix + rest.split(delimiter, 1)[0] + delimiter
                if common not in seen:
                    seen.add(common)
                    yield common

    def _indexed(self, prefix: str) -> tuple[str, ...]:
        parts = prefix.split("/")
        if len(parts) < 3 or parts[0] != "jobs":
            raise ValidationError(f"the Redis mirror lists job prefixes only, not {prefix!r}")
        try:
            raw = self.client.zrangebylex(index_key(parts[1]), f"[{prefix}", f"[{prefix}\xff")
        except redis.RedisError as exc:
            raise UnavailableError(f"Redis at {self.url} failed: {exc}") from exc
        if self.hop is not None:
            self.hop(sum(len(item) for item in raw))
        return tuple(item.decode() if isinstance(item, bytes) else str(item) for item in raw)

    def put(
        self,
        key: str,
        body: bytes,
        *,
        content_type: str = "application/octet-stream",
        tags: Mapping[str, str] | None = None,
        if_absent: bool = False,
        if_match: str | None = None,
        sha256_b64: str | None = None,
    ) -> None:
        raise UnavailableError("the Redis mirror is read-only: write through S3")

    def compose(
        self,
        key: str,
        parts: Sequence[str],
        *,
        content_type: str = "application/octet-stream",
        tags: Mapping[str, str] | None = None,
    ) -> None:
        raise UnavailableError("the Redis mirror is read-only: write through S3")

    def delete(self, key: str) -> None:
        raise UnavailableError("the Redis mirror is read-only: delete through S3")

    def prepare(self) -> None:
        return None

    def close(self) -> None:
        if self._resp is not None:
            self._resp.close()
        self.client.close()


def decode_row(
    source: ByteSource,
    manifest: RoundManifest,
    i: int,
    row: npt.NDArray[np.float32],
    limits: CodecLimits,
) -> None:
    """Decode the manifest's ``i``-th client's update from ``source`` into ``row``, checked
    against the manifest's sha256 and tensor specs."""
    client = manifest.clients[i]
    entry = manifest.updates[client]
    data = source.get(entry.key)
    if data is None:
        raise StoredObjectCorruptError(
            f"{entry.key}: listed in the manifest but missing from the cache"
        )
    try:
        decode_into(
            data,
            row,
            manifest.tensors,
            expected_sha256=entry.sha256,
            limits=limits,
            who=f"client {client!r}",
        )
    except CorruptUpdateError as exc:
        raise StoredObjectCorruptError(f"{entry.key}: {exc.message}") from exc


def load_base(
    source: ByteSource, job: str, round_: int, specs: Sequence[TensorSpec], limits: CodecLimits
) -> npt.NDArray[np.float32] | None:
    """The round's base model as a vector in ``specs``' order, or ``None`` when not stored."""
    key = base_key(job, round_)
    data = source.get(key)
    if data is None:
        return None
    try:
        base = decode_update(data, limits=limits)
    except CorruptUpdateError as exc:
        raise StoredObjectCorruptError(f"{key}: {exc.message}") from exc
    return base_vector(base, specs)


def load_round_from(
    source: ByteSource,
    job: str,
    round_: int,
    stats: ArtifactStats,
    executor: ThreadPoolExecutor,
    limits: CodecLimits = DEFAULT_LIMITS,
) -> RoundData:
    """Read a round (and its base model, when stored) from ``source`` into a :class:`RoundData`.

    The same steps and checks as :func:`flstore_core.cache.round_loading.load_round` over S3: a
    missing manifest is a 404, every update is verified against the manifest's sha256 and
    tensor specs while it is decoded into its row, the base is used only when its tensors match
    the round's, and the job's spec (and, on first use, its validation set) come from
    ``source`` as the round's :class:`~flstore_core.cache.round_data.JobContext`. ``executor``
    runs the per-update fetch-and-decode tasks.
    """
    manifest_raw = source.get(layout.manifest_key(job, round_))
    if manifest_raw is None:
        raise NotFoundError(
            f"round {round_} of job {job!r} is not in the cache (not committed, or not copied "
            "there with populate_redis)"
        )
    manifest = RoundManifest.from_json(bytes(manifest_raw))
    clients = manifest.clients
    specs = manifest.tensors
    matrix = np.empty((len(clients), manifest.n_params), dtype=np.float32)

    # the base decodes beside the rows rather than after them, as a tuned aggregator would
    base_future = executor.submit(load_base, source, job, round_, specs, limits)
    rows = [
        executor.submit(decode_row, source, manifest, i, matrix[i], limits)
        for i in range(len(clients))
    ]
    for future in rows:
        future.result()
    base_vec = base_future.result()
    spec_raw = source.get(layout.job_spec_key(job))
    if spec_raw is None:
        raise NotFoundError(f"unknown job {job!r} (its job.json is not in the cache)")
    context = JobContext(
        JobSpec.from_json(bytes(spec_raw)), lambda: validation_set_from(source, job, limits)
    )
    return RoundData(
        job,
        round_,
        clients,
        matrix,
        specs,
        np.array([manifest.updates[c].num_examples for c in clients], dtype=np.int64),
        [manifest.updates[c].metrics for c in clients],
        base=base_vec,
        stats=stats,
        sha256={c: manifest.updates[c].sha256 for c in clients},
        context=context,
    )


def validation_set_from(
    source: ByteSource, job: str, limits: CodecLimits = DEFAULT_LIMITS
) -> Validation:
    """The job's validation set ``(x, y)`` from ``source``, checked as the object store does."""
    key = layout.validation_key(job)
    data = source.get(key)
    if data is None:
        raise NotFoundError(f"validation set of job {job!r} not found")
    try:
        update = decode_update(data, limits=limits)
    except CorruptUpdateError as exc:
        raise StoredObjectCorruptError(f"{key}: {exc.message}") from exc
    if set(update.tensors) != {"x", "y"}:
        raise StoredObjectCorruptError("validation set must hold exactly 'x' and 'y'")
    return (
        np.asarray(update.tensors["x"], dtype=np.float32),
        np.asarray(update.tensors["y"], dtype=np.int64),
    )


# ---------------------------------------------------------------------- whole jobs


def index_key(job: str) -> str:
    """The Redis sorted set listing a mirrored job's keys (lexicographic range = S3 LIST)."""
    return f"__flstore_index__:{job}"


def populate_redis_job(store: ObjectStore, client: redis.Redis, job: str) -> int:
    """Mirror every object of a job (but its ``results/``) into Redis, with a key index.

    What the ``cache-agg`` baseline needs for the workloads that span rounds: the manifests of
    every round, the global models, the job spec and the validation set. Returns the object count.
    """
    prefix = layout.job_prefix(job)
    keys = [key for key in store.list_keys(prefix) if "/results/" not in key]
    for key in keys:
        client.set(key, store.get_object(key))
    if keys:
        client.zadd(index_key(job), dict.fromkeys(keys, 0))
    return len(keys)


def mirror_store(store: ObjectStore, redis_objects: RedisObjects) -> ObjectStore:
    """An :class:`ObjectStore` whose reads come from a Redis mirror of the bucket.

    Reads (``GET``, ``HEAD``, ``LIST``) go to Redis, so every loader of FLStore — manifests,
    job spec, global models, validation set — runs unchanged over the cache; writes (model
    results) still go to S3 through ``store``'s blobs.
    """
    blobs = ReadThroughBlobStore(reads=redis_objects, writes=store.blobs)
    return ObjectStore(store.bucket, blobs=blobs, limits=store.limits)
