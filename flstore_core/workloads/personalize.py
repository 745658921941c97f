"""Personalization: a model for one client, averaged from its own and its closest peers' models.

Reference: FLStore artifact, cluster-based personalization workload — a client's personalized
model aggregates the updates of the clients most like it instead of the whole round. Peers of
client ``c`` are ranked either by the cosine similarity of their update to ``c``'s,

    cos(Δ_c, Δ_j) = G_cj / √(G_cc G_jj)        (G = the round's shared Gram matrix, deltas
                                                 when the base is stored and ``use_delta``)

or by the validation accuracy of their own model (``by="accuracy"``); the ``peers`` best are
averaged with ``c`` itself, example-weighted: ``w_c' = Σ_{j ∈ {c} ∪ P} n_j w_j / Σ n_j``. The
result reports the personalized model's validation accuracy next to the client's own model's
and the round's FedAvg model's, and stores the model (``model_key``).

Accuracies are the round's shared evaluations (:mod:`flstore_core.workloads.evaluation`): the
clients' own models are those accuracy_select scores, the FedAvg model is contribution_loo's
``U(N)`` (the same float32 coefficients, so the same key: read from memory without building the
model), the personalized model is keyed by its coefficients as a ``U(S)`` is, and a repeated
request evaluates nothing.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from flstore_core.cache.round_view import RoundView, as_array
from flstore_core.errors import InvalidParamsError, NotFoundError
from flstore_core.workloads import (
    INCLUDE_BUFFERS,
    USE_DELTA,
    Param,
    Workload,
    WorkloadResult,
    check_k,
    register,
)
from flstore_core.workloads.cosine_select import FLOAT32_TIE, rank_by_score
from flstore_core.workloads.evaluation import ValidationScorer

F64 = npt.NDArray[np.float64]


def cosine_to_row(gram: F64, row: int) -> F64:
    """Cosine similarity of every row to ``row``, from the Gram matrix (0 for a zero row)."""
    norms = np.sqrt(np.maximum(np.diag(gram), 0.0))
    denom = norms * norms[row]
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = np.where(denom > 0, gram[row] / np.where(denom > 0, denom, 1.0), 0.0)
    return np.clip(cos, -1.0, 1.0)


def personalize(
    data: RoundView,
    client: str | None = None,
    peers: int = 3,
    by: str = "similarity",
    use_delta: bool = True,
    include_buffers: bool = False,
) -> WorkloadResult:
    """Personalized model of ``client`` from itself and its ``peers`` closest peers.

    Parameters
    ----------
    data : RoundView
        The round; the job must declare a model and have a validation set.
    client : str
        The client to personalize for (required); 404 if it is not in the round.
    peers : int, default 3
        How many other clients to average with it (at most n − 1; 0 gives its own model).
    by : {"similarity", "accuracy"}, default "similarity"
        Rank peers by cosine similarity of updates to the client's, or by the validation
        accuracy of their own model.
    use_delta : bool, default True
        Similarity of deltas ``w − base`` when the base model is stored.
    include_buffers : bool, default False
        Similarity also over BatchNorm running statistics; over the float trainable
        parameters otherwise, integer tensors never (:mod:`flstore_core.data.columns`). The
        personalized model averages every tensor: running statistics like weights, integer
        buffers averaged and rounded to the nearest integer.

    Returns
    -------
    WorkloadResult
        ``client``, ``peers`` (best first), ``scores`` (peer -> similarity or accuracy, every
        other client), ``weights`` (member -> averaging weight), ``accuracy`` (personalized
        model), ``client_accuracy`` (its own model), ``global_accuracy`` (the round's FedAvg
        model), ``by``; the model is the personalized one.
    """
    row = _client_row(data, client, peers)
    scorer = ValidationScorer(data)
    others = [i for i in range(data.n) if i != row]
    score_all = _peer_scores(data, scorer, row, others, by, use_delta, include_buffers)
    other_ids = [data.clients[i] for i in others]
    # cosines from the float32 Gram tie within FLOAT32_TIE; accuracies are exact fractions
    tie = FLOAT32_TIE if by == "similarity" else 0.0
    chosen = rank_by_score(other_ids, score_all[others], tie)[:peers]
    members = [row] + [data.clients.index(c) for c in chosen]
    sizes = data.num_examples.astype(np.float64)
    w = np.zeros(data.n)
    w[members] = sizes[members]
    if w.sum() <= 0:  # members all reported 0 examples: plain mean
        w[members] = 1.0
    # w_c' = Σ_{j ∈ {c} ∪ P} n_j w_j / Σ n_j  (deltas averaged, then the base added back); the
    # model is evaluated here, so it is a vector (a per-client workload: never on column blocks)
    model = as_array(data.to_weights(data.weighted_mean(w)))
    everyone = sizes if sizes.sum() > 0 else np.ones(data.n)
    # both models' accuracies keyed by their coefficients, as contribution's U(S): the FedAvg
    # model is U(N) (computed at prefetch: built only when not), the personalized one is
    # evaluated without hashing its 4 B/param weights
    accuracy = scorer.aggregate_accuracy(w, lambda: model)
    global_accuracy = scorer.aggregate_accuracy(
        everyone, lambda: as_array(data.to_weights(data.weighted_mean(everyone)))
    )
    return WorkloadResult(
        {
            "client": client,
            "by": by,
            "peers": chosen,
            "scores": {data.clients[i]: float(score_all[i]) for i in others},
            "weights": {data.clients[i]: float(w[i] / w.sum()) for i in members},
            "accuracy": accuracy,
            "client_accuracy": scorer.client_accuracy(row),
            "global_accuracy": global_accuracy,
        },
        model=model,
    )


def _client_row(data: RoundView, client: str | None, peers: int) -> int:
    """The row of ``client``: a 400 without one, a 404 when the round has no such client, a 400
    when it has fewer than ``peers`` others."""
    if client is None:
        raise InvalidParamsError(
            f"personalize needs param 'client': one of the round's clients, e.g. "
            f"{data.clients[0]!r}"
        )
    if client not in data.clients:
        raise NotFoundError(f"client {client!r} is not in round {data.round} of job {data.job!r}")
    check_k(peers, data.n - 1, "other clients")
    return data.clients.index(client)


def _peer_scores(
    data: RoundView,
    scorer: ValidationScorer,
    row: int,
    others: list[int],
    by: str,
    use_delta: bool,
    include_buffers: bool,
) -> F64:
    """Every client's score as a peer of ``row``: cosine of updates, or its own model's
    validation accuracy (0 for ``row`` itself)."""
    if by == "similarity":
        return cosine_to_row(data.gram(use_delta, include_buffers), row)
    score_all = np.zeros(data.n)
    for i in others:
        score_all[i] = scorer.client_accuracy(i)
    return score_all


WORKLOAD = register(
    Workload(
        name="personalize",
        cls="round",
        per_client=True,
        description=(
            "Personalized model for one client: example-weighted average of its model and its "
            "most similar (cosine of updates) or most accurate peers; returns model_key."
        ),
        reference="FLStore artifact (cluster-based personalization)",
        run=lambda data, params: personalize(data, **params),
        params={
            "client": Param("str", None, "the client to personalize for (required)"),
            "peers": Param("int", 3, "peers averaged with the client", minimum=0),
            "by": Param("str", "similarity", "rank peers by", choices=("similarity", "accuracy")),
            "use_delta": USE_DELTA,
            "include_buffers": INCLUDE_BUFFERS,
        },
    )
)
