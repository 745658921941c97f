"""The cache node's op table: every op reaches its handler typed, argument errors are answers."""

from __future__ import annotations

from typing import Any

import pytest

from flstore_core import protocol
from flstore_core.cache.node import CacheNode
from flstore_core.storage.object_store import ObjectStore

OPS = [
    "load",
    "run",
    "partial",
    "model_part",
    "run_clients",
    "artifacts",
    "stage",
    "stats",
    "evict",
    "ping",
]
UNKNOWN = "use load, run, partial, model_part, run_clients, artifacts, stage, stats, evict or ping"


@pytest.fixture
def node(store: ObjectStore) -> CacheNode:
    return CacheNode(store, budget_bytes=10**6, node_index=3)


# one well-formed event per op, in the order of OPS
EVENTS: list[dict[str, Any]] = [
    {"op": "load", "shards": []},
    {"op": "run", "workload": "fedavg", "job": "j", "round": 0},
    {"op": "partial", "job": "j", "round": 0, "indices": [0], "blocks": 2},
    {
        "op": "model_part",
        "job": "j",
        "round": 0,
        "indices": [1],
        "blocks": 2,
        "expr": {},
        "part_keys": ["k"],
    },
    {"op": "run_clients", "workload": "krum", "job": "j", "round": 0, "gram": {}},
    {"op": "artifacts", "compute": {}},
    {"op": "stage", "job": "j", "round": 1, "client": "c", "tensors_round": 0},
    {"op": "stats"},
    {"op": "evict", "all": True},
    {"op": "ping", "extra": 1},
]


def test_the_table_holds_exactly_the_ten_ops_in_order(node: CacheNode) -> None:
    assert [cls.op for cls in node.ops] == OPS == list(protocol.OPS)


@pytest.mark.parametrize("event", EVENTS, ids=lambda e: str(e["op"]))
def test_each_op_reaches_its_handler_as_a_typed_op(node: CacheNode, event: dict[str, Any]) -> None:
    called: list[Any] = []
    for cls in node.ops:
        node.ops[cls] = lambda op: called.append(op) or {"op": op.op}
    assert node.handle(event) == {"op": event["op"]}
    assert called == [protocol.parse_event(event)]
    assert type(called[0]) is protocol.OPS[event["op"]]


def test_an_unknown_op_is_a_400_listing_the_ops(node: CacheNode) -> None:
    answer = node.handle({"op": "nope"})
    assert answer["status"] == 400
    assert answer["error"]["message"] == f"unknown op 'nope': {UNKNOWN}"


def test_a_missing_op_is_unknown(node: CacheNode) -> None:
    answer = node.handle({"shards": []})
    assert answer["status"] == 400
    assert answer["error"]["message"] == f"unknown op None: {UNKNOWN}"


def test_an_op_that_is_not_a_string_is_unknown_not_a_crash(node: CacheNode) -> None:
    answer = node.handle({"op": ["run"]})
    assert answer["status"] == 400
    assert answer["error"]["message"] == f"unknown op ['run']: {UNKNOWN}"


def test_an_event_that_is_not_an_object_is_a_400(node: CacheNode) -> None:
    answer = node.handle(["ping"])
    assert answer["status"] == 400
    assert "JSON object" in answer["error"]["message"]


def test_ping_says_which_node_and_counts_invocations(node: CacheNode) -> None:
    node.handle({"op": "nope"})
    assert node.handle({"op": "ping"}) == {"ok": True, "node": 3, "invocations": 2}


def test_stats_answers_the_node_stats(node: CacheNode) -> None:
    stats = node.handle({"op": "stats"})
    assert stats["node"] == 3 and stats["budget_bytes"] == 10**6 and stats["shards"] == []


def test_evict_answers_what_it_dropped(node: CacheNode) -> None:
    assert node.handle({"op": "evict", "all": True}) == {"evicted": []}
    assert node.handle({"op": "evict", "shards": ["j/round/0"]}) == {"evicted": []}


