"""``benchmarks/commit_to_warm.py``'s ``commit_to_warm`` part: what it times from a commit (the
manifest PUT's return, the warm marker, the first answer from memory) and what it reports."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import boto3
import pytest

from benchmarks.commit_timing import (
    CommitClock,
    FirstHit,
    S3Process,
    poll_until_hit,
    wait_for_marker,
)
from benchmarks.commit_to_warm import (
    WARM_WORKLOADS,
    _marker_span_ms,
    main,
    warm_report,
    warm_sample,
)
from benchmarks.paper_data import MODEL_JOB, QUICK
from flstore_core.data import layout
from flstore_core.routing.commit_warming import warm_marker_key
from flstore_core.storage.memory import MemoryBlobStore
from flstore_core.storage.object_store import ObjectStore
from tests.conftest import small_update


def memory_store() -> ObjectStore:
    return ObjectStore("bench", blobs=MemoryBlobStore())


def put_marker(store: ObjectStore, round_: int) -> None:
    body = {"committed_at": "2026-12-07T15:00:00.000Z", "warmed_at": "2026-12-07T15:00:01.250Z"}
    store.blobs.put(warm_marker_key(MODEL_JOB, round_), json.dumps(body).encode())


def test_the_commit_clock_notes_the_commit_after_the_manifest_is_written() -> None:
    clock = CommitClock("bench", blobs=MemoryBlobStore())
    entry = clock.put_update("job", 0, "c0", small_update(0))
    before = time.perf_counter()
    clock.commit_round("job", 0, [entry])
    assert clock.blobs.get(layout.manifest_key("job", 0)) is not None
    assert before <= clock.committed_at[("job", 0)] <= time.perf_counter()
    assert list(clock.committed_at) == [("job", 0)]


def test_the_marker_is_polled_until_it_exists_and_a_missing_one_times_out() -> None:
    store = memory_store()
    threading.Timer(0.15, put_marker, (store, 3)).start()
    t0 = time.perf_counter()
    seen, marker = wait_for_marker(store, MODEL_JOB, 3, timeout_s=10, poll_s=0.01)
    assert seen - t0 >= 0.15
    assert marker["warmed_at"] == "2026-12-07T15:00:01.250Z"
    with pytest.raises(TimeoutError, match="no warm marker for round 4"):
        wait_for_marker(store, MODEL_JOB, 4, timeout_s=0.05, poll_s=0.01)


def test_polling_counts_the_answers_not_from_memory_and_keeps_the_hit() -> None:
    answers: Iterator[dict[str, Any]] = iter(
        [{"cache": "miss"}, {"cache": "partial"}, {"cache": "hit", "node": 1}]
    )
    hit = poll_until_hit(lambda: next(answers), timeout_s=10, poll_s=0)
    assert (hit.misses, hit.meta) == (2, {"cache": "hit", "node": 1})
    assert hit.latency_ms >= 0
    with pytest.raises(TimeoutError, match="misses"):
        poll_until_hit(lambda: {"cache": "miss"}, timeout_s=0.02, poll_s=0.005)


class FakeStack:
    """What ``warm_sample`` reads of a stack: its store, and its notifications' idleness."""

    def __init__(self) -> None:
        self.store = memory_store()
        self.idle_waits = 0
        self.notifications = self

    def wait_idle(self, timeout_s: float) -> bool:
        self.idle_waits += 1
        for info in self.store.blobs.list(f"jobs/{MODEL_JOB}/warm/"):
            # the warming's last word: the marker rewritten once the artifacts were built
            marker = json.loads(bytes(self.store.blobs.get(info.key) or b"{}"))
            marker["artifacts_at"] = "2026-12-07T15:00:09.000Z"
            self.store.blobs.put(info.key, json.dumps(marker).encode())
        return True


def test_under_marker_polling_no_request_is_sent_before_the_marker() -> None:
    stack = FakeStack()
    asked: list[tuple[str, bool]] = []

    def commit(round_: int) -> float:
        threading.Timer(0.2, put_marker, (stack.store, round_)).start()
        return time.perf_counter()

    def ask(name: str, round_: int) -> dict[str, Any]:
        marked = stack.store.blobs.get(warm_marker_key(MODEL_JOB, round_)) is not None
        asked.append((name, marked))
        return {"cache": "hit"}

    elapsed, marker, hits = warm_sample(stack, ask, commit, 2, "marker")
    assert all(h.misses == 0 for h in hits.values())
    assert sorted({name for name, _ in asked}) == sorted(WARM_WORKLOADS)
    assert all(marked for _, marked in asked)
    assert elapsed["warm_marker"] >= 200
    # a workload answered after the marker was seen: never before it
    assert all(elapsed[w] >= elapsed["warm_marker"] for w in WARM_WORKLOADS)
    assert marker["committed_at"] == "2026-12-07T15:00:00.000Z"
    assert stack.idle_waits == 1  # the next round waits for this one's warming
    assert _marker_span_ms(marker, "artifacts_at") == 9000.0  # the marker as last written


def test_under_commit_polling_requests_start_at_the_commit() -> None:
    stack = FakeStack()
    early: list[bool] = []

    def commit(round_: int) -> float:
        threading.Timer(0.3, put_marker, (stack.store, round_)).start()
        return time.perf_counter()

    def ask(name: str, round_: int) -> dict[str, Any]:
        early.append(stack.store.blobs.get(warm_marker_key(MODEL_JOB, round_)) is None)
        return {"cache": "miss" if early[-1] else "hit"}

    elapsed, _, hits = warm_sample(stack, ask, commit, 1, "commit")
    assert any(early)  # polled before the marker: answered by a load of its own (a miss)
    assert all(hits[w].misses >= 1 for w in WARM_WORKLOADS)
    assert all(elapsed[w] >= 300 for w in WARM_WORKLOADS)


