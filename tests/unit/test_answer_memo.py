"""Meta, client and model workloads on a cache node: client workloads answered from the job's
meta shard (one node, every client), and identical requests answered from the shard's memo
— never across a newly committed round, a rewritten manifest or a new global model."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pytest

from evaluation import digits_job
from flstore_core import models
from flstore_core.cache.memo import ResultMemo
from flstore_core.cache.node import REFRESH_S, CacheNode
from flstore_core.cache.shards import ClientHistory, ManifestReader, load_client
from flstore_core.data.codec import Update
from flstore_core.data.manifest import JobSpec
from flstore_core.storage.memory import MemoryBlobStore
from flstore_core.storage.object_store import ObjectStore
from flstore_core.workloads import get
from tests.conftest import small_update

CLIENTS = [f"c{i}" for i in range(6)]


@pytest.fixture
def store() -> ObjectStore:
    """The memo's rules do not depend on the bucket: an in-memory one (S3's own behaviour is
    tested in test_store, test_blobs and test_checksums), ~10x quicker than moto here."""
    return ObjectStore(blobs=MemoryBlobStore())


def commit(store: ObjectStore, job: str, r: int, members: list[str] | None = None) -> None:
    members = members or CLIENTS
    entries = []
    for i, c in enumerate(members):
        u = small_update(i + 10 * r)
        u.metrics = {"loss": 0.5 + 0.1 * i + 0.01 * r, "duration_s": 1.0 + 0.2 * i}
        entries.append(store.put_update(job, r, c, u))
    summaries = {
        c: {"cos_to_mean": 0.9 - 0.15 * i + 0.01 * r, "contribution": 3.0 - 0.4 * i + 0.1 * r}
        for i, c in enumerate(members)
    }
    store.commit_round(job, r, entries, summaries=summaries)


def run(node: CacheNode, workload: str, params: dict[str, Any], **extra: Any) -> dict[str, Any]:
    answer = node.handle({"op": "run", "workload": workload, "job": "j", "params": params, **extra})
    assert "error" not in answer, answer
    return answer


def scattered(
    store: ObjectStore, workload: str, params: dict[str, Any], clients: list[str], rounds: Any
) -> dict[str, Any]:
    """What the client-shard path computed: each client's history read on its own (as a node
    holding only that client's shard did), the partials merged, then finalised."""
    w = get(workload)
    reader = ManifestReader(store)
    histories = {}
    for c in clients:
        h = load_client(reader, "j", c)
        histories[c] = ClientHistory(
            "j", c, [r for r in h.rows if rounds is None or r.round in rounds]
        )
    full = w.validate(params)
    partial = dict(w.run(histories, full))
    assert w.finalize is not None
    return w.finalize(partial, full)


@pytest.mark.parametrize("workload", ["incentive", "reputation"])
@pytest.mark.parametrize(
    ("params", "rounds"),
    [({}, None), ({"clients": ["c4", "c1"]}, None), ({}, [0, 2]), ({"clients": ["c6"]}, None)],
)
def test_the_meta_shard_answers_what_the_client_shards_did(
    store: ObjectStore, workload: str, params: dict[str, Any], rounds: list[int] | None
) -> None:
    for r in range(3):
        commit(store, "j", r, CLIENTS if r != 1 else CLIENTS[:4])  # c4, c5 skip round 1
    commit(store, "j", 3, ["c6"])  # a client seen in one round only
    node = CacheNode(store, budget_bytes=10**8)
    extra = {} if rounds is None else {"rounds": rounds}
    answer = run(node, workload, get(workload).validate(params), **extra)
    clients = params.get("clients") or [*CLIENTS, "c6"]
    want = scattered(store, workload, params, clients, None if rounds is None else set(rounds))
    assert answer["result"] == want
    assert set(answer["result"]["values"]) <= set(clients)


