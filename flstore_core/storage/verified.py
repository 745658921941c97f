"""Reads that verify what they read: a stored object that fails verification is not served.

Every object the store reads back — an update against the sha256 (or frame digests) in its
manifest, a model, a validation set — is decoded under :func:`corrupt_as_unavailable`, the one
place where damaged bytes in the bucket become a
:class:`~flstore_core.errors.StoredObjectCorruptError` (HTTP 503, code
``stored_object_corrupt``) naming the object's key: the data exists but cannot be trusted, which
is the service's fault, not the caller's (a :class:`~flstore_core.errors.CorruptUpdateError`
alone would be a 400 blaming the request).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from flstore_core.data.codec import CodecLimits, Update, decode_update
from flstore_core.errors import CorruptUpdateError, StoredObjectCorruptError


@contextmanager
def corrupt_as_unavailable(key: str) -> Iterator[None]:
    """Re-raise a :class:`CorruptUpdateError` from the block as a
    :class:`StoredObjectCorruptError` of the object ``key`` (the message prefixed with it)."""
    try:
        yield
    except CorruptUpdateError as exc:
        raise StoredObjectCorruptError(f"{key}: {exc.message}") from exc


def decode_stored(
    data: bytes, key: str, limits: CodecLimits, expected_sha256: str | None = None
) -> Update:
    """The update stored under ``key`` as ``data``, verified (against ``expected_sha256`` when
    given, a manifest's checksum)."""
    with corrupt_as_unavailable(key):
        return decode_update(data, expected_sha256=expected_sha256, limits=limits)
