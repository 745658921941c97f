"""Cosine selection: the k clients whose update points most nearly along the round's mean.

Reference: FLStore artifact, client-scheduling workload — score each client by the cosine
similarity of its update to the mean update of the round and select the top k. Computed from the
round's Gram matrix ``G`` (shared with the other similarity workloads): with ``m`` the mean of
the n rows, ``x_i·m = (G·1)_i / n`` and ``‖m‖² = 1ᵀG1 / n²``, hence
``cos(x_i, m) = (G·1)_i / (√G_ii · √(1ᵀG1))``.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from flstore_core.cache.round_view import RoundView
from flstore_core.workloads import (
    INCLUDE_BUFFERS,
    USE_DELTA,
    Param,
    Workload,
    WorkloadResult,
    check_k,
    register,
)


def cosine_to_mean(gram: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Cosine similarity of every row to the mean row, from the Gram matrix alone."""
    row_sums = gram.sum(axis=1)
    norms = np.sqrt(np.maximum(np.diag(gram), 0.0))
    mean_norm = np.sqrt(max(float(row_sums.sum()), 0.0))
    denom = norms * mean_norm
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = np.where(denom > 0, row_sums / np.where(denom > 0, denom, 1.0), 0.0)
    return np.clip(cos, -1.0, 1.0)


# Scores built on float32 rows (Gram entries, distances) carry rounding of ~1e-7 of their
# scale, so mathematically equal scores — identical or parallel updates — come out a few ulps
# apart, in an order set by where each row sits in the GEMM. Scores closer than this fraction
# of the largest |score| are ties, broken by client id.
FLOAT32_TIE = 1e-6


def rank_by_score(
    clients: list[str], scores: npt.NDArray[np.float64], tie: float = 0.0
) -> list[str]:
    """Clients by descending score; ties broken by client id so the order is deterministic.

    With ``tie > 0``, scores within ``tie · max|score|`` of their neighbour in the sorted
    order (chained) count as tied: the float32 rounding of equal scores then never decides.
    """
    order = sorted(range(len(clients)), key=lambda i: (-scores[i], clients[i]))
    if tie <= 0 or not order:
        return [clients[i] for i in order]
    tol = tie * float(np.max(np.abs(scores)))
    groups: list[list[int]] = []
    for i in order:
        if groups and scores[groups[-1][-1]] - scores[i] <= tol:
            groups[-1].append(i)
        else:
            groups.append([i])
    return [clients[i] for group in groups for i in sorted(group, key=clients.__getitem__)]


def cosine_select(
    data: RoundView, k: int = 3, use_delta: bool = True, include_buffers: bool = False
) -> WorkloadResult:
    """Top-``k`` clients by cosine similarity to the round mean; ``scores`` for every client.

    Over the float trainable parameters (plus BatchNorm running statistics when
    ``include_buffers``; integer tensors never: :mod:`flstore_core.data.columns`).
    """
    check_k(k, data.n)
    cos = cosine_to_mean(data.gram(use_delta, include_buffers))
    order = rank_by_score(data.clients, cos, FLOAT32_TIE)
    return WorkloadResult(
        {
            "selected": order[:k],
            "scores": {c: float(s) for c, s in zip(data.clients, cos, strict=True)},
            "use_delta": bool(use_delta and data.is_delta),
        }
    )


WORKLOAD = register(
    Workload(
        name="cosine_select",
        cls="round",
        description="Top-k clients by cosine similarity of their update to the round mean.",
        reference="FLStore artifact (client-scheduling)",
        run=lambda data, params: cosine_select(data, **params),
        params={
            "k": Param("int", 3, "clients to select", minimum=1),
            "use_delta": USE_DELTA,
            "include_buffers": INCLUDE_BUFFERS,
        },
    )
)