def test_an_identical_request_is_answered_from_the_memo(store: ObjectStore) -> None:
    for r in range(2):
        commit(store, "j", r)
    node = CacheNode(store, budget_bytes=10**8)
    first = run(node, "oort_select", {"k": 2, "epsilon": 0.0})
    again = run(node, "oort_select", {"k": 2, "epsilon": 0.0})
    assert again["result"] == first["result"] and again["s3_gets"] == 0
    assert node.stats()["answers"] == {"computed": 1, "reused": 1}
    other = run(node, "oort_select", {"k": 3, "epsilon": 0.0})  # other params: computed
    assert len(other["result"]["selected"]) == 3
    inc = [run(node, "incentive", {}) for _ in range(2)]
    assert inc[0]["result"] == inc[1]["result"]
    subset = run(node, "incentive", {"clients": ["c1"]})  # other clients: computed
    assert set(subset["result"]["values"]) == {"c1"}
    assert node.stats()["answers"] == {"computed": 4, "reused": 2}


def test_a_new_round_is_never_answered_from_the_memo(store: ObjectStore) -> None:
    for r in range(2):
        commit(store, "j", r)
    node = CacheNode(store, budget_bytes=10**8)
    before = run(node, "reputation", {})["result"]
    planned = run(node, "oort_select", {"k": 2})["result"]["round"]
    assert [p[0] for p in before["series"]["c0"]] == [0, 1] and planned == 2
    commit(store, "j", 2)
    # ingestion's prefetch: the owners of the meta shard load it again
    assert node.handle({"op": "load", "shards": ["j/meta/meta"]})["already"] == ["j/meta/meta"]
    after = run(node, "reputation", {})["result"]
    assert [p[0] for p in after["series"]["c0"]] == [0, 1, 2]
    assert run(node, "oort_select", {"k": 2})["result"]["round"] == 3
    reference = scattered(store, "reputation", {}, CLIENTS, None)
    assert after == reference


def test_a_rewritten_manifest_is_never_answered_from_the_memo(store: ObjectStore) -> None:
    store.put_job_spec(JobSpec("j", late_clients={"within_s": 600}))
    for r in range(2):
        commit(store, "j", r)
    node = CacheNode(store, budget_bytes=10**8)
    before = run(node, "incentive", {"metric": "contribution"})["result"]
    # a late client joins round 1 and its scores are taken again: c0 now contributes nothing
    manifest = store.get_manifest("j", 1)
    summaries = {c: dict(e.summary) for c, e in manifest.updates.items()}
    summaries["c0"]["contribution"] = 0.0
    summaries["late-1"] = {"cos_to_mean": 0.5, "contribution": 1.0}
    store.put_update("j", 1, "late-1", small_update(91))
    store.commit_round("j", 1, summaries=summaries)
    node.handle({"op": "load", "shards": ["j/meta/meta"]})
    after = run(node, "incentive", {"metric": "contribution"})["result"]
    assert after["rounds"]["1"]["c0"] == 0.0 < before["rounds"]["1"]["c0"]
    clients = [*CLIENTS, "late-1"]
    assert after == scattered(store, "incentive", {"metric": "contribution"}, clients, None)
    # without a prefetch, the node's next listing that finds the rewrite refreshes the shard
    summaries["c1"]["contribution"] = 0.0
    summaries["late-2"] = {"cos_to_mean": 0.5, "contribution": 1.0}
    store.put_update("j", 1, "late-2", small_update(92))
    store.commit_round("j", 1, summaries=summaries)
    node.manifests.rounds("j")  # e.g. the listing of a round load on this node
    later = run(node, "incentive", {"metric": "contribution"})["result"]
    assert later["rounds"]["1"]["c1"] == 0.0


def test_the_meta_shard_needs_a_client(store: ObjectStore) -> None:
    store.put_job_spec(JobSpec("j"))
    node = CacheNode(store, budget_bytes=10**8)
    answer = node.handle({"op": "run", "workload": "incentive", "job": "j", "params": {}})
    assert answer["status"] == 404 and "no committed round" in answer["error"]["message"]


