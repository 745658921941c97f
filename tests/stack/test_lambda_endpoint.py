"""The local Lambda endpoint behaves like AWS Lambda for boto3's real ``lambda`` client."""

from __future__ import annotations

import base64
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config

from lambdas.local_runtime.in_process import serve_in_process
from lambdas.local_runtime.invoke_channel import InvokeChannel, serve_over_channel
from lambdas.local_runtime.lambda_endpoint import FunctionSpec, LocalLambda, function_name_from

FIXTURES = "fixtures_lambda.echo_handler"

Deploy = Callable[..., str]


@pytest.fixture(scope="module")
def endpoint() -> Iterator[LocalLambda]:
    with LocalLambda(sys_path=[Path(__file__).resolve().parents[1]]) as lam:
        yield lam


@pytest.fixture(scope="module", params=["http", "in-process", "channel"])
def client(request: pytest.FixtureRequest, endpoint: LocalLambda) -> Iterator[Any]:
    """boto3's client over HTTP, over the in-process transport the local stack's own router
    uses, and over the invoke channel its router function's instances use: every test of this
    module holds for all three."""
    lam = boto3.client(
        "lambda",
        endpoint_url=endpoint.url,
        region_name="us-east-1",
        aws_access_key_id="x",
        aws_secret_access_key="x",
        config=Config(retries={"max_attempts": 0}, read_timeout=30, max_pool_connections=20),
    )
    if request.param == "http":
        yield lam
        return
    if request.param == "channel":
        channel = InvokeChannel(endpoint).start()
        over_channel = serve_over_channel(lam, channel.path)
        yield lam
        channel.stop()
        assert over_channel.answered > 0  # the module's requests did not go over HTTP
        return
    transport = serve_in_process(lam, endpoint)
    yield lam
    assert transport.answered > 0  # the module's requests did not go over the socket


@pytest.fixture
def deploy(endpoint: LocalLambda) -> Deploy:
    """Deploy a fixture handler under a fresh name, so tests never share instances."""

    def _deploy(handler: str, **options: Any) -> str:
        name = f"{handler}-{uuid.uuid4().hex[:8]}"
        endpoint.add_function(FunctionSpec(name, f"{FIXTURES}.{handler}", **options))
        return name

    return _deploy


def invoke(client: Any, name: str, event: Any = None, **kwargs: Any) -> dict[str, Any]:
    """Invoke synchronously and decode the JSON payload into ``response["body"]``."""
    response = client.invoke(FunctionName=name, Payload=json.dumps(event or {}), **kwargs)
    response["body"] = json.loads(response["Payload"].read())
    return dict(response)


def wait_until_busy(endpoint: LocalLambda, name: str) -> None:
    """Block until an instance of ``name`` is running an invocation (past its cold start)."""
    deadline = time.monotonic() + 5
    while not any(i.state == "busy" for i in endpoint.instances(name)):
        assert time.monotonic() < deadline, "no instance became busy"
        time.sleep(0.01)


def test_warm_instance_keeps_module_state_after_one_cold_start(
    client: Any, endpoint: LocalLambda, deploy: Deploy
) -> None:
    name = deploy("echo")
    first = invoke(client, name, {"k": 1})
    second = invoke(client, name, {"k": 2})
    assert first["StatusCode"] == 200
    assert first["ExecutedVersion"] == "$LATEST"
    assert "FunctionError" not in first
    assert first["body"]["event"] == {"k": 1}
    assert [first["body"]["calls"], second["body"]["calls"]] == [1, 2]
    assert first["body"]["pid"] == second["body"]["pid"]
    assert endpoint.stats()[name] == {
        "invocations": 2,
        "cold_starts": 1,
        "errors": 0,
        "throttles": 0,
    }
    [info] = endpoint.instances(name)
    assert (info.pid, info.state, info.invocations) == (first["body"]["pid"], "idle", 2)


def test_unknown_function_raises_resource_not_found(client: Any) -> None:
    with pytest.raises(client.exceptions.ResourceNotFoundException) as caught:
        client.invoke(FunctionName="no-such-function", Payload=b"{}")
    assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == 404
    assert "Function not found" in caught.value.response["Error"]["Message"]


def test_function_arn_and_qualifier_address_the_function(client: Any, deploy: Deploy) -> None:
    name = deploy("echo")
    arn = f"arn:aws:lambda:us-east-1:123456789012:function:{name}"
    assert invoke(client, arn)["body"]["calls"] == 1
    assert invoke(client, f"{name}:$LATEST")["body"]["calls"] == 2
    assert invoke(client, name, Qualifier="$LATEST")["body"]["calls"] == 3
    assert function_name_from(f"123456789012:function:{name}:prod") == name


