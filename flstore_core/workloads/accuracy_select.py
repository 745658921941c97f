"""Accuracy selection: the k clients whose own model scores best on the job's validation set.

Reference: FLStore artifact, client-scheduling workload — every client model of the round is
rebuilt from its stored weights (the job's architecture, :mod:`flstore_core.models`) and
evaluated on the server-side validation set ``(x, y)`` of the job;
``score_i = (1/|V|) Σ_{(x, y) ∈ V} [argmax f(x; w_i) = y]`` and the ``k`` clients of highest
score are selected (ties broken by client id).

:class:`~flstore_core.workloads.evaluation.ValidationScorer` is shared by every model-based
workload of the catalogue, and so are its results: each client model's accuracy is computed once
per round on a node and an identical request is answered from memory
(:mod:`flstore_core.workloads.evaluation`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from flstore_core.cache.round_view import RoundView
from flstore_core.workloads import (
    ClientSplit,
    Param,
    Workload,
    WorkloadResult,
    check_k,
    register,
)
from flstore_core.workloads.cosine_select import rank_by_score
from flstore_core.workloads.evaluation import ValidationScorer


def client_scores(data: RoundView, rows: list[int]) -> dict[str, Any]:
    """The validation accuracy of the models of clients ``rows`` (one group of a round split
    over several nodes): ``scores`` (client -> accuracy) and ``validation_size``."""
    scorer = ValidationScorer(data)
    return {
        "scores": {data.clients[i]: scorer.client_accuracy(i) for i in rows},
        "validation_size": len(scorer.y),
    }


def select(
    clients: list[str], k: int, scores: dict[str, float], validation_size: int
) -> dict[str, Any]:
    """The result from every client's score: the ``k`` best (ties by client id)."""
    acc = np.array([scores[c] for c in clients])
    order = rank_by_score(clients, acc)
    return {
        "selected": order[:k],
        "scores": {c: float(a) for c, a in zip(clients, acc, strict=True)},
        "validation_size": validation_size,
    }


def accuracy_select(data: RoundView, k: int = 3) -> WorkloadResult:
    """Top-``k`` clients by the validation accuracy of their own model.

    Parameters
    ----------
    data : RoundView
        The round; the job must declare a model and have a validation set.
    k : int, default 3
        Number of clients to select (at most the round's size).

    Returns
    -------
    WorkloadResult
        ``selected`` (best first), ``scores`` (client -> accuracy in [0, 1]),
        ``validation_size``.
    """
    check_k(k, data.n)
    part = client_scores(data, list(range(data.n)))
    return WorkloadResult(select(data.clients, k, part["scores"], part["validation_size"]))


def _merge(
    clients: list[str], params: dict[str, Any], parts: list[dict[str, Any]]
) -> dict[str, Any]:
    scores: dict[str, float] = {}
    for part in parts:
        scores.update(part["scores"])
    return select(clients, params["k"], scores, int(parts[0]["validation_size"]))


WORKLOAD = register(
    Workload(
        name="accuracy_select",
        cls="round",
        per_client=True,
        # one model evaluation per client, independent of the others: groups of clients are
        # scored on several nodes in parallel and the router selects (sharded rounds)
        split=ClientSplit(
            check=lambda clients, params: check_k(params["k"], len(clients)),
            score=lambda data, params, rows: client_scores(data, rows),
            merge=_merge,
        ),
        description="Top-k clients by the accuracy of their model on the job's validation set.",
        reference="FLStore artifact (client-scheduling)",
        run=lambda data, params: accuracy_select(data, **params),
        params={"k": Param("int", 3, "clients to select", minimum=1)},
    )
)
