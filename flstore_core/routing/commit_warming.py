"""Commit-driven warming: a round is warmed because its manifest was written, whoever wrote it.

A round becomes visible when its manifest ``jobs/{job}/rounds/{round:08d}/manifest.json`` is
written (ARCHITECTURE §2), by ingestion, the SDK's ``commit_round``, the Flower sink or a
backfill alike. On AWS the bucket notifies the router function of every such write (an S3
event notification on ``jobs/`` … ``manifest.json``); locally the stack's S3 endpoint sends the
same event (:mod:`lambdas.local_runtime.s3_notifications`). :class:`CommitWarmer` turns those
events into the work ingestion's prefetch does for a run (``pipelines/prefetch.py``), in the
order a request needs it:

1. the round's owners ``load`` it (``Router.prefetch(artifacts=False)``): its rows (those
   staged before the commit taken as they are, :mod:`flstore_core.routing.update_staging`), its
   Gram and distances, and on its primary the default aggregate models (FedAvg) — then the
   round's **warm marker** is written: requests for it are answered from memory from here on;
2. the round's model artifacts (per-client accuracies, the leave-one-out subsets: 8-20 s a
   node for a ResNet-18 × 10 round) are built in invocations of at most
   :data:`ARTIFACT_CHUNK_S` seconds of work each, the owners taking turns
   (``Router.prefetch_artifacts``), so a request finds an owner free or waits one chunk — a
   node runs one invocation at a time and keeps no thread working after it answered. They
   start :data:`REQUESTS_FIRST_S` after the marker: that second is left to the requests the
   marker lets in (the router function's invocation waits it out, billed). The marker is then
   written again with ``artifacts_at``: when they finished;
3. the job's meta and model shards are loaded so they know the new round (last: loading the
   model shard reads the newest global model, 47 MB, on every owner at once, and a request
   for the round would wait for it; a request that needs them first loads them itself).

* **Keys.** Only manifest keys are warmed; any other key is ignored, and a key that ends in
  ``manifest.json`` without being a canonical manifest key is refused with a log line. One bad
  record never stops the others.
* **Order.** Records are warmed job by job in round order; of one job's rounds in an event only
  the latest ``hot_rounds`` are warmed, as ingestion's prefetch warms only those of a run.
* **Idempotent.** S3 delivers an event at least once and in no guaranteed order, and other
  writers (the Flower sink, Beam) may warm the same round themselves. A round warmed at a
  manifest version gets a marker ``jobs/{job}/warm/{round:08d}.json`` holding the manifest's
  ETag; an event for a round whose *current* manifest (a HEAD, not the event's ETag, so a late
  event for an older version changes nothing) has a marker at that ETag warms nothing. The
  marker lives in the bucket, so every router instance sees it. Two events running at the
  same moment may both warm; the nodes make the second cheap: a cache node answers ``load``
  of a round it holds at that manifest version as ``already`` without reading S3 again, and
  keeps the round's artifacts once computed.
* **Visible.** The marker records when the round was committed (the event's time), when it
  became warm and when its model artifacts were built; :func:`warm_times` reads them for
  ``flstore stats``. A marker at the current manifest without ``artifacts_at`` (an invocation
  that ended during step 3) is not ``already``: a redelivered event loads nothing again (the
  owners answer ``already``) and resumes the artifacts, the chunks done being memo lookups.
* **Retried.** A round that could not be warmed gets no marker and fails the invocation
  (:class:`~flstore_core.errors.UnavailableError`), so Lambda's asynchronous retry delivers the
  event again; the rounds already warmed are then skipped by their markers.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol
from urllib.parse import unquote_plus

from flstore_core import config
from flstore_core.data import layout
from flstore_core.errors import FLStoreError, UnavailableError, ValidationError
from flstore_core.ids import validate_job, validate_round
from flstore_core.routing.placement import ShardKey, meta_shard, model_shard, round_shard
from flstore_core.storage.blobs import BlobInfo
from flstore_core.storage.object_store import ObjectStore

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
#: where a job's warm markers live: the only prefix the router function writes besides results
WARM_DIR = "warm/"


#: seconds of model-artifact work in one node invocation after a commit (a request waits one)
ARTIFACT_CHUNK_S = 0.5
#: seconds after a round's marker left to the requests it lets in before the artifacts start
#: (they come right after a commit: a selection, an aggregate for the next round)
REQUESTS_FIRST_S = 1.0


class Prefetcher(Protocol):
    """What warms shards: :meth:`flstore_core.routing.router.Router.prefetch` and
    :meth:`~flstore_core.routing.router.Router.prefetch_artifacts`."""

    def prefetch(self, shards: list[ShardKey], artifacts: bool = True) -> dict[str, Any]: ...

    def prefetch_artifacts(
        self, shards: list[ShardKey], chunk_s: float, total_s: float
    ) -> dict[str, Any]: ...


@dataclass(frozen=True, order=True)
class CommittedManifest:
    """One record of a notification: the manifest of ``round`` of ``job`` was written."""

    job: str
    round: int
    # the event's time of the write (ISO 8601), its ETag and sequencer, as S3 sent them
    event_time: str = ""
    etag: str = ""
    sequencer: str = ""
    # set when an earlier event's marker said the round was warm already at this manifest
    warmed_at: str = ""
    warm_ms: float = 0.0


def warm_markers_prefix(job: str) -> str:
    """``jobs/{job}/warm/``: the prefix of a job's warm markers."""
    return layout.job_prefix(job) + WARM_DIR


