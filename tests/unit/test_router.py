"""The router's planning, failover, scatter-gather, prefetch and answers, with fake cache nodes.

S3 is moto in process and the cache nodes are a scripted invoker that records every call, so each
test runs in milliseconds and sleeps nowhere (the failover policy's sleep is injected).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from moto import mock_aws

from flstore_core.cost import DEFAULT_PRICES, Invocation, flstore_request_cost, invocations_cost
from flstore_core.data import layout
from flstore_core.data.manifest import JobSpec
from flstore_core.errors import NotFoundError, UnavailableError, ValidationError
from flstore_core.routing.auth import TokenTable
from flstore_core.routing.failover import FailoverPolicy
from flstore_core.routing.invoker import NodeFailure, NodeThrottled
from flstore_core.routing.placement import (
    ShardKey,
    meta_shard,
    node_name,
    place_shard,
    rank_nodes,
    round_shard,
)
from flstore_core.routing.router import Router, RouterConfig
from flstore_core.storage.object_store import ObjectStore
from flstore_core.workloads import get as get_workload
from tests.conftest import small_update
from tests.fakes import AUTH, TOKEN, InProcessNodes, Reply, make_router

JOB = "demo"
SPANS = "spans"  # the job of the spans fixture
NODES = 5
PREFIX = "fl"
BILLED_MS = 12.0
MEMORY_MB = 1024
RESULT = {"selected": ["c0", "c2"], "scores": {"c0": 0.9, "c1": 0.1, "c2": 0.8}}


def hit(function: str, event: dict[str, Any]) -> dict[str, Any]:
    return {"result": RESULT, "cache": "hit", "s3_gets": 0, "timing_ms": {"load": 0.1}}


def down(function: str, event: dict[str, Any]) -> dict[str, Any]:
    raise NodeFailure(f"{function}: Unhandled")


def ranked_functions(shard: ShardKey) -> list[str]:
    return [node_name(PREFIX, i) for i in rank_nodes(str(shard), NODES)]


@pytest.fixture(scope="module")
def store() -> Iterator[ObjectStore]:
    """An object store on moto's in-process S3 holding one declared job."""
    with mock_aws():
        st = ObjectStore("router-tests")
        st.ensure_bucket()
        st.put_job_spec(JobSpec(job=JOB))
        yield st
        st.close()


@pytest.fixture(scope="module")
def spans(store: ObjectStore) -> str:
    """A job with rounds 0, 1 and 2 committed: a request spanning rounds names committed ones
    (the router answers 404 for any other)."""
    for r in range(3):
        entries = [store.put_update(SPANS, r, f"c{i}", small_update(i)) for i in range(2)]
        store.commit_round(SPANS, r, entries)
    return SPANS


@pytest.fixture
def sleeps() -> list[float]:
    return []


ScriptedRouter = Callable[..., tuple[Router, InProcessNodes]]


@pytest.fixture
def scripted_router(store: ObjectStore, sleeps: list[float]) -> ScriptedRouter:
    """Build a router over ``store`` and scripted nodes answering with ``reply``; ``config``
    are :class:`RouterConfig` fields. The failover policy records its sleeps in ``sleeps``."""

    def make(reply: Reply = hit, **config: Any) -> tuple[Router, InProcessNodes]:
        nodes = InProcessNodes(reply=reply, billed_ms=BILLED_MS, memory_mb=MEMORY_MB)
        router = make_router(
            store, nodes, prefix=PREFIX, nodes=NODES, replication=2, sleep=sleeps.append, **config
        )
        return router, nodes

    return make


def run(router: Router, workload: str = "cosine_select", **body: Any) -> dict[str, Any]:
    return router.run(AUTH, JOB, workload, json.dumps(body or {"round": 1}))


# ---------------------------------------------------------------------- planning and failover


def test_the_config_feeds_the_default_failover_policy(store: ObjectStore) -> None:
    router = Router(
        store,
        InProcessNodes(reply=hit),
        TokenTable.with_tokens({TOKEN: ["*"]}),
        RouterConfig(max_attempts=2, throttle_passes=5),
    )
    assert router.failover == FailoverPolicy(max_attempts=2, throttle_passes=5)


