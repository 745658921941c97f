"""The shard cache's class policies, pinning, and the cache node's operations."""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import pytest

from flstore_core.cache.node import CacheNode
from flstore_core.cache.shard_cache import ShardCache
from flstore_core.routing.placement import client_shard, meta_shard, model_shard, round_shard
from flstore_core.storage.memory import MemoryBlobStore
from flstore_core.storage.object_store import ObjectStore
from flstore_core.workloads import get
from flstore_core.workloads.cosine_select import cosine_to_mean
from tests.conftest import small_update


@pytest.fixture
def store() -> ObjectStore:
    """What is tested here does not depend on the bucket: an in-memory one (S3's own behaviour
    is tested in test_store, test_blobs and test_checksums), many times quicker than moto."""
    return ObjectStore(blobs=MemoryBlobStore())


@dataclass
class Blob:
    nbytes: int


def test_old_rounds_are_evicted_before_the_latest_w() -> None:
    cache = ShardCache(budget_bytes=400, hot_rounds=2)
    for r in range(4):
        cache.put(round_shard("j", r), Blob(100))
    cache.put(round_shard("j", 4), Blob(100))  # forces one eviction
    held = {k.round for k in cache.shard_keys()}
    assert held == {1, 2, 3, 4}
    cache.put(round_shard("j", 5), Blob(100))
    assert {k.round for k in cache.shard_keys()} == {2, 3, 4, 5}
    assert cache.stats.evictions == 2


def test_meta_is_kept_and_client_histories_go_first() -> None:
    cache = ShardCache(budget_bytes=300, hot_rounds=2)
    cache.put(meta_shard("j"), Blob(10))
    cache.put(client_shard("j", "c1"), Blob(90))
    cache.put(round_shard("j", 0), Blob(100))
    cache.put(model_shard("j"), Blob(100))
    assert cache.put(round_shard("j", 1), Blob(100))
    keys = set(cache.shard_keys())
    assert meta_shard("j") in keys and client_shard("j", "c1") not in keys


def test_pinned_entries_are_never_evicted() -> None:
    cache = ShardCache(budget_bytes=200, hot_rounds=1)
    key0 = round_shard("j", 0)
    with cache.using(key0, lambda: Blob(100)) as (_, hit):
        assert not hit
        cache.put(round_shard("j", 1), Blob(100))
        # round 0 is outside the hot window but in use: round 1 has to go instead
        assert cache.put(round_shard("j", 2), Blob(100))
        assert key0 in cache
    assert cache.evict(key0)


def test_a_value_larger_than_the_budget_is_served_but_not_kept() -> None:
    cache = ShardCache(budget_bytes=100)
    with cache.using(round_shard("j", 0), lambda: Blob(1000)) as (value, hit):
        assert value.nbytes == 1000 and not hit
    assert cache.shard_keys() == [] and cache.stats.uncacheable == 1


def test_concurrent_misses_load_once() -> None:
    cache = ShardCache(budget_bytes=10_000)
    loads = []
    gate = threading.Event()

    def load() -> Blob:
        loads.append(1)
        gate.wait(0.2)
        return Blob(10)

    def use() -> None:
        with cache.using(round_shard("j", 0), load):
            pass

    threads = [threading.Thread(target=use) for _ in range(6)]
    for t in threads:
        t.start()
    gate.set()
    for t in threads:
        t.join()
    assert len(loads) == 1 and cache.stats.loads == 1 and cache.stats.hits == 5


def _commit(store: ObjectStore, job: str, round_: int, n: int = 4) -> None:
    for i in range(n):
        store.put_update(job, round_, f"c{i}", small_update(i + 10 * round_))
    store.commit_round(job, round_)


def test_warm_hit_after_load_makes_zero_s3_gets(store: ObjectStore) -> None:
    _commit(store, "j", 0)
    node = CacheNode(store, budget_bytes=10**8)
    assert node.handle({"op": "load", "shards": ["j/round/0"]})["loaded"] == ["j/round/0"]
    before = store.gets
    answer = node.handle({"op": "run", "workload": "cosine_select", "job": "j", "round": 0})
    assert answer["cache"] == "hit" and answer["s3_gets"] == 0
    assert store.gets == before


def test_cold_miss_loads_from_s3_then_hits(store: ObjectStore) -> None:
    _commit(store, "j", 0)
    node = CacheNode(store, budget_bytes=10**8)
    first = node.handle({"op": "run", "workload": "fedavg", "job": "j", "round": 0})
    assert first["cache"] == "miss" and first["s3_gets"] >= 4
    second = node.handle({"op": "run", "workload": "fedavg", "job": "j", "round": 0})
    assert second["cache"] == "hit" and second["s3_gets"] == 0
    assert second["result"]["model_key"] == first["result"]["model_key"]
    stats = node.handle({"op": "stats"})
    assert (stats["hits"], stats["misses"], stats["loads"]) == (1, 1, 1)


