# mypy: disallow-untyped-calls=False
# (Apache Beam's transforms and filesystems are not annotated)
"""The composite transforms of ingestion, each a labelled step of one sentence:

    ReadRawUpdates | ValidateUpdates | EncodeAndStore | CommitRounds | PrefetchOwners
                                     ╰ StoreModels ──╯  (bases before round summaries)
    … and every step's rejects | WriteDeadLetters

* **ValidateUpdates** reads only headers: ids and metadata, dtypes, truncation, the ``--job``
  claim, then groups by ``(job, round)`` and checks that the round's updates agree on tensor
  names, shapes and dtypes (against the committed manifest when the round already has one, else
  the majority). A mismatched file is rejected *before* it is stored, because a commit takes
  every object under the round's prefix.
* **EncodeAndStore** reads the data, rejects NaN/Inf, encodes with the job's precision and
  writes the canonical object — or skips the PUT when the identical object is already there
  (same size and MD5 ETag; a re-run after a crash) or already committed (same sha256).
* **CommitRounds** groups the stored updates by round, takes the summaries in two threaded
  passes over the round's files (their sum ``S``, then ``x_i·S`` and ``‖x_i‖²``; see
  :mod:`flstore_core.workloads.summaries`), and commits the manifest with them. The passes
  re-read the files rather than ship rows or running sums through the runner: a row is as large
  as a model, and Beam's runners move elements of tens of megabytes slowly (FnApiRunner's
  multi-threaded data plane needed 8 s and 3 GB for four 94 MB sums). A committed round whose
  membership did not change keeps its summaries, so a re-run rewrites nothing.
* **PrefetchOwners** asks the owners of each job's latest ``hot_rounds`` rounds (primary and
  replicas, the router's placement) and of its client and meta shards to ``load``.

Side effects are idempotent: a retried bundle or a re-run finds its objects in place. Clients
(boto3, Beam's S3 IO) are made in ``DoFn.setup``.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import apache_beam as beam
from apache_beam import pvalue
from apache_beam.io import fileio
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.metrics.metric import Metrics

from flstore_core.data import layout
from flstore_core.data.codec import (
    CodecLimits,
    EncodedUpdate,
    Precision,
    TensorSpec,
    Update,
    encode_update,
    first_nonfinite,
    parse_safetensors,
)
from flstore_core.data.manifest import RoundManifest, UpdateEntry
from flstore_core.data.rawfile import check_identity
from flstore_core.data.rows import base_vector, flat_parts
from flstore_core.errors import (
    CorruptUpdateError,
    DuplicateClientError,
    FLStoreError,
    MismatchError,
    NonFiniteError,
    NotFoundError,
    PrecisionConflictError,
    UnavailableError,
    ValidationError,
)
from flstore_core.routing.placement import client_shard, meta_shard, round_shard
from flstore_core.storage.commit import check_agreement, committed_entry, entry_of
from flstore_core.storage.object_store import ObjectStore
from flstore_core.workloads.summaries import INGEST_SUMMARIES, stream_scores
from pipelines.records import (
    CommittedRound,
    DeadLetter,
    PlannedUpdate,
    RawHeader,
    RoundKey,
    StoredState,
    StoredUpdate,
)
from pipelines.runtime import (
    METRICS_NAMESPACE,
    PrefetchTarget,
    ProgressEvent,
    StoreTarget,
    ensure_job_spec,
    report,
)
from pipelines.sources import RawFileReader

# values are checked by the pipeline itself so that NaN/Inf get their own dead-letter code
_LIMITS_NONFINITE_OK = CodecLimits(allow_nonfinite=True)
# Beam string-set metrics lose values across parallel bundles on FnApiRunner (2.77), so the
# names of committed rounds and dead-letter objects travel as counter names instead
COMMITTED_PREFIX = "committed:"
DEADLETTER_PREFIX = "deadletter_object:"
DEAD = "dead"
MODELS = "models"


@dataclass(frozen=True)
class IngestConfig:
    """Everything a worker needs to know about one ingestion run (picklable)."""

    run_id: str
    store: StoreTarget
    s3_options: dict[str, Any]
    job: str | None = None
    precision: Precision | None = None
    prefetch: PrefetchTarget | None = None
    summarize: bool = True
    summary_threads: int = 2
    summary_memory_bytes: int = 1 << 30  # per round being summarized


def deadletter_key(job: str | None, run_id: str) -> str:
    """``jobs/{job}/ingest/deadletter/{run-id}.jsonl`` — next to the job's data; files whose job
    could not be read go to the bucket-level ``ingest/deadletter/{run-id}.jsonl``."""
    base = layout.job_prefix(job) if job else ""
    return f"{base}ingest/deadletter/{run_id}.jsonl"


def dead_letter(
    exc: BaseException,
    file: str,
    stage: str,
    job: str | None = None,
    round_: int | None = None,
    client: str | None = None,
) -> DeadLetter:
    if isinstance(exc, FLStoreError):
        code, reason = exc.code, exc.message
    elif isinstance(exc, OSError):
        code, reason = "unreadable", f"{type(exc).__name__}: {exc}"
    else:
        code, reason = "error", f"{type(exc).__name__}: {exc}"
    return DeadLetter(file, code, reason, job, round_, client, stage)


def counter(name: str) -> Any:
    return Metrics.counter(METRICS_NAMESPACE, name)


def _read_update(reader: RawFileReader, path: str, job: str | None) -> Update:
    """Read and parse a whole raw file; raises the dead-letter reason. Values are checked by
    :func:`_encode` (the codec checks them while serializing; one pass, not two).

    ``job`` (``--job``) stands in for a missing ``job`` field, as in the header check.
    """
    update = parse_safetensors(reader.read(path), _LIMITS_NONFINITE_OK)
    if update.job is None:
        update.job = job
    check_identity(update)
    return update


def _encode(update: Update, precision: Precision) -> EncodedUpdate:
    """Encode, turning the codec's NaN/Inf refusal into its own dead-letter code."""
    try:
        return encode_update(update, precision)
    except CorruptUpdateError:
        bad = first_nonfinite(update.tensors)
        if bad is not None:
            raise NonFiniteError(f"tensor {bad!r} contains NaN or Inf values") from None
        raise