def warm_marker_key(job: str, round_: int) -> str:
    """``jobs/{job}/warm/{round:08d}.json``: when the round was warmed, at which manifest."""
    return f"{warm_markers_prefix(job)}{validate_round(round_):08d}.json"


def parse_manifest_key(key: str) -> tuple[str, int] | None:
    """``(job, round)`` of a manifest key, ``None`` for a key that is not a manifest's; a key
    ending in ``manifest.json`` that is not a canonical manifest key is a
    :class:`ValidationError`."""
    if not key.endswith(MANIFEST_NAME):
        return None
    parts = key.split("/")
    if len(parts) != 5 or parts[0] != "jobs" or parts[2] != "rounds" or parts[4] != MANIFEST_NAME:
        raise ValidationError(f"{key!r} is not jobs/{{job}}/rounds/{{round:08d}}/manifest.json")
    round_text = parts[3]
    if len(round_text) != 8 or not round_text.isdigit():
        raise ValidationError(f"{key!r}: the round is not 8 digits")
    job, round_ = validate_job(parts[1]), int(round_text)
    if layout.manifest_key(job, round_) != key:
        raise ValidationError(
            f"{key!r} is not the canonical key {layout.manifest_key(job, round_)}"
        )
    return job, round_


def is_s3_event(event: Any) -> bool:
    """Whether ``event`` is an S3 event notification (or S3's test event), not an HTTP one."""
    if not isinstance(event, Mapping):
        return False
    if event.get("Event") == "s3:TestEvent":
        return True
    records = event.get("Records")
    return (
        isinstance(records, list)
        and bool(records)
        and all(isinstance(r, Mapping) and r.get("eventSource") == "aws:s3" for r in records)
    )


@dataclass
class ParsedRecords:
    """The manifests an event names, and what it named besides."""

    manifests: list[CommittedManifest]
    ignored: int  # records of other keys or other events
    rejected: list[str]  # why each malformed record was refused


def parse_records(event: Mapping[str, Any], bucket: str) -> ParsedRecords:
    """The committed manifests of an S3 event's records, in ``(job, round)`` order; any other
    key is ignored and a malformed record is refused (logged), never raised."""
    out = ParsedRecords([], 0, [])
    for index, record in enumerate(event.get("Records") or []):
        try:
            manifest = _parse_record(record, bucket)
        except (FLStoreError, KeyError, TypeError, AttributeError, ValueError) as exc:
            reason = f"record {index}: {exc}"
            log.warning("commit warming: refused %s", reason)
            out.rejected.append(reason)
            continue
        if manifest is None:
            out.ignored += 1
        else:
            out.manifests.append(manifest)
    out.manifests.sort()
    return out