def test_inference_is_answered_from_the_memo_until_a_new_global_model(
    store: ObjectStore,
) -> None:
    _, _, x_val, y_val = digits_job.load_split(0)
    store.put_job_spec(JobSpec("j", model=digits_job.MODEL))
    store.put_validation_set("j", x_val[:64], y_val[:64])
    model = models.build(digits_job.MODEL, seed=0)
    state = models.state_arrays(model)
    store.put_global("j", 0, Update(dict(state)))
    node = CacheNode(store, budget_bytes=10**8)
    first = run(node, "inference", {})
    assert first["result"]["round"] == 0
    assert run(node, "inference", {})["result"] == first["result"]
    assert run(node, "inference", {"round": 0})["result"] == first["result"]
    assert node.stats()["answers"] == {"computed": 1, "reused": 2}
    # a new global model: the latest one is answered, computed afresh on its weights
    rng = np.random.default_rng(3)
    moved = {k: (v + rng.standard_normal(v.shape)).astype(v.dtype) for k, v in state.items()}
    store.put_global("j", 1, Update(moved))
    # named by the node's listing, taken again at a load of the model shard (ingestion's
    # prefetch) or REFRESH_S after the last one
    assert run(node, "inference", {})["result"] == first["result"]
    node.handle({"op": "load", "shards": ["j/model/global"]})
    latest = run(node, "inference", {})["result"]
    assert latest["round"] == 1
    want = models.accuracy(
        models.load_vector(models.build(digits_job.MODEL), *_vector(moved)), x_val[:64], y_val[:64]
    )
    assert latest["accuracy"] == pytest.approx(want)
    inputs = x_val[:3].tolist()
    asked = run(node, "inference", {"inputs": inputs})["result"]
    assert (
        asked["predictions"] == run(node, "inference", {"inputs": inputs})["result"]["predictions"]
    )
    assert node.stats()["answers"] == {"computed": 3, "reused": 4}


def _vector(state: dict[str, Any]) -> tuple[Any, Any]:
    from flstore_core.data.rows import flatten

    return flatten(state), tuple(Update(state).specs())


def test_memo_keys_are_canonical_and_failures_keep_nothing() -> None:
    memo = ResultMemo(capacity=2)
    assert ResultMemo.key("w", {"a": 1, "b": [1, 2]}) == ResultMemo.key("w", {"b": [1, 2], "a": 1})
    assert ResultMemo.key("w", {"a": 1}) != ResultMemo.key("v", {"a": 1})

    def boom() -> dict[str, Any]:
        raise ValueError("no")

    with pytest.raises(ValueError):
        memo.answer("k", boom)
    assert len(memo) == 0
    assert memo.answer("k", lambda: {"x": 1}) == ({"x": 1}, False)
    assert memo.answer("k", boom) == ({"x": 1}, True)
    for key in ("k2", "k3"):
        memo.answer(key, lambda: {})
    assert len(memo) == 2  # bounded: the least recently used dropped