def reject(run_id: str, counter: Any, letter: DeadLetter) -> pvalue.TaggedOutput[str, DeadLetter]:
    """Count a rejected file, tell the progress listener, and route it to the dead letters."""
    counter.inc()
    report(run_id, ProgressEvent("deadletter", files=1, detail=letter.file))
    return pvalue.TaggedOutput(DEAD, letter)


# ---------------------------------------------------------------------- read


class ReadRawUpdates(beam.PTransform[Any, Any]):
    """Match raw update files and open them through Beam's filesystems."""

    def __init__(self, pattern: str) -> None:
        super().__init__()
        self.pattern = pattern

    def expand(self, pbegin: Any) -> Any:
        return (
            pbegin
            | "Match" >> fileio.MatchFiles(self.pattern)
            # spread the (cheap) header reads over workers: the match yields from one element
            | "Spread" >> beam.Reshuffle()
            | "Open" >> fileio.ReadMatches(compression=CompressionTypes.UNCOMPRESSED)
        )


# ---------------------------------------------------------------------- validate


class ReadHeaderFn(beam.DoFn):
    """Header-level checks; update headers keyed by round, model headers aside."""

    def __init__(self, config: IngestConfig) -> None:
        self.config = config

    def setup(self) -> None:
        self.reader = RawFileReader(self.config.s3_options)
        self.matched = counter("files_matched")
        self.rejected = counter("deadletters")

    def process(self, readable: Any) -> Iterator[Any]:
        path = str(readable.metadata.path)
        size = int(readable.metadata.size_in_bytes)
        self.matched.inc()
        report(self.config.run_id, ProgressEvent("header", detail=path))
        try:
            header = self.reader.header(path, size, self.config.job)
        except (FLStoreError, OSError) as exc:
            yield reject(
                self.config.run_id,
                self.rejected,
                dead_letter(exc, path, "header", self.config.job),
            )
            return
        if header.kind == "update":
            yield (header.key, header)
        else:
            yield pvalue.TaggedOutput(MODELS, header)

    def teardown(self) -> None:
        self.reader.close()


def majority_specs(headers: Sequence[RawHeader]) -> tuple[TensorSpec, ...]:
    """The tensor specs most files agree on; on a tie, those of the first file by path."""
    counts: dict[tuple[TensorSpec, ...], int] = {}
    first: dict[tuple[TensorSpec, ...], int] = {}
    for i, h in enumerate(headers):
        counts[h.specs] = counts.get(h.specs, 0) + 1
        first.setdefault(h.specs, i)
    return max(counts, key=lambda s: (counts[s], -first[s]))


