"""Every stored object carries the SHA-256 of its bytes, and a read that does not match it is a
503 ``stored_object_corrupt``, never the changed bytes.

S3 keeps the checksum (``x-amz-checksum-sha256``, sent with each PUT) and returns it on a
whole-object GET; the memory store keeps it beside the bytes. To make an object whose bytes and
checksum disagree — what a bit flip at rest, or a write that bypassed FLStore, leaves — the S3
case stores a body with another body's checksum (moto keeps a checksum the client sends; S3
itself would refuse it with ``BadDigest``), the memory case changes the bytes in place.
"""

from __future__ import annotations

import base64
import hashlib
import io
import logging
import zlib
from typing import Any

import pytest

from flstore_core.data import layout
from flstore_core.errors import StoredObjectCorruptError
from flstore_core.storage.blobs import BlobStore
from flstore_core.storage.memory import MemoryBlobStore
from flstore_core.storage.object_store import ObjectStore
from flstore_core.storage.s3 import MIN_PART_BYTES, S3BlobStore, S3Stream
from tests.conftest import small_update


def _b64_sha256(data: bytes) -> str:
    return base64.b64encode(hashlib.sha256(data).digest()).decode()


def store_with_wrong_checksum(blobs: BlobStore, key: str, body: bytes) -> None:
    """``body`` under ``key``, with a stored checksum that is of other bytes."""
    if isinstance(blobs, MemoryBlobStore):
        blobs.put(key, b"other bytes than " + body)
        _, *rest = blobs._blobs[key]
        blobs._blobs[key] = (body, *rest)
        return
    assert isinstance(blobs, S3BlobStore)
    blobs.client.put_object(
        Bucket=blobs.bucket,
        Key=key,
        Body=body,
        ChecksumAlgorithm="SHA256",
        ChecksumSHA256=_b64_sha256(b"other bytes than " + body),
    )


@pytest.fixture(params=["memory", "s3"])
def any_store(request: pytest.FixtureRequest) -> ObjectStore:
    if request.param == "memory":
        return ObjectStore(blobs=MemoryBlobStore())
    s3_store: ObjectStore = request.getfixturevalue("store")
    return s3_store


def test_s3_puts_carry_the_sha256_of_the_body(store: ObjectStore) -> None:
    blobs = store.blobs
    assert isinstance(blobs, S3BlobStore)
    blobs.put("jobs/j/a", b"hello")
    head = blobs.client.head_object(Bucket=blobs.bucket, Key="jobs/j/a", ChecksumMode="ENABLED")
    assert head["ChecksumSHA256"] == _b64_sha256(b"hello")


def test_an_object_that_does_not_match_its_checksum_is_not_served(
    any_store: ObjectStore, caplog: pytest.LogCaptureFixture
) -> None:
    blobs = any_store.blobs
    store_with_wrong_checksum(blobs, "jobs/j/x", b"changed bytes")
    with (
        caplog.at_level(logging.WARNING),
        pytest.raises(StoredObjectCorruptError, match="jobs/j/x"),
    ):
        blobs.get("jobs/j/x")
    assert any("jobs/j/x" in r.getMessage() for r in caplog.records)
    with pytest.raises(StoredObjectCorruptError, match="jobs/j/x"):  # at open, or by the end
        stream = blobs.open("jobs/j/x")
        assert stream is not None
        while stream.read(4):
            pass
    with pytest.raises(StoredObjectCorruptError) as caught:
        any_store.get_object("jobs/j/x")
    assert caught.value.status == 503 and caught.value.code == "stored_object_corrupt"


def test_a_ranged_read_is_served_its_frames_are_verified_by_their_digests(
    any_store: ObjectStore,
) -> None:
    # a checksum is of the whole object: a ranged GET has none to check (S3 returns none)
    store_with_wrong_checksum(any_store.blobs, "jobs/j/x", b"changed bytes")
    assert bytes(any_store.blobs.get_range("jobs/j/x", 0, 7) or b"") == b"changed"


def test_intact_objects_read_back_unchanged(any_store: ObjectStore) -> None:
    any_store.blobs.put("jobs/j/ok", b"intact" * 1000)
    assert any_store.get_object("jobs/j/ok") == b"intact" * 1000
    stream = any_store.blobs.open("jobs/j/ok")
    assert stream is not None and stream.read() == b"intact" * 1000


