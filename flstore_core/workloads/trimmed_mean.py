"""Coordinate-wise trimmed mean: drop the β extremes of every coordinate, average the rest.

Reference: Yin, Chen, Ramchandran and Bartlett, "Byzantine-Robust Distributed Learning: Towards
Optimal Statistical Rates", ICML 2018, Definition 2 — for ``β ∈ [0, 1/2)`` and each coordinate
``k``, sort the ``n`` values ``x_1[k], …, x_n[k]``, remove the largest and the smallest
``β`` fraction and average the remaining ``n − 2⌊βn⌋``:

    trmean_β(x)[k] = 1 / (n − 2c) · Σ_{i=c}^{n−c−1} x_(i)[k],   c = ⌊βn⌋

with ``x_(i)[k]`` the i-th smallest value. The base model is the same constant for every client,
so trimming deltas and adding the base back equals trimming the weights themselves.

Buffers: every coordinate of the state dict is trimmed this way, not only the trainable
parameters — BatchNorm's running statistics get the same coordinate-wise trimmed mean, and
integer tensors (``num_batches_tracked``) the trimmed mean rounded to the nearest integer
(``np.rint``, halves to even) in their own dtype. The result is a complete state dict, as
Flower's FedTrimmedAvg returns (its ``trim_mean`` runs over every array) and as a PyTorch user
loads with ``load_state_dict`` (which would truncate a float counter, 10.5 → 10, hence the
rounding).
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

from flstore_core.cache.round_data import RoundData, register_columnwise
from flstore_core.errors import InvalidParamsError
from flstore_core.workloads import Param, Workload, WorkloadResult, register

# elements of the matrix sorted at a time: bounds the sort's copy (~4 MB of float32) whatever
# the model size, while keeping the number of Python-level chunks small (~30 for 10 x 11.7M)
CHUNK_ELEMENTS = 1 << 20


def trimmed_mean_rows(
    matrix: npt.NDArray[np.float32], cut: int, chunk_elements: int = CHUNK_ELEMENTS
) -> npt.NDArray[np.float32]:
    """Coordinate-wise mean of the rows of ``matrix`` without the ``cut`` lowest and highest.

    Sorted along axis 0 in column chunks so the extra memory stays ``O(chunk_elements)``
    instead of a full copy of the ``(n, d)`` matrix.
    """
    n, d = matrix.shape
    if not 0 <= 2 * cut < n:
        raise ValueError(f"cannot cut {cut} values from each end of {n}")
    kept = n - 2 * cut
    out = np.empty(d, dtype=np.float32)
    cols = max(1, chunk_elements // max(n, 1))
    for start in range(0, d, cols):  # chunks of columns, each one vectorised sort
        block = np.sort(matrix[:, start : start + cols], axis=0)
        # (1 / (n − 2c)) Σ_{i=c}^{n−c−1} x_(i)[k], accumulated in float64
        out[start : start + cols] = block[cut : n - cut].sum(axis=0, dtype=np.float64) / kept
    return out


def trimmed_mean(data: RoundData, beta: float = 0.1) -> WorkloadResult:
    """The β-trimmed mean of the round's models, coordinate by coordinate.

    Parameters
    ----------
    data : RoundData
        The round (deltas when its base is stored; the base is added back).
    beta : float, default 0.1
        Fraction of the values cut from *each* end, ``0 <= beta < 0.5``; ``⌊beta·n⌋`` values
        are cut per end.

    Returns
    -------
    WorkloadResult
        ``beta``, ``cut`` (values cut per end), ``kept`` (values averaged per coordinate),
        ``clients``; the model is the trimmed mean of every tensor, buffers included, integer
        tensors rounded to the nearest integer (module docstring).
    """
    if not 0.0 <= beta < 0.5:
        raise InvalidParamsError(
            f"param 'beta' is the fraction cut from each end and must be in [0, 0.5), "
            f"got {beta}: use a smaller beta"
        )
    cut = math.floor(beta * data.n)

    def model() -> npt.NDArray[np.float32]:  # deferred: skipped when already stored
        # with nothing cut the trimmed mean is the plain mean, a shared artifact of the round
        vector = data.mean_vector() if cut == 0 else data.columnwise("trimmed_mean", cut=cut)
        return data.to_weights(vector)

    return WorkloadResult(
        {
            "beta": beta,
            "cut": cut,
            "kept": data.n - 2 * cut,
            "clients": list(data.clients),
        },
        model=model,
    )


def _trimmed_rows(data: RoundData, cut: int) -> npt.NDArray[np.float32]:
    return trimmed_mean_rows(data.matrix, cut)


# coordinate-wise: a sharded round computes it block by block on the blocks' holders
register_columnwise("trimmed_mean", _trimmed_rows)

WORKLOAD = register(
    Workload(
        name="trimmed_mean",
        cls="round",
        description=(
            "Coordinate-wise beta-trimmed mean: cut floor(beta*n) values from each end of every "
            "coordinate and average the rest; returns model_key."
        ),
        reference="Yin et al. 2018",
        run=lambda data, params: trimmed_mean(data, **params),
        params={
            "beta": Param(
                "float",
                0.1,
                "fraction cut from each end, in [0, 0.5)",
                minimum=0.0,
                exclusive_maximum=0.5,
            )
        },
    )
)
