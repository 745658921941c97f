"""Checkpoints users already have, read as FLStore updates (the Python API behind
``flstore push``).

A checkpoint is one client's model weights in one file:

* ``.pt`` / ``.pth`` — a ``torch.save`` state dict (or ``{"state_dict": …}``), loaded with
  ``torch.load(..., weights_only=True)`` only: a checkpoint is data from someone else, and
  unpickling arbitrary objects would run their code;
* ``.safetensors`` — from ``safetensors.torch`` or ``safetensors.numpy``, with or without
  ``__metadata__`` (FLStore's ``num_examples`` and ``metrics`` there are kept);
* ``.npz`` — one array per tensor name (``allow_pickle=False``).

Every file is read and checked against the job's model before anything is stored, so a bad file
leaves the round as it was (:func:`push_round`).
"""

from __future__ import annotations

import csv
import functools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from flstore_core import models
from flstore_core.data.codec import TensorSpec, Update, parse_safetensors
from flstore_core.data.manifest import RoundManifest
from flstore_core.errors import FLStoreError, InvalidIdError, ValidationError
from flstore_core.ids import validate_client, validate_job, validate_round
from flstore_core.storage.object_store import ObjectStore

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".safetensors", ".npz")
DEFAULT_EXAMPLES = 1
# the keys a training script commonly nests its state dict under in a torch.save checkpoint
_NESTED_STATE = ("state_dict", "model_state_dict", "model")


def read_tensors(path: str | Path) -> Update:
    """The named tensors of a checkpoint file (and, for safetensors, the ``num_examples`` and
    ``metrics`` of its ``__metadata__``); :class:`ValidationError` naming the file otherwise."""
    file = Path(path)
    suffix = file.suffix.lower()
    try:
        if suffix in (".pt", ".pth"):
            return Update(_torch_tensors(file))
        if suffix == ".safetensors":
            found = parse_safetensors(file.read_bytes())
            return Update(found.tensors, found.num_examples, dict(found.metrics))
        if suffix == ".npz":
            with np.load(file, allow_pickle=False) as npz:
                return Update({name: npz[name] for name in npz.files})
    except FLStoreError as exc:
        raise ValidationError(f"{file.name}: {exc.message}") from exc
    except (OSError, ValueError) as exc:
        raise ValidationError(f"{file.name}: cannot read it as {suffix}: {exc}") from exc
    raise ValidationError(
        f"{file.name}: unknown checkpoint format; use one of {', '.join(CHECKPOINT_SUFFIXES)}"
    )


def _torch_tensors(file: Path) -> dict[str, npt.NDArray[Any]]:
    import torch

    try:
        obj = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # weights_only's refusals (UnpicklingError), truncation, zip errors
        raise ValidationError(
            f"{file.name}: not a checkpoint of plain tensors (loaded with weights_only=True, "
            f"which never runs code from the file): {str(exc).splitlines()[0]}"
        ) from exc
    if isinstance(obj, Mapping):
        for key in _NESTED_STATE:
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping):
        raise ValidationError(f"{file.name}: holds a {type(obj).__name__}, not a state dict")
    out: dict[str, npt.NDArray[Any]] = {}
    for name, value in obj.items():
        if not isinstance(value, torch.Tensor):
            raise ValidationError(
                f"{file.name}: entry {name!r} is a {type(value).__name__}, not a tensor"
            )
        tensor = value.detach().cpu()
        if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16
            tensor = tensor.float()
        out[str(name)] = tensor.numpy()
    return out


@functools.lru_cache(maxsize=16)
def _state_shapes(model: str) -> dict[str, tuple[int, ...]]:
    """The state-dict shapes of registry model ``model``, built once per process (ingestion
    checks every file of a run against them: a ResNet-18 takes ~0.1 s to build)."""
    return {s.name: tuple(s.shape) for s in models.state_specs(models.build(model))}


def fit_problems(
    model: str, tensors: Mapping[str, npt.NDArray[Any]] | Sequence[TensorSpec]
) -> list[str]:
    """What keeps these tensors (or specs) from loading into registry model ``model``: each
    missing, extra or misshapen tensor by name; empty when they fit."""
    want = _state_shapes(model)
    have = (
        {n: tuple(a.shape) for n, a in tensors.items()}
        if isinstance(tensors, Mapping)
        else {s.name: tuple(s.shape) for s in tensors}
    )
    problems = [f"tensor {n!r} of model {model} is missing" for n in want if n not in have]
    problems += [f"tensor {n!r} is not in model {model}" for n in have if n not in want]
    problems += [
        f"tensor {n!r} has shape {list(have[n])}, model {model} has {list(shape)}"
        for n, shape in want.items()
        if n in have and have[n] != shape
    ]
    return problems


@dataclass(frozen=True)
class ClientMeta:
    """What a sidecar file says of one client."""

    num_examples: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)


def read_client_meta(path: str | Path) -> dict[str, ClientMeta]:
    """A sidecar file of ``client → num_examples, metrics``.

    CSV: a header with ``client``, optionally ``num_examples``, and one numeric column per
    metric. JSON: ``{client: {"num_examples": n, "metrics": {...}}}`` (other numeric keys are
    metrics too).
    """
    file = Path(path)
    try:
        if file.suffix.lower() == ".csv":
            with file.open(newline="") as fh:
                rows: dict[str, dict[str, Any]] = {}
                for row in csv.DictReader(fh):
                    if "client" not in row:
                        raise ValidationError(f"{file.name}: the CSV needs a 'client' column")
                    client = row.pop("client")
                    rows[client] = {k: v for k, v in row.items() if v not in ("", None)}
        else:
            rows = json.loads(file.read_text())
            if not isinstance(rows, dict) or not all(isinstance(v, dict) for v in rows.values()):
                raise ValidationError(f"{file.name}: use {{client: {{num_examples, metrics}}}}")
        return {client: _client_meta(file.name, client, row) for client, row in rows.items()}
    except (OSError, ValueError) as exc:
        raise ValidationError(f"{file.name}: cannot read client metadata: {exc}") from exc


