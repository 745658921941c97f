"""A round as a cache node holds it: the update matrix plus artifacts shared by workloads.

When the round's base model (the global model its clients started from) is stored, the matrix
holds *deltas* ``w_i - base`` in place and the base is kept beside it, so direction-based
workloads read deltas for free and weight-based ones add the base back (ARCHITECTURE §2).
Artifacts — squared norms, the Gram matrix ``D·Dᵀ``, pairwise distances, the mean — are
computed at most once per round per node and reused by every workload that needs them; the
counters say how often each was computed and reused.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

from flstore_core.cache.blas import one_blas_thread
from flstore_core.data.blocks import footprint
from flstore_core.data.codec import TensorSpec
from flstore_core.data.columns import ColumnSplit, Runs, job_columns
from flstore_core.data.manifest import JobSpec
from flstore_core.data.rows import unflatten
from flstore_core.errors import InvalidParamsError, NotFoundError

T = TypeVar("T")
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


@dataclass
class ArtifactStats:
    """How often each artifact was computed and reused on this node."""

    computed: dict[str, int] = field(default_factory=dict)
    reused: dict[str, int] = field(default_factory=dict)
    # memoised values received from another replica of the round instead of computed here
    shared: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, dict[str, int]]:
        return {
            "computed": dict(self.computed),
            "reused": dict(self.reused),
            "shared": dict(self.shared),
        }


Validation = tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]


class JobContext:
    """What model-based workloads need beyond a round: the job's spec and validation set.

    The validation set is loaded on first use and kept; a workload that needs a model or a
    validation set the job does not have gets a 400 saying how to declare it.
    """

    def __init__(self, spec: JobSpec, load_validation: Callable[[], Validation]) -> None:
        self.spec = spec
        self._load_validation = load_validation
        self._validation: Validation | None = None
        self._lock = threading.Lock()

    @property
    def job(self) -> str:
        return self.spec.job

    def model_name(self) -> str:
        """The job's model architecture; 400 if the job declares none."""
        if not self.spec.model:
            raise InvalidParamsError(
                f"job {self.job!r} declares no model, which this workload needs: declare it "
                f"with `flstore job create {self.job} --model digits_cnn` (or resnet18_cifar)"
            )
        return self.spec.model

    def validation(self) -> Validation:
        """The job's validation set ``(x, y)``; 400 if the job has none."""
        with self._lock:
            if self._validation is None:
                try:
                    self._validation = self._load_validation()
                except NotFoundError:
                    raise InvalidParamsError(
                        f"job {self.job!r} has no validation set, which this workload needs: "
                        f"upload one with `flstore job create {self.job} --model NAME "
                        "--validation FILE.safetensors` (tensors x and y)"
                    ) from None
            return self._validation

    @property
    def nbytes(self) -> int:
        v = self._validation
        return 0 if v is None else int(v[0].nbytes + v[1].nbytes)


# coordinate-wise functions of a round's rows, by name (:meth:`RoundData.columnwise`); the
# workloads that need one register it, so that a node evaluating a block finds it
COLUMNWISE: dict[str, Callable[..., F32]] = {}


def register_columnwise(name: str, function: Callable[..., F32]) -> None:
    """Register ``function(data, **args)``, a coordinate-wise function of a round's rows."""
    COLUMNWISE[name] = function


def _zeros(data: RoundData) -> F32:
    return np.zeros(data.matrix.shape[1], np.float32)


