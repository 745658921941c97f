"""A round served in column blocks: what the router computes from its blocks' partial results.

When the planner (:mod:`flstore_core.routing.planner`) cuts a round into column blocks, no
function holds the round. Its round-class workloads still run unchanged, on a
:class:`ShardedRound` in the router — a :class:`~flstore_core.cache.round_view.RoundView` whose
data lives on the block holders:

* **Gram pieces add over columns** (:class:`GramParts`): each block holder computes the pieces
  of its columns (the same blocked pass a whole round takes), and the sum over blocks, in block
  order, is the round's. Every similarity workload — cosine_select, malicious_cosine, krum and
  multi_krum's selection, kmeans, cfl_split, fltrust's trust against a round entry — reads only
  these, so it answers from ``n × n`` numbers per block.
* **Models are expressions over rows, evaluated column by column.** A workload builds its model
  with :meth:`RoundData.weighted_mean`, :meth:`~RoundData.mean_vector`,
  :meth:`~RoundData.client_weights`, :meth:`~RoundData.columnwise` (trimmed mean, FLTrust's
  aggregate) and :meth:`~RoundData.to_weights`; on a sharded round these return a
  :class:`VectorExpr` instead of a vector, and each block holder evaluates the expression on its
  block with the same methods (:func:`evaluate`): column ``k`` of every such model depends on
  column ``k`` of the rows only, so the blocks of the model are the model of the blocks.

What a workload cannot do on a sharded round is read ``matrix`` (only a whole round has one) or
evaluate a whole client model: such workloads declare ``per_client`` and are routed by client,
not by block.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt

from flstore_core.cache.gram import GramParts
from flstore_core.cache.round_data import RoundData
from flstore_core.cache.round_view import (
    F32,
    F64,
    ArtifactStats,
    JobContext,
    Json,
    RoundView,
    Vector,
    VectorExpr,
)
from flstore_core.data import layout
from flstore_core.data.codec import TensorSpec
from flstore_core.errors import UnavailableError, ValidationError
from flstore_core.storage.object_store import ObjectStore

# VectorExpr lives with RoundView (every round's model builders return one); importable here
__all__ = [
    "PartsFetch",
    "PieceFetch",
    "PieceSpill",
    "ShardedRound",
    "VectorExpr",
    "block_parts_json",
    "content_digest",
    "evaluate",
    "gram_piece_fetch",
    "gram_piece_spill",
    "model_expr",
    "parts_from_json",
    "parts_to_json",
]


# ---------------------------------------------------------------------- Gram pieces as JSON

# the largest Gram array an invocation carries inline (as base64: 4/3 of it); a larger one (a
# block of n clients holds n x n float64: 32 MB at 2,000 clients) travels through S3 as a
# result object named by its SHA-256, since Lambda caps a request and an answer at 6 MB each
INLINE_ARRAY_BYTES = 512 * 1024
# where such arrays go, under the job's results/ prefix (the bucket's lifecycle expires them)
GRAM_PIECES = "gram-pieces"

#: writes one array's raw bytes and returns the key it is at (``None``: carry every array inline)
PieceSpill = Callable[[bytes], str]
#: reads back the bytes at a key a spill wrote
PieceFetch = Callable[[str], bytes]


def gram_piece_key(job: str, round_: int, raw: bytes) -> str:
    """``jobs/{job}/results/gram-pieces/{round:08d}/{sha256}.f8``: an array's key, named by its
    content, so writing it twice writes the same object."""
    digest = hashlib.sha256(raw).hexdigest()
    return f"{layout.results_prefix(job, GRAM_PIECES, round_)}{digest}.f8"


def gram_piece_spill(
    store: ObjectStore, job: str, round_: int, written: set[str] | None = None
) -> PieceSpill:
    """A spill that writes arrays as result objects of ``job``'s round (once each, when
    ``written`` remembers the keys already written)."""

    def spill(raw: bytes) -> str:
        key = gram_piece_key(job, round_, raw)
        if written is None or key not in written:
            store.put_result(key, raw, "application/octet-stream")
            if written is not None:
                if len(written) >= 4096:  # a long-lived router's memory of them stays small
                    written.clear()
                written.add(key)
        return key

    return spill


def gram_piece_fetch(store: ObjectStore, job: str, round_: int) -> PieceFetch:
    """A fetch that reads only the arrays of ``job``'s round a spill wrote."""
    prefix = layout.results_prefix(job, GRAM_PIECES, round_)

    def fetch(key: str) -> bytes:
        if not key.startswith(prefix) or "/" in key[len(prefix) :]:
            raise ValidationError(f"{key!r} is not a Gram piece of {job}/{round_}")
        return store.get_object(key)

    return fetch


