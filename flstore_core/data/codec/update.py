"""What the codec encodes and decodes: an :class:`Update` (named tensors and metadata), the
:class:`TensorSpec` of each tensor, the caps applied to untrusted bytes, and the tensors'
column ranges in a flattened row."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from flstore_core import config
from flstore_core.data.codec.dtypes import dtype_name

Kind = Literal["update", "global", "initial"]
KINDS: tuple[Kind, ...] = ("update", "global", "initial")


@dataclass(frozen=True)
class CodecLimits:
    """Caps applied when decoding untrusted bytes; raise :class:`LimitExceededError` past them.

    ``max_update_bytes`` caps the bytes an update's header declares for its tensors in all
    (``FLSTORE_MAX_UPDATE_BYTES``; ingestion reads the setting, :data:`DEFAULT_LIMITS` has its
    default).
    """

    max_file_bytes: int = 8 * 1024**3
    max_tensor_bytes: int = 4 * 1024**3
    max_update_bytes: int = config.MAX_UPDATE_BYTES.default_int
    max_tensors: int = 100_000
    allow_nonfinite: bool = False


DEFAULT_LIMITS = CodecLimits()


@dataclass(frozen=True)
class TensorSpec:
    """Name, safetensors dtype (as stored in the *source*, e.g. ``F32``) and shape of a tensor."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> TensorSpec:
        return cls(str(obj["name"]), str(obj["dtype"]), tuple(int(s) for s in obj["shape"]))


@dataclass
class Update:
    """One model update: an ordered ``name -> ndarray`` mapping plus its metadata.

    ``job``, ``round`` and ``client`` identify it in a raw update file; ``kind`` is ``update``
    (a client's), ``global`` (the aggregate after a round, no client) or ``initial`` (the model
    before round 0, neither client nor round).
    """

    tensors: dict[str, npt.NDArray[Any]]
    num_examples: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)
    job: str | None = None
    round: int | None = None
    client: str | None = None
    kind: Kind = "update"

    def specs(self) -> list[TensorSpec]:
        """The tensor specs in order, with source dtypes."""
        return [TensorSpec(n, dtype_name(a.dtype), tuple(a.shape)) for n, a in self.tensors.items()]

    @property
    def nbytes(self) -> int:
        return sum(int(a.nbytes) for a in self.tensors.values())

    @property
    def who(self) -> str:
        """How an error message names this update: its client, else its kind."""
        if self.client is not None:
            return f"client {self.client!r}"
        return f"{self.kind} model" if self.kind != "update" else "update"


def first_nonfinite(tensors: Mapping[str, npt.NDArray[Any]]) -> str | None:
    """The name of the first float tensor holding NaN or Inf, or ``None`` if all are finite."""
    for name, arr in tensors.items():
        if is_nonfinite(arr):
            return name
    return None


def is_nonfinite(arr: npt.NDArray[Any]) -> bool:
    """Whether a float array holds a NaN or an Inf (integer arrays never do)."""
    return bool(arr.dtype.kind == "f" and arr.size and not np.isfinite(arr).all())


def slices_of(specs: Any) -> list[tuple[int, int]]:
    """Column ranges of each tensor in a flattened row, in ``specs`` order."""
    out: list[tuple[int, int]] = []
    pos = 0
    for s in specs:
        out.append((pos, pos + s.numel))
        pos += s.numel
    return out
