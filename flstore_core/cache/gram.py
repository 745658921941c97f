"""The Gram pieces of a round's rows, from one blocked pass over their columns.

Cosines, norms, distances and k-means all read the Gram matrix ``X·Xᵀ`` of a round's rows
(ARCHITECTURE §2). It is summed block by block over the columns, in float64, each block's
product a float32 GEMM; a block whose rows share a large common offset is centred first, so the
distances keep their digits (:func:`block_sums`). The pieces (:class:`GramParts`) add over
disjoint columns, which is what lets a round held in column blocks sum them over its blocks
(:mod:`flstore_core.cache.sharded`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from flstore_core.data.columns import Runs

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]

# Columns per block of the Gram pass: ~1 Mi elements (4 MiB of float32) a block keeps the
# centred copy in cache; never fewer than 4 Ki columns, so BLAS calls stay large.
BLOCK_ELEMENTS = 1 << 20
MIN_BLOCK_COLUMNS = 1 << 12
# a block whose closest pair of rows is nearer than this share of ‖x_i‖² + ‖x_j‖² is centred
# before its GEMM (a raw float32 Gram would lose the distance's digits to cancellation)
OFFSET_RATIO = 0.05


@dataclass(frozen=True)
class GramParts:
    """Pieces from which the Gram matrices of a column subset are rebuilt, all float64.

    With ``z_i = x_i − c`` (rows centred on a common centre ``c``) and ``b`` the base:

    * ``x_i·x_j = Z_ij + z_i·c + z_j·c + c·c``  (Gram of the rows as stored: deltas with a base)
    * ``w_i·w_j = x_i·x_j + x_i·b + x_j·b + b·b`` with ``x_i·b = z_i·b + c·b``  (of weights)

    Each piece is a sum over columns, so pieces of disjoint column sets add up.
    """

    centred: F64
    z_c: F64
    c_c: float
    z_b: F64
    c_b: float
    b_b: float

    def __add__(self, other: GramParts) -> GramParts:
        return GramParts(
            self.centred + other.centred,
            self.z_c + other.z_c,
            self.c_c + other.c_c,
            self.z_b + other.z_b,
            self.c_b + other.c_b,
            self.b_b + other.b_b,
        )

    def gram(self, weights: bool = False) -> F64:
        """The uncentred Gram of the stored rows, or of the weights (rows + base)."""
        g: F64 = self.centred + self.z_c[:, None] + self.z_c[None, :] + self.c_c
        if weights:
            x_b = self.z_b + self.c_b
            g = g + x_b[:, None] + x_b[None, :] + self.b_b
        return g

    def symmetric(self) -> GramParts:
        """These pieces with ``centred`` made exactly symmetric (whatever BLAS did)."""
        centred = (self.centred + self.centred.T) / 2.0
        return GramParts(centred, self.z_c, self.c_c, self.z_b, self.c_b, self.b_b)


def _offset_dominated(gram: F64) -> bool:
    """Whether some pair of rows is so close, relative to their norms, that distances taken
    from this (uncentred) Gram would lose digits: ``d_ij < OFFSET_RATIO · (G_ii + G_jj)``."""
    d = np.diag(gram)
    scale = d[:, None] + d[None, :]
    dist = scale - 2.0 * gram
    off = ~np.eye(len(d), dtype=bool)
    return bool(np.any(dist[off] < OFFSET_RATIO * scale[off]))


def _central_row(gram: F64) -> int:
    """The row nearest the rows' mean by this Gram, the first on a tie:
    ``argmin_r Σ_j d_rj``, since ``Σ_j ‖x_r − x_j‖² = n‖x_r − x̄‖² + Σ_j ‖x_j − x̄‖²``."""
    d = np.diag(gram)
    return int(np.argmin(d * len(d) - 2.0 * gram.sum(axis=1)))  # Σ_j d_rj less Σ_j G_jj


def block_sums(matrix: F32, base: F32 | None, runs: Runs) -> GramParts:
    """One blocked pass over the columns ``runs`` of ``matrix``: the Gram pieces (see
    :class:`GramParts`) that give the Gram of deltas or of weights and the pairwise distances.

    Blocks are summed in float64, and each block's pieces are taken with a centre ``c`` of
    its own (the pieces of any centre add back exactly, so blocks may differ):

    * ``c = 0`` — one float32 GEMM straight on the matrix, no copy — when the block's rows
      are not dominated by a common offset, i.e. every pairwise distance is at least
      :data:`OFFSET_RATIO` of ``‖x_i‖² + ‖x_j‖²`` (cancellation then costs < 1e-5 relative);
    * ``c = x_r``, one of the rows, otherwise (raw weights with no stored base: ‖w‖² ≈ 1e3
      and offsets of 1e-4 vanish in a raw float32 Gram), so the GEMM sees only the clients'
      differences ``x_i − x_r``. The row is the one nearest the rows' mean by the block's
      raw Gram (:func:`_central_row`): as good a centre as the mean when every row is the
      offset plus a small difference (``‖z_i‖² = d_ir`` instead of ``‖x_i − x̄‖²``), better
      when an outlier (a sign-flipped or scaled client) drags the mean away from the
      others, and it costs no mean pass: ``x_i − x_r`` is one subtraction into the buffer.

    The first block decides which to try first for the rest, and its row ``r`` is the
    centre of the blocks that follow it centred: a round of deltas pays one GEMM per block,
    as an uncentred Gram would; a round of raw weights pays the subtraction and the centred
    GEMM, not a wasted raw one.
    """
    n = matrix.shape[0]
    # the centred GEMM runs on the stacked rows [Z with row r replaced by c; b]: z_r = 0, so
    # its (k, k) product holds Z·Zᵀ, Z·c, c·c, Z·b, c·b and b·b at once; k is padded to a
    # multiple of 4 with zero rows, which OpenBLAS runs markedly faster, but for k = 10
    # (measured on 10 x 11.7M float32: 10 rows 71 ms, padded to 12 77 ms, raw GEMM 64 ms)
    k = n + (0 if base is None else 1)
    k += 0 if k == 10 else -k % 4
    step = max(MIN_BLOCK_COLUMNS, BLOCK_ELEMENTS // k)
    width = min(step, max((b - a for a, b in runs), default=0))
    buf = np.zeros((k, width), np.float32)
    total = GramParts(np.zeros((n, n)), np.zeros(n), 0.0, np.zeros(n), 0.0, 0.0)
    centre_first: bool | None = None
    r = 0
    for a, b in runs:
        for start in range(a, b, step):
            stop = min(start + step, b)
            x = matrix[:, start:stop]
            bb = None if base is None else base[start:stop]
            part = None
            if not centre_first:
                part = _raw_block(x, bb)
                if _offset_dominated(part.centred):
                    r = _central_row(part.centred)
                    part = None
                if centre_first is None:
                    centre_first = part is None
            if part is None:
                part = _centred_block(x, bb, buf[:, : stop - start], r)
            total = total + part
    return total.symmetric()


def _raw_block(x: F32, base: F32 | None) -> GramParts:
    """Pieces of one block with ``c = 0``: ``x·xᵀ`` (and ``x·b``) straight from the matrix."""
    n = x.shape[0]
    g = (x @ x.T).astype(np.float64)
    if base is None:
        return GramParts(g, np.zeros(n), 0.0, np.zeros(n), 0.0, 0.0)
    x_b = (x @ base).astype(np.float64)
    return GramParts(g, np.zeros(n), 0.0, x_b, 0.0, float(np.dot(base, base)))


def _centred_block(x: F32, base: F32 | None, rows: F32, r: int) -> GramParts:
    """Pieces of one block centred on its row ``c = x_r``, from one GEMM of the buffer
    ``rows`` holding ``z_i = x_i − c`` for ``i ≠ r``, ``c`` in row ``r`` (``z_r = 0``) and
    ``b`` in row ``n``; rows beyond stay zero."""
    n = x.shape[0]
    np.subtract(x, x[r], out=rows[:n])  # x_i − x_r: exact where the two are within 2×
    rows[r] = x[r]
    if base is not None:
        rows[n] = base
    acc = (rows @ rows.T).astype(np.float64)
    zz = acc[:n, :n].copy()
    z_c = zz[:, r].copy()
    c_c = float(z_c[r])
    zz[r, :] = zz[:, r] = z_c[r] = 0.0  # z_r = 0: row r of the product was c's
    if base is None:
        return GramParts(zz, z_c, c_c, np.zeros(n), 0.0, 0.0)
    z_b = acc[:n, n].copy()
    c_b = float(z_b[r])
    z_b[r] = 0.0
    return GramParts(zz, z_c, c_c, z_b, c_b, float(acc[n, n]))
