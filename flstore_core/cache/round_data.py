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
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

from flstore_core.data.codec import TensorSpec
from flstore_core.data.manifest import JobSpec
from flstore_core.data.rows import unflatten
from flstore_core.errors import InvalidParamsError, NotFoundError

T = TypeVar("T")
F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]


@dataclass
class ArtifactStats:
    """How often each artifact was computed and reused on this node."""

    computed: dict[str, int] = field(default_factory=dict)
    reused: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, dict[str, int]]:
        return {"computed": dict(self.computed), "reused": dict(self.reused)}


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
        extra = 0 if self.base is None else int(self.base.nbytes)
        # the mean vector is an artifact worth as much as one row; account for it up front
        return int(self.matrix.nbytes) + extra + int(self.matrix.shape[1]) * 4

    def _artifact(self, name: str, compute: Callable[[], T]) -> T:
        with self._lock:
            if name in self._artifacts:
                self.stats.reused[name] = self.stats.reused.get(name, 0) + 1
                return self._artifacts[name]  # type: ignore[no-any-return]
            value = compute()
            self._artifacts[name] = value
            self.stats.computed[name] = self.stats.computed.get(name, 0) + 1
            return value

    def warm(self) -> None:
        """Compute the shared artifacts now (prefetch does, so the first request is cheap)."""
        self.gram(True)
        if self.is_delta:
            self.gram(False)

    # ------------------------------------------------------------------ artifacts

    def _delta_gram(self) -> F64:
        # one float32 GEMM on the (n, d) matrix; float64 afterwards for the small n x n algebra
        return self._artifact(
            "gram", lambda: (self.matrix @ self.matrix.T).astype(np.float64, copy=False)
        )

    def _base_dots(self) -> tuple[F64, float]:
        def compute() -> tuple[F64, float]:
            assert self.base is not None
            return (self.matrix @ self.base).astype(np.float64), float(np.dot(self.base, self.base))

        return self._artifact("base_dots", compute)

    def gram(self, use_delta: bool = True) -> F64:
        """Gram matrix of deltas (``use_delta`` and a base exists) or of the stored tensors."""
        g = self._delta_gram()
        if use_delta or not self.is_delta:
            return g
        # (d_i + b)·(d_j + b) = d_i·d_j + d_i·b + b·d_j + b·b, each term computed accurately
        u, bb = self._base_dots()
        return g + u[:, None] + u[None, :] + bb

    def sq_norms(self, use_delta: bool = True) -> F64:
        """Squared L2 norms of the rows."""
        return np.diag(self.gram(use_delta)).copy()

    def distances(self) -> F64:
        """Squared pairwise L2 distances (the same for deltas and stored tensors)."""

        def compute() -> F64:
            g = self._delta_gram()
            d = np.diag(g)
            # ||x - y||^2 = ||x||^2 + ||y||^2 - 2 x·y
            out = np.maximum(d[:, None] + d[None, :] - 2.0 * g, 0.0)
            np.fill_diagonal(out, 0.0)
            return out

        return self._artifact("distances", compute)

    def mean_vector(self) -> F32:
        """Unweighted mean of the rows as stored (deltas when ``is_delta``)."""
        return self._artifact("mean", lambda: self.matrix.mean(axis=0, dtype=np.float32))

    def weighted_mean(self, weights: F64) -> F32:
        """``Σ w_i x_i / Σ w_i`` of the rows as stored (one GEMV)."""
        w = np.asarray(weights, dtype=np.float64)
        total = float(w.sum())
        if total <= 0:
            raise ValueError("weights must sum to a positive number")
        out: F32 = (w / total).astype(np.float32) @ self.matrix
        return out

    def to_weights(self, vector: F32) -> F32:
        """A vector in stored space (delta or not) as model weights (adds the base back)."""
        return vector + self.base if self.base is not None else vector

    def tensors_of(self, vector: npt.NDArray[Any]) -> dict[str, npt.NDArray[Any]]:
        """Unflatten a weights vector into named tensors with their source dtypes."""
        return unflatten(vector, self.specs)