def test_handler_exception_is_an_unhandled_function_error(
    client: Any, endpoint: LocalLambda, deploy: Deploy
) -> None:
    name = deploy("boom")
    response = invoke(client, name, {"message": "bad update"})
    assert response["StatusCode"] == 200
    assert response["FunctionError"] == "Unhandled"
    body = response["body"]
    assert (body["errorType"], body["errorMessage"]) == ("ValueError", "bad update")
    assert any("echo_handler.py" in line for line in body["stackTrace"])
    assert endpoint.stats()[name]["errors"] == 1


def test_call_beyond_reserved_concurrency_is_throttled(
    client: Any, endpoint: LocalLambda, deploy: Deploy
) -> None:
    name = deploy("sleep", reserved_concurrency=1)
    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(invoke, client, name, {"s": 1.0})
        wait_until_busy(endpoint, name)
        with pytest.raises(client.exceptions.TooManyRequestsException) as caught:
            invoke(client, name, {"s": 0})
        assert slow.result()["body"]["slept"] == 1.0
    error = caught.value.response
    assert error["ResponseMetadata"]["HTTPStatusCode"] == 429
    assert error["Reason"] == "ReservedFunctionConcurrentInvocationLimitExceeded"
    assert endpoint.stats()[name]["throttles"] == 1


def test_concurrent_calls_run_on_separate_instances(client: Any, deploy: Deploy) -> None:
    name = deploy("sleep", reserved_concurrency=2)
    barrier = threading.Barrier(2)

    def call(_: int) -> int:
        barrier.wait()
        return int(invoke(client, name, {"s": 0.5})["body"]["pid"])

    with ThreadPoolExecutor(2) as pool:
        pids = set(pool.map(call, range(2)))
    assert len(pids) == 2  # two instances exist only if both calls ran at once


def test_idle_instance_is_reclaimed_after_idle_timeout(
    client: Any, endpoint: LocalLambda, deploy: Deploy
) -> None:
    name = deploy("echo", idle_timeout_s=0.5)
    before = invoke(client, name)["body"]
    deadline = time.monotonic() + 5
    while endpoint.instances(name) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert endpoint.instances(name) == []
    after = invoke(client, name)["body"]
    assert after["pid"] != before["pid"]
    assert after["calls"] == 1
    assert endpoint.stats()[name]["cold_starts"] == 2


def test_invocation_past_timeout_is_killed_and_next_call_is_fresh(
    client: Any, endpoint: LocalLambda, deploy: Deploy
) -> None:
    name = deploy("sleep", timeout_s=0.5)
    first_pid = invoke(client, name, {"s": 0})["body"]["pid"]
    timed_out = invoke(client, name, {"s": 5})
    assert timed_out["FunctionError"] == "Unhandled"
    assert timed_out["body"]["errorType"] == "Sandbox.Timedout"
    assert timed_out["body"]["errorMessage"] == "Task timed out after 0.50 seconds"
    after = invoke(client, name, {"s": 0})
    assert "FunctionError" not in after
    assert after["body"]["pid"] != first_pid


def test_memory_over_limit_is_killed_as_out_of_memory(client: Any, deploy: Deploy) -> None:
    name = deploy("hog", memory_mb=200)
    hogged = invoke(client, name, {"mb": 400})
    assert hogged["FunctionError"] == "Unhandled"
    assert hogged["body"]["errorType"] == "Runtime.OutOfMemory"
    small = invoke(client, name, {"mb": 1})
    assert "FunctionError" not in small
    assert small["body"]["pid"] != hogged["body"].get("pid")


def test_killed_instance_cold_starts_on_next_call(
    client: Any, endpoint: LocalLambda, deploy: Deploy
) -> None:
    name = deploy("echo")
    before = invoke(client, name, {"n": 1})["body"]
    endpoint.kill_instances(name)
    after = invoke(client, name, {"n": 2})["body"]
    assert after["pid"] != before["pid"]
    assert (after["calls"], after["event"]) == (1, {"n": 2})
    assert endpoint.stats()[name]["cold_starts"] == 2


def test_instance_killed_mid_invocation_is_a_runtime_exit_error(
    client: Any, endpoint: LocalLambda, deploy: Deploy
) -> None:
    name = deploy("sleep")
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(invoke, client, name, {"s": 5})
        wait_until_busy(endpoint, name)
        endpoint.kill_instances(name)
        response = running.result(timeout=5)
    assert response["FunctionError"] == "Unhandled"
    assert response["body"]["errorType"] == "Runtime.ExitError"
    assert "signal: killed" in response["body"]["errorMessage"]
    assert "FunctionError" not in invoke(client, name, {"s": 0})


