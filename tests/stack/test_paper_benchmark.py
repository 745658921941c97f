"""benchmarks/paper.py --quick end to end: every workload on every system, the JSON's structure,
the summary's arithmetic against its runs, the systems' agreement and the cost accounting.

The full run (ResNet-18, 10 clients, 50 x 100 summary job) is ``make bench``; ``--quick`` with
one repetition is the same code on a tiny model in about a minute."""

from __future__ import annotations

import json
import statistics
from typing import Any

import pytest

from benchmarks.paper import BASELINES, SYSTEMS, TARGETS, differences
from benchmarks.paper_accounting import REPEAT, REPORTED
from flstore_core import cost
from flstore_core.workloads import catalogue
from tests.conftest import run_quick_benchmark

# about a minute on an idle 2-core machine; several when other benchmarks share it
pytestmark = pytest.mark.timeout(1200)
RUN_FIELDS = (
    "system",
    "metric",
    "p50",
    "p95",
    "n",
    "workload",
    "class",
    "params",
    "cost_usd",
    "cost_usd_duration",
    "cost_usd_paper",
)


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("paper") / "paper.json"
    proc = run_quick_benchmark("paper", out, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "cost_usd_duration" in proc.stdout  # the printed summary names both accountings
    data: dict[str, Any] = json.loads(out.read_text())
    return data


def by_key(report: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(r["workload"], r["system"]): r for r in report["runs"]}


def test_one_run_per_system_and_workload_with_the_section_9_fields(report: dict[str, Any]) -> None:
    assert report["benchmark"] == "paper"
    assert {"cpus", "python", "numpy"} <= set(report["machine"])
    names = {w["name"] for w in catalogue()}
    assert len(names) == 18
    runs = by_key(report)
    assert len(report["runs"]) == len(runs) == 4 * len(names)
    # the three compared systems, and FLStore's repeated request reported beside them
    assert set(runs) == {(w, s) for w in names for s in REPORTED}
    assert set(REPORTED) == {*SYSTEMS, REPEAT}
    for run in report["runs"]:
        assert "error" not in run, run
        for field in RUN_FIELDS:
            assert field in run, (run["workload"], run["system"], field)
        assert run["metric"] == "latency_ms"
        assert run["n"] == 1 and 0 < run["p50"] <= run["p95"]
        assert run["cost_usd"] > 0 and run["cost_usd_duration"] > 0
    setting = report["setting"]
    assert setting["model"] == "digits_cnn" and setting["validation"] > 0
    assert setting["shapley_permutations"] >= 1
    shapley = runs[("contribution_shapley", "flstore-warm")]["params"]
    assert shapley["max_permutations"] == setting["shapley_permutations"]


def test_every_flstore_request_found_its_round_warm(report: dict[str, Any]) -> None:
    runs = by_key(report)
    for w in catalogue():
        if w["class"] == "round":
            assert runs[(w["name"], "flstore-warm")]["cache"] == ["hit"], w["name"]
            assert runs[(w["name"], REPEAT)]["cache"] == ["hit"], w["name"]


def test_every_system_answered_the_same_results(report: dict[str, Any]) -> None:
    assert report["disagreements"] == {}
    assert all(run["agree"] for run in report["runs"])


def test_differences_finds_what_differs_beyond_the_tolerance() -> None:
    a = {"selected": ["c1", "c2"], "scores": {"c1": 1.0, "c2": 0.5}, "model_key": "k"}
    assert differences(a, json.loads(json.dumps(a))) == []
    close = {**a, "scores": {"c1": 1.0 + 1e-9, "c2": 0.5}}
    assert differences(close, a) == []
    far = {**a, "scores": {"c1": 1.01, "c2": 0.5}}
    assert differences(far, a) == ["result.scores.c1"]
    assert differences({**a, "selected": ["c2", "c1"]}, a) == [
        "result.selected[0]",
        "result.selected[1]",
    ]
    assert differences({**a, "extra": 1}, a) == ["result keys"]


def test_summary_is_the_mean_and_peak_of_the_per_workload_reductions(
    report: dict[str, Any],
) -> None:
    runs = by_key(report)
    names = sorted({r["workload"] for r in report["runs"]})
    for baseline in BASELINES:
        s = report["summary"][baseline]
        assert s["workloads"] == len(names)
        for key, field in (
            ("latency_reduction", "p50"),
            ("cost_reduction", "cost_usd"),
            ("cost_duration_reduction", "cost_usd_duration"),
            ("cost_paper_reduction", "cost_usd_paper"),
        ):
            values = [
                1 - runs[(w, "flstore-warm")][field] / runs[(w, baseline)][field] for w in names
            ]
            assert s[f"{key}_avg"] == pytest.approx(statistics.fmean(values), rel=1e-9)
            assert s[f"{key}_peak"] == pytest.approx(max(values), rel=1e-9)
        assert s["targets"] == TARGETS[baseline]
        slower = [w for w in names if runs[(w, "flstore-warm")]["p50"] > runs[(w, baseline)]["p50"]]
        assert s["slower_workloads"] == slower
        for target, value in TARGETS[baseline].items():
            assert s["meets"][target] == (s[target] >= value)


def test_baselines_pay_their_servers_by_the_hour_or_by_the_request(
    report: dict[str, Any],
) -> None:
    acc = report["accounting"]
    assert acc["requests_per_round"] == 18 and acc["requests_per_hour"] == 18 * 60
    p = cost.DEFAULT_PRICES
    for run in report["runs"]:
        if run["system"] in ("flstore-warm", REPEAT):
            continue
        hourly = p.ec2_aggregator_hourly + (
            p.elasticache_node_hourly if run["system"] == "cache-agg" else 0.0
        )
        s3 = run["s3_gets"] * p.s3_get_per_thousand / 1e3 + (
            run["s3_puts"] * p.s3_put_per_thousand / 1e3
        )
        assert run["cost_usd"] == pytest.approx(hourly / 1080 + s3, rel=1e-9)
        # one repetition: the run's server-side duration is the request's
        assert run["cost_usd_duration"] == pytest.approx(
            run["server_ms"] / 3.6e6 * hourly + s3, rel=1e-9
        )
        # a model result is written, and paid for, by the baseline that computes it
        assert run["s3_puts"] == (1 if run["workload"] in MODEL_RESULTS else 0), run["workload"]
        if run["system"] == "objstore-agg" and run["class"] == "round":
            assert run["s3_gets"] >= 10  # the round's updates, read from S3 per request


MODEL_RESULTS = {"fedavg", "krum", "multi_krum", "trimmed_mean", "fltrust", "personalize"}


def test_flstore_pays_its_requests_router_and_share_of_the_rounds_prefetch(
    report: dict[str, Any],
) -> None:
    acc = report["accounting"]
    setting = report["setting"]
    # the prefetch of a new round of each job, with the nodes warm, was measured and billed
    steady = [acc["prefetch"][job]["steady"] for job in acc["prefetch"]]
    assert len(steady) == 2
    for measured in steady:
        assert measured["prefetches"] == setting["accounting_rounds"]
        assert measured["invocations_per_prefetch"] >= 2 and measured["billed_ms_median"] > 0
        assert measured["memory_mb"] == [setting["memory_mb"]]
        # billed as Router.prefetch reports it per node, which agrees with every invocation's
        # own REPORT line as the router's invoker read it
        assert measured["billed_from"] == ["router"]
        assert measured["billed_ms_median"] == pytest.approx(
            measured["invoker_billed_ms_median"], rel=0.05
        )
        assert measured["usd_mean"] > 0
    assert acc["round_work_usd"] == pytest.approx(sum(m["usd_mean"] for m in steady))
    idle = cost.idle_monthly_cost(
        setting["nodes"], setting["memory_mb"], setting["keep_warm_minutes"]
    )
    assert acc["idle_monthly_usd"] == pytest.approx(idle)
    overhead = (acc["round_work_usd"] + idle / 43_200) / 18
    assert acc["flstore_overhead_per_request_usd"] == pytest.approx(overhead, rel=1e-9)
    api_floor = cost.DEFAULT_PRICES.api_gateway_http_per_million / 1e6
    for run in report["runs"]:
        if run["system"] != "flstore-warm":
            continue
        # meta.cost_usd bills the router's own invocation: at least its 1 ms at 512 MB
        router_floor = cost.invocations_cost([cost.router_invocation(1.0)])
        assert run["cost_breakdown"]["router"] >= router_floor
        assert run["cost_usd"] == pytest.approx(run["cost_usd_request"] + overhead, rel=1e-9)
        assert run["cost_usd_request"] >= api_floor + router_floor  # API Gateway and router
        assert run["cost_usd_duration"] == run["cost_usd"]  # per use in both accountings


def test_target_budgets_compare_what_a_target_allows_with_what_flstore_spent(
    report: dict[str, Any],
) -> None:
    acc = report["accounting"]
    budgets = acc["target_budgets"]
    runs = by_key(report)
    names = sorted({r["workload"] for r in report["runs"]})
    spent = sum(runs[(w, "flstore-warm")]["cost_usd"] for w in names)
    assert budgets["spent_per_round_usd"] == pytest.approx(spent, rel=1e-9)
    overhead = acc["flstore_overhead_per_request_usd"] * len(names)
    assert budgets["requests_usd"] == pytest.approx(spent - overhead, rel=1e-9)
    # the digits job has a validation set: its prefetch computed model artifacts
    art_ms = sum(j["steady"]["artifacts_ms_median"] for j in acc["prefetch"].values())
    assert art_ms > 0 and budgets["artifacts_ms"] == pytest.approx(art_ms)
    floor = cost.invocations_cost([cost.Invocation("a", art_ms, 1769)])
    assert budgets["artifacts_floor_usd"] == pytest.approx(floor, rel=1e-9)
    for baseline in BASELINES:
        b = budgets[baseline]
        target = TARGETS[baseline]["cost_reduction_avg"]
        allowed = (1 - target) * sum(runs[(w, baseline)]["cost_usd"] for w in names)
        assert b["allowed_per_round_usd"] == pytest.approx(allowed, rel=1e-9)
        assert b["fits"] == (spent <= allowed)
        assert b["artifacts_floor_fits"] == (floor <= allowed)
        assert b["floor_fits"] == (floor + budgets["fees_floor_usd"] <= allowed)
    # every request's API Gateway and two Lambda request fees, and the PUT of each model result
    puts = sum(runs[(w, "flstore-warm")]["s3_puts"] for w in names)
    puts += sum(j["steady"]["s3_puts_mean"] for j in acc["prefetch"].values())
    assert budgets["model_puts_per_round"] == pytest.approx(puts)
    assert budgets["fees_floor_usd"] == pytest.approx(len(names) * 1.4e-6 + puts * 5e-6, rel=1e-9)


def test_the_paper_accounting_is_wall_time_at_the_artifacts_rates(report: dict[str, Any]) -> None:
    for run in report["runs"]:
        rate = 0.11988 if run["system"] in ("flstore-warm", REPEAT) else 0.922
        # one repetition: the run's mean wall time is its one sample
        assert run["cost_usd_paper"] == pytest.approx(run["p50"] / 3.6e6 * rate, rel=1e-9)
    assert report["setting"]["replication"] == 2  # the deployed replication


def test_the_cost_sweep_and_its_crossovers(report: dict[str, Any]) -> None:
    sweep = report["sweep"]
    assert min(p["requests_per_hour"] for p in sweep) == 1
    assert max(p["requests_per_hour"] for p in sweep) >= 100 * 60
    for point in sweep:
        assert set(point) == {
            "requests_per_round",
            "rounds_per_hour",
            "requests_per_hour",
            "flstore_usd",
            "objstore_usd",
            "cache_usd",
        }
    assert set(report["crossovers"]) == set(BASELINES)
    assert report["crossover_requests_per_round"] == 18
    for baseline, rate in report["crossovers"].items():
        if rate is None:
            continue
        key = {"objstore-agg": "objstore_usd", "cache-agg": "cache_usd"}[baseline]
        n = 18
        below = [p for p in sweep if p["requests_per_round"] == n and p["requests_per_hour"] < rate]
        above = [p for p in sweep if p["requests_per_round"] == n and p["requests_per_hour"] > rate]
        assert all(p["flstore_usd"] < p[key] for p in below)
        assert all(p["flstore_usd"] > p[key] for p in above)
