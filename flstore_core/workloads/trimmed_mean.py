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

import functools
import math
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import numpy.typing as npt

from flstore_core.cache.round_data import RoundData, register_columnwise
from flstore_core.cache.round_view import RoundView, Vector
from flstore_core.errors import InvalidParamsError
from flstore_core.workloads import Param, Workload, WorkloadResult, register
from flstore_core.workloads.subset import CLIENTS_PARAM, client_rows

# elements of the matrix processed at a time: a chunk's rows, the scratch row and its float64
# accumulator stay in one core's L2 (1 MB on the EPYC measured: 16,384 columns of 10 rows),
# which is what makes the network's ~30 min/max passes cost less than reading the matrix twice
CHUNK_ELEMENTS = 10 * 32768
# threads a node's trimmed mean runs on (chunks split by column range, so the result does not
# depend on them): on 2 cores, 10 x 11.2M float32, 53 ms with two against 71 with one (one numpy
# pass: 22 ms); a Lambda function has 2 vCPUs from 1,769 MB
THREADS = min(2, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1)


@functools.lru_cache(maxsize=512)
def _batcher(n: int) -> tuple[tuple[int, int], ...]:
    """Batcher's odd-even merge sort on ``n`` wires: the network for the next power of two
    ``p``, without its comparators that touch a wire ``>= n`` (padding with +inf on the top
    wires, which such a comparator never moves). Knuth, TAOCP vol. 3, §5.3.4, Algorithm M."""
    p = 1
    while p < n:
        p *= 2
    out: list[tuple[int, int]] = []
    t = 1
    while t < p:
        k = t
        while k >= 1:
            for j in range(k % t, p - k, 2 * k):
                for i in range(min(k, p - j - k)):
                    a, b = i + j, i + j + k
                    if a // (2 * t) == b // (2 * t) and b < n:
                        out.append((a, b))
            k //= 2
        t *= 2
    return tuple(out)


def _bubble(n: int, cut: int) -> tuple[tuple[int, int], ...]:
    """``cut`` bubble passes carrying the minima to wires ``0..cut-1``, then ``cut`` carrying
    the maxima to the top ``cut`` wires: ``~2·cut·n`` comparators, fewer than a sort for
    ``cut = 1``."""
    net = [(i - 1, i) for k in range(cut) for i in range(n - 1, k, -1)]
    net += [(i, i + 1) for k in range(cut) for i in range(cut, n - 1 - k)]
    return tuple(net)


def _prune(net: tuple[tuple[int, int], ...], n: int, cut: int) -> tuple[tuple[int, int], ...]:
    """``net`` without the comparators the trimmed sum does not need: it needs the *sets* of
    values on the low ``cut`` wires, the middle ones and the top ``cut``, not their order. A
    comparator whose two wires end in the same set and are touched by no later comparator kept
    only orders values within that set, so it goes (scanning from the end)."""

    def group(w: int) -> int:
        return 0 if w < cut else 2 if w >= n - cut else 1

    touched: set[int] = set()
    kept: list[tuple[int, int]] = []
    for a, b in reversed(net):
        if group(a) == group(b) and a not in touched and b not in touched:
            continue
        kept.append((a, b))
        touched.update((a, b))
    return tuple(reversed(kept))


@functools.lru_cache(maxsize=512)
def trim_network(n: int, cut: int) -> tuple[tuple[int, int, bool, bool], ...]:
    """A comparator network after which wires ``cut .. n-cut-1`` hold the values of ranks
    ``cut .. n-cut-1`` of the ``n`` inputs (as a set): the shorter of pruned Batcher and pruned
    bubble passes (for n = 10: 17 comparators for cut 1, 29 for cut 2, 26 for 3, 29 for 4).

    Each comparator ``(a, b, lo, hi)`` says which of its outputs is used later (``lo``: the
    minimum left on wire ``a``, ``hi``: the maximum on ``b``) — by a later comparator, or by the
    sum when the wire is kept; an unused one is not computed (a minimum carried onto a wire that
    is cut, say), which saves one vector pass in ten.
    """
    sort = _prune(_batcher(n), n, cut)
    bubble = _prune(_bubble(n, cut), n, cut)
    net = sort if len(sort) <= len(bubble) else bubble
    needed = set(range(cut, n - cut))  # wires whose value is read after this point
    out: list[tuple[int, int, bool, bool]] = []
    for a, b in reversed(net):
        lo, hi = a in needed, b in needed
        out.append((a, b, lo, hi))
        needed |= {a, b}  # a kept comparator reads both wires (pruning left no useless one)
    return tuple(reversed(out))