def test_the_model_shards_listing_expires(
    store: ObjectStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.put_job_spec(JobSpec("j", model=digits_job.MODEL))
    state = models.state_arrays(models.build(digits_job.MODEL, seed=0))
    store.put_global("j", 0, Update(dict(state)))
    node = CacheNode(store, budget_bytes=10**8)
    assert run(node, "inference", {"inputs": [[[[0.0] * 8] * 8]]})["result"]["round"] == 0
    store.put_global("j", 1, Update(dict(state)))
    clock = [time.monotonic()]
    monkeypatch.setattr("flstore_core.cache.shards.time.monotonic", lambda: clock[0])
    assert run(node, "inference", {"inputs": [[[[0.0] * 8] * 8]]})["result"]["round"] == 0
    clock[0] += REFRESH_S + 1
    assert run(node, "inference", {"inputs": [[[[0.0] * 8] * 8]]})["result"]["round"] == 1


def test_a_round_answer_is_reused_until_the_round_is_read_again(store: ObjectStore) -> None:
    store.put_job_spec(JobSpec("j", late_clients={"within_s": 600}))
    commit(store, "j", 0, CLIENTS[:4])
    node = CacheNode(store, budget_bytes=10**8)
    first = run(node, "kmeans", {"k": 2}, round=0)
    again = run(node, "kmeans", {"k": 2}, round=0)
    assert again["result"] == first["result"] and again["cache"] == "hit"
    assert node.stats()["answers"] == {"computed": 1, "reused": 1}
    run(node, "kmeans", {"k": 3}, round=0)  # other params: computed
    assert node.stats()["answers"] == {"computed": 2, "reused": 1}
    # a late client joins round 0: the prefetch that follows reads the round again, and the
    # answers kept for the old copy go with it
    commit(store, "j", 0, CLIENTS[:5])
    node.handle({"op": "load", "shards": ["j/round/0"]})
    late = run(node, "kmeans", {"k": 2}, round=0)
    assert set(late["result"]["labels"]) == set(CLIENTS[:5])
    assert node.stats()["answers"] == {"computed": 3, "reused": 1}
    # evicted: read again on the next request, computed again
    node.handle({"op": "evict", "shards": ["j/round/0"]})
    assert run(node, "kmeans", {"k": 2}, round=0)["result"] == late["result"]
    assert node.stats()["answers"] == {"computed": 4, "reused": 1}


def test_a_load_of_the_model_shard_reads_and_builds_the_latest_global_model(
    store: ObjectStore,
) -> None:
    """Ingestion's prefetch warms the model shard: the first inference after it reads nothing
    from S3 and answers what a node that loaded the model on demand answers."""
    _, _, x_val, y_val = digits_job.load_split(0)
    store.put_job_spec(JobSpec("j", model=digits_job.MODEL))
    store.put_validation_set("j", x_val[:32], y_val[:32])
    state = models.state_arrays(models.build(digits_job.MODEL, seed=0))
    store.put_global("j", 0, Update(dict(state)))
    rng = np.random.default_rng(5)
    moved = {k: (v + rng.standard_normal(v.shape)).astype(v.dtype) for k, v in state.items()}
    store.put_global("j", 1, Update(moved))
    warmed = CacheNode(store, budget_bytes=10**8)
    loaded = warmed.handle({"op": "load", "shards": ["j/model/global"]})
    assert loaded["loaded"] == ["j/model/global"] and loaded["timing_ms"]["warm"] > 0
    first = run(warmed, "inference", {"inputs": x_val[:4].tolist()})
    assert first["s3_gets"] == 0 and first["result"]["round"] == 1
    cold = run(CacheNode(store, budget_bytes=10**8), "inference", {"inputs": x_val[:4].tolist()})
    assert cold["s3_gets"] > 0 and cold["result"] == first["result"]


def test_a_job_without_a_model_loads_its_model_shard_without_building(store: ObjectStore) -> None:
    store.put_job_spec(JobSpec("j"))
    store.put_global("j", 0, small_update(1))
    node = CacheNode(store, budget_bytes=10**8)
    loaded = node.handle({"op": "load", "shards": ["j/model/global"]})
    assert loaded["loaded"] == ["j/model/global"] and loaded["failed"] == {}
    assert loaded["timing_ms"]["warm"] == 0


def test_a_model_result_written_is_counted_as_a_put_once(store: ObjectStore) -> None:
    """The node's answer counts the PUT of a model result it writes (the router bills it in
    ``meta.cost_usd``); an identical request answered from the memo writes nothing."""
    commit(store, "j", 0, CLIENTS[:4])
    node = CacheNode(store, budget_bytes=10**8)
    first = run(node, "trimmed_mean", {"beta": 0.25}, round=0)
    assert "model_key" in first["result"] and first["s3_puts"] == 1
    assert store.get_object(first["result"]["model_key"])
    again = run(node, "trimmed_mean", {"beta": 0.25}, round=0)
    assert again["result"] == first["result"] and again["s3_puts"] == 0
    assert run(node, "cosine_select", {"k": 2}, round=0)["s3_puts"] == 0  # nothing written
