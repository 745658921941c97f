"""Dollars per request against the request rate, from a ``benchmarks/paper.py`` report.

Which system is cheaper depends on how often it is asked. FLStore pays per request (its answers'
``meta.cost_usd``: node and router invocations, API Gateway, S3), plus each round's prefetch
work shared by the round's requests, plus its keep-warm pings by the hour; the baselines'
servers are paid by the hour however few requests they serve, plus their S3 requests. So
FLStore is the cheaper one at low rates, and above a crossover rate the always-on server
amortises better (:func:`flstore_core.cost.crossover_rate`).

The sweep prices every pair of ``requests_per_round`` (:data:`REQUESTS_PER_ROUND`, geometric,
the paper setting's 18 among them) and ``rounds_per_hour`` (:data:`ROUNDS_PER_HOUR`): from one
request an hour to 19,440 an hour (324 a minute). Its inputs are the report's own measurements:
the mean ``meta.cost_usd`` of the flstore runs (``cost_usd_request``), the round's measured
prefetch work (``accounting.round_work_usd``), the keep-warm month over its hours, and each
baseline's mean S3 requests. The headline crossovers are at :data:`CROSSOVER_REQUESTS_PER_ROUND`
(18: one request per workload a round); ``crossovers_by_requests_per_round`` has the others.

Recompute and re-plot from an existing report, without re-running the benchmark::

    python -m benchmarks.cost_sweep paper.json --png cost_sweep.png [--json sweep.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flstore_core import cost

REQUESTS_PER_ROUND = (1, 2, 6, 18, 54, 162)
ROUNDS_PER_HOUR = (1, 2, 6, 15, 30, 60, 120)
CROSSOVER_REQUESTS_PER_ROUND = 18  # the paper setting: one request per workload a round
BASELINE_KEYS = {"objstore-agg": "objstore_usd", "cache-agg": "cache_usd"}
FLSTORE = "flstore-warm"


def sweep_inputs(
    report: dict[str, Any], prices: cost.Prices = cost.DEFAULT_PRICES
) -> cost.SweepInputs:
    """The report's measurements the sweep prices: FLStore's mean request, its round work and
    keep-warm per hour, each baseline's mean S3 cost a request."""
    runs = [r for r in report["runs"] if r.get("n")]
    flstore = [float(r["cost_usd_request"]) for r in runs if r["system"] == FLSTORE]
    if not flstore:
        raise ValueError("the report has no answered flstore-warm run")
    acc = report["accounting"]
    s3: dict[str, float] = {}
    for system in BASELINE_KEYS:
        costs = [
            float(r.get("s3_gets") or 0.0) * prices.s3_get_per_thousand / 1e3
            + float(r.get("s3_puts") or 0.0) * prices.s3_put_per_thousand / 1e3
            for r in runs
            if r["system"] == system
        ]
        s3[system] = statistics.fmean(costs) if costs else 0.0
    return cost.SweepInputs(
        flstore_request_usd=statistics.fmean(flstore),
        round_work_usd=float(acc["round_work_usd"]),
        idle_hourly_usd=float(acc["idle_monthly_usd"]) / cost.HOURS_PER_MONTH,
        baseline_s3_usd=s3,
    )


