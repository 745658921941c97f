"""A round of ~89% of the stack's total budget is served (the planner packs its blocks).

Eight cache-node processes of 512 MB, each holding data under an explicit 8 MiB budget (so the
runtime fits beside it), 64 MiB in all; a round of ten clients whose footprint is 89% of that is
ingested by the Beam pipeline, which prefetches its blocks onto their owners. Before packing,
blocks of a quarter budget left ~20% of every node empty and this round was refused (503
no_layout). cosine_select, krum and fedavg through the gateway equal a float64 numpy reference.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from flstore_core.data.blocks import footprint
from flstore_core.data.codec import decode_update
from lambdas.local_runtime.s3_server import LocalS3
from lambdas.local_runtime.stack import LocalStack
from tests.stack.wide_rounds import WideRound, ingested_stack

WIDE = WideRound(job="packed", fc_width=97_700, seed=300, bucket="packed-stack")
# 18,433 + 10 x 97,700 = 995,433 columns of 4 x (10 + 5) bytes: 56.9 MiB, 89% of 64 MiB
JOB, NODES, N, BUDGET, SHAPES = WIDE.job, WIDE.nodes, WIDE.clients, WIDE.budget, WIDE.shapes
client_state, rows, post = WIDE.client_state, WIDE.rows, WIDE.post


@pytest.fixture(scope="module")
def stack(s3_server: LocalS3, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    with ingested_stack(WIDE, s3_server, tmp_path_factory.mktemp("drop")) as st:
        yield st


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
