"""Model evaluations on the job's validation set, computed once per round per node and shared.

Reference: ARCHITECTURE §3 (per-round model artifacts shared like the Gram). accuracy_select,
personalize and contribution_loo/shapley all score models by their validation accuracy

    U(w) = (1/|V|) Σ_{(x, y) ∈ V} [argmax f(x; w) = y]

which depends on the weights ``w``, the architecture ``f`` and the validation set ``V`` only.
:class:`ValidationScorer` memoises it on the round (:meth:`RoundView.memo`) under

    model_accuracy:  sha256(w) / model name / sha256(V)

so every workload and request that evaluates the same weights reads it from memory: a client's
own model (accuracy_select, personalize by accuracy, a one-client subset of Shapley), the FedAvg
aggregate of the whole round (``U(N)`` of leave-one-out and Shapley, personalize's
``global_accuracy``), an identical request. Hashing 11.2M float32 weights costs ~26 ms against
~1.5 s for evaluating ResNet-18 on 256 images. Two cheaper keys sit in front of it, so that a
repeated request does not even build the weights: ``client_accuracy`` (row index: a streamed
round, :class:`~flstore_core.cache.streamed.StreamedRound`, then reads no row from S3) and, in
:class:`~flstore_core.workloads.contribution_loo.SubsetUtility`, ``subset_accuracy`` (the
aggregate's float32 coefficients). A rewritten round is a new round object with no memo;
the validation set's digest is in every key.

Evaluation itself loads weights into one model instance per scorer — built uninitialised
(:func:`flstore_core.models.blank`), its tensors made views of the weights vector rather than
copies — and runs it under ``torch.inference_mode`` on one torch thread
(:func:`flstore_core.models.predict`; on 2 busy cores ResNet-18 on 16 images took 0.12-0.15 s
on one thread and 0.32-1.47 s on two, the same logits). Batching many client models
into one pass (``torch.func.functional_call`` + ``torch.vmap`` over stacked weights) was
measured slower on CPU (ResNet-18 × 10 on 256 images: 21–28 s against 13–15 s for the loop):
vmapped convolutions become grouped convolutions, and evaluation is compute-bound (~0.56 GFLOP
an image), so no batching saves work; only not repeating it does.
"""

from __future__ import annotations

import hashlib
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from flstore_core import models
from flstore_core.cache.round_view import RoundView, as_array

if TYPE_CHECKING:
    from torch import nn

F32 = npt.NDArray[np.float32]

# validation digests by the identity of the arrays (a job context loads its set once and keeps
# it, read-only): the weak references tell a recycled id from the same arrays
_DIGESTS: dict[tuple[int, int], tuple[weakref.ref[Any], weakref.ref[Any], str]] = {}


def array_digest(*arrays: npt.NDArray[Any]) -> str:
    """sha256 of arrays' dtypes, shapes and bytes (C order), hex; 32 hex digits suffice."""
    h = hashlib.sha256()
    for a in arrays:
        c = np.ascontiguousarray(a)
        h.update(f"{c.dtype.str}{c.shape};".encode())
        h.update(c.data)
    return h.hexdigest()[:32]


def validation_digest(x: npt.NDArray[Any], y: npt.NDArray[Any]) -> str:
    """Digest of a validation set, computed once per loaded set."""
    entry = _DIGESTS.get((id(x), id(y)))
    if entry is not None and entry[0]() is x and entry[1]() is y:
        return entry[2]
    digest = array_digest(x, y)
    for k in [k for k, v in _DIGESTS.items() if v[0]() is None or v[1]() is None]:
        del _DIGESTS[k]  # sets no longer held anywhere
    _DIGESTS[(id(x), id(y))] = (weakref.ref(x), weakref.ref(y), digest)
    return digest


class ValidationScorer:
    """Validation accuracy of weights vectors of a round's model, memoised on the round.

    Building it checks, before any work, that the job declares a model and has a validation
    set (:class:`~flstore_core.errors.InvalidParamsError`, a 400 that says how to add them).

    Parameters
    ----------
    data : RoundView
        The round; its job context gives the architecture and the validation set, its tensor
        specs the layout of the weights vectors.
    """

    def __init__(self, data: RoundView) -> None:
        context = data.context
        self.data = data
        self.model_name = context.model_name()
        self.x, self.y = context.validation()
        self.specs = data.specs
        # what an evaluation depends on besides the weights
        self.key = f"{self.model_name}/{validation_digest(self.x, self.y)}"
        self._model: nn.Module | None = None
        self.evaluations = 0  # accuracy() calls, answered from memory or not
        self.computed = 0  # models this scorer actually ran on the validation set

    @property
    def model(self) -> nn.Module:
        """The scorer's model instance (built on first use: a request answered from memory
        builds none; uninitialised, :func:`flstore_core.models.blank`: every evaluation loads
        all of its tensors first)."""
        if self._model is None:
            self._model = models.blank(self.model_name)
        return self._model

    def load(self, weights: F32) -> nn.Module:
        """The scorer's model holding ``weights`` (its tensors are views of them: the model
        only evaluates)."""
        return models.load_vector(self.model, weights, self.specs, share=True)

    def evaluate(self, weights: F32) -> float:
        """The accuracy of ``weights``, computed now (no memo: for a caller that memoises it
        under a cheaper key than the weights' hash, as personalize does by its coefficients)."""
        self.computed += 1
        return models.accuracy(self.load(weights), self.x, self.y)

    def accuracy(self, weights: F32) -> float:
        """Fraction of the validation set the model with ``weights`` classifies correctly
        (memoised on the round by the weights' content)."""
        self.evaluations += 1
        key = f"{array_digest(weights)}/{self.key}"
        return self.data.memo("model_accuracy", key, lambda: self.evaluate(weights))

    def aggregate_accuracy(
        self, coefficients: npt.NDArray[np.float64], weights: Callable[[], F32]
    ) -> float:
        """Accuracy of the round's aggregate ``Σ c_i w_i / Σ c_i`` (``weights()`` builds it:
        ``data.to_weights(data.weighted_mean(coefficients))``), memoised by its float32
        coefficients under the key contribution's ``U(S)`` uses
        (:class:`~flstore_core.workloads.contribution_loo.SubsetUtility`): a known aggregate
        builds nothing, and a new one is evaluated without hashing its weights."""
        w = np.asarray(coefficients, dtype=np.float64)
        key = f"{array_digest((w / w.sum()).astype(np.float32))}/{self.key}"
        return self.data.memo("subset_accuracy", key, lambda: self.evaluate(weights()))

    def client_accuracy(self, row: int) -> float:
        """Accuracy of client ``row``'s own model (memoised by row: no row read when known)."""
        return self.data.memo(
            "client_accuracy",
            f"{row}/{self.key}",
            lambda: self.accuracy(as_array(self.data.client_weights(row))),
        )

    def client_accuracies(self, rows: list[int] | None = None) -> npt.NDArray[np.float64]:
        """Accuracy of the clients' own models, ``rows`` (default every client) in order."""
        which = range(self.data.n) if rows is None else rows
        return np.array([self.client_accuracy(i) for i in which], dtype=np.float64)
