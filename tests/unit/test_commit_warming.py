"""Commit-driven warming: an S3 event naming a round's manifest warms that round, once.

The store is in memory and the cache nodes are real ones invoked in process
(:class:`tests.fakes.InProcessNodes`), so a test counts the ``load`` invocations and reads what
each node holds; the router's handler is called with plain S3 event dicts, as Lambda calls it
for a bucket notification.
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import pytest
from rich.console import Console

from flstore_core.cli.stats import print_warm_times
from flstore_core.data import layout
from flstore_core.data.manifest import JobSpec
from flstore_core.errors import UnavailableError, ValidationError
from flstore_core.routing import commit_warming
from flstore_core.routing.commit_warming import (
    ARTIFACT_CHUNK_S,
    CommittedManifest,
    CommitWarmer,
    is_s3_event,
    parse_manifest_key,
    parse_records,
    read_marker,
    warm_marker_key,
    warm_times,
)
from flstore_core.routing.placement import ShardKey, place_shard, round_shard
from flstore_core.storage.memory import MemoryBlobStore
from flstore_core.storage.object_store import ObjectStore
from lambdas.router import build_app, handle
from tests.conftest import small_update
from tests.fakes import InProcessNodes, make_router

BUCKET = "warm-bucket"
NODES = 3


def record(key: str, *, bucket: str = BUCKET, name: str = "ObjectCreated:Put") -> dict[str, Any]:
    """One record of an S3 event notification, as S3 sends it to Lambda."""
    return {
        "eventVersion": "2.1",
        "eventSource": "aws:s3",
        "eventName": name,
        "eventTime": "2026-12-07T15:00:00.000Z",
        "s3": {
            "bucket": {"name": bucket, "arn": f"arn:aws:s3:::{bucket}"},
            "object": {"key": key, "eTag": "abc", "sequencer": "0055AED6DCD90281E5"},
        },
    }


def event(*keys: str) -> dict[str, Any]:
    return {"Records": [record(k) for k in keys]}


def manifest(job: str, round_: int) -> str:
    return layout.manifest_key(job, round_)


# --- keys and records --------------------------------------------------------------------


def test_a_manifest_key_names_its_job_and_round() -> None:
    assert parse_manifest_key("jobs/demo/rounds/00000007/manifest.json") == ("demo", 7)


@pytest.mark.parametrize(
    "key",
    [
        "jobs/demo/rounds/00000007/updates/c0.safetensors.zst",
        "jobs/demo/job.json",
        "jobs/demo/warm/00000007.json",
        "jobs/demo/results/fedavg/00000007/r.json",
    ],
)
def test_other_keys_are_not_manifests(key: str) -> None:
    assert parse_manifest_key(key) is None


@pytest.mark.parametrize(
    "key",
    [
        "jobs/demo/rounds/7/manifest.json",  # not 8 digits
        "jobs/Demo!/rounds/00000007/manifest.json",  # not a job id
        "jobs/demo/rounds/00000007/updates/manifest.json",
        "other/manifest.json",
        "jobs/demo/rounds/00000007/xmanifest.json",
    ],
)
def test_a_malformed_manifest_key_is_refused(key: str) -> None:
    with pytest.raises(ValidationError):
        parse_manifest_key(key)


def test_records_are_ordered_by_job_then_round_and_keys_url_decoded() -> None:
    parsed = parse_records(
        event(
            manifest("b", 1),
            manifest("a", 10),
            manifest("a", 2),
            "jobs/a/rounds/00000002/updates/c%2B1.safetensors.zst",
        ),
        BUCKET,
    )
    assert [(m.job, m.round) for m in parsed.manifests] == [("a", 2), ("a", 10), ("b", 1)]
    assert parsed.ignored == 1 and parsed.rejected == []
    assert parsed.manifests[0].event_time == "2026-12-07T15:00:00.000Z"


def test_a_bad_record_is_refused_and_the_others_kept() -> None:
    broken = {"eventSource": "aws:s3", "eventName": "ObjectCreated:Put", "s3": {}}
    other_bucket = record(manifest("a", 1), bucket="someone-else")
    bad_key = record("jobs/a/rounds/1/manifest.json")
    deleted = record(manifest("a", 3), name="ObjectRemoved:Delete")
    parsed = parse_records(
        {"Records": [broken, other_bucket, record(manifest("a", 2)), bad_key, deleted]}, BUCKET
    )
    assert [(m.job, m.round) for m in parsed.manifests] == [("a", 2)]
    assert len(parsed.rejected) == 3 and parsed.ignored == 1
    assert "someone-else" in parsed.rejected[1]


def test_only_s3_events_are_taken_for_notifications() -> None:
    assert is_s3_event(event(manifest("a", 1)))
    assert is_s3_event({"Event": "s3:TestEvent", "Service": "Amazon S3"})
    http = {"version": "2.0", "rawPath": "/v1/health", "requestContext": {"http": {}}}
    assert not is_s3_event(http)
    assert not is_s3_event({"Records": [{"eventSource": "aws:sqs"}]})
    assert not is_s3_event({"Records": []})


# --- warming a committed round -----------------------------------------------------------


@pytest.fixture
def store() -> ObjectStore:
    st = ObjectStore(BUCKET, blobs=MemoryBlobStore())
    st.put_job_spec(JobSpec(job="demo"))
    for round_ in range(3):
        entries = [st.put_update("demo", round_, f"c{i}", small_update(i)) for i in range(4)]
        st.commit_round("demo", round_, entries)
    return st


def loads(nodes: InProcessNodes) -> list[tuple[int, tuple[str, ...]]]:
    """``(node, shards)`` of every ``load`` invocation so far."""
    return [(i, tuple(e["shards"])) for i, e in nodes.indexed if e.get("op") == "load"]


def test_a_committed_round_is_loaded_by_its_owners_and_marked(store: ObjectStore) -> None:
    nodes = InProcessNodes(store, NODES)
    router = make_router(store, nodes, nodes=NODES, replication=2)
    report = CommitWarmer(store, router, hot_rounds=2).handle(event(manifest("demo", 1)))
    assert report["warmed"] == ["demo/1"] and report["failed"] == []
    for index in place_shard(round_shard("demo", 1), NODES, 2):
        assert nodes.round(index, "demo", 1).n == 4
    marker = read_marker(store, "demo", 1)
    assert marker is not None
    assert marker["manifest_etag"] == store.stat(manifest("demo", 1)).etag  # type: ignore[union-attr]
    assert marker["committed_at"] == "2026-12-07T15:00:00.000Z"
    assert marker["warmed_at"] > marker["committed_at"]
    # the job's meta and model shards after the round, as ingestion's prefetch does
    shards = [s for _, batch in loads(nodes) for s in batch]
    assert shards.index("demo/round/1") < shards.index("demo/meta/meta")
    assert "demo/model/global" in shards


def test_a_duplicate_or_late_event_warms_nothing_twice(store: ObjectStore) -> None:
    nodes = InProcessNodes(store, NODES)
    router = make_router(store, nodes, nodes=NODES, replication=2)
    warmer = CommitWarmer(store, router, hot_rounds=2)
    warmer.handle(event(manifest("demo", 1), manifest("demo", 1)))  # a duplicate in one event
    first = loads(nodes)
    assert sorted(i for i, shards in first if "demo/round/1" in shards) == sorted(
        place_shard(round_shard("demo", 1), NODES, 2)
    )
    node_loads = [n.cache.stats.to_dict()["loads"] for n in nodes.nodes]
    calls = len(nodes.calls)

    report = warmer.handle(event(manifest("demo", 1)))  # delivered again
    assert report["already"] == ["demo/1"] and report["warmed"] == []
    assert len(nodes.calls) == calls  # not one invocation
    assert [n.cache.stats.to_dict()["loads"] for n in nodes.nodes] == node_loads


def test_a_marker_of_another_manifest_version_warms_again(store: ObjectStore) -> None:
    nodes = InProcessNodes(store, NODES)
    router = make_router(store, nodes, nodes=NODES, replication=2)
    stale = {"job": "demo", "round": 2, "manifest_etag": "an-older-version"}
    store.blobs.put(warm_marker_key("demo", 2), json.dumps(stale).encode())
    report = CommitWarmer(store, router, hot_rounds=2).handle(event(manifest("demo", 2)))
    assert report["warmed"] == ["demo/2"]
    assert read_marker(store, "demo", 2)["manifest_etag"] != "an-older-version"  # type: ignore[index]


def test_a_bad_record_does_not_stop_the_others(store: ObjectStore) -> None:
    nodes = InProcessNodes(store, NODES)
    router = make_router(store, nodes, nodes=NODES, replication=2)
    no_s3 = {"eventSource": "aws:s3", "eventName": "ObjectCreated:Put"}
    bad_key = record("jobs/demo/rounds/2/manifest.json")
    report = CommitWarmer(store, router, hot_rounds=2).handle(
        {"Records": [no_s3, bad_key, record(manifest("demo", 0))]}
    )
    assert report["warmed"] == ["demo/0"] and len(report["rejected"]) == 2


def test_a_round_no_owner_could_load_fails_the_event_and_the_retry_warms_it(
    store: ObjectStore,
) -> None:
    nodes = InProcessNodes(store, NODES)
    router = make_router(store, nodes, nodes=NODES, replication=2)
    warmer = CommitWarmer(store, router, hot_rounds=2)
    nodes.down = set(range(NODES))
    with pytest.raises(UnavailableError, match="demo/1"):
        warmer.handle(event(manifest("demo", 1)))
    assert read_marker(store, "demo", 1) is None
    nodes.down = set()
    assert warmer.handle(event(manifest("demo", 1)))["warmed"] == ["demo/1"]


def test_an_event_for_a_manifest_that_is_gone_is_not_retried(store: ObjectStore) -> None:
    nodes = InProcessNodes(store, NODES)
    router = make_router(store, nodes, nodes=NODES, replication=2)
    report = CommitWarmer(store, router, hot_rounds=2).handle(event(manifest("demo", 9)))
    assert report["missing"] == ["demo/9"] and nodes.calls == []


@dataclass
class RecordingPrefetcher:
    """Answers every shard as loaded by one node, and records each call's shards."""

    calls: list[list[str]]

    def prefetch(self, shards: list[ShardKey], artifacts: bool = True) -> dict[str, Any]:
        assert not artifacts  # a commit's warming builds them apart, in chunks
        self.calls.append([str(s) for s in shards])
        return {"fl-cache-0": {"loaded": [str(s) for s in shards], "already": [], "failed": {}}}

    def prefetch_artifacts(
        self, shards: list[ShardKey], chunk_s: float, total_s: float
    ) -> dict[str, Any]:
        self.calls.append(["artifacts", *map(str, shards)])
        return {
            "fl-cache-0": {"chunks": 3, "artifacts": {str(s): {"deferred": []} for s in shards}}
        }


