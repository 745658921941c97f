"""The network model at the local stack's hops, without a stack: each function's interface, the
paced Invoke API, the gateway's own hop and its invocations, ``local up --network``."""

from __future__ import annotations

import signal
import time
import types
import urllib.error
import urllib.request
from typing import Any, ClassVar

import pytest
from typer.testing import CliRunner

from flstore_core.cli import app
from lambdas.local_runtime.function_network import FunctionNetwork, PacedInvokes
from lambdas.local_runtime.gateway import LocalGateway
from lambdas.local_runtime.instance_pool import FunctionSpec
from lambdas.local_runtime.invocation_outcome import InvocationResult
from lambdas.local_runtime.invoke_errors import InvokeApiError
from lambdas.local_runtime.network import NetworkModel, load_network
from lambdas.local_runtime.stack import StackConfig

# far above a loopback request's noise, small enough to keep the tests quick
MODEL = load_network({"api_gateway_ms": 40, "lambda_invoke_ms": 30, "s3_get_ms": 50})
assert MODEL is not None


class _Backend:
    """An Invoke backend answering at once: ``answer`` bytes, or raising ``error``."""

    def __init__(self, answer: bytes = b"{}", error: InvokeApiError | None = None) -> None:
        self.answer = answer
        self.error = error
        self.events: list[str] = []

    def function_spec(self, name: str) -> FunctionSpec:
        return FunctionSpec(name, "mod.handler")

    def invoke(self, name: str, payload: bytes = b"") -> InvocationResult:
        if self.error is not None:
            raise self.error
        return InvocationResult(self.answer, None, "rid", 1.0, 1, 128, None, "")

    def invoke_event(self, name: str, payload: bytes = b"") -> None:
        self.events.append(name)


def _timed(fn: Any, *args: Any) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def test_each_function_keeps_one_interface_for_the_stacks_life() -> None:
    net = FunctionNetwork(MODEL)
    assert net.nic("flstore-cache-0") is net.nic("flstore-cache-0")
    assert net.nic("flstore-cache-0") is not net.nic("flstore-cache-1")


def test_an_invocation_pays_the_round_trip_and_its_bytes_through_the_callees_interface() -> None:
    net = FunctionNetwork(load_network({"lambda_invoke_ms": 30, "lambda_burst_mib": 0}))  # type: ignore[arg-type]
    small = net.invoke_delay_s("a", 100)
    assert 0.030 <= small < 0.031
    # 75 MiB/s sustained (burst spent): 7.5 MiB more take 0.1 s on a's interface...
    assert net.invoke_delay_s("a", int(7.5 * 1024 * 1024)) == pytest.approx(0.130, abs=0.005)
    # ...and another function's interface is not queued behind a's transfer
    assert net.invoke_delay_s("b", 100) < 0.031


def test_paced_invokes_wait_after_the_answer_throttles_and_events_too() -> None:
    paced = PacedInvokes(_Backend(), FunctionNetwork(MODEL))
    assert paced.function_spec("f").name == "f"
    assert _timed(paced.invoke, "f", b"{}") >= 0.030
    assert _timed(paced.invoke_event, "f", b"{}") >= 0.030
    assert paced.backend.events == ["f"]  # type: ignore[attr-defined]
    throttled = PacedInvokes(_Backend(error=InvokeApiError.throttled()), FunctionNetwork(MODEL))
    t0 = time.perf_counter()
    with pytest.raises(InvokeApiError):
        throttled.invoke("f", b"{}")
    assert time.perf_counter() - t0 >= 0.030


def _get(url: str, token: str | None = None) -> float:
    request = urllib.request.Request(url, headers={"Authorization": token} if token else {})
    t0 = time.perf_counter()
    with urllib.request.urlopen(request, timeout=10) as resp:
        resp.read()
    return time.perf_counter() - t0


def _ok(event: dict[str, Any], ctx: Any) -> dict[str, Any]:
    return {"statusCode": 200, "body": "{}"}


def _allow(event: dict[str, Any], ctx: Any) -> dict[str, Any]:
    return {"isAuthorized": True}


def test_the_gateway_pays_its_own_hop_and_its_invocations() -> None:
    with LocalGateway(_ok) as plain:
        floor = min(_get(f"{plain.url}/v1/health") for _ in range(3))
    assert floor < 0.040  # the local path alone is far below the modelled hops
    with LocalGateway(_ok, authorizer=_allow, network=MODEL) as gw:
        health = min(_get(f"{gw.url}/v1/health") for _ in range(3))
        assert health >= 0.040 + 0.030  # API Gateway, then its invocation of the router
        first = _get(f"{gw.url}/v1/workloads", "Bearer t")  # the authorizer is invoked too
        cached = _get(f"{gw.url}/v1/workloads", "Bearer t")  # its answer is cached
    assert first >= 0.040 + 2 * 0.030
    assert 0.040 + 0.030 <= cached < first


def test_a_refused_request_pays_only_api_gateways_hop() -> None:
    with LocalGateway(_ok, authorizer=_allow, network=MODEL) as gw:
        with pytest.raises(urllib.error.HTTPError) as refused:
            _get(f"{gw.url}/v1/workloads")  # no token: 401 before any function runs
        assert refused.value.code == 401
        t0 = time.perf_counter()
        with pytest.raises(urllib.error.HTTPError):
            _get(f"{gw.url}/v1/workloads")
        assert 0.040 <= time.perf_counter() - t0 < 0.040 + 0.030


def test_local_up_refuses_a_network_model_it_cannot_read(tmp_path: Any) -> None:
    bad = tmp_path / "net.json"
    bad.write_text('{"api_gateway_ms": 10, "warp_drive": 1}')
    result = CliRunner().invoke(app, ["local", "up", "--network", str(bad)])
    assert result.exit_code == 2
    assert "warp_drive" in result.output
    result = CliRunner().invoke(app, ["local", "up", "--network", str(tmp_path / "missing")])
    assert result.exit_code == 2


class _RecordingStack:
    """Stands in for LocalStack in ``local up``: records its config, starts nothing."""

    configs: ClassVar[list[StackConfig]] = []

    def __init__(self, cfg: StackConfig, workdir: Any = None) -> None:
        _RecordingStack.configs.append(cfg)
        self.gateway_url = self.lambda_endpoint = self.s3_endpoint = self.token = "-"
        self.data_dir = None

    def __enter__(self) -> _RecordingStack:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def test_local_up_passes_the_network_model_to_the_stack_and_prints_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    import flstore_core.cli.local as cli_local
    import lambdas.local_runtime.stack as stack_module

    def interrupt(_: float) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(stack_module, "LocalStack", _RecordingStack)
    monkeypatch.setattr(cli_local, "time", types.SimpleNamespace(sleep=interrupt))
    monkeypatch.setattr(signal, "signal", lambda *a: None)  # keep pytest's SIGTERM handler
    monkeypatch.chdir(tmp_path)
    override = tmp_path / "net.json"
    override.write_text('{"s3_get_ms": 5}')
    _RecordingStack.configs = []
    outputs = []
    for flag in ([], ["--network", "aws"], ["--network", str(override)]):
        result = CliRunner().invoke(app, ["local", "up", *flag])
        assert result.exit_code == 0, result.output
        outputs.append(result.output)
    models = [c.network for c in _RecordingStack.configs]
    assert models[0] is None and "network   none" in outputs[0]
    assert models[1] == NetworkModel() and "network   aws" in outputs[1]
    assert models[2] is not None and models[2].s3_get_ms == 5 and models[2].s3_put_ms == 40
    assert "network   custom" in outputs[2]
