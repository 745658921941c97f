"""Per-client model workloads on a sharded round (workload affinity).

A digits_cnn round of twelve clients, twice one node's budget, is served in column blocks by
in-process cache nodes (:class:`tests.fakes.InProcessNodes`). The workloads that
evaluate whole client models run on nodes that read the clients from the store one at a time
(:mod:`flstore_core.cache.streamed`); each is compared with the same workload on the whole
round, run as a single node runs it: selections and flags identical, numbers within 1e-6
relative, model results tensor by tensor within 1e-6.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from flstore_core import models
from flstore_core.cache.results import run_round_workload
from flstore_core.cache.round_data import ArtifactStats
from flstore_core.cache.round_loading import load_round
from flstore_core.data.blocks import footprint
from flstore_core.data.codec import Update, decode_update
from flstore_core.errors import InvalidParamsError, NotFoundError, UnavailableError
from flstore_core.sdk.jobs import create_job
from flstore_core.storage.memory import MemoryBlobStore
from flstore_core.storage.object_store import ObjectStore
from flstore_core.workloads import get
from flstore_core.workloads.fltrust import server_update
from tests.fakes import InProcessNodes, make_router
from tests.unit.test_sharded_round import NODES, assert_close

JOB = "digits-wide"
TOKEN = "fls_sharded-clients"
AUTH = f"Bearer {TOKEN}"
N_CLIENTS = 12
N_PARAMS = sum(int(np.prod(s.shape)) for s in models.state_specs(models.build("digits_cnn")))
BUDGET = footprint(N_CLIENTS, N_PARAMS) // 2  # the round is two nodes' budgets


def trained_base() -> tuple[dict[str, Any], Any, Any]:
    """A digits_cnn trained briefly on scikit-learn's digits (so client models differ in
    accuracy), and a held-out validation set."""
    import torch
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    y = y.astype(np.int64)
    model = models.build("digits_cnn", seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    xt, yt = torch.tensor(x[:1400]), torch.tensor(y[:1400])
    model.train()
    for _ in range(1):
        for start in range(0, 1400, 20):
            opt.zero_grad()
            loss = torch.nn.CrossEntropyLoss()
            loss(model(xt[start : start + 20]), yt[start : start + 20]).backward()
            opt.step()
    return models.state_arrays(model), x[1400:1700], y[1400:1700]


def write_job(st: ObjectStore) -> None:
    """The job: a trained base, twelve clients around it, the validation set."""
    base, vx, vy = trained_base()
    create_job(st, JOB, model="digits_cnn", validation=(vx, vy))
    st.put_initial(JOB, Update(base))
    rng = np.random.default_rng(3)
    shared = {n: rng.normal(0.0, 0.02, size=v.shape) for n, v in base.items()}
    entries = []
    for k in range(N_CLIENTS):
        # a direction the clients share (cosines of updates ~0.5, not ~0, so that float32 Grams
        # hold them to 1e-7) plus noise growing with k (accuracies spread out); client 11 is
        # sign-flipped and scaled (a bad update)
        scale = 0.01 * (1 + k)
        state = {}
        for name, value in base.items():
            if value.dtype.kind != "f":
                state[name] = value
                continue
            noise = rng.normal(0.0, scale, size=value.shape)
            step = (shared[name] + noise).astype(np.float32)
            state[name] = (value - step * 8 if k == 11 else value + step).astype(np.float32)
        entries.append(st.put_update(JOB, 0, f"c{k:02d}", Update(state, num_examples=10 + 3 * k)))
    st.commit_round(JOB, 0, entries)


@pytest.fixture(scope="module")
def store() -> Iterator[ObjectStore]:
    st = ObjectStore("mem", blobs=MemoryBlobStore())
    write_job(st)
    yield st
    st.close()


# the stack the router plans for: NODES nodes, two replicas, one token for every job
STACK: dict[str, Any] = {"nodes": NODES, "replication": 2, "tokens": {TOKEN: ["*"]}}


def reference(store: ObjectStore, name: str, params: dict[str, Any]) -> dict[str, Any]:
    """The workload on the whole round, as one node runs it."""
    data = load_round(store, JOB, 0, ArtifactStats())
    workload = get(name)
    return run_round_workload(store, workload, data, workload.validate(params))


CASES: list[tuple[str, dict[str, Any]]] = [
    ("accuracy_select", {"k": 4}),
    ("contribution_loo", {}),
    ("contribution_shapley", {"method": "gtg", "min_permutations": 12, "max_permutations": 12}),
    ("feddebug", {"num_faulty": 2}),
    ("personalize", {"client": "c03", "peers": 3}),
    ("personalize", {"client": "c05", "peers": 2, "by": "accuracy"}),
]


def test_the_round_is_sharded_and_a_streaming_node_fits_its_budget(store: ObjectStore) -> None:
    from flstore_core.cache.streamed import working_bytes

    plan = make_router(
        store, InProcessNodes(store, NODES, budget=BUDGET), cache_budget_bytes=BUDGET, **STACK
    ).plan_round(JOB, 0)
    assert plan.sharded and plan.footprint >= 2 * BUDGET
    assert working_bytes(N_PARAMS) <= BUDGET


@pytest.mark.parametrize(("name", "params"), CASES, ids=[f"{n}-{p}" for n, p in CASES])
def test_every_per_client_workload_agrees_with_the_whole_round(
    store: ObjectStore, name: str, params: dict[str, Any]
) -> None:
    nodes = InProcessNodes(store, NODES, budget=BUDGET)
    router = make_router(store, nodes, cache_budget_bytes=BUDGET, **STACK)
    answer = router.run(AUTH, JOB, name, json.dumps({"round": 0, "params": params}))
    got = answer["result"]
    ops = [event["op"] for _, event in nodes.indexed]
    assert set(ops) <= {"partial", "model_part", "run_clients"}, ops
    streamed = [(i, e) for i, e in nodes.indexed if e["op"] == "run_clients"]
    if name == "accuracy_select":  # groups of clients on every node, in parallel
        assert sorted(i for i, _ in streamed) == list(range(NODES))
        rows = sorted(r for _, e in streamed for r in e["rows"])
        assert rows == list(range(N_CLIENTS))
    else:  # the whole workload on the round's affinity node
        assert len(streamed) == 1 and "rows" not in streamed[0][1]
    for node in nodes.nodes:  # no node holds the round, only blocks
        assert node.cache.bytes_held <= BUDGET
        assert all(k.is_block for k in node.cache.shard_keys() if k.cls == "round")
    sharded_model = None
    if "model_key" in got:
        sharded_model = decode_update(store.get_object(got["model_key"])).tensors
        store.blobs.delete(got["model_key"])
    want = reference(store, name, params)
    assert_close(got, want)
    if sharded_model is not None:
        whole = decode_update(store.get_object(want["model_key"])).tensors
        assert list(sharded_model) == list(whole)
        for tensor, value in whole.items():
            assert sharded_model[tensor].dtype == value.dtype, tensor
            np.testing.assert_allclose(sharded_model[tensor], value, rtol=1e-6, atol=1e-7)


def test_fltrust_with_a_trained_server_update_equals_float64_numpy(store: ObjectStore) -> None:
    """FLTrust's trust scores are cosines near 0 here (|cos| ~ 1e-3), where the whole round's
    float32 dot products ``x_i·g_0`` are off by up to 4e-6 relative (measured against float64)
    while a streamed round sums each row in float64: both are compared with a float64 numpy
    transcription of the paper's formulas (Cao et al. NDSS'21), on the same ``g_0``."""
    nodes = InProcessNodes(store, NODES, budget=BUDGET)
    router = make_router(store, nodes, cache_budget_bytes=BUDGET, **STACK)
    answer = router.run(AUTH, JOB, "fltrust", json.dumps({"round": 0, "params": {"seed": 5}}))
    got = answer["result"]
    plan = router.plan_round(JOB, 0)
    parts = [e for _, e in nodes.indexed if e["op"] == "model_part"]  # written on the blocks
    assert sorted(i for e in parts for i in e["indices"]) == list(range(len(plan.blocks)))
    data = load_round(store, JOB, 0, ArtifactStats())
    assert data.base is not None and not data.columns.buffer_runs
    g0, _ = server_update(data, 1, 0.05, 10, 5)
    cols = np.concatenate([np.arange(a, b) for a, b in data.columns.runs(False)])
    d = data.matrix.astype(np.float64)  # deltas w_i - base
    g = g0.astype(np.float64)
    cos = d[:, cols] @ g[cols] / (np.linalg.norm(d[:, cols], axis=1) * np.linalg.norm(g[cols]))
    trust = np.maximum(cos, 0.0)  # TS_i = ReLU(cos(g_i, g_0))
    scale = np.linalg.norm(g[cols]) / np.linalg.norm(d[:, cols], axis=1)
    step = (trust * scale / trust.sum()) @ d  # Σ TS_i ĝ_i / Σ TS_i
    want_model = data.base.astype(np.float64) + step
    clients = data.clients
    assert got["flagged"] == [c for c, t in zip(clients, trust, strict=True) if t <= 0]
    assert got["server_update"] == "root_dataset"
    for i, c in enumerate(clients):
        assert got["scores"][c] == pytest.approx(trust[i], rel=1e-6, abs=1e-12)
        assert got["weights"][c] == pytest.approx(trust[i] / trust.sum(), rel=1e-6, abs=1e-12)
    assert got["server_norm"] == pytest.approx(np.linalg.norm(g[cols]), rel=1e-6)
    model = decode_update(store.get_object(got["model_key"])).tensors
    np.testing.assert_allclose(
        np.concatenate([model[s.name].reshape(-1) for s in data.specs]),
        want_model,
        rtol=1e-6,
        atol=1e-7,
    )
    # the same flags as the whole round, whose scores agree to its float32 precision
    whole = reference(store, "fltrust", {"seed": 5})
    assert whole["flagged"] == got["flagged"]
    for c in clients:
        assert got["scores"][c] == pytest.approx(whole["scores"][c], rel=1e-5, abs=1e-12)


def test_a_group_whose_node_dies_is_scored_by_the_next_node(store: ObjectStore) -> None:
    nodes = InProcessNodes(store, NODES, budget=BUDGET)
    nodes.down.add(2)
    router = make_router(store, nodes, cache_budget_bytes=BUDGET, **STACK)
    got = router.run(AUTH, JOB, "accuracy_select", json.dumps({"round": 0, "params": {"k": 3}}))
    assert_close(got["result"], reference(store, "accuracy_select", {"k": 3}))
    assert "fl-cache-2" in got["meta"]["nodes"]


def test_caller_errors_come_back_before_or_from_the_streaming_node(store: ObjectStore) -> None:
    nodes = InProcessNodes(store, NODES, budget=BUDGET)
    router = make_router(store, nodes, cache_budget_bytes=BUDGET, **STACK)
    with pytest.raises(InvalidParamsError, match="k=13"):
        router.run(AUTH, JOB, "accuracy_select", json.dumps({"round": 0, "params": {"k": 13}}))
    assert not any(e["op"] == "run_clients" for _, e in nodes.indexed)
    body = {"round": 0, "params": {"client": "zz"}}
    with pytest.raises(NotFoundError, match="client 'zz' is not in round 0"):
        router.run(AUTH, JOB, "personalize", json.dumps(body))  # the node's 404, not retried
    assert [e["op"] for _, e in nodes.indexed].count("run_clients") == 1


def test_a_model_larger_than_a_node_can_evaluate_is_a_503(store: ObjectStore) -> None:
    small = BUDGET * 2 // 3  # the blocks still fit eight nodes, one client model's work does not
    nodes = InProcessNodes(store, NODES, budget=small)
    router = make_router(store, nodes, cache_budget_bytes=small, **STACK)
    with pytest.raises(UnavailableError, match="evaluating one client model"):
        router.run(AUTH, JOB, "feddebug", json.dumps({"round": 0}))
    assert nodes.indexed == []
