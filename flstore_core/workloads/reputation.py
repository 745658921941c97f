"""Client reputation across rounds: a decayed mean of each client's cosine to the consensus.

Reference: reputation-based FL defences (e.g. Kang et al. 2019, "Incentive mechanism for
reliable federated learning"); here, for round t with cosine c_t of the client's update to the
round mean (written by ingestion as the ``cos_to_mean`` summary),
``rep_T = Σ_t γ^(T−t) · c_t / Σ_t γ^(T−t)`` over the rounds the client took part in, reported
after every round as a series. Class ``client``: it reads per-round summaries, never tensors.
"""

from __future__ import annotations

from typing import Any

from flstore_core.cache.shards import ClientHistory
from flstore_core.data.manifest import COS_TO_MEAN
from flstore_core.workloads import CLIENTS, Param, Workload, register


def reputation_series(history: ClientHistory, decay: float) -> dict[str, Any]:
    """The decayed-mean series of one client, and the rounds without a cosine summary.

    The weights decay by *round*, not by participation: a client seen in rounds 0 and 10 has
    its round-0 cosine weighted ``γ^10`` against round 10's, as the formula above says. Past
    the client's last round the value does not move (numerator and denominator scale alike).
    """
    num = den = 0.0
    prev: int | None = None
    series: list[list[float]] = []
    missing: list[int] = []
    for row in sorted(history.rows, key=lambda row: row.round):
        c = row.summary.get(COS_TO_MEAN)
        if c is None:
            missing.append(row.round)
            continue
        # Σ_t γ^(T−t)·c_t carried from the previous summarised round P: × γ^(T−P), then + c_T
        fade = 1.0 if prev is None else decay ** (row.round - prev)
        num = fade * num + c
        den = fade * den + 1.0
        prev = row.round
        series.append([row.round, num / den])
    return {"series": series, "missing": missing}


def collect(histories: dict[str, ClientHistory], params: dict[str, Any]) -> dict[str, Any]:
    return {"per_client": {c: reputation_series(h, params["decay"]) for c, h in histories.items()}}


def finalize(merged: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    per = merged.get("per_client", {})
    values = {c: v["series"][-1][1] for c, v in per.items() if v["series"]}
    ranked = sorted(values, key=lambda c: (-values[c], c))
    threshold = params.get("threshold")
    return {
        "values": values,
        "selected": ranked,
        "series": {c: v["series"] for c, v in sorted(per.items())},
        "flagged": [c for c in reversed(ranked) if threshold is not None and values[c] < threshold],
        "missing_rounds": {c: v["missing"] for c, v in sorted(per.items()) if v["missing"]},
    }


WORKLOAD = register(
    Workload(
        name="reputation",
        cls="client",
        description="Per-client reputation series: decayed mean of cosine-to-consensus.",
        reference="decayed-mean reputation (Kang et al. 2019)",
        run=lambda histories, params: collect(histories, params),
        finalize=finalize,
        params={
            "decay": Param("float", 0.8, "weight of the past per round", minimum=0, maximum=1),
            "threshold": Param("float", None, "flag reputations below this", nullable=True),
            "clients": CLIENTS,
        },
    )
)