def test_rounds_are_warmed_job_by_job_in_round_order_latest_hot_rounds_only(
    store: ObjectStore,
) -> None:
    store.put_job_spec(JobSpec(job="alpha"))
    store.commit_round("alpha", 4, [store.put_update("alpha", 4, "c0", small_update(0))])
    prefetcher = RecordingPrefetcher([])
    named = [("demo", 2), ("alpha", 4), ("demo", 0), ("demo", 1)]
    report = CommitWarmer(store, prefetcher, hot_rounds=2).warm(
        CommittedManifest(job, r) for job, r in named
    )
    assert prefetcher.calls == [
        ["alpha/round/4"],
        ["artifacts", "alpha/round/4"],
        ["alpha/meta/meta", "alpha/model/global"],
        ["demo/round/1", "demo/round/2"],
        ["artifacts", "demo/round/1", "demo/round/2"],
        ["demo/meta/meta", "demo/model/global"],
    ]
    assert report.warmed == ["alpha/4", "demo/1", "demo/2"] and report.cold == ["demo/0"]


def test_a_round_is_marked_warm_before_its_jobs_other_shards_are_loaded(
    store: ObjectStore,
) -> None:
    seen: list[bool] = []

    class MarkerWatcher(RecordingPrefetcher):
        def prefetch(self, shards: list[ShardKey], artifacts: bool = True) -> dict[str, Any]:
            if shards[0].cls != "round":
                seen.append(read_marker(store, "demo", 1) is not None)
            return super().prefetch(shards, artifacts)

    CommitWarmer(store, MarkerWatcher([]), hot_rounds=2).handle(event(manifest("demo", 1)))
    assert seen == [True]