def args_of(**kw: Any) -> Any:
    base = {
        "clients": 10,
        "nodes": 2,
        "replication": 2,
        "poll": "marker",
        "staging": "on",
        "arrival_s": 0.0,
    }
    return type("Args", (), {**base, **kw})


def test_the_report_has_a_run_per_measure_and_judges_cosine_select_and_fedavg() -> None:
    samples = {
        "warm_marker": [900.0, 1100.0],
        "cosine_select": [950.0, 990.0],
        "fedavg": [960.0, 1000.0],
        "contribution_loo": [5000.0, 6000.0],
    }
    hit = FirstHit(0.0, 1, {"cache": "hit", "node_timing_ms": {"load": 1.0}}, 12.0)
    hits = {w: [hit, hit] for w in WARM_WORKLOADS}
    markers = [{"warm_ms": 800.0, "committed_at": "2026-12-07T15:00:00.000Z"}]
    out = warm_report(args_of(), QUICK, samples, markers, hits, {"wall_ms": 1.0})
    runs = {run["workload"]: run for run in out["runs"]}
    assert set(runs) == {"warm_marker", *WARM_WORKLOADS}
    loo = runs["contribution_loo"]
    assert (loo["system"], loo["metric"], loo["clients"], loo["n"]) == (
        "commit_to_warm",
        "latency_ms",
        10,
        2,
    )
    assert loo["p50"] == 5500.0 and loo["misses"] == [1, 1] and loo["staging"] == "on"
    assert loo["hit_node_timing_ms"] == [{"load": 1.0}, {"load": 1.0}]
    summary = out["summary"]["commit_to_warm"]
    assert summary["target_met"] is True  # contribution_loo is reported, not judged
    assert summary["router_warm_ms"] == [800.0]
    assert summary["router_commit_to_warm_ms"] == [None]  # no warmed_at in that marker
    samples["fedavg"] = [1200.0, 1300.0]
    late = warm_report(args_of(), QUICK, samples, markers, hits, {})
    assert late["summary"]["commit_to_warm"]["target_met"] is False


def test_a_markers_span_is_its_commit_to_warm_time() -> None:
    marker = {"committed_at": "2026-12-07T15:00:00.000Z", "warmed_at": "2026-12-07T15:00:01.250Z"}
    assert _marker_span_ms(marker) == 1250.0
    assert _marker_span_ms({"committed_at": "nonsense", "warmed_at": "x"}) is None


def test_a_part_runs_under_the_network_flag_and_reports_it(monkeypatch: Any) -> None:
    seen: dict[str, Any] = {}

    def fake_part(args: Any) -> dict[str, Any]:
        seen["args"] = args
        return {"runs": [{"system": "commit_to_warm"}], "summary": {"commit_to_warm": {}}}

    monkeypatch.setitem(
        __import__("benchmarks.commit_to_warm").commit_to_warm.PARTS, "commit_to_warm", fake_part
    )
    report = main(["--part", "commit_to_warm", "--network", "aws", "--s3", "embedded"])
    assert report["network"]["name"] == "aws" and report["s3"] == "embedded"
    assert seen["args"].network is not None and seen["args"].poll == "marker"
    assert report["runs"] == [{"system": "commit_to_warm"}]


def test_the_s3_process_serves_s3_and_stops() -> None:
    process = S3Process()
    with process as url:
        client = boto3.client(
            "s3",
            endpoint_url=url,
            region_name="us-east-1",
            aws_access_key_id="local",
            aws_secret_access_key="local",
        )
        client.create_bucket(Bucket="commit-clock")
        client.put_object(Bucket="commit-clock", Key="k", Body=b"v")
        assert client.get_object(Bucket="commit-clock", Key="k")["Body"].read() == b"v"
    assert not process.proc.is_alive()


def test_updates_spread_over_the_arrival_time_land_one_by_one_before_the_commit() -> None:
    from benchmarks.paper_data import ModelJob

    landed: list[float] = []

    class Timed(CommitClock):
        def put_update(self, *args: Any, **kwargs: Any) -> Any:
            landed.append(time.perf_counter())
            return super().put_update(*args, **kwargs)

    store = Timed("bench", blobs=MemoryBlobStore())
    job = ModelJob(store, QUICK)
    t0 = time.perf_counter()
    job.write_round(0, arrival_s=0.5)
    n = QUICK.clients
    assert len(landed) == n
    # update k no sooner than (k + 1)/n of the arrival time, and one by one
    assert all(t - t0 >= 0.5 * (k + 1) / n - 1e-3 for k, t in enumerate(landed))
    assert landed == sorted(landed) and store.committed_at[(MODEL_JOB, 0)] > landed[-1]
    manifest = store.get_manifest(MODEL_JOB, 0)
    assert len(manifest.updates) == n and store.get_base(MODEL_JOB, 1) is not None
    # the same manifest summaries the sink writes when they land at once
    twin = CommitClock("bench", blobs=MemoryBlobStore())
    ModelJob(twin, QUICK).write_round(0)
    assert {c: e.summary for c, e in manifest.updates.items()} == {
        c: e.summary for c, e in twin.get_manifest(MODEL_JOB, 0).updates.items()
    }
