"""Token payouts over rounds, proportional to each client's contribution in each round.

Reference: FLStore artifact (incentive distribution). Round t pays ``budget`` tokens split among
*all* its participants P_t in proportion to the positive part of their contribution:

    pay_{i,t} = budget · max(c_{i,t}, 0) / Σ_{j ∈ P_t} max(c_{j,t}, 0)

and a client's payout is the sum over rounds. A payout does not depend on which clients a
request asks about: the denominator is the round's, read from the totals every client row
carries (:class:`~flstore_core.cache.shards.RoundTotals`, summed once per round manifest), so a
request for some clients pays them what a request for all of them does.

The contribution ``c`` is the ``contribution`` summary (written by the contribution workloads'
backfill), the cosine to the round mean (``cos_to_mean``) or ``num_examples``; ``metric``
forces one. ``auto`` picks, *per round*, the first of these that every participant of the round
has, so one round never mixes units (a cosine against an example count); different rounds may
use different ones (``units`` says which). With a forced metric, a participant without it is
paid nothing that round (``missing_rounds``) and the others share the budget. Class ``client``:
per-round summaries only.
"""

from __future__ import annotations

from typing import Any

from flstore_core.cache.shards import ClientHistory, ClientRound
from flstore_core.data.manifest import CONTRIBUTION, COS_TO_MEAN
from flstore_core.workloads import CLIENTS, Param, Workload, register

AUTO_ORDER = (CONTRIBUTION, COS_TO_MEAN, "num_examples")
SOURCES = ("auto", *AUTO_ORDER)


def round_unit(row: ClientRound, metric: str) -> str:
    """The source paying the row's round: ``metric``, or for ``auto`` the first source every
    participant of the round has (``num_examples`` always is)."""
    if metric != "auto":
        return metric
    if row.totals is None:
        raise ValueError("incentive needs rows read from manifests, with their round totals")
    return next(s for s in AUTO_ORDER if row.totals.everyone_has(s))


def contribution(row: ClientRound, metric: str) -> tuple[float, str, float] | None:
    """``(c_{i,t}, source, Σ_j max(c_{j,t}, 0))`` of one row, or ``None`` when the client has no
    value for the round's source."""
    if row.totals is None:
        raise ValueError("incentive needs rows read from manifests, with their round totals")
    source = round_unit(row, metric)
    if source == "num_examples":
        value = float(row.num_examples)
    elif source in row.summary:
        value = float(row.summary[source])
    else:
        return None
    return value, source, row.totals.positive.get(source, 0.0)


def collect(histories: dict[str, ClientHistory], params: dict[str, Any]) -> dict[str, Any]:
    per: dict[str, dict[str, Any]] = {}
    missing: dict[str, list[int]] = {}
    for c, h in histories.items():
        rows: dict[str, Any] = {}
        for row in h.rows:
            got = contribution(row, params["metric"])
            if got is None:
                missing.setdefault(c, []).append(row.round)
            else:
                rows[str(row.round)] = {"value": got[0], "source": got[1], "total": got[2]}
        per[c] = rows
    return {"per_client": per, "missing": missing}


def finalize(merged: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    # sorted: the result must not depend on the order the nodes' answers were merged in
    per: dict[str, dict[str, Any]] = dict(sorted(merged.get("per_client", {}).items()))
    budget = float(params["budget"])
    values = {c: 0.0 for c in per}
    by_round: dict[str, dict[str, float]] = {}
    units: dict[str, str] = {}
    for c, rows in per.items():
        for r, cell in rows.items():
            # budget · max(c_i, 0) / Σ_{j ∈ P_t} max(c_j, 0), the sum over all participants
            total = float(cell["total"])
            pay = budget * max(float(cell["value"]), 0.0) / total if total > 0 else 0.0
            values[c] += pay
            by_round.setdefault(r, {})[c] = pay
            units[r] = cell["source"]
    return {
        "values": values,
        "selected": sorted(values, key=lambda c: (-values[c], c)),
        "rounds": {r: dict(sorted(by_round[r].items())) for r in sorted(by_round, key=int)},
        "units": {r: units[r] for r in sorted(units, key=int)},
        "sources": sorted(set(units.values())),
        "missing_rounds": {
            c: sorted(rs) for c, rs in sorted(merged.get("missing", {}).items()) if rs
        },
    }


WORKLOAD = register(
    Workload(
        name="incentive",
        cls="client",
        description="Token payout over rounds: each round's budget split among all its "
        "participants in proportion to their positive contribution (one unit per round).",
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
