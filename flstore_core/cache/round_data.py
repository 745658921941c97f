"""A round as a cache node holds it: the update matrix plus artifacts shared by workloads.

When the round's base model (the global model its clients started from) is stored, the matrix
holds *deltas* ``w_i - base`` in place and the base is kept beside it, so direction-based
workloads read deltas for free and weight-based ones add the base back (ARCHITECTURE §2).
Artifacts — squared norms, the Gram matrix ``D·Dᵀ``, pairwise distances, the mean — are
computed at most once per round per node and reused by every workload that needs them; the
counters say how often each was computed and reused. What every round supports, held whole or
not, is :class:`~flstore_core.cache.round_view.RoundView`; the Gram pass is
:func:`flstore_core.cache.gram.block_sums`.

A round held by a node under memory pressure gives up its rows first (:meth:`RoundData.drop_rows`:
the matrix, the base and the row-sized mean), keeping its Gram pieces, distances, memoised model
artifacts and (in the node) its answers: a *rowless* round of a few kilobytes where the rows were
hundreds of megabytes. Everything derived from the Gram is answered from it unchanged; reading
the rows raises :class:`RowsEvicted`, on which the node reads them again and re-attaches them
(:meth:`RoundData.attach_rows`), so an answer is the same bits whichever form answered it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, overload

import numpy as np
import numpy.typing as npt

from flstore_core.cache.blas import one_blas_thread
from flstore_core.cache.gram import BLOCK_ELEMENTS, GramParts, block_sums
from flstore_core.cache.round_view import (
    F32,
    F64,
    ArtifactStats,
    JobContext,
    RoundView,
    Validation,
    VectorExpr,
)
from flstore_core.data.blocks import footprint
from flstore_core.data.codec import TensorSpec
from flstore_core.data.columns import Runs
from flstore_core.data.rows import unflatten
from flstore_core.errors import InvalidParamsError

# moved to round_view and gram; importable from here as before
__all__ = [
    "BLOCK_ELEMENTS",
    "COLUMNWISE",
    "F32",
    "F64",
    "ArtifactStats",
    "GramParts",
    "JobContext",
    "RoundData",
    "RowsEvicted",
    "Validation",
    "register_columnwise",
]

# coordinate-wise functions of a round's rows, by name (:meth:`RoundData.columnwise`); the
# workloads that need one register it, so that a node evaluating a block finds it
COLUMNWISE: dict[str, Callable[..., F32]] = {}


def register_columnwise(name: str, function: Callable[..., F32]) -> None:
    """Register ``function(data, **args)``, a coordinate-wise function of a round's rows."""
    COLUMNWISE[name] = function


# what a rowless round keeps besides its Gram-derived arrays, counted in its ``nbytes``: the
# client ids, example counts, metrics, digests and column split (~1 KB for 10 clients), the
# small memoised values and the node's kept answers (a few KB each; at most 64 a round)
ROWLESS_BASE = 16 * 1024
# the artifacts of a round that are vectors as long as a row: given up with the rows
ROW_SIZED = ("mean",)


class RowsEvicted(Exception):
    """A workload read the rows of a round that gave them up under memory pressure: the node
    reads them again and re-runs it (:meth:`RoundData.attach_rows`). Not an error a caller
    sees."""


def rowless_footprint(n_clients: int, buffers: bool = True) -> int:
    """The ``nbytes`` of a prefetched round of ``n_clients`` once its rows are dropped: the
    parameters' Gram pieces (:class:`GramParts`: ``n² + 2n + 3`` float64), the buffers' when
    the model has BatchNorm statistics (``buffers``), and the distances (``n²``) that
    :meth:`RoundData.warm` computes, plus :data:`ROWLESS_BASE`."""
    n = n_clients
    parts = 8 * (n * n + 2 * n + 3)
    return ROWLESS_BASE + parts * (2 if buffers else 1) + 8 * n * n


def array_bytes(value: Any) -> int:
    """The bytes of the float arrays (and floats) a Gram-derived artifact holds."""
    if isinstance(value, GramParts):
        return sum(array_bytes(getattr(value, f)) for f in GramParts.__dataclass_fields__)
    if isinstance(value, np.ndarray):
        return int(value.nbytes)
    return 8 if isinstance(value, float) else 0


