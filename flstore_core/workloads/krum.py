"""Krum: the single update closest to its n − f − 2 nearest neighbours.

Reference: Blanchard, El Mhamdi, Guerraoui and Stainer, "Machine Learning with Adversaries:
Byzantine Tolerant Gradient Descent", NeurIPS 2017. With ``n`` updates of which at most ``f``
are Byzantine (``n > 2f + 2``), the score of update ``i`` is

    s(i) = Σ_{j ∈ N_i} ‖x_i − x_j‖²

where ``N_i`` holds the ``n − f − 2`` updates nearest to ``x_i`` *other than* ``x_i`` itself;
Krum outputs the update of least score. The squared distances are the round's shared artifact
(derived from the Gram matrix of the rows centred on one of them where a common offset
dominates — the row nearest their mean — so an offset that dwarfs the clients' differences
costs no digits), which are the same for deltas and for stored weights.
Like the paper, distances are over the model's parameters: the float trainable parameters,
BatchNorm running statistics only with ``include_buffers``, integer tensors never
(:mod:`flstore_core.data.columns`); the selected client's model is returned whole.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from flstore_core.cache.round_view import RoundView
from flstore_core.errors import InvalidParamsError
from flstore_core.workloads import INCLUDE_BUFFERS, Param, Workload, WorkloadResult, register
from flstore_core.workloads.cosine_select import FLOAT32_TIE, rank_by_score


def check_f(f: int, n: int, workload: str = "krum", among: str = "the round has") -> None:
    """Krum's guarantee needs ``n > 2f + 2``; otherwise a 400 naming the largest valid f
    (``among`` says whose clients: the round's, or a subset's)."""
    if n > 2 * f + 2:
        return
    if n < 3:
        raise InvalidParamsError(
            f"{workload} needs at least 3 clients (n > 2f + 2) but {among} {n}"
        )
    max_f = (n - 3) // 2
    raise InvalidParamsError(
        f"{workload} needs n > 2f + 2 but f={f} and {among} n={n} clients: use f <= {max_f}"
    )


def krum_scores(distances: npt.NDArray[np.float64], f: int) -> npt.NDArray[np.float64]:
    """Krum score of every row from the (n, n) matrix of squared pairwise distances."""
    n = distances.shape[0]
    others = distances.copy()
    np.fill_diagonal(others, np.inf)  # self excluded, even when another update equals it
    num_closest = n - f - 2
    # s(i) = Σ of the n − f − 2 smallest ‖x_i − x_j‖², j ≠ i (row-wise partial sort)
    nearest = np.partition(others, num_closest - 1, axis=1)[:, :num_closest]
    scores: npt.NDArray[np.float64] = nearest.sum(axis=1)
    return scores


def rank_ascending(clients: list[str], scores: npt.NDArray[np.float64]) -> list[str]:
    """Clients by ascending score (best Krum score first), ties broken by client id (scores
    within float32 rounding of each other count as tied: identical updates score the same)."""
    return rank_by_score(clients, -scores, FLOAT32_TIE)


def krum(data: RoundView, f: int = 1, include_buffers: bool = False) -> WorkloadResult:
    """Select the update of least Krum score and return it as the model.

    Parameters
    ----------
    data : RoundView
        The round; distances are taken from its shared artifacts.
    f : int, default 1
        Number of Byzantine clients tolerated; the round must have ``n > 2f + 2`` clients.
    include_buffers : bool, default False
        Distances also over BatchNorm running statistics.

    Returns
    -------
    WorkloadResult
        ``selected`` (the one best client), ``scores`` (client -> Krum score, lower is
        better), ``f``, ``num_closest``; the model is the selected client's weights.
    """
    check_f(f, data.n, "krum")
    scores = krum_scores(data.distances(include_buffers), f)
    order = rank_ascending(data.clients, scores)
    best = data.clients.index(order[0])
    return WorkloadResult(
        {
            "selected": order[:1],
            "scores": {c: float(s) for c, s in zip(data.clients, scores, strict=True)},
            "f": f,
            "num_closest": data.n - f - 2,
        },
        model=lambda: data.client_weights(best),  # deferred: skipped when already stored
    )


F_PARAM = Param("int", 1, "Byzantine clients tolerated (needs n > 2f + 2)", minimum=0)

WORKLOAD = register(
    Workload(
        name="krum",
        cls="round",
        description=(
            "Krum: score each update by the sum of squared distances to its n-f-2 nearest "
            "others; select the best and return its model."
        ),
        reference="Blanchard et al. 2017",
        run=lambda data, params: krum(data, **params),
        params={"f": F_PARAM, "include_buffers": INCLUDE_BUFFERS},
    )
)
