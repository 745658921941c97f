"""The attacker's request against a local stack: FedDebug on 10,000 inputs of a 30-client
digits round ran 40 s and took both nodes it was sent to out of memory. It is now refused with a
400 before any node is invoked, and every node still answers ``stats`` afterwards."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from evaluation.digits_job import simulate
from flstore_core.protocol import StatsOp
from lambdas.local_runtime.stack import LocalStack, StackConfig
from tests.stack.test_api import run

NODES = 2


@pytest.fixture(scope="module")
def stack(s3_server: Any) -> Iterator[LocalStack]:
    config = StackConfig(
        nodes=NODES,
        replication=2,
        memory_mb=2048,
        bucket="request-bounds-tests",
        s3_endpoint=s3_server.url,
    )
    with LocalStack(config) as st:
        assert st.store is not None
        simulate(st.store, job="digits30", clients=30, rounds=1, malicious=(), local_epochs=1)
        yield st


def test_feddebug_on_10000_inputs_is_a_400_and_every_node_stays_up(stack: LocalStack) -> None:
    status, body = run(
        stack, "digits30", "feddebug", {"round": 0, "params": {"num_inputs": 10_000}}
    )
    assert status == 400, body
    assert body["error"]["code"] == "over_limit"
    assert stack.router is not None
    for index in range(NODES):
        stats = stack.router.node_op(index, StatsOp())
        assert "error" not in stats, stats
    status, body = run(stack, "digits30", "feddebug", {"round": 0})
    assert status == 200, body
