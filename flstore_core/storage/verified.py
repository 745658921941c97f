"""Reads that verify what they read: a stored object that fails verification is not served.

Every object the store writes carries the SHA-256 of its bytes as the blob store's own checksum
(S3: ``x-amz-checksum-sha256``, sent with the PUT and returned with a whole-object GET; the
memory store keeps it beside the bytes), and a whole-object read is checked against it. On top
of that, an update is checked against the sha256 (or frame digests) in its manifest, and every
update, model and validation set is decoded under :func:`corrupt_as_unavailable`.

This module is the one place where damaged bytes in the bucket become a
:class:`~flstore_core.errors.StoredObjectCorruptError` (HTTP 503, code
``stored_object_corrupt``) naming the object's key, with a log line: the data exists but cannot
be trusted, which is the service's fault, not the caller's (a
:class:`~flstore_core.errors.CorruptUpdateError` alone would be a 400 blaming the request).
"""

from __future__ import annotations

import base64
import hashlib
import logging
from collections.abc import Iterator
from contextlib import contextmanager

from flstore_core.data.codec import CodecLimits, Update, decode_update
from flstore_core.errors import CorruptUpdateError, StoredObjectCorruptError

log = logging.getLogger(__name__)


def stored_object_corrupt(key: str, why: str) -> StoredObjectCorruptError:
    """The error (logged here) for the stored object ``key`` that failed verification."""
    log.warning("stored object %s failed verification: %s", key, why)
    return StoredObjectCorruptError(f"{key}: {why}")


def sha256_b64(data: bytes | memoryview) -> str:
    """The SHA-256 of ``data`` as S3 writes checksums: base64 of the 32-byte digest."""
    return base64.b64encode(hashlib.sha256(data).digest()).decode()


def checksum_mismatch(
    key: str, stored: str, actual: str, algorithm: str = "sha256"
) -> StoredObjectCorruptError:
    """The error for bytes whose checksum (``actual``, by ``algorithm``) is not the ``stored``
    one."""
    return stored_object_corrupt(
        key, f"checksum mismatch: stored {algorithm} {stored}, the bytes read have {actual}"
    )


@contextmanager
def corrupt_as_unavailable(key: str) -> Iterator[None]:
    """Re-raise a :class:`CorruptUpdateError` from the block as a
    :class:`StoredObjectCorruptError` of the object ``key`` (the message prefixed with it)."""
    try:
        yield
    except CorruptUpdateError as exc:
        raise stored_object_corrupt(key, exc.message) from exc


def decode_stored(
    data: bytes, key: str, limits: CodecLimits, expected_sha256: str | None = None
) -> Update:
    """The update stored under ``key`` as ``data``, verified (against ``expected_sha256`` when
    given, a manifest's checksum)."""
    with corrupt_as_unavailable(key):
        return decode_update(data, expected_sha256=expected_sha256, limits=limits)
