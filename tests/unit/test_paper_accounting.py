"""The paper benchmark's accounting on hand-made samples: each accounting's formula, the summary's
reductions, the deployed replication; and the cost sweep recomputed from a report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from benchmarks import cost_sweep
from benchmarks.paper_accounting import (
    Sample,
    baseline_costs,
    flstore_costs,
    print_report,
    summary_of,
)
from benchmarks.paper_data import FULL, QUICK
from flstore_core import cost

LOAD = cost.RequestLoad(18, 1.0)


def sample(latency_ms: float, request_usd: float = 0.0, s3_gets: int = 0) -> Sample:
    return Sample(
        latency_ms=latency_ms,
        server_ms=latency_ms - 1.0,
        s3_gets=s3_gets,
        s3_puts=0,
        request_usd=request_usd,
        cache="hit",
        result={},
        cost_breakdown={"nodes": 1e-6, "router": 5e-7, "api_gateway": 1e-6, "s3": 0.0},
    )


def test_the_paper_benchmark_runs_the_deployed_replication() -> None:
    # both replicas load each round and compute its artifacts: the prefetch charged is the
    # deployed one's (infra's replication and FLSTORE_REPLICATION default to 2)
    assert FULL.replication == 2 and QUICK.replication == 2


def test_flstore_pays_its_answers_cost_once_and_the_paper_rate_on_its_wall_time() -> None:
    got = flstore_costs([sample(36.0, 2.5e-6), sample(72.0, 3.5e-6)], overhead=1e-5)
    # meta.cost_usd already holds the router's invocation: nothing is added for it here
    assert got["cost_usd"] == pytest.approx(3e-6 + 1e-5, rel=1e-12)
    assert got["cost_usd_duration"] == got["cost_usd"]
    # 54 ms mean wall time at 0.11988 $/h
    assert got["cost_usd_paper"] == pytest.approx(54 / 3.6e6 * 0.11988, rel=1e-12)
    assert got["cost_breakdown"] == pytest.approx(
        {"nodes": 1e-6, "router": 5e-7, "api_gateway": 1e-6, "s3": 0.0}
    )


def test_a_baseline_pays_the_paper_rate_on_its_wall_time() -> None:
    got = baseline_costs("cache-agg", [sample(360.0), sample(720.0)], LOAD)
    assert got["cost_usd_paper"] == pytest.approx(540 / 3.6e6 * 0.922, rel=1e-12)
    assert got["cost_usd"] == pytest.approx(0.398 / 1080, rel=1e-12)


def runs_of(flstore_paper: list[float], baseline_paper: list[float]) -> list[dict[str, Any]]:
    runs: list[dict[str, Any]] = []
    for i, (f, b) in enumerate(zip(flstore_paper, baseline_paper, strict=True)):
        for system, paper in (("flstore-warm", f), ("objstore-agg", b), ("cache-agg", b)):
            runs.append(
                {
                    "workload": f"w{i}",
                    "system": system,
                    "class": "round",
                    "agree": True,
                    "n": 1,
                    "p50": 10.0,
                    "cost_usd": 1.0,
                    "cost_usd_duration": 1.0,
                    "cost_usd_paper": paper,
                    "cost_usd_request": 2e-6,
                    "s3_gets": 10.0 if system == "objstore-agg" else 0.0,
                    "s3_puts": 1.0,
                }
            )
    return runs


def test_summary_reports_the_paper_accountings_mean_and_peak_reduction() -> None:
    summary = summary_of(runs_of([1.0, 3.0], [4.0, 4.0]))
    for baseline in ("objstore-agg", "cache-agg"):
        assert summary[baseline]["cost_paper_reduction_avg"] == pytest.approx((0.75 + 0.25) / 2)
        assert summary[baseline]["cost_paper_reduction_peak"] == pytest.approx(0.75)


def report_of() -> dict[str, Any]:
    return {
        "runs": runs_of([1.0, 3.0], [4.0, 4.0]),
        "accounting": {"round_work_usd": 1.8e-4, "idle_monthly_usd": 7.2},
    }


def test_the_sweep_is_priced_from_the_reports_own_measurements() -> None:
    report = report_of()
    inputs = cost_sweep.sweep_inputs(report)
    assert inputs.flstore_request_usd == pytest.approx(2e-6)
    assert inputs.round_work_usd == 1.8e-4
    assert inputs.idle_hourly_usd == pytest.approx(0.01)  # $7.20 over a 720-hour month
    assert inputs.baseline_s3_usd["objstore-agg"] == pytest.approx(10 * 4e-7 + 5e-6)
    assert inputs.baseline_s3_usd["cache-agg"] == pytest.approx(5e-6)
    out = cost_sweep.sweep_of(report, requests_per_round=(1, 18), rounds_per_hour=(1, 60))
    assert [(p["requests_per_round"], p["rounds_per_hour"]) for p in out["sweep"]] == [
        (1, 1),
        (1, 60),
        (18, 1),
        (18, 60),
    ]
    paper_point = out["sweep"][3]
    assert paper_point["requests_per_hour"] == 1080
    assert paper_point["flstore_usd"] == pytest.approx(2e-6 + 1e-5 + 0.01 / 1080)
    assert paper_point["cache_usd"] == pytest.approx(0.398 / 1080 + 5e-6)
    # at 18 a round FLStore's request costs A = 1.2e-5: cache-agg's line meets it at
    # (0.398 - 0.01) / (1.2e-5 - 5e-6) requests an hour
    assert out["crossover_requests_per_round"] == 18
    assert out["crossovers"]["cache-agg"] == pytest.approx(0.388 / 7e-6, rel=1e-9)
    assert out["crossovers"]["objstore-agg"] == pytest.approx(0.182 / 3e-6, rel=1e-9)
    assert set(out["crossovers_by_requests_per_round"]) == {"1", "18"}
    # fewer requests a round share the round's work among fewer: an earlier crossover
    by_n = out["crossovers_by_requests_per_round"]
    assert by_n["1"]["cache-agg"] < by_n["18"]["cache-agg"]


def test_the_sweep_is_redrawn_from_a_saved_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    saved = tmp_path / "paper.json"
    saved.write_text(json.dumps(report_of()))
    png, out = tmp_path / "sweep.png", tmp_path / "sweep.json"
    cost_sweep.main([str(saved), "--png", str(png), "--json", str(out)])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    written = json.loads(out.read_text())
    assert written["crossovers"]["cache-agg"] == pytest.approx(0.388 / 7e-6, rel=1e-9)
    assert len(written["sweep"]) == len(cost_sweep.REQUESTS_PER_ROUND) * len(
        cost_sweep.ROUNDS_PER_HOUR
    )
    rates = [p["requests_per_hour"] for p in written["sweep"]]
    assert min(rates) == 1 and max(rates) >= 100 * 60  # one an hour to hundreds a minute
    assert "crossover vs cache-agg (18/round): 55,429 requests an hour" in capsys.readouterr().out


def test_the_printout_names_the_paper_accounting_and_the_crossovers(
    capsys: pytest.CaptureFixture[str],
) -> None:
    report = report_of()
    report["summary"] = summary_of(report["runs"])
    report["accounting"].update(
        {"requests_per_round": 18, "rounds_per_minute": 1.0, "flstore_overhead_per_request_usd": 0}
    )
    report.update(cost_sweep.sweep_of(report), disagreements={}, seconds=1.0)
    print_report(report)
    out = capsys.readouterr().out
    assert "cost_usd_paper" in out
    assert "FLStore is cheaper than cache-agg below 55,429 requests an hour" in out