def _array_to_json(a: F64, spill: PieceSpill | None) -> Json:
    data = np.ascontiguousarray(a, dtype="<f8")
    raw = data.tobytes()
    if spill is not None and len(raw) > INLINE_ARRAY_BYTES:
        key = spill(raw)
        return {"shape": list(data.shape), "s3": key, "sha256": key.rsplit("/", 1)[1][:-3]}
    return {"shape": list(data.shape), "f8": base64.b64encode(raw).decode()}


def _array_from_json(obj: Json, fetch: PieceFetch | None) -> F64:
    shape = [int(d) for d in obj["shape"]]
    if "s3" in obj:
        if fetch is None:
            raise ValidationError("a Gram piece in S3 where only inline ones are read")
        raw = fetch(str(obj["s3"]))
        if len(raw) != 8 * int(np.prod(shape)) or hashlib.sha256(raw).hexdigest() != obj["sha256"]:
            raise UnavailableError(f"the Gram piece at {obj['s3']} is not the one written")
    else:
        raw = base64.b64decode(obj["f8"])
    out: F64 = np.frombuffer(raw, dtype="<f8").astype(np.float64).reshape(shape)
    return out


def parts_to_json(parts: GramParts, spill: PieceSpill | None = None) -> Json:
    """Gram pieces as JSON, bit for bit (float64 arrays as base64, scalars as JSON numbers,
    which Python writes and reads back exactly); with ``spill``, an array larger than
    :data:`INLINE_ARRAY_BYTES` is written there and named by its key and SHA-256."""
    return {
        "centred": _array_to_json(parts.centred, spill),
        "z_c": _array_to_json(parts.z_c, spill),
        "c_c": parts.c_c,
        "z_b": _array_to_json(parts.z_b, spill),
        "c_b": parts.c_b,
        "b_b": parts.b_b,
    }


def parts_from_json(obj: Json, fetch: PieceFetch | None = None) -> GramParts:
    """Inverse of :func:`parts_to_json`; an array in S3 is read with ``fetch`` and checked
    against its SHA-256 and shape (503 when it is not the one written)."""
    return GramParts(
        _array_from_json(obj["centred"], fetch),
        _array_from_json(obj["z_c"], fetch),
        float(obj["c_c"]),
        _array_from_json(obj["z_b"], fetch),
        float(obj["c_b"]),
        float(obj["b_b"]),
    )


# ---------------------------------------------------------------------- model expressions


def evaluate(spec: Json, data: RoundData) -> F32:
    """The vector an expression describes, on ``data`` (a block, or a whole round)."""
    if not isinstance(spec, dict):
        raise ValidationError("a model expression must be a JSON object")
    op = spec.get("op")
    if op == "to_weights":
        return data.to_weights(evaluate(spec["of"], data))
    if op == "weighted_mean":
        return data.weighted_mean(np.asarray(spec["weights"], dtype=np.float64))
    if op == "mean":
        return data.mean_vector()
    if op == "row":
        row: F32 = data.matrix[int(spec["row"])]
        return row
    if op == "columnwise":
        args = spec.get("args", {})
        if not isinstance(args, dict):
            raise ValidationError("a columnwise expression's args must be an object")
        return data.columnwise(str(spec["name"]), **args)
    raise ValidationError(f"unknown model expression {op!r}")


def _spec(vector: Any) -> Json:
    if not isinstance(vector, VectorExpr):
        raise UnavailableError(
            "this workload combines vectors of a sharded round in a way that cannot be computed "
            "block by block"
        )
    return vector.spec


# ---------------------------------------------------------------------- the sharded round

