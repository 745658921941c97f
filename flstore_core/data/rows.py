"""An update as one flattened row, and the base-model rule (ARCHITECTURE §2).

A round matrix holds one row per client: the update's tensors flattened in the round's tensor
order (:func:`~flstore_core.data.codec.slices_of` gives each tensor's column range). Ingestion
streams rows in pieces (:func:`flat_parts`), the cache node and the baselines decode them into a
matrix, and every result model is cut back into tensors with :func:`unflatten` — all here, so
the three agree on the order and the dtypes.

The *base* of a round is the global model its clients started from (``global/{r-1}``, or the
job's initial model at round 0). It counts only when its tensor names and shapes are the
round's, matched by name in whatever order the model file stores them (:func:`base_vector`);
direction-based workloads and the ingest summaries then work on deltas ``w_i − base``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from flstore_core.data.codec import TensorSpec, Update, np_dtype, slices_of

F32 = npt.NDArray[np.float32]


def flat_parts(tensors: Mapping[str, npt.NDArray[Any]], specs: Sequence[TensorSpec]) -> list[F32]:
    """The tensors as flat float32 arrays in ``specs`` order (no copy for float32 tensors): the
    row a round matrix would hold, in pieces."""
    return [np.asarray(tensors[s.name], dtype=np.float32).reshape(-1) for s in specs]


def flatten(tensors: Mapping[str, npt.NDArray[Any]]) -> F32:
    """All tensors, in their own order, as one float32 row."""
    parts = [np.asarray(a, dtype=np.float32).reshape(-1) for a in tensors.values()]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)


def unflatten(vector: npt.NDArray[Any], specs: Sequence[TensorSpec]) -> dict[str, npt.NDArray[Any]]:
    """Split a flattened row into named tensors, cast back to their source dtypes (integer
    tensors are rounded to the nearest integer, not truncated)."""
    out: dict[str, npt.NDArray[Any]] = {}
    for spec, (a, b) in zip(specs, slices_of(specs), strict=True):
        part = vector[a:b].reshape(spec.shape)
        dtype = np_dtype(spec.dtype)
        if dtype.kind == "f":
            out[spec.name] = part.astype(dtype, copy=False)
        else:
            out[spec.name] = np.rint(part).astype(dtype)
    return out


def fits(update: Update, specs: Sequence[TensorSpec]) -> bool:
    """Whether ``update`` has exactly the tensor names and shapes of ``specs``, matched by name
    (a file may store its tensors in any order)."""
    shapes = {s.name: tuple(s.shape) for s in specs}
    return len(update.tensors) == len(shapes) and all(
        shapes.get(n) == tuple(a.shape) for n, a in update.tensors.items()
    )


def base_vector(base: Update | None, specs: Sequence[TensorSpec]) -> F32 | None:
    """The base model as a flat row, or ``None`` when there is none or it does not fit the round
    (the base-model rule every layer applies: the cache node, the baselines and ingestion)."""
    if base is None or not specs or not fits(base, specs):
        return None
    return np.concatenate(flat_parts(base.tensors, specs))
