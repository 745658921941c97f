"""Inference with a stored global model: predictions on given inputs, accuracy on labels.

The model after round ``round`` (default: the latest stored) is rebuilt from the job's model
architecture (``flstore_core.models``) and run on ``inputs`` (a nested list shaped like the
model's input batch) or, when none are given, on the job's validation set, reporting accuracy
when labels are known. Class ``model``: the node keeps the latest global models in memory.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from flstore_core import models
from flstore_core.cache.shards import GlobalModels
from flstore_core.errors import InvalidParamsError
from flstore_core.workloads import Param, Workload, WorkloadResult, register


def inference(
    shard: GlobalModels,
    round: int | None = None,
    inputs: list[Any] | None = None,
    labels: list[int] | None = None,
) -> WorkloadResult:
    """Predictions (and accuracy) of the global model after ``round``."""
    name = shard.context.model_name()
    r = shard.latest_round() if round is None else round
    model = shard.module(r)
    shape = models.INPUT_SHAPES[name]
    if labels is not None and inputs is None:
        raise InvalidParamsError(
            "labels are the labels of the given inputs: send 'inputs' with them, or neither to "
            "score the job's validation set"
        )
    if inputs is not None:
        try:
            x = np.asarray(inputs, dtype=np.float32)
        except (TypeError, ValueError) as exc:
            raise InvalidParamsError(f"inputs must be a nested list of numbers: {exc}") from exc
        if x.shape[1:] != shape:
            raise InvalidParamsError(
                f"inputs must have shape [n, {', '.join(map(str, shape))}] for model {name!r}, "
                f"got {list(x.shape)}"
            )
        y = None if labels is None else checked_labels(labels, len(x), models.NUM_CLASSES[name])
    else:
        x, y = shard.context.validation()
    preds = models.predict(model, x)
    result: dict[str, Any] = {"round": r, "model": name, "n": len(x)}
    if inputs is not None:
        result["predictions"] = preds.tolist()
    if y is not None:
        result["accuracy"] = float((preds == y).mean()) if len(y) else 0.0
    return WorkloadResult(result)


def checked_labels(labels: list[Any], n: int, classes: int) -> npt.NDArray[np.int64]:
    """``labels`` as class indices: one integer in ``[0, classes)`` per input, else a 400 (a
    label outside the classes would silently count as a wrong prediction)."""
    if len(labels) != n or not all(isinstance(v, int) and not isinstance(v, bool) for v in labels):
        raise InvalidParamsError(
            f"labels must be a list of {n} integers, one class index per input"
        )
    outside = [v for v in labels if not 0 <= v < classes]
    if outside:
        raise InvalidParamsError(
            f"labels must be class indices in [0, {classes - 1}] for this model, got {outside[0]}"
        )
    return np.asarray(labels, dtype=np.int64)


WORKLOAD = register(
    Workload(
        name="inference",
        cls="model",
        description="Predictions / accuracy of a stored global model on given inputs "
        "(or the job's validation set).",
        reference="model serving on the stored global model",
        run=lambda shard, params: inference(shard, **params),
        params={
            "round": Param(
                "int",
                None,
                "global model after this round (default latest)",
                minimum=0,
                nullable=True,
            ),
            "inputs": Param("array", None, "input batch, nested lists", nullable=True),
            "labels": Param("array", None, "labels of the inputs", nullable=True),
        },
    )
)
