"""The cache node's wire protocol: every op round-trips the router's event, and every
malformed field is one typed 400 that names the op and the field."""

from __future__ import annotations

from typing import Any

import pytest

from flstore_core.errors import InvalidIdError, ValidationError
from flstore_core.protocol import (
    OPS,
    ArtifactsOp,
    EvictOp,
    LoadOp,
    MalformedEventError,
    ModelPartOp,
    PartialOp,
    PingOp,
    RunClientsOp,
    RunOp,
    StatsOp,
    parse_event,
)

# the events the router builds (flstore_core/routing/router.py), one per form
ROUTER_EVENTS: list[dict[str, Any]] = [
    {"op": "load", "shards": ["j/round/0", "j/meta"], "models": ["j/round/0"]},
    {"op": "load", "shards": ["j/round/0"], "models": []},
    {"op": "artifacts", "compute": {"j/round/0": [1, 2]}},
    {"op": "artifacts", "rounds": {"j/round/0": {"content": "abc", "entries": [["a", "k", 1]]}}},
    {"op": "run", "workload": "fedavg", "job": "j", "params": {}, "round": 3},
    {"op": "run", "workload": "client_drift", "job": "j", "params": {"x": 1}, "rounds": [0, 2]},
    {"op": "run", "workload": "latest_model", "job": "j", "params": {}},
    {
        "op": "partial",
        "job": "j",
        "round": 0,
        "indices": [0, 2],
        "blocks": 4,
        "buffers": False,
    },
    {
        "op": "model_part",
        "job": "j",
        "round": 0,
        "indices": [0],
        "blocks": 2,
        "expr": {"op": "mean"},
        "part_keys": ["results/x.parts/00000"],
        "metadata": {"workload": "fedavg"},
    },
    {
        "op": "model_part",
        "job": "j",
        "round": 0,
        "indices": [1],
        "blocks": 2,
        "expr": {"op": "mean"},
        "part_keys": ["results/x.parts/00001"],
        "metadata": None,
    },
    {
        "op": "run_clients",
        "workload": "krum",
        "job": "j",
        "round": 1,
        "params": {"f": 1},
        "gram": {"g": [1.0]},
        "buffers": None,
        "is_delta": True,
    },
    {
        "op": "run_clients",
        "workload": "accuracy_select",
        "job": "j",
        "round": 1,
        "params": {},
        "gram": {"g": [1.0]},
        "buffers": {"b": [2.0]},
        "is_delta": False,
        "rows": [0, 1],
    },
    {"op": "stage", "job": "j", "round": 1, "client": "c", "tensors_round": 0},
    {"op": "stage", "job": "j", "round": 1, "client": "c", "tensors_round": 0, "etag": "e"},
    {"op": "stats"},
    {"op": "evict", "shards": ["j/round/0"]},
    {"op": "evict", "all": True},
    {"op": "ping"},
]


@pytest.mark.parametrize("event", ROUTER_EVENTS, ids=lambda e: str(e["op"]))
def test_every_router_event_round_trips_exactly(event: dict[str, Any]) -> None:
    op = parse_event(event)
    assert type(op) is OPS[event["op"]]
    assert op.to_event() == event


