"""The network model's table and its pacing parts (lambdas.local_runtime.network)."""

from __future__ import annotations

import json
import time

import pytest

from flstore_core.aws import s3_client
from flstore_core.storage.s3 import S3BlobStore
from lambdas.local_runtime.fault_proxy import FaultProxy
from lambdas.local_runtime.network import (
    MB,
    MiB,
    NetworkModel,
    Nic,
    invoke_delay_s,
    load_network,
    redis_delay_s,
)
from lambdas.local_runtime.s3_server import LocalS3


def test_every_figure_has_a_unit_and_a_source() -> None:
    rows = NetworkModel().table()
    assert {r["field"] for r in rows} >= {"api_gateway_ms", "lambda_invoke_ms", "s3_get_ms"}
    for row in rows:
        assert row["unit"] and row["source"], row


def test_load_network_overrides_and_refuses_unknown_fields(tmp_path) -> None:
    assert load_network(None) is None and load_network("none") is None
    assert load_network("aws") == NetworkModel()
    path = tmp_path / "net.json"
    path.write_text(json.dumps({"s3_get_ms": 5}))
    model = load_network(path)
    assert model is not None and model.s3_get_ms == 5 and model.s3_put_ms == 40
    with pytest.raises(ValueError, match="unknown"):
        load_network({"s3_get": 5})
    with pytest.raises(ValueError, match=">= 0"):
        load_network({"s3_get_ms": -1})


def test_nic_bursts_then_holds_its_sustained_rate() -> None:
    nic = Nic(75 * MiB, burst_rate_bytes_s=1200 * MiB, burst_bytes=300 * MiB)
    done = nic.reserve(300 * MiB, now=0.0)
    assert done == pytest.approx(300 / 1200)
    # the burst is spent: of the next 75 MiB only what refilled meanwhile (a quarter second
    # at 75 MiB/s) moves at the burst rate, the rest at the sustained rate
    after = nic.reserve(75 * MiB, now=done)
    assert after - done == pytest.approx(18.75 / 1200 + 56.25 / 75, rel=1e-9)


def test_nic_queues_concurrent_transfers() -> None:
    nic = Nic(100 * MB)
    a = nic.reserve(100 * MB, now=0.0)
    b = nic.reserve(100 * MB, now=0.0)  # arrives while the first is moving
    assert (a, b) == (pytest.approx(1.0), pytest.approx(2.0))


def test_s3_get_pays_first_byte_then_one_connections_rate() -> None:
    model = NetworkModel()
    link = model.s3_link(model.ec2_nic)  # 1.25 GB/s: the connection is the bottleneck
    assert link.delay_s("GET", 0, now=0.0) == pytest.approx(0.027)
    assert link.delay_s("PUT", 0, now=0.0) == pytest.approx(0.040)
    assert link.delay_s("GET", int(87.5 * MB), now=0.0) == pytest.approx(1.027)


def test_parallel_gets_share_a_lambdas_sustained_rate() -> None:
    model = NetworkModel(lambda_burst_mib=0.0)
    link = model.s3_link(model.lambda_nic)
    delays = [link.delay_s("GET", 75 * MiB, now=0.0) for _ in range(4)]
    # four connections could move 350 MB/s; the function's 75 MiB/s interface cannot
    assert delays[-1] == pytest.approx(0.027 + 4.0)


def test_invoke_and_redis_delays_include_their_round_trip() -> None:
    model = NetworkModel()
    assert invoke_delay_s(model, model.lambda_nic, 0) == pytest.approx(0.025)
    assert redis_delay_s(model, model.redis_nic, 0) == pytest.approx(0.0004)
    assert redis_delay_s(model, Nic(1 * MB), 1 * MB) == pytest.approx(1.0004, rel=1e-3)


def test_the_s3_proxy_with_a_link_makes_each_request_wait_its_modelled_time(
    s3_server: LocalS3,
) -> None:
    model = load_network({"s3_get_ms": 60, "s3_put_ms": 90})
    assert model is not None
    with FaultProxy(s3_server.url, link=model.s3_link(model.ec2_nic)) as proxy:
        store = S3BlobStore("network-model-test", s3_client(proxy.url))
        store.prepare()
        t0 = time.perf_counter()
        store.put("k", b"v")
        t1 = time.perf_counter()
        assert store.get("k") == b"v"
        t2 = time.perf_counter()
    # lower bounds only: a busy host makes any request slower, never faster than its model
    assert t1 - t0 >= 0.090 and t2 - t1 >= 0.060