class CheckRoundFn(beam.DoFn):
    """Round-level checks on one ``(job, round)`` group of headers: the job's precision,
    duplicate clients, and agreement of names, shapes and dtypes."""

    def __init__(self, config: IngestConfig) -> None:
        self.config = config

    def setup(self) -> None:
        self.store = self.config.store.store()
        self.rejected = counter("deadletters")

    def process(self, element: tuple[RoundKey, Iterable[RawHeader]]) -> Iterator[Any]:
        (job, round_), group = element
        headers = sorted(group, key=lambda h: h.path)
        try:
            spec = ensure_job_spec(self.store, job, self.config.precision)
            manifest = _manifest_or_none(self.store, job, round_)
        except ValidationError as exc:
            clash = PrecisionConflictError(exc.message)
            for h in headers:
                letter = dead_letter(clash, h.path, "round", job, round_, h.client)
                yield reject(self.config.run_id, self.rejected, letter)
            return
        kept: dict[str, RawHeader] = {}
        for h in headers:
            assert h.client is not None
            if h.client in kept:
                err = DuplicateClientError(
                    f"client {h.client!r} of round {round_} also comes from {kept[h.client].path}"
                )
                letter = dead_letter(err, h.path, "round", job, round_, h.client)
                yield reject(self.config.run_id, self.rejected, letter)
            else:
                kept[h.client] = h
        reference = manifest.tensors if manifest else majority_specs(list(kept.values()))
        for client, h in kept.items():
            try:
                check_agreement(reference, h.specs, client)
            except MismatchError as exc:
                letter = dead_letter(exc, h.path, "round", job, round_, client)
                yield reject(self.config.run_id, self.rejected, letter)
                continue
            yield PlannedUpdate(
                path=h.path,
                size=h.size,
                job=job,
                round=round_,
                client=client,
                reference=tuple(reference),
                precision=spec.precision,
                committed=manifest is not None,
            )

    def teardown(self) -> None:
        self.store.close()


class ValidateUpdates(beam.PTransform[Any, Any]):
    """Header and round-level validation; outputs ``updates`` (accepted client updates, spread
    over workers), ``models`` (global/initial headers) and ``dead``."""

    def __init__(self, config: IngestConfig) -> None:
        super().__init__()
        self.config = config

    def expand(self, files: Any) -> dict[str, Any]:
        headers = files | "ReadHeaders" >> beam.ParDo(ReadHeaderFn(self.config)).with_outputs(
            DEAD, MODELS, main="updates"
        )
        checked = (
            headers.updates
            | "GroupByRound" >> beam.GroupByKey()
            | "CheckRounds"
            >> beam.ParDo(CheckRoundFn(self.config)).with_outputs(DEAD, main="planned")
        )
        dead = (headers[DEAD], checked[DEAD]) | "Rejected" >> beam.Flatten()
        updates = checked.planned | "Spread" >> beam.Reshuffle()
        return {"updates": updates, "models": headers[MODELS], "dead": dead}


# ---------------------------------------------------------------------- encode and store


def _manifest_or_none(store: ObjectStore, job: str, round_: int) -> RoundManifest | None:
    try:
        return store.get_manifest(job, round_)
    except NotFoundError:
        return None


def same_object_stored(store: ObjectStore, key: str, data: bytes) -> bool:
    """Whether ``key`` already holds exactly ``data`` (size, then the MD5 ETag of a single-part
    PUT); an unknown ETag form (multipart, SSE-KMS) counts as different, so the PUT happens."""
    try:
        info = store.stat(key)
    except UnavailableError:
        return False
    if info is None or info.size != len(data):
        return False
    return info.etag == hashlib.md5(data, usedforsecurity=False).hexdigest()


