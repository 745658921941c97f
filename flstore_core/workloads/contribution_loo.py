"""Leave-one-out contribution: how much the round's aggregate loses without each client.

The value of client ``i`` is ``U(N) − U(N ∖ {i})`` where ``U(S)`` is the validation accuracy of
the FedAvg aggregate of the clients in ``S`` — ``w_S = Σ_{j∈S} n_j w_j / Σ_{j∈S} n_j`` (McMahan
et al., AISTATS 2017) — the utility that data-valuation work on FL uses (e.g. Wang, Rausch,
Zhang and Song, "A Principled Approach to Data Valuation for Federated Learning", 2020, and the
GTG-Shapley paper, Liu et al. 2022). A client whose update hurts the aggregate gets a negative
value. ``n + 1`` aggregates are evaluated.

:class:`SubsetUtility` is the utility ``U`` shared with ``contribution_shapley``. By
convention ``U(∅)`` is the accuracy of the round's *base* model — the global model the clients
started from, when stored (``data.base``), since aggregating no update leaves it unchanged;
when the job stores no base model, it is the accuracy of a freshly initialised model of the
job's architecture built with seed 0.

Utilities are memoised on the round (:mod:`flstore_core.workloads.evaluation`): ``U(S)`` under
the aggregate's float32 coefficients ``n_j / Σ_{k∈S} n_k`` (all the aggregate depends on, given
the round), so leave-one-out, Shapley and a repeated request share every subset they both
evaluate, and ``U(N)`` is personalize's ``global_accuracy``; a one-client subset is that
client's own model (``1·w_i`` exactly) and reads ``client_accuracy``. The leave-one-out
aggregates are not derived as ``(Σ − n_i w_i)/(W − n_i)`` from the total: each costs one GEMV
(~50 ms on ResNet-18 × 10) against ~1.5 s to evaluate it, and the subtraction would change the
float32 weights evaluated.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import numpy.typing as npt

from flstore_core import models
from flstore_core.cache.round_view import RoundView, as_array
from flstore_core.data.rows import flat_parts
from flstore_core.workloads import Param, Workload, WorkloadResult, register
from flstore_core.workloads.cosine_select import rank_by_score
from flstore_core.workloads.deadline import check
from flstore_core.workloads.evaluation import ValidationScorer, array_digest

F32 = npt.NDArray[np.float32]
EMPTY_SEED = 0


def fresh_model_weights(name: str, data: RoundView, seed: int = EMPTY_SEED) -> F32:
    """Weights of a freshly initialised ``name`` model (built with ``seed``) as a round row:
    tensors matched by name and laid out in the round's column order."""
    state = models.state_arrays(models.build(name, seed=seed))
    models.check_names(list(state), data.specs)
    return np.concatenate(flat_parts(state, data.specs))


