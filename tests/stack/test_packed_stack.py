"""A round of ~89% of the stack's total budget is served (the planner packs its blocks).

Eight cache-node processes of 512 MB, each holding data under an explicit 8 MiB budget (so the
runtime fits beside it), 64 MiB in all; a round of ten clients whose footprint is 89% of that is
ingested by the Beam pipeline, which prefetches its blocks onto their owners. Before packing,
blocks of a quarter budget left ~20% of every node empty and this round was refused (503
no_layout). cosine_select, krum and fedavg through the gateway equal a float64 numpy reference.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from flstore_core.client import FLStoreClient
from flstore_core.data.blocks import footprint
from flstore_core.data.codec import Update, decode_update
from flstore_core.data.rawfile import write_raw_update
from lambdas.local_runtime.s3_server import LocalS3
from lambdas.local_runtime.stack import LocalStack, StackConfig
from pipelines.ingest import run_ingest

MiB = 1024 * 1024
JOB = "packed"
NODES = 8
N = 10
BUDGET = 8 * MiB
# 18,433 + 10 x 97,700 = 995,433 columns of 4 x (10 + 5) bytes: 56.9 MiB, 89% of 64 MiB
SHAPES = {"conv.weight": (64, 32, 3, 3), "bn.num_batches_tracked": (), "fc.weight": (10, 97_700)}
FLOATS = ("conv.weight", "fc.weight")


def client_state(k: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(300 + k)
    out: dict[str, np.ndarray] = {}
    for name, shape in SHAPES.items():
        if name == "bn.num_batches_tracked":
            out[name] = np.array(50 + k, np.int64)
        else:
            centre = 1.0 if k < 8 else -1.0  # two clients pull the other way
            out[name] = rng.normal(centre * 0.01, 0.05, size=shape).astype(np.float32)
    return out


@pytest.fixture(scope="module")
def stack(s3_server: LocalS3, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    config = StackConfig(
        nodes=NODES,
        replication=2,
        memory_mb=512,
        budget_bytes=BUDGET,
        bucket="packed-stack",
        s3_endpoint=s3_server.url,
    )
    root = tmp_path_factory.mktemp("drop")
    for k in range(N):
        update = Update(client_state(k), num_examples=20 + 3 * k, job=JOB, round=0, client=f"c{k}")
        write_raw_update(update, str(root / f"c{k}.safetensors"))
    with LocalStack(config) as st:
        run_ingest(
            str(root), job=JOB, s3_endpoint=st.s3_endpoint, bucket=config.bucket, prefetch=st.router
        )
        yield st


def post(stack: LocalStack, name: str, params: dict[str, Any]) -> dict[str, Any]:
    """The workload on round 0 through the gateway, as a user calls it (the SDK client)."""
    return FLStoreClient(stack.gateway_url, stack.token).run(JOB, name, round=0, **params)


def rows(floats_only: bool) -> np.ndarray:
    """Every client's row in float64 (the float parameters, or the whole state)."""
    names = [n for n in SHAPES if not floats_only or n in FLOATS]
    return np.stack(
        [
            np.concatenate([np.asarray(client_state(k)[n], np.float64).reshape(-1) for n in names])
            for k in range(N)
        ]
    )


def test_the_round_fills_89_percent_and_every_node_holds_its_blocks(stack: LocalStack) -> None:
    assert stack.router is not None
    plan = stack.router.plan_round(JOB, 0)
    fill = footprint(N, plan.n_params) / (NODES * BUDGET)
    assert 0.88 <= fill <= 0.9
    assert plan.sharded and len(plan.node_bytes()) == NODES
    assert max(plan.node_bytes().values()) <= BUDGET
    held: dict[int, list[str]] = {}
    for i in range(NODES):
        stats = stack.router.node_op(i, {"op": "stats"})
        assert stats["bytes_held"] <= stats["budget_bytes"] == BUDGET
        held[i] = [s for s in stats["shards"] if s.startswith(f"{JOB}/round/")]
    # prefetch put every block on its first owner (a node's other shards may have pushed out
    # a replica, never beyond the budget)
    for block in plan.blocks:
        assert any(str(block.key) in held[owner] for owner in block.owners)


def test_cosine_select_equals_numpy(stack: LocalStack) -> None:
    x = rows(floats_only=True)
    mean = x.mean(axis=0)
    cos = x @ mean / (np.linalg.norm(x, axis=1) * np.linalg.norm(mean))
    got = post(stack, "cosine_select", {"k": 4})["result"]
    assert got["selected"] == [f"c{i}" for i in np.argsort(-cos, kind="stable")[:4]]
    for k in range(N):
        assert got["scores"][f"c{k}"] == pytest.approx(cos[k], rel=1e-6)


def test_krum_equals_numpy(stack: LocalStack) -> None:
    x = rows(floats_only=True)
    d = ((x[:, None, :] - x[None, :, :]) ** 2).sum(axis=2)
    f = 2
    scores = np.array([np.sort(np.delete(d[i], i))[: N - f - 2].sum() for i in range(N)])
    got = post(stack, "krum", {"f": f})["result"]
    assert got["selected"] == [f"c{int(np.argmin(scores))}"]
    for k in range(N):
        assert got["scores"][f"c{k}"] == pytest.approx(scores[k], rel=1e-6)
    assert stack.store is not None
    chosen = decode_update(stack.store.get_object(got["model_key"])).tensors
    for name, value in client_state(int(np.argmin(scores))).items():
        np.testing.assert_array_equal(chosen[name], value)


def test_fedavg_equals_numpy(stack: LocalStack) -> None:
    answer = post(stack, "fedavg", {})
    assert stack.store is not None
    got = decode_update(stack.store.get_object(answer["result"]["model_key"])).tensors
    weights = np.array([20 + 3 * k for k in range(N)], np.float64)
    weights /= weights.sum()
    for name in SHAPES:
        stacked = np.stack([np.asarray(client_state(k)[name], np.float64) for k in range(N)])
        want = np.tensordot(weights, stacked, axes=1)
        if name == "bn.num_batches_tracked":
            assert got[name] == np.rint(want)
        else:
            np.testing.assert_allclose(got[name], want, rtol=1e-6, atol=1e-7)