def test_event_invocation_is_accepted_with_202_and_runs(
    client: Any, endpoint: LocalLambda, deploy: Deploy
) -> None:
    name = deploy("echo")
    response = client.invoke(FunctionName=name, InvocationType="Event", Payload=b'{"a": 1}')
    assert response["StatusCode"] == 202
    deadline = time.monotonic() + 5
    while not endpoint.instances(name) or endpoint.instances(name)[0].invocations < 1:
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_dry_run_returns_204_without_running(
    client: Any, endpoint: LocalLambda, deploy: Deploy
) -> None:
    name = deploy("echo")
    assert client.invoke(FunctionName=name, InvocationType="DryRun")["StatusCode"] == 204
    assert endpoint.instances(name) == []


def test_request_over_6_mb_is_rejected(client: Any, deploy: Deploy) -> None:
    name = deploy("echo")
    with pytest.raises(client.exceptions.RequestTooLargeException):
        client.invoke(FunctionName=name, Payload=json.dumps("x" * (6 * 1024 * 1024)))


def test_response_over_6_mb_is_a_function_error(client: Any, deploy: Deploy) -> None:
    name = deploy("big")
    response = invoke(client, name, {"bytes": 6 * 1024 * 1024 + 1})
    assert response["FunctionError"] == "Unhandled"
    assert response["body"]["errorType"] == "Function.ResponseSizeTooLarge"


def test_billing_headers_and_log_tail_report_the_invocation(client: Any, deploy: Deploy) -> None:
    name = deploy("echo", memory_mb=256)
    response = client.invoke(FunctionName=name, Payload=b"{}", LogType="Tail")
    headers = response["ResponseMetadata"]["HTTPHeaders"]
    assert int(headers["x-flstore-billed-duration-ms"]) >= 1
    assert 0 < int(headers["x-flstore-max-memory-mb"]) <= 256
    tail = base64.b64decode(response["LogResult"]).decode()
    assert "echo call 1" in tail
    assert "Memory Size: 256 MB" in tail
    assert "Init Duration:" in tail
    assert f"Billed Duration: {headers['x-flstore-billed-duration-ms']} ms" in tail


def test_handler_sees_lambda_context_and_environment(client: Any, deploy: Deploy) -> None:
    name = deploy("describe", memory_mb=512, timeout_s=10, environment={"FLSTORE_ROLE": "cache"})
    keys = ["FLSTORE_ROLE", "AWS_LAMBDA_FUNCTION_NAME", "AWS_REGION"]
    body = invoke(client, name, {"env": keys})["body"]
    assert body["function_name"] == name
    assert body["memory_limit_in_mb"] == "512"
    assert body["invoked_function_arn"].endswith(f":function:{name}")
    assert body["function_version"] == "$LATEST"
    assert body["log_group_name"] == f"/aws/lambda/{name}"
    assert 0 < body["remaining_ms"] <= 10_000
    assert body["env"] == {
        "FLSTORE_ROLE": "cache",
        "AWS_LAMBDA_FUNCTION_NAME": name,
        "AWS_REGION": "us-east-1",
    }


def test_handler_that_cannot_be_imported_is_an_import_module_error(
    client: Any, endpoint: LocalLambda
) -> None:
    name = f"missing-{uuid.uuid4().hex[:8]}"
    endpoint.add_function(FunctionSpec(name, "no_such_module.handler"))
    response = invoke(client, name)
    assert response["FunctionError"] == "Unhandled"
    assert response["body"]["errorType"] == "Runtime.ImportModuleError"
    assert endpoint.instances(name) == []


def test_most_recently_used_warm_instance_is_preferred(
    client: Any, endpoint: LocalLambda, deploy: Deploy
) -> None:
    name = deploy("sleep", reserved_concurrency=2)
    barrier = threading.Barrier(2)

    def call(_: int) -> int:
        barrier.wait()
        return int(invoke(client, name, {"s": 0.3})["body"]["pid"])

    with ThreadPoolExecutor(2) as pool:
        pids = set(pool.map(call, range(2)))
    assert len(pids) == 2
    last = invoke(client, name, {"s": 0})["body"]["pid"]
    for _ in range(3):
        assert invoke(client, name, {"s": 0})["body"]["pid"] == last
