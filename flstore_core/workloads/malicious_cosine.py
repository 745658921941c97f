"""Malicious-client filtering: flag the updates that point away from the round's consensus.

Reference: FLStore artifact, malicious-filtering workload — score each client by the cosine
similarity of its update to the mean update of the round,
``cos(x_i, m) = x_i·m / (‖x_i‖ ‖m‖)`` with ``m = (1/n) Σ_j x_j``, and flag the least similar:
the bottom ``k``, or every client whose similarity falls below ``threshold`` when one is given.
The scores come from the round's shared Gram matrix (see :func:`cosine_to_mean`), so a warm
request costs no pass over the updates.
"""

from __future__ import annotations

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
from flstore_core.workloads.cosine_select import FLOAT32_TIE, cosine_to_mean, rank_by_score


def malicious_cosine(
    data: RoundView,
    k: int = 1,
    threshold: float | None = None,
    use_delta: bool = True,
    include_buffers: bool = False,
) -> WorkloadResult:
    """Flag the ``k`` clients least similar to the round mean, or those below ``threshold``.

    Parameters
    ----------
    data : RoundView
        The round (deltas when its base is stored).
    k : int, default 1
        How many clients to flag when ``threshold`` is not given; at most the round's size.
    threshold : float or None, default None
        Flag every client whose cosine to the mean is strictly below this value; overrides ``k``.
    use_delta : bool, default True
        Work on ``w_i - base`` when the base is stored (cosines differ from those of weights).
    include_buffers : bool, default False
        Also read BatchNorm running statistics; cosines are over the float trainable parameters
        otherwise, integer tensors never (:mod:`flstore_core.data.columns`).

    Returns
    -------
    WorkloadResult
        ``flagged`` (worst first), ``scores`` (client -> cosine to the mean), ``rule``.
    """
    cos = cosine_to_mean(data.gram(use_delta, include_buffers))
    # ascending similarity = descending -cos; ties (also float32 ones) broken by client id
    worst_first = rank_by_score(data.clients, -cos, FLOAT32_TIE)
    if threshold is None:
        check_k(k, data.n)
        flagged = worst_first[:k]
        rule = f"bottom {k}"
    else:
        below = {c for c, s in zip(data.clients, cos, strict=True) if s < threshold}
        flagged = [c for c in worst_first if c in below]
        rule = f"cosine < {threshold}"
    return WorkloadResult(
        {
            "flagged": flagged,
            "scores": {c: float(s) for c, s in zip(data.clients, cos, strict=True)},
            "rule": rule,
            "use_delta": bool(use_delta and data.is_delta),
        }
    )


WORKLOAD = register(
    Workload(
        name="malicious_cosine",
        cls="round",
        description=(
            "Flag the clients whose update is least similar (cosine) to the round mean: "
            "the bottom k, or all below threshold when given."
        ),
        reference="FLStore artifact (malicious-filtering)",
        run=lambda data, params: malicious_cosine(data, **params),
        params={
            "k": Param("int", 1, "clients to flag when no threshold is given", minimum=1),
            "threshold": Param(
                "float",
                None,
                "flag every client with cosine below this (overrides k)",
                minimum=-1.0,
                maximum=1.0,
                nullable=True,
            ),
            "use_delta": USE_DELTA,
            "include_buffers": INCLUDE_BUFFERS,
        },
    )
)