def test_a_round_request_goes_to_the_shards_primary_first(scripted_router: ScriptedRouter) -> None:
    router, nodes = scripted_router()
    answer = run(router, round=1)
    primary = ranked_functions(round_shard(JOB, 1))[0]
    assert nodes.calls == [
        (
            primary,
            {
                "op": "run",
                "workload": "cosine_select",
                "job": JOB,
                # the params the node gets are the workload's defaults, validated by the router
                "params": get_workload("cosine_select").validate({}),
                "round": 1,
            },
        )
    ]
    assert answer["result"] == RESULT and answer["meta"]["nodes"] == [primary]


def test_replicas_are_tried_in_placement_order(scripted_router: ScriptedRouter) -> None:
    router, nodes = scripted_router(down)
    with pytest.raises(UnavailableError):
        run(router, round=1)
    ranking = ranked_functions(round_shard(JOB, 1))
    assert nodes.functions == ranking[:4]
    owners = [node_name(PREFIX, i) for i in place_shard(round_shard(JOB, 1), NODES, 2)]
    assert nodes.functions[:2] == owners


def test_a_failed_node_fails_over_to_the_next(scripted_router: ScriptedRouter) -> None:
    ranking = ranked_functions(round_shard(JOB, 1))

    def primary_down(function: str, event: dict[str, Any]) -> dict[str, Any]:
        return down(function, event) if function == ranking[0] else hit(function, event)

    router, nodes = scripted_router(primary_down)
    answer = run(router, round=1)
    assert nodes.functions == ranking[:2]
    assert answer["meta"]["nodes"] == ranking[:2] and answer["result"] == RESULT


def test_a_throttled_pass_backs_off_then_tries_again(
    scripted_router: ScriptedRouter, sleeps: list[float]
) -> None:
    ranking = ranked_functions(round_shard(JOB, 1))
    busy = {"left": 1}

    def primary_busy_once(function: str, event: dict[str, Any]) -> dict[str, Any]:
        if function == ranking[0] and busy["left"]:
            busy["left"] -= 1
            raise NodeThrottled(f"{function}: throttled")
        if function != ranking[0]:
            return down(function, event)
        return hit(function, event)

    router, nodes = scripted_router(primary_busy_once)
    answer = run(router, round=1)
    assert nodes.functions == [*ranking[:4], ranking[0]]
    assert answer["meta"]["nodes"] == nodes.functions
    assert sleeps == [0.05]


def test_a_nodes_caller_error_is_final(scripted_router: ScriptedRouter) -> None:
    def not_committed(function: str, event: dict[str, Any]) -> dict[str, Any]:
        return {
            "error": {"code": "not_found", "message": "round 9 is not committed"},
            "status": 404,
        }

    router, nodes = scripted_router(not_committed)
    with pytest.raises(NotFoundError, match="round 9 is not committed"):
        run(router, round=9)
    assert len(nodes.calls) == 1


def test_503_after_max_attempts(scripted_router: ScriptedRouter, sleeps: list[float]) -> None:
    router, nodes = scripted_router(down, max_attempts=3)
    with pytest.raises(UnavailableError) as err:
        run(router, round=1)
    assert err.value.status == 503 and len(nodes.calls) == 3
    assert f"shard {round_shard(JOB, 1)}" in err.value.message
    assert sleeps == []


def test_nothing_is_invoked_for_a_request_that_fails_validation(
    scripted_router: ScriptedRouter,
) -> None:
    router, nodes = scripted_router()
    with pytest.raises(ValidationError):
        run(router, round=1, params={"k": 0})
    assert nodes.calls == []


# ---------------------------------------------------------------------- classes of workload