class EncodeAndStoreFn(beam.DoFn):
    """Read, check values, encode with the job's precision and store one client update."""

    def __init__(self, config: IngestConfig) -> None:
        self.config = config

    def setup(self) -> None:
        self.reader = RawFileReader(self.config.s3_options)
        self.store = self.config.store.store()
        self.manifests: dict[RoundKey, RoundManifest | None] = {}
        self.counters = {
            n: counter(n)
            for n in (
                "updates_written",
                "updates_already_stored",
                "updates_unchanged",
                "raw_bytes",
                "stored_bytes",
                "deadletters",
            )
        }

    def process(self, p: PlannedUpdate) -> Iterator[Any]:
        try:
            update = _read_update(self.reader, p.path, self.config.job)
            if (update.kind, update.job, update.round, update.client) != (
                "update",
                p.job,
                p.round,
                p.client,
            ):
                raise CorruptUpdateError("the file changed while it was being ingested")
            check_agreement(p.reference, tuple(update.specs()), p.client)
            encoded = _encode(update, p.precision)  # type: ignore[arg-type]
            entry, state = self._store(p, encoded)
        except (FLStoreError, OSError) as exc:
            letter = dead_letter(exc, p.path, "store", p.job, p.round, p.client)
            yield reject(self.config.run_id, self.counters["deadletters"], letter)
            return
        self.counters[f"updates_{state}"].inc()
        self.counters["raw_bytes"].inc(p.size)
        self.counters["stored_bytes"].inc(entry.stored_bytes)
        report(self.config.run_id, ProgressEvent("stored", files=1, bytes=p.size, detail=p.path))
        yield StoredUpdate(
            p.path, p.job, p.round, p.client, entry, p.reference, encoded.specs, state
        )

    def _store(self, p: PlannedUpdate, encoded: EncodedUpdate) -> tuple[UpdateEntry, StoredState]:
        if p.committed:
            if p.key not in self.manifests:
                self.manifests[p.key] = _manifest_or_none(self.store, p.job, p.round)
            old = committed_entry(self.manifests[p.key], p.client, encoded.sha256)
            if old is not None:
                return old, "unchanged"
        key = layout.update_key(p.job, p.round, p.client)
        if same_object_stored(self.store, key, encoded.data):
            return entry_of(p.client, key, encoded), "already_stored"
        return self.store.put_encoded(p.job, p.round, p.client, encoded), "written"

    def teardown(self) -> None:
        self.reader.close()
        self.store.close()


class EncodeAndStore(beam.PTransform[Any, Any]):
    """Outputs ``stored`` (one :class:`StoredUpdate` per update) and ``dead``."""

    def __init__(self, config: IngestConfig) -> None:
        super().__init__()
        self.config = config

    def expand(self, planned: Any) -> Any:
        return planned | "Encode" >> beam.ParDo(EncodeAndStoreFn(self.config)).with_outputs(
            DEAD, main="stored"
        )


# ---------------------------------------------------------------------- models


class StoreModelFn(beam.DoFn):
    """Store a ``global`` or ``initial`` raw file with ``put_global``/``put_initial``, unless
    the identical object is already stored."""

    def __init__(self, config: IngestConfig) -> None:
        self.config = config

    def setup(self) -> None:
        self.reader = RawFileReader(self.config.s3_options)
        self.store = self.config.store.store()
        self.written = counter("models_written")
        self.unchanged = counter("models_unchanged")
        self.rejected = counter("deadletters")

    def process(self, h: RawHeader) -> Iterator[Any]:
        try:
            update = _read_update(self.reader, h.path, self.config.job)
            spec = ensure_job_spec(self.store, h.job, self.config.precision)
            if h.kind == "global":
                assert h.round is not None
                key = layout.global_key(h.job, h.round)
                update.round, update.client, update.kind = h.round, None, "global"
            else:
                key = layout.initial_key(h.job)
                update.round, update.client, update.kind = None, None, "initial"
            update.job = h.job
            data = _encode(update, spec.precision).data
            if same_object_stored(self.store, key, data):
                self.unchanged.inc()
            else:
                if h.kind == "global":
                    assert h.round is not None
                    self.store.put_global(h.job, h.round, update)
                else:
                    self.store.put_initial(h.job, update)
                self.written.inc()
        except (FLStoreError, OSError) as exc:
            letter = dead_letter(exc, h.path, "model", h.job, h.round)
            yield reject(self.config.run_id, self.rejected, letter)
            return
        report(self.config.run_id, ProgressEvent("model", files=1, bytes=h.size, detail=h.path))
        yield key

    def teardown(self) -> None:
        self.reader.close()
        self.store.close()


class StoreModels(beam.PTransform[Any, Any]):
    """Outputs ``stored`` (the keys of the stored models) and ``dead``."""

    def __init__(self, config: IngestConfig) -> None:
        super().__init__()
        self.config = config

    def expand(self, headers: Any) -> Any:
        return headers | "Store" >> beam.ParDo(StoreModelFn(self.config)).with_outputs(
            DEAD, main="stored"
        )


# ---------------------------------------------------------------------- summarize and commit