def test_the_ops_are_listed_in_the_order_the_unknown_op_error_names_them() -> None:
    assert list(OPS) == [
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


def test_typed_ops_build_the_events_the_router_sent_by_hand() -> None:
    assert LoadOp(("a/meta",), ("a/round/0",)).to_event() == {
        "op": "load",
        "shards": ["a/meta"],
        "models": ["a/round/0"],
    }
    assert LoadOp(("a/meta",)).to_event() == {"op": "load", "shards": ["a/meta"]}
    assert ArtifactsOp(compute={"a/round/0": (0, 2)}).to_event() == {
        "op": "artifacts",
        "compute": {"a/round/0": [0, 2]},
    }
    assert RunOp("fedavg", "a", {}, round=0).to_event() == {
        "op": "run",
        "workload": "fedavg",
        "job": "a",
        "params": {},
        "round": 0,
    }
    assert PartialOp("a", 0, (1,), 2, True).to_event()["buffers"] is True
    assert "rows" not in RunClientsOp("krum", "a", 0, {}).to_event()
    assert StatsOp().to_event() == {"op": "stats"}
    assert PingOp().to_event() == {"op": "ping"}
    assert EvictOp(all=True).to_event() == {"op": "evict", "all": True}
    assert EvictOp(("a/meta",)).to_event() == {"op": "evict", "shards": ["a/meta"]}


def test_the_single_block_forms_are_read_as_lists() -> None:
    partial = parse_event({"op": "partial", "job": "j", "round": 0, "block": 1, "blocks": 2})
    assert partial == PartialOp("j", 0, (1,), 2, False)
    part = parse_event(
        {
            "op": "model_part",
            "job": "j",
            "round": 0,
            "block": 1,
            "blocks": 2,
            "expr": {},
            "part_key": "k",
        }
    )
    assert isinstance(part, ModelPartOp) and part.part_keys == ("k",) and part.indices == (1,)


def test_an_empty_client_list_asks_for_every_client() -> None:
    run = parse_event({"op": "run", "workload": "w", "job": "j", "clients": []})
    assert isinstance(run, RunOp) and run.clients is None


# (event, op, field) of every malformed field
MALFORMED: list[tuple[Any, str | None, str | None]] = [
    (["ping"], None, None),
    ({"op": "nope"}, None, "op"),
    ({"shards": []}, None, "op"),
    ({"op": ["run"]}, None, "op"),
    ({"op": "load"}, "load", "shards"),
    ({"op": "load", "shards": "j/round/0"}, "load", "shards"),
    ({"op": "load", "shards": [3]}, "load", "shards"),
    ({"op": "load", "shards": [], "models": "j/round/0"}, "load", "models"),
    ({"op": "artifacts"}, "artifacts", "compute"),
    ({"op": "artifacts", "compute": {"s": [2, 2]}}, "artifacts", "compute"),
    ({"op": "artifacts", "compute": {"s": "all"}}, "artifacts", "compute"),
    ({"op": "artifacts", "compute": {"s": [True, 2]}}, "artifacts", "compute"),
    ({"op": "artifacts", "compute": [["s", 0, 1]]}, "artifacts", "compute"),
    ({"op": "artifacts", "rounds": ["s"]}, "artifacts", "rounds"),
    ({"op": "artifacts", "rounds": {"s": "x"}}, "artifacts", "rounds"),
    ({"op": "run", "workload": 3, "job": "j"}, "run", "workload"),
    ({"op": "run", "workload": "w", "job": "j", "params": [1]}, "run", "params"),
    ({"op": "run", "workload": "w", "job": "j", "rounds": 3}, "run", "rounds"),
    ({"op": "run", "workload": "w", "job": "j", "clients": "c1"}, "run", "clients"),
    ({"op": "partial", "job": "j", "round": 0}, "partial", "indices"),
    ({"op": "partial", "job": "j", "round": 0, "indices": [], "blocks": 2}, "partial", "indices"),
    ({"op": "partial", "job": "j", "round": 0, "block": "1", "blocks": 4}, "partial", "indices"),
    (
        {"op": "partial", "job": "j", "round": 0, "indices": [0], "blocks": True},
        "partial",
        "indices",
    ),
    (
        {"op": "model_part", "job": "j", "round": 0, "block": 1, "blocks": 2, "expr": {}},
        "model_part",
        "part_keys",
    ),
    (
        {"op": "model_part", "job": "j", "round": 0, "block": 1, "blocks": 2, "part_key": "k"},
        "model_part",
        "expr",
    ),
    (
        {"op": "model_part", "job": "j", "round": 0, "block": 0, "blocks": 2, "part_key": 3},
        "model_part",
        "part_keys",
    ),
    (
        {
            "op": "model_part",
            "job": "j",
            "round": 0,
            "block": 0,
            "blocks": 2,
            "expr": {},
            "part_key": "k",
        },
        "model_part",
        "metadata",
    ),
    ({"op": "run_clients", "workload": "w", "job": "j", "round": 0}, "run_clients", "gram"),
    (
        {"op": "run_clients", "workload": "w", "job": "j", "round": 0, "gram": {}, "buffers": 1},
        "run_clients",
        "buffers",
    ),
    (
        {"op": "run_clients", "workload": "w", "job": "j", "round": 0, "gram": {}, "rows": ["0"]},
        "run_clients",
        "rows",
    ),
    (
        {"op": "run_clients", "workload": None, "job": "j", "round": 0, "gram": {}},
        "run_clients",
        "workload",
    ),
    ({"op": "evict", "shards": "j/meta"}, "evict", "shards"),
    ({"op": "artifacts", "compute": {"j/round/0": [0, 2]}, "budget_s": 0}, "artifacts", "budget_s"),
    (
        {"op": "artifacts", "compute": {"j/round/0": [0, 2]}, "budget_s": True},
        "artifacts",
        "budget_s",
    ),
    ({"op": "artifacts", "compute": {"j/round/0": [0, 2, -1]}}, "artifacts", "compute"),
    ({"op": "artifacts", "compute": {"j/round/0": [0, 2, 1, 1]}}, "artifacts", "compute"),
]


def test_an_artifacts_chunk_carries_its_budget_and_where_it_starts() -> None:
    op = ArtifactsOp(compute={"a/round/0": (1, 2, 5)}, budget_s=0.5)
    event = op.to_event()
    assert event == {"op": "artifacts", "compute": {"a/round/0": [1, 2, 5]}, "budget_s": 0.5}
    assert parse_event(event) == op
    assert parse_event({"op": "artifacts", "compute": {"a/round/0": [0, 1]}}) == ArtifactsOp(
        compute={"a/round/0": (0, 1)}
    )


@pytest.mark.parametrize(("event", "op", "field"), MALFORMED)
def test_a_malformed_field_is_one_typed_400_naming_op_and_field(
    event: Any, op: str | None, field: str | None
) -> None:
    with pytest.raises(MalformedEventError) as raised:
        parse_event(event)
    error = raised.value
    assert (error.op, error.field) == (op, field)
    assert error.status == 400 and error.code == "invalid_request"
    assert error.to_dict()["error"]["code"] == "invalid_request"


@pytest.mark.parametrize(
    "event",
    [
        {"op": "run", "workload": "fedavg", "job": "J!", "round": 0},
        {"op": "run", "workload": "fedavg", "job": "j", "round": -1},
        {"op": "partial", "job": "j", "round": "x", "indices": [0], "blocks": 1},
        {"op": "run_clients", "workload": "w", "job": "", "round": 0, "gram": {}},
    ],
)
def test_a_bad_id_keeps_its_own_400_as_the_node_answered_it(event: dict[str, Any]) -> None:
    with pytest.raises(InvalidIdError) as raised:
        parse_event(event)
    assert isinstance(raised.value, ValidationError) and raised.value.status == 400


def test_the_unknown_op_message_lists_the_ops() -> None:
    with pytest.raises(MalformedEventError, match=r"use load, run, .* evict or ping"):
        parse_event({"op": "nope"})
