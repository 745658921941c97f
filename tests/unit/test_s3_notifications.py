"""The local stack's notifying S3 front: a manifest written through it becomes one S3 event.

The front forwards to the session's moto server; the delivery is a fake that records each
event (and fails when told to), so these tests see exactly what the router function would be
sent, without a stack.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from typing import Any

import pytest

from flstore_core.aws import s3_client
from flstore_core.data import layout
from flstore_core.data.manifest import JobSpec
from flstore_core.routing.commit_warming import parse_records
from flstore_core.routing.update_staging import landed_updates
from flstore_core.storage.object_store import ObjectStore
from lambdas.local_runtime.s3_notifications import S3Notifications
from lambdas.local_runtime.s3_server import LocalS3
from tests.conftest import small_update

_buckets = itertools.count()


class Recorder:
    """Delivers by recording the event; the first ``fail`` deliveries raise."""

    def __init__(self, fail: int = 0) -> None:
        self.events: list[dict[str, Any]] = []
        self.tries = 0
        self.fail = fail

    def __call__(self, payload: bytes) -> None:
        self.tries += 1
        if self.tries <= self.fail:
            raise RuntimeError("the function failed")
        self.events.append(json.loads(payload))

    @property
    def keys(self) -> list[tuple[str, str]]:
        return [
            (r["eventName"], r["s3"]["object"]["key"]) for e in self.events for r in e["Records"]
        ]


@pytest.fixture
def bucket(s3_server: LocalS3) -> str:
    name = f"notify-{next(_buckets)}"
    ObjectStore(name, endpoint_url=s3_server.url).ensure_bucket()
    return name


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def front(s3_server: LocalS3, bucket: str, recorder: Recorder) -> Iterator[S3Notifications]:
    notifications = S3Notifications(s3_server.url, bucket, recorder, retry_s=0.01).start()
    yield notifications
    notifications.stop()


def test_a_round_committed_through_the_front_is_one_manifest_event_and_its_updates(
    front: S3Notifications, bucket: str, recorder: Recorder
) -> None:
    store = ObjectStore(bucket, endpoint_url=front.url)
    store.put_job_spec(JobSpec(job="demo"))
    entries = [store.put_update("demo", 3, f"c{i}", small_update(i)) for i in range(3)]
    store.commit_round("demo", 3, entries)
    store.commit_round("demo", 3, entries)  # committed again: the same manifest, no write
    assert front.wait_idle(10)
    manifest_key = layout.manifest_key("demo", 3)
    assert [k for k in recorder.keys if k[1].endswith("manifest.json")] == [
        ("ObjectCreated:Put", manifest_key)
    ]
    # the updates' records, delivered apart from the manifest's (the second notification)
    assert sorted(k for _, k in recorder.keys if k != manifest_key) == [
        layout.update_key("demo", 3, f"c{i}") for i in range(3)
    ]
    (event,) = [
        e for e in recorder.events if e["Records"][0]["s3"]["object"]["key"] == manifest_key
    ]
    (record,) = event["Records"]
    assert record["s3"]["bucket"]["name"] == bucket
    assert record["s3"]["object"]["eTag"] == store.stat(manifest_key).etag  # type: ignore[union-attr]
    # what the router's handler reads off them
    (manifest,) = parse_records(event, bucket).manifests
    assert (manifest.job, manifest.round) == ("demo", 3)
    updates = [u for e in recorder.events for u in landed_updates(e, bucket)]
    assert sorted(u.client for u in updates) == ["c0", "c1", "c2"]
    assert front.counts()["update_records"] == 3 and front.counts()["records"] == 1


def test_copies_and_multipart_uploads_of_a_manifest_notify_and_their_parts_do_not(
    front: S3Notifications, bucket: str, recorder: Recorder
) -> None:
    s3 = s3_client(front.url)
    key = layout.manifest_key("demo", 1)
    upload = s3.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
    part = s3.upload_part(Bucket=bucket, Key=key, UploadId=upload, PartNumber=1, Body=b"{}")
    s3.complete_multipart_upload(
        Bucket=bucket,
        Key=key,
        UploadId=upload,
        MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": part["ETag"]}]},
    )
    copy = layout.manifest_key("demo", 2)
    s3.copy_object(Bucket=bucket, Key=copy, CopySource={"Bucket": bucket, "Key": key})
    s3.put_object_tagging(Bucket=bucket, Key=copy, Tagging={"TagSet": [{"Key": "k", "Value": "v"}]})
    s3.get_object(Bucket=bucket, Key=copy)
    assert front.wait_idle(10)
    assert recorder.keys == [
        ("ObjectCreated:CompleteMultipartUpload", key),
        ("ObjectCreated:Copy", copy),
    ]
    assert all(r["s3"]["object"]["eTag"] for e in recorder.events for r in e["Records"])


def test_keys_outside_the_filter_or_the_bucket_do_not_notify(
    s3_server: LocalS3, front: S3Notifications, bucket: str, recorder: Recorder
) -> None:
    s3 = s3_client(front.url)
    for key in [
        "jobs/demo/job.json",
        "other/manifest.json",
        "jobs/demo/rounds/00000001/x.json",
        "other/rounds/00000001/updates/c.safetensors.zst",
    ]:
        s3.put_object(Bucket=bucket, Key=key, Body=b"{}")
    other = f"{bucket}-other"
    ObjectStore(other, endpoint_url=s3_server.url).ensure_bucket()
    s3.put_object(Bucket=other, Key=layout.manifest_key("demo", 1), Body=b"{}")
    assert front.wait_idle(10)
    assert recorder.events == []


def test_a_failed_delivery_is_retried_then_dropped_and_counted(
    s3_server: LocalS3, bucket: str
) -> None:
    flaky = Recorder(fail=2)
    with_retries = S3Notifications(s3_server.url, bucket, flaky, retry_s=0.01).start()
    try:
        s3 = s3_client(with_retries.url)
        s3.put_object(Bucket=bucket, Key=layout.manifest_key("demo", 1), Body=b"{}")
        assert with_retries.wait_idle(10)
        assert flaky.tries == 3 and len(flaky.events) == 1
        flaky.fail, flaky.tries = 10, 0
        s3.put_object(Bucket=bucket, Key=layout.manifest_key("demo", 2), Body=b"{}")
        assert with_retries.wait_idle(10)
        assert flaky.tries == 3
        assert with_retries.counts() == {
            "records": 2,
            "delivered": 1,
            "retries": 4,
            "dropped": 1,
        }
    finally:
        with_retries.stop()