class SummarizeAndCommitFn(beam.DoFn):
    """Summaries (two passes over the round's files) and the commit of one round."""

    def __init__(self, config: IngestConfig) -> None:
        self.config = config

    def setup(self) -> None:
        self.store = self.config.store.store()
        self._readers = threading.local()
        self.rounds = counter("rounds_committed")
        self.manifests = counter("manifests_written")

    def _reader(self) -> RawFileReader:
        # Beam's S3 client keeps one download stream: one reader per summary thread
        reader: RawFileReader | None = getattr(self._readers, "reader", None)
        if reader is None:
            reader = self._readers.reader = RawFileReader(self.config.s3_options)
        return reader

    def process(
        self, element: tuple[RoundKey, Iterable[StoredUpdate]], models: Any
    ) -> Iterator[CommittedRound]:
        (job, round_), group = element
        stored = sorted(group, key=lambda s: s.client)
        if not stored:
            return
        existing = _manifest_or_none(self.store, job, round_)
        summaries = None
        if self.config.summarize and self._needs_summaries(stored, existing):
            summaries = self._summaries(job, round_, stored, existing)
        puts = self.store.puts
        manifest = self.store.commit_round(
            job,
            round_,
            [s.entry for s in stored],
            summaries=summaries,
            specs={s.client: s.specs for s in stored},
        )
        written = self.store.puts > puts
        self.rounds.inc()
        if written:
            self.manifests.inc()
        counter(f"{COMMITTED_PREFIX}{job}/{round_}").inc()
        report(self.config.run_id, ProgressEvent("committed", detail=f"{job}/{round_}"))
        yield CommittedRound(
            job,
            round_,
            tuple(manifest.clients),
            manifest.stored_bytes,
            written,
            summaries is not None,
        )

    def _needs_summaries(self, stored: list[StoredUpdate], existing: RoundManifest | None) -> bool:
        """Recompute unless the committed round already has every client with summaries: the
        scores depend on the whole round, so a changed membership changes every client's."""
        if existing is None:
            return True
        if {s.client for s in stored} - set(existing.updates):
            return True
        return any(
            name not in e.summary for e in existing.updates.values() for name in INGEST_SUMMARIES
        )

    def _summaries(
        self,
        job: str,
        round_: int,
        stored: list[StoredUpdate],
        existing: RoundManifest | None,
    ) -> dict[str, dict[str, float]]:
        reference = existing.tensors if existing else stored[0].reference
        # clients committed earlier and not in this run belong to the round too: read from S3
        others = sorted(set(existing.updates) - {s.client for s in stored}) if existing else []
        clients = [s.client for s in stored] + others

        def load(i: int) -> list[Any]:
            if i < len(stored):
                # validated when it was stored: parse only
                raw = self._reader().read(stored[i].path)
                tensors = parse_safetensors(raw, _LIMITS_NONFINITE_OK).tensors
            else:
                tensors = self.store.get_update(job, round_, clients[i]).tensors
            return flat_parts(tensors, reference)

        base = base_vector(self.store.get_base(job, round_), reference)
        # one read per update when the round fits the budget (a typical round does), two else
        size = sum(s.entry.raw_bytes for s in stored) + sum(
            existing.updates[c].raw_bytes for c in others if existing
        )
        scores = stream_scores(
            clients,
            load,
            reference,
            base,
            self.config.summary_threads,
            keep=size <= self.config.summary_memory_bytes,
        )
        return scores.summaries(INGEST_SUMMARIES)

    def teardown(self) -> None:
        self.store.close()


class CommitRounds(beam.PTransform[Any, Any]):
    """Group stored updates by ``(job, round)``, summarize and commit each round.

    Input: ``(stored, models)``; ``models`` is a side input only so that a run's global and
    initial models are stored before any round looks for its base.
    """

    def __init__(self, config: IngestConfig) -> None:
        super().__init__()
        self.config = config

    def expand(self, inputs: tuple[Any, Any]) -> Any:
        stored, models = inputs
        return (
            stored
            | "KeyByRound" >> beam.Map(lambda s: (s.key, s))
            | "GroupByRound" >> beam.GroupByKey()
            | "SummarizeAndCommit"
            >> beam.ParDo(SummarizeAndCommitFn(self.config), pvalue.AsList(models))
        )


# ---------------------------------------------------------------------- prefetch


