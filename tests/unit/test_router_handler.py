"""The router handler answers every refusal with its typed 4xx, and a 503 when no node can answer.

The Powertools app is called with plain HTTP API v2 proxy event dicts, the way API Gateway calls
it; S3 is moto in process and the cache nodes are a fake invoker with canned answers, so no
stack, no subprocess and no network is involved. ``tests/stack/test_api.py`` keeps what needs real
nodes behind the real gateway.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import pytest
from aws_lambda_powertools.event_handler import APIGatewayHttpResolver
from moto import mock_aws

from flstore_core.data.manifest import JobSpec
from flstore_core.routing.invoker import NodeFailure
from flstore_core.routing.placement import node_name, rank_nodes, round_shard
from flstore_core.routing.request_body import MAX_BODY_BYTES
from flstore_core.storage.object_store import ObjectStore
from flstore_core.workloads import get as get_workload
from lambdas.router import build_app, handle
from tests.fakes import InProcessNodes, make_router

TOKEN = "fls_every-job"
OTHER_TOKEN = "fls_other-job-only"
NODES = 3
CANNED_RESULT = {"selected": ["c0", "c2"], "scores": {"c0": 0.9, "c1": 0.1, "c2": 0.8}}


@dataclass(frozen=True)
class LambdaContext:
    """The attributes of a Lambda context that Powertools reads."""

    function_name: str = "flstore-router"
    memory_limit_in_mb: int = 512
    invoked_function_arn: str = "arn:aws:lambda:us-east-1:123456789012:function:flstore-router"
    aws_request_id: str = "00000000-0000-0000-0000-000000000000"


def cache_hit(function: str, event: Mapping[str, Any]) -> dict[str, Any]:
    return {"result": CANNED_RESULT, "cache": "hit", "s3_gets": 0, "timing_ms": {"run": 1.0}}


def every_node_down(function: str, event: Mapping[str, Any]) -> dict[str, Any]:
    raise NodeFailure(f"{function}: Unhandled")


def http_event(
    method: str,
    path: str,
    body: bytes | None = None,
    token: str | None = TOKEN,
    *,
    authorization: str | None = None,
) -> dict[str, Any]:
    """An HTTP API payload-2.0 proxy event, as API Gateway hands it to the router."""
    headers = {"content-type": "application/json", "host": "api.example.com"}
    if authorization is not None:
        headers["authorization"] = authorization
    elif token is not None:
        headers["authorization"] = f"Bearer {token}"
    event: dict[str, Any] = {
        "version": "2.0",
        "routeKey": "$default",
        "rawPath": path,
        "rawQueryString": "",
        "headers": headers,
        "requestContext": {
            "accountId": "123456789012",
            "apiId": "api",
            "domainName": "api.example.com",
            "domainPrefix": "api",
            "http": {
                "method": method,
                "path": path,
                "protocol": "HTTP/1.1",
                "sourceIp": "192.0.2.1",
                "userAgent": "pytest",
            },
            "requestId": "req",
            "routeKey": "$default",
            "stage": "$default",
            "time": "27/Nov/2026:12:00:00 +0000",
            "timeEpoch": 1_795_780_800_000,
        },
        "isBase64Encoded": False,
    }
    if body is not None:
        event["body"] = body.decode()
    return event


@pytest.fixture(scope="module")
def store() -> Iterator[ObjectStore]:
    """An object store on moto's in-process S3 holding one declared job, ``demo``."""
    with mock_aws():
        st = ObjectStore("router-handler-tests")
        st.ensure_bucket()
        st.put_job_spec(JobSpec(job="demo"))
        yield st
        st.close()


Call = Callable[..., tuple[int, dict[str, Any]]]


def router_call(store: ObjectStore, nodes: InProcessNodes) -> Call:
    """Build the Powertools app over a router on ``store`` and ``nodes``; return a caller."""
    router = make_router(
        store,
        nodes,
        tokens={TOKEN: ["*"], OTHER_TOKEN: ["other"]},
        prefix="flstore",
        nodes=NODES,
        replication=2,
        throttle_passes=1,
    )
    app: APIGatewayHttpResolver = build_app(lambda: router)

    def call(method: str, path: str, body: Any = None, **kw: Any) -> tuple[int, dict[str, Any]]:
        raw = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        answer = handle(app, http_event(method, path, raw, **kw), LambdaContext())
        assert answer["headers"]["Content-Type"] == "application/json"
        return int(answer["statusCode"]), json.loads(answer["body"])

    return call