class RoundData:
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
    ) -> None:
        self.job = job
        self.round = round_
        self.clients = clients
        self.specs = specs
        self.num_examples = num_examples
        self.metrics = metrics
        self.base = base
        self.sha256 = sha256 or {}
        self._context = context
        if base is not None:
            matrix -= base  # in place: the node keeps one matrix, not two
        self.matrix = matrix
        self.stats = stats or ArtifactStats()
        self._artifacts: dict[str, Any] = {}
        self._memo: dict[tuple[str, str], Any] = {}  # small values by (name, key): memo()
        self._columns: ColumnSplit | None = None
        # model results this node already wrote to S3 for this round (their keys are
        # deterministic in params and content), so a repeated request skips the PUT
        self.results_written: set[str] = set()
        self._lock = threading.RLock()  # artifacts build on artifacts (distances on gram)

    @property
    def context(self) -> JobContext:
        """The job's spec and validation set (model-based workloads)."""
        if self._context is None:
            raise InvalidParamsError(f"no job context for job {self.job!r}")
        return self._context

    def client_weights(self, row: int) -> F32:
        """Client ``row``'s model weights as a vector (its stored tensors)."""
        out: F32 = self.to_weights(self.matrix[row])
        return out

    @property
    def is_delta(self) -> bool:
        return self.base is not None

    @property
    def n(self) -> int:
        return len(self.clients)

    @property
    def nbytes(self) -> int:
        # the rows, and what a node keeps beside them per column whether or not it exists yet
        # (the base, the mean artifact, a model result being written): the same figure the
        # planner cuts rounds into blocks by, so a block it sends a node fits
        return footprint(self.n, int(self.matrix.shape[1]))

    def _artifact(self, name: str, compute: Callable[[], T]) -> T:
        with self._lock:
            if name in self._artifacts:
                self.stats.reused[name] = self.stats.reused.get(name, 0) + 1
                return self._artifacts[name]  # type: ignore[no-any-return]
            value = compute()
            self._artifacts[name] = value
            self.stats.computed[name] = self.stats.computed.get(name, 0) + 1
            return value

    def memo(self, name: str, key: str, compute: Callable[[], T]) -> T:
        """A small value derived from this round and ``key``, computed at most once per round
        on this node and reused by every workload and request after (issue 13: model
        evaluations, shared like the Gram).

        The round's content (clients, rows, base) is this object's: a rewritten round is a new
        :class:`RoundData`. ``key`` must name everything else the value depends on (a model
        evaluation: the weights' content hash, the architecture, the validation set's digest).
        Counted in ``stats`` under ``name``; values are meant to be small (scores, dots), so
        they are not part of ``nbytes``.
        """
        with self._lock:
            if (name, key) in self._memo:
                self.stats.reused[name] = self.stats.reused.get(name, 0) + 1
                return self._memo[(name, key)]  # type: ignore[no-any-return]
            value = compute()
            self._memo[(name, key)] = value
            self.stats.computed[name] = self.stats.computed.get(name, 0) + 1
            return value

    def memo_items(self, names: Collection[str]) -> list[tuple[str, str, Any]]:
        """The memoised values of the kinds ``names``: ``(name, key, value)``, in the order they
        were computed (a round's replicas share them: :mod:`flstore_core.workloads.artifacts`)."""
        with self._lock:
            return [(n, k, v) for (n, k), v in self._memo.items() if n in names]

    def memo_put(self, name: str, key: str, value: Any) -> bool:
        """Keep ``value`` as the memo ``name``/``key`` computed elsewhere (another replica of
        this round, by the same code on the same content); ``False`` if one is held already
        (the value held is kept). Counted in ``stats.shared``."""
        with self._lock:
            if (name, key) in self._memo:
                return False
            self._memo[(name, key)] = value
            self.stats.shared[name] = self.stats.shared.get(name, 0) + 1
            return True

    def warm(self) -> None:
        """Compute the shared artifacts now (prefetch does, so the first request is cheap)."""
        self.gram(True)
        self.distances()

    # ------------------------------------------------------------------ artifacts

    @property
    def columns(self) -> ColumnSplit:
        """Which columns direction- and distance-based workloads read
        (:mod:`flstore_core.data.columns`: the job's recorded parameter names, else the
        name/dtype rule)."""
        if self._columns is None:
            spec = self._context.spec if self._context is not None else None
            self._columns = job_columns(self.specs, spec)
        return self._columns

    def _block_sums(self, runs: Runs) -> GramParts:
        """One blocked pass over the columns ``runs``: the Gram pieces (see :class:`GramParts`)
        that give the Gram of deltas or of weights and the pairwise distances.

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
        n = self.n
        base = self.base
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
                x = self.matrix[:, start:stop]
                bb = None if base is None else base[start:stop]
                part = None
                if not centre_first:
                    part = self._raw_block(x, bb)
                    if _offset_dominated(part.centred):
                        r = _central_row(part.centred)
                        part = None
                    if centre_first is None:
                        centre_first = part is None
                if part is None:
                    part = self._centred_block(x, bb, buf[:, : stop - start], r)
                total = total + part
        centred = (total.centred + total.centred.T) / 2.0  # exactly symmetric whatever BLAS did
        return GramParts(centred, total.z_c, total.c_c, total.z_b, total.c_b, total.b_b)

    @staticmethod
    def _raw_block(x: F32, base: F32 | None) -> GramParts:
        """Pieces of one block with ``c = 0``: ``x·xᵀ`` (and ``x·b``) straight from the matrix."""
        n = x.shape[0]
        g = (x @ x.T).astype(np.float64)
        if base is None:
            return GramParts(g, np.zeros(n), 0.0, np.zeros(n), 0.0, 0.0)
        x_b = (x @ base).astype(np.float64)
        return GramParts(g, np.zeros(n), 0.0, x_b, 0.0, float(np.dot(base, base)))

    @staticmethod
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
        """:meth:`_block_sums` on one BLAS thread: the same bits on any host
        (:mod:`flstore_core.cache.blas`)."""
        with one_blas_thread():
            return self._block_sums(runs)

    def _parts(self, include_buffers: bool) -> GramParts:
        """The Gram pieces of the column subset: parameters, plus buffers when asked (each
        subset's pass is computed once; pieces add over disjoint columns)."""
        parts = self.gram_parts()
        assert parts is not None
        extra = self.gram_parts(buffers=True) if include_buffers else None
        return parts if extra is None else parts + extra

    def centred_gram(self, include_buffers: bool = False) -> F64:
        """``Z·Zᵀ`` of the rows centred on a common centre (translation-invariant workloads:
        k-means, distances); the same for deltas and stored tensors."""
        return self._parts(include_buffers).centred

    def gram(self, use_delta: bool = True, include_buffers: bool = False) -> F64:
        """Gram matrix of deltas (``use_delta`` and a base exists) or of the stored tensors,
        over the parameters (and buffers with ``include_buffers``); cosines need this one."""
        return self._parts(include_buffers).gram(weights=not use_delta and self.is_delta)

    def sq_norms(self, use_delta: bool = True, include_buffers: bool = False) -> F64:
        """Squared L2 norms of the rows."""
        return np.diag(self.gram(use_delta, include_buffers)).copy()

    def distances(self, include_buffers: bool = False) -> F64:
        """Squared pairwise L2 distances (the same for deltas and stored tensors)."""

        def compute() -> F64:
            g = self.centred_gram(include_buffers)
            d = np.diag(g)
            # ||x - y||^2 = ||z_x||^2 + ||z_y||^2 - 2 z_x·z_y  (z = x − c: no common offset)
            out = np.maximum(d[:, None] + d[None, :] - 2.0 * g, 0.0)
            np.fill_diagonal(out, 0.0)
            return out

        name = "distances+buffers" if include_buffers and self.columns.buffer_runs else "distances"
        return self._artifact(name, compute)

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

    def sq_norm_of(self, vector: F32, include_buffers: bool = False) -> float:
        """``‖v‖²`` over the column subset, in float64.

        Summed by numpy's own loop (``einsum``), not BLAS: ``ddot`` answered other bits on
        different threads of one process even within :func:`one_blas_thread` (fltrust's
        ``‖g_0‖²`` differed between a node's prefetch and a request)."""
        total = 0.0
        for a, b in self.columns.runs(include_buffers):
            part = vector[a:b].astype(np.float64)
            total += float(np.einsum("i,i->", part, part))
        return total

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

    def to_weights(self, vector: F32) -> F32:
        """A vector in stored space (delta or not) as model weights (adds the base back)."""
        return vector + self.base if self.base is not None else vector

    def tensors_of(self, vector: npt.NDArray[Any]) -> dict[str, npt.NDArray[Any]]:
        """Unflatten a weights vector into named tensors with their source dtypes."""
        return unflatten(vector, self.specs)


register_columnwise("zeros", _zeros)