def _trim_chunk(
    sources: list[npt.NDArray[np.float32]],
    net: tuple[tuple[int, int, bool, bool], ...],
    cut: int,
    scratch: list[npt.NDArray[np.float32]],
    acc: npt.NDArray[np.float64],
    out: npt.NDArray[np.float32],
) -> None:
    """The trimmed mean of one column chunk, ``sources`` being its rows (views of the matrix,
    only read). Each comparator ``(a, b)`` is at most two vector passes, ``min`` onto a free
    scratch row and ``max`` onto ``b``'s own scratch row (or another free one while ``b`` still
    is the matrix); the wires then name the scratch rows, so nothing is copied."""
    n = len(sources)
    rows = list(sources)
    owned = [False] * n
    free = list(scratch)
    for a, b, need_lo, need_hi in net:
        ra, rb = rows[a], rows[b]
        lo = hi = ra  # placeholders for an output nobody reads
        if need_lo:
            lo = free.pop()
            np.minimum(ra, rb, out=lo)
        if need_hi:
            hi = rb if owned[b] else free.pop()
            np.maximum(ra, rb, out=hi)
        elif owned[b]:
            free.append(rb)
        if owned[a]:
            free.append(ra)
        rows[a], rows[b] = lo, hi
        owned[a], owned[b] = need_lo, need_hi
    # (1 / (n − 2c)) Σ_{i=c}^{n−c−1} x_(i)[k], the kept values summed in float64
    np.copyto(acc, rows[cut])
    for k in range(cut + 1, n - cut):
        np.add(acc, rows[k], out=acc)
    np.divide(acc, n - 2 * cut, out=out, casting="same_kind")


def trimmed_mean_rows(
    matrix: npt.NDArray[np.float32],
    cut: int,
    chunk_elements: int = CHUNK_ELEMENTS,
    rows: Sequence[int] | None = None,
    threads: int = 1,
) -> npt.NDArray[np.float32]:
    """Coordinate-wise mean of the rows of ``matrix`` (or of its rows ``rows``) without the
    ``cut`` lowest and highest.

    A comparator network (:func:`trim_network`) moves, column by column, the ``cut`` smallest
    values onto the first wires and the ``cut`` largest onto the last; the middle wires are
    summed in float64. Comparators are elementwise ``np.minimum``/``np.maximum`` over a chunk of
    contiguous columns, so the work is ~30 branch-free passes over a cache-resident chunk for
    n = 10 instead of one small sort per column (``np.sort(axis=0)``, ~20x slower). min and max
    return one of their inputs exactly, so the kept values are the sorted ranks bit for bit and
    the result equals the sort's up to the float64 summation order; the values are removed, never
    subtracted, so an outlier of 1e30 costs the kept ones no digits. Memory beyond the output
    is ``O(chunk_elements)``; ``threads`` split the chunks (column ranges: deterministic).
    """
    index = list(range(matrix.shape[0])) if rows is None else [int(r) for r in rows]
    n, d = len(index), matrix.shape[1]
    if not 0 <= 2 * cut < n:
        raise ValueError(f"cannot cut {cut} values from each end of {n}")
    net = trim_network(n, cut)
    out = np.empty(d, dtype=np.float32)
    cols = max(1, chunk_elements // n)

    def run(lo: int, hi: int) -> None:
        width = min(cols, hi - lo)
        buf = np.empty((n + 1, width), np.float32)
        scratch, acc = list(buf), np.empty(width, np.float64)
        for start in range(lo, hi, cols):
            stop = min(start + cols, hi)
            if stop - start < width:  # the last, narrower chunk
                scratch, acc = [r[: stop - start] for r in buf], acc[: stop - start]
            sources = [matrix[r, start:stop] for r in index]
            _trim_chunk(sources, net, cut, scratch, acc, out[start:stop])

    if threads <= 1 or d <= cols:
        run(0, d)
        return out
    # contiguous ranges of whole chunks, a few per thread so a slower core does not idle the other
    per = -(-d // (4 * threads) // cols) * cols or cols
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda a: run(a, min(a + per, d)), range(0, d, per)))
    return out


def trimmed_mean(
    data: RoundView, beta: float = 0.1, clients: list[str] | None = None
) -> WorkloadResult:
    """The β-trimmed mean of the round's models, coordinate by coordinate.

    Parameters
    ----------
    data : RoundView
        The round (deltas when its base is stored; the base is added back).
    beta : float, default 0.1
        Fraction of the values cut from *each* end, ``0 <= beta < 0.5``; ``⌊beta·n⌋`` values
        are cut per end.
    clients : list of str or None, default None
        Trim over these clients only (:mod:`flstore_core.workloads.subset`); ``n`` is then
        their number.

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
    rows = client_rows(data, clients)
    n = data.n if rows is None else len(rows)
    cut = math.floor(beta * n)
    if n - 2 * cut < 1:  # cannot happen for beta < 0.5; the definition's condition, kept
        raise InvalidParamsError(
            f"trimmed_mean with beta={beta} cuts {cut} of {n} clients from each end and keeps "
            "none: use a smaller beta or more clients"
        )

    def model() -> Vector:  # deferred: skipped when already stored
        if rows is not None:  # over a subset: its row indices (a sharded round sends them on)
            return data.to_weights(data.columnwise("trimmed_mean", cut=cut, rows=rows))
        # with nothing cut the trimmed mean is the plain mean, a shared artifact of the round
        vector = data.mean_vector() if cut == 0 else data.columnwise("trimmed_mean", cut=cut)
        return data.to_weights(vector)

    return WorkloadResult(
        {
            "beta": beta,
            "cut": cut,
            "kept": n - 2 * cut,
            "clients": list(data.clients) if rows is None else [data.clients[i] for i in rows],
        },
        model=model,
    )


def _trimmed_rows(
    data: RoundData, cut: int, rows: list[int] | None = None
) -> npt.NDArray[np.float32]:
    return trimmed_mean_rows(data.matrix, cut, rows=rows, threads=THREADS)


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
            ),
            "clients": CLIENTS_PARAM,
        },
    )
)
