"""Shards of the ``meta``, ``client`` and ``model`` classes, and how a node loads them.

* ``meta`` (``job/meta/meta``): the job spec and, per committed round, every client's
  ``num_examples``, metrics and summaries, read from the round manifests (small JSON; never a
  tensor). Always kept; refreshed incrementally when rounds are committed or a committed
  round's manifest is rewritten (a late client, a backfill: :class:`ManifestReader` keeps each
  manifest with its version).
* ``client`` (``job/client/{id}``): one client's history across rounds (the same per-round
  rows, restricted to the client). Client workloads (``reputation``, ``incentive``) are answered
  from the meta shard, which holds every client's rows (:meth:`JobMeta.history`; a deviation
  from ARCHITECTURE §3's client shards, see docs/ARCHITECTURE.md), so requests never read these
  shards; a node still loads one when asked. Each row carries its round's :class:`RoundTotals`
  (sums over *every* participant of the round, from the same manifest), so a request for some
  clients still computes shares of the whole round.
* ``model`` (``job/model/global``): the job's global models, the latest ones kept.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from flstore_core.cache.memo import ResultMemo
from flstore_core.cache.meta_rows import (
    ClientIds,
    ClientRound,
    RoundRows,
    RoundTotals,
    round_rows,
)
from flstore_core.cache.round_data import JobContext
from flstore_core.data import layout
from flstore_core.data.codec import TensorSpec
from flstore_core.data.manifest import JobSpec, RoundManifest
from flstore_core.data.rows import flatten
from flstore_core.errors import FLStoreError, NotFoundError
from flstore_core.storage.jobs import stored_version
from flstore_core.storage.object_store import ObjectStore

__all__ = [
    "ClientHistory",
    "ClientRound",
    "GlobalModels",
    "JobMeta",
    "ManifestReader",
    "RoundTotals",
    "load_client",
    "load_meta",
    "rows_of",
]

log = logging.getLogger(__name__)


def rows_of(manifest: RoundManifest) -> RoundRows:
    """A round's rows from its manifest (client ids shared with no other round)."""
    return round_rows(manifest, ClientIds())


# client entries of one job's manifests a reader keeps when a meta shard's load reads them (a
# short job's are all kept, for its client shards and round loads to reuse): ~4 MB
MANIFEST_ROWS_KEPT = 4096