def test_small_budget_keeps_the_latest_w_rounds(store: ObjectStore) -> None:
    for r in range(4):
        _commit(store, "j", r)
    one_round = CacheNode(store, budget_bytes=10**8)
    one_round.handle({"op": "load", "shards": ["j/round/0"]})
    size = one_round.cache.bytes_held
    node = CacheNode(store, budget_bytes=int(size * 2.5), hot_rounds=2)
    for r in range(4):
        node.handle({"op": "load", "shards": [f"j/round/{r}"]})
    assert node.handle({"op": "stats"})["shards"] == ["j/round/2", "j/round/3"]
    assert node.cache.stats.evictions == 2


def test_node_errors_are_typed_answers_not_crashes(store: ObjectStore) -> None:
    _commit(store, "j", 0)
    node = CacheNode(store, budget_bytes=10**8)
    assert node.handle({"op": "nope"})["status"] == 400
    assert node.handle({"op": "run", "workload": "x", "job": "j", "round": 0})["status"] == 404
    assert node.handle({"op": "run", "workload": "fedavg", "job": "j", "round": 9})["status"] == 404
    bad_k = node.handle(
        {"op": "run", "workload": "cosine_select", "job": "j", "round": 0, "params": {"k": 9}}
    )
    assert bad_k["status"] == 400 and "k=9" in bad_k["error"]["message"]


def test_artifacts_are_computed_once_and_reused(store: ObjectStore) -> None:
    _commit(store, "j", 0)
    node = CacheNode(store, budget_bytes=10**8)
    for k in (1, 2, 3):
        node.handle(
            {"op": "run", "workload": "cosine_select", "job": "j", "round": 0, "params": {"k": k}}
        )
    stats = node.handle({"op": "stats"})
    art = stats["artifacts"]
    assert art["computed"]["gram"] == 1 and art["reused"]["gram"] == 2
    # the same request again: answered from the round's memo, no artifact touched
    node.handle({"op": "run", "workload": "cosine_select", "job": "j", "round": 0})
    again = node.handle({"op": "stats"})
    assert again["artifacts"]["reused"]["gram"] == 2
    assert again["answers"]["reused"] == stats["answers"]["reused"] + 1


def test_cosine_select_matches_a_direct_computation(store: ObjectStore) -> None:
    _commit(store, "j", 0, n=6)
    node = CacheNode(store, budget_bytes=10**8)
    answer = node.handle(
        {"op": "run", "workload": "cosine_select", "job": "j", "round": 0, "params": {"k": 2}}
    )
    rm = store.read_round("j", 0)
    # the float tensors only: the integer counter (bn.num_batches_tracked) is never read
    keep = np.concatenate([np.full(s.numel, s.dtype.startswith(("F", "BF"))) for s in rm.specs])
    x = rm.matrix.astype(np.float64)[:, keep]
    m = x.mean(0)
    cos = x @ m / (np.linalg.norm(x, axis=1) * np.linalg.norm(m))
    clients = [f"c{i}" for i in range(6)]
    expect = [clients[i] for i in np.argsort(-cos)[:2]]
    assert answer["result"]["selected"] == expect
    for c, v in zip(clients, cos, strict=True):
        assert answer["result"]["scores"][c] == pytest.approx(v, abs=1e-5)


def test_fedavg_matches_the_weighted_mean_and_uses_deltas(store: ObjectStore) -> None:
    store.put_initial("j", small_update(99))
    _commit(store, "j", 0)
    node = CacheNode(store, budget_bytes=10**8)
    answer = node.handle({"op": "run", "workload": "fedavg", "job": "j", "round": 0})
    rm = store.read_round("j", 0)
    w = rm.num_examples / rm.num_examples.sum()
    expect = (w[:, None] * rm.matrix.astype(np.float64)).sum(0)
    from flstore_core.data.codec import decode_update

    model = decode_update(store.get_object(answer["result"]["model_key"]))
    got = np.concatenate([np.asarray(a, np.float64).ravel() for a in model.tensors.values()])
    # integer tensors (BatchNorm's counter) are averaged, then rounded back to their dtype
    is_int = np.concatenate([np.full(s.numel, s.dtype.startswith("I")) for s in rm.specs])
    np.testing.assert_allclose(got, np.where(is_int, np.rint(expect), expect), atol=1e-5)
    assert model.tensors["bn.num_batches_tracked"].dtype == np.int64


def test_cosine_to_mean_from_gram_equals_the_definition() -> None:
    x = np.random.default_rng(0).standard_normal((7, 50))
    m = x.mean(0)
    direct = x @ m / (np.linalg.norm(x, axis=1) * np.linalg.norm(m))
    np.testing.assert_allclose(cosine_to_mean(x @ x.T), direct, atol=1e-12)


def test_registry_lists_both_workloads_with_schemas() -> None:
    assert get("cosine_select").cls == "round"
    desc = get("cosine_select").describe()
    assert desc["params"]["k"] == {
        "type": "int",
        "default": 3,
        "minimum": 1,
        "description": "clients to select",
    }
