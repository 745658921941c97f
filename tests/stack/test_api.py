"""The HTTP API end to end: local gateway → router → cache-node functions → S3."""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pytest

from flstore_core.cache.round_data import ArtifactStats
from flstore_core.cache.round_loading import load_round
from flstore_core.data.codec import Update
from flstore_core.routing.placement import node_name, place_shard, round_shard
from flstore_core.workloads import get
from lambdas.local_runtime.stack import LocalStack, StackConfig
from tests.conftest import small_update


def big_update(seed: int, n: int = 1_500_000) -> Update:
    rng = np.random.default_rng(seed)
    return Update(
        {
            "w": rng.standard_normal(n).astype(np.float32),
            "b": rng.standard_normal(10).astype(np.float32),
        },
        num_examples=10 + seed,
    )


@pytest.fixture(scope="module")
def stack(s3_server: Any) -> Iterator[LocalStack]:
    config = StackConfig(
        nodes=3,
        replication=2,
        memory_mb=2048,
        bucket="api-tests",
        s3_endpoint=s3_server.url,
    )
    with LocalStack(config) as st:
        assert st.store is not None
        for r in range(2):
            for i in range(5):
                st.store.put_update("demo", r, f"c{i}", small_update(i + 10 * r))
            st.store.commit_round("demo", r)
        for i in range(4):
            st.store.put_update("big", 0, f"c{i}", big_update(i))
        st.store.commit_round("big", 0)
        for r in range(3):
            entries = [st.store.put_update("hist", r, f"h{i}", small_update(i)) for i in range(6)]
            cos = {f"h{i}": {"cos_to_mean": 1.0 - 0.1 * i - 0.01 * r} for i in range(6)}
            st.store.commit_round("hist", r, entries, summaries=cos)
        st.store.put_job_spec(st.store.get_job_spec("demo"))
        yield st


def call(
    stack: LocalStack,
    method: str,
    path: str,
    body: Any = None,
    token: str | None = "default",
) -> tuple[int, dict[str, Any]]:
    url = urlsplit(stack.gateway_url)
    assert url.hostname is not None
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=120)
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {stack.token if token == 'default' else token}"
    data = json.dumps(body).encode() if body is not None else None
    conn.request(method, path, body=data, headers=headers)
    resp = conn.getresponse()
    payload = json.loads(resp.read() or b"{}")
    conn.close()
    return resp.status, payload


def run(stack: LocalStack, job: str, name: str, body: Any, **kw: Any) -> tuple[int, dict[str, Any]]:
    return call(stack, "POST", f"/v1/jobs/{job}/workloads/{name}", body, **kw)


def test_health_needs_no_token(stack: LocalStack) -> None:
    assert call(stack, "GET", "/v1/health", token=None) == (200, {"status": "ok"})


def test_workloads_lists_the_catalogue(stack: LocalStack) -> None:
    status, body = call(stack, "GET", "/v1/workloads")
    assert status == 200
    names = {w["name"]: w for w in body["workloads"]}
    assert {"fedavg", "cosine_select"} <= set(names)
    assert names["cosine_select"]["class"] == "round"
    assert names["cosine_select"]["params"]["k"]["default"] == 3


def test_rounds_lists_committed_rounds(stack: LocalStack) -> None:
    status, body = call(stack, "GET", "/v1/jobs/demo/rounds")
    assert status == 200 and body["job"] == "demo"
    assert [r["round"] for r in body["rounds"]] == [0, 1]
    assert body["rounds"][0]["clients"] == [f"c{i}" for i in range(5)]
    assert body["rounds"][0]["bytes"] > 0


def test_result_through_the_gateway_equals_a_direct_call(stack: LocalStack) -> None:
    assert stack.store is not None
    status, body = run(stack, "demo", "cosine_select", {"round": 1, "params": {"k": 2}})
    assert status == 200
    data = load_round(stack.store, "demo", 1, ArtifactStats())
    direct = get("cosine_select").run(data, {"k": 2, "use_delta": True}).result
    assert body["result"] == json.loads(json.dumps(direct))
    assert (body["job"], body["workload"], body["round"]) == ("demo", "cosine_select", 1)
    meta = body["meta"]
    assert meta["cache"] in {"hit", "miss"} and meta["latency_ms"] > 0 and meta["cost_usd"] > 0
    assert meta["nodes"][-1] in {node_name("flstore", i) for i in range(3)}


def test_warm_request_after_prefetch_reads_nothing_from_s3(stack: LocalStack) -> None:
    assert stack.router is not None
    stack.router.prefetch([round_shard("demo", 0)])
    status, body = run(stack, "demo", "fedavg", {"round": 0})
    assert status == 200
    assert body["meta"]["cache"] == "hit" and body["meta"]["s3_gets"] == 0
    assert body["result"]["model_key"].startswith("jobs/demo/results/fedavg/00000000/")


def test_prefetch_reaches_exactly_the_owners(stack: LocalStack) -> None:
    assert stack.router is not None
    shard = round_shard("demo", 1)
    owners = place_shard(shard, 3, 2)
    for i in range(3):
        stack.router.node_op(i, {"op": "evict", "all": True})
    stack.router.prefetch([shard])
    for i in range(3):
        shards = stack.router.node_op(i, {"op": "stats"})["shards"]
        assert (str(shard) in shards) == (i in owners)


# Refusals the router decides alone (401, 403, 400, 404, 413, 503) are tested without a stack in
# tests/unit/test_router_handler.py; these two are decided by the cache node that holds the round.


