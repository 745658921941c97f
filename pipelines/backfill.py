# mypy: disallow-untyped-calls=False
# (Apache Beam's transforms and filesystems are not annotated)
"""Backfill: recompute summaries and contribution scores over historical rounds; re-warm owners.

``flstore backfill --job J [--rounds A:B] [--nodes N]`` and :func:`run_backfill` build one Beam
pipeline over the job's committed rounds (``A:B`` is half-open like a Python slice: ``3:7`` is
rounds 3–6; either end may be left out)::

    Create(rounds) | Spread | RecomputeRounds | RewarmOwners

* **RecomputeRounds** reads each round from S3 (checksums verified) and its base model, and
  rewrites the round manifest's per-client summaries — ``cos_to_mean``, ``update_norm`` and the
  per-round contribution score ``contribution`` (leave-one-out norm gain of the round mean; the
  definitions are in :mod:`flstore_core.workloads.summaries`). The manifests are where
  ``client``-class workloads (``incentive``, ``reputation``) read a client's series, one row per
  round, through the cache's client and meta shards. A manifest whose summaries did not change
  is not rewritten. Rounds ingested before their base model was stored get their delta-based
  scores here.
* A round that cannot be recomputed — a corrupt object, or any exception raised on it — is a
  dead letter (``jobs/{job}/ingest/deadletter/{run-id}.jsonl``, as ingestion writes them,
  named by the round's manifest key) and in :attr:`BackfillSummary.deadletters`; the other
  rounds go on, and ``main`` exits 1.
* **RewarmOwners** asks the owners — under the *current* placement, ``--nodes N`` after the
  cache was resized — of the job's latest ``hot_rounds`` rounds, its meta shard and the client
  shards of every client backfilled to ``load``, so the first request after a resize is warm.

Note that committing goes through ``ObjectStore.commit_round``, which also adopts update objects
stored under a round's prefix but missing from its manifest (e.g. from an ingestion that died
before committing).

Run it without the CLI as ``python -m pipelines.backfill --job J [--rounds A:B] [beam options…]``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import apache_beam as beam

from flstore_core import config as settings
from flstore_core.data import layout
from flstore_core.data.columns import job_columns
from flstore_core.data.manifest import RoundManifest
from flstore_core.data.rows import base_vector, flat_parts
from flstore_core.errors import NotFoundError, ValidationError
from flstore_core.ids import validate_job
from flstore_core.workloads.summaries import (
    BACKFILL_SUMMARIES,
    RoundScores,
    matrix_scores,
    stream_scores,
)
from pipelines.deadletters import DEAD, FileStep, WriteDeadLetters
from pipelines.ingest import beam_options, named, read_deadletters, store_target
from pipelines.metrics import DEADLETTER_PREFIX, counter, run_counters
from pipelines.outputs import TaggedParDo, run_every_branch
from pipelines.prefetch import PrefetchOwners
from pipelines.records import CommittedRound, DeadLetter
from pipelines.runtime import (
    PrefetchTarget,
    ProgressCallback,
    ProgressEvent,
    StoreTarget,
    listen,
    new_run_id,
    release,
    report,
)

if TYPE_CHECKING:
    from flstore_core.routing.router import Router


def parse_rounds(text: str | None) -> tuple[int | None, int | None]:
    """``"A:B"`` → ``(A, B)`` (half-open, either end optional); ``None`` → every round."""
    if text is None or text.strip() in {"", ":"}:
        return None, None
    if ":" not in text:
        raise ValidationError(f"--rounds {text!r}: use A:B (rounds A to B-1), A: or :B")
    lo, hi = text.split(":", 1)
    try:
        start = int(lo) if lo.strip() else None
        stop = int(hi) if hi.strip() else None
    except ValueError:
        raise ValidationError(f"--rounds {text!r}: A and B must be integers") from None
    if (start is not None and start < 0) or (
        stop is not None and start is not None and stop <= start
    ):
        raise ValidationError(f"--rounds {text!r}: need 0 <= A < B")
    return start, stop


def select_rounds(committed: Sequence[int], start: int | None, stop: int | None) -> list[int]:
    return [r for r in committed if (start is None or r >= start) and (stop is None or r < stop)]


@dataclass(frozen=True)
class BackfillConfig:
    run_id: str
    store: StoreTarget
    job: str
    threads: int = 2
    max_round_bytes: int = 1 << 30  # rounds up to this (raw) size are read as one matrix


class RecomputeRoundFn(beam.DoFn):
    """Recompute and commit the summaries of one committed round."""

    def __init__(self, config: BackfillConfig) -> None:
        self.config = config

    def setup(self) -> None:
        self.store = self.config.store.store(max_workers=8)
        self.rounds = counter("rounds_backfilled", self.config.run_id)
        self.manifests = counter("manifests_written", self.config.run_id)
        self.rejected = counter("deadletters", self.config.run_id)

    def process(self, round_: int) -> Iterator[Any]:
        # a round that cannot be recomputed (a corrupt object, or an exception a library
        # raises on it) is a dead letter named by its manifest; the other rounds go on
        job = self.config.job
        step = FileStep(
            self.config.run_id,
            self.rejected,
            "backfill",
            [(layout.manifest_key(job, round_), None)],
            job,
            round_,
        )
        with step:
            committed = self._recompute(job, round_)
        if step.failed:
            yield from step.rejections()
            return
        report(self.config.run_id, ProgressEvent("committed", files=1, detail=f"{job}/{round_}"))
        yield committed

    def _recompute(self, job: str, round_: int) -> CommittedRound:
        manifest = self.store.get_manifest(job, round_)
        scores = self._scores(manifest)
        entries = list(manifest.updates.values())
        # committed summaries are final (past answers read them): a backfill only adds the
        # fields a client's entry lacks, and a recomputed value of an existing one is dropped
        new = {
            client: {k: v for k, v in values.items() if k not in manifest.updates[client].summary}
            for client, values in scores.summaries(BACKFILL_SUMMARIES).items()
            if client in manifest.updates
        }
        puts = self.store.puts
        committed = self.store.commit_round(
            job,
            round_,
            entries,
            summaries=new,
            specs={e.client: manifest.tensors for e in entries},  # no read-back of updates
        )
        written = self.store.puts > puts
        self.rounds.inc()
        if written:
            self.manifests.inc()
        return CommittedRound(
            job, round_, tuple(committed.clients), committed.stored_bytes, written, True
        )

    def _scores(self, manifest: RoundManifest) -> RoundScores:
        job, round_, reference = manifest.job, manifest.round, manifest.tensors
        base = base_vector(self.store.get_base(job, round_), reference)
        # the job's trainable parameters, as the cache node's cosine_select reads them
        columns = job_columns(reference, self.store.get_job_spec(job))
        if manifest.raw_bytes <= self.config.max_round_bytes:
            rm = self.store.read_round(job, round_, manifest=manifest)  # checksums verified
            return matrix_scores(rm.clients, rm.matrix, base, columns, in_place=True)
        clients = manifest.clients

        def load(i: int) -> list[Any]:
            return flat_parts(self.store.get_update(job, round_, clients[i]).tensors, reference)

        return stream_scores(clients, load, reference, base, self.config.threads, columns=columns)

    def teardown(self) -> None:
        self.store.close()


class ReadCommittedFn(beam.DoFn):
    """A committed round's record from its manifest (for re-warming rounds not backfilled)."""

    def __init__(self, config: BackfillConfig) -> None:
        self.config = config

    def setup(self) -> None:
        self.store = self.config.store.store()

    def process(self, round_: int) -> Iterator[CommittedRound]:
        m = self.store.get_manifest(self.config.job, round_)
        yield CommittedRound(m.job, m.round, tuple(m.clients), m.stored_bytes, False, False)

    def teardown(self) -> None:
        self.store.close()


