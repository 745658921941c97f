"""benchmarks/novel.py end to end in its ``--quick`` form (a digits_cnn round of 10 clients, a
small meta job): every workload of the catalogue runs on flstore-warm, objstore-agg and
cache-agg with params no earlier request used, the three answer the same, the floor's mean of
the round equals FLStore's unweighted fedavg, and the JSON has ARCHITECTURE §9's shape."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from evaluation.baselines import redis_server_binary
from flstore_core.workloads import catalogue
from tests.conftest import run_quick_benchmark

ROOT = Path(__file__).resolve().parents[2]
SYSTEMS = {"flstore-warm", "objstore-agg", "cache-agg"}


def test_novel_benchmark_help() -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "novel.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    for option in ("--json", "--quick", "--repetitions", "--validation", "--workloads"):
        assert option in out
    assert "--floor-worker" not in out  # internal


@pytest.mark.skipif(redis_server_binary() is None, reason="cache-agg needs redis-server")
def test_quick_run_every_workload_new_params_and_agreeing_answers(tmp_path: Path) -> None:
    out = tmp_path / "novel.json"
    done = run_quick_benchmark("novel", out, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["benchmark"] == "novel"
    assert {"cpus", "python", "numpy"} <= set(report["machine"])
    names = {w["name"] for w in catalogue()}
    runs = report["runs"]
    for run in runs:
        assert run["metric"] == "latency_ms"
        assert {"p50", "p95", "n"} <= set(run) and run["n"] >= 1 and run["p50"] > 0
    # one run per system and workload, every workload of the catalogue, plus one floor run
    seen = {(r["system"], r["workload"]) for r in runs if r["system"] in SYSTEMS}
    assert seen == {(s, n) for s in SYSTEMS for n in names}
    floors = [r for r in runs if r["system"] == "floor"]
    assert len(floors) == 1 and floors[0]["shape"][0] == 10
    # flstore runs carry the node's compute where one node answered (round workloads do)
    for run in runs:
        if run["system"] == "flstore-warm" and run["class"] == "round":
            assert run["compute_ms"] is not None and run["compute_ms"] >= 0
            assert run["how_new"]
    for name in ("fedavg", "trimmed_mean", "krum", "multi_krum", "fltrust", "personalize"):
        fl = next(r for r in runs if r["system"] == "flstore-warm" and r["workload"] == name)
        assert fl["write_ms"] is not None and fl["write_ms"] <= fl["node_compute_ms"]
    # the three systems answered the same (models within 1e-5), and no params were reused
    checks = report["checks"]
    for name in names:
        assert checks[name]["differ"] == [], (name, checks[name])
        assert checks[name]["identical"] + checks[name]["within_tolerance"] == 2
        assert checks[name]["repeated_params"] == 0
    assert checks["floor"]["max_rel_dev"] < 1e-5
    summary = report["summary"]
    assert set(summary["ratios"]) == names
    assert summary["floor_p50_ms"] == floors[0]["p50"]
    assert {"model_workloads_le_0.20_objstore", "none_slower_than_a_baseline"} <= set(
        summary["targets"]
    )