def approx_bytes(value: Any) -> int:
    """A rough size of a memoised value (arrays, numbers, strings, their containers)."""
    if isinstance(value, np.ndarray):
        return int(value.nbytes)
    if isinstance(value, dict):
        return sum(approx_bytes(k) + approx_bytes(v) for k, v in value.items())
    if isinstance(value, list | tuple | set):
        return sum(approx_bytes(v) for v in value)
    if isinstance(value, str | bytes):
        return len(value)
    return 8


def _zeros(data: RoundData) -> F32:
    return np.zeros(data.matrix.shape[1], np.float32)


class RoundData(RoundView):
    """One round's updates as a ``(n_clients, n_params)`` float32 matrix, with lazy artifacts.

    ``matrix`` holds deltas when ``base`` is given (``is_delta``), else the stored tensors.
    """

    def __init__(
        self,
        job: str,
        round_: int,
        clients: list[str],
        matrix: F32,
        specs: tuple[TensorSpec, ...],
        num_examples: npt.NDArray[np.int64],
        metrics: list[dict[str, Any]],
        base: F32 | None = None,
        stats: ArtifactStats | None = None,
        sha256: dict[str, str] | None = None,
        context: JobContext | None = None,
        deltas: bool = False,
    ) -> None:
        super().__init__(job, round_, clients, specs, num_examples, metrics, stats, sha256, context)
        self._base = base
        self._delta = base is not None
        if base is not None and not deltas:  # deltas: made so already (a node's staged rows)
            matrix -= base  # in place: the node keeps one matrix, not two
        self._rows: F32 | None = matrix
        self._params = int(matrix.shape[1])
        # model results this node already wrote to S3 for this round (their keys are
        # deterministic in params and content), so a repeated request skips the PUT
        self.results_written: set[str] = set()
        # reads of the rows (``matrix``): a request whose count moved read them (the node tells
        # its eviction policy which requests needed rows, not only the Gram or artifacts)
        self.rows_reads = 0

    @property
    def matrix(self) -> F32:
        """The rows (deltas when ``is_delta``); :class:`RowsEvicted` when they were dropped."""
        self.rows_reads += 1
        rows = self._rows
        if rows is None:
            raise RowsEvicted(f"the rows of {self.job}/{self.round} were dropped")
        return rows

    @matrix.setter
    def matrix(self, rows: F32) -> None:
        self._rows = rows
        self._params = int(rows.shape[1])

    @property
    def has_rows(self) -> bool:
        """Whether the rows are held (``False``: a rowless round, Gram and artifacts only)."""
        return self._rows is not None

    @property
    def base(self) -> F32 | None:
        """The round's base model, when stored (the rows are then deltas from it);
        :class:`RowsEvicted` when it went with the rows."""
        if self._delta and self._base is None:
            raise RowsEvicted(f"the base of {self.job}/{self.round} was dropped with its rows")
        return self._base

    @property
    def is_delta(self) -> bool:
        return self._delta

    @property
    def nbytes(self) -> int:
        # the rows, and what a node keeps beside them per column whether or not it exists yet
        # (the base, the mean artifact, a model result being written): the same figure the
        # planner cuts rounds into blocks by, so a block it sends a node fits; rowless, the
        # Gram-derived arrays and ROWLESS_BASE
        whole = footprint(self.n, self._params)
        # never more than whole: a round of a few columns is smaller than ROWLESS_BASE
        return whole if self._rows is not None else min(whole, ROWLESS_BASE + self.gram_bytes())

    @property
    def rows_nbytes(self) -> int:
        """What dropping the rows frees (0 when they are dropped already)."""
        if self._rows is None:
            return 0
        whole = footprint(self.n, self._params)
        return whole - min(whole, ROWLESS_BASE + self.gram_bytes())

    def gram_bytes(self) -> int:
        """Bytes of the Gram pieces and distances held (the arrays a rowless round keeps)."""
        with self._lock:
            return sum(array_bytes(v) for k, v in self._artifacts.items() if k not in ROW_SIZED)

    def memo_bytes(self) -> int:
        """Bytes of the memoised model artifacts (accuracies, dots, votes), roughly."""
        with self._lock:
            return sum(approx_bytes(v) for v in self._memo.values())

    def drop_rows(self) -> None:
        """Give up the rows, the base and the row-sized artifacts, keeping the Gram pieces,
        distances and memoised values (the cache does this to a round it must shrink; a request
        running on the rows holds its own reference to them until it ends)."""
        self._rows = None
        self._base = None
        for name in ROW_SIZED:
            self._artifacts.pop(name, None)

    def attach_rows(self, fresh: RoundData) -> None:
        """Take the rows (and base) of ``fresh``, the same round read again; its content must
        be this round's (the same clients and digests), else ``ValueError``."""
        if fresh.clients != self.clients or fresh.sha256 != self.sha256:
            raise ValueError(f"{self.job}/{self.round} was rewritten since it was read")
        self._base = fresh._base
        self._rows = fresh.matrix

    def warm(self) -> None:
        """Compute the shared artifacts now (prefetch does, so the first request is cheap), the
        buffers' Gram pieces too (a pass over the BatchNorm statistics only): a round that
        later gives up its rows answers the selection workloads with or without buffers."""
        self.gram(True)
        self.distances()
        self.gram_parts(buffers=True)

    def gram_parts(self, buffers: bool = False) -> GramParts | None:
        """The Gram pieces of the parameters' columns, or of the buffers' (``None`` if the
        rows have no buffer columns); each computed once. A sharded round sums these over its
        column blocks (:mod:`flstore_core.cache.sharded`)."""
        cols = self.columns
        if not buffers:
            return self._artifact("gram", lambda: self._one_thread_sums(cols.parameter_runs))
        if not cols.buffer_runs:
            return None
        return self._artifact("gram+buffers", lambda: self._one_thread_sums(cols.buffer_runs))

    def _one_thread_sums(self, runs: Runs) -> GramParts:
        """:func:`~flstore_core.cache.gram.block_sums` on one BLAS thread: the same bits on any
        host (:mod:`flstore_core.cache.blas`)."""
        with one_blas_thread():
            return block_sums(self.matrix, self._base, runs)

    def dots_with(self, vector: F32, include_buffers: bool = False) -> F64:
        """``x_i · v`` for every row over the column subset (float32 BLAS per run, float64
        sums)."""
        out = np.zeros(self.n)
        with one_blas_thread():  # the same bits on any host (flstore_core.cache.blas)
            for a, b in self.columns.runs(include_buffers):
                for start in range(a, b, BLOCK_ELEMENTS):
                    stop = min(start + BLOCK_ELEMENTS, b)
                    out += self.matrix[:, start:stop] @ vector[start:stop]
        return out

    def columnwise(self, name: str, **args: Any) -> F32:
        """A coordinate-wise function of the rows registered under ``name`` (e.g.
        ``trimmed_mean``): column ``k`` of the result depends on column ``k`` of the rows (and
        of the base) only, so a sharded round computes it block by block."""
        function = COLUMNWISE.get(name)
        if function is None:
            raise InvalidParamsError(f"no coordinate-wise function {name!r}")
        return function(self, **args)

    def mean_vector(self) -> F32:
        """Unweighted mean of the rows as stored (deltas when ``is_delta``)."""
        return self._artifact("mean", lambda: self.matrix.mean(axis=0, dtype=np.float32))

    def weighted_mean(self, weights: F64) -> F32:
        """``Σ w_i x_i / Σ w_i`` of the rows as stored (one GEMV)."""
        w = np.asarray(weights, dtype=np.float64)
        total = float(w.sum())
        if total <= 0:
            raise ValueError("weights must sum to a positive number")
        with one_blas_thread():  # the same bits on any host (flstore_core.cache.blas)
            out: F32 = (w / total).astype(np.float32) @ self.matrix
        return out

    def client_weights(self, row: int) -> F32:
        """Client ``row``'s model weights as a vector (its stored tensors)."""
        row_vector: F32 = self.matrix[row]
        return self.to_weights(row_vector)

    @overload
    def to_weights(self, vector: F32) -> F32: ...

    @overload
    def to_weights(self, vector: VectorExpr) -> VectorExpr: ...

    def to_weights(self, vector: F32 | VectorExpr) -> F32 | VectorExpr:
        """A vector in stored space (delta or not) as model weights (adds the base back); an
        expression stays one (its base is added where it is evaluated)."""
        if isinstance(vector, VectorExpr):
            return VectorExpr({"op": "to_weights", "of": vector.spec})
        base = self.base  # RowsEvicted on a rowless round of deltas: never the deltas unshifted
        return vector + base if base is not None else vector

    def tensors_of(self, vector: npt.NDArray[Any]) -> dict[str, npt.NDArray[Any]]:
        """Unflatten a weights vector into named tensors with their source dtypes."""
        return unflatten(vector, self.specs)


register_columnwise("zeros", _zeros)