class RecomputeRounds(beam.PTransform[Any, Any]):
    """Outputs ``committed`` (one :class:`CommittedRound` per recomputed round) and ``dead``."""

    def __init__(self, config: BackfillConfig) -> None:
        super().__init__()
        self.config = config

    def expand(self, rounds: Any) -> Any:
        return (
            rounds
            | "Spread" >> beam.Reshuffle()
            | "Recompute" >> TaggedParDo(RecomputeRoundFn(self.config), DEAD, main="committed")
        )


@dataclass
class BackfillSummary:
    run_id: str
    job: str
    rounds: list[int] = field(default_factory=list)
    rounds_backfilled: int = 0
    manifests_written: int = 0
    nodes: int | None = None
    prefetch: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    deadletters: list[DeadLetter] = field(default_factory=list)
    deadletter_keys: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _count(summary: BackfillSummary, counters: dict[str, int], target: StoreTarget) -> None:
    """Fill ``summary`` from the run's counters, and its dead letters from the store."""
    summary.rounds_backfilled = counters.get("rounds_backfilled", 0)
    summary.manifests_written = counters.get("manifests_written", 0)
    summary.prefetch = {
        k: counters.get(f"prefetch_{k}", 0) for k in ("loaded", "already", "failed", "errors")
    }
    summary.deadletter_keys = sorted(named(counters, DEADLETTER_PREFIX))
    if summary.deadletter_keys:
        store = target.store()
        try:
            summary.deadletters = read_deadletters(store, summary.deadletter_keys)
        finally:
            store.close()