class SubsetUtility:
    """``U(S)``: validation accuracy of the (example-weighted) aggregate of the clients in S.

    Call it with an iterable of row indices. ``U(∅)`` is the base model's accuracy (or a fresh
    seed-0 model's when no base is stored); ``empty_source`` says which.

    Parameters
    ----------
    data : RoundView
        The round (the job must declare a model and have a validation set).
    weighted : bool, default True
        Weight clients by ``num_examples`` (FedAvg); plain mean otherwise.
    """

    def __init__(self, data: RoundView, weighted: bool = True) -> None:
        self.data = data
        self.scorer = ValidationScorer(data)
        sizes = data.num_examples.astype(np.float64)
        # every client reported 0 examples: the aggregate falls back to the plain mean
        self.sizes = sizes if weighted and sizes.sum() > 0 else np.ones(data.n)
        self.empty_source = "base" if data.base is not None else f"fresh model (seed {EMPTY_SEED})"
        self.calls = 0

    def aggregate(self, subset: Iterable[int]) -> F32:
        """Model weights of the aggregate of ``subset``: ``Σ_{j∈S} n_j w_j / Σ_{j∈S} n_j``."""
        members = sorted(set(subset))
        if not members:
            if self.data.base is not None:
                return self.data.base
            return fresh_model_weights(self.scorer.model_name, self.data)
        # averaging deltas and adding the base equals averaging the models
        return as_array(self.data.to_weights(self.data.weighted_mean(self.coefficients(members))))

    def coefficients(self, members: list[int]) -> npt.NDArray[np.float64]:
        """Row weights of the aggregate of the (non-empty) ``members``: ``n_j`` on members."""
        w = np.zeros(self.data.n)
        w[members] = self.sizes[members]
        if w.sum() <= 0:  # a subset of clients with 0 examples each: plain mean of the subset
            w[members] = 1.0
        return w

    def __call__(self, subset: Iterable[int]) -> float:
        check(f"evaluating subset {self.calls + 1}")
        members = sorted(set(subset))
        self.calls += 1
        if len(members) == 1:  # the aggregate of one client is its own model, 1·w_i exactly
            return self.scorer.client_accuracy(members[0])
        return self.data.memo(
            "subset_accuracy",
            f"{self.coefficients_key(members)}/{self.scorer.key}",
            lambda: self.scorer.accuracy(self.aggregate(members)),
        )

    def coefficients_key(self, members: list[int]) -> str:
        """What the aggregate of ``members`` depends on besides the round: its float32
        coefficients (as :meth:`RoundView.weighted_mean` takes them), or which empty model."""
        if not members:
            return "empty:base" if self.data.base is not None else f"empty:seed{EMPTY_SEED}"
        w = self.coefficients(members)
        return array_digest((w / w.sum()).astype(np.float32))

    @property
    def evaluations(self) -> int:
        """How many subsets' utilities were asked for (answered from memory or evaluated)."""
        return self.calls


def leave_one_out(
    n: int, utility: Callable[[set[int]], float]
) -> tuple[float, npt.NDArray[np.float64]]:
    """``(U(N), [U(N ∖ {i}) for i])`` for players ``0 … n−1`` — n + 1 evaluations."""
    everyone = set(range(n))
    total = utility(everyone)
    without = np.array([utility(everyone - {i}) for i in range(n)])
    return total, without


def contribution_loo(data: RoundView, weighted: bool = True) -> WorkloadResult:
    """Leave-one-out value ``U(N) − U(N ∖ {i})`` of every client of the round.

    Parameters
    ----------
    data : RoundView
        The round; the job must declare a model and have a validation set.
    weighted : bool, default True
        Aggregate subsets example-weighted (FedAvg) rather than by plain mean.

    Returns
    -------
    WorkloadResult
        ``values`` (client -> U(N) − U(N∖{i})), ``selected`` (every client, most valuable
        first), ``utility_all`` (U(N)), ``utility_without`` (client -> U(N∖{i})),
        ``evaluations``.
    """
    utility = SubsetUtility(data, weighted)
    total, without = leave_one_out(data.n, utility)
    values = total - without  # v_i = U(N) − U(N ∖ {i})
    return WorkloadResult(
        {
            "values": {c: float(v) for c, v in zip(data.clients, values, strict=True)},
            "selected": rank_by_score(data.clients, values),
            "utility_all": float(total),
            "utility_without": {c: float(u) for c, u in zip(data.clients, without, strict=True)},
            "evaluations": utility.evaluations,
        }
    )


WORKLOAD = register(
    Workload(
        name="contribution_loo",
        cls="round",
        per_client=True,
        description=(
            "Leave-one-out contribution U(N) - U(N minus i), U = validation accuracy of the "
            "aggregate of a subset of the round's clients."
        ),
        reference="leave-one-out data valuation (utility as in Liu et al. 2022)",
        run=lambda data, params: contribution_loo(data, **params),
        params={"weighted": Param("bool", True, "aggregate subsets weighted by num_examples")},
    )
)