@pytest.fixture(autouse=True)
def no_requests_first(monkeypatch: pytest.MonkeyPatch) -> None:
    """The second after a marker left to requests, not waited out by these tests (one of them
    sets it itself)."""
    monkeypatch.setattr(commit_warming, "REQUESTS_FIRST_S", 0.0)


def test_the_artifacts_start_once_the_requests_had_the_nodes_for_a_while(
    store: ObjectStore,
) -> None:
    seen: list[float] = []

    class Clock(RecordingPrefetcher):
        def prefetch_artifacts(
            self, shards: list[ShardKey], chunk_s: float, total_s: float
        ) -> dict[str, Any]:
            seen.append(time.perf_counter())
            return super().prefetch_artifacts(shards, chunk_s, total_s)

    warmer = CommitWarmer(store, Clock([]), hot_rounds=2, requests_first_s=0.2)
    warmer.handle(event(manifest("demo", 1)))
    marker = read_marker(store, "demo", 1)
    assert marker is not None
    warmed = datetime.fromisoformat(marker["warmed_at"].replace("Z", "+00:00"))
    started = datetime.fromisoformat(marker["artifacts_at"].replace("Z", "+00:00"))
    assert (started - warmed).total_seconds() >= 0.2 and len(seen) == 1


def test_the_marker_is_written_at_load_and_again_once_the_artifacts_are_built(
    store: ObjectStore,
) -> None:
    seen: list[dict[str, Any] | None] = []

    class ArtifactsWatcher(RecordingPrefetcher):
        def prefetch_artifacts(
            self, shards: list[ShardKey], chunk_s: float, total_s: float
        ) -> dict[str, Any]:
            seen.append(read_marker(store, "demo", 1))
            assert chunk_s == ARTIFACT_CHUNK_S <= 1.0
            return super().prefetch_artifacts(shards, chunk_s, total_s)

    CommitWarmer(store, ArtifactsWatcher([]), hot_rounds=2).handle(event(manifest("demo", 1)))
    assert seen[0] is not None and "artifacts_at" not in seen[0]  # warm before the artifacts
    marker = read_marker(store, "demo", 1)
    assert marker is not None and marker["warmed_at"] == seen[0]["warmed_at"]
    assert marker["artifacts_chunks"] == 3 and marker["artifacts_deferred"] == 0
    assert marker["artifacts_at"] >= marker["warmed_at"]
    (times,) = warm_times(store)
    assert times["commit_to_artifacts_ms"] >= times["commit_to_warm_ms"]


