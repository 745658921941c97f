"""benchmarks/long_jobs.py end to end in its ``--quick`` form (30 rounds × 8 clients and 6 × 40
on 2 nodes): reputation, incentive and oort_select answer on flstore and objstore-agg alike and
as the float64 reference, the repeated request is a memo hit, every node stays within its
memory and budget, ``flstore rounds`` lists every round, and the JSON has ARCHITECTURE §9's
shape."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import run_quick_benchmark

WORKLOADS = {"reputation", "incentive", "oort_select"}
SYSTEMS = {"flstore-first", "flstore-repeat", "flstore-cold", "objstore-agg"}


def test_quick_run_answers_the_whole_history_within_budget(tmp_path: Path) -> None:
    out = tmp_path / "long_jobs.json"
    done = run_quick_benchmark("long_jobs", out, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["benchmark"] == "long_jobs" and report["machine"]["cpus"]
    runs = report["runs"]
    assert {(r["workload"], r["system"]) for r in runs} == {
        (w, s) for w in WORKLOADS for s in SYSTEMS
    }
    for r in runs:
        assert r["metric"] == "latency_ms" and r["p50"] > 0 and r["n"] >= 1
        assert r["cost_usd"] > 0
        if r["system"] == "flstore-repeat":
            assert r["memo_hits"] == r["n"]
    shapes = report["setup"]["shapes"]
    assert [(s["rounds"], s["clients"]) for s in shapes] == [(30, 8), (6, 40)]
    for shape in shapes:
        assert shape["rounds_listing"]["rounds"] == shape["rounds"] + 1
        for node in shape["nodes"]:
            assert node["peak_rss_mb"] < shape["memory"]
            assert node["bytes_held"] <= node["budget_bytes"]
        for name in ("reputation", "incentive"):
            assert shape["check"][name]["max_rel_dev_reference"] <= 1e-9
        assert all(v["max_rel_dev_objstore"] <= 1e-9 for v in shape["check"].values())