@pytest.fixture
def nodes() -> InProcessNodes:
    return InProcessNodes(reply=cache_hit, billed_ms=12.0, memory_mb=1024)


@pytest.fixture
def call(store: ObjectStore, nodes: InProcessNodes) -> Call:
    return router_call(store, nodes)


def run_path(job: str, name: str) -> str:
    return f"/v1/jobs/{job}/workloads/{name}"


def assert_error(status: int, body: dict[str, Any], expected: int, code: str | None = None) -> None:
    assert status == expected, body
    # a 5xx also names the request id under which the router logged the details
    fields = {"code", "message", "request_id"} if status >= 500 else {"code", "message"}
    assert set(body) == {"error"} and set(body["error"]) == fields
    assert body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code


# ------------------------------------------------------------------ 200


def test_result_and_meta_come_from_the_node_that_answered(
    call: Call, nodes: InProcessNodes
) -> None:
    status, body = call("POST", run_path("demo", "cosine_select"), {"round": 1, "params": {"k": 2}})
    assert status == 200, body
    assert (body["job"], body["workload"], body["round"]) == ("demo", "cosine_select", 1)
    assert body["result"] == CANNED_RESULT
    primary = node_name("flstore", rank_nodes(str(round_shard("demo", 1)), NODES)[0])
    assert body["meta"]["nodes"] == [primary] and body["meta"]["cache"] == "hit"
    assert body["meta"]["s3_gets"] == 0 and body["meta"]["cost_usd"] > 0
    [(function, event)] = nodes.calls
    assert function == primary
    assert event == {
        "op": "run",
        "workload": "cosine_select",
        "job": "demo",
        "round": 1,
        "params": get_workload("cosine_select").validate({"k": 2}),
    }


# ------------------------------------------------------------------ 401 and 403


def test_no_token_is_401(call: Call, nodes: InProcessNodes) -> None:
    assert_error(
        *call("POST", run_path("demo", "fedavg"), {"round": 0}, token=None), 401, "unauthorized"
    )
    assert_error(*call("GET", "/v1/workloads", token=None), 401, "unauthorized")
    assert_error(*call("GET", "/v1/jobs/demo/rounds", token=None), 401, "unauthorized")
    assert nodes.calls == []


def test_unknown_token_is_401(call: Call, nodes: InProcessNodes) -> None:
    status, body = call("POST", run_path("demo", "fedavg"), {"round": 0}, token="fls_nope")
    assert_error(status, body, 401, "unauthorized")
    assert_error(*call("GET", "/v1/workloads", token="fls_nope"), 401, "unauthorized")
    assert nodes.calls == []


@pytest.mark.parametrize("header", [TOKEN, f"Token {TOKEN}", "Bearer", "Bearer   "])
def test_malformed_authorization_header_is_401(call: Call, header: str) -> None:
    status, body = call("POST", run_path("demo", "fedavg"), {"round": 0}, authorization=header)
    assert_error(status, body, 401, "unauthorized")


def test_token_of_another_job_is_403(call: Call, nodes: InProcessNodes) -> None:
    status, body = call("POST", run_path("demo", "fedavg"), {"round": 0}, token=OTHER_TOKEN)
    assert_error(status, body, 403, "forbidden")
    assert "demo" in body["error"]["message"]
    assert_error(*call("GET", "/v1/jobs/demo/rounds", token=OTHER_TOKEN), 403, "forbidden")
    assert nodes.calls == []


# ------------------------------------------------------------------ 400


@pytest.mark.parametrize(
    ("name", "raw"),
    [
        pytest.param("fedavg", b"{not json", id="malformed-json"),
        pytest.param("fedavg", b"[1, 2]", id="array-body"),
        pytest.param("fedavg", b'"round"', id="string-body"),
        pytest.param("fedavg", b'{"round": 0, "extra": 1}', id="unknown-field"),
        pytest.param("fedavg", b'{"round": -1}', id="negative-round"),
        pytest.param("fedavg", b'{"round": "0"}', id="string-round"),
        pytest.param("fedavg", b'{"round": 1.5}', id="fractional-round"),
        pytest.param("fedavg", b"{}", id="missing-round"),
        pytest.param("cosine_select", b'{"round": 0, "params": {"k": "3"}}', id="param-type"),
        pytest.param("cosine_select", b'{"round": 0, "params": {"k": 0}}', id="param-minimum"),
        pytest.param("cosine_select", b'{"round": 0, "params": {"bogus": 1}}', id="unknown-param"),
        pytest.param("cosine_select", b'{"round": 0, "params": [1]}', id="params-not-object"),
        pytest.param("reputation", b'{"rounds": 0}', id="rounds-not-a-list"),
    ],
)
def test_bad_body_is_400(call: Call, nodes: InProcessNodes, name: str, raw: bytes) -> None:
    assert_error(*call("POST", run_path("demo", name), raw), 400)
    assert nodes.calls == []


