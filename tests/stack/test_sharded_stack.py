"""A round three times one node's cache budget on the local stack.

Eight cache-node processes of 512 MB, each holding data under an explicit 8 MiB budget (so the
runtime fits beside it); a round of ten clients whose footprint is ~3 budgets is ingested by the
Beam pipeline, which prefetches its column blocks onto their owners; cosine_select, krum,
trimmed_mean and fedavg through the HTTP gateway equal a float64 numpy reference written here.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest

from flstore_core.data.blocks import footprint
from flstore_core.data.codec import Update, decode_update
from lambdas.local_runtime.s3_server import LocalS3
from lambdas.local_runtime.stack import LocalStack
from tests.stack.wide_rounds import WideRound, ingested_stack

WIDE = WideRound(job="wide", fc_width=42000, seed=100, bucket="sharded-stack")
JOB, NODES, N, BUDGET, SHAPES = WIDE.job, WIDE.nodes, WIDE.clients, WIDE.budget, WIDE.shapes
client_state, rows, post = WIDE.client_state, WIDE.rows, WIDE.post


@pytest.fixture(scope="module")
def stack(s3_server: LocalS3, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    with ingested_stack(WIDE, s3_server, tmp_path_factory.mktemp("drop")) as st:
        yield st


def model(stack: LocalStack, key: str) -> dict[str, np.ndarray]:
    assert stack.store is not None
    return decode_update(stack.store.get_object(key)).tensors


def test_the_round_is_three_budgets_cut_into_blocks_on_the_owners(stack: LocalStack) -> None:
    assert stack.router is not None
    plan = stack.router.plan_round(JOB, 0)
    assert footprint(N, plan.n_params) >= 3 * BUDGET
    assert plan.sharded
    held: dict[int, list[str]] = {}
    for i in range(NODES):
        stats = stack.router.node_op(i, {"op": "stats"})
        assert stats["bytes_held"] <= stats["budget_bytes"] == BUDGET
        held[i] = [s for s in stats["shards"] if s.startswith(f"{JOB}/round/")]
    for block in plan.blocks:
        for owner in block.owners:
            assert str(block.key) in held[owner]
    assert all("/" in s.split("/round/")[1] for shards in held.values() for s in shards)


def test_cosine_select_equals_numpy(stack: LocalStack) -> None:
    x = rows(floats_only=True)
    mean = x.mean(axis=0)
    cos = x @ mean / (np.linalg.norm(x, axis=1) * np.linalg.norm(mean))
    got = post(stack, "cosine_select", {"k": 4})["result"]
    want = [f"c{i}" for i in np.argsort(-cos, kind="stable")[:4]]
    assert got["selected"] == want
    for k in range(N):
        assert got["scores"][f"c{k}"] == pytest.approx(cos[k], rel=1e-6)


def test_krum_equals_numpy(stack: LocalStack) -> None:
    x = rows(floats_only=True)
    d = ((x[:, None, :] - x[None, :, :]) ** 2).sum(axis=2)
    f = 2
    scores = np.array([np.sort(np.delete(d[i], i))[: N - f - 2].sum() for i in range(N)])
    answer = post(stack, "krum", {"f": f})
    got = answer["result"]
    assert got["selected"] == [f"c{int(np.argmin(scores))}"]
    for k in range(N):
        assert got["scores"][f"c{k}"] == pytest.approx(scores[k], rel=1e-6)
    chosen = model(stack, got["model_key"])
    state = client_state(int(np.argmin(scores)))
    for name, value in state.items():
        np.testing.assert_array_equal(chosen[name], value)


def test_trimmed_mean_with_a_new_beta_equals_numpy(stack: LocalStack) -> None:
    answer = post(stack, "trimmed_mean", {"beta": 0.25})
    got = model(stack, answer["result"]["model_key"])
    cut = 2  # floor(0.25 * 10)
    for name in SHAPES:
        stacked = np.stack([np.asarray(client_state(k)[name], np.float64) for k in range(N)])
        want = np.sort(stacked, axis=0)[cut : N - cut].mean(axis=0)
        if name == "bn.num_batches_tracked":
            assert got[name] == np.rint(want)
        else:
            np.testing.assert_allclose(got[name], want, rtol=1e-6, atol=1e-7)


def test_fedavg_equals_numpy(stack: LocalStack) -> None:
    answer = post(stack, "fedavg", {})
    got = model(stack, answer["result"]["model_key"])
    weights = np.array([20 + 3 * k for k in range(N)], np.float64)
    weights /= weights.sum()
    for name in SHAPES:
        stacked = np.stack([np.asarray(client_state(k)[name], np.float64) for k in range(N)])
        want = np.tensordot(weights, stacked, axes=1)
        if name == "bn.num_batches_tracked":
            assert got[name] == np.rint(want)
        else:
            np.testing.assert_allclose(got[name], want, rtol=1e-6, atol=1e-7)
    # prefetch wrote it already: the request found the object and wrote nothing
    assert answer["meta"]["cache"] == "hit"


def test_the_planner_refuses_a_round_no_layout_holds_with_a_503(
    stack: LocalStack, tmp_path: Path
) -> None:
    assert stack.store is not None and stack.router is not None
    for k in range(N):
        state = {name: np.tile(v, 4) if v.ndim else v for name, v in client_state(k).items()}
        stack.store.put_update("huge", 0, f"c{k}", Update(state, num_examples=1))
    stack.store.commit_round("huge", 0)
    url = urlsplit(stack.gateway_url)
    assert url.hostname is not None
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    conn.request(
        "POST",
        "/v1/jobs/huge/workloads/cosine_select",
        body=json.dumps({"round": 0}).encode(),
        headers={"Authorization": f"Bearer {stack.token}"},
    )
    resp = conn.getresponse()
    answer = json.loads(resp.read())
    assert resp.status == 503
    assert answer["error"]["code"] == "no_layout"
    assert "8.0 MiB budget" in answer["error"]["message"]