def run_backfill(
    job: str,
    rounds: str | tuple[int | None, int | None] | None = None,
    beam_args: Sequence[str] = (),
    s3_endpoint: str | None = None,
    bucket: str | None = None,
    prefetch: Router | PrefetchTarget | None = None,
    nodes: int | None = None,
    progress: ProgressCallback | None = None,
    *,
    max_round_bytes: int = 1 << 30,
) -> BackfillSummary:
    """Recompute the summaries of ``job``'s committed rounds in ``rounds`` (``"A:B"``).

    With ``prefetch`` (a live :class:`Router` or a :class:`PrefetchTarget`) the owners of the
    job's hot rounds, meta and model shards are re-warmed afterwards — with ``nodes`` as the
    cache's node count when it changed.
    """
    job = validate_job(job)
    start, stop = parse_rounds(rounds) if not isinstance(rounds, tuple) else rounds
    endpoint = s3_endpoint or settings.S3_ENDPOINT.get()
    options = beam_options(beam_args, endpoint)
    target = store_target(options, endpoint, bucket)
    store = target.store()
    try:
        if not store.job_exists(job):
            raise NotFoundError(f"unknown job {job!r}")
        committed = store.list_rounds(job)
    finally:
        store.close()
    selected = select_rounds(committed, start, stop)
    if prefetch is not None and not isinstance(prefetch, PrefetchTarget):
        prefetch = PrefetchTarget.from_router(prefetch)
    if prefetch is not None:
        prefetch = prefetch.with_nodes(nodes)
    config = BackfillConfig(new_run_id(), target, job, max_round_bytes=max_round_bytes)
    summary = BackfillSummary(config.run_id, job, selected, nodes=nodes)
    if not selected:
        return summary

    pipeline = beam.Pipeline(options=options)
    outputs = (
        pipeline | "Rounds" >> beam.Create(selected) | "RecomputeRounds" >> RecomputeRounds(config)
    )
    written = outputs[DEAD] | "WriteDeadLetters" >> WriteDeadLetters(config)
    recomputed = outputs.committed
    if prefetch is not None:
        hot = [r for r in committed[-prefetch.hot_rounds :] if r not in selected]
        if hot:
            others = (
                pipeline
                | "HotRounds" >> beam.Create(hot)
                | "ReadHot" >> beam.ParDo(ReadCommittedFn(config))
            )
            recomputed = (recomputed, others) | "AllRounds" >> beam.Flatten()
        recomputed = recomputed | "RewarmOwners" >> PrefetchOwners(prefetch, target, config.run_id)
    run_every_branch(written, recomputed)

    listen(config.run_id, progress)
    try:
        report(config.run_id, ProgressEvent("planned", files=len(selected)))
        t0 = time.perf_counter()
        result = pipeline.run()
        result.wait_until_finish()
        summary.seconds = time.perf_counter() - t0
        try:
            _count(summary, run_counters(result, config.run_id), target)
        finally:
            release(result)
        report(config.run_id, ProgressEvent("done", files=summary.rounds_backfilled))
        return summary
    finally:
        listen(config.run_id, None)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m pipelines.backfill --job J [--rounds A:B] [--nodes N] [beam options…]``."""
    parser = argparse.ArgumentParser(description="Backfill summaries over historical rounds.")
    parser.add_argument("--job", required=True)
    parser.add_argument("--rounds")
    parser.add_argument("--nodes", type=int)
    parser.add_argument("--bucket")
    parser.add_argument("--s3-endpoint", dest="s3_endpoint")
    args, beam_args = parser.parse_known_args(argv)
    prefetch = None
    if os.path.exists(".flstore/local.json"):
        prefetch = PrefetchTarget.from_local_state()
    summary = run_backfill(
        args.job,
        args.rounds,
        beam_args,
        s3_endpoint=args.s3_endpoint,
        bucket=args.bucket,
        prefetch=prefetch,
        nodes=args.nodes,
    )
    json.dump(summary.to_json(), sys.stdout, indent=1)
    print()
    return 1 if summary.deadletters else 0


if __name__ == "__main__":
    raise SystemExit(main())
