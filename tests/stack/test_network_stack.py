"""The network model on a running local stack: the gateway's hop, its invocation of the router
and the router's of a node, each function's S3 through a paced proxy of its own."""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest

from flstore_core import config
from lambdas.local_runtime.network import load_network
from lambdas.local_runtime.router_function import function_name
from lambdas.local_runtime.s3_server import LocalS3
from lambdas.local_runtime.stack import LocalStack, StackConfig
from tests.conftest import small_update

# far above a loopback request's noise, so the test needs few requests
MODEL = load_network({"api_gateway_ms": 40, "lambda_invoke_ms": 30, "s3_get_ms": 50})
JOB = "net"


def _stack(s3: LocalS3, bucket: str, network: Any) -> LocalStack:
    cfg = StackConfig(
        nodes=1, replication=1, memory_mb=1024, bucket=bucket, s3_endpoint=s3.url, network=network
    )
    stack = LocalStack(cfg).start()
    assert stack.store is not None
    for i in range(4):
        stack.store.put_update(JOB, 0, f"c{i}", small_update(i))
    stack.store.commit_round(JOB, 0)
    return stack


@pytest.fixture(scope="module")
def plain(s3_server: LocalS3) -> Iterator[LocalStack]:
    stack = _stack(s3_server, "net-plain", None)
    yield stack
    stack.stop()


@pytest.fixture(scope="module")
def modelled(s3_server: LocalS3) -> Iterator[LocalStack]:
    stack = _stack(s3_server, "net-modelled", MODEL)
    yield stack
    stack.stop()


def cosine(stack: LocalStack) -> tuple[float, dict[str, Any]]:
    """Seconds a client waits for ``cosine_select`` on the round, and the answer."""
    url = urlsplit(stack.gateway_url)
    conn = http.client.HTTPConnection(url.hostname or "", url.port, timeout=120)
    body = json.dumps({"round": 0}).encode()
    headers = {"Authorization": f"Bearer {stack.token}", "Content-Type": "application/json"}
    t0 = time.perf_counter()
    conn.request("POST", f"/v1/jobs/{JOB}/workloads/cosine_select", body=body, headers=headers)
    resp = conn.getresponse()
    data = resp.read()
    elapsed = time.perf_counter() - t0
    conn.close()
    assert resp.status == 200, data
    answer: dict[str, Any] = json.loads(data)
    return elapsed, answer


def test_a_request_pays_the_gateway_and_both_invokes(
    plain: LocalStack, modelled: LocalStack
) -> None:
    for stack in (plain, modelled):
        cosine(stack)  # loads the round and warms every instance: untimed
    # the floors (fastest of a few): a busy host only ever adds to a sample
    without = [cosine(plain)[0] for _ in range(5)]
    with_model = [cosine(modelled)[0] for _ in range(5)]
    # API Gateway's hop, its invocation of the router, the router's of the node
    added = min(with_model) - min(without)
    assert added >= (40 + 2 * 30) / 1e3 * 0.95, (with_model, without)


def test_a_cold_load_pays_s3s_first_byte_through_the_nodes_own_proxy(
    modelled: LocalStack,
) -> None:
    assert modelled.router is not None and modelled.network is not None
    node = modelled.node_function(0)
    proxy = modelled.network.proxy(node)
    assert proxy is not None
    cosine(modelled)
    warm = min(cosine(modelled)[0] for _ in range(2))
    modelled.router.node_op(0, {"op": "evict", "all": True})
    before = proxy.counts().get("requests", 0)
    cold, answer = cosine(modelled)
    gets = answer["meta"]["s3_gets"]
    assert gets > 0 and proxy.counts()["requests"] - before >= gets
    assert cold - warm >= 50 / 1e3  # at least one GET's first byte on the request's path


def test_every_function_reaches_s3_through_its_own_proxy_only_with_a_model(
    plain: LocalStack, modelled: LocalStack
) -> None:
    assert plain.lam is not None and modelled.lam is not None and modelled.network is not None
    names = [plain.node_function(0), function_name(plain.config.prefix)]
    for name in names:
        env = plain.lam.function_spec(name).environment
        assert env[config.S3_ENDPOINT.name] == plain.s3_endpoint
    endpoints = set()
    for name in names:
        proxy = modelled.network.proxy(name)
        assert proxy is not None
        env = modelled.lam.function_spec(name).environment
        assert env[config.S3_ENDPOINT.name] == proxy.url != modelled.s3_endpoint
        endpoints.add(proxy.url)
    assert len(endpoints) == len(names)  # one proxy, one interface, per function
    assert plain.network is None and plain.state()["network"] is None
    assert modelled.state()["network"] == "custom"
    # the parent's store writes untimed, straight to S3: no proxy sees it
    seen = {name: modelled.network.proxy(name).counts() for name in names}  # type: ignore[union-attr]
    assert modelled.store is not None
    modelled.store.put_update(JOB, 1, "c0", small_update(0))
    assert {name: modelled.network.proxy(name).counts() for name in names} == seen  # type: ignore[union-attr]
