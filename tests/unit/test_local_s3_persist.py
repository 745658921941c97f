"""The local S3 keeps its objects across a stop and a start when given a data directory."""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from flstore_core.aws import s3_client
from flstore_core.errors import PreconditionFailedError, StoredObjectCorruptError
from flstore_core.storage.object_store import ObjectStore
from flstore_core.storage.s3 import S3BlobStore
from lambdas.local_runtime.s3_server import LocalS3
from lambdas.local_runtime.s3_snapshot import INDEX, snapshot_client
from tests.conftest import small_update

BUCKET = "persist-test"


@pytest.fixture(autouse=True)
def forget_bucket() -> Iterator[None]:
    """moto's buckets live in this process, shared by every server it starts: empty the test's
    bucket, as a new ``flstore local up`` process starts without it."""
    yield
    _forget()


def _forget() -> None:
    with LocalS3() as s3:
        client = snapshot_client(s3.url)
        if BUCKET in {b["Name"] for b in client.list_buckets().get("Buckets", [])}:
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET):
                for item in page.get("Contents", []):
                    client.delete_object(Bucket=BUCKET, Key=item["Key"])
            client.delete_bucket(Bucket=BUCKET)


def restart(data: Path) -> LocalS3:
    """A local S3 started afresh on ``data``: nothing of the last one's but what it saved."""
    _forget()
    return LocalS3(data_dir=data, buckets=(BUCKET,))


def test_objects_survive_a_stop_and_a_start(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with LocalS3(data_dir=data, buckets=(BUCKET,)) as s3:
        assert s3.restored.total == 0
        store = ObjectStore(BUCKET, endpoint_url=s3.url)
        store.ensure_bucket()
        for i in range(3):
            store.put_update("demo", 0, f"c{i}", small_update(i))
        before = store.commit_round("demo", 0)
        blobs = S3BlobStore(BUCKET, s3_client(s3.url))
        blobs.put("jobs/demo/x.json", b"{}", content_type="application/json", tags={"a": "1"})
        keys = sorted(store.list_keys(""))
        store.close()

    index = json.loads((data / INDEX).read_text())
    assert sorted(o["key"] for o in index["buckets"][BUCKET]) == keys
    assert all(o["checksum"]["algorithm"] == "SHA256" for o in index["buckets"][BUCKET])

    with restart(data) as s3:
        # other tests' buckets may be here too: moto's are this process's
        assert s3.restored.objects[BUCKET] == len(keys) and s3.restored.skipped == 0
        store = ObjectStore(BUCKET, endpoint_url=s3.url)
        assert sorted(store.list_keys("")) == keys
        # whole-object reads check the SHA-256 restored with each object
        assert store.get_manifest("demo", 0) == before
        assert store.get_update("demo", 0, "c1").tensors.keys() == small_update(1).tensors.keys()
        client = s3_client(s3.url)
        head = client.head_object(Bucket=BUCKET, Key="jobs/demo/x.json", ChecksumMode="ENABLED")
        assert head["ContentType"] == "application/json"
        assert head["ChecksumSHA256"] == base64.b64encode(hashlib.sha256(b"{}").digest()).decode()
        tags = client.get_object_tagging(Bucket=BUCKET, Key="jobs/demo/x.json")["TagSet"]
        assert tags == [{"Key": "a", "Value": "1"}]
        store.close()


def test_conditional_writes_use_the_etag_read_after_the_restore(tmp_path: Path) -> None:
    """A manifest's rewrite is ``If-Match`` on the ETag read just before it: after a restore
    that is the restored object's, whatever the original's was."""
    with LocalS3(data_dir=tmp_path, buckets=(BUCKET,)) as s3:
        blobs = S3BlobStore(BUCKET, s3_client(s3.url))
        blobs.prepare()
        blobs.put("jobs/demo/manifest.json", b'{"v": 1}', content_type="application/json")
    with restart(tmp_path) as s3:
        blobs = S3BlobStore(BUCKET, s3_client(s3.url))
        info = blobs.head("jobs/demo/manifest.json")
        assert info is not None and blobs.get("jobs/demo/manifest.json") == b'{"v": 1}'
        blobs.put("jobs/demo/manifest.json", b'{"v": 2}', if_match=info.etag)
        with pytest.raises(PreconditionFailedError):  # the version read is gone now
            blobs.put("jobs/demo/manifest.json", b'{"v": 3}', if_match=info.etag)
    with restart(tmp_path) as s3:
        assert S3BlobStore(BUCKET, s3_client(s3.url)).get("jobs/demo/manifest.json") == b'{"v": 2}'


def test_a_corrupt_object_stays_refused_after_a_restore(tmp_path: Path) -> None:
    """The checksum goes back verbatim, so bytes that do not match it are still a 503."""
    wrong = base64.b64encode(hashlib.sha256(b"other").digest()).decode()
    with LocalS3(data_dir=tmp_path, buckets=(BUCKET,)) as s3:
        raw = snapshot_client(s3.url)
        raw.create_bucket(Bucket=BUCKET)
        raw.put_object(
            Bucket=BUCKET, Key="k", Body=b"bytes", ChecksumAlgorithm="SHA256", ChecksumSHA256=wrong
        )
    with restart(tmp_path) as s3, pytest.raises(StoredObjectCorruptError):
        S3BlobStore(BUCKET, s3_client(s3.url)).get("k")


def test_a_changed_blob_is_skipped_not_restored(tmp_path: Path) -> None:
    with LocalS3(data_dir=tmp_path, buckets=(BUCKET,)) as s3:
        blobs = S3BlobStore(BUCKET, s3_client(s3.url))
        blobs.prepare()
        blobs.put("a", b"kept")
        blobs.put("b", b"changed on disk")
    digest = hashlib.sha256(b"changed on disk").hexdigest()
    (tmp_path / "blobs" / digest[:2] / digest).write_bytes(b"tampered")
    with restart(tmp_path) as s3:
        assert s3.restored.objects[BUCKET] == 1 and s3.restored.skipped == 1
        blobs = S3BlobStore(BUCKET, s3_client(s3.url))
        assert blobs.get("a") == b"kept" and blobs.get("b") is None
        blobs.delete("a")
    # a deleted object's blob goes with the next save
    kept = hashlib.sha256(b"kept").hexdigest()
    assert not (tmp_path / "blobs" / kept[:2] / kept).exists()
