"""A round read one client at a time: how per-client model workloads run on a sharded round.

Reference: ARCHITECTURE §3 (workload affinity). When the planner cuts a round
into column blocks (:mod:`flstore_core.cache.sharded`) no function holds it, yet accuracy_select,
contribution_loo/shapley, feddebug, personalize and fltrust with a trained ``g_0`` evaluate
*whole client models*: their unit is a client, not a column block. They run on a
:class:`StreamedRound` — a :class:`~flstore_core.cache.round_view.RoundView` for a node that does
**not** hold the round:

* **Rows come from S3, one client at a time.** ``client_weights(i)`` streams client ``i``'s
  update (:meth:`ObjectStore.read_round_block` over all columns, verified against the
  manifest's checksum) into a row; the base model is read once (``read_base_block``). The rows
  read are kept while they fit ``capacity`` bytes (the node's free cache budget) and never
  evicted within a request: a workload that passes over every client again and again
  (contribution_loo's n + 1 aggregates, Shapley's subsets) re-reads only the rows past the
  capacity, where an LRU would re-read every row on every pass of a cyclic scan.
* **Aggregates stream.** ``weighted_mean``, ``mean_vector`` and ``dots_with`` are sums over the
  rows, accumulated in float64 one row at a time and rounded to float32 once: within 1e-7
  relative of the float32 GEMV a whole round takes (the same float32 deltas ``w_i − base``).
* **The Gram matrix is handed in.** The router has the round's Gram pieces from the block
  holders (``ShardedRound.gram_parts``) and sends them with the request, so similarity scores
  (personalize's cosine peers, fltrust's ``‖g_i‖``) are the sharded round's, unchanged.
* **Coordinate-wise models stay on the blocks.** ``columnwise`` (fltrust's aggregate) needs
  every row of a column at once; it returns the same :class:`~flstore_core.cache.sharded.
  VectorExpr` a sharded round does, and the router has the block holders write that model
  block by block. A model that is a mean of rows (personalize) is a real vector here — it is
  evaluated on the validation set — and the node writes it whole (model-sized: 1/n of the
  round, within the node's working memory).

Memory on the node: the validation set, torch, the base, one float64 accumulator (two rows'
worth), the row being decoded, a model result being written, and the rows kept under
``capacity``: :func:`working_bytes` is what the router checks a node's budget leaves room for.
There is no ``matrix``: a workload reading the whole matrix cannot run here.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import Any, overload

import numpy as np

from flstore_core.cache.gram import BLOCK_ELEMENTS, GramParts
from flstore_core.cache.round_view import (
    F32,
    F64,
    ArtifactStats,
    JobContext,
    RoundView,
    VectorExpr,
)
from flstore_core.data.blocks import ROW_BYTES
from flstore_core.data.manifest import RoundManifest
from flstore_core.errors import UnavailableError
from flstore_core.storage.object_store import ObjectStore

# row-sized vectors a streaming node keeps besides the rows it retains: the base, the row being
# decoded, the float64 accumulator (two), a model result being written (vector, serialized,
# compressed: three)
WORKING_ROWS = 7


def working_bytes(n_params: int) -> int:
    """Bytes a node needs to run a per-client workload on a streamed round of ``n_params``."""
    return WORKING_ROWS * ROW_BYTES * n_params


class StreamedRound(RoundView):
    """A round whose rows are read from S3 on demand (module docstring).

    Parameters
    ----------
    store : ObjectStore
        Where the round's updates and base model are.
    manifest : RoundManifest
        The round's committed manifest (clients, tensors, checksums).
    parts, buffer_parts : GramParts, GramParts or None
        The round's Gram pieces over the parameters' and the buffers' columns (the sum over
        its blocks).
    is_delta : bool
        Whether the round has a stored base (the blocks' rows are deltas).
    capacity : int
        Bytes of rows kept once read (0: every row is streamed each time it is used).
    """

    def __init__(
        self,
        store: ObjectStore,
        manifest: RoundManifest,
        parts: GramParts,
        buffer_parts: GramParts | None,
        is_delta: bool,
        capacity: int,
        context: JobContext | None = None,
        stats: ArtifactStats | None = None,
    ) -> None:
        clients = manifest.clients
        super().__init__(
            manifest.job,
            manifest.round,
            clients,
            manifest.tensors,
            np.array([manifest.updates[c].num_examples for c in clients], dtype=np.int64),
            [manifest.updates[c].metrics for c in clients],
            stats=stats,
            sha256={c: manifest.updates[c].sha256 for c in clients},
            context=context,
        )
        self.store = store
        self.manifest = manifest
        self.n_params = manifest.n_params
        self._delta = is_delta
        self._base: F32 | None = None
        self._base_read = False
        self._artifacts["gram"] = parts
        if buffer_parts is not None:
            self._artifacts["gram+buffers"] = buffer_parts
        self.capacity = max(0, capacity)
        self._rows: dict[int, F32] = {}
        self._row_lock = threading.Lock()
        self.rows_read = 0  # updates streamed from S3 (a retained row is read once)

    # the rows are not here ---------------------------------------------------------------

    @property
    def nbytes(self) -> int:
        return working_bytes(self.n_params) + sum(r.nbytes for r in self._rows.values())

    @property
    def is_delta(self) -> bool:
        return self._delta

    @property
    def base(self) -> F32 | None:
        """The round's base model, read once (``None`` when the round has none)."""
        if not self._delta:
            return None
        with self._row_lock:
            if not self._base_read:
                self._base = self.store.read_base_block(
                    self.job, self.round, self.specs, (0, self.n_params)
                )
                self._base_read = True
                if self._base is None:
                    raise UnavailableError(
                        f"the blocks of round {self.round} of job {self.job!r} hold deltas but "
                        "its base model cannot be read"
                    )
        return self._base

    def gram_parts(self, buffers: bool = False) -> GramParts | None:
        return self._artifact("gram+buffers" if buffers else "gram", lambda: None)

    def row(self, i: int) -> F32:
        """Client ``i``'s row as a whole round holds it: ``w_i − base`` in float32 (the same
        subtraction :class:`~flstore_core.cache.round_data.RoundData` does in place), or
        ``w_i`` without a base."""
        kept = self._rows.get(i)
        if kept is not None:
            return kept
        rm = self.store.read_round_block(
            self.job,
            self.round,
            (0, self.n_params),
            manifest=self.manifest,
            clients=[self.clients[i]],
        )
        row: F32 = rm.matrix[0]
        base = self.base
        if base is not None:
            row -= base
        with self._row_lock:
            self.rows_read += 1
            held = sum(r.nbytes for r in self._rows.values())
            if held + row.nbytes <= self.capacity:
                self._rows[i] = row
        return row

    def rows(self, which: Iterable[int]) -> Iterable[tuple[int, F32]]:
        """``(i, row i)`` for each ``i``, retained rows first (they cost no read)."""
        order = sorted(which, key=lambda i: (i not in self._rows, i))
        for i in order:
            yield i, self.row(i)

    # row-wise methods, streamed ------------------------------------------------------------

    def client_weights(self, row: int) -> F32:
        # (w − base) + base in float32, bit for bit what a whole round gives
        return self.to_weights(self.row(row))

    @overload
    def to_weights(self, vector: F32) -> F32: ...

    @overload
    def to_weights(self, vector: VectorExpr) -> VectorExpr: ...

    def to_weights(self, vector: F32 | VectorExpr) -> F32 | VectorExpr:
        if isinstance(vector, VectorExpr):  # a coordinate-wise model: written on the blocks
            return VectorExpr({"op": "to_weights", "of": vector.spec})
        base = self.base
        return vector + base if base is not None else vector

    def weighted_mean(self, weights: F64) -> F32:
        """``Σ w_i x_i / Σ w_i`` over the rows with ``w_i ≠ 0``, in float64, rounded once."""
        w = np.asarray(weights, dtype=np.float64)
        total = float(w.sum())
        if total <= 0:
            raise ValueError("weights must sum to a positive number")
        # the whole round multiplies by the float32 normalised weights: the same coefficients
        coef = (w / total).astype(np.float32).astype(np.float64)
        acc = np.zeros(self.n_params, np.float64)
        for i, x in self.rows(i for i in range(self.n) if coef[i] != 0.0):
            acc += coef[i] * x  # Σ_i c_i x_i
        return acc.astype(np.float32)

    def mean_vector(self) -> F32:
        """Unweighted mean of the rows (``Σ_i x_i / n`` in float64, rounded once)."""

        def compute() -> F32:
            acc = np.zeros(self.n_params, np.float64)
            for _, x in self.rows(range(self.n)):
                acc += x
            out: F32 = (acc / self.n).astype(np.float32)
            return out

        return self._artifact("mean", compute)

    def dots_with(self, vector: F32, include_buffers: bool = False) -> F64:
        """``x_i · v`` over the column subset, row by row in float64 (chunks of
        ``BLOCK_ELEMENTS``): exact to ~1e-15 where a whole round's float32 GEMV is off by up
        to a few 1e-6 relative on dots with cancellation (fltrust's cosines near 0)."""
        out = np.zeros(self.n)
        runs = self.columns.runs(include_buffers)
        for i, x in self.rows(range(self.n)):
            for a, b in runs:
                for start in range(a, b, BLOCK_ELEMENTS):
                    stop = min(start + BLOCK_ELEMENTS, b)
                    chunk = x[start:stop].astype(np.float64)
                    out[i] += float(chunk @ vector[start:stop].astype(np.float64))
        return out

    def columnwise(self, name: str, **args: Any) -> VectorExpr:
        # every row of a column at once: the block holders evaluate it (module docstring)
        return VectorExpr({"op": "columnwise", "name": name, "args": args})
