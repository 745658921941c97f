"""The ingest summaries: per-update summaries and per-round contribution scores, as pure
functions of a round.

Every score here is a function of three kinds of numbers, so ingestion (which streams updates
and never holds a round matrix) and backfill (which may) compute exactly the same thing:

* ``x_i`` — client i's update as a flat float32 row in the round's tensor order, as a delta
  ``w_i − base`` when the round's base model is stored (ARCHITECTURE §2: ``global/{r-1}`` or the
  initial model), else the stored tensors — restricted to the job's floating-point *trainable
  parameters* (:func:`flstore_core.data.columns.job_columns`: integer tensors such as
  BatchNorm's ``num_batches_tracked`` never, running statistics not). These are the cache
  node's rules for the base and for the columns, so ``cos_to_mean`` equals ``cosine_select``'s
  score with its defaults, and appending counters or running statistics to a round does not
  move any summary (a counter that grows by one per batch would otherwise make every cosine
  ≈ 1 and dominate every norm);
* ``S = Σ_j x_j`` and ``n``, the round's sum and size (the mean is ``m = S / n``);
* ``x_i·S`` and ``‖x_i‖²``.

The summaries written to the round manifest (``UpdateEntry.summary``, read by ``client``-class
workloads through the manifests) are:

* ``cos_to_mean`` — ``cos(x_i, m) = x_i·S / (‖x_i‖ ‖S‖)`` (0 when either is zero);
* ``update_norm`` — ``‖x_i‖`` (the stored ``norm`` is of the weights, this one of the update);
* ``contribution`` (backfill) — the leave-one-out norm gain of the mean,
  ``‖m‖ − ‖m₋ᵢ‖`` with ``m₋ᵢ = (S − x_i)/(n − 1)`` (``‖m₋ᵢ‖ = 0`` when ``n = 1``). It is positive
  when the client's update lengthens the consensus direction and negative when it cancels it
  out — a cheap, data-free stand-in for ``contribution_loo`` (which needs a validation set and a
  model), expanded from the same dot products:
  ``‖S − x_i‖² = ‖S‖² − 2 x_i·S + ‖x_i‖²``.

Deltas are formed in float32 (exact for nearby weights) and summed in float32; dot products are
taken block-wise (BLAS ``sdot`` on 64 Ki elements, blocks summed in float64): as fast as one
``sdot`` and accurate to ~1e-6 relative, where one ``sdot`` over 10⁷ elements drifts further.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from flstore_core.data.codec import TensorSpec, slices_of
from flstore_core.data.columns import ColumnSplit, split_columns
from flstore_core.data.manifest import CONTRIBUTION, COS_TO_MEAN, UPDATE_NORM

INGEST_SUMMARIES = (COS_TO_MEAN, UPDATE_NORM)
BACKFILL_SUMMARIES = (COS_TO_MEAN, UPDATE_NORM, CONTRIBUTION)

BLOCK = 1 << 16

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]


def blocked_dot(x: F32, y: F32) -> float:
    """``x·y`` of two float32 vectors: ``sdot`` per 64 Ki block, blocks summed in float64."""
    total = 0.0
    for start in range(0, x.shape[0], BLOCK):
        total += float(np.dot(x[start : start + BLOCK], y[start : start + BLOCK]))
    return total


def delta_parts(
    parts: Sequence[F32], base: F32 | None, ranges: Sequence[tuple[int, int]]
) -> list[F32]:
    """``x = w − base`` part by part (the parts themselves when there is no base).

    float32 subtraction of two nearby weights is exact (Sterbenz), so the small deltas of
    full-weight updates keep all their digits.
    """
    if base is None:
        return list(parts)
    return [part - base[a:b] for part, (a, b) in zip(parts, ranges, strict=True)]


def read_parts(
    parts: Sequence[F32], base: F32 | None, ranges: Sequence[tuple[int, int]], read: Sequence[int]
) -> list[tuple[F32, tuple[int, int]]]:
    """The deltas (or stored parts) of the tensors ``read``, each with its column range."""
    picked = [ranges[i] for i in read]
    return list(zip(delta_parts([parts[i] for i in read], base, picked), picked, strict=True))


class RoundProjector:
    """Pass two of a streamed round: ``x_i·S`` and ``‖x_i‖²`` of one update at a time, over
    the tensors ``read`` (indices into ``reference``; the job's parameters)."""

    def __init__(
        self,
        direction: F32,
        base: F32 | None,
        reference: Sequence[TensorSpec],
        read: Sequence[int] | None = None,
    ) -> None:
        self.base = base
        self.ranges = slices_of(reference)
        self.read = tuple(range(len(reference))) if read is None else tuple(read)
        self.direction = direction  # S = Σ x_j (zero outside the columns read)
        self.sum_sq = blocked_dot(direction, direction)

    def project(self, parts: Sequence[F32]) -> tuple[float, float]:
        """``(x·S, ‖x‖²)`` of one update given as its stored parts in the round's order."""
        dot = sq = 0.0
        for x, (a, b) in read_parts(parts, self.base, self.ranges, self.read):
            dot += blocked_dot(x, self.direction[a:b])
            sq += blocked_dot(x, x)
        return dot, sq


@dataclass(frozen=True)
class RoundScores:
    """The scores of one round's clients, in ``clients`` order."""

    clients: tuple[str, ...]
    cos_to_mean: tuple[float, ...]
    update_norm: tuple[float, ...]
    contribution: tuple[float, ...]
    delta: bool

    def summaries(self, names: Sequence[str] = INGEST_SUMMARIES) -> dict[str, dict[str, float]]:
        """``{client: {summary name: value}}`` for ``ObjectStore.commit_round(summaries=…)``."""
        columns = {
            COS_TO_MEAN: self.cos_to_mean,
            UPDATE_NORM: self.update_norm,
            CONTRIBUTION: self.contribution,
        }
        return {
            c: {name: float(columns[name][i]) for name in names} for i, c in enumerate(self.clients)
        }


def round_scores(
    clients: Sequence[str],
    dots: Sequence[float],
    sq_norms: Sequence[float],
    sum_sq: float,
    *,
    delta: bool,
) -> RoundScores:
    """Scores of a round from ``x_i·S``, ``‖x_i‖²`` and ``‖S‖²`` (see the module docstring)."""
    n = len(clients)
    d = np.asarray(dots, dtype=np.float64)
    q = np.maximum(np.asarray(sq_norms, dtype=np.float64), 0.0)
    s_norm = math.sqrt(max(sum_sq, 0.0))
    norms = np.sqrt(q)
    denom = norms * s_norm
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = np.where(denom > 0, d / np.where(denom > 0, denom, 1.0), 0.0)
    cos = np.clip(cos, -1.0, 1.0)
    mean_norm = s_norm / n if n else 0.0
    # ‖m₋ᵢ‖ from ‖S − x_i‖² = ‖S‖² − 2 x_i·S + ‖x_i‖², clipped at 0 against rounding
    loo = np.sqrt(np.maximum(sum_sq - 2.0 * d + q, 0.0)) / (n - 1) if n > 1 else np.zeros(n)
    return RoundScores(
        clients=tuple(clients),
        cos_to_mean=tuple(float(v) for v in cos),
        update_norm=tuple(float(v) for v in norms),
        contribution=tuple(float(mean_norm - v) for v in loo),
        delta=delta,
    )


def stream_scores(
    clients: Sequence[str],
    load: Callable[[int], Sequence[F32]],
    reference: Sequence[TensorSpec],
    base: F32 | None,
    threads: int = 2,
    keep: bool = False,
    columns: ColumnSplit | None = None,
) -> RoundScores:
    """Scores of a round read one update at a time: ``load(i)`` gives client i's stored parts
    (:func:`flstore_core.data.rows.flat_parts`).

    ``columns`` is the job's split of ``reference``
    (:func:`flstore_core.data.columns.job_columns`); None applies the name/dtype rule. Only its
    parameters are read.

    Pass one adds the deltas into one float32 sum per thread; pass two projects every update on
    the sum. ``keep`` holds the loaded parts from pass one to pass two (one read per update, the
    round's size in memory); otherwise each update is loaded twice. File reads, ``np.add`` and
    ``sdot`` release the GIL, so ``threads`` work on disjoint clients in parallel.
    """
    n = len(clients)
    ranges = slices_of(reference)
    width = ranges[-1][1] if ranges else 0
    read = (columns or split_columns(reference)).parameters
    threads = max(1, min(threads, n))
    kept: dict[int, Sequence[F32]] = {}

    def add_up(first: int) -> F32:
        total = np.zeros(width, dtype=np.float32)
        for i in range(first, n, threads):
            parts = load(i)
            if keep:
                kept[i] = parts
            for x, (a, b) in read_parts(parts, base, ranges, read):
                np.add(total[a:b], x, out=total[a:b])
        return total

    def project(i: int) -> tuple[float, float]:
        parts = kept.pop(i) if keep else load(i)
        return projector.project(parts)

    with ThreadPoolExecutor(threads) as pool:
        partials = list(pool.map(add_up, range(threads)))
        direction = partials[0]
        for other in partials[1:]:
            direction += other
        del partials
        projector = RoundProjector(direction, base, reference, read)
        projected = list(pool.map(project, range(n)))
    return round_scores(
        clients,
        [d for d, _ in projected],
        [q for _, q in projected],
        projector.sum_sq,
        delta=base is not None,
    )


def matrix_scores(
    clients: Sequence[str],
    rows: F32,
    base: F32 | None,
    columns: ColumnSplit,
    *,
    in_place: bool = False,
) -> RoundScores:
    """Scores of a round held as an ``(n, d)`` float32 matrix of stored rows (backfill, the
    Flower sink), over the parameter columns of ``columns`` (the job's split of the rows'
    specs: :func:`flstore_core.data.columns.job_columns`).

    ``in_place`` lets the base be subtracted from ``rows`` itself (no copy of the round).
    """
    n = rows.shape[0]
    dots = np.zeros(n)
    sq = np.zeros(n)
    sum_sq = 0.0
    for a, b in columns.parameter_runs:  # runs are disjoint: every sum adds over them
        x = rows[:, a:b] if in_place else rows[:, a:b].copy()
        if base is not None:
            x -= base[a:b]
        s = x.sum(axis=0, dtype=np.float64)
        sum_sq += float(np.dot(s, s))
        direction = s.astype(np.float32)
        for i in range(n):
            row = x[i]
            dots[i] += blocked_dot(row, direction)
            sq[i] += blocked_dot(row, row)
    return round_scores(clients, dots.tolist(), sq.tolist(), sum_sq, delta=base is not None)
