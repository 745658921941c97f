"""The aggregator baselines under the network model: every hop they make waits AWS's time
(the VPC round trip at the front door, S3 through a pacing proxy, each Redis command), and the
answer is the same as on loopback."""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest

from evaluation.baselines import (
    Aggregator,
    RedisObjects,
    RedisServer,
    populate_redis,
    redis_server_binary,
)
from evaluation.baselines.aggregator import main as aggregator_main
from flstore_core.data import layout
from flstore_core.storage.object_store import ObjectStore
from lambdas.local_runtime.network import NetworkModel, load_network
from lambdas.local_runtime.s3_server import LocalS3
from tests.conftest import small_update

JOB = "netjob"
BUCKET = "baselines-network-tests"
CLIENTS = 3
# big enough to stand out of a loaded 2-core machine's noise, small enough for a quick test
SLOW = {"vpc_round_trip_ms": 50.0, "elasticache_get_ms": 30.0, "s3_get_ms": 30.0}

needs_redis = pytest.mark.skipif(
    redis_server_binary() is None, reason="redis-server is not installed; cache-agg needs it"
)


@pytest.fixture(scope="module")
def store(s3_server: LocalS3) -> Iterator[ObjectStore]:
    st = ObjectStore(BUCKET, endpoint_url=s3_server.url)
    st.ensure_bucket()
    st.put_initial(JOB, small_update(7))
    for i in range(CLIENTS):
        st.put_update(JOB, 0, f"c{i}", small_update(i))
    st.commit_round(JOB, 0)
    yield st
    st.close()


@pytest.fixture(scope="module")
def redis_url(store: ObjectStore) -> Iterator[str]:
    if redis_server_binary() is None:
        pytest.skip("redis-server is not installed")
    with RedisServer() as server:
        client = server.client()
        populate_redis(store, client, JOB, 0)
        client.close()
        yield server.url


def ask(url: str) -> tuple[float, dict[str, Any]]:
    """One cosine_select request, timed from the client (ms), and its answer."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    body = json.dumps({"round": 0, "params": {"k": 2}}).encode()
    t0 = time.perf_counter()
    conn.request("POST", f"/v1/jobs/{JOB}/workloads/cosine_select", body=body)
    resp = conn.getresponse()
    answer = json.loads(resp.read())
    ms = (time.perf_counter() - t0) * 1000
    conn.close()
    assert resp.status == 200, answer
    return ms, answer


def fastest(url: str, n: int = 3) -> tuple[float, dict[str, Any]]:
    runs = [ask(url) for _ in range(n)]
    return min(ms for ms, _ in runs), runs[-1][1]


def compare(source: str, s3: str, redis: str | None) -> tuple[float, Any, Any]:
    """The paced aggregator's fastest time, and the loopback and paced answers."""
    with Aggregator(source, s3, BUCKET, redis) as plain:  # type: ignore[arg-type]
        _, local = fastest(plain.url)
    model = load_network(SLOW)
    assert model is not None
    with Aggregator(source, s3, BUCKET, redis, network=model) as paced:  # type: ignore[arg-type]
        paced_ms, modelled = fastest(paced.url)
    return paced_ms, local, modelled


def test_objstore_agg_pays_the_vpc_round_trip_and_s3_first_bytes(
    s3_server: LocalS3, store: ObjectStore
) -> None:
    paced_ms, local, modelled = compare("s3", s3_server.url, None)
    # the front door once, then S3 twice in sequence at least: the manifest, then the updates
    # (in parallel) — each a first byte of s3_get_ms
    # (the delays alone: the paced run's own work can be a little quicker than the fastest
    # loopback run's, so adding the loopback time failed on a tenth of a millisecond of noise)
    assert paced_ms >= SLOW["vpc_round_trip_ms"] + 2 * SLOW["s3_get_ms"]
    assert modelled["result"] == local["result"]
    assert modelled["meta"]["s3_gets"] == local["meta"]["s3_gets"]
    assert modelled["meta"]["fetch_ms"] >= 2 * SLOW["s3_get_ms"]


@needs_redis
def test_cache_agg_pays_the_vpc_round_trip_and_a_round_trip_per_redis_command(
    s3_server: LocalS3, redis_url: str
) -> None:
    paced_ms, local, modelled = compare("redis", s3_server.url, redis_url)
    # the manifest, then the updates and base (in parallel), then the job spec: three GETs in
    # sequence, each one ElastiCache round trip
    assert paced_ms >= SLOW["vpc_round_trip_ms"] + 3 * SLOW["elasticache_get_ms"]
    assert modelled["result"] == local["result"]
    assert modelled["meta"]["redis_gets"] == local["meta"]["redis_gets"]
    assert modelled["meta"]["s3_gets"] == local["meta"]["s3_gets"] == 0


@needs_redis
def test_every_redis_command_is_one_hop_a_pipeline_too(store: ObjectStore, redis_url: str) -> None:
    hops: list[int] = []
    objects = RedisObjects(redis_url, hop=hops.append)
    try:
        key = layout.manifest_key(JOB, 0)
        value = objects.get(key)
        assert value is not None and hops == [len(value)]
        assert objects.get_range(key, 0, 10) == bytes(value[:10])  # EXISTS + GETRANGE: one
        assert hops[1:] == [10]
        assert objects.head(key) is not None  # STRLEN only
        assert objects.head("jobs/none/nothing") is None  # STRLEN, then EXISTS
        assert hops[2:] == [0, 0, 0]
        assert objects.get("jobs/none/nothing") is None and hops[-1] == 0
    finally:
        objects.close()


def test_without_a_model_the_command_line_is_unchanged() -> None:
    plain = Aggregator("s3", "http://127.0.0.1:9", BUCKET)
    assert not any(arg.startswith("--network") for arg in plain.command())
    paced = Aggregator("s3", "http://127.0.0.1:9", BUCKET, network=NetworkModel())
    cmd = paced.command()
    model = load_network(json.loads(cmd[cmd.index("--network-json") + 1]))
    assert model == NetworkModel()  # the child rebuilds the very table the parent holds


def test_a_malformed_model_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        aggregator_main(["--source", "s3", "--network-json", '{"warp_ms": 1}'])
    assert exc.value.code == 2
    assert "warp_ms" in capsys.readouterr().err