def prefetch_shards(
    job: str, rounds: Iterable[CommittedRound], hot_rounds: int
) -> tuple[list[Any], list[Any]]:
    """``(round shards, other shards)`` to warm for a job after a run: its latest
    ``hot_rounds`` committed rounds, then its meta shard and the client shards of every client
    the run touched (client-class summaries changed for them)."""
    ordered = sorted(rounds, key=lambda r: r.round)
    hot = ordered[-hot_rounds:] if hot_rounds > 0 else []
    clients = sorted({c for r in ordered for c in r.clients})
    return (
        [round_shard(job, r.round) for r in hot],
        [meta_shard(job)] + [client_shard(job, c) for c in clients],
    )


def tally_prefetch(answers: dict[str, Any]) -> dict[str, int]:
    """Counts of what the nodes said to a ``load`` (``loaded``, ``already``, ``failed``, and
    ``errors`` for nodes that answered with an error or not at all)."""
    out = {"loaded": 0, "already": 0, "failed": 0, "errors": 0}
    for payload in answers.values():
        if not isinstance(payload, dict) or "error" in payload:
            out["errors"] += 1
            continue
        out["loaded"] += len(payload.get("loaded", []))
        out["already"] += len(payload.get("already", []))
        out["failed"] += len(payload.get("failed", {}))
    return out


class PrefetchFn(beam.DoFn):
    """Ask the owners of a job's hot shards to load them (placement of the router)."""

    def __init__(self, target: PrefetchTarget, store: StoreTarget, run_id: str) -> None:
        self.target = target
        self.store_target = store
        self.run_id = run_id

    def setup(self) -> None:
        self.store = self.store_target.store()
        self.router = self.target.router(self.store)
        self.counters = {n: counter(f"prefetch_{n}") for n in ("loaded", "already", "failed")}
        self.errors = counter("prefetch_errors")

    def process(self, element: tuple[str, Iterable[CommittedRound]]) -> Iterator[dict[str, Any]]:
        job, rounds = element
        round_shards, other_shards = prefetch_shards(job, rounds, self.target.hot_rounds)
        # round shards first and on their own: a node that does not serve another class yet
        # refuses the whole load call, and the rounds are what the next request needs
        answers = {"round": self.router.prefetch(round_shards) if round_shards else {}}
        answers["other"] = self.router.prefetch(other_shards)
        total = {"loaded": 0, "already": 0, "failed": 0, "errors": 0}
        for part in answers.values():
            for k, v in tally_prefetch(part).items():
                total[k] += v
        for k in ("loaded", "already", "failed"):
            self.counters[k].inc(total[k])
        self.errors.inc(total["errors"])
        report(self.run_id, ProgressEvent("prefetched", detail=job))
        yield {"job": job, **total, "nodes": answers}


class PrefetchOwners(beam.PTransform[Any, Any]):
    """Warm the cache nodes that own what a run committed, one ``load`` per owner and job."""

    def __init__(self, target: PrefetchTarget, store: StoreTarget, run_id: str) -> None:
        super().__init__()
        self.target = target
        self.store = store
        self.run_id = run_id

    def expand(self, committed: Any) -> Any:
        return (
            committed
            | "KeyByJob" >> beam.Map(lambda r: (r.job, r))
            | "GroupByJob" >> beam.GroupByKey()
            | "Load" >> beam.ParDo(PrefetchFn(self.target, self.store, self.run_id))
        )


# ---------------------------------------------------------------------- dead letters


class WriteDeadLettersFn(beam.DoFn):
    def __init__(self, config: IngestConfig) -> None:
        self.config = config

    def setup(self) -> None:
        self.store = self.config.store.store()

    def process(self, element: tuple[str, Iterable[DeadLetter]]) -> Iterator[str]:
        job, letters = element
        ordered = sorted(letters, key=lambda d: (d.file, d.stage, d.code))
        key = deadletter_key(job or None, self.config.run_id)
        body = "".join(d.to_json_line() + "\n" for d in ordered).encode()
        self.store.put_object(key, body, "application/x-ndjson")
        counter(DEADLETTER_PREFIX + key).inc(len(ordered))
        yield key

    def teardown(self) -> None:
        self.store.close()


class WriteDeadLetters(beam.PTransform[Any, Any]):
    """One JSON-lines object per job and run, next to the job's data."""

    def __init__(self, config: IngestConfig) -> None:
        super().__init__()
        self.config = config

    def expand(self, dead: Any) -> Any:
        return (
            dead
            | "KeyByJob" >> beam.Map(lambda d: (d.job or "", d))
            | "GroupByJob" >> beam.GroupByKey()
            | "Write" >> beam.ParDo(WriteDeadLettersFn(self.config))
        )