def test_a_meta_request_goes_to_the_meta_shard_with_its_rounds(
    scripted_router: ScriptedRouter, spans: str
) -> None:
    router, nodes = scripted_router()
    answer = router.run(AUTH, spans, "oort_select", json.dumps({"rounds": [0, 2]}))
    function, event = nodes.calls[0]
    assert function == ranked_functions(meta_shard(spans))[0]
    assert event["rounds"] == [0, 2] and "round" not in event
    assert answer["round"] is None


def test_a_client_request_is_one_invocation_on_the_meta_shard(
    scripted_router: ScriptedRouter, spans: str
) -> None:
    """Every client's rows are in the job's meta shard: the router sends the whole request to
    its owner, which answers for every client asked, finalised; no scatter, nothing merged."""
    clients = [f"c{i}" for i in range(8)]
    final = {"values": {c: int(c[1:]) / 10 for c in clients}, "selected": clients[::-1]}

    def reply(function: str, event: dict[str, Any]) -> dict[str, Any]:
        return {"result": final, "cache": "hit", "s3_gets": 0}

    router, nodes = scripted_router(reply)
    body = {"params": {"clients": clients}, "rounds": [0, 1]}
    answer = router.run(AUTH, spans, "reputation", json.dumps(body))
    assert nodes.functions == ranked_functions(meta_shard(spans))[:1]
    _, event = nodes.calls[0]
    assert event["params"]["clients"] == clients and event["rounds"] == [0, 1]
    assert "clients" not in event  # the node reads them from the params
    assert answer["result"] == final and answer["meta"]["cache"] == "hit"
    assert answer["meta"]["nodes"] == ranked_functions(meta_shard(spans))[:1]


def test_a_client_request_fails_over_to_the_meta_shards_replica(
    scripted_router: ScriptedRouter,
) -> None:
    primary, replica = ranked_functions(meta_shard(JOB))[:2]

    def reply(function: str, event: dict[str, Any]) -> dict[str, Any]:
        if function == primary:
            raise NodeFailure(f"{function}: Unhandled")
        return {"result": {"values": {"c0": 1.0}}, "cache": "miss", "s3_gets": 2}

    router, nodes = scripted_router(reply)
    answer = router.run(AUTH, JOB, "incentive", json.dumps({}))
    assert nodes.functions == [primary, replica]
    assert answer["result"] == {"values": {"c0": 1.0}}
    assert answer["meta"]["nodes"] == [primary, replica]


def test_a_bad_client_id_is_refused_before_any_invocation(scripted_router: ScriptedRouter) -> None:
    router, nodes = scripted_router()
    with pytest.raises(ValidationError):
        router.run(AUTH, JOB, "reputation", json.dumps({"params": {"clients": ["c0", "../x"]}}))
    assert nodes.calls == []


# ---------------------------------------------------------------------- prefetch


def test_prefetch_asks_every_owner_and_only_the_primary_writes_models(
    scripted_router: ScriptedRouter,
) -> None:
    shards = [round_shard(JOB, 1), round_shard(JOB, 2), meta_shard(JOB)]
    router, nodes = scripted_router(lambda f, e: {"loaded": e["shards"]})
    answers = router.prefetch(shards)
    want_shards: dict[str, list[str]] = {}
    want_models: dict[str, list[str]] = {}
    for shard in shards:
        owners = [node_name(PREFIX, i) for i in place_shard(shard, NODES, 2)]
        for owner in owners:
            want_shards.setdefault(owner, []).append(str(shard))
        want_models.setdefault(owners[0], []).append(str(shard))
    assert {f: e["shards"] for f, e in nodes.calls} == want_shards
    assert {f: e["models"] for f, e in nodes.calls} == {
        f: want_models.get(f, []) for f in want_shards
    }
    assert all(e["op"] == "load" for _, e in nodes.calls)
    # the nodes' answers, with what each invocation was billed (the job declares no model:
    # its rounds have no model artifacts to compute, tests/unit/test_prefetch_artifacts.py)
    billed = {"invocations": 1, "billed_ms": BILLED_MS, "memory_mb": MEMORY_MB}
    assert answers == {f: {"loaded": s, **billed} for f, s in want_shards.items()}


