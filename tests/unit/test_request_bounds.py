"""Trust boundaries: a request's work is bounded before it starts, a node stops what runs past
its deadline, a request that killed a node is not carried to the next one, nested JSON is a
400 wherever it is, and a 5xx tells the caller a code and a request id, not the node's internals.

Each test replays what an attacker did on a local stack:

- ``feddebug`` with ``num_inputs = 10000`` on a 30-client digits round ran 40 s and took both
  nodes it was sent to out of memory (the router carried it to the replica);
  ``contribution_shapley`` with ``eps = 0, tolerance = 0, max_permutations = 100000`` kept a node
  busy long after API Gateway's 29 s.
- A body nested ~1,000 deep overflowed ``json.loads`` (a 500 and a ~345 KB traceback in the
  log), and 500 nested arrays in a param overflowed the recursive item counter.
- A 503's message carried 300 bytes of the node's exception text: its type, message and paths.
"""

from __future__ import annotations

import base64
import io
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from moto import mock_aws

from evaluation.digits_job import simulate
from flstore_core.cache.node import CacheNode
from flstore_core.errors import (
    DeadlineExceededError,
    InvalidParamsError,
    NodeOutOfMemoryError,
    OverLimitError,
    ValidationError,
)
from flstore_core.protocol import ModelPartOp, PartialOp, RunClientsOp, RunOp, StatsOp
from flstore_core.routing.invoker import NodeFailure, NodeInvoker, RequestKilledNode
from flstore_core.storage.object_store import ObjectStore
from flstore_core.workloads import get
from flstore_core.workloads.deadline import check
from lambdas.router import build_app, handle
from tests.fakes import AUTH, InProcessNodes, make_router
from tests.unit.test_router_handler import TOKEN, LambdaContext, http_event

JOB = "digits30"
FEDDEBUG_BOMB = {"round": 0, "params": {"num_inputs": 10_000}}
SHAPLEY_BOMB = {
    "round": 0,
    "params": {"method": "gtg", "eps": 0, "tolerance": 0, "max_permutations": 100_000},
}


@pytest.fixture(scope="module")
def store() -> Iterator[ObjectStore]:
    """A digits job of 30 clients and one round, as the attacker's."""
    with mock_aws():
        st = ObjectStore("request-bounds-tests")
        st.ensure_bucket()
        simulate(st, job=JOB, clients=30, rounds=1, malicious=(), local_epochs=1)
        yield st
        st.close()


def body(value: Any) -> bytes:
    return json.dumps(value).encode()


# ---------------------------------------------------------------- 1a: bounded before it starts


@pytest.mark.parametrize(
    ("name", "request_"), [("feddebug", FEDDEBUG_BOMB), ("contribution_shapley", SHAPLEY_BOMB)]
)
def test_a_request_no_node_can_run_in_time_is_a_400_before_any_invocation(
    store: ObjectStore, name: str, request_: dict[str, Any]
) -> None:
    nodes = InProcessNodes(store, 2)
    router = make_router(store, nodes, nodes=2, replication=2)
    with pytest.raises(OverLimitError) as caught:
        router.run(AUTH, JOB, name, body(request_))
    assert caught.value.status == 400 and caught.value.code == "over_limit"
    assert "estimated" in caught.value.message and "ask for less work" in caught.value.message
    assert nodes.calls == []


def test_feddebug_on_10000_inputs_is_over_a_nodes_memory_as_well_as_the_deadline(
    store: ObjectStore,
) -> None:
    router = make_router(store, InProcessNodes(store, 2), nodes=2, node_memory_mb=2048)
    params = get("feddebug").validate(FEDDEBUG_BOMB["params"])
    with pytest.raises(OverLimitError, match="MiB of working memory"):
        router.bounds.check(get("feddebug"), JOB, 0, params)


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("feddebug", {}),
        ("contribution_shapley", {}),
        ("contribution_shapley", {"max_permutations": 100_000, "tolerance": 0}),
        ("contribution_loo", {}),
        ("fedavg", {}),
    ],
)
def test_the_defaults_and_bounded_params_pass(
    store: ObjectStore, name: str, params: dict[str, Any]
) -> None:
    router = make_router(store, InProcessNodes(store, 2), nodes=2)
    router.bounds.check(get(name), JOB, 0, get(name).validate(params))


# ---------------------------------------------------------------- 1b: the node's deadline


