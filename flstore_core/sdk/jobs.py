"""Declaring a job: its model, storage precision and validation set (the Python API behind
``flstore job create``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from flstore_core import models
from flstore_core.data.codec import parse_precision
from flstore_core.data.manifest import JobSpec
from flstore_core.errors import ValidationError
from flstore_core.storage.object_store import ObjectStore


def read_validation_file(path: str | Path) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """A validation set from a file holding ``x`` and ``y``: ``.npz``, safetensors, or a dict
    saved with ``torch.save`` (``.pt``/``.pth``, loaded with ``weights_only=True``)."""
    from flstore_core.sdk.checkpoints import read_tensors

    update = read_tensors(path)
    if set(update.tensors) != {"x", "y"}:
        raise ValidationError(
            f"{Path(path).name}: a validation file holds exactly two tensors, x (inputs) and y "
            f"(labels); found {sorted(update.tensors)}"
        )
    return (
        np.asarray(update.tensors["x"], dtype=np.float32),
        np.asarray(update.tensors["y"], dtype=np.int64),
    )


def parameter_names(model: str) -> tuple[str, ...]:
    """Names of the registry model's trainable parameters (``named_parameters()``, in order).

    Recorded in ``job.json`` so that cache nodes tell parameters from buffers (BatchNorm's
    running statistics and counters) without torch (:mod:`flstore_core.data.columns`).
    """
    return tuple(name for name, _ in models.build(model).named_parameters())


def create_job(
    store: ObjectStore,
    job: str,
    *,
    model: str | None = None,
    precision: str = "float32",
    validation: str | Path | tuple[Any, Any] | None = None,
    hyperparameters: dict[str, Any] | None = None,
    force: bool = False,
) -> JobSpec:
    """Declare (or re-declare) a job; checks the model name and the validation set's shape.

    Everything is validated before anything is written, so a bad argument leaves the job as it
    was. Once the job has committed rounds, another model or validation set is a
    :class:`~flstore_core.errors.ConflictError` unless ``force`` (past answers were computed
    with them; :func:`serving_problems` says what a new model would break).
    """
    if model is not None and model not in models.names():
        raise ValidationError(f"unknown model {model!r}; known models: {', '.join(models.names())}")
    spec = JobSpec(
        job,
        model=model,
        precision=parse_precision(precision),
        hyperparameters=hyperparameters or {},
        parameters=None if model is None else parameter_names(model),
        # the canonical tensor order, for commits without torch (ObjectStore.tensor_order)
        state_names=None if model is None else models.state_names(model),
    )
    data = None
    if validation is not None:
        x, y = (
            read_validation_file(validation) if isinstance(validation, str | Path) else validation
        )
        x = np.asarray(x, dtype=np.float32)
        y = np.asarray(y, dtype=np.int64)
        if model is not None and tuple(x.shape[1:]) != models.INPUT_SHAPES[model]:
            raise ValidationError(
                f"validation x has shape {list(x.shape)} but model {model!r} takes "
                f"[n, {', '.join(map(str, models.INPUT_SHAPES[model]))}]"
            )
        data = (x, y)
    store.put_job_spec(spec, force=force)
    if data is not None:
        store.put_validation_set(job, *data, force=force)
    return spec


def serving_problems(
    store: ObjectStore,
    job: str,
    *,
    model: str | None,
    validation_shape: tuple[int, ...] | None = None,
) -> list[str]:
    """What declaring ``model`` (and a validation set of inputs ``validation_shape``) would
    break in a job that already has committed rounds: each round whose tensors the model cannot
    load, and a validation set the model cannot take. Empty when nothing breaks."""
    from flstore_core.sdk.checkpoints import fit_problems

    problems: list[str] = []
    rounds = store.list_rounds(job)
    if model is None or not rounds:
        return problems
    if validation_shape is not None and tuple(validation_shape[1:]) != models.INPUT_SHAPES[model]:
        problems.append(
            f"validation x has shape {list(validation_shape)} but model {model!r} takes "
            f"[n, {', '.join(map(str, models.INPUT_SHAPES[model]))}]"
        )
    for round_ in rounds:
        found = fit_problems(model, store.get_manifest(job, round_).tensors)
        if found:
            problems.append(
                f"round {round_}: {found[0]}"
                + (f" (+{len(found) - 1} more)" if len(found) > 1 else "")
            )
    return problems