class ManifestReader:
    """Round manifests, each read once per version, and a job's rounds listed at most every
    ``list_ttl_s`` seconds (0 lists on every call).

    A committed manifest is rewritten when a late client joins its round or a backfill
    recomputes its summaries, so a cached copy is kept with its version tag (the object's ETag,
    :meth:`ObjectStore.manifest_versions`) and checked against every listing: the listing is
    the one LIST that finding a job's rounds costs anyway, so a cache that lists only at its
    refresh points (a node's ``load``, its ``REFRESH_S`` interval; the router's
    ``ROUNDS_TTL_S``) pays nothing per request, and a stale copy lives at most until the next
    refresh point. Each listing that finds a rewritten manifest bumps the job's
    :meth:`generation`, which shards built from older manifests compare with theirs.
    """

    def __init__(self, store: ObjectStore, list_ttl_s: float = 0.0) -> None:
        self.store = store
        self.list_ttl_s = list_ttl_s
        # (job, round) -> (the version the copy was read at, "" if unknown; the manifest)
        self._cache: dict[tuple[str, int], tuple[str, RoundManifest]] = {}
        self._listed: dict[str, tuple[float, dict[int, str]]] = {}
        self._generation: dict[str, int] = {}
        self._checked: dict[tuple[str, int], float] = {}  # when current() last checked a copy
        self._lock = threading.Lock()

    def rounds(self, job: str) -> list[int]:
        """The job's committed rounds, ascending; a new listing drops every cached manifest of
        the job whose version it does not match (read again on the next :meth:`get`)."""
        now = time.monotonic()
        with self._lock:
            listed = self._listed.get(job)
        if listed is not None and now - listed[0] < self.list_ttl_s:
            return list(listed[1])
        versions = self.store.manifest_versions(job)
        with self._lock:
            before = self._listed.get(job)
            self._listed[job] = (now, versions)
            stale = [
                key
                for key, (version, _) in self._cache.items()
                if key[0] == job and versions.get(key[1]) != version
            ]
            for key in stale:
                del self._cache[key]
            # a manifest rewritten since the last listing, whether or not a copy is cached
            # (the meta shard keeps rows, not manifests)
            rewritten = before is not None and any(
                before[1].get(r, v) != v for r, v in versions.items()
            )
            if stale or rewritten:
                self._generation[job] = self._generation.get(job, 0) + 1
        return list(versions)

    def get(self, job: str, round_: int, refresh: bool = False) -> RoundManifest:
        """The round's manifest: the cached copy unless ``refresh`` (or a listing found it
        rewritten), else read from the store."""
        with self._lock:
            cached = self._cache.get((job, round_))
            listed = self._listed.get(job)
        if cached is not None and not refresh:
            return cached[1]
        # the version known *before* the read: a rewrite between the listing and the read
        # leaves the copy tagged older than it is, which costs one extra read, never staleness
        version = listed[1].get(round_, "") if listed is not None else ""
        manifest = self.store.get_manifest(job, round_)
        with self._lock:
            self._cache[(job, round_)] = (version, manifest)
        return manifest

    def current(self, job: str, round_: int, max_age_s: float) -> RoundManifest:
        """The round's manifest, its version checked against the stored object at most every
        ``max_age_s`` seconds with one HEAD of that manifest (not a LIST of the job, whose cost
        grows with every update object under it): what a request path uses to see a rewritten
        manifest (a late client, a backfill) within ``max_age_s``; 404 if not committed."""
        now = time.monotonic()
        key = (job, round_)
        with self._lock:
            cached = self._cache.get(key)
            checked = self._checked.get(key)
        if cached is not None and checked is not None and now - checked < max_age_s:
            return cached[1]
        version = stored_version(self.store.stat(layout.manifest_key(job, round_)))
        if cached is not None and version and cached[0] == version:
            with self._lock:
                self._checked[key] = now
            return cached[1]
        manifest = self.store.get_manifest(job, round_)  # 404 when not committed
        with self._lock:
            if cached is not None:
                self._generation[job] = self._generation.get(job, 0) + 1
            self._cache[key] = (version, manifest)
            self._checked[key] = now
        return manifest

    def listed(self, job: str) -> dict[int, str]:
        """Each round's version as the job's last listing (:meth:`rounds`) gave it."""
        with self._lock:
            listed = self._listed.get(job)
        return dict(listed[1]) if listed is not None else {}

    def fetch(self, job: str, round_: int) -> RoundManifest:
        """The round's manifest, as :meth:`get`, but kept only while the job's kept manifests
        hold at most :data:`MANIFEST_ROWS_KEPT` client entries: a meta shard keeps its rows,
        not the parsed manifests of a long job (~1 KB a client entry: 2,000 rounds of 100
        clients were ~200 MB)."""
        with self._lock:
            cached = self._cache.get((job, round_))
        if cached is not None:
            return cached[1]
        manifest = self.store.get_manifest(job, round_)
        if len(manifest.updates) <= MANIFEST_ROWS_KEPT:
            version = self.listed(job).get(round_, "")
            with self._lock:  # counted with the insert: concurrent loads keep the cap too
                kept = sum(len(m.updates) for key, (_, m) in self._cache.items() if key[0] == job)
                if kept + len(manifest.updates) <= MANIFEST_ROWS_KEPT:
                    self._cache[(job, round_)] = (version, manifest)
        return manifest

    def version(self, job: str, round_: int) -> str:
        """The version tag of the cached copy of the round's manifest ("" if none or unknown)."""
        with self._lock:
            cached = self._cache.get((job, round_))
        return cached[0] if cached is not None else ""

    def generation(self, job: str) -> int:
        """How many listings so far found a rewritten manifest of ``job`` (0 if none did)."""
        with self._lock:
            return self._generation.get(job, 0)

    def forget(self, job: str | None = None) -> None:
        """Drop the cached manifests and listing of ``job`` (of every job if ``None``)."""
        with self._lock:
            jobs = {k[0] for k in self._cache} | set(self._listed)
            for name in jobs if job is None else jobs & {job}:
                self._generation[name] = self._generation.get(name, 0) + 1
                self._listed.pop(name, None)
            for key in [k for k in self._cache if job is None or k[0] == job]:
                del self._cache[key]
                self._checked.pop(key, None)


