"""The elements that flow between the ingestion and backfill transforms.

They are small on purpose: a record names a file and carries what was learnt of it (ids, tensor
specs, the manifest entry), never its tensors, so every shuffle moves kilobytes. The one large
element, a round's running sum of update vectors, lives only inside the combiner. All records
are frozen dataclasses of plain values, so Beam's default (pickle) coder ships them to any
runner's workers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

from flstore_core.data.codec import TensorSpec
from flstore_core.data.manifest import UpdateEntry

RoundKey = tuple[str, int]  # (job, round): the grouping key of everything per round

StoredState = Literal["written", "already_stored", "unchanged"]


@dataclass(frozen=True)
class RawHeader:
    """What the safetensors header of one raw file says, checked before its data is read."""

    path: str
    size: int
    kind: str
    job: str
    round: int | None
    client: str | None
    specs: tuple[TensorSpec, ...]
    num_examples: int
    metrics: dict[str, Any] = field(hash=False)

    @property
    def key(self) -> RoundKey:
        assert self.round is not None
        return (self.job, self.round)


@dataclass(frozen=True)
class PlannedUpdate:
    """A client update accepted by round-level validation, with the round's reference specs."""

    path: str
    size: int
    job: str
    round: int
    client: str
    reference: tuple[TensorSpec, ...]
    precision: str
    committed: bool  # the round already has a manifest (the update may already be in it)

    @property
    def key(self) -> RoundKey:
        return (self.job, self.round)


@dataclass(frozen=True)
class StoredUpdate:
    """A client update now stored at its canonical key, with its (uncommitted) manifest entry."""

    path: str
    job: str
    round: int
    client: str
    entry: UpdateEntry = field(hash=False)
    reference: tuple[TensorSpec, ...]
    specs: tuple[TensorSpec, ...]
    state: StoredState

    @property
    def key(self) -> RoundKey:
        return (self.job, self.round)


@dataclass(frozen=True)
class CommittedRound:
    """A round whose manifest is written: what prefetch and the run summary need of it."""

    job: str
    round: int
    clients: tuple[str, ...]
    stored_bytes: int
    manifest_written: bool
    summarized: bool


@dataclass(frozen=True)
class DeadLetter:
    """A file that was not ingested, and why (one JSON line of the dead-letter object)."""

    file: str
    code: str
    reason: str
    job: str | None = None
    round: int | None = None
    client: str | None = None
    stage: str = ""
    exception: str = ""  # the type of the exception that rejected the file

    def to_json_line(self) -> str:
        return json.dumps(
            {
                "file": self.file,
                "code": self.code,
                "reason": self.reason,
                "job": self.job,
                "round": self.round,
                "client": self.client,
                "stage": self.stage,
                "exception": self.exception,
            },
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> DeadLetter:
        return cls(
            file=str(obj["file"]),
            code=str(obj["code"]),
            reason=str(obj["reason"]),
            job=obj.get("job"),
            round=obj.get("round"),
            client=obj.get("client"),
            stage=str(obj.get("stage", "")),
            exception=str(obj.get("exception", "")),
        )
