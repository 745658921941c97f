"""Ingestion and backfill, unchanged, on a distributing runner: Beam's DaskRunner against a
``dask.distributed`` LocalCluster of three worker processes, writing to moto S3.

The same pipelines run on FnApiRunner in tests/stack/test_ingest.py; here every DoFn is pickled
into another process, so the run's summary must reach the caller without Beam metrics (the Dask
runner has none) and every branch of the graph must run (the runner computes only its last step).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from flstore_core.data import layout
from flstore_core.storage.object_store import ObjectStore
from lambdas.local_runtime.s3_server import LocalS3
from pipelines.backfill import run_backfill
from pipelines.ingest import IngestSummary, run_ingest
from tests.conftest import small_update
from tests.stack.test_ingest import drop, drop_round, versions

distributed = pytest.importorskip("distributed")
pytest.importorskip("apache_beam.runners.dask.dask_runner")

_buckets = itertools.count()


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    """A scheduler address with three single-threaded worker processes behind it."""
    with distributed.LocalCluster(
        n_workers=3, processes=True, threads_per_worker=1, dashboard_address=None
    ) as lc:
        yield lc.scheduler_address


@pytest.fixture
def bucket(s3_server: LocalS3) -> Iterator[ObjectStore]:
    """A fresh versioned bucket, so a second run's writes can be counted."""
    st = ObjectStore(f"dask-{next(_buckets)}", endpoint_url=s3_server.url)
    st.ensure_bucket()
    st.blobs.client.put_bucket_versioning(
        Bucket=st.bucket, VersioningConfiguration={"Status": "Enabled"}
    )
    yield st
    st.close()


def test_ingest_and_backfill_run_on_dask_worker_processes(
    cluster: str, bucket: ObjectStore, s3_server: LocalS3, tmp_path: Path
) -> None:
    with distributed.Client(cluster) as client:  # three processes, none of them this one
        pids = set(client.run(os.getpid).values())
    assert len(pids) == 3 and os.getpid() not in pids
    dask_args = ["--runner=DaskRunner", f"--dask_client_address={cluster}"]
    src = tmp_path / "drop"
    drop(src / "initial.safetensors", small_update(50), job="dk", kind="initial")
    for r in range(2):
        drop_round(src, "dk", r, 3)
    (src / "corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")

    def ingest() -> IngestSummary:
        return run_ingest(
            str(src), job="dk", beam_args=dask_args, s3_endpoint=s3_server.url, bucket=bucket.bucket
        )

    first = ingest()
    assert bucket.list_rounds("dk") == [0, 1]
    for r in range(2):
        assert bucket.get_manifest("dk", r).clients == ["c0", "c1", "c2"]
    assert first.committed == ["dk/0", "dk/1"]
    assert first.files == 8 and first.updates_written == 6
    assert {d.code for d in first.deadletters} == {"corrupt_update"}
    assert [Path(d.file).name for d in first.deadletters] == ["corrupt.safetensors"]
    assert first.deadletter_keys and bucket.get_object(first.deadletter_keys[0])

    before = versions(bucket)
    manifests = [bucket.get_object(layout.manifest_key("dk", r)) for r in range(2)]
    second = ingest()
    before = {k: v for k, v in before.items() if "/ingest/deadletter/" not in k}
    after = {k: v for k, v in versions(bucket).items() if "/ingest/deadletter/" not in k}
    assert after == before  # not one PUT but the new run's dead letters
    assert [bucket.get_object(layout.manifest_key("dk", r)) for r in range(2)] == manifests
    assert second.updates_written == 0 and second.updates_unchanged == 6
    assert second.models_unchanged == 1 and not second.models_written
    assert second.manifests_written == 0 and second.committed == ["dk/0", "dk/1"]

    summary = run_backfill("dk", "0:2", dask_args, s3_endpoint=s3_server.url, bucket=bucket.bucket)
    assert summary.rounds == [0, 1] and summary.rounds_backfilled == 2
    assert summary.manifests_written == 2 and not summary.deadletters
    for r in range(2):
        entries = bucket.get_manifest("dk", r).updates.values()
        assert all("contribution" in e.summary for e in entries)
