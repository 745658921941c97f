"""The job spec (``job.json``) and the round manifest (``manifest.json``) of ARCHITECTURE §2.

A round is visible to queries only once its manifest exists; the manifest records, per client,
the key, sizes, sha256 of the uncompressed bytes, ``num_examples``, metrics and summaries
(norm, cosine to the round mean, …) so that ``client``-class workloads never read tensors.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from flstore_core.data.codec import PRECISIONS, Precision, TensorSpec, check_frames
from flstore_core.data.codec.metadata import checked_metrics, checked_num_examples
from flstore_core.errors import StoredObjectCorruptError, ValidationError
from flstore_core.ids import validate_client, validate_job, validate_round

MANIFEST_FORMAT = "flstore-manifest/1"

# Summary names in ``UpdateEntry.summary``. The object store writes ``norm`` (of the stored
# weights) with every update; ingestion and backfill add the others
# (:mod:`flstore_core.workloads.summaries` computes them); client-class workloads read them.
NORM = "norm"
COS_TO_MEAN = "cos_to_mean"
UPDATE_NORM = "update_norm"
CONTRIBUTION = "contribution"
JOB_FORMAT = "flstore-job/1"


@dataclass
class JobSpec:
    """What ``job.json`` declares of a job: its model, storage precision and hyper-parameters.

    ``parameters`` are the names of the declared model's trainable parameters
    (``named_parameters()``), recorded at ``job create`` so that cache nodes split a row into
    parameters and buffers without torch (:mod:`flstore_core.data.columns`); ``None`` for a job
    without a model and for ``job.json`` files written before the field existed.
    ``state_names`` are the names of the model's whole state dict in state-dict order — the job's
    canonical tensor order (ARCHITECTURE §2) — recorded at ``job create`` so that a commit
    where torch is not installed (an ingestion worker, the router) lays out a model job's first
    round in the model's order, not the majority's (``ObjectStore.tensor_order``); ``None``
    likewise.
    ``late_clients`` lets a client join a round after it was committed: ``{"within_s": S}``
    accepts one whose commit comes at most ``S`` seconds after the round's manifest was last
    written; ``None`` (the default) refuses every late client, so a committed round's clients are
    final (ARCHITECTURE §2).
    """

    job: str
    model: str | None = None
    precision: Precision = "float32"
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    parameters: tuple[str, ...] | None = None
    state_names: tuple[str, ...] | None = None
    late_clients: dict[str, float] | None = None

    def __post_init__(self) -> None:
        validate_job(self.job)
        try:
            self.late_clients = _late_clients(self.late_clients)
        except ValueError as exc:
            raise ValidationError(str(exc)) from None
        if self.precision not in PRECISIONS:
            raise ValidationError(
                f"unknown precision {self.precision!r}: use one of {', '.join(PRECISIONS)}"
            )

    @property
    def late_window_s(self) -> float | None:
        """How long after a round's commit a late client may join it; ``None``: never."""
        return None if self.late_clients is None else float(self.late_clients["within_s"])

    def to_json(self) -> bytes:
        obj: dict[str, Any] = {
            "format": JOB_FORMAT,
            "job": self.job,
            "model": self.model,
            "precision": self.precision,
            "hyperparameters": self.hyperparameters,
            "description": self.description,
            "parameters": None if self.parameters is None else list(self.parameters),
            "state_names": None if self.state_names is None else list(self.state_names),
        }
        if self.late_clients is not None:  # absent when off: older job.json files stay as they are
            obj["late_clients"] = dict(self.late_clients)
        return json.dumps(
            obj,
            indent=1,
            sort_keys=True,
        ).encode()

    @classmethod
    def from_json(cls, data: bytes) -> JobSpec:
        try:
            obj = json.loads(data)
            return cls(
                job=obj["job"],
                model=obj.get("model"),
                precision=obj.get("precision", "float32"),
                hyperparameters=dict(obj.get("hyperparameters") or {}),
                description=str(obj.get("description", "")),
                parameters=_names(obj.get("parameters"), "parameters"),
                state_names=_names(obj.get("state_names"), "state_names"),
                late_clients=_late_clients(obj.get("late_clients")),
            )
        # AttributeError: JSON that is not an object; RecursionError: nesting too deep
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
            raise StoredObjectCorruptError(f"job.json is not a valid job spec: {exc}") from exc


def _late_clients(value: Any) -> dict[str, float] | None:
    """A job's ``late_clients``: ``None`` (off) or ``{"within_s": seconds > 0}``."""
    if value is None:
        return None
    window = value.get("within_s") if isinstance(value, dict) else None
    if (
        not isinstance(value, dict)
        or set(value) != {"within_s"}
        or isinstance(window, bool)
        or not isinstance(window, int | float)
        or not 0 < window < math.inf
    ):
        raise ValueError(
            f'late_clients must be null or {{"within_s": seconds > 0}}, got {value!r:.80}'
        )
    return {"within_s": float(window)}


def _names(value: Any, field_name: str) -> tuple[str, ...] | None:
    """A recorded list of tensor names (``None`` when absent, as in older ``job.json``)."""
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise TypeError(f"{field_name} must be a list of tensor names")
    return tuple(value)