@dataclass
class JobMeta:
    """A job's metadata across rounds: the ``meta`` shard."""

    spec: JobSpec
    rounds: dict[int, Mapping[str, ClientRound]] = field(default_factory=dict)
    loaded_at: float = field(default_factory=time.monotonic)
    # the version of the manifest each round's rows were read from, and the reader's generation
    # of the job when they were (see ManifestReader)
    versions: dict[int, str] = field(default_factory=dict)
    generation: int = 0
    # the versions of the job's spec and validation set when the shard was read (its memo's
    # answers are keyed on them: flstore_core.cache.spec_versions)
    spec_version: str = ""
    # answers of meta and client workloads run on this version of the shard (a refresh builds
    # a new JobMeta, with an empty memo)
    memo: ResultMemo = field(default_factory=ResultMemo, repr=False, compare=False)
    # the client-id tuples its rounds share, handed on to the shard that refreshes it
    ids: ClientIds = field(default_factory=ClientIds, repr=False, compare=False)
    # rounds read from manifests since the job's rows were last written to S3
    # (flstore_core.cache.meta_snapshot)
    unsnapshotted: int = field(default=0, compare=False)

    @property
    def nbytes(self) -> int:
        """Its rows' columns, each distinct set of client ids once (meta_rows)."""
        return (
            512
            + self.ids.nbytes
            + sum(
                rows.nbytes if isinstance(rows, RoundRows) else 256 * len(rows)
                for rows in self.rounds.values()
            )
        )

    @property
    def clients(self) -> list[str]:
        out: set[str] = set()
        seen: set[int] = set()  # rounds of the same clients share one tuple: read it once
        for rows in self.rounds.values():
            if isinstance(rows, RoundRows):
                if id(rows.clients) in seen:
                    continue
                seen.add(id(rows.clients))
            out.update(rows)
        return sorted(out)

    @property
    def latest_round(self) -> int:
        return max(self.rounds) if self.rounds else -1

    def history(self, client: str) -> list[ClientRound]:
        return self.histories([client])[client]

    def histories(
        self, clients: Sequence[str], rounds: set[int] | None = None
    ) -> dict[str, list[ClientRound]]:
        """Each of ``clients``' rows, in round order (of ``rounds`` only, if given): a round's
        columns read once for all of them (:meth:`RoundRows.pick`)."""
        out: dict[str, list[ClientRound]] = {c: [] for c in clients}
        for r, rows in sorted(self.rounds.items()):
            if rounds is not None and r not in rounds:
                continue
            if isinstance(rows, RoundRows):
                for c, row in rows.pick(clients):
                    out[c].append(row)
            else:
                for c in clients:
                    if c in rows:
                        out[c].append(rows[c])
        return out

    def restricted(self, rounds: Iterable[int]) -> JobMeta:
        """This shard with only the rows of ``rounds``: what a workload spanning those rounds
        computes over. The rows are shared, not copied; the memo is not (answers are kept on
        the whole shard's memo, keyed on the rounds asked)."""
        wanted = set(rounds)
        return JobMeta(
            self.spec,
            {r: rows for r, rows in self.rounds.items() if r in wanted},
            self.loaded_at,
            {r: v for r, v in self.versions.items() if r in wanted},
            self.generation,
            self.spec_version,
            ids=self.ids,
        )


# manifests a meta shard's load reads at once: a 2,000-round job is 2,000 GETs
META_READERS = 16


def load_meta(
    reader: ManifestReader, job: str, known: JobMeta | None = None, spec_version: str = ""
) -> JobMeta:
    """The job's meta shard, rebuilding only the rows of rounds that ``known`` does not have or
    read from another version of their manifest (a late client, a backfill); ``spec_version``
    names the job spec's version it is read at (taken before this read). The manifests to
    read are read :data:`META_READERS` at a time, and only their rows are kept."""
    spec = reader.store.get_job_spec(job)
    rounds = reader.rounds(job)
    versions = reader.listed(job)
    # read right after the listing: a rewrite found by any later listing makes the shard stale
    meta = JobMeta(
        spec,
        generation=reader.generation(job),
        spec_version=spec_version,
        ids=known.ids if known is not None else ClientIds(),
    )
    to_read = []
    for r in rounds:
        version = versions.get(r, "")
        if known is not None and r in known.rounds and version and known.versions.get(r) == version:
            meta.rounds[r] = known.rounds[r]
        else:
            to_read.append(r)
        meta.versions[r] = version
    meta.unsnapshotted = (known.unsnapshotted if known is not None else 0) + len(to_read)
    if to_read:
        # a batch at a time: the executor holds every finished manifest until it is taken, and
        # 2,000 of them at once were ~200 MB
        with ThreadPoolExecutor(min(META_READERS, len(to_read))) as pool:
            for start in range(0, len(to_read), 4 * META_READERS):
                batch = to_read[start : start + 4 * META_READERS]
                read = pool.map(lambda r: reader.fetch(job, r), batch)
                for r, manifest in zip(batch, read, strict=True):
                    meta.rounds[r] = round_rows(manifest, meta.ids)
    meta.rounds = dict(sorted(meta.rounds.items()))
    meta.loaded_at = time.monotonic()
    return meta


