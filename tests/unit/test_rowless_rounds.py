"""Tiered representations: a round under memory pressure gives up its rows, keeps its Gram.

The node is a real :class:`CacheNode` on an in-memory store; pressure is real too (a shard put
into a full cache). Every Gram-only workload is answered, in every variant (deltas or raw
weights; with or without BatchNorm buffers; cosines of deltas or of weights), from a rowless
round with no S3 read, byte-identical to the answer a node computed from the rows; a workload
that needs the rows reads them back and answers the same as before.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from flstore_core.cache.eviction import ClassTieredEviction
from flstore_core.cache.node import CacheNode
from flstore_core.cache.round_data import ROWLESS_BASE, RoundData, RowsEvicted, rowless_footprint
from flstore_core.cache.shard_cache import ShardCache
from flstore_core.data.blocks import footprint
from flstore_core.data.codec import Update
from flstore_core.data.manifest import JobSpec
from flstore_core.routing.placement import client_shard, meta_shard, model_shard, round_shard
from flstore_core.storage.memory import MemoryBlobStore
from flstore_core.storage.object_store import ObjectStore
from flstore_core.workloads import get

N_CLIENTS = 6
SHAPES: dict[str, tuple[tuple[int, ...], Any]] = {
    "conv.weight": ((8, 3, 3, 3), np.float32),
    "bn.weight": ((8,), np.float32),
    "bn.bias": ((8,), np.float32),
    "bn.running_mean": ((8,), np.float32),
    "bn.running_var": ((8,), np.float32),
    "bn.num_batches_tracked": ((), np.int64),
    "fc.weight": ((10, 200), np.float32),
    "fc.bias": ((10,), np.float32),
}
N_PARAMS = sum(int(np.prod(shape)) for shape, _ in SHAPES.values())


def client_state(rng: np.random.Generator, base: dict[str, Any] | None, k: int) -> dict[str, Any]:
    """The base plus a client's step; clients 4 and 5 push the other way."""
    out: dict[str, Any] = {}
    for name, (shape, dtype) in SHAPES.items():
        if dtype == np.int64:
            out[name] = np.array(100 + k, dtype=np.int64).reshape(shape)
            continue
        start = np.zeros(shape, np.float32) if base is None else base[name]
        step = rng.normal(0.05, 0.02, size=shape).astype(np.float32)
        sign = -1.0 if k >= 4 else 1.0
        out[name] = (start + np.float32(sign) * step + np.float32(1.0)).astype(np.float32)
    return out


def write_job(store: ObjectStore, job: str, deltas: bool) -> None:
    """One committed round; with ``deltas`` its base model is stored (rows are deltas)."""
    rng = np.random.default_rng(5)
    store.put_job_spec(JobSpec(job=job))
    initial = client_state(rng, None, 0)
    if deltas:
        store.put_initial(job, Update(initial))
    entries = [
        store.put_update(
            job, 0, f"c{k}", Update(client_state(rng, initial, k), num_examples=10 + 3 * k)
        )
        for k in range(N_CLIENTS)
    ]
    store.commit_round(job, 0, entries)


@pytest.fixture(scope="module")
def store() -> Iterator[ObjectStore]:
    st = ObjectStore("mem", blobs=MemoryBlobStore())
    write_job(st, "deltas", deltas=True)
    write_job(st, "raw", deltas=False)
    yield st
    st.close()


VARIANTS = [{"use_delta": d, "include_buffers": b} for d in (True, False) for b in (True, False)]
GRAM_CASES = [
    (name, {**extra, **variant})
    for name, extra in (
        ("cosine_select", {"k": 2}),
        ("malicious_cosine", {"k": 2}),
        ("kmeans", {"k": 2}),
        ("cfl_split", {}),
    )
    for variant in VARIANTS
]
JOBS = ("deltas", "raw")
BUDGET = footprint(N_CLIENTS, N_PARAMS) + 64 * 1024


def run(node: CacheNode, job: str, name: str, params: dict[str, Any]) -> dict[str, Any]:
    answer = node.handle({"op": "run", "workload": name, "job": job, "round": 0, "params": params})
    assert "error" not in answer, answer
    return answer


def as_bytes(result: dict[str, Any]) -> bytes:
    return json.dumps(result, sort_keys=True).encode()