@dataclass
class UpdateEntry:
    """One client's row in a round manifest.

    ``frames`` and ``frame_sha256`` index a stored update of several zstd frames
    (:func:`~flstore_core.data.codec.encode_update`): cumulative ``(raw_end, stored_end)``
    offsets and each frame's truncated digest, so that a column block is read with range GETs
    of its frames (:meth:`~flstore_core.storage.object_store.ObjectStore.read_round_block`).
    Both are empty for a one-frame update and in manifests written before frames existed:
    such an update is read whole. About 55 bytes of JSON per frame: 3.6 KB per client for
    ResNet-18's 64 frames.
    """

    client: str
    key: str
    sha256: str
    raw_bytes: int
    stored_bytes: int
    num_examples: int
    metrics: dict[str, Any]
    summary: dict[str, float] = field(default_factory=dict)
    frames: tuple[tuple[int, int], ...] = ()
    frame_sha256: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        obj: dict[str, Any] = {
            "key": self.key,
            "sha256": self.sha256,
            "raw_bytes": self.raw_bytes,
            "stored_bytes": self.stored_bytes,
            "num_examples": self.num_examples,
            "metrics": self.metrics,
            "summary": self.summary,
        }
        if self.frames:
            obj["frames"] = [list(f) for f in self.frames]
            obj["frame_sha256"] = list(self.frame_sha256)
        return obj

    @classmethod
    def from_json(cls, client: str, obj: dict[str, Any]) -> UpdateEntry:
        entry = cls(
            client=validate_client(client),
            key=str(obj["key"]),
            sha256=str(obj["sha256"]),
            raw_bytes=_size(obj["raw_bytes"], "raw_bytes"),
            stored_bytes=_size(obj["stored_bytes"], "stored_bytes"),
            num_examples=checked_num_examples(obj["num_examples"]),
            metrics=checked_metrics(obj.get("metrics") or {}),
            summary={k: _finite(v, k) for k, v in (obj.get("summary") or {}).items()},
            frames=tuple((int(r), int(s)) for r, s in obj.get("frames") or ()),
            frame_sha256=tuple(str(d) for d in obj.get("frame_sha256") or ()),
        )
        if entry.frames or entry.frame_sha256:
            # a reader plans range GETs from these: refuse an index outside the object
            check_frames(entry.frames, entry.frame_sha256, entry.raw_bytes, entry.stored_bytes)
        return entry


def _size(value: Any, name: str) -> int:
    """A byte count read back from a manifest: an integer in what a JSON number holds exactly
    (a float such as ``1e400`` made ``int()`` raise OverflowError)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**53:
        raise ValueError(f"{name} must be an integer from 0 to 2**53 - 1, got {value!r:.40}")
    return value


def _finite(value: Any, name: str) -> float:
    """A summary read back from a manifest: a finite float."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"summary {name!r} must be a number, got {value!r:.40}")
    try:
        out = float(value)
    except OverflowError:  # an int past the largest double
        out = math.inf
    if not math.isfinite(out):
        raise ValueError(f"summary {name!r} must be finite, got {value!r:.40}")
    return out


@dataclass
class RoundManifest:
    """The committed state of a round: its tensors and one :class:`UpdateEntry` per client."""

    job: str
    round: int
    precision: Precision
    tensors: tuple[TensorSpec, ...]
    updates: dict[str, UpdateEntry]

    @property
    def clients(self) -> list[str]:
        """Client ids in the round's canonical (sorted) order: the row order of its matrix."""
        return sorted(self.updates)

    @property
    def n_params(self) -> int:
        return sum(s.numel for s in self.tensors)

    @property
    def stored_bytes(self) -> int:
        return sum(e.stored_bytes for e in self.updates.values())

    @property
    def raw_bytes(self) -> int:
        return sum(e.raw_bytes for e in self.updates.values())

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "format": MANIFEST_FORMAT,
                "job": self.job,
                "round": self.round,
                "precision": self.precision,
                "tensors": [s.to_json() for s in self.tensors],
                "n_params": self.n_params,
                "clients": self.clients,
                "bytes": self.stored_bytes,
                "raw_bytes": self.raw_bytes,
                "updates": {c: self.updates[c].to_json() for c in self.clients},
            },
            sort_keys=True,
        ).encode()

    @classmethod
    def from_json(cls, data: bytes) -> RoundManifest:
        try:
            obj = json.loads(data)
            if obj.get("format") != MANIFEST_FORMAT:
                raise ValueError(f"unknown manifest format {obj.get('format')!r}")
            return cls(
                job=validate_job(obj["job"]),
                round=validate_round(obj["round"]),
                precision=obj["precision"],
                tensors=tuple(TensorSpec.from_json(t) for t in obj["tensors"]),
                updates={c: UpdateEntry.from_json(c, e) for c, e in dict(obj["updates"]).items()},
            )
        except (
            ValueError,
            KeyError,
            TypeError,
            AttributeError,  # JSON that is not an object where one is expected
            RecursionError,  # nesting too deep
            OverflowError,  # a float past int(): 1e400 is inf
            ValidationError,
        ) as exc:
            raise StoredObjectCorruptError(f"manifest is not valid: {exc}") from exc