@dataclass
class ClientHistory:
    """One client's rows across rounds: the ``client`` shard."""

    job: str
    client: str
    rows: list[ClientRound]
    loaded_at: float = field(default_factory=time.monotonic)
    generation: int = 0  # the reader's generation of the job when the rows were read

    @property
    def nbytes(self) -> int:
        return 256 + 256 * len(self.rows)


def load_client(reader: ManifestReader, job: str, client: str) -> ClientHistory:
    """A client's history from every committed round's manifest (manifests are shared)."""
    rows = []
    rounds = reader.rounds(job)
    generation = reader.generation(job)  # right after the listing, as in load_meta
    for r in rounds:
        manifest = reader.get(job, r)
        entry = manifest.updates.get(client)
        if entry is not None:
            rows.append(
                ClientRound(
                    r,
                    entry.num_examples,
                    dict(entry.metrics),
                    dict(entry.summary),
                    RoundTotals.of(manifest),
                )
            )
    if not rows and not reader.store.job_exists(job):
        raise NotFoundError(f"unknown job {job!r}")
    return ClientHistory(job, client, rows, generation=generation)


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
    # answers of model workloads, keyed with the round of the global model they used
    memo: ResultMemo = field(default_factory=ResultMemo, repr=False, compare=False)
    # how long a listing of the stored global models is used to name the latest one (0: list
    # on every call, as a fresh shard per request does); a node keeps it as long as its meta
    # shard's rows (REFRESH_S) and lists again at every load of the shard (prefetch)
    list_ttl_s: float = 0.0
    _listed: tuple[float, list[int]] | None = field(default=None, repr=False, compare=False)

    @property
    def spec_version(self) -> str:
        """The versions of the job's spec and validation set the shard's context was read at."""
        return self.context.version

    @property
    def nbytes(self) -> int:
        # a built model holds its own copy of the weights
        return 1024 + sum(int(v.nbytes) for v in self.vectors.values()) * 2

    def module(self, round_: int) -> Any:
        """The global model after ``round_`` as a runnable torch module (built once)."""
        if round_ not in self.modules:
            from flstore_core import models

            vector, specs = self.get(round_)
            # every state-dict entry is loaded (strictly): build's random init would be wasted
            built = models.blank(self.context.model_name())
            self.modules[round_] = models.load_vector(built, vector, specs)
        return self.modules[round_]

    def warm(self) -> bool:
        """Name the latest stored global model, read it and build it — what ingestion's
        prefetch does after a round, so that the first ``inference`` on the new model runs
        only its forward pass. Nothing to do (False) for a job without a declared model
        architecture or without a stored global model yet."""
        try:
            self.context.model_name()
            latest = self.latest_round()
            self.module(latest)
        except FLStoreError as exc:  # left to the request, which reports it
            log.info("global models of %s not warmed: %s", self.job, exc)
            return False
        return True

    def latest_round(self) -> int:
        """The latest round that has a stored global model, as listed at most ``list_ttl_s``
        seconds ago; 404 if none has."""
        now = time.monotonic()
        listed = self._listed
        if listed is not None and now - listed[0] < self.list_ttl_s:
            rounds = listed[1]
        else:
            rounds = self.store.list_global_rounds(self.job)
            self._listed = (now, rounds)
        if not rounds:
            raise NotFoundError(f"job {self.job!r} has no stored global model yet")
        return rounds[-1]

    def relist(self) -> None:
        """Forget the listing: the next :meth:`latest_round` lists the stored models again."""
        self._listed = None

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