# Gram pieces of every block, for the parameters' columns or the buffers' (``None`` where a
# block has none), and whether the blocks hold deltas (a base is stored)
PartsFetch = Callable[[bool], tuple[list[GramParts | None], bool]]


class ShardedRound(RoundView):
    """A round held in column blocks by other functions (module docstring).

    ``fetch(buffers)`` gathers the blocks' Gram pieces — of the parameters' columns, or of the
    buffers' — once each; the router passes a function that scatters to the block holders.
    """

    def __init__(
        self,
        job: str,
        round_: int,
        clients: list[str],
        specs: tuple[TensorSpec, ...],
        num_examples: npt.NDArray[np.int64],
        metrics: list[dict[str, Any]],
        blocks: int,
        fetch: PartsFetch,
        sha256: dict[str, str] | None = None,
        context: JobContext | None = None,
    ) -> None:
        super().__init__(
            job,
            round_,
            clients,
            specs,
            num_examples,
            metrics,
            stats=ArtifactStats(),
            sha256=sha256,
            context=context,
        )
        self.blocks = blocks
        self._fetch = fetch
        self._delta: bool | None = None
        self._fetch_lock = threading.Lock()

    # the data is not here -------------------------------------------------------------

    @property
    def base(self) -> F32 | None:
        raise UnavailableError(
            f"round {self.round} of job {self.job!r} is held in {self.blocks} column blocks, "
            "its base model with them, and this workload reads the base"
        )

    @property
    def nbytes(self) -> int:
        return 1024 + 8 * (self.n * self.n + 2 * self.n)

    @property
    def is_delta(self) -> bool:
        if self._delta is None:
            self.gram_parts()
        assert self._delta is not None
        return self._delta

    def gram_parts(self, buffers: bool = False) -> GramParts | None:
        """The round's Gram pieces: the blocks' pieces, gathered once and summed in block
        order."""
        name = "gram+buffers" if buffers else "gram"

        def gather() -> GramParts | None:
            with self._fetch_lock:
                parts, delta = self._fetch(buffers)
                self._delta = delta
            present = [p for p in parts if p is not None]
            if not present:
                return None
            total = present[0]
            for p in present[1:]:
                total = total + p
            return total.symmetric()

        parts = self._artifact(name, gather)
        if not buffers and parts is None:
            raise UnavailableError(f"round {self.round} of job {self.job!r} has no columns")
        return parts

    def dots_with(self, vector: F32, include_buffers: bool = False) -> F64:
        raise UnavailableError("dots with a vector of a sharded round are not served")

    # models are expressions -------------------------------------------------------------

    def mean_vector(self) -> VectorExpr:
        return VectorExpr({"op": "mean"})

    def weighted_mean(self, weights: F64) -> VectorExpr:
        w = np.asarray(weights, dtype=np.float64)
        if float(w.sum()) <= 0:
            raise ValueError("weights must sum to a positive number")
        return VectorExpr({"op": "weighted_mean", "weights": w.tolist()})

    def client_weights(self, row: int) -> VectorExpr:
        return VectorExpr({"op": "to_weights", "of": {"op": "row", "row": int(row)}})

    def to_weights(self, vector: Vector) -> VectorExpr:
        return VectorExpr({"op": "to_weights", "of": _spec(vector)})

    def columnwise(self, name: str, **args: Any) -> VectorExpr:
        return VectorExpr({"op": "columnwise", "name": name, "args": args})


def model_expr(model: Any) -> Json:
    """The expression of a workload's model on a sharded round (its ``model`` may be deferred:
    a function returning the expression)."""
    return _spec(model() if callable(model) else model)


def content_digest(sha256: dict[str, str]) -> str:
    """A fingerprint of a round's content (its clients and their updates' checksums): what a
    block holder read and what the router planned must be the same round."""
    text = json.dumps(sorted(sha256.items()), separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def block_parts_json(
    data: RoundData, buffers: bool, spill: PieceSpill | None = None
) -> Json | None:
    """What a block holder answers for its Gram pieces (``None``: no such columns)."""
    parts = data.gram_parts(buffers)
    return None if parts is None else parts_to_json(parts, spill)