def test_an_event_redelivered_before_the_artifacts_were_built_resumes_them(
    store: ObjectStore,
) -> None:
    class DiesInArtifacts(RecordingPrefetcher):
        def prefetch_artifacts(
            self, shards: list[ShardKey], chunk_s: float, total_s: float
        ) -> dict[str, Any]:
            raise RuntimeError("the invocation timed out")

    CommitWarmer(store, DiesInArtifacts([]), hot_rounds=2).handle(event(manifest("demo", 1)))
    first = read_marker(store, "demo", 1)
    assert first is not None and "artifacts_at" not in first
    again = RecordingPrefetcher([])
    report = CommitWarmer(store, again, hot_rounds=2).handle(event(manifest("demo", 1)))
    assert report["warmed"] == ["demo/1"] and ["artifacts", "demo/round/1"] in again.calls
    marker = read_marker(store, "demo", 1)
    assert marker is not None and "artifacts_at" in marker
    # the round was warm at the first event: its times are kept
    assert (marker["warmed_at"], marker["committed_at"]) == (
        first["warmed_at"],
        first["committed_at"],
    )
    done = RecordingPrefetcher([])
    report = CommitWarmer(store, done, hot_rounds=2).handle(event(manifest("demo", 1)))
    assert report["already"] == ["demo/1"] and done.calls == []


