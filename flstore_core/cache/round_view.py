"""What every round a workload runs on supports, however it is held: :class:`RoundView`.

A round reaches a workload in one of three forms (ARCHITECTURE §3):

* :class:`~flstore_core.cache.round_data.RoundData` — the whole ``(n, d)`` matrix on one node;
* :class:`~flstore_core.cache.sharded.ShardedRound` — in the router, the round held in column
  blocks by other functions: Gram pieces summed over the blocks, models as expressions;
* :class:`~flstore_core.cache.streamed.StreamedRound` — on a node that does not hold the round,
  rows read from S3 one client at a time.

All three are :class:`RoundView`\\ s: the clients and their example counts, the job context, the
memo and artifact counters, and everything derived from the Gram pieces (cosines, distances,
norms) work the same on each. A model is built with :meth:`~RoundView.weighted_mean`,
:meth:`~RoundView.mean_vector`, :meth:`~RoundView.client_weights`,
:meth:`~RoundView.columnwise` and :meth:`~RoundView.to_weights`, which return a vector where the
rows are at hand and a :class:`VectorExpr` — the call that computes it, replayed by each block
holder — where they are not; a workload that must read the vector itself (to evaluate it)
narrows it with :func:`as_array`. Only a whole round has ``matrix``.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

from flstore_core.cache.gram import GramParts
from flstore_core.data.codec import TensorSpec
from flstore_core.data.columns import ColumnSplit, job_columns
from flstore_core.data.manifest import JobSpec
from flstore_core.errors import InvalidParamsError, NotFoundError, UnavailableError

T = TypeVar("T")
F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
Json = dict[str, Any]


@dataclass(frozen=True)
class VectorExpr:
    """A vector of a round whose rows are not here, not computed: the round call that
    computes it.

    ``spec`` is its JSON form, sent to every block holder
    (:func:`flstore_core.cache.sharded.evaluate`).
    """

    spec: Json


# what a model builder of a round returns: the vector, or the expression that computes it
Vector = F32 | VectorExpr


def as_array(vector: Vector) -> F32:
    """``vector`` as an array, for a workload that reads the model itself (evaluates or trains
    it); a :class:`VectorExpr` — a model of a round held in column blocks — is a 503: only
    the block holders can compute it."""
    if isinstance(vector, VectorExpr):
        raise UnavailableError(
            "this workload reads a model of a round held in column blocks, which only the "
            "blocks' holders can compute"
        )
    return vector


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
    validation set the job does not have gets a 400 saying how to declare it. ``version``
    names the versions of ``job.json`` and of the validation set the context was read at
    (:mod:`flstore_core.cache.spec_versions`; ``""`` for a context read for one request), so
    that an answer kept with a shard is keyed on them.
    """

    def __init__(
        self, spec: JobSpec, load_validation: Callable[[], Validation], version: str = ""
    ) -> None:
        self.spec = spec
        self.version = version
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


class RoundView(ABC):
    """One round's clients, artifacts and model builders, wherever its rows are (module
    docstring).

    Subclasses supply the Gram pieces (:meth:`gram_parts`), whether the rows are deltas, the
    base model, ``x_i · v`` and the model builders; the Gram-derived artifacts, the memo and
    the job context are shared.
    """

    def __init__(
        self,
        job: str,
        round_: int,
        clients: list[str],
        specs: tuple[TensorSpec, ...],
        num_examples: npt.NDArray[np.int64],
        metrics: list[dict[str, Any]],
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
        self.sha256 = sha256 or {}
        self._context = context
        self.stats = stats or ArtifactStats()
        self._artifacts: dict[str, Any] = {}
        self._memo: dict[tuple[str, str], Any] = {}  # small values by (name, key): memo()
        self._columns: ColumnSplit | None = None
        self._lock = threading.RLock()  # artifacts build on artifacts (distances on gram)

    @property
    def context(self) -> JobContext:
        """The job's spec and validation set (model-based workloads)."""
        if self._context is None:
            raise InvalidParamsError(f"no job context for job {self.job!r}")
        return self._context

    @property
    def n(self) -> int:
        return len(self.clients)

    @property
    @abstractmethod
    def is_delta(self) -> bool:
        """Whether the rows are deltas ``w_i − base`` (the round has a stored base)."""

    @property
    @abstractmethod
    def base(self) -> F32 | None:
        """The round's base model (``None`` when it has none)."""

    @property
    @abstractmethod
    def nbytes(self) -> int:
        """Bytes this view holds on the function it lives in."""

    # ------------------------------------------------------------------ memo and artifacts

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
        on this node and reused by every workload and request after (model evaluations,
        shared like the Gram).

        The round's content (clients, rows, base) is this object's: a rewritten round is a new
        round object. ``key`` must name everything else the value depends on (a model
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

    @property
    def columns(self) -> ColumnSplit:
        """Which columns direction- and distance-based workloads read
        (:mod:`flstore_core.data.columns`: the job's recorded parameter names, else the
        name/dtype rule)."""
        if self._columns is None:
            spec = self._context.spec if self._context is not None else None
            self._columns = job_columns(self.specs, spec)
        return self._columns

    # ------------------------------------------------------------------ Gram-derived artifacts

    @abstractmethod
    def gram_parts(self, buffers: bool = False) -> GramParts | None:
        """The Gram pieces of the parameters' columns, or of the buffers' (``None`` if the
        rows have no buffer columns); each computed once."""

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

    # ------------------------------------------------------------------ dots with a vector

    @abstractmethod
    def dots_with(self, vector: F32, include_buffers: bool = False) -> F64:
        """``x_i · v`` for every row over the column subset."""

    def sq_norm_of(self, vector: F32, include_buffers: bool = False) -> float:
        """``‖v‖²`` over the column subset, in float64.

        Summed by numpy's own loop (``einsum``), not BLAS: ``ddot`` answered other bits on
        different threads of one process even within
        :func:`~flstore_core.cache.blas.one_blas_thread` (fltrust's ``‖g_0‖²`` differed between
        a node's prefetch and a request)."""
        total = 0.0
        for a, b in self.columns.runs(include_buffers):
            part = vector[a:b].astype(np.float64)
            total += float(np.einsum("i,i->", part, part))
        return total

    # ------------------------------------------------------------------ model builders

    @abstractmethod
    def mean_vector(self) -> Vector:
        """Unweighted mean of the rows as stored (deltas when ``is_delta``)."""

    @abstractmethod
    def weighted_mean(self, weights: F64) -> Vector:
        """``Σ w_i x_i / Σ w_i`` of the rows as stored."""

    @abstractmethod
    def client_weights(self, row: int) -> Vector:
        """Client ``row``'s model weights (its stored tensors)."""

    @abstractmethod
    def to_weights(self, vector: Vector) -> Vector:
        """A vector in stored space (delta or not) as model weights (adds the base back)."""

    @abstractmethod
    def columnwise(self, name: str, **args: Any) -> Vector:
        """A coordinate-wise function of the rows registered under ``name``
        (:func:`~flstore_core.cache.round_data.register_columnwise`)."""
