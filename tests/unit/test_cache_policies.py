"""The generic eviction policies on hand-built examples, the trace generator's request mix,
and the replay benchmark's bound and JSON names (benchmarks/cache_policies.py)."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import pytest

from benchmarks import cache_policies
from benchmarks.cache_trace import (
    GRAM_WORKLOADS,
    REVISIT_WORKLOADS,
    ROWS_WORKLOADS,
    TraceSetting,
    generate,
    read_trace,
    working_set,
    write_trace,
)
from flstore_core.cache.eviction import ClassTieredEviction
from flstore_core.cache.job_policy import JobFollowingEviction
from flstore_core.cache.node import CacheNode
from flstore_core.cache.policies import (
    BeladySizeEviction,
    GDSFEviction,
    LFUEviction,
    LRUEviction,
    make_policy,
)
from flstore_core.cache.shard_cache import ShardCache
from flstore_core.routing.placement import ShardKey, meta_shard, round_shard
from flstore_core.storage.object_store import ObjectStore

A, B, C, D = (round_shard("job", r) for r in range(4))
TINY = TraceSetting(jobs=4, rounds=20, small_params=2_000, large_params=40_000, seed=3)


class Blob:
    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes


def held(cache: ShardCache) -> set[ShardKey]:
    return set(cache.shard_keys())


# ---------------------------------------------------------------------------- policies


def test_lru_evicts_the_least_recently_used() -> None:
    cache = ShardCache(300, policy=LRUEviction())
    for key in (A, B, C):
        cache.put(key, Blob(100))
    assert cache.get(A) is not None  # A is now the most recent; B the least
    cache.put(D, Blob(100))
    assert held(cache) == {A, C, D}


def test_lfu_evicts_the_least_frequently_used_and_forgets_the_evicted() -> None:
    policy = LFUEviction()
    cache = ShardCache(300, policy=policy)
    for key in (A, B, C):
        cache.put(key, Blob(100))
    cache.get(A)
    cache.get(A)
    cache.get(B)  # uses: A 3, B 2, C 1 -> C goes although A is the oldest put
    cache.put(D, Blob(100))
    assert held(cache) == {A, B, D}
    assert C not in policy.counts


def test_gdsf_evicts_the_lowest_priority_and_inflates_by_the_victim() -> None:
    policy = GDSFEviction()  # cost 1: H = L + frequency / size
    cache = ShardCache(240, policy=policy)
    cache.put(A, Blob(100))  # H = 1/100
    cache.put(B, Blob(50))  # H = 1/50
    cache.get(A)
    cache.get(A)  # H(A) = 3/100 > H(B) = 2/100
    cache.put(C, Blob(100))  # 250 bytes > 240: B (lowest priority) goes
    assert held(cache) == {A, C}
    assert policy.inflation == pytest.approx(1 / 50)
    assert policy.priority[C] == pytest.approx(1 / 50 + 1 / 100)  # L + 1/size


def test_gdsf_cost_weighs_reload_cost_over_size() -> None:
    # a reload cost of 1000 per byte for A makes it worth keeping over the smaller B
    policy = GDSFEviction(cost=lambda size: 1000.0 * size if size == 100 else 1.0)
    cache = ShardCache(160, policy=policy)
    cache.put(A, Blob(100))
    cache.put(B, Blob(50))
    cache.put(C, Blob(10))
    assert held(cache) == {A, B, C}
    cache.put(D, Blob(50))  # 210 bytes: the lowest of B (1/50), C (1/10), A (1000) is B
    assert held(cache) == {A, C, D}


def test_belady_evicts_never_used_again_then_farthest_times_size() -> None:
    distance = {A: 5.0, B: math.inf, C: 2.0}
    policy = BeladySizeEviction(lambda key: distance.get(key, math.inf))
    policy.accessed(A, 10)
    policy.accessed(B, 1)
    policy.accessed(C, 100)
    assert policy.victim([A, B, C], set(), {}) == B
    assert policy.victim([A, C], set(), {}) == C  # 2 x 100 > 5 x 10
    assert policy.victim([A, C], {C}, {}) == A  # pinned entries are never chosen
    assert policy.victim([A], {A}, {}) is None


def test_make_policy_by_name_and_the_node_takes_it() -> None:
    assert isinstance(make_policy("flstore", hot_rounds=3), JobFollowingEviction)
    assert type(make_policy("flstore_static", hot_rounds=3)) is ClassTieredEviction
    assert isinstance(make_policy("lru"), LRUEviction)
    assert isinstance(make_policy("gdsf"), GDSFEviction)
    with pytest.raises(ValueError, match="unknown eviction policy"):
        make_policy("fifo")
    policy = LFUEviction()
    node = CacheNode(ObjectStore("unused-bucket"), budget_bytes=1000, node_index=0, policy=policy)
    assert node.cache.policy is policy


# ---------------------------------------------------------------------------- trace


def test_trace_follows_the_request_mix() -> None:
    s = TraceSetting()
    trace = generate(s)
    users = [q for q in trace if not q.prefetch]
    per = Counter((q.job, q.round, q.workload) for q in users)
    model_jobs = {f"job-{j}" for j in range(s.jobs_without_models, s.jobs)}
    for j in range(s.jobs):
        job = f"job-{j}"
        for r in range(s.rounds):
            latest = [q for q in users if q.job == job and q.round == r and q.rounds == [r]]
            assert sum(q.cls == "round" for q in latest) == 4
            assert per[job, r, "oort_select"] == 2
            assert per[job, r, "inference"] == (job in model_jobs)
            client = per[job, r, "incentive"] + per[job, r, "reputation"]
            assert client == ((r + 1) % s.client_every == 0)
            revisit = sum(per[job, r, w] for w in REVISIT_WORKLOADS)
            assert revisit == (job in model_jobs and (r + 1) % s.revisit_every == 0)
    for q in users:
        if q.workload in REVISIT_WORKLOADS:
            assert q.rounds[0] < q.round and q.needs == "rows"
        if q.workload in GRAM_WORKLOADS:
            assert q.needs == "gram" and q.need_bytes < 2_000  # n^2 floats, not the rows
        if q.workload in ROWS_WORKLOADS:
            assert q.needs == "rows" and q.need_bytes == 10 * 4 * (
                s.small_params if q.job in ("job-0", "job-2", "job-4", "job-6") else s.large_params
            )
        if q.cls == "client":
            assert q.parts[0].key == str(meta_shard(q.job)) and q.rounds == list(range(q.round + 1))
    non_model = {q.workload for q in users if q.job not in model_jobs}
    assert not non_model & {"inference", *REVISIT_WORKLOADS}
    times = [q.t for q in trace]
    assert times == sorted(times)


def test_trace_round_trips_through_jsonl(tmp_path: Path) -> None:
    trace = generate(TINY)
    write_trace(trace, tmp_path / "t.jsonl")
    assert read_trace(tmp_path / "t.jsonl") == trace


def test_working_set_counts_each_shard_once_per_window() -> None:
    s = TraceSetting(
        jobs=1,
        jobs_without_models=0,
        rounds=3,
        window_rounds=2,
        revisit_every=100,
        client_every=100,
    )
    trace = generate(s)
    n, d = s.clients_per_round, s.small_params
    rows_entry = 4 * (n + 5) * d  # blocks.footprint
    meta = 512 + 256 * n * 3  # the largest the meta shard grows to in the window
    model = 1024 + 8 * d
    assert working_set(trace, 2) == 2 * rows_entry + meta + model


# ---------------------------------------------------------------------------- replay


def test_belady_bound_is_at_least_every_online_policy_on_a_tiny_trace() -> None:
    _, runs = cache_policies.compare(generate(TINY), fractions=(0.25, 0.5), nodes=2)
    for fraction in (0.25, 0.5):
        at = {r["system"]: r for r in runs if r["memory_fraction"] == fraction}
        assert set(at) == set(cache_policies.POLICIES)
        for name in ("flstore", "lru", "lfu", "gdsf"):
            assert at["belady"]["byte_hit_ratio"] >= at[name]["byte_hit_ratio"]
        # memory below the working set: the online policies miss something
        assert min(at[n]["byte_hit_ratio"] for n in ("lru", "flstore")) < 1.0


def test_json_has_the_names_the_checks_read(tmp_path: Path) -> None:
    trace = tmp_path / "tiny.jsonl"
    write_trace(generate(TINY), trace)
    out = tmp_path / "out.json"
    cache_policies.main(["--replay", str(trace), "--json", str(out), "--fractions", "0.25"])
    report = json.loads(out.read_text())
    assert report["benchmark"] == "cache_policies"
    assert report["setting"]["working_set_bytes"] > 0
    systems = {r["system"] for r in report["runs"]}
    assert systems == {"flstore", "flstore_static", "lru", "lfu", "gdsf", "belady"}
    names = {
        "metric",
        "n",
        "memory_fraction",
        "byte_hit_ratio",
        "request_hit_ratio",
        "s3_bytes",
        "p50",
        "p95",
        "p99",
        "cost_usd",
    }
    for run in report["runs"]:
        assert names <= set(run) and run["metric"] == "latency_ms"
        assert run["memory_fraction"] == 0.25 and run["n"] > 0
        assert 0.0 <= run["byte_hit_ratio"] <= 1.0
        assert ("rowless_answers" in run) == run["system"].startswith("flstore")