def _parse_record(record: Mapping[str, Any], bucket: str) -> CommittedManifest | None:
    """One record's manifest; ``None`` for another key or event; raises when malformed."""
    if not str(record.get("eventName", "")).startswith("ObjectCreated:"):
        return None
    s3 = record["s3"]
    named = s3["bucket"]["name"]
    if named != bucket:
        raise ValidationError(f"bucket {named!r} is not this stack's bucket {bucket!r}")
    obj = s3["object"]
    # S3 sends keys URL-encoded, a space as '+'
    parsed = parse_manifest_key(unquote_plus(str(obj["key"])))
    if parsed is None:
        return None
    return CommittedManifest(
        parsed[0],
        parsed[1],
        event_time=str(record.get("eventTime", "")),
        etag=str(obj.get("eTag", "")),
        sequencer=str(obj.get("sequencer", "")),
    )


def utc_now() -> str:
    """The time now as ISO 8601 UTC with milliseconds (what a marker records)."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def read_marker(store: ObjectStore, job: str, round_: int) -> dict[str, Any] | None:
    """The warm marker of a round, ``None`` when there is none (or it cannot be read)."""
    data = store.blobs.get(warm_marker_key(job, round_))
    if data is None:
        return None
    try:
        marker = json.loads(bytes(data))
    except ValueError:
        return None  # a marker that is not JSON is as good as none: the round is warmed again
    return marker if isinstance(marker, dict) else None


def warmed_rounds(answers: Mapping[str, Any]) -> set[tuple[str, int]]:
    """``(job, round)`` of every round shard (or column block of one) that some node answered
    as loaded or already held in a prefetch's answers."""
    held: set[tuple[str, int]] = set()
    for payload in answers.values():
        if not isinstance(payload, Mapping) or "error" in payload:
            continue
        for text in [*payload.get("loaded", []), *payload.get("already", [])]:
            try:
                key = ShardKey.parse(text)
            except (ValueError, FLStoreError):
                continue
            if key.cls == "round":
                held.add((key.job, key.round))
    return held


