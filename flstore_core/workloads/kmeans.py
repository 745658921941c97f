"""k-means clustering of a round's flattened updates.

Reference: scikit-learn ``KMeans`` (Lloyd's algorithm with k-means++ seeding, Arthur and
Vassilvitskii 2007) minimising the within-cluster sum of squares
``Σ_j Σ_{i ∈ C_j} ‖x_i − μ_j‖²``.

Every step of k-means — the k-means++ draws, assignments, centroid updates, inertia — depends on
the rows only through their pairwise distances, and is unchanged by a translation. n rows span
at most n dimensions, so the fit runs on the exact n-dimensional embedding ``Y = U·√Λ`` of the
round's *centred* Gram matrix ``G_c = Z·Zᵀ = U·Λ·Uᵀ`` (``z_i = x_i − x̄``, ``Y·Yᵀ = G_c``): the
shared artifact, no pass over the (n, d) matrix, and no digits lost to a common offset that
dwarfs the clients' differences (as raw weights without a stored base have). Being translation
invariant, the labels are the same for deltas and for weights. The rows are the float trainable
parameters (``include_buffers`` adds BatchNorm running statistics; integer tensors never).
scikit-learn's convergence tolerance is relative to the mean per-feature
variance, which the embedding changes by d/n, so ``tol`` is rescaled to keep the same absolute
threshold; with the same ``random_state`` the labels are those scikit-learn gives on the rows
themselves (up to floating-point ties), which the tests check.
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
    check_k,
    register,
)

N_INIT = 10
TOL = 1e-4  # scikit-learn's default


def gram_embedding(gram: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Rows ``Y`` with ``Y·Yᵀ = gram``: pairwise distances and inner products of the originals."""
    eigval, eigvec = np.linalg.eigh(gram)
    keep = eigval > eigval.max() * 1e-12 if eigval.max() > 0 else eigval > 0
    if not keep.any():
        return np.zeros((gram.shape[0], 1))
    out: npt.NDArray[np.float64] = eigvec[:, keep] * np.sqrt(eigval[keep])
    return out


def kmeans(
    data: RoundView,
    k: int = 2,
    seed: int = 0,
    use_delta: bool = True,
    include_buffers: bool = False,
) -> WorkloadResult:
    """Cluster the round's updates into ``k`` groups with scikit-learn's KMeans.

    Parameters
    ----------
    data : RoundView
        The round (deltas when its base is stored).
    k : int, default 2
        Number of clusters, ``2 <= k <= n``.
    seed : int, default 0
        ``random_state`` of the k-means++ seeding; the same seed gives the same labels.
    use_delta : bool, default True
        Cluster ``w_i - base`` when the base is stored, else the stored weights (the same
        labels and inertia: k-means is translation invariant).
    include_buffers : bool, default False
        Also cluster on BatchNorm running statistics.

    Returns
    -------
    WorkloadResult
        ``labels`` (client -> cluster number), ``sizes`` (clients per cluster, by number),
        ``inertia`` (within-cluster sum of squares), ``iterations``.
    """
    if k < 2:
        raise InvalidParamsError(f"param 'k' must be >= 2 to split the round, got {k}")
    if data.n < 2:
        raise InvalidParamsError(
            f"kmeans splits the round into k >= 2 clusters and needs at least 2 clients; "
            f"round {data.round} of job {data.job!r} has {data.n}"
        )
    check_k(k, data.n)
    rows = gram_embedding(data.centred_gram(include_buffers))
    d = max(data.columns.width(include_buffers), 1)
    # scikit-learn (with scipy, ~100 MB resident) only where k-means runs: a node serving
    # only the other round workloads stays at the base runtime (flstore_core.cache.budget)
    from sklearn.cluster import KMeans

    tol = TOL * rows.shape[1] / d  # same absolute threshold as on the (n, d) rows
    model = KMeans(n_clusters=k, n_init=N_INIT, random_state=seed, tol=tol).fit(rows)
    labels = np.asarray(model.labels_, dtype=np.int64)
    return WorkloadResult(
        {
            "labels": {c: int(lab) for c, lab in zip(data.clients, labels, strict=True)},
            "sizes": np.bincount(labels, minlength=k).tolist(),
            "inertia": float(model.inertia_),
            "iterations": int(model.n_iter_),
            "use_delta": bool(use_delta and data.is_delta),
        }
    )


WORKLOAD = register(
    Workload(
        name="kmeans",
        cls="round",
        needs=("sklearn",),
        description="k-means (scikit-learn, k-means++ seeding, 10 inits) labels of the updates.",
        reference="scikit-learn KMeans",
        run=lambda data, params: kmeans(data, **params),
        params={
            "k": Param("int", 2, "number of clusters (2 <= k <= clients)", minimum=2),
            "seed": Param("int", 0, "random_state of the seeding", minimum=0, maximum=2**32 - 1),
            "use_delta": USE_DELTA,
            "include_buffers": INCLUDE_BUFFERS,
        },
    )
)
