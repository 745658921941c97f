"""benchmarks/chaos.py starts (its options parse; the run itself takes minutes, ``--quick`` ~2),
and the fault proxy it puts in front of S3 forwards transparently and injects each fault."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError

from flstore_core.aws import s3_client
from lambdas.local_runtime.fault_proxy import FaultProxy, Faults

ROOT = Path(__file__).resolve().parents[2]


def test_chaos_benchmark_help() -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "chaos.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    for option in ("--json", "--quick", "--seconds", "--clients", "--budget-mb", "--phases"):
        assert option in out


def test_fault_proxy_is_transparent_then_injects(s3_server: Any) -> None:
    with FaultProxy(s3_server.url) as proxy:
        s3 = s3_client(proxy.url)
        s3.create_bucket(Bucket="proxy-test")
        s3.put_object(Bucket="proxy-test", Key="k", Body=b"x" * 100_000)
        body = s3.get_object(Bucket="proxy-test", Key="k", Range="bytes=10-19")["Body"].read()
        assert body == b"x" * 10
        assert proxy.counts().get("requests", 0) >= 3 and len(proxy.counts()) == 1
        for faults, code in (
            (Faults(slow_down=1.0), "SlowDown"),
            (Faults(internal=1.0), "InternalError"),
        ):
            proxy.faults = faults
            with pytest.raises(ClientError) as err:
                s3.get_object(Bucket="proxy-test", Key="k")
            assert err.value.response["Error"]["Code"] == code
        proxy.faults = Faults(drop=1.0)
        with pytest.raises((EndpointConnectionError, ConnectionError, Exception)):
            s3.head_object(Bucket="proxy-test", Key="k")
        proxy.faults = Faults()
        assert s3.get_object(Bucket="proxy-test", Key="k")["Body"].read() == b"x" * 100_000
        counts = proxy.counts()
        assert counts["slow_down"] >= 1 and counts["internal"] >= 1 and counts["drop"] >= 1


def test_fault_probabilities_are_checked() -> None:
    with pytest.raises(ValueError):
        Faults(slow=0.6, drop=0.6)


def test_a_differing_answer_is_described_by_its_fields_and_largest_relative_difference() -> None:
    import json

    from benchmarks.chaos import difference

    want = json.dumps({"selected": ["c1"], "scores": {"c1": 1.0, "c2": 2.0}, "f": 1})
    got = json.dumps({"selected": ["c1"], "scores": {"c1": 1.0, "c2": 2.000002}, "f": 1})
    detail = difference(want, got)
    assert detail["fields"] == ["scores"]
    assert abs(detail["max_rel_diff"] - 1e-6) < 1e-9
    assert difference(want, want) == {"fields": [], "max_rel_diff": 0.0}


def test_each_phase_ingests_rounds_no_earlier_phase_sent(tmp_path: Path) -> None:
    """A phase's background ingestion goes on from the rounds earlier phases sent (it started
    at round 100 in every phase, so later phases re-ingested rounds whose updates they did not
    check for loss or duplication), and never reaches the killed ingestion's round."""
    import numpy as np

    from benchmarks.chaos import FIRST_INGESTED, KILLED_ROUND, Ingester, Sent

    sent = Sent()
    assert Ingester("http://s3", tmp_path, sent).next_round == {
        "alpha": FIRST_INGESTED,
        "beta": FIRST_INGESTED,
    }
    for job, round_ in (("alpha", 100), ("alpha", 101), ("beta", 100), ("alpha", KILLED_ROUND)):
        sent.rounds[(job, round_)] = {"c": {"w": np.zeros(1, np.float32)}}
    assert Ingester("http://s3", tmp_path, sent).next_round == {"alpha": 102, "beta": 101}