@dataclass
class Blob:
    nbytes: int


def prefetched(store: ObjectStore, job: str) -> tuple[CacheNode, RoundData]:
    node = CacheNode(store, budget_bytes=BUDGET, node_index=0)
    assert node.load([str(round_shard(job, 0))])["loaded"] == [str(round_shard(job, 0))]
    data = node.cache.get(round_shard(job, 0))
    assert isinstance(data, RoundData) and data.has_rows
    return node, data


def squeeze_rows_out(node: CacheNode, data: RoundData) -> None:
    """Put a shard that leaves room for the round only without its rows."""
    room = BUDGET - (ROWLESS_BASE + data.gram_bytes())
    assert node.cache.put(model_shard("filler"), Blob(room))
    assert not data.has_rows


@pytest.mark.parametrize("job", JOBS)
@pytest.mark.parametrize(("name", "params"), GRAM_CASES, ids=lambda c: str(c))
def test_a_rowless_round_answers_gram_workloads_byte_identically_without_s3(
    store: ObjectStore, job: str, name: str, params: dict[str, Any]
) -> None:
    whole, _ = prefetched(store, job)
    want = run(whole, job, name, params)["result"]

    node, data = prefetched(store, job)
    squeeze_rows_out(node, data)
    assert node.cache.get(round_shard(job, 0)) is data  # still held, rowless
    got = run(node, job, name, params)
    assert got["s3_gets"] == 0 and got["cache"] == "hit"
    assert as_bytes(got["result"]) == as_bytes(want)
    assert node.stats()["rowless_answers"] == 1

    # the rows read back and re-attached answer the same, the Gram kept
    node.reload_rows(round_shard(job, 0), data)
    assert data.has_rows
    again = get(name).run(data, get(name).validate(params)).result
    assert as_bytes(again) == as_bytes(want)


@pytest.mark.parametrize("job", JOBS)
@pytest.mark.parametrize(
    ("name", "params"), [("fedavg", {}), ("krum", {"f": 1, "include_buffers": True})]
)
def test_a_workload_that_needs_rows_reads_them_back_and_answers_the_same(
    store: ObjectStore, job: str, name: str, params: dict[str, Any]
) -> None:
    whole, _ = prefetched(store, job)
    want = run(whole, job, name, params)["result"]
    # a model already at its key is neither computed nor written again (no rows needed): this
    # test is about a model that is not there yet
    store.blobs.delete(want["model_key"])

    node, data = prefetched(store, job)
    squeeze_rows_out(node, data)
    got = run(node, job, name, params)
    assert got["s3_gets"] > 0 and got["cache"] == "miss"
    assert as_bytes(got["result"]) == as_bytes(want)
    stats = node.stats()
    assert stats["rows_reloaded"] == 1 and stats["rowless_answers"] == 0
    # the rows came back into the same round (its memo and artifacts kept): the filler went
    assert data.has_rows and node.cache.get(round_shard(job, 0)) is data
    assert model_shard("filler") not in node.cache


def test_a_rowless_round_keeps_its_gram_and_memo_and_refuses_its_rows(
    store: ObjectStore,
) -> None:
    _, data = prefetched(store, "deltas")
    before = data.nbytes
    data.drop_rows()
    # the buffers' Gram pieces too: this round has BatchNorm statistics
    assert data.nbytes == rowless_footprint(N_CLIENTS, buffers=True)
    assert data.nbytes < before // 5 and data.rows_nbytes == 0
    assert data.is_delta  # cosines still say they are of deltas
    with pytest.raises(RowsEvicted):
        data.matrix  # noqa: B018 - the read is the test
    with pytest.raises(RowsEvicted):
        data.weighted_mean(np.ones(N_CLIENTS))
    with pytest.raises(RowsEvicted):  # never the deltas returned as if they were weights
        data.to_weights(np.zeros(N_PARAMS, np.float32))


def test_reloading_a_rewritten_round_answers_from_the_new_copy(store: ObjectStore) -> None:
    node, data = prefetched(store, "raw")
    squeeze_rows_out(node, data)
    data.sha256 = {c: "0" * 64 for c in data.clients}  # as if read before a late client
    fresh = node.reload_rows(round_shard("raw", 0), data)
    assert fresh is not data and fresh.has_rows and not data.has_rows
    assert node.cache.get(round_shard("raw", 0)) is fresh


