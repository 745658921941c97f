"""Token payouts over rounds, proportional to each client's contribution in each round.

Reference: FLStore artifact (incentive distribution). Round t pays ``budget`` tokens split in
proportion to the positive part of each participant's contribution:
``pay_{i,t} = budget · max(c_{i,t}, 0) / Σ_j max(c_{j,t}, 0)``; a client's payout is the sum over
rounds. The contribution ``c`` is the ``contribution`` summary (written by the contribution
workloads' backfill) when present, else the cosine to the round mean, else ``num_examples``
(``metric`` forces one). Class ``client``: per-round summaries only.
"""

from __future__ import annotations

from typing import Any

from flstore_core.cache.shards import ClientHistory, ClientRound
from flstore_core.data.manifest import CONTRIBUTION, COS_TO_MEAN
from flstore_core.workloads import CLIENTS, Param, Workload, register

SOURCES = ("auto", CONTRIBUTION, COS_TO_MEAN, "num_examples")


def contribution(row: ClientRound, metric: str) -> tuple[float, str] | None:
    order = [CONTRIBUTION, COS_TO_MEAN, "num_examples"] if metric == "auto" else [metric]
    for source in order:
        if source == "num_examples":
            return float(row.num_examples), source
        if source in row.summary:
            return float(row.summary[source]), source
    return None


def collect(histories: dict[str, ClientHistory], params: dict[str, Any]) -> dict[str, Any]:
    per: dict[str, dict[str, Any]] = {}
    for c, h in histories.items():
        rows = {}
        for row in h.rows:
            got = contribution(row, params["metric"])
            if got is not None:
                rows[str(row.round)] = {"value": got[0], "source": got[1]}
        per[c] = rows
    return {"per_client": per}


def finalize(merged: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    # sorted: the sums must not depend on the order the nodes' answers were merged in
    per: dict[str, dict[str, Any]] = dict(sorted(merged.get("per_client", {}).items()))
    budget = float(params["budget"])
    totals: dict[str, float] = {}
    for rows in per.values():
        for r in rows:
            totals[r] = totals.get(r, 0.0) + max(float(rows[r]["value"]), 0.0)
    values = {c: 0.0 for c in per}
    by_round: dict[str, dict[str, float]] = {}
    for c, rows in per.items():
        for r, cell in rows.items():
            share = max(float(cell["value"]), 0.0) / totals[r] if totals[r] > 0 else 0.0
            values[c] += budget * share
            by_round.setdefault(r, {})[c] = budget * share
    return {
        "values": values,
        "selected": sorted(values, key=lambda c: (-values[c], c)),
        "rounds": dict(sorted(by_round.items(), key=lambda kv: int(kv[0]))),
        "sources": sorted({cell["source"] for rows in per.values() for cell in rows.values()}),
    }


WORKLOAD = register(
    Workload(
        name="incentive",
        cls="client",
        description="Token payout over rounds proportional to per-round contribution.",
        reference="FLStore artifact (incentive-dist)",
        run=lambda histories, params: collect(histories, params),
        finalize=finalize,
        params={
            "budget": Param("float", 100.0, "tokens paid per round", minimum=0),
            "metric": Param("str", "auto", "contribution source", choices=SOURCES),
            "clients": CLIENTS,
        },
    )
)
