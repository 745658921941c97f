"""Oort client selection from the per-client loss and duration history of a job.

Reference: Lai et al., "Oort: Efficient Federated Learning via Guided Participant Selection",
OSDI 2021 (Algorithm 1). For an explored client i last seen in round L_i:

* statistical utility  U_i = |B_i| · sqrt( (1/|B_i|) Σ_{k∈B_i} Loss(k)² )  over *all* its samples
  of that round (FLStore clients report ``loss_sq_mean``; when only the mean loss is reported,
  ``sqrt(mean loss²)`` is taken as ``|mean loss|``, a lower bound by Jensen's inequality);
* staleness bonus      U_i += sqrt( 0.1 · ln R / L_i )  (R the round being planned);
* system utility       U_i ·= (T / t_i)^α  when the client's duration t_i exceeds the preferred
  duration T;
* exploitation picks (1−ε)·k clients: the candidates whose utility is at least ``cutoff`` times
  the (1−ε)k-th highest, sampled with probability proportional to utility;
* exploration picks ε·k never-seen candidates, fastest first when their speed is unknown (random).

Deterministic given ``seed``. Class ``meta``: it reads manifests' metrics, never tensors.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from flstore_core.cache.shards import JobMeta
from flstore_core.errors import InvalidParamsError
from flstore_core.ids import validate_client
from flstore_core.workloads import Param, Workload, WorkloadResult, register


def statistical_utility(num_examples: int, metrics: dict[str, Any]) -> float:
    """|B_i| · sqrt(mean of the squared per-sample loss)."""
    if "loss_sq_mean" in metrics:
        rms = math.sqrt(max(float(metrics["loss_sq_mean"]), 0.0))
    elif "loss" in metrics:
        rms = abs(float(metrics["loss"]))
    else:
        rms = 0.0
    return num_examples * rms


def oort_select(
    meta: JobMeta,
    k: int = 5,
    epsilon: float = 0.2,
    alpha: float = 2.0,
    preferred_duration: float | None = None,
    cutoff: float = 0.95,
    candidates: list[str] | None = None,
    round: int | None = None,
    seed: int = 0,
) -> WorkloadResult:
    """Select ``k`` clients for the next round with Oort's utility and exploration."""
    known = meta.clients
    pool = sorted({validate_client(c) for c in candidates}) if candidates else known
    if k > len(pool):
        raise InvalidParamsError(f"k={k} but only {len(pool)} candidates: use k <= {len(pool)}")
    planned = round if round is not None else meta.latest_round + 1
    rng = np.random.default_rng(seed)
    last: dict[str, tuple[int, int, dict[str, Any]]] = {}
    for r, rows in sorted(meta.rounds.items()):
        for c, row in rows.items():
            last[c] = (r, row.num_examples, row.metrics)
    explored = [c for c in pool if c in last]
    unexplored = [c for c in pool if c not in last]
    durations = {c: float(last[c][2]["duration_s"]) for c in explored if "duration_s" in last[c][2]}
    if preferred_duration is None and durations:
        preferred_duration = float(np.median(list(durations.values())))
    util: dict[str, float] = {}
    for c in explored:
        r_last, n, metrics = last[c]
        u = statistical_utility(n, metrics)
        u += math.sqrt(0.1 * math.log(max(planned, 1)) / max(r_last, 1))
        t = durations.get(c)
        if preferred_duration and t and t > preferred_duration:
            u *= (preferred_duration / t) ** alpha
        util[c] = u
    n_explore = min(len(unexplored), int(round_half_up(epsilon * k)))
    n_exploit = min(len(explored), k - n_explore)
    n_explore = k - n_exploit  # fill from the other side when one is short
    exploit: list[str] = []
    if n_exploit:
        ranked = sorted(explored, key=lambda c: (-util[c], c))
        threshold = cutoff * util[ranked[n_exploit - 1]]
        admitted = [c for c in ranked if util[c] >= threshold]
        weights = np.array([max(util[c], 1e-12) for c in admitted])
        picks = rng.choice(len(admitted), size=n_exploit, replace=False, p=weights / weights.sum())
        exploit = sorted((admitted[i] for i in picks), key=lambda c: (-util[c], c))
    explore = [unexplored[i] for i in rng.permutation(len(unexplored))[:n_explore]]
    return WorkloadResult(
        {
            "selected": exploit + explore,
            "scores": {c: float(util[c]) for c in sorted(util)},
            "explored": explore,
            "round": planned,
            "preferred_duration": preferred_duration,
        }
    )


def round_half_up(x: float) -> int:
    return math.floor(x + 0.5)


WORKLOAD = register(
    Workload(
        name="oort_select",
        cls="meta",
        description="Oort selection: statistical utility + staleness bonus, duration penalty, "
        "ε-exploration; from stored per-client loss and duration.",
        reference="Lai et al. OSDI'21",
        run=lambda meta, params: oort_select(meta, **params),
        params={
            "k": Param("int", 5, "clients to select", minimum=1),
            "epsilon": Param("float", 0.2, "share of exploration", minimum=0.0, maximum=1.0),
            "alpha": Param("float", 2.0, "duration penalty exponent", minimum=0.0),
            "preferred_duration": Param(
                "float", None, "T in seconds (default: median duration)", minimum=0, nullable=True
            ),
            "cutoff": Param(
                "float", 0.95, "admit utilities >= cutoff × k-th", minimum=0, maximum=1
            ),
            "candidates": Param("array", None, "client ids to choose from", nullable=True),
            "round": Param("int", None, "round being planned (default latest+1)", nullable=True),
            "seed": Param("int", 0, "random seed"),
        },
    )
)