@dataclass
class WarmingReport:
    """What one event did, by ``job/round``."""

    warmed: list[str]
    already: list[str]  # a marker at the current manifest: nothing done
    failed: list[str]
    cold: list[str]  # older than the job's latest hot_rounds in this event: not warmed
    missing: list[str]  # no manifest any more (a deleted job): nothing to warm, no retry
    ignored: int = 0
    rejected: list[str] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The report as the handler answers it."""
        return {
            "warmed": self.warmed,
            "already": self.already,
            "failed": self.failed,
            "cold": self.cold,
            "missing": self.missing,
            "ignored": self.ignored,
            "rejected": self.rejected or [],
        }


class CommitWarmer:
    """Warms the rounds an S3 event's manifests name, once per manifest version.

    Parameters
    ----------
    store : ObjectStore
        The bucket: manifests are HEADed and warm markers read and written there.
    prefetcher : Prefetcher
        What loads shards on their owners (the router).
    hot_rounds : int
        Of one job's rounds in an event, how many of the latest are warmed.
    """

    def __init__(
        self,
        store: ObjectStore,
        prefetcher: Prefetcher,
        hot_rounds: int,
        artifacts_total_s: float = float(config.ARTIFACTS_BUDGET_S.get_int()),
        requests_first_s: float | None = None,
    ) -> None:
        self.store = store
        self.prefetcher = prefetcher
        self.hot_rounds = max(1, hot_rounds)
        self.artifacts_total_s = artifacts_total_s
        self.requests_first_s = REQUESTS_FIRST_S if requests_first_s is None else requests_first_s

    def handle(self, event: Mapping[str, Any]) -> dict[str, Any]:
        """Warm what ``event`` names; the report, or :class:`UnavailableError` (after warming
        every other round) when a round could not be warmed, so the event is delivered again."""
        parsed = parse_records(event, self.store.bucket)
        report = self.warm(parsed.manifests)
        report.ignored, report.rejected = parsed.ignored, parsed.rejected
        if report.failed:
            raise UnavailableError(
                f"could not warm {', '.join(report.failed)}; the notification's retry warms "
                "them (the rounds warmed are skipped by their markers)"
            )
        return report.to_dict()

    def warm(self, manifests: Iterable[CommittedManifest]) -> WarmingReport:
        """Warm each job's rounds in ``manifests``, job by job, in round order."""
        report = WarmingReport([], [], [], [], [])
        by_job: dict[str, dict[int, CommittedManifest]] = {}
        for m in sorted(manifests):
            by_job.setdefault(m.job, {})[m.round] = m  # a duplicate record: the last one
        for job, records in by_job.items():
            rounds = sorted(records)
            report.cold += [f"{job}/{r}" for r in rounds[: -self.hot_rounds]]
            self._warm_job(job, [records[r] for r in rounds[-self.hot_rounds :]], report)
        return report

    def _warm_job(self, job: str, records: list[CommittedManifest], report: WarmingReport) -> None:
        """Warm one job's rounds that have no marker at their current manifest, then its meta
        and model shards; a marker for each round some owner now holds."""
        todo: dict[int, tuple[CommittedManifest, BlobInfo]] = {}
        for record in records:
            name = f"{job}/{record.round}"
            try:
                current = self.store.stat(layout.manifest_key(job, record.round))
                if current is None:  # an event for a manifest no longer there: nothing to do
                    log.warning("commit warming: %s has no manifest; not warmed", name)
                    report.missing.append(name)
                    continue
                marker = read_marker(self.store, job, record.round)
            except FLStoreError as exc:
                log.warning("commit warming: cannot check %s: %s", name, exc)
                report.failed.append(name)
                continue
            if marker is not None and marker.get("manifest_etag") == current.etag:
                if "artifacts_at" in marker:
                    report.already.append(name)
                    continue
                record = _as_marked(record, marker)  # warm already: its artifacts resume
            todo[record.round] = (record, current)
        if not todo:
            return
        t0 = time.perf_counter()
        try:
            answers = self.prefetcher.prefetch(
                [round_shard(job, r) for r in sorted(todo)], artifacts=False
            )
            held = warmed_rounds(answers)
        except Exception as exc:  # a node or the planner failed: the retry warms it
            log.warning("commit warming: prefetch of job %r failed: %s", job, exc)
            report.failed += [f"{job}/{r}" for r in sorted(todo)]
            return
        warm_ms = (time.perf_counter() - t0) * 1000
        # the markers first: a round is warm (its requests answered from memory) once its
        # owners hold it, whatever the job's other shards and its model artifacts still take
        markers: dict[int, dict[str, Any]] = {}
        for round_, (record, current) in sorted(todo.items()):
            name = f"{job}/{round_}"
            if (job, round_) not in held:
                log.warning("commit warming: no owner of %s loaded it: %s", name, answers)
                report.failed.append(name)
                continue
            body = marker_body(record, current, warm_ms)
            body["owners_ms"] = owner_steps(answers, str(round_shard(job, round_)))
            markers[round_] = self._write_marker(body)
            report.warmed.append(name)
        self._build_artifacts(job, markers)
        self._warm_job_shards(job)

    def _build_artifacts(self, job: str, markers: dict[int, dict[str, Any]]) -> None:
        """The model artifacts of the rounds just marked warm, in bounded chunks; each marker
        then written again with when they finished (a failure is left to the requests, and a
        redelivered event resumes it)."""
        if not markers:
            return
        t0 = time.perf_counter()
        time.sleep(self.requests_first_s)  # the nodes to the requests the marker let in
        try:
            answers = self.prefetcher.prefetch_artifacts(
                [round_shard(job, r) for r in sorted(markers)],
                ARTIFACT_CHUNK_S,
                self.artifacts_total_s,
            )
        except Exception as exc:
            log.warning("commit warming: model artifacts of job %r not built: %s", job, exc)
            return
        chunks = sum(a.get("chunks", 0) for a in answers.values() if isinstance(a, dict))
        for round_, body in sorted(markers.items()):
            deferred = _deferred(answers, str(round_shard(job, round_)))
            body.update(
                artifacts_at=utc_now(),
                artifacts_ms=round((time.perf_counter() - t0) * 1000, 1),
                artifacts_chunks=chunks,
                artifacts_deferred=deferred,
            )
            self._write_marker(body)

    def _warm_job_shards(self, job: str) -> None:
        """Load the job's meta shard (every client's rows) and model shard (which then names
        the new round's global model as the latest); a failure is left to the first request."""
        try:
            self.prefetcher.prefetch([meta_shard(job), model_shard(job)], artifacts=False)
        except Exception as exc:
            log.warning("commit warming: job %r's meta and model shards not warmed: %s", job, exc)

    def _write_marker(self, body: dict[str, Any]) -> dict[str, Any]:
        """Write a round's marker (a failure is logged: warm, but a retry warms it again, a
        no-op on the nodes); the body, for a later rewrite."""
        try:
            self.store.blobs.put(
                warm_marker_key(body["job"], body["round"]),
                json.dumps(body).encode(),
                content_type="application/json",
            )
        except FLStoreError as exc:
            log.warning(
                "commit warming: marker of %s/%s not written: %s", body["job"], body["round"], exc
            )
        return body