def test_round_for_a_class_that_spans_rounds_names_rounds(call: Call) -> None:
    status, body = call("POST", run_path("demo", "reputation"), {"round": 0})
    assert_error(status, body, 400)
    assert "rounds" in body["error"]["message"]


@pytest.mark.parametrize("job", ["Bad_Job", "-demo", "a" * 200])
def test_bad_job_id_is_400(call: Call, nodes: InProcessNodes, job: str) -> None:
    assert_error(*call("POST", run_path(job, "fedavg"), {"round": 0}), 400)
    assert_error(*call("GET", f"/v1/jobs/{job}/rounds"), 400)
    assert nodes.calls == []


# ------------------------------------------------------------------ 404


def test_unknown_workload_is_404(call: Call, nodes: InProcessNodes) -> None:
    assert_error(*call("POST", run_path("demo", "nope"), {"round": 0}), 404, "not_found")
    assert nodes.calls == []


def test_unknown_job_is_404(call: Call, nodes: InProcessNodes) -> None:
    assert_error(*call("POST", run_path("nojob", "fedavg"), {"round": 0}), 404, "not_found")
    assert_error(*call("GET", "/v1/jobs/nojob/rounds"), 404, "not_found")
    assert nodes.calls == []


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/v1/nothing"), ("GET", "/"), ("GET", run_path("demo", "fedavg"))],
)
def test_unknown_route_is_404_not_500(call: Call, method: str, path: str) -> None:
    assert_error(*call(method, path), 404, "not_found")


# ------------------------------------------------------------------ 413


def test_oversized_body_is_413(call: Call, nodes: InProcessNodes) -> None:
    raw = json.dumps({"round": 0, "params": {"pad": "x" * 400_000}}).encode()
    assert len(raw) > MAX_BODY_BYTES
    assert_error(*call("POST", run_path("demo", "fedavg"), raw), 413, "payload_too_large")
    assert nodes.calls == []


def test_body_just_over_the_limit_is_413(call: Call) -> None:
    raw = b'{"round": 0, "params": {"pad": "' + b"x" * MAX_BODY_BYTES + b'"}}'
    assert_error(*call("POST", run_path("demo", "fedavg"), raw), 413, "payload_too_large")


# ------------------------------------------------------------------ 503 and node errors


def test_every_node_failing_is_503_after_trying_each(store: ObjectStore) -> None:
    nodes = InProcessNodes(reply=every_node_down, billed_ms=12.0, memory_mb=1024)
    status, body = router_call(store, nodes)("POST", run_path("demo", "fedavg"), {"round": 0})
    assert_error(status, body, 503, "unavailable")
    tried = [function for function, _ in nodes.calls]
    assert sorted(tried) == [node_name("flstore", i) for i in range(NODES)]
    assert tried[0] == node_name("flstore", rank_nodes(str(round_shard("demo", 0)), NODES)[0])


def test_a_failed_node_is_skipped_for_the_next(store: ObjectStore) -> None:
    first = node_name("flstore", rank_nodes(str(round_shard("demo", 0)), NODES)[0])

    def first_down(function: str, event: Mapping[str, Any]) -> dict[str, Any]:
        if function == first:
            raise NodeFailure(f"{function}: Unhandled")
        return cache_hit(function, event)

    nodes = InProcessNodes(reply=first_down, billed_ms=12.0, memory_mb=1024)
    status, body = router_call(store, nodes)("POST", run_path("demo", "fedavg"), {"round": 0})
    assert status == 200, body
    assert body["result"] == CANNED_RESULT
    assert body["meta"]["nodes"][0] == first and len(body["meta"]["nodes"]) == 2


def test_a_typed_error_from_a_node_keeps_its_status(store: ObjectStore) -> None:
    def no_such_round(function: str, event: Mapping[str, Any]) -> dict[str, Any]:
        message = f"round {event['round']} of job 'demo' is not committed"
        return {"error": {"code": "not_found", "message": message}, "status": 404}

    nodes = InProcessNodes(reply=no_such_round, billed_ms=12.0, memory_mb=1024)
    status, body = router_call(store, nodes)("POST", run_path("demo", "fedavg"), {"round": 42})
    assert_error(status, body, 404, "not_found")
    assert len(nodes.calls) == 1  # a caller's error is final, not a reason to try another node
