"""Shapley-value contribution of each client of a round: exact, or GTG-Shapley.

Reference: Liu, Chen, Yu, Liu and Cui, "GTG-Shapley: Efficient and Accurate Participant
Contribution Evaluation in Federated Learning", ACM TIST 13(4), 2022. The value of client ``i``
in a round with clients ``N`` (``n = |N|``) and utility ``U`` is the Shapley value

    φ_i = Σ_{S ⊆ N∖{i}} |S|! (n − |S| − 1)! / n! · (U(S ∪ {i}) − U(S))

where ``U(S)`` is the validation accuracy of the FedAvg aggregate of the updates in ``S``
(reconstructed from the stored updates, no retraining) and ``U(∅)`` the accuracy of the model
the round started from (see :class:`~flstore_core.workloads.contribution_loo.SubsetUtility`).

- ``method="exact"`` enumerates all ``2^n`` subsets (``auto`` does when ``n ≤ 8``).
- ``method="gtg"`` is Algorithm 1 of the paper, a Monte-Carlo estimate over permutations:
  *between-round truncation* (all values 0 when ``|U(N) − U(∅)| < round_threshold``; the
  default 0 never truncates, since here the round is asked for explicitly), *guided sampling*
  (permutations come in cycles of ``n``, the k-th of a cycle starting with client k, the rest
  in random order), *within-round truncation* (once ``|U(N) − U(π_1..π_{j−1})| < eps`` the
  remaining marginal gains of the permutation are taken as 0 without evaluating), and a
  *convergence stop*: after at least ``max(min_permutations, n)`` permutations, at the end of a
  cycle, stop when every one of the last 10 running estimates is within ``tolerance`` of the
  current one in mean relative change (``mean_i |φ_t,i − φ_i| / |φ_i|``), or when another
  cycle would exceed ``max_permutations``. Sampling runs in whole cycles — at least one, even
  when ``max_permutations < n`` — so every client leads equally often (the authors' code tests
  convergence and its cap between cycles too). These defaults (``eps`` 0.001, 10 estimates,
  tolerance 0.05, 30 permutations minimum) are those of the authors' released code.

What the estimate guarantees (``tests/test_gtg_shapley_properties.py`` checks each against
exact values): ``|Σ_i φ_i − (U(N) − U(∅))| < eps`` (each permutation's marginals sum to
``U(N) − U(∅)`` but for a prefix truncated within ``eps`` of ``U(N)``; an individual value is
not bounded by ``eps``, the truncated gains can cancel); 0 for a client whose joining never
changes ``U``; with ``eps = 0``, the exact values for one or two clients (a cycle of two is both
orderings) and for additive utilities, and otherwise an unbiased estimate (one permutation per
leader, the rest uniform) whose error shrinks as ``1/√cycles``.

Both estimators take any ``utility(subset) -> float`` (subset: a frozenset of client indices)
and memoise it by subset bitmask; ``evaluations`` counts the distinct subsets evaluated.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from flstore_core.cache.round_view import RoundView
from flstore_core.errors import InvalidParamsError
from flstore_core.workloads import Param, Workload, WorkloadResult, register
from flstore_core.workloads.contribution_loo import SubsetUtility
from flstore_core.workloads.cosine_select import rank_by_score
from flstore_core.workloads.deadline import check
from flstore_core.workloads.estimates import Estimate, RoundShape

F64 = npt.NDArray[np.float64]
Utility = Callable[[frozenset[int]], float]
AUTO_EXACT_MAX = 8  # method "auto" enumerates exactly up to this many clients
EXACT_MAX = 14  # beyond this, 2^n evaluations are refused: use gtg
LAST_K = 10  # running estimates compared by the convergence test (authors' code)
# Equal values summed in a different order differ by a few ulps (two symmetric clients get
# -0.1444…45 and -0.1444…46): values within SUM_TIE · max|value| are tied and ordered by client
# id. Accuracy utilities put distinct values at least 1/(|V| · n!) (exact) or 1/(|V| · T) (T
# permutations) apart, far above this.
SUM_TIE = 1e-9


class MemoUtility:
    """A utility memoised by subset bitmask; ``evaluations`` counts distinct subsets."""

    def __init__(self, n: int, utility: Utility) -> None:
        self.n = n
        self.utility = utility
        self.values: dict[int, float] = {}

    def __call__(self, mask: int) -> float:
        value = self.values.get(mask)
        if value is None:
            check(f"evaluating subset {self.evaluations + 1}")
            members = frozenset(i for i in range(self.n) if mask >> i & 1)
            value = float(self.utility(members))
            self.values[mask] = value
        return value

    @property
    def evaluations(self) -> int:
        return len(self.values)


@dataclass
class ShapleyEstimate:
    """Shapley values (row order) and how they were obtained."""

    values: F64
    evaluations: int
    method: str
    utility_empty: float
    utility_all: float
    permutations: int = 0
    converged: bool = True
    round_truncated: bool = False


def exact_shapley(n: int, utility: Utility) -> ShapleyEstimate:
    """Exact Shapley values by enumerating all ``2^n`` subsets."""
    memo = MemoUtility(n, utility)
    masks = np.arange(1 << n)
    u = np.array([memo(int(m)) for m in masks])
    sizes = np.array([int(m).bit_count() for m in masks])
    # w(s) = s! (n − s − 1)! / n!, the weight of a coalition of size s not containing i
    weight = np.array(
        [math.factorial(s) * math.factorial(n - s - 1) / math.factorial(n) for s in range(n)]
    )
    values = np.zeros(n)
    for i in range(n):
        without = masks[(masks >> i) & 1 == 0]
        # φ_i = Σ_{S ⊆ N∖{i}} w(|S|) (U(S ∪ {i}) − U(S))
        values[i] = float(np.sum(weight[sizes[without]] * (u[without | (1 << i)] - u[without])))
    return ShapleyEstimate(values, memo.evaluations, "exact", float(u[0]), float(u[-1]))


def _converged(history: list[F64], tolerance: float) -> bool:
    last = history[-1]
    recent = np.stack(history[-LAST_K:])
    # mean_i |φ_t,i − φ_i| / |φ_i| for each of the last LAST_K running estimates φ_t
    errors = np.mean(np.abs(recent - last) / (np.abs(last) + 1e-12), axis=1)
    return bool(np.max(errors) <= tolerance)


def gtg_shapley(
    n: int,
    utility: Utility,
    *,
    eps: float = 0.001,
    tolerance: float = 0.05,
    min_permutations: int = 30,
    max_permutations: int = 100,
    round_threshold: float = 0.0,
    seed: int = 0,
) -> ShapleyEstimate:
    """GTG-Shapley (Liu et al. 2022, Algorithm 1) over ``n`` players with ``utility``.

    Parameters
    ----------
    n : int
        Number of players (clients), indexed ``0 … n−1``.
    utility : callable
        ``utility(frozenset of indices) -> float``; memoised by bitmask here.
    eps : float, default 0.001
        Within-round truncation: remaining marginal gains of a permutation are 0 once the
        utility of its prefix is within ``eps`` of ``U(N)``.
    tolerance : float, default 0.05
        Convergence: mean relative change of the estimates over the last 10 permutations.
    min_permutations, max_permutations : int, default 30, 100
        Bounds on the number of sampled permutations, taken in whole guided cycles of ``n``:
        at most ``max_permutations`` rounded down to whole cycles, never less than one cycle.
    round_threshold : float, default 0.0
        Between-round truncation: all values 0 when ``|U(N) − U(∅)| < round_threshold``.
    seed : int, default 0
        Seeds the random part of the permutations.
    """
    memo = MemoUtility(n, utility)
    full = (1 << n) - 1
    v_empty, v_full = memo(0), memo(full)
    if abs(v_full - v_empty) < round_threshold:
        return ShapleyEstimate(
            np.zeros(n), memo.evaluations, "gtg", v_empty, v_full, round_truncated=True
        )
    rng = np.random.default_rng(seed)
    estimate = np.zeros(n)
    history: list[F64] = []
    k = 0
    converged = False
    # whole cycles only: a cut-off cycle would let some clients lead once more than others
    cycles = max(1, max_permutations // n)
    for _ in range(cycles):
        for first in range(n):  # guided sampling: each client leads one permutation per cycle
            check(f"sampling permutation {k + 1}")
            others = np.array([i for i in range(n) if i != first], dtype=np.int64)
            order = [first, *rng.permutation(others).tolist()]
            marginal = np.zeros(n)
            prev, mask = v_empty, 0
            for player in order:
                mask |= 1 << player
                # within-round truncation: |U(N) − U(prefix)| < eps ⇒ the rest adds nothing
                value = memo(mask) if abs(v_full - prev) >= eps else prev
                marginal[player] = value - prev
                prev = value
            k += 1
            estimate += (marginal - estimate) / k  # running mean over permutations
            history.append(estimate.copy())
        if k >= max(min_permutations, n, LAST_K):
            converged = _converged(history, tolerance)
            if converged:
                break
    return ShapleyEstimate(estimate, memo.evaluations, "gtg", v_empty, v_full, k, converged)


def contribution_shapley(
    data: RoundView,
    method: str = "auto",
    eps: float = 0.001,
    tolerance: float = 0.05,
    min_permutations: int = 30,
    max_permutations: int = 100,
    round_threshold: float = 0.0,
    seed: int = 0,
    weighted: bool = True,
) -> WorkloadResult:
    """Shapley value of every client of the round, with U = validation accuracy of aggregates.

    Parameters
    ----------
    data : RoundView
        The round; the job must declare a model and have a validation set.
    method : {"auto", "exact", "gtg"}, default "auto"
        ``exact`` enumerates all subsets (refused beyond 14 clients), ``gtg`` estimates;
        ``auto`` is exact up to 8 clients.
    eps, tolerance, min_permutations, max_permutations, round_threshold, seed
        GTG-Shapley's knobs (see :func:`gtg_shapley`); ignored by ``exact``.
    weighted : bool, default True
        Aggregate subsets weighted by ``num_examples`` (FedAvg).

    Returns
    -------
    WorkloadResult
        ``values`` (client -> φ), ``selected`` (every client, most valuable first),
        ``method`` (the one used), ``evaluations`` (distinct U(S) computed), ``utility_all``
        (U(N)), ``utility_empty`` (U(∅)) and ``empty_model`` (what U(∅) evaluated); for
        ``gtg`` also ``permutations``, ``converged`` and ``round_truncated``.
    """
    n = data.n
    use = method if method != "auto" else ("exact" if n <= AUTO_EXACT_MAX else "gtg")
    if use == "exact" and n > EXACT_MAX:
        raise InvalidParamsError(
            f"exact Shapley needs 2^{n} utility evaluations for {n} clients: use method 'gtg' "
            f"(or 'auto') for rounds of more than {EXACT_MAX} clients"
        )
    if max_permutations < min_permutations:
        raise InvalidParamsError(
            f"max_permutations={max_permutations} is below min_permutations={min_permutations}: "
            "raise max_permutations or lower min_permutations"
        )
    subset_utility = SubsetUtility(data, weighted)

    def utility(members: frozenset[int]) -> float:
        return subset_utility(members)

    if use == "exact":
        est = exact_shapley(n, utility)
    else:
        est = gtg_shapley(
            n,
            utility,
            eps=eps,
            tolerance=tolerance,
            min_permutations=min_permutations,
            max_permutations=max_permutations,
            round_threshold=round_threshold,
            seed=seed,
        )
    result: dict[str, object] = {
        "values": {c: float(v) for c, v in zip(data.clients, est.values, strict=True)},
        "selected": rank_by_score(data.clients, est.values, SUM_TIE),
        "method": use,
        "evaluations": est.evaluations,
        "utility_all": est.utility_all,
        "utility_empty": est.utility_empty,
        "empty_model": subset_utility.empty_source,
    }
    if use == "gtg":
        result.update(
            permutations=est.permutations,
            converged=est.converged,
            round_truncated=est.round_truncated,
        )
    return WorkloadResult(result)


def estimate(params: Mapping[str, Any], shape: RoundShape) -> Estimate:
    """The time of the evaluations ``params`` force on a round of ``shape`` (memory is one
    model and one aggregate at a time: bounded by the round the planner sized).

    ``exact`` evaluates all ``2^n`` subsets. ``gtg`` evaluates ``U(∅)`` and ``U(N)``, and every
    prefix of every permutation when ``eps`` is 0 (no within-round truncation); it samples every
    cycle up to ``max_permutations`` when ``tolerance`` is 0 (no convergence stop), else at
    least the cycles before the first convergence test. What truncation with ``eps > 0``
    saves cannot be known before running: the node's deadline bounds that."""
    n = shape.clients
    method = params["method"]
    use = method if method != "auto" else ("exact" if n <= AUTO_EXACT_MAX else "gtg")
    if use == "exact":
        evaluations = 2**n
    else:
        cycles = max(1, int(params["max_permutations"]) // max(n, 1))
        if params["tolerance"] > 0:
            first_test = max(int(params["min_permutations"]), n, LAST_K)
            cycles = min(cycles, -(-first_test // max(n, 1)))
        per_permutation = n if params["eps"] == 0 else 0
        evaluations = min(2**n, 2 + cycles * n * per_permutation)
    return Estimate(0, evaluations * shape.evaluation_s())


WORKLOAD = register(
    Workload(
        name="contribution_shapley",
        cls="round",
        per_client=True,
        description=(
            "Shapley value of each client, U = validation accuracy of the aggregate of a subset: "
            "exact enumeration for n <= 8 (method auto), GTG-Shapley estimate otherwise."
        ),
        reference="Liu et al. 2022 (GTG-Shapley, ACM TIST)",
        run=lambda data, params: contribution_shapley(data, **params),
        estimate=estimate,
        params={
            "method": Param("str", "auto", "exact, gtg, or auto", choices=("auto", "exact", "gtg")),
            "eps": Param("float", 0.001, "within-round truncation threshold", minimum=0.0),
            "tolerance": Param(
                "float", 0.05, "convergence: mean relative change of the estimates", minimum=0.0
            ),
            "min_permutations": Param(
                "int", 30, "permutations before testing convergence", minimum=1
            ),
            "max_permutations": Param(
                "int", 100, "cap on sampled permutations", minimum=1, maximum=100_000
            ),
            "round_threshold": Param(
                "float", 0.0, "between-round truncation (0: never)", minimum=0.0
            ),
            "seed": Param("int", 0, "seed of the random permutations", minimum=0),
            "weighted": Param("bool", True, "aggregate subsets weighted by num_examples"),
        },
    )
)