def _corrupt(store: ObjectStore, key: str) -> None:
    data = bytearray(store.get_object(key))
    data[len(data) // 2] ^= 0x01
    store_with_wrong_checksum(store.blobs, key, bytes(data))


@pytest.mark.parametrize(
    ("what", "key", "read"),
    [
        ("manifest", layout.manifest_key("j", 0), lambda s: s.get_manifest("j", 0)),
        ("job spec", layout.job_spec_key("j"), lambda s: s.get_job_spec("j")),
        ("global model", layout.global_key("j", 0), lambda s: s.get_global("j", 0)),
        ("initial model", layout.initial_key("j"), lambda s: s.get_initial("j")),
    ],
)
def test_every_object_a_reader_trusts_is_verified(
    any_store: ObjectStore, what: str, key: str, read: Any
) -> None:
    store = any_store
    store.put_initial("j", small_update(9))
    store.put_update("j", 0, "c0", small_update(0))
    store.commit_round("j", 0)
    store.put_global("j", 0, small_update(1))
    read(store)  # intact: served
    _corrupt(store, key)
    fresh = ObjectStore(blobs=store.blobs)  # a cold process: nothing cached
    with pytest.raises(StoredObjectCorruptError, match=key):
        read(fresh)


def test_a_result_is_verified(any_store: ObjectStore) -> None:
    key = any_store.put_result("jobs/j/results/fedavg/00000000/r.json", b'{"ok": 1}')
    assert any_store.get_object(key) == b'{"ok": 1}'
    _corrupt(any_store, key)
    with pytest.raises(StoredObjectCorruptError, match=key):
        any_store.get_object(key)


class _Body:
    def __init__(self, data: bytes, fail_at: int | None = None) -> None:
        self._data = io.BytesIO(data)
        self._fail_at = fail_at

    def read(self, size: int | None = None) -> bytes:
        from botocore.exceptions import IncompleteReadError

        if self._fail_at is not None and self._data.tell() >= self._fail_at:
            raise IncompleteReadError(actual_bytes=self._fail_at, expected_bytes=99)
        return self._data.read(-1 if size is None else size)

    def close(self) -> None:
        pass


def test_a_resumed_s3_stream_is_still_verified_against_the_whole_object_checksum() -> None:
    # the resumption is a ranged GET, which carries no checksum: the stream checks the whole
    stored = b"0123456789" * 10
    served = bytearray(stored)
    served[80] ^= 0x01  # the bytes after the cut differ from what was checksummed
    first = _Body(stored, fail_at=40)
    stream = S3Stream(
        "jobs/j/u",
        first,
        lambda offset: _Body(bytes(served[offset:])),
        sha256=_b64_sha256(stored),
    )
    with pytest.raises(StoredObjectCorruptError, match="jobs/j/u"):
        while stream.read(16):
            pass
    intact = S3Stream(
        "jobs/j/u",
        _Body(stored, fail_at=40),
        lambda offset: _Body(stored[offset:]),
        sha256=_b64_sha256(stored),
    )
    assert b"".join(iter(lambda: intact.read(16), b"")) == stored


def _b64_crc32(data: bytes) -> str:
    return base64.b64encode(zlib.crc32(data).to_bytes(4, "big")).decode()


def test_a_composed_result_carries_and_is_checked_against_a_crc32_of_its_whole_bytes(
    store: ObjectStore,
) -> None:
    # S3 keeps a multipart object's SHA-256 only as a checksum of its parts' checksums
    blobs = store.blobs
    assert isinstance(blobs, S3BlobStore)
    big, small = b"a" * MIN_PART_BYTES, b"tail bytes"
    parts = ["jobs/j/results/m.parts/00000", "jobs/j/results/m.parts/00001"]
    store.put_result(parts[0], big)
    store.put_result(parts[1], small)
    key = store.compose_result("jobs/j/results/m", parts)
    head = blobs.client.head_object(Bucket=blobs.bucket, Key=key, ChecksumMode="ENABLED")
    assert head["ChecksumType"] == "FULL_OBJECT"
    assert head["ChecksumCRC32"] == _b64_crc32(big + small)
    assert store.get_object(key) == big + small
    # the same object with its bytes changed at rest: not served
    blobs.client.put_object(
        Bucket=blobs.bucket,
        Key=key,
        Body=big + b"tail byteZ",
        ChecksumAlgorithm="CRC32",
        ChecksumCRC32=head["ChecksumCRC32"],
    )
    with pytest.raises(StoredObjectCorruptError, match=key):
        ObjectStore(blobs=blobs).get_object(key)


def test_a_resumed_stream_of_a_composed_result_is_checked_against_its_crc32() -> None:
    stored = b"0123456789" * 10
    served = bytearray(stored)
    served[80] ^= 0x01
    stream = S3Stream(
        "jobs/j/results/m",
        _Body(stored, fail_at=40),
        lambda offset: _Body(bytes(served[offset:])),
        crc32=_b64_crc32(stored),
    )
    with pytest.raises(StoredObjectCorruptError, match=r"jobs/j/results/m.*stored crc32"):
        while stream.read(16):
            pass