@pytest.mark.parametrize(
    ("name", "body", "code"),
    [
        pytest.param("cosine_select", {"round": 0, "params": {"k": 99}}, 400, id="k-over-clients"),
        pytest.param("fedavg", {"round": 42}, 404, id="round-not-committed"),
    ],
)
def test_refusals_of_the_node_holding_the_round_reach_the_caller(
    stack: LocalStack, name: str, body: dict[str, Any], code: int
) -> None:
    status, answer = run(stack, "demo", name, body)
    assert status == code, answer
    assert set(answer["error"]) == {"code", "message"} and answer["error"]["message"]


def test_eight_concurrent_requests_are_all_correct(stack: LocalStack) -> None:
    expected = run(stack, "demo", "cosine_select", {"round": 0, "params": {"k": 4}})[1]["result"]
    answers: list[tuple[int, dict[str, Any]]] = []

    def worker() -> None:
        answers.append(run(stack, "demo", "cosine_select", {"round": 0, "params": {"k": 4}}))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(answers) == 8
    assert all(status == 200 and body["result"] == expected for status, body in answers)


def test_killed_primary_between_requests_still_answers(stack: LocalStack) -> None:
    assert stack.lam is not None
    shard = round_shard("demo", 1)
    primary = node_name("flstore", place_shard(shard, 3, 2)[0])
    expected = run(stack, "demo", "cosine_select", {"round": 1})[1]["result"]
    stack.lam.kill_instances(primary)
    status, body = run(stack, "demo", "cosine_select", {"round": 1})
    assert status == 200 and body["result"] == expected


def test_killed_primary_during_a_request_still_answers(stack: LocalStack) -> None:
    assert stack.lam is not None and stack.router is not None
    shard = round_shard("big", 0)
    primary = node_name("flstore", place_shard(shard, 3, 2)[0])
    expected = run(stack, "big", "cosine_select", {"round": 0})[1]["result"]
    for i in range(3):
        stack.router.node_op(i, {"op": "evict", "all": True})  # the next request loads from S3

    def kill_soon() -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # kill the moment the primary is running our request
            if any(i.state == "busy" for i in stack.lam.instances(primary)):  # type: ignore[union-attr]
                stack.lam.kill_instances(primary)  # type: ignore[union-attr]
                return
            time.sleep(0.002)

    killer = threading.Thread(target=kill_soon)
    killer.start()
    status, body = run(stack, "big", "cosine_select", {"round": 0})
    killer.join()
    assert status == 200 and body["result"] == expected
    assert body["meta"]["nodes"][0] == primary and len(body["meta"]["nodes"]) >= 2


def test_client_workload_is_answered_by_the_meta_shards_node(stack: LocalStack) -> None:
    from flstore_core.routing.placement import meta_shard

    # every client's rows are in the job's meta shard: one invocation answers for all six
    owner = node_name("flstore", place_shard(meta_shard("hist"), 3, 2)[0])
    status, body = run(stack, "hist", "reputation", {"params": {"decay": 0.5}})
    assert status == 200, body
    assert body["meta"]["nodes"] == [owner]
    values = body["result"]["values"]
    for i in range(6):
        c = [1.0 - 0.1 * i - 0.01 * r for r in range(3)]
        expect = (0.25 * c[0] + 0.5 * c[1] + c[2]) / 1.75
        assert values[f"h{i}"] == pytest.approx(expect)
    assert body["result"]["selected"] == [f"h{i}" for i in range(6)]


def test_rounds_in_the_body_restrict_a_client_workload(stack: LocalStack) -> None:
    status, body = run(
        stack, "hist", "incentive", {"rounds": [0], "params": {"metric": "cos_to_mean"}}
    )
    assert status == 200, body
    assert list(body["result"]["rounds"]) == ["0"]
    assert sum(body["result"]["values"].values()) == pytest.approx(100.0)


def test_prefetch_writes_the_round_fedavg_model_once_on_the_primary(stack: LocalStack) -> None:
    assert stack.router is not None and stack.store is not None
    shard = round_shard("demo", 0)
    owners = place_shard(shard, 3, 2)
    for i in range(3):
        stack.router.node_op(i, {"op": "evict", "all": True})
    # earlier tests wrote the round's FedAvg model: gone, so that this prefetch writes it
    written = [b.key for b in stack.store.blobs.list("jobs/demo/results/fedavg/00000000/")]
    stack.store.delete_results(written)
    puts = {i: stack.router.node_op(i, {"op": "stats"})["s3_puts"] for i in range(3)}
    stack.router.prefetch([shard])
    wrote = {i: stack.router.node_op(i, {"op": "stats"})["s3_puts"] - puts[i] for i in range(3)}
    assert wrote[owners[0]] == 1 and wrote[owners[1]] == 0
    status, body = run(stack, "demo", "fedavg", {"round": 0})
    assert status == 200 and stack.store.get_object(body["result"]["model_key"])
    after = {i: stack.router.node_op(i, {"op": "stats"})["s3_puts"] - puts[i] for i in range(3)}
    assert after == wrote  # the request found its model already written
    # evicted again, the model is found in S3 at its key: a prefetch writes nothing
    for i in range(3):
        stack.router.node_op(i, {"op": "evict", "all": True})
    stack.router.prefetch([shard])
    again = {i: stack.router.node_op(i, {"op": "stats"})["s3_puts"] - puts[i] for i in range(3)}
    assert again == wrote
