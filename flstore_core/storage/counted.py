"""One object store's access to its blob store: every GET and PUT it makes counted, and the
thread pool its parallel reads run on.

The counts are the store's own (cache statistics, and tests that pin how many requests an
operation costs); a request of a shared process takes a view of the store
(:meth:`~flstore_core.storage.object_store.ObjectStore.view`) so that its counts are its own.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor

from flstore_core.errors import ConflictError, NotFoundError, PreconditionFailedError
from flstore_core.storage.blobs import BlobStore, BlobStream, Buffer


def sha256_of(data: bytes) -> str:
    """The SHA-256 of an object's bytes (hex)."""
    return hashlib.sha256(data).hexdigest()


class CountedBlobs:
    """A blob store read and written with counts: ``gets`` (whole, streamed and ranged reads
    that found their object), ``puts`` and ``range_bytes`` (stored bytes read by ranged GETs,
    the frames of column blocks). A missing object is a :class:`NotFoundError` naming ``what``
    it was."""

    def __init__(self, blobs: BlobStore, max_workers: int) -> None:
        self.blobs = blobs
        self.max_workers = max_workers
        self.gets = 0
        self.puts = 0
        self.range_bytes = 0
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None

    def executor(self) -> ThreadPoolExecutor:
        """The pool parallel reads run on, started on first use."""
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.max_workers, thread_name_prefix="s3")
            return self._pool

    def close(self) -> None:
        """Release the thread pool."""
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None

    def count(self, *, gets: int = 0, puts: int = 0, range_bytes: int = 0) -> None:
        """Count requests made on :attr:`blobs` directly."""
        with self._lock:
            self.gets += gets
            self.puts += puts
            self.range_bytes += range_bytes

    def put(
        self,
        key: str,
        body: bytes,
        content_type: str = "application/octet-stream",
        tags: Mapping[str, str] | None = None,
        *,
        if_absent: bool = False,
        if_match: str | None = None,
        sha256_b64: str | None = None,
    ) -> None:
        """Write (or replace) one object; conditionally as :meth:`BlobStore.put` says (a
        write that loses its condition is not counted: nothing was written); ``sha256_b64``,
        the body's SHA-256 when the caller has it, spares the backend hashing it again."""
        self.blobs.put(
            key,
            body,
            content_type=content_type,
            tags=tags,
            if_absent=if_absent,
            if_match=if_match,
            sha256_b64=sha256_b64,
        )
        self.count(puts=1)

    def create(
        self,
        key: str,
        body: bytes,
        what: str,
        digest: Callable[[bytes], str] = sha256_of,
        content_type: str = "application/octet-stream",
    ) -> bool:
        """Write an object that, once written, is final (ARCHITECTURE §2): a conditional create,
        atomic under concurrency. ``True`` when this call wrote it; ``False`` when the object
        already holds the same content (``digest`` of the stored and of the new bytes agree: a
        retry, or a race lost to an identical write); a :class:`ConflictError` naming ``what``,
        its key and its digest when it holds another."""
        try:
            self.put(key, body, content_type, if_absent=True)
            return True
        except PreconditionFailedError:
            pass
        existing = digest(self.get(key, what))
        if existing != digest(body):
            raise ConflictError(
                f"{what} already exists ({key}, sha256 {existing}) and is never replaced; "
                "this one differs"
            )
        return False

    def get(self, key: str, what: str) -> bytes:
        """One object's bytes."""
        data = self.blobs.get(key)
        if data is None:
            raise NotFoundError(f"{what} not found")
        self.count(gets=1)
        return bytes(data) if isinstance(data, memoryview) else data

    def open(self, key: str, what: str) -> BlobStream:
        """One object as a stream (the caller closes it)."""
        stream = self.blobs.open(key)
        if stream is None:
            raise NotFoundError(f"{what} not found")
        self.count(gets=1)
        return stream

    def get_range(self, key: str, start: int, end: int, what: str) -> Buffer:
        """The bytes ``[start, end)`` of one object (a ranged GET)."""
        data = self.blobs.get_range(key, start, end)
        if data is None:
            raise NotFoundError(f"{what} not found")
        self.count(gets=1, range_bytes=len(data))
        return data

    def exists(self, key: str) -> bool:
        """Whether the object exists (a HEAD, not counted)."""
        return self.blobs.head(key) is not None
