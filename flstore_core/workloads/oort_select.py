"""Oort client selection from the per-client loss and duration history of a job.

Reference: Lai et al., "Oort: Efficient Federated Learning via Guided Participant Selection",
OSDI 2021 (Algorithm 1), as the authors' code computes it (FedScale's ``thirdparty/oort``
training selector, ``getTopK`` and ``get_norm``). For an explored client i last seen in round
L_i, planning round R:

* statistical utility  u_i = |B_i| · sqrt( (1/|B_i|) Σ_{k∈B_i} Loss(k)² )  over *all* its samples
  of that round (FLStore clients report ``loss_sq_mean``; when only the mean loss is reported,
  ``sqrt(mean loss²)`` is taken as ``|mean loss|``, a lower bound by Jensen's inequality);
* min-max normalisation over the candidates' positive utilities (the authors' ``get_norm``):
  ``û_i = (min(u_i, clip) − 0.999·u_min) / max(u_max − 0.999·u_min, 1e-4)`` with ``clip`` the
  ``clip_bound`` quantile ``sorted(u)[min(⌊n·clip_bound⌋, n−1)]``. Without it the staleness bonus
  (below, at most ~0.7) never moves a utility in the hundreds, so a stale client is never
  promoted;
* staleness bonus      ``û_i += sqrt( 0.1 · ln R / L_i )`` with rounds counted from 1 as the
  authors' code does (``R = round + 1``, ``L_i = last round + 1`` for FLStore's 0-based rounds);
* system utility       ``û_i ·= (T / t_i)^α``  when the client's duration t_i exceeds the preferred
  duration T; the score is ``|û_i|``;
* exploration picks ``⌊k·ε⌋`` never-seen candidates (the authors' ``int(k · exploration)``);
  exploitation the other ``k − ⌊k·ε⌋``: the candidates whose score is at least ``cutoff`` times
  the ``(k − ⌊k·ε⌋)``-th highest, sampled with probability proportional to score.

Deviations from the authors' code, all documented here: the cut-off is Algorithm 1's
(``cutoff`` × the (k−⌊kε⌋)-th score; the code takes the next score and pads the pool to 10× the
picks); ε is the caller's current exploration factor (the code decays it each round by
``exploration_decay`` down to ``exploration_min``: pass the decayed value); T defaults to the
median duration (the code's is a percentile, ``round_threshold``); never-seen candidates are
drawn uniformly (their sizes are unknown here); when one side is short of candidates the other
fills it, so ``k`` clients are always returned; the normalisation ranges over the explored
candidates only (the code also counts never-seen clients' initial rewards).

Deterministic given ``seed``. Class ``meta``: it reads manifests' metrics, never tensors.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from flstore_core.cache.shards import JobMeta
from flstore_core.errors import InvalidParamsError
from flstore_core.ids import MAX_ROUND, validate_client
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
    clip_bound: float = 0.9,
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
    last = last_seen(meta, len(known))
    explored = [c for c in pool if c in last]
    unexplored = [c for c in pool if c not in last]
    durations = {c: float(last[c][2]["duration_s"]) for c in explored if "duration_s" in last[c][2]}
    if preferred_duration is None and durations:
        preferred_duration = float(np.median(list(durations.values())))
    raw = {c: statistical_utility(last[c][1], last[c][2]) for c in explored}
    low, span, clip = reward_norm([u for u in raw.values() if u > 0], clip_bound)
    util: dict[str, float] = {}
    for c in explored:
        # (min(u, clip) − 0.999·u_min) / range + sqrt(0.1·ln R / L), rounds counted from 1
        u = (min(raw[c], clip) - low) / span
        u += math.sqrt(0.1 * math.log(planned + 1) / (last[c][0] + 1))
        t = durations.get(c)
        if preferred_duration and t and t > preferred_duration:
            u *= (preferred_duration / t) ** alpha
        util[c] = abs(u)
    n_explore = min(len(unexplored), exploration_count(k, epsilon))
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


def last_seen(meta: JobMeta, clients: int) -> dict[str, tuple[int, int, dict[str, Any]]]:
    """Each client's last round, ``num_examples`` and metrics: the rounds read from the latest
    back, stopping once all ``clients`` are found (a job whose every round has every client
    reads one round of its history, not 2,000)."""
    last: dict[str, tuple[int, int, dict[str, Any]]] = {}
    for r in sorted(meta.rounds, reverse=True):
        rows = meta.rounds[r]
        for c in rows:
            if c not in last:
                row = rows[c]
                last[c] = (r, row.num_examples, row.metrics)
        if len(last) == clients:
            break
    return last


def exploration_count(k: int, epsilon: float) -> int:
    """Clients explored out of ``k``: ``int(k · ε)``, truncated as the authors' code does."""
    return int(k * epsilon)


def reward_norm(positive: list[float], clip_bound: float) -> tuple[float, float, float]:
    """``(0.999·min, range, clip value)`` of the positive utilities, as the authors' ``get_norm``
    (range floored at 1e-4); ``(0, 1e-4, 0)`` when there is none, so only staleness counts."""
    if not positive:
        return 0.0, 1e-4, 0.0
    ordered = sorted(positive)
    clip = ordered[min(int(len(ordered) * clip_bound), len(ordered) - 1)]
    low = ordered[0] * 0.999
    return low, max(ordered[-1] - low, 1e-4), clip


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
            "clip_bound": Param(
                "float", 0.9, "utilities clipped at this quantile", minimum=0, maximum=1
            ),
            "candidates": Param("array", None, "client ids to choose from", nullable=True),
            "round": Param(
                "int",
                None,
                "round being planned (default latest+1)",
                minimum=0,  # the exploration term takes log(round + 1)
                maximum=MAX_ROUND,
                nullable=True,
            ),
            "seed": Param("int", 0, "random seed", minimum=0),
        },
    )
)