def test_warm_times_list_every_marker_with_its_commit_to_warm_time(store: ObjectStore) -> None:
    CommitWarmer(store, RecordingPrefetcher([]), hot_rounds=3).handle(
        event(manifest("demo", 0), manifest("demo", 2))
    )
    times = warm_times(store)
    assert [(t["job"], t["round"]) for t in times] == [("demo", 0), ("demo", 2)]
    assert all(t["commit_to_warm_ms"] > 0 for t in times)


def test_stats_show_each_jobs_latest_warm_rounds_in_80_columns() -> None:
    markers = [
        {
            "job": "a-rather-long-job-name",
            "round": r,
            "committed_at": f"2026-12-07T15:40:0{r}.100Z",
            "warmed_at": f"2026-12-07T15:40:0{r}.600Z",
            "warm_ms": 450.0,
            "commit_to_warm_ms": 500.0,
            **({"commit_to_artifacts_ms": 9250.0} if r < 7 else {}),
        }
        for r in range(8)
    ]
    out = Console(file=io.StringIO(), width=80, record=True)
    print_warm_times(markers, out, latest=5)
    text = out.export_text()
    assert max(len(line) for line in text.splitlines()) <= 80 and "…" not in text
    rows = [line.split() for line in text.splitlines() if line.strip().startswith("a-rather")]
    assert [r[1] for r in rows] == ["3", "4", "5", "6", "7"]
    assert rows[0][2:] == ["15:40:03.100", "15:40:03.600", "0.50", "9.25"]
    assert rows[-1][-1] == "-"  # round 7's artifacts not built yet


# --- the router function's handler -------------------------------------------------------


def test_the_router_handler_warms_an_s3_event_before_any_http_routing(store: ObjectStore) -> None:
    nodes = InProcessNodes(store, NODES)
    router = make_router(store, nodes, nodes=NODES, replication=2)
    app = build_app(lambda: router)
    answer = handle(app, event(manifest("demo", 2)), None)
    assert answer["warmed"] == ["demo/2"]
    assert read_marker(store, "demo", 2) is not None
    # S3's test event is answered, not routed as a request
    assert handle(app, {"Event": "s3:TestEvent"}, None)["warmed"] == []


def test_the_marker_records_each_owners_load_steps(store: ObjectStore) -> None:
    nodes = InProcessNodes(store, NODES)
    router = make_router(store, nodes, nodes=NODES, replication=2)
    CommitWarmer(store, router, hot_rounds=2).handle(event(manifest("demo", 2)))
    marker = read_marker(store, "demo", 2)
    assert marker is not None
    owners = marker["owners_ms"]
    assert len(owners) == 2  # both owners read it now
    for steps in owners.values():
        assert {"manifest", "rows", "base", "deltas", "gram", "models", "staged"} <= set(steps)
        assert steps["staged"] == 0 and steps["rows"] > 0
    # the primary alone wrote the default model
    assert sorted(s["models"] > 0 for s in owners.values()) == [False, True]
