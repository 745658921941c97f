"""Clustered FL: bipartition a round by the cosine similarity of its updates, and the criterion.

Reference: Sattler, Müller and Samek, "Clustered Federated Learning: Model-Agnostic Distributed
Multitask Optimization Under Privacy Constraints", IEEE TNNLS 2020. With ``Δ_i`` the update of
client ``i`` (holding ``n_i`` of the ``n`` examples):

- pairwise similarities ``α_ij = ⟨Δ_i, Δ_j⟩ / (‖Δ_i‖ ‖Δ_j‖)``;
- the bipartition ``c_1 ∪ c_2`` by complete-linkage agglomerative clustering on ``1 − α`` (as
  the authors' reference implementation does), and its cross-cluster maximum
  ``α_max^cross = max_{i ∈ c_1, j ∈ c_2} α_ij``;
- the paper's split criterion: the federation is near a stationary point of the joint
  objective while some clients are not, ``‖Σ_i (n_i/n) Δ_i‖ < ε_1`` and ``max_i ‖Δ_i‖ > ε_2``.

Every quantity comes from the round's shared Gram matrix ``G``: ``α = G / √(diag G diag Gᵀ)``,
``‖Σ_i w_i Δ_i‖ = √(wᵀ G w)`` and ``‖Δ_i‖ = √G_ii``.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from flstore_core.cache.round_view import RoundView
from flstore_core.errors import InvalidParamsError
from flstore_core.workloads import (
    INCLUDE_BUFFERS,
    USE_DELTA,
    Param,
    Workload,
    WorkloadResult,
    register,
)

F64 = npt.NDArray[np.float64]


def pairwise_cosine(gram: F64) -> F64:
    """``α_ij = G_ij / (√G_ii √G_jj)``; a zero update has similarity 0 to everything."""
    norms = np.sqrt(np.maximum(np.diag(gram), 0.0))
    denom = np.outer(norms, norms)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = np.where(denom > 0, gram / np.where(denom > 0, denom, 1.0), 0.0)
    return np.clip(cos, -1.0, 1.0)


def bipartition(cos: F64) -> npt.NDArray[np.int64]:
    """Labels 0/1 of the complete-linkage bipartition on the dissimilarity ``1 − α``."""
    # imported here, not with the module: the registry imports every workload module, and a
    # node that never splits clusters should not carry scikit-learn (flstore_core.cache.budget)
    from sklearn.cluster import AgglomerativeClustering

    dissimilarity = 1.0 - cos
    np.fill_diagonal(dissimilarity, 0.0)
    model = AgglomerativeClustering(n_clusters=2, metric="precomputed", linkage="complete")
    return np.asarray(model.fit(dissimilarity).labels_, dtype=np.int64)


def cfl_split(
    data: RoundView,
    eps_1: float = 0.4,
    eps_2: float = 1.6,
    use_delta: bool = True,
    include_buffers: bool = False,
) -> WorkloadResult:
    """Bipartition the round as CFL would and report its split criterion.

    Parameters
    ----------
    data : RoundView
        The round, at least 2 clients (deltas when its base is stored).
    eps_1 : float, default 0.4
        Split only if the weighted mean update norm is below this (near-stationary federation).
    eps_2 : float, default 1.6
        Split only if some client's update norm is above this (that client is not stationary).
    use_delta : bool, default True
        Use ``w_i - base`` when the base is stored; CFL is defined on updates, so turn this off
        only for rounds without a stored base.
    include_buffers : bool, default False
        Also read BatchNorm running statistics; CFL's authors' code works on the model's
        parameters, integer tensors never (:mod:`flstore_core.data.columns`).

    Returns
    -------
    WorkloadResult
        ``labels`` (client -> 0/1), ``clusters`` (two lists of clients), ``alpha_max`` (largest
        cross-cluster similarity), ``mean_norm``, ``max_norm``, ``eps_1``, ``eps_2`` and
        ``split`` (``mean_norm < eps_1 and max_norm > eps_2``).
    """
    if data.n < 2:
        raise InvalidParamsError(
            f"cfl_split bipartitions the round and needs at least 2 clients; round has {data.n}"
        )
    gram = data.gram(use_delta, include_buffers)
    cos = pairwise_cosine(gram)
    labels = bipartition(cos)
    in_first = labels == 0
    # α_max^cross = max_{i ∈ c_1, j ∈ c_2} α_ij
    alpha_max = float(cos[np.ix_(in_first, ~in_first)].max())
    w = data.num_examples.astype(np.float64)
    if w.sum() <= 0:  # no example counts: every client weighs the same
        w = np.ones(data.n)
    w = w / w.sum()
    # ‖Σ_i (n_i/n) Δ_i‖ = √(wᵀ G w);  max_i ‖Δ_i‖ = √(max_i G_ii)
    mean_norm = float(np.sqrt(max(float(w @ gram @ w), 0.0)))
    max_norm = float(np.sqrt(max(float(np.diag(gram).max()), 0.0)))
    clusters = [
        [c for c, lab in zip(data.clients, labels, strict=True) if lab == side] for side in (0, 1)
    ]
    return WorkloadResult(
        {
            "labels": {c: int(lab) for c, lab in zip(data.clients, labels, strict=True)},
            "clusters": clusters,
            "alpha_max": alpha_max,
            "mean_norm": mean_norm,
            "max_norm": max_norm,
            "eps_1": eps_1,
            "eps_2": eps_2,
            "split": bool(mean_norm < eps_1 and max_norm > eps_2),
            "use_delta": bool(use_delta and data.is_delta),
        }
    )


WORKLOAD = register(
    Workload(
        name="cfl_split",
        cls="round",
        needs=("sklearn",),
        description=(
            "Clustered-FL bipartition by pairwise cosine of updates (complete linkage), the "
            "cross-cluster max similarity and the split criterion on mean and max update norms."
        ),
        reference="Sattler et al. 2020",
        run=lambda data, params: cfl_split(data, **params),
        params={
            "eps_1": Param("float", 0.4, "split if the mean update norm is below this", minimum=0),
            "eps_2": Param("float", 1.6, "split if the max update norm is above this", minimum=0),
            "use_delta": USE_DELTA,
            "include_buffers": INCLUDE_BUFFERS,
        },
    )
)