# ------------------------------------------------------------------ the eviction order


def tiered(budget: int) -> tuple[ShardCache, ClassTieredEviction]:
    policy = ClassTieredEviction(hot_rounds=1)
    return ShardCache(budget, policy=policy), policy


@dataclass
class Round:
    """A stand-in round: ``rows`` of its ``nbytes`` go first under pressure."""

    nbytes: int
    rows: int

    @property
    def rows_nbytes(self) -> int:
        return self.rows

    def drop_rows(self) -> None:
        self.nbytes -= self.rows
        self.rows = 0


def test_rows_go_first_the_gram_stays() -> None:
    cache, _ = tiered(1000)
    old, hot = Round(400, 380), Round(400, 380)
    cache.put(round_shard("j", 1), old)
    cache.put(round_shard("j", 2), hot)
    cache.put(client := client_shard("j", "c1"), Blob(50))
    cache.put(meta_shard("j"), Blob(100))  # 950 held: a meta shard of 100 needs 50 more
    cache.put(meta_shard("k"), Blob(100))
    # the client history goes first (cheap to rebuild); nothing else had to give way
    assert client not in cache and old.rows == 380
    cache.put(meta_shard("l"), Blob(200))
    # then the old round's rows, not the round: it stays, rowless
    assert round_shard("j", 1) in cache and old.rows == 0 and hot.rows == 380
    assert cache.stats.rows_dropped == 1 and cache.stats.evictions == 1
    cache.put(meta_shard("m"), Blob(200))
    # then the hot round's rows, before any rowless round goes whole
    assert hot.rows == 0 and round_shard("j", 1) in cache and round_shard("j", 2) in cache


def test_a_small_used_model_shard_outlasts_a_large_hot_rounds_rows() -> None:
    cache, policy = tiered(10_000)
    hot = Round(6700, 6600)  # ResNet-18 × 10 scaled: 672 MB of which 447 MB rows+base+...
    cache.put(round_shard("j", 5), hot)
    cache.put(model_shard("j"), Blob(890))  # its 89 MB model shard
    for _ in range(3):
        cache.get(model_shard("j"))  # inference reads it every round
    cache.put(model_shard("k"), Blob(3000))
    assert model_shard("j") in cache and hot.rows == 0 and round_shard("j", 5) in cache
    # rowless now, the round ranks in a whole-round tier: above the model shards
    assert policy.rows[round_shard("j", 5)] == 0
    assert policy.victim(cache.shard_keys(), frozenset(), {}) != round_shard("j", 5)


def test_within_a_tier_the_lowest_value_density_goes_first() -> None:
    cache, policy = tiered(10_000)
    cache.put(big := model_shard("big"), Blob(5000))
    cache.put(small := model_shard("small"), Blob(500))
    cache.get(big)  # used more recently, but frees ten times the bytes for one reload
    assert policy.victim([big, small], frozenset(), {big: 9, small: 1}) == big
    for _ in range(20):
        cache.get(small)
    # a small entry's reload costs its first byte: many uses of it keep it all the more
    assert policy.density(small, policy.uses[small]) > policy.density(big, policy.uses[big])


def test_generic_policies_still_evict_rounds_whole() -> None:
    from flstore_core.cache.policies import LRUEviction

    cache = ShardCache(1000, policy=LRUEviction())
    first = Round(600, 580)
    cache.put(round_shard("j", 1), first)
    cache.put(round_shard("j", 2), Round(600, 580))
    assert round_shard("j", 1) not in cache and first.rows == 580
    assert cache.stats.rows_dropped == 0


# ------------------------------------------------------------------ stats by tier


def test_stats_show_the_bytes_held_by_tier(store: ObjectStore) -> None:
    node, data = prefetched(store, "deltas")
    run(node, "deltas", "cosine_select", {"k": 2})
    tiers = node.stats()["tiers"]
    assert tiers["rows"] == data.rows_nbytes > 0
    assert tiers["gram"] == data.gram_bytes() > 0
    assert tiers["answers"] > 0  # the cosine answer kept in the round's memo
    squeeze_rows_out(node, data)
    after = node.stats()["tiers"]
    assert after["rows"] == 0 and after["gram"] == tiers["gram"]
    assert after["answers"] == tiers["answers"] and after["models"] == BUDGET - data.nbytes


