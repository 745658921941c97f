"""A reduced `flstore demo`: a Flower job feeding FLStore, then the catalogue over HTTP."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from evaluation.demo import run_demo


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    out = tmp_path_factory.mktemp("demo-out")
    return run_demo(clients=8, rounds=4, repetitions=1, out=str(out)), out


def test_every_round_of_the_flower_run_is_committed(report: tuple[dict[str, Any], Path]) -> None:
    rep, _ = report
    assert rep["flower"]["committed_rounds"] == [0, 1, 2, 3]
    assert rep["flower"]["accuracy"][-1] > 0.6


def test_the_malicious_client_is_flagged(report: tuple[dict[str, Any], Path]) -> None:
    rep, _ = report
    (bad,) = rep["flower"]["malicious"]
    results = {n: w["result"] for n, w in rep["workloads"].items() if "result" in w}
    assert results["malicious_cosine"]["flagged"] == [bad]
    krum = results["krum"]["scores"]
    assert max(krum, key=krum.get) == bad
    assert results["feddebug"]["flagged"] == [bad]


def test_every_workload_answered_on_every_system(report: tuple[dict[str, Any], Path]) -> None:
    rep, out = report
    for name, row in rep["workloads"].items():
        assert "error" not in row, (name, row)
        assert "flstore-warm" in row["systems"] and "objstore-agg" in row["systems"], name
        assert "disagree" not in row, (name, row.get("disagree"))
    saved = json.loads((out / "report.json").read_text())
    assert set(saved["workloads"]) == set(rep["workloads"])
    assert (out / "latency.png").stat().st_size > 1000
