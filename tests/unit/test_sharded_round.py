"""A round several times one node's budget, served in column blocks by many nodes.

The nodes are real :class:`CacheNode` objects with a small explicit budget, invoked in process
through a JSON round trip (what ``lambda.invoke`` carries); the store is in memory. Every round
workload that decomposes over blocks is compared with the same workload on the whole round,
run as a single node runs it: selections, labels and flags identical, numbers within 1e-6
relative, model results decoded and compared tensor by tensor.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import pytest

from flstore_core.cache import sharded
from flstore_core.cache.results import run_round_workload
from flstore_core.cache.round_data import ArtifactStats
from flstore_core.cache.round_loading import load_round
from flstore_core.cost import DEFAULT_PRICES
from flstore_core.data.blocks import footprint
from flstore_core.data.codec import Update, decode_update
from flstore_core.data.manifest import JobSpec
from flstore_core.errors import InvalidParamsError, UnavailableError, ValidationError
from flstore_core.routing.invoker import NodeAnswer
from flstore_core.routing.placement import node_name, round_shard
from flstore_core.routing.planner import NoLayoutError
from flstore_core.storage.memory import MemoryBlobStore
from flstore_core.storage.object_store import ObjectStore
from flstore_core.workloads import get
from tests.fakes import InProcessNodes, make_router

JOB = "big"
TOKEN = "fls_sharded-tests"
AUTH = f"Bearer {TOKEN}"
PREFIX = "fl"
NODES = 8
N_CLIENTS = 9

SHAPES: dict[str, tuple[tuple[int, ...], Any]] = {
    "conv.weight": ((16, 8, 3, 3), np.float32),
    "conv.bias": ((16,), np.float32),
    "bn.weight": ((16,), np.float32),
    "bn.bias": ((16,), np.float32),
    "bn.running_mean": ((16,), np.float32),
    "bn.running_var": ((16,), np.float32),
    "bn.num_batches_tracked": ((), np.int64),
    "fc.weight": ((10, 1500), np.float32),
    "fc.bias": ((10,), np.float32),
}
N_PARAMS = sum(int(np.prod(shape)) for shape, _ in SHAPES.values())
FOOTPRINT = footprint(N_CLIENTS, N_PARAMS)
BUDGET = FOOTPRINT // 3  # the round is three nodes' budgets


def state(rng: np.random.Generator, base: dict[str, Any] | None, k: int) -> dict[str, Any]:
    """A client's model: the base plus a client-specific step; clients 7 and 8 push the other
    way (a cluster apart, the ones robust aggregators should drop)."""
    out: dict[str, Any] = {}
    for name, (shape, dtype) in SHAPES.items():
        if dtype == np.int64:
            out[name] = np.array(100 + k, dtype=np.int64).reshape(shape)
            continue
        start = np.zeros(shape, np.float32) if base is None else base[name]
        step = rng.normal(0.05, 0.02, size=shape).astype(np.float32)
        sign = -1.0 if k >= 7 else 1.0
        out[name] = (start + np.float32(sign) * step).astype(np.float32)
    return out


def write_job(store: ObjectStore) -> None:
    rng = np.random.default_rng(12)
    store.put_job_spec(JobSpec(job=JOB))
    initial = state(rng, None, 0)
    store.put_initial(JOB, Update(initial))
    entries = [
        store.put_update(JOB, 0, f"c{k}", Update(state(rng, initial, k), num_examples=10 + 7 * k))
        for k in range(N_CLIENTS)
    ]
    store.commit_round(JOB, 0, entries)


# the stack the router plans for: NODES nodes, two replicas, one token for every job
STACK: dict[str, Any] = {"nodes": NODES, "replication": 2, "tokens": {TOKEN: ["*"]}}


@pytest.fixture(scope="module")
def store() -> Iterator[ObjectStore]:
    st = ObjectStore("mem", blobs=MemoryBlobStore())
    write_job(st)
    yield st
    st.close()


def reference(store: ObjectStore, name: str, params: dict[str, Any]) -> dict[str, Any]:
    """The workload on the whole round, as one node runs it (its model written, then read
    back and removed so the sharded run writes its own)."""
    data = load_round(store, JOB, 0, ArtifactStats())
    workload = get(name)
    return run_round_workload(store, workload, data, workload.validate(params))


def assert_close(got: Any, want: Any, path: str = "result") -> None:
    """Selections, labels and flags identical; numbers within 1e-6 relative."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and set(got) == set(want), path
        for key in want:
            assert_close(got[key], want[key], f"{path}.{key}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), path
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_close(g, w, f"{path}[{i}]")
    elif isinstance(want, float) and not isinstance(want, bool):
        assert math.isclose(got, want, rel_tol=1e-6, abs_tol=1e-9), (path, got, want)
    else:
        assert got == want, (path, got, want)


def model_tensors(store: ObjectStore, key: str) -> dict[str, Any]:
    return decode_update(store.get_object(key)).tensors


CASES: list[tuple[str, dict[str, Any]]] = [
    ("cosine_select", {"k": 3}),
    ("cosine_select", {"k": 4, "include_buffers": True, "use_delta": False}),
    ("malicious_cosine", {}),
    ("krum", {"f": 2}),
    ("krum", {"f": 1, "include_buffers": True}),
    ("multi_krum", {"f": 2, "m": 4}),
    ("kmeans", {"k": 2}),
    ("cfl_split", {}),
    ("fltrust", {"server_client": "c0"}),
    ("fedavg", {}),
    ("fedavg", {"weighted": False}),
    ("trimmed_mean", {"beta": 0.2}),
    ("trimmed_mean", {"beta": 0.0}),
    # over a subset of the clients: zero weights, or the subset's rows per block
    ("fedavg", {"clients": ["c8", "c0", "c3", "c7"]}),
    ("trimmed_mean", {"beta": 0.2, "clients": ["c1", "c2", "c4", "c5", "c7", "c8"]}),
    ("trimmed_mean", {"beta": 0.0, "clients": ["c6", "c2"]}),
    ("multi_krum", {"f": 1, "clients": ["c0", "c2", "c4", "c6", "c7", "c8"]}),
]


def test_the_round_is_several_node_budgets_and_is_planned_in_blocks(store: ObjectStore) -> None:
    router = make_router(
        store, InProcessNodes(store, NODES, budget=BUDGET), cache_budget_bytes=BUDGET, **STACK
    )
    plan = router.plan_round(JOB, 0)
    assert plan.sharded and len(plan.blocks) >= 4
    assert plan.footprint >= 3 * BUDGET
    assert all(block.nbytes <= BUDGET for block in plan.blocks)


@pytest.mark.parametrize(("name", "params"), CASES, ids=[f"{n}-{p}" for n, p in CASES])
def test_every_decomposable_workload_agrees_with_the_whole_round(
    store: ObjectStore, name: str, params: dict[str, Any]
) -> None:
    nodes = InProcessNodes(store, NODES, budget=BUDGET)
    router = make_router(store, nodes, cache_budget_bytes=BUDGET, **STACK)
    answer = router.run(AUTH, JOB, name, json.dumps({"round": 0, "params": params}))
    got = answer["result"]
    ops = {event["op"] for _, event in nodes.indexed}
    # no node was sent the whole round; a workload needing scikit-learn (which the router does
    # not carry) runs on one node from the gathered Gram pieces, reading no row
    assert ops <= {"partial", "model_part", "run_clients"}, ops
    assert ("run_clients" in ops) == bool(get(name).needs), ops
    # every node kept within its budget
    for node in nodes.nodes:
        assert node.cache.bytes_held <= BUDGET
        assert not any(not k.is_block for k in node.cache.shard_keys() if k.cls == "round")
    sharded_model = None
    if "model_key" in got:
        sharded_model = model_tensors(store, got["model_key"])
        store.blobs.delete(got["model_key"])
    want = reference(store, name, params)
    assert_close(got, want)
    if sharded_model is not None:
        whole = model_tensors(store, want["model_key"])
        assert list(sharded_model) == list(whole)
        for tensor, value in whole.items():
            assert sharded_model[tensor].dtype == value.dtype, tensor
            np.testing.assert_allclose(sharded_model[tensor], value, rtol=1e-6, atol=1e-7)
    assert answer["meta"]["cost_usd"] > 0
    # one invocation per node and scatter: a node is never invoked twice at once (it would be
    # throttled), and every block was asked of one of its owners
    plan = router.plan_round(JOB, 0)
    scatters: dict[str, list[int]] = {}
    blocks_asked = [(i, e) for i, e in nodes.indexed if e["op"] in ("partial", "model_part")]
    for index, event in blocks_asked:
        scatter = [event["op"], event.get("buffers"), event.get("expr")]
        scatters.setdefault(json.dumps(scatter, sort_keys=True), []).append(index)
    for invoked in scatters.values():
        assert len(invoked) == len(set(invoked))
    for index, event in blocks_asked:
        for block in event["indices"]:
            assert index in plan.blocks[block].owners


def test_any_replica_of_the_layout_answers_byte_identically_and_a_dead_node_is_survived(
    store: ObjectStore,
) -> None:
    body = json.dumps({"round": 0, "params": {"f": 2}})
    first = make_router(
        store, InProcessNodes(store, NODES, budget=BUDGET), cache_budget_bytes=BUDGET, **STACK
    ).run(AUTH, JOB, "krum", body)
    nodes = InProcessNodes(store, NODES, budget=BUDGET)
    router = make_router(store, nodes, cache_budget_bytes=BUDGET, **STACK)
    plan = router.plan_round(JOB, 0)
    # the primary of the first block dies before the request: its replica answers
    nodes.down.add(plan.blocks[0].owners[0])
    second = router.run(AUTH, JOB, "krum", body)
    assert json.dumps(second["result"], sort_keys=True) == json.dumps(
        first["result"], sort_keys=True
    )
    assert node_name(PREFIX, plan.blocks[0].owners[0]) in second["meta"]["nodes"]


def test_a_node_killed_during_a_scattered_request_still_yields_the_right_answer(
    store: ObjectStore,
) -> None:
    nodes = InProcessNodes(store, NODES, budget=BUDGET)
    router = make_router(store, nodes, cache_budget_bytes=BUDGET, **STACK)
    plan = router.plan_round(JOB, 0)
    victim = plan.blocks[-1].owners[0]
    original = nodes.invoke

    def dying(function: str, event: Mapping[str, Any]) -> NodeAnswer:
        # the victim answers its first block, then dies for the rest of the request
        answer = original(function, event)
        if function == node_name(PREFIX, victim):
            nodes.down.add(victim)
        return answer

    nodes.invoke = dying  # type: ignore[method-assign]
    # krum: the victim answers the Gram scatter, then is dead for the model's
    got = router.run(AUTH, JOB, "krum", json.dumps({"round": 0, "params": {"f": 1}}))
    assert victim in nodes.down
    assert node_name(PREFIX, victim) in got["meta"]["nodes"]
    model = model_tensors(store, got["result"]["model_key"])
    store.blobs.delete(got["result"]["model_key"])
    want = reference(store, "krum", {"f": 1})
    assert_close(got["result"], want)
    for tensor, value in model_tensors(store, want["model_key"]).items():
        np.testing.assert_array_equal(model[tensor], value)


def test_prefetch_loads_each_block_on_its_owners_and_writes_the_default_model(
    store: ObjectStore,
) -> None:
    nodes = InProcessNodes(store, NODES, budget=BUDGET)
    router = make_router(store, nodes, cache_budget_bytes=BUDGET, **STACK)
    plan = router.plan_round(JOB, 0)
    router.prefetch([round_shard(JOB, 0)])
    for block in plan.blocks:
        for owner in block.owners:
            assert block.key in nodes.nodes[owner].cache.shard_keys()
    # the request after prefetch is warm: every block answers from memory
    answer = router.run(AUTH, JOB, "krum", json.dumps({"round": 0, "params": {"f": 2}}))
    assert answer["meta"]["cache"] == "hit"
    assert answer["meta"]["s3_gets"] == 0
    before = len(nodes.indexed)
    fedavg = router.run(AUTH, JOB, "fedavg", json.dumps({"round": 0}))
    assert store.stat(fedavg["result"]["model_key"]) is not None
    # written at prefetch: the request invoked no node at all
    assert nodes.indexed[before:] == []


def test_a_round_no_layout_can_hold_is_a_503_naming_its_size_before_any_node_is_invoked(
    store: ObjectStore,
) -> None:
    nodes = InProcessNodes(store, NODES, budget=BUDGET // 4)
    router = make_router(store, nodes, cache_budget_bytes=BUDGET // 4, **STACK)
    with pytest.raises(NoLayoutError) as err:
        router.run(AUTH, JOB, "cosine_select", json.dumps({"round": 0}))
    assert err.value.status == 503 and isinstance(err.value, UnavailableError)
    assert f"{FOOTPRINT / 2**20:.1f} MiB" in err.value.message
    assert nodes.indexed == []


def test_a_workload_that_evaluates_client_models_runs_on_a_node_reading_the_clients(
    store: ObjectStore,
) -> None:
    # per-client workloads (tests/unit/test_sharded_clients.py) are sent to a node that reads the
    # clients one at a time; this job declares no model, and that node answers the 400
    nodes = InProcessNodes(store, NODES, budget=BUDGET * 2)
    router = make_router(store, nodes, cache_budget_bytes=BUDGET * 2, **STACK)
    with pytest.raises(InvalidParamsError, match="declares no model"):
        router.run(AUTH, JOB, "fltrust", json.dumps({"round": 0}))
    assert [e["op"] for _, e in nodes.indexed].count("run_clients") == 1


def test_a_model_result_is_charged_for_every_invocation_and_put(store: ObjectStore) -> None:
    nodes = InProcessNodes(store, NODES, budget=BUDGET)
    router = make_router(store, nodes, cache_budget_bytes=BUDGET, **STACK)
    blocks = len(router.plan_round(JOB, 0).blocks)
    answer = router.run(
        AUTH, JOB, "trimmed_mean", json.dumps({"round": 0, "params": {"beta": 0.3}})
    )
    meta = answer["meta"]
    # one frame per block, then the multipart upload: creation, a part per frame at most, completion
    assert meta["s3_puts"] == blocks + blocks + 2
    assert len(meta["nodes"]) == len({i for i, e in nodes.indexed if e["op"] == "model_part"})
    assert len(meta["nodes"]) < blocks  # one invocation per node, not per block
    puts = DEFAULT_PRICES.s3_put_per_thousand / 1e3 * meta["s3_puts"]
    assert meta["cost_usd"] >= puts + blocks * DEFAULT_PRICES.lambda_requests_per_million / 1e6
    store.blobs.delete(answer["result"]["model_key"])


def test_a_round_rewritten_under_the_router_is_a_retryable_503_then_the_new_round() -> None:
    st = ObjectStore("mem", blobs=MemoryBlobStore())
    write_job(st)
    router = make_router(
        st, InProcessNodes(st, NODES, budget=BUDGET), cache_budget_bytes=BUDGET, **STACK
    )
    router.plan_round(JOB, 0)  # the router has read the manifest of nine clients
    st.put_job_spec(JobSpec(job=JOB, late_clients={"within_s": 600}))  # a late client may join
    rng = np.random.default_rng(99)
    late = st.put_update(JOB, 0, "c9", Update(state(rng, None, 3), num_examples=5))
    st.commit_round(JOB, 0, [late])
    assert len(st.get_manifest(JOB, 0).updates) == N_CLIENTS + 1
    router.invoker = InProcessNodes(st, NODES, budget=BUDGET)  # nodes that read the rewritten round
    body = json.dumps({"round": 0, "params": {"k": 3}})
    with pytest.raises(UnavailableError, match="changed while it was read"):
        router.run(AUTH, JOB, "cosine_select", body)
    again = router.run(AUTH, JOB, "cosine_select", body)
    assert "c9" in again["result"]["scores"]


def test_prefetch_of_a_round_no_layout_holds_loads_nothing_and_reports_the_refusal(
    store: ObjectStore,
) -> None:
    from pipelines.prefetch import tally_prefetch

    nodes = InProcessNodes(store, NODES, budget=BUDGET // 4)
    router = make_router(store, nodes, cache_budget_bytes=BUDGET // 4, **STACK)
    answers = router.prefetch([round_shard(JOB, 0)])
    assert nodes.indexed == []  # no node was sent a round it cannot hold
    (refusal,) = answers.values()
    assert refusal["error"]["code"] == "no_layout"
    assert tally_prefetch(answers)["errors"] == 1


def test_gram_pieces_past_the_payload_limit_travel_through_s3(
    store: ObjectStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # every array past 64 bytes goes through S3, as a block of 2,000 clients' 32 MB would
    # past Lambda's 6 MB: the answers are the same
    monkeypatch.setattr(sharded, "INLINE_ARRAY_BYTES", 64)
    prefix = f"jobs/{JOB}/results/{sharded.GRAM_PIECES}/00000000/"
    nodes = InProcessNodes(store, NODES, budget=BUDGET)
    router = make_router(store, nodes, cache_budget_bytes=BUDGET, **STACK)
    for name, params in (("cosine_select", {"k": 3}), ("kmeans", {"k": 2}), ("krum", {"f": 2})):
        answer = router.run(AUTH, JOB, name, json.dumps({"round": 0, "params": params}))
        if "model_key" in answer["result"]:
            store.blobs.delete(answer["result"]["model_key"])
        assert_close(answer["result"], reference(store, name, params))
    pieces = [info.key for info in store.blobs.list(prefix)]
    assert pieces and all(k.endswith(".f8") for k in pieces)
    # the nodes' answers and kmeans' run_clients carried keys, not arrays
    sent = [e for _, e in nodes.indexed if e["op"] == "run_clients"]
    assert sent and "s3" in sent[0]["gram"]["centred"] and "f8" not in sent[0]["gram"]["centred"]
    # a piece that is not the one written is a 503, never a wrong answer
    store.blobs.put(pieces[0], b"\0" * 8)
    fresh = make_router(store, nodes, cache_budget_bytes=BUDGET, **STACK)
    with pytest.raises(UnavailableError, match="not the one written"):
        for name in ("cosine_select", "kmeans"):
            fresh.run(AUTH, JOB, name, json.dumps({"round": 0, "params": {"k": 2}}))
    # and a key outside the round's pieces is refused
    fetch = sharded.gram_piece_fetch(store, JOB, 0)
    with pytest.raises(ValidationError):
        fetch(f"jobs/{JOB}/rounds/00000000/manifest.json")
    for key in pieces:
        store.blobs.delete(key)
