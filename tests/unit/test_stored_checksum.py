"""An encoded update carries the SHA-256 of its stored bytes, taken while it was compressed, and
its PUT sends that checksum instead of having botocore hash the object again: the object S3
keeps has the same checksum as before, and the body is hashed once, not twice.

The encoder's scratch buffer changes where the raw bytes are built, never what is stored."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from botocore import httpchecksum

from flstore_core.data import layout
from flstore_core.data.codec import ScratchBuffer, encode_update
from flstore_core.errors import UnavailableError
from flstore_core.storage.memory import MemoryBlobStore
from flstore_core.storage.object_store import ObjectStore
from flstore_core.storage.s3 import S3BlobStore
from tests.conftest import small_update
from tests.unit.test_ingest_speed import mixed_update


def _b64_sha256(data: bytes) -> str:
    return base64.b64encode(hashlib.sha256(data).digest()).decode()


@pytest.fixture
def botocore_hashes(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """The sizes of the chunks botocore feeds its request SHA-256 checksums."""
    fed: list[int] = []
    original = httpchecksum.Sha256Checksum.update

    def update(self: Any, chunk: bytes) -> None:
        fed.append(len(chunk))
        original(self, chunk)

    monkeypatch.setattr(httpchecksum.Sha256Checksum, "update", update)
    yield fed


@pytest.mark.parametrize("frame_bytes", [None, 100_000])
def test_encoded_update_knows_the_sha256_of_its_stored_bytes(frame_bytes: int | None) -> None:
    enc = encode_update(mixed_update(40_000), frame_bytes=frame_bytes)
    assert len(enc.frames) != (0 if frame_bytes is None else 1)  # one frame, then several
    assert enc.stored_sha256_b64 == _b64_sha256(enc.data)


def test_a_reused_scratch_buffer_stores_the_same_bytes() -> None:
    scratch = ScratchBuffer()
    # a large update then a smaller one (the buffer's tail holds stale bytes) then larger again
    for n in (40_000, 3, 90_000, 40_000):
        update = mixed_update(n)
        fresh, reused = encode_update(update), encode_update(update, scratch=scratch)
        assert reused == fresh


def test_scratch_buffer_grows_and_reuses_its_memory() -> None:
    scratch = ScratchBuffer()
    a = scratch.take(1000)
    b = scratch.take(10)
    assert b.size == 10 and np.shares_memory(a, b)
    c = scratch.take(5000)
    assert c.size == 5000 and not np.shares_memory(a, c)


def test_s3_put_with_a_known_checksum_is_not_hashed_again(
    store: ObjectStore, botocore_hashes: list[int]
) -> None:
    blobs = store.blobs
    assert isinstance(blobs, S3BlobStore)
    body = b"some stored bytes" * 1000
    blobs.put("jobs/j/plain", body)
    assert sum(botocore_hashes) == len(body)  # without it botocore hashes the body
    botocore_hashes.clear()
    sent: list[str] = []
    blobs.client.meta.events.register(
        "before-send.s3.PutObject",
        lambda request, **_: sent.append(request.headers.get("x-amz-checksum-sha256", b"")),
    )
    blobs.put("jobs/j/known", body, sha256_b64=_b64_sha256(body))
    assert botocore_hashes == []
    assert sent == [_b64_sha256(body).encode()]
    for key in ("jobs/j/plain", "jobs/j/known"):
        head = blobs.client.head_object(Bucket=blobs.bucket, Key=key, ChecksumMode="ENABLED")
        assert head["ChecksumSHA256"] == _b64_sha256(body)
        assert blobs.get(key) == body  # the verified read accepts it


def test_put_encoded_sends_the_encoders_checksum(
    store: ObjectStore, botocore_hashes: list[int]
) -> None:
    enc = encode_update(small_update(3, job="j", round=0, client="c1"))
    store.put_encoded("j", 0, "c1", enc)
    assert botocore_hashes == []
    blobs = store.blobs
    assert isinstance(blobs, S3BlobStore)
    key = layout.update_key("j", 0, "c1")
    head = blobs.client.head_object(Bucket=blobs.bucket, Key=key, ChecksumMode="ENABLED")
    assert head["ChecksumSHA256"] == _b64_sha256(enc.data)
    assert blobs.get(key) == enc.data  # the verified read accepts it


def test_memory_store_refuses_a_body_that_does_not_match_its_checksum() -> None:
    blobs = MemoryBlobStore()
    with pytest.raises(UnavailableError, match="jobs/j/x"):
        blobs.put("jobs/j/x", b"these bytes", sha256_b64=_b64_sha256(b"other bytes"))
    assert blobs.get("jobs/j/x") is None
    blobs.put("jobs/j/x", b"these bytes", sha256_b64=_b64_sha256(b"these bytes"))
    assert blobs.get("jobs/j/x") == b"these bytes"