def sweep_of(
    report: dict[str, Any],
    requests_per_round: Sequence[int] = REQUESTS_PER_ROUND,
    rounds_per_hour: Sequence[float] = ROUNDS_PER_HOUR,
    prices: cost.Prices = cost.DEFAULT_PRICES,
) -> dict[str, Any]:
    """The report's ``sweep``, ``crossovers`` (requests an hour above which FLStore stops being
    cheaper, at :data:`CROSSOVER_REQUESTS_PER_ROUND`; null: cheaper at every rate), the same per
    requests_per_round, and the inputs they were computed from."""
    inputs = sweep_inputs(report, prices)
    sweep = [
        cost.sweep_point(inputs, n, k, prices) for n in requests_per_round for k in rounds_per_hour
    ]
    by_n = {
        str(n): {b: cost.crossover_rate(inputs, b, n, prices) for b in BASELINE_KEYS}
        for n in sorted({*requests_per_round, CROSSOVER_REQUESTS_PER_ROUND})
    }
    return {
        "sweep": sweep,
        "crossovers": by_n[str(CROSSOVER_REQUESTS_PER_ROUND)],
        "crossover_requests_per_round": CROSSOVER_REQUESTS_PER_ROUND,
        "crossovers_by_requests_per_round": by_n,
        "sweep_inputs": {
            "flstore_request_usd": inputs.flstore_request_usd,
            "round_work_usd": inputs.round_work_usd,
            "idle_hourly_usd": inputs.idle_hourly_usd,
            "baseline_s3_usd": dict(inputs.baseline_s3_usd),
            "baseline_hourly_usd": {b: cost.aggregator_hourly(b, prices) for b in BASELINE_KEYS},
            "note": "flstore_usd = flstore_request_usd + round_work_usd / requests_per_round + "
            "idle_hourly_usd / requests_per_hour; a baseline's = hourly / requests_per_hour + "
            "its S3 requests",
        },
    }


def plot(report: dict[str, Any], path: str | Path) -> None:
    """Dollars per request against requests an hour, log-log: the three systems' lines at the
    crossover's requests_per_round, the sweep's other points faint, the crossovers marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = {f.name for f in dataclasses.fields(cost.SweepInputs)}
    inputs = cost.SweepInputs(**{k: v for k, v in report["sweep_inputs"].items() if k in names})
    n = report["crossover_requests_per_round"]
    rates = [10 ** (i / 20) for i in range(0, 20 * 5 + 1)]  # 1 to 100,000 requests an hour
    line = [cost.sweep_point(inputs, n, r / n) for r in rates]
    fig, ax = plt.subplots(figsize=(8, 5.5))
    colours = {"flstore_usd": "tab:blue", "objstore_usd": "tab:orange", "cache_usd": "tab:green"}
    labels = {"flstore_usd": "FLStore", "objstore_usd": "objstore-agg", "cache_usd": "cache-agg"}
    for key, colour in colours.items():
        ax.plot(rates, [p[key] for p in line], color=colour, label=f"{labels[key]} ({n}/round)")
        grid = report["sweep"]
        ax.scatter(
            [p["requests_per_hour"] for p in grid],
            [p[key] for p in grid],
            color=colour,
            s=8,
            alpha=0.35,
        )
    for i, (baseline, rate) in enumerate(report["crossovers"].items()):
        if rate:
            at = cost.sweep_point(inputs, n, rate / n)
            ax.axvline(rate, color=colours[BASELINE_KEYS[baseline]], ls=":", lw=1)
            ax.plot([rate], [at["flstore_usd"]], "kx")
            ax.annotate(
                f"vs {baseline}: {rate:,.0f}/h",
                (rate, at["flstore_usd"]),
                textcoords="offset points",
                xytext=(-150, 20 + 18 * i),  # one label above the other, left of the mark
                fontsize=8,
            )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("requests per hour")
    ax.set_ylabel("USD per request")
    ax.set_title("Cost per request against request rate (points: other requests per round)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    p.add_argument("report", help="a benchmarks/paper.py JSON report")
    p.add_argument("--png", help="write the plot here")
    p.add_argument("--json", help="write the sweep and crossovers here")
    args = p.parse_args(argv)
    report = json.loads(Path(args.report).read_text())
    report.update(sweep_of(report))
    for baseline, rate in report["crossovers"].items():
        shown = "cheaper at every rate" if rate is None else f"{rate:,.0f} requests an hour"
        print(f"crossover vs {baseline} ({CROSSOVER_REQUESTS_PER_ROUND}/round): {shown}")
    if args.json:
        keys = ("sweep", "crossovers", "crossover_requests_per_round")
        out = {k: report[k] for k in (*keys, "crossovers_by_requests_per_round", "sweep_inputs")}
        Path(args.json).write_text(json.dumps(out, indent=2))
        print(f"wrote {args.json}")
    if args.png:
        plot(report, args.png)
        print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