def _client_meta(where: str, client: str, row: dict[str, Any]) -> ClientMeta:
    metrics = dict(row.pop("metrics", None) or {})
    examples = row.pop("num_examples", None)
    metrics.update(row)
    try:
        n = None if examples is None else int(examples)
        values = {k: float(v) for k, v in metrics.items()}
    except (TypeError, ValueError) as exc:
        raise ValidationError(f"{where}: client {client!r}: not a number: {exc}") from exc
    if n is not None and n < 1:
        raise ValidationError(f"{where}: client {client!r}: num_examples must be at least 1")
    return ClientMeta(n, values)


def read_client_map(path: str | Path) -> dict[str, str]:
    """A ``file name → client id`` map: JSON ``{"a.pt": "client-a"}`` or a CSV with columns
    ``file`` and ``client``."""
    file = Path(path)
    try:
        if file.suffix.lower() == ".csv":
            with file.open(newline="") as fh:
                return {row["file"]: row["client"] for row in csv.DictReader(fh)}
        found = json.loads(file.read_text())
    except (OSError, ValueError, KeyError) as exc:
        raise ValidationError(f"{file.name}: cannot read the client map: {exc}") from exc
    if not isinstance(found, dict) or not all(isinstance(v, str) for v in found.values()):
        raise ValidationError(f'{file.name}: use {{"file name": "client id"}}')
    return found


def checkpoint_files(
    directory: str | Path, names: Mapping[str, str] | None = None
) -> list[tuple[Path, str]]:
    """``(file, client id)`` of every checkpoint in ``directory``: the id is the file's stem,
    or what ``names`` maps its file name (or stem) to."""
    folder = Path(directory)
    if not folder.is_dir():
        raise ValidationError(f"{folder}: not a directory of checkpoints")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in CHECKPOINT_SUFFIXES)
    if not files:
        raise ValidationError(
            f"{folder}: no checkpoints ({', '.join(CHECKPOINT_SUFFIXES)} files) in it"
        )
    out: list[tuple[Path, str]] = []
    seen: dict[str, Path] = {}
    for file in files:
        client = file.stem
        if names is not None:
            if file.name not in names and file.stem not in names:
                raise ValidationError(f"{file.name}: not in the --clients map")
            client = names.get(file.name, names.get(file.stem, client))
        try:
            validate_client(client)
        except InvalidIdError as exc:
            raise ValidationError(
                f"{file.name}: {exc.message}; rename the file or map it with --clients"
            ) from exc
        if client in seen:
            raise ValidationError(f"{file.name} and {seen[client].name} are both client {client!r}")
        seen[client] = file
        out.append((file, client))
    return out


def read_round(
    files: Sequence[tuple[Path, str]],
    model: str | None,
    meta: Mapping[str, ClientMeta] | None = None,
    *,
    num_examples: int | None = None,
    metrics: Mapping[str, float] | None = None,
) -> dict[str, Update]:
    """Every file read and checked, ``client → Update``; nothing is stored.

    ``num_examples`` comes from ``meta`` (the sidecar), else the ``num_examples`` argument,
    else the file's own metadata, else :data:`DEFAULT_EXAMPLES`; metrics merge the same way.
    Without a model the files must agree with each other (names and shapes).
    """
    meta = meta or {}
    unknown = sorted(set(meta) - {client for _, client in files})
    if unknown:
        raise ValidationError(f"client metadata names clients with no checkpoint: {unknown}")
    updates: dict[str, Update] = {}
    first: tuple[str, list[TensorSpec]] | None = None
    for file, client in files:
        update = read_tensors(file)
        if model is not None:
            problems = fit_problems(model, update.tensors)
        elif first is None:
            problems, first = [], (file.name, update.specs())
        else:
            problems = _agree(first, update.specs())
        if problems:
            raise ValidationError(f"{file.name}: {'; '.join(problems[:3])}")
        side = meta.get(client, ClientMeta())
        update.num_examples = (
            side.num_examples or num_examples or update.num_examples or DEFAULT_EXAMPLES
        )
        update.metrics = {**update.metrics, **(metrics or {}), **side.metrics}
        updates[client] = update
    return updates


def _agree(first: tuple[str, list[TensorSpec]], specs: list[TensorSpec]) -> list[str]:
    name, want = first
    have = {s.name: s.shape for s in specs}
    for s in want:
        if have.get(s.name) != s.shape:
            return [f"tensor {s.name!r} differs from {name} (missing or another shape)"]
    extra = set(have) - {s.name for s in want}
    return [f"tensor {sorted(extra)[0]!r} is not in {name}"] if extra else []


def push_round(
    store: ObjectStore, job: str, round_: int, updates: Mapping[str, Update]
) -> RoundManifest:
    """Store each client's update and commit the round through the object store's commit path
    (updates first, the manifest last: a failure leaves no visible half-round)."""
    validate_job(job)
    validate_round(round_)
    entries = [store.put_update(job, round_, client, u) for client, u in updates.items()]
    return store.commit_round(job, round_, entries)
