"""Shards of the ``meta``, ``client`` and ``model`` classes, and how a node loads them.

* ``meta`` (``job/meta/meta``): the job spec and, per committed round, every client's
  ``num_examples``, metrics and summaries, read from the round manifests (small JSON; never a
  tensor). Always kept; refreshed incrementally when new rounds are committed.
* ``client`` (``job/client/{id}``): one client's history across rounds (the same per-round
  rows, restricted to the client) — what ``reputation`` and ``incentive`` read.
* ``model`` (``job/model/global``): the job's global models, the latest ones kept.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from flstore_core.cache.round_data import JobContext
from flstore_core.data.codec import TensorSpec
from flstore_core.data.manifest import JobSpec, RoundManifest
from flstore_core.data.rows import flatten
from flstore_core.errors import NotFoundError
from flstore_core.storage.object_store import ObjectStore


@dataclass(frozen=True)
class ClientRound:
    """One client's row of one round: what it reported and what ingestion summarised."""

    round: int
    num_examples: int
    metrics: dict[str, Any]
    summary: dict[str, float]

    def to_json(self) -> dict[str, Any]:
        return {
            "round": self.round,
            "num_examples": self.num_examples,
            "metrics": self.metrics,
            "summary": self.summary,
        }


def rows_of(manifest: RoundManifest) -> dict[str, ClientRound]:
    return {
        c: ClientRound(manifest.round, e.num_examples, dict(e.metrics), dict(e.summary))
        for c, e in manifest.updates.items()
    }


class ManifestReader:
    """Reads round manifests once (a committed manifest changes only when a late client is
    added, which a forced refresh picks up) and lists a job's rounds at most every
    ``list_ttl_s`` seconds (0 lists on every call)."""

    def __init__(self, store: ObjectStore, list_ttl_s: float = 0.0) -> None:
        self.store = store
        self.list_ttl_s = list_ttl_s
        self._cache: dict[tuple[str, int], RoundManifest] = {}
        self._listed: dict[str, tuple[float, list[int]]] = {}
        self._lock = threading.Lock()

    def rounds(self, job: str) -> list[int]:
        now = time.monotonic()
        with self._lock:
            listed = self._listed.get(job)
        if listed is not None and now - listed[0] < self.list_ttl_s:
            return listed[1]
        rounds = self.store.list_rounds(job)
        with self._lock:
            self._listed[job] = (now, rounds)
        return rounds

    def get(self, job: str, round_: int, refresh: bool = False) -> RoundManifest:
        with self._lock:
            cached = self._cache.get((job, round_))
        if cached is not None and not refresh:
            return cached
        manifest = self.store.get_manifest(job, round_)
        with self._lock:
            self._cache[(job, round_)] = manifest
        return manifest


@dataclass
class JobMeta:
    """A job's metadata across rounds: the ``meta`` shard."""

    spec: JobSpec
    rounds: dict[int, dict[str, ClientRound]] = field(default_factory=dict)
    loaded_at: float = field(default_factory=time.monotonic)

    @property
    def nbytes(self) -> int:
        return 512 + sum(256 * len(r) for r in self.rounds.values())

    @property
    def clients(self) -> list[str]:
        return sorted({c for rows in self.rounds.values() for c in rows})

    @property
    def latest_round(self) -> int:
        return max(self.rounds) if self.rounds else -1

    def history(self, client: str) -> list[ClientRound]:
        return [rows[client] for r, rows in sorted(self.rounds.items()) if client in rows]


def load_meta(reader: ManifestReader, job: str, known: JobMeta | None = None) -> JobMeta:
    """The job's meta shard, reading only rounds ``known`` does not have yet."""
    spec = reader.store.get_job_spec(job)
    meta = JobMeta(spec, dict(known.rounds) if known else {})
    for r in reader.rounds(job):
        if r not in meta.rounds:
            meta.rounds[r] = rows_of(reader.get(job, r))
    meta.loaded_at = time.monotonic()
    return meta


@dataclass
class ClientHistory:
    """One client's rows across rounds: the ``client`` shard."""

    job: str
    client: str
    rows: list[ClientRound]
    loaded_at: float = field(default_factory=time.monotonic)

    @property
    def nbytes(self) -> int:
        return 256 + 256 * len(self.rows)


def load_client(reader: ManifestReader, job: str, client: str) -> ClientHistory:
    """A client's history from every committed round's manifest (manifests are shared)."""
    rows = []
    for r in reader.rounds(job):
        manifest = reader.get(job, r)
        entry = manifest.updates.get(client)
        if entry is not None:
            rows.append(
                ClientRound(r, entry.num_examples, dict(entry.metrics), dict(entry.summary))
            )
    if not rows and not reader.store.job_exists(job):
        raise NotFoundError(f"unknown job {job!r}")
    return ClientHistory(job, client, rows)


@dataclass
class GlobalModels:
    """The job's global models by round (the ``model`` shard), the latest ``keep`` of them."""

    job: str
    store: ObjectStore
    context: JobContext
    keep: int = 2
    specs: dict[int, tuple[TensorSpec, ...]] = field(default_factory=dict)
    vectors: dict[int, npt.NDArray[np.float32]] = field(default_factory=dict)
    modules: dict[int, Any] = field(default_factory=dict)  # built torch models, by round

    @property
    def nbytes(self) -> int:
        # a built model holds its own copy of the weights
        return 1024 + sum(int(v.nbytes) for v in self.vectors.values()) * 2

    def module(self, round_: int) -> Any:
        """The global model after ``round_`` as a runnable torch module (built once)."""
        if round_ not in self.modules:
            from flstore_core import models

            vector, specs = self.get(round_)
            built = models.build(self.context.model_name())
            self.modules[round_] = models.load_vector(built, vector, specs)
        return self.modules[round_]

    def latest_round(self) -> int:
        """The latest round that has a stored global model; 404 if none has."""
        rounds = self.store.list_global_rounds(self.job)
        if not rounds:
            raise NotFoundError(f"job {self.job!r} has no stored global model yet")
        return rounds[-1]

    def get(self, round_: int) -> tuple[npt.NDArray[np.float32], tuple[TensorSpec, ...]]:
        """The global model after ``round_`` as a weights vector (loaded on demand)."""
        if round_ not in self.vectors:
            update = self.store.get_global(self.job, round_)
            self.specs[round_] = tuple(update.specs())
            self.vectors[round_] = flatten(update.tensors)
            for old in sorted(self.vectors)[: -self.keep]:
                del self.vectors[old], self.specs[old]
                self.modules.pop(old, None)
        return self.vectors[round_], self.specs[round_]