def test_a_node_stops_a_workload_at_its_deadline_and_stays_up(
    store: ObjectStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLSTORE_REQUEST_DEADLINE_S", "1")
    node = CacheNode(store.view(), budget_bytes=10**8)
    event = {"op": "run", "workload": "contribution_shapley", "job": JOB, **SHAPLEY_BOMB}
    t0 = time.perf_counter()
    answer = node.handle(event)
    assert time.perf_counter() - t0 < 15  # the load, one second, one evaluation
    assert answer["status"] == 503 and answer["error"]["code"] == "deadline_exceeded", answer
    assert "deadline" in answer["error"]["message"]
    assert "error" not in node.handle(StatsOp().to_event())
    fedavg = node.handle({"op": "run", "workload": "fedavg", "job": JOB, "round": 0})
    assert "error" not in fedavg, fedavg


@pytest.mark.parametrize("op_type", [RunOp, PartialOp, ModelPartOp, RunClientsOp])
def test_every_op_a_caller_waits_on_runs_under_the_deadline(
    store: ObjectStore, monkeypatch: pytest.MonkeyPatch, op_type: type
) -> None:
    """A block's partial Gram, a model part or a client group (a streamed round's Shapley) is
    stopped at the deadline as a whole-round run is."""
    monkeypatch.setenv("FLSTORE_REQUEST_DEADLINE_S", "1")
    node = CacheNode(store.view(), budget_bytes=10**8)
    op = op_type.__new__(op_type)  # only its type matters to the dispatch
    monkeypatch.setattr("flstore_core.cache.node.parse_event", lambda event: op)

    def long_loop(_: Any) -> dict[str, Any]:
        stop = time.monotonic() + 5
        while time.monotonic() < stop:
            check("a long loop")
            time.sleep(0.01)
        return {"ran": "past its deadline"}

    node.ops[op_type] = long_loop
    answer = node.handle({})
    assert answer["status"] == 503 and answer["error"]["code"] == "deadline_exceeded", answer


# ---------------------------------------------------------------- 1c: not carried to a replica


def _killing(kind: str) -> Any:
    def reply(function: str, event: dict[str, Any]) -> dict[str, Any]:
        raise RequestKilledNode(f"{function}: {kind}", kind)

    return reply


@pytest.mark.parametrize(
    ("kind", "error"),
    [("out_of_memory", NodeOutOfMemoryError), ("timed_out", DeadlineExceededError)],
)
def test_a_request_that_killed_its_node_is_a_503_without_a_retry(
    store: ObjectStore, kind: str, error: type[Exception]
) -> None:
    nodes = InProcessNodes(reply=_killing(kind))
    router = make_router(store, nodes, nodes=3, replication=2)
    with pytest.raises(error) as caught:
        router.run(AUTH, JOB, "fedavg", body({"round": 0}))
    assert getattr(caught.value, "status", None) == 503
    assert len(nodes.calls) == 1  # the replica and the others stay up


def test_a_node_that_died_for_another_reason_is_retried_on_a_replica(store: ObjectStore) -> None:
    answered: list[str] = []

    def first_dies(function: str, event: dict[str, Any]) -> dict[str, Any]:
        if not answered:
            answered.append(function)
            raise NodeFailure(f"{function}: function error")
        return {"result": {"ok": True}, "cache": "hit", "s3_gets": 0}

    nodes = InProcessNodes(reply=first_dies)
    router = make_router(store, nodes, nodes=3, replication=2)
    assert router.run(AUTH, JOB, "fedavg", body({"round": 0}))["result"] == {"ok": True}
    assert len(nodes.calls) == 2


class _LambdaReply:
    """A boto3 Lambda client whose invocations all end in one function error."""

    def __init__(self, payload: dict[str, Any], log: str = "") -> None:
        self.payload = payload
        self.log = log

    def invoke(self, **_: Any) -> dict[str, Any]:
        return {
            "FunctionError": "Unhandled",
            "Payload": io.BytesIO(json.dumps(self.payload).encode()),
            "LogResult": base64.b64encode(self.log.encode()).decode(),
        }


def test_the_invoker_tells_out_of_memory_and_timeouts_from_other_deaths() -> None:
    oom = {"errorType": "Runtime.OutOfMemory", "errorMessage": "signal: killed"}
    timeout = {"errorMessage": "Task timed out after 30.00 seconds"}
    crash = {"errorType": "RuntimeError", "errorMessage": "boom"}
    for payload, kind in ((oom, "out_of_memory"), (timeout, "timed_out")):
        with pytest.raises(RequestKilledNode) as caught:
            NodeInvoker(_LambdaReply(payload)).invoke("fl-cache-0", {})  # type: ignore[arg-type]
        assert caught.value.kind == kind
    with pytest.raises(NodeFailure) as died:
        NodeInvoker(_LambdaReply(crash)).invoke("fl-cache-0", {})  # type: ignore[arg-type]
    assert not isinstance(died.value, RequestKilledNode)
    # only the log tail says so (the runtime had no time to write a payload)
    with pytest.raises(RequestKilledNode):
        NodeInvoker(_LambdaReply({}, "Error: Runtime.OutOfMemory")).invoke("f", {})  # type: ignore[arg-type]


# ---------------------------------------------------------------- 2: nested JSON


def test_a_body_nested_deeper_than_64_is_a_400_wherever_the_nesting_is(store: ObjectStore) -> None:
    router = make_router(store, InProcessNodes(store, 2), nodes=2)
    bodies = [
        b"[" * 100_000,
        b'{"params": {"clients": ' + b"[" * 1_000 + b"]" * 1_000 + b"}}",
        b'{"round": 0, "params": {"clients": ' + b"[" * 70 + b"]" * 70 + b"}}",
    ]
    for raw in bodies:
        with pytest.raises(ValidationError, match=r"nests .* levels deep, more than 64"):
            router.run(AUTH, JOB, "fedavg", raw)
    # brackets inside a string are not nesting
    with pytest.raises(InvalidParamsError):
        router.run(AUTH, JOB, "fedavg", b'{"round": 0, "params": {"x": "' + b"[" * 1_000 + b'"}}')


def test_a_param_nested_500_deep_is_a_400_not_a_recursion_error() -> None:
    nested: list[Any] = []
    for _ in range(5_000):
        nested = [nested]
    with pytest.raises(InvalidParamsError, match="more than 64 levels"):
        get("fedavg").validate({"clients": nested})
    assert get("fedavg").validate({"clients": [["c0"], ["c1"]]})["clients"] == [["c0"], ["c1"]]


def test_deep_json_through_the_handler_is_a_400(store: ObjectStore) -> None:
    router = make_router(store, InProcessNodes(store, 2), nodes=2, tokens={TOKEN: ["*"]})
    app = build_app(lambda: router)
    path = f"/v1/jobs/{JOB}/workloads/fedavg"
    answer = handle(app, http_event("POST", path, b"[" * 10_000), LambdaContext())
    assert answer["statusCode"] == 400
    assert json.loads(answer["body"])["error"]["code"] == "invalid_request"


# ---------------------------------------------------------------- 3: what a 5xx tells the caller


def test_a_503_carries_a_code_a_message_and_a_request_id_not_the_nodes_exception(
    store: ObjectStore, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "Traceback (most recent call last):\n  File \"/opt/venv/lib/site.py\"\nKeyError: 'x'"
    client = _LambdaReply({"errorType": "KeyError", "errorMessage": secret * 100})
    router = make_router(store, InProcessNodes(store, 2), nodes=2, tokens={TOKEN: ["*"]})
    router.invoker = NodeInvoker(client)  # type: ignore[arg-type]
    app = build_app(lambda: router)
    path = f"/v1/jobs/{JOB}/workloads/fedavg"
    answer = handle(app, http_event("POST", path, body({"round": 0})), LambdaContext())
    assert answer["statusCode"] == 503
    error = json.loads(answer["body"])["error"]
    assert error["code"] == "unavailable"
    assert error["request_id"] == LambdaContext.aws_request_id
    assert "no cache node could answer" in error["message"]
    for leaked in ("Traceback", "/opt/venv", "KeyError"):
        assert leaked not in answer["body"]
    node_lines = [r.getMessage() for r in caplog.records if "cache node" in r.getMessage()]
    assert node_lines and all("\n" not in line and len(line) < 2200 for line in node_lines)


def test_an_unexpected_error_is_a_500_with_a_request_id_and_one_log_line(
    store: ObjectStore, caplog: pytest.LogCaptureFixture
) -> None:
    router = make_router(store, InProcessNodes(store, 2), nodes=2, tokens={TOKEN: ["*"]})

    def recurse(*_: Any) -> Any:
        return recurse()

    router.rounds = recurse  # type: ignore[method-assign]
    app = build_app(lambda: router)
    answer = handle(app, http_event("GET", f"/v1/jobs/{JOB}/rounds"), LambdaContext())
    assert answer["statusCode"] == 500
    error = json.loads(answer["body"])["error"]
    assert error["code"] == "internal" and error["request_id"] == LambdaContext.aws_request_id
    logged = [r.getMessage() for r in caplog.records if "RecursionError" in r.getMessage()]
    assert len(logged) == 1 and "\n" not in logged[0] and len(logged[0]) < 4096
    assert not any(r.exc_info for r in caplog.records)  # no traceback
