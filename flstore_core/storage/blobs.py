"""The blob-store protocol under the object store, and wrappers that add behaviour to any store.

A blob store keeps bytes under string keys: S3 in production (:mod:`.s3`), a dict in unit tests
(:mod:`.memory`), a Redis mirror in the ``cache-agg`` baseline. The object store's layout and
commit rules are written once, above this protocol; what a backend adds — counting, a read path
from elsewhere — is a wrapper, never an override of the object store's internals.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

Buffer = bytes | memoryview


class BlobStream(Protocol):
    """A readable binary stream of one blob (an S3 body, a ``BytesIO``): read it in pieces,
    then close it."""

    def read(self, size: int = -1, /) -> bytes:
        """Up to ``size`` bytes (all that is left when ``size`` is negative); ``b""`` at the end."""
        ...

    def close(self) -> None:
        """Release the stream (for S3, its connection)."""
        ...


@dataclass(frozen=True)
class BlobInfo:
    """What a listing or a HEAD tells of one blob.

    ``etag`` is the backend's content tag (for S3, the MD5 of a single-part upload), ``modified``
    a sortable text of its last write time (empty when the backend does not say).
    """

    key: str
    size: int
    etag: str = ""
    modified: str = ""


class BlobStore(Protocol):
    """Bytes under keys. Missing keys are ``None``; a backend failure is an
    :class:`~flstore_core.errors.UnavailableError`."""

    def get(self, key: str) -> Buffer | None:
        """The blob's bytes, or ``None`` if there is no such key."""
        ...

    def open(self, key: str) -> BlobStream | None:
        """The blob as a stream, or ``None`` if there is no such key: a reader that must not
        hold a whole blob (a column block of a large update) reads it in pieces."""
        ...

    def get_range(self, key: str, start: int, end: int) -> Buffer | None:
        """The blob's bytes ``[start, end)`` (fewer when the blob is shorter), or ``None`` if
        there is no such key: a reader of a stored update's frames (S3: a ranged GET)."""
        ...

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
        """Write (or replace) a blob; ``tags`` are lifecycle tags where the backend has them.

        A conditional write is atomic in the backend (S3: ``If-None-Match: *``, ``If-Match``),
        never a check then a put: with ``if_absent`` it only creates the blob, with ``if_match``
        it only replaces the version whose ``etag`` (as :meth:`head` gives it) is that; when
        the condition fails nothing is written and it raises
        :class:`~flstore_core.errors.PreconditionFailedError`."""
        ...

    def compose(
        self,
        key: str,
        parts: Sequence[str],
        *,
        content_type: str = "application/octet-stream",
        tags: Mapping[str, str] | None = None,
    ) -> None:
        """Write ``key`` as the concatenation of the blobs ``parts``, in order, without holding
        it whole (S3: a multipart upload copying the parts server-side); the parts stay."""
        ...

    def head(self, key: str) -> BlobInfo | None:
        """Size and tag of a blob without its bytes, or ``None`` if there is no such key."""
        ...

    def list(self, prefix: str, delimiter: str | None = None) -> Iterator[BlobInfo]:
        """Every blob whose key starts with ``prefix``, in key order; with ``delimiter``, only
        those with no ``delimiter`` after the prefix (S3's ``Contents`` of a delimited LIST:
        the keys it rolls up into common prefixes are not listed one by one)."""
        ...

    def list_prefixes(self, prefix: str, delimiter: str = "/") -> Iterator[str]:
        """The distinct ``prefix + part + delimiter`` under ``prefix`` (S3's common prefixes)."""
        ...

    def delete(self, key: str) -> None:
        """Remove a blob (no error if it does not exist)."""
        ...

    def prepare(self) -> None:
        """Create what the store needs to exist (a bucket), if it does not yet."""
        ...


class CountingBlobStore:
    """A wrapper that counts the GETs and PUTs made through it (thread-safe).

    The object store reports its own counts; this counts what one request, or one component,
    does on a store shared with others.
    """

    def __init__(self, inner: BlobStore) -> None:
        self.inner = inner
        self.gets = 0
        self.puts = 0
        self._lock = threading.Lock()

    def get(self, key: str) -> Buffer | None:
        with self._lock:
            self.gets += 1
        return self.inner.get(key)

    def open(self, key: str) -> BlobStream | None:
        with self._lock:
            self.gets += 1  # a streamed read is one GET too
        return self.inner.open(key)

    def get_range(self, key: str, start: int, end: int) -> Buffer | None:
        with self._lock:
            self.gets += 1  # a ranged read is one GET too
        return self.inner.get_range(key, start, end)

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
        with self._lock:
            self.puts += 1
        self.inner.put(
            key,
            body,
            content_type=content_type,
            tags=tags,
            if_absent=if_absent,
            if_match=if_match,
            sha256_b64=sha256_b64,
        )

    def compose(
        self,
        key: str,
        parts: Sequence[str],
        *,
        content_type: str = "application/octet-stream",
        tags: Mapping[str, str] | None = None,
    ) -> None:
        with self._lock:
            self.puts += 1
        self.inner.compose(key, parts, content_type=content_type, tags=tags)

    def head(self, key: str) -> BlobInfo | None:
        return self.inner.head(key)

    def list(self, prefix: str, delimiter: str | None = None) -> Iterator[BlobInfo]:
        return self.inner.list(prefix, delimiter)

    def list_prefixes(self, prefix: str, delimiter: str = "/") -> Iterator[str]:
        return self.inner.list_prefixes(prefix, delimiter)

    def delete(self, key: str) -> None:
        self.inner.delete(key)

    def prepare(self) -> None:
        self.inner.prepare()


class ReadThroughBlobStore:
    """A wrapper whose reads come from ``reads`` and whose writes go to ``writes``.

    The ``cache-agg`` baseline reads a mirror of the bucket from Redis and still writes its
    model results to S3; any store that serves reads from a copy is this wrapper.
    """

    def __init__(self, reads: BlobStore, writes: BlobStore) -> None:
        self.reads = reads
        self.writes = writes

    def get(self, key: str) -> Buffer | None:
        return self.reads.get(key)

    def open(self, key: str) -> BlobStream | None:
        return self.reads.open(key)

    def get_range(self, key: str, start: int, end: int) -> Buffer | None:
        return self.reads.get_range(key, start, end)

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
        self.writes.put(
            key,
            body,
            content_type=content_type,
            tags=tags,
            if_absent=if_absent,
            if_match=if_match,
            sha256_b64=sha256_b64,
        )

    def compose(
        self,
        key: str,
        parts: Sequence[str],
        *,
        content_type: str = "application/octet-stream",
        tags: Mapping[str, str] | None = None,
    ) -> None:
        self.writes.compose(key, parts, content_type=content_type, tags=tags)

    def head(self, key: str) -> BlobInfo | None:
        return self.reads.head(key)

    def list(self, prefix: str, delimiter: str | None = None) -> Iterator[BlobInfo]:
        return self.reads.list(prefix, delimiter)

    def list_prefixes(self, prefix: str, delimiter: str = "/") -> Iterator[str]:
        return self.reads.list_prefixes(prefix, delimiter)

    def delete(self, key: str) -> None:
        self.writes.delete(key)

    def prepare(self) -> None:
        self.writes.prepare()
