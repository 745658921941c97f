"""accuracy_select on a sharded digits_cnn round through the local stack's gateway
item 3): eight 512 MB node processes with a budget the round's footprint exceeds score groups
of clients read from S3 one at a time; the answer equals the whole round's and no node is
killed (each still answers ``stats``, its peak RSS under its memory)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from flstore_core.cache.round_data import ArtifactStats
from flstore_core.cache.round_loading import load_round
from flstore_core.client import FLStoreClient
from flstore_core.data.blocks import footprint
from flstore_core.storage.object_store import ObjectStore
from flstore_core.workloads import get
from lambdas.local_runtime.s3_server import LocalS3
from lambdas.local_runtime.stack import LocalStack, StackConfig
from tests.unit.test_sharded_clients import JOB, N_CLIENTS, N_PARAMS, write_job
from tests.unit.test_sharded_round import assert_close

BUDGET = footprint(N_CLIENTS, N_PARAMS) * 2 // 3


@pytest.fixture(scope="module")
def stack(s3_server: LocalS3) -> Iterator[LocalStack]:
    config = StackConfig(
        nodes=8,
        replication=2,
        memory_mb=512,
        budget_bytes=BUDGET,
        bucket="sharded-clients-stack",
        s3_endpoint=s3_server.url,
    )
    with LocalStack(config) as st:
        assert st.store is not None
        write_job(st.store)
        yield st


def post(stack: LocalStack, name: str, params: dict[str, Any]) -> dict[str, Any]:
    """The workload on round 0 through the gateway, as a user calls it (the SDK client)."""
    return FLStoreClient(stack.gateway_url, stack.token).run(JOB, name, round=0, **params)


def test_accuracy_select_on_a_sharded_model_round_answers_and_no_node_is_killed(
    stack: LocalStack,
) -> None:
    assert stack.router is not None and stack.store is not None
    assert stack.router.plan_round(JOB, 0).sharded
    got = post(stack, "accuracy_select", {"k": 4})["result"]
    store: ObjectStore = stack.store
    data = load_round(store, JOB, 0, ArtifactStats())
    workload = get("accuracy_select")
    want = workload.run(data, workload.validate({"k": 4})).result
    assert_close(got, want)
    for i in range(8):
        stats = stack.router.node_op(i, {"op": "stats"})
        assert stats["bytes_held"] <= BUDGET
        assert stats["peak_rss_mb"] is None or stats["peak_rss_mb"] < 512
