"""Multi-Krum: average the m updates of least Krum score.

Reference: Blanchard, El Mhamdi, Guerraoui and Stainer, "Machine Learning with Adversaries:
Byzantine Tolerant Gradient Descent", NeurIPS 2017, §5 (Multi-Krum). Every update gets its Krum
score ``s(i) = Σ_{j ∈ N_i} ‖x_i − x_j‖²`` over its ``n − f − 2`` nearest others (see
:mod:`flstore_core.workloads.krum`); the ``m`` updates of least score are selected and averaged.
The paper averages them uniformly; FLStore (like Flower's ``MultiKrum`` strategy) weights them
by their examples, ``Σ_{i ∈ S} n_i x_i / Σ_{i ∈ S} n_i``. ``m`` defaults to ``n − f``.
Scores are over the float trainable parameters (``include_buffers`` adds BatchNorm running
statistics); the average covers every tensor, as Flower's strategies average every array:
running statistics like weights, integer buffers (``num_batches_tracked``) averaged and rounded
to the nearest integer.
"""

from __future__ import annotations

import numpy as np

from flstore_core.cache.round_view import RoundView, Vector
from flstore_core.errors import InvalidParamsError
from flstore_core.workloads import INCLUDE_BUFFERS, Param, Workload, WorkloadResult, register
from flstore_core.workloads.krum import F_PARAM, check_f, krum_scores, rank_ascending
from flstore_core.workloads.subset import CLIENTS_PARAM, client_rows


def multi_krum(
    data: RoundView,
    f: int = 1,
    m: int | None = None,
    include_buffers: bool = False,
    clients: list[str] | None = None,
) -> WorkloadResult:
    """Select the ``m`` updates of least Krum score and return their example-weighted mean.

    Parameters
    ----------
    data : RoundView
        The round; distances are taken from its shared artifacts.
    f : int, default 1
        Number of Byzantine clients tolerated; the round must have ``n > 2f + 2`` clients.
    m : int or None, default None
        How many updates to average, ``1 <= m <= n``; ``None`` means ``n - f``.
    include_buffers : bool, default False
        Krum distances also over BatchNorm running statistics.
    clients : list of str or None, default None
        Run Multi-Krum among these clients only (:mod:`flstore_core.workloads.subset`): ``n``
        is their number, scores use the distances between them (the round's shared distances,
        restricted), and only they can be selected.

    Returns
    -------
    WorkloadResult
        ``selected`` (best first), ``scores`` (client -> Krum score, lower is better),
        ``weights`` (selected client -> share of the average), ``f``, ``m``; the model is the
        weighted mean of the selected clients' weights.
    """
    rows = client_rows(data, clients)
    idx = list(range(data.n)) if rows is None else rows
    n = len(idx)
    among = "the round has" if rows is None else "param 'clients' lists"
    check_f(f, n, "multi_krum", among)
    if m is None:
        m = n - f
    if m > n:
        raise InvalidParamsError(
            f"m={m} but {among} only {n} clients: use m <= {n} (or omit m for n - f = {n - f})"
        )
    names = [data.clients[i] for i in idx]
    distances = data.distances(include_buffers)
    scores = krum_scores(distances if rows is None else distances[np.ix_(idx, idx)], f)
    selected = rank_ascending(names, scores)[:m]
    chosen = set(selected)
    mask = np.array([c in chosen for c in data.clients])
    weights = np.where(mask, data.num_examples.astype(np.float64), 0.0)
    if weights.sum() <= 0:  # the selected clients all reported 0 examples: plain mean
        weights = mask.astype(np.float64)

    # Σ_{i∈S} n_i (b + d_i) / Σ_{i∈S} n_i = b + Σ_{i∈S} n_i d_i / Σ_{i∈S} n_i  (one GEMV)
    def model() -> Vector:  # deferred: skipped when already stored
        return data.to_weights(data.weighted_mean(weights))

    share = dict(zip(data.clients, weights / weights.sum(), strict=True))
    return WorkloadResult(
        {
            "selected": selected,
            "scores": {c: float(s) for c, s in zip(names, scores, strict=True)},
            "weights": {c: float(share[c]) for c in selected},
            "f": f,
            "m": m,
        },
        model=model,
    )


WORKLOAD = register(
    Workload(
        name="multi_krum",
        cls="round",
        description=(
            "Multi-Krum: select the m updates of least Krum score (n-f-2 nearest others) and "
            "return their example-weighted average."
        ),
        reference="Blanchard et al. 2017",
        run=lambda data, params: multi_krum(data, **params),
        params={
            "f": F_PARAM,
            "m": Param("int", None, "updates to average (default n - f)", minimum=1, nullable=True),
            "include_buffers": INCLUDE_BUFFERS,
            "clients": CLIENTS_PARAM,
        },
    )
)
