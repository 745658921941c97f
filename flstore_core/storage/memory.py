"""An in-memory blob store: the object store's rules, tested without S3 or moto."""

from __future__ import annotations

import hashlib
import io
import threading
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime, timedelta

from flstore_core.errors import PreconditionFailedError, UnavailableError
from flstore_core.storage.blobs import BlobInfo, BlobStream, Buffer
from flstore_core.storage.verified import checksum_mismatch
from flstore_core.storage.verified import sha256_b64 as sha256_b64_of


class MemoryBlobStore:
    """Blobs in a dict, with S3's semantics where the object store relies on them: key-ordered
    listings, common prefixes, an MD5 ``etag``, the write time in ``modified`` (strictly
    increasing, so it is the write order too), conditional writes, and the SHA-256 checksum
    of each blob, written with it and checked by every whole-blob read (a ranged read has none
    to check, as in S3)."""

    def __init__(self) -> None:
        # key -> (bytes, MD5 etag, write time, base64 SHA-256 checksum)
        self._blobs: dict[str, tuple[bytes, str, str, str]] = {}
        self._last = datetime.fromtimestamp(0, UTC)
        self._lock = threading.Lock()

    def get(self, key: str) -> Buffer | None:
        with self._lock:
            entry = self._blobs.get(key)
        return None if entry is None else _verified(key, entry[0], entry[3])

    def open(self, key: str) -> BlobStream | None:
        with self._lock:
            entry = self._blobs.get(key)
        return None if entry is None else io.BytesIO(_verified(key, entry[0], entry[3]))

    def get_range(self, key: str, start: int, end: int) -> Buffer | None:
        with self._lock:
            entry = self._blobs.get(key)
        return None if entry is None else memoryview(entry[0])[start:end]

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
        etag = hashlib.md5(body, usedforsecurity=False).hexdigest()
        checksum = sha256_b64_of(body)
        if sha256_b64 is not None and sha256_b64 != checksum:  # S3's BadDigest
            raise UnavailableError(f"PUT {key}: the body does not match its SHA-256 checksum")
        with self._lock:  # the condition and the write under one lock: atomic, as S3's are
            old = self._blobs.get(key)
            if if_absent and old is not None:
                raise PreconditionFailedError(f"PUT {key}: the object already exists")
            if if_match is not None and (old is None or old[1] != if_match.strip('"')):
                raise PreconditionFailedError(f"PUT {key}: the object changed since it was read")
            self._blobs[key] = (bytes(body), etag, self._now(), checksum)

    def _now(self) -> str:
        """The write time of a blob as S3 lists it (UTC), strictly later than the last one so
        that it also gives the write order. Called with the lock held."""
        now = max(datetime.now(UTC), self._last + timedelta(microseconds=1))
        self._last = now
        return now.isoformat(sep=" ")

    def compose(
        self,
        key: str,
        parts: Sequence[str],
        *,
        content_type: str = "application/octet-stream",
        tags: Mapping[str, str] | None = None,
    ) -> None:
        with self._lock:
            missing = [p for p in parts if p not in self._blobs]
            found = [(p, self._blobs[p]) for p in parts if p in self._blobs]
        if missing:
            raise UnavailableError(f"cannot compose {key}: part {missing[0]} does not exist")
        body = b"".join(_verified(p, entry[0], entry[3]) for p, entry in found)
        self.put(key, body, content_type=content_type, tags=tags)

    def head(self, key: str) -> BlobInfo | None:
        with self._lock:
            entry = self._blobs.get(key)
        return None if entry is None else BlobInfo(key, len(entry[0]), entry[1], entry[2])

    def list(self, prefix: str, delimiter: str | None = None) -> Iterator[BlobInfo]:
        with self._lock:
            items = sorted(
                (k, v)
                for k, v in self._blobs.items()
                if k.startswith(prefix) and not (delimiter and delimiter in k[len(prefix) :])
            )
        for key, (body, etag, modified, _) in items:
            yield BlobInfo(key, len(body), etag, modified)

    def list_prefixes(self, prefix: str, delimiter: str = "/") -> Iterator[str]:
        with self._lock:
            keys = sorted(k for k in self._blobs if k.startswith(prefix))
        seen: set[str] = set()
        for key in keys:
            rest = key[len(prefix) :]
            if delimiter in rest:
                common = prefix + rest.split(delimiter, 1)[0] + delimiter
                if common not in seen:
                    seen.add(common)
                    yield common

    def delete(self, key: str) -> None:
        with self._lock:
            self._blobs.pop(key, None)

    def prepare(self) -> None:
        return None


def _verified(key: str, data: bytes, stored: str) -> bytes:
    actual = sha256_b64_of(data)
    if actual != stored:
        raise checksum_mismatch(key, stored, actual)
    return data
