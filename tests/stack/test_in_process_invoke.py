"""boto3's ``lambda.invoke`` answered in process (lambdas.local_runtime.in_process): the same
answers as over HTTP, only for the endpoint's own URL, and what the local stack's router uses.

tests/stack/test_lambda_endpoint.py runs every Invoke API behaviour over both transports."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from flstore_core.routing.invoker import NodeFailure, NodeInvoker, NodeThrottled
from lambdas.local_runtime.in_process import serve_in_process
from lambdas.local_runtime.instance_pool import FunctionSpec
from lambdas.local_runtime.invocation_outcome import InvocationResult
from lambdas.local_runtime.invoke_errors import InvokeApiError
from lambdas.local_runtime.lambda_endpoint import LocalLambda
from lambdas.local_runtime.stack import LocalStack, StackConfig

ECHO = "fixtures_lambda.echo_handler.echo"


def _client(url: str) -> Any:
    return boto3.client(
        "lambda",
        endpoint_url=url,
        region_name="us-east-1",
        aws_access_key_id="x",
        aws_secret_access_key="x",
        config=Config(retries={"max_attempts": 0}, read_timeout=30, connect_timeout=2),
    )


@pytest.fixture(scope="module")
def endpoint() -> Iterator[LocalLambda]:
    with LocalLambda(
        [FunctionSpec("echo", ECHO)], sys_path=[Path(__file__).resolve().parents[1]]
    ) as lam:
        yield lam


def test_requests_to_another_endpoint_go_over_http(endpoint: LocalLambda) -> None:
    lam = _client(endpoint.url)
    # the handler answers for another origin only: this client's requests are left to HTTP
    other = serve_in_process(_client("http://127.0.0.1:9"), endpoint)
    lam.meta.events.register("before-send.lambda", other)
    answer = lam.invoke(FunctionName="echo", Payload=b'{"k": 1}')
    assert json.loads(answer["Payload"].read())["event"] == {"k": 1}
    assert other.answered == 0
    own = serve_in_process(lam, endpoint)
    lam.invoke(FunctionName="echo", Payload=b'{"k": 2}')
    assert own.answered == 1


@pytest.mark.parametrize("sign", [False, True])
def test_requests_answered_in_process_are_signed_only_when_asked(
    endpoint: LocalLambda, sign: bool
) -> None:
    lam = _client(endpoint.url)
    seen: list[Any] = []
    lam.meta.events.register("before-send.lambda", lambda request, **kw: seen.append(request))
    serve_in_process(lam, endpoint, sign=sign)
    answer = lam.invoke(FunctionName="echo", Payload=b'{"k": 3}')
    assert json.loads(answer["Payload"].read())["event"] == {"k": 3}
    authorization = seen[0].headers.get("Authorization")
    if sign:
        assert authorization is not None and authorization.startswith(b"AWS4-HMAC-SHA256")
    else:
        assert authorization is None


def test_in_process_and_http_answers_agree_for_the_invoker(endpoint: LocalLambda) -> None:
    http = NodeInvoker(_client(endpoint.url))
    local_client = _client(endpoint.url)
    transport = serve_in_process(local_client, endpoint)
    local = NodeInvoker(local_client)
    a, b = http.invoke("echo", {"k": [1, 2]}), local.invoke("echo", {"k": [1, 2]})
    assert transport.answered == 1
    assert a.payload["event"] == b.payload["event"] == {"k": [1, 2]}
    assert a.payload["pid"] == b.payload["pid"]  # the same warm instance
    assert b.payload["calls"] == a.payload["calls"] + 1
    assert b.billed_ms > 0 and b.memory_mb == a.memory_mb  # from the REPORT line of the tail
    for invoker in (http, local):
        with pytest.raises(NodeFailure, match="ResourceNotFoundException"):
            invoker.invoke("no-such-function", {})


class _Backend:
    """An Invoke backend that fails the way a broken or busy service would."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def function_spec(self, name: str) -> FunctionSpec:
        return FunctionSpec(name, ECHO)

    def invoke(self, name: str, payload: bytes = b"") -> InvocationResult:
        raise self.error

    def invoke_event(self, name: str, payload: bytes = b"") -> None:
        raise self.error


def test_a_failing_service_is_a_typed_error_not_a_crash() -> None:
    lam = _client("http://127.0.0.1:9")  # nothing listens there: only the handler answers
    transport = serve_in_process(lam, _Backend(RuntimeError("disk on fire")))
    with pytest.raises(ClientError) as caught:
        lam.invoke(FunctionName="echo", Payload=b"{}")
    assert caught.value.response["Error"]["Code"] == "ServiceException"
    assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == 500
    transport.backend = _Backend(InvokeApiError.throttled())
    with pytest.raises(NodeThrottled):
        NodeInvoker(lam).invoke("echo", {})
    with pytest.raises(ClientError) as caught:  # the Invoke API's own checks run in process too
        lam.invoke(FunctionName="echo", Payload=b"{not json")
    assert caught.value.response["Error"]["Code"] == "InvalidRequestContentException"


def test_the_local_stacks_router_invokes_its_nodes_in_process() -> None:
    config = StackConfig(nodes=1, replication=1, memory_mb=1024)
    with LocalStack(config) as stack:
        assert stack.router is not None and stack.node_transport is not None
        before = stack.node_transport.answered
        answer = stack.router.node_op(0, {"op": "ping"})
        assert (answer["ok"], answer["node"]) == (True, 0)
        assert stack.node_transport.answered == before + 1
    http = StackConfig(nodes=1, replication=1, memory_mb=1024, in_process_invoke=False)
    with LocalStack(http) as stack:
        assert stack.node_transport is None and stack.router is not None
        assert stack.router.node_op(0, {"op": "ping"})["node"] == 0  # over HTTP, as before