def test_flstore_stats_prints_each_nodes_tiers_within_80_columns(store: ObjectStore) -> None:
    import io

    from rich.console import Console

    from flstore_core.cli.stats import print_stats

    node, data = prefetched(store, "deltas")
    squeeze_rows_out(node, data)
    run(node, "deltas", "cosine_select", {"k": 2})
    stats = node.stats()
    big = {**stats, "tiers": {**stats["tiers"], "rows": 3 * 2**30, "models": 999 * 2**20}}
    out = Console(file=io.StringIO(), width=80, record=True)
    print_stats([stats, big], "flstore-local", out)
    text = out.export_text()
    assert max(len(line) for line in text.splitlines()) <= 80 and "…" not in text
    assert "held by tier" in text and "3.0G" in text and "999.0M" in text
    rows = [line for line in text.splitlines() if line.strip().startswith("0 ")]
    # node 0: no rows held, its Gram in KiB, one round dropped its rows, one rowless answer
    assert any(line.split()[1:2] == ["0"] and line.split()[-2:] == ["1", "1"] for line in rows)


# ------------------------------------------------------------------ the replay models the split


def test_the_replay_answers_gram_requests_from_rowless_rounds_and_reloads_rows() -> None:
    from benchmarks import cache_policies
    from benchmarks.cache_trace import Request, meta_part, model_part, round_part
    from lambdas.local_runtime.network import NetworkModel

    n, d = 10, 100_000
    gram, rows = round_part("j", 0, n, d, "gram"), round_part("j", 0, n, d, "rows")
    big = model_part("k", 3 * d)  # a model shard that leaves room for the round rowless only
    budget = rows.entry + 1024
    trace = [
        Request(0.0, "j", 0, "prefetch", "prefetch", [0], "prefetch", [rows], prefetch=True),
        Request(1.0, "k", 0, "inference", "model", [0], "model", [big]),
        Request(2.0, "j", 0, "cosine_select", "round", [0], "gram", [gram]),
        Request(3.0, "j", 0, "fedavg", "round", [0], "rows", [rows]),
        Request(4.0, "j", 0, "krum", "round", [0], "rows", [rows]),
    ]
    assert big.entry + rows.rowless <= budget < big.entry + rows.entry
    assert meta_part("j", n, 1).rowless == 0 and rows.rowless == rowless_footprint(n)

    def replay(policy: str) -> cache_policies.Tally:
        return cache_policies.Replay(trace, policy, budget, 1, NetworkModel()).run()

    tiered = replay("flstore")
    assert tiered.rows_dropped == 1 and tiered.rowless_answers == 1
    # the Gram request hit with no S3 read; fedavg read the rows back (a miss), krum hit
    assert tiered.hits["round"] == 2 and tiered.requests["round"] == 3
    assert tiered.s3_bytes == big.s3_bytes + rows.s3_bytes
    whole = replay("lru")  # a generic policy evicts the round whole: the Gram request loads it
    assert whole.rowless_answers == 0 and whole.hits["round"] == 2
    assert whole.hit_bytes["round"] == 2 * rows.need
    assert tiered.hit_bytes["round"] == gram.need + rows.need
    # the same bytes read either way: only which request pays the miss differs
    assert whole.s3_bytes == tiered.s3_bytes


def test_concurrent_requests_read_a_rowless_rounds_rows_once(
    store: ObjectStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading
    import time

    node, data = prefetched(store, "raw")
    squeeze_rows_out(node, data)
    key = round_shard("raw", 0)
    load = node.loader(key)
    reads: list[int] = []

    def slow_load() -> RoundData:
        reads.append(1)
        time.sleep(0.2)  # both requests are past their has_rows check by now
        fresh: RoundData = load()
        return fresh

    monkeypatch.setattr(node, "loader", lambda k: slow_load)
    got: list[RoundData] = []
    threads = [
        threading.Thread(target=lambda: got.append(node.reload_rows(key, data))) for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(reads) == 1 and got == [data, data] and data.has_rows
    assert node.stats()["rows_reloaded"] == 1