def marker_body(record: CommittedManifest, manifest: BlobInfo, warm_ms: float) -> dict[str, Any]:
    """That ``record``'s round is warm at the manifest version ``manifest`` (a record read
    from an earlier marker keeps that marker's times, :func:`_as_marked`)."""
    return {
        "job": record.job,
        "round": record.round,
        "manifest_etag": manifest.etag,
        # the event's time of the write (milliseconds), else the manifest's (seconds)
        "committed_at": record.event_time or _iso(manifest.modified),
        "warmed_at": record.warmed_at or utc_now(),
        "warm_ms": record.warm_ms if record.warmed_at else round(warm_ms, 1),
        "sequencer": record.sequencer,
    }


def _as_marked(record: CommittedManifest, marker: Mapping[str, Any]) -> CommittedManifest:
    """``record`` with the commit and warm times of the marker an earlier event wrote."""
    return dataclasses.replace(
        record,
        event_time=str(marker.get("committed_at", record.event_time)),
        warmed_at=str(marker.get("warmed_at", "")),
        warm_ms=float(marker.get("warm_ms") or 0.0),
    )


def owner_steps(answers: Mapping[str, Any], shard: str) -> dict[str, dict[str, float]]:
    """What each owner's ``load`` of ``shard`` cost, step by step (its ``steps_ms``: the
    manifest, the rows — staged ones copied, the others read —, the base, the deltas, the Gram,
    the default models), by function; an owner that held it already has none."""
    out: dict[str, dict[str, float]] = {}
    for function, payload in sorted(answers.items()):
        steps = payload.get("steps_ms", {}).get(shard) if isinstance(payload, dict) else None
        if isinstance(steps, dict):
            out[function] = steps
    return out


def _deferred(answers: Mapping[str, Any], shard: str) -> int:
    """How many of ``shard``'s artifact tasks its owners left to the requests."""
    out = 0
    for payload in answers.values():
        item = payload.get("artifacts", {}).get(shard) if isinstance(payload, dict) else None
        if isinstance(item, dict):
            out += len(item.get("deferred") or [])
    return out


def warm_times(store: ObjectStore, jobs: Iterable[str] | None = None) -> list[dict[str, Any]]:
    """Every warm marker of ``jobs`` (default: every job), in ``(job, round)`` order: when each
    round was committed and became warm, with ``commit_to_warm_ms`` where both are known."""
    out: list[dict[str, Any]] = []
    for job in sorted(store.list_jobs() if jobs is None else jobs):
        for info in store.blobs.list(warm_markers_prefix(job)):
            stem = info.key.rsplit("/", 1)[-1].removesuffix(".json")
            marker = read_marker(store, job, int(stem)) if stem.isdigit() else None
            if marker is None:
                continue
            committed = str(marker.get("committed_at", ""))
            marker["commit_to_warm_ms"] = _between_ms(committed, str(marker.get("warmed_at", "")))
            if "artifacts_at" in marker:
                marker["commit_to_artifacts_ms"] = _between_ms(
                    committed, str(marker["artifacts_at"])
                )
            out.append(marker)
    return out


def _iso(text: str) -> str:
    """A stored object's modification time (``2026-01-02 03:04:05+00:00``) as ISO 8601 UTC."""
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        return ""
    return when.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _between_ms(start: str, end: str) -> float | None:
    """Milliseconds from one ISO 8601 time to another, ``None`` when either is missing."""
    try:
        a = datetime.fromisoformat(start.replace("Z", "+00:00"))
        b = datetime.fromisoformat(end.replace("Z", "+00:00"))
    except ValueError:
        return None
    return round((b - a).total_seconds() * 1000, 1)