def test_load_of_nothing_loads_nothing(node: CacheNode) -> None:
    assert node.handle({"op": "load", "shards": []}) == {
        "loaded": [],
        "already": [],
        "failed": {},
        "timing_ms": {"load": 0.0, "warm": 0.0},
        "steps_ms": {},
    }


@pytest.mark.parametrize(
    ("event", "message"),
    [
        ({"op": "load"}, "load needs 'shards': a list of shard keys"),
        ({"op": "load", "shards": "j/round/0"}, "load needs 'shards': a list of shard keys"),
        (
            {"op": "load", "shards": [], "models": "j/round/0"},
            "load's 'models' must be a list of shard keys",
        ),
        ({"op": "load", "shards": ["j/nope/0"]}, "bad shard key 'j/nope/0'"),
    ],
)
def test_load_checks_its_arguments(node: CacheNode, event: dict[str, Any], message: str) -> None:
    answer = node.handle(event)
    assert answer["status"] == 400 and answer["error"]["message"].startswith(message)


def test_run_checks_the_workload_and_job(node: CacheNode) -> None:
    unknown_workload = {"op": "run", "workload": "nope", "job": "j", "round": 0}
    bad_job = {"op": "run", "workload": "fedavg", "job": "J!", "round": 0}
    assert node.handle(unknown_workload)["status"] == 404
    assert node.handle(bad_job)["status"] == 400


@pytest.mark.parametrize(
    "event",
    [
        {"op": "partial", "job": "j", "round": 0},
        {"op": "partial", "job": "j", "round": 0, "block": "1", "blocks": 4},
        {"op": "partial", "job": "j", "round": 0, "block": 4, "blocks": 4},
        {"op": "model_part", "job": "j", "round": 0, "block": 0, "blocks": 2, "expr": {}},
        {"op": "model_part", "job": "j", "round": 0, "block": 0, "blocks": 2, "part_key": 3},
        {"op": "run_clients", "workload": "accuracy_select", "job": "j", "round": 0},
        {
            "op": "run_clients",
            "workload": "fedavg",
            "job": "j",
            "round": 0,
            "gram": {},
            "rows": [0],
        },
        {
            "op": "run_clients",
            "workload": "accuracy_select",
            "job": "j",
            "round": 0,
            "gram": {},
            "rows": ["0"],
        },
    ],
)
def test_block_ops_with_bad_arguments_are_400s(node: CacheNode, event: dict[str, Any]) -> None:
    answer = node.handle(event)
    assert answer["status"] == 400, answer


def test_a_primarys_load_keeps_the_default_models_answer_for_the_first_request() -> None:
    from flstore_core.storage.memory import MemoryBlobStore
    from tests.conftest import small_update

    store = ObjectStore("mem", blobs=MemoryBlobStore())
    entries = [store.put_update("j", 0, f"c{i}", small_update(i)) for i in range(3)]
    store.commit_round("j", 0, entries)
    primary = CacheNode(store, budget_bytes=10**8, node_index=0)
    replica = CacheNode(store, budget_bytes=10**8, node_index=1)
    primary.handle({"op": "load", "shards": ["j/round/0"], "models": ["j/round/0"]})
    replica.handle({"op": "load", "shards": ["j/round/0"]})
    puts = store.puts
    run = {"op": "run", "workload": "fedavg", "job": "j", "round": 0, "params": {}}
    answer = primary.handle(run)
    assert answer["cache"] == "hit" and answer["s3_puts"] == 0
    assert primary.answering.counts == {"computed": 0, "reused": 0}  # no request computed it
    assert primary.stats()["answers_prefetched"] == 1  # what prefetch built, not a reuse
    assert primary.handle(run)["result"] == answer["result"]  # then an ordinary reuse
    assert primary.answering.counts == {"computed": 0, "reused": 1}
    # the replica finds the primary's model at the same key: it neither computes nor writes it
    replicated = replica.handle(run)
    assert replicated["result"] == answer["result"] and replicated["s3_puts"] == 0
    assert "write" not in replicated["timing_ms"]
    assert replica.answering.counts == {"computed": 1, "reused": 0}
    assert store.puts == puts