def test_prefetch_reports_a_node_that_did_not_answer(scripted_router: ScriptedRouter) -> None:
    router, _ = scripted_router(down)
    answers = router.prefetch([round_shard(JOB, 1)])
    assert len(answers) == 2
    assert all(a["error"]["code"] == "unavailable" for a in answers.values())


# ---------------------------------------------------------------------- the answer


def test_a_result_over_the_response_limit_is_offloaded_to_results(
    scripted_router: ScriptedRouter, store: ObjectStore
) -> None:
    router, _ = scripted_router(response_limit=32)
    answer = run(router, round=1)
    body = json.dumps(RESULT, sort_keys=True).encode()
    assert answer["result"]["bytes"] == len(body)
    key = answer["result"]["result_key"]
    assert key.startswith(layout.results_prefix(JOB, "cosine_select", 1))
    assert json.loads(store.get_object(key)) == RESULT


def test_a_result_within_the_limit_is_inline(scripted_router: ScriptedRouter) -> None:
    router, _ = scripted_router()
    assert run(router, round=1)["result"] == RESULT


def test_the_answer_carries_the_nodes_the_cache_state_and_the_cost(
    scripted_router: ScriptedRouter,
) -> None:
    ranking = ranked_functions(round_shard(JOB, 3))

    def cold_replica(function: str, event: dict[str, Any]) -> dict[str, Any]:
        if function == ranking[0]:
            return down(function, event)
        return {"result": RESULT, "cache": "miss", "s3_gets": 6, "timing_ms": {"load": 5.0}}

    router, _ = scripted_router(cold_replica)
    answer = run(router, round=3)
    assert answer["job"] == JOB and answer["workload"] == "cosine_select" and answer["round"] == 3
    meta = answer["meta"]
    assert meta["nodes"] == ranking[:2]
    assert meta["cache"] == "miss" and meta["s3_gets"] == 6
    assert meta["node_timing_ms"] == {"load": 5.0}
    # only the node that answered is billed, beside the router's own invocation
    expected = flstore_request_cost(
        [Invocation(ranking[1], BILLED_MS, MEMORY_MB)], s3_gets=6, prices=DEFAULT_PRICES
    )
    breakdown = meta["cost_breakdown"]
    assert breakdown["nodes"] == pytest.approx(expected.lambda_compute + expected.lambda_requests)
    assert breakdown["api_gateway"] == pytest.approx(expected.api_gateway)
    assert breakdown["s3"] == pytest.approx(expected.s3)
    assert meta["cost_usd"] == sum(breakdown.values())
    assert meta["cost_usd"] > expected.total  # the router's invocation is billed too
    assert meta["latency_ms"] >= 0


def router_share(latency_ms: float, memory_mb: int) -> tuple[float, float]:
    """The router's charge for a request whose meta.latency_ms (rounded to 1 µs) reads
    ``latency_ms``: between its bill for the µs below and above it."""
    lo, hi = (Invocation("router", max(latency_ms + d, 0.0), memory_mb) for d in (-1e-3, 1e-3))
    return invocations_cost([lo]), invocations_cost([hi])


def test_the_router_bills_its_own_invocation_at_its_memory_for_the_request_duration(
    scripted_router: ScriptedRouter,
) -> None:
    for memory in (512, 3008):
        router, _ = scripted_router(router_memory_mb=memory)
        meta = run(router, round=3)["meta"]
        lo, hi = router_share(meta["latency_ms"], memory)
        assert lo <= meta["cost_breakdown"]["router"] <= hi
        # Lambda bills duration rounded up to 1 ms, plus the request fee
        billed = math.ceil(meta["latency_ms"]) / 1000 * memory / 1024
        assert meta["cost_breakdown"]["router"] == pytest.approx(
            billed * DEFAULT_PRICES.lambda_gb_second_x86 + 0.2e-6, rel=0.05
        )
    assert RouterConfig().router_memory_mb == 512  # the deployment's routerMemoryMb


def test_the_deployed_router_reads_its_memory_from_lambdas_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "768")
    assert RouterConfig.from_env().router_memory_mb == 768
