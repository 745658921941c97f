# mypy: disallow-untyped-calls=False
# (Apache Beam's transforms and filesystems are not annotated)
"""Committing rounds: the stored updates of each ``(job, round)``, their summaries (two threaded
passes that re-read the files; why, in :mod:`pipelines.transforms`) and the manifest."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from typing import Any

import apache_beam as beam

from flstore_core.data.codec import TensorSpec, parse_safetensors
from flstore_core.data.columns import job_columns
from flstore_core.data.manifest import RoundManifest
from flstore_core.data.rows import base_vector, flat_parts
from flstore_core.storage.commit import in_order
from flstore_core.workloads.summaries import INGEST_SUMMARIES, stream_scores
from pipelines.deadletters import DEAD, FileStep
from pipelines.ingest_config import IngestFn, IngestStep
from pipelines.metrics import COMMITTED_PREFIX, counter
from pipelines.outputs import TaggedParDo
from pipelines.records import CommittedRound, RoundKey, StoredUpdate
from pipelines.runtime import ProgressEvent, report
from pipelines.sources import RawFileReader

MODELS_STORED: RoundKey = ("", -1)  # the grouping key of the run's stored models (no round)


class SummarizeAndCommitFn(IngestFn):
    """Summaries (two passes over the round's files) and the commit of one round."""

    def setup(self) -> None:
        self.store = self.config.store.store()
        self._readers = threading.local()
        self.rounds = counter("rounds_committed", self.config.run_id)
        self.manifests = counter("manifests_written", self.config.run_id)
        self.rejected = counter("deadletters", self.config.run_id)

    def _reader(self) -> RawFileReader:
        # Beam's S3 client keeps one download stream: one reader per summary thread
        reader: RawFileReader | None = getattr(self._readers, "reader", None)
        if reader is None:
            reader = self._readers.reader = RawFileReader(self.config.s3_options)
        return reader

    def process(self, element: tuple[RoundKey, Iterable[Any]]) -> Iterator[Any]:
        (job, round_), group = element
        if (job, round_) == MODELS_STORED:
            return
        stored = sorted(group, key=lambda s: s.client)
        if not stored:
            return
        # the summaries read every file of the round and the commit is the round's: when either
        # fails, every file of the round is a dead letter (stored, not committed) and the run
        # goes on with the other rounds
        step = FileStep(
            self.config.run_id,
            self.rejected,
            "commit",
            [(s.path, s.client) for s in stored],
            job,
            round_,
        )
        with step:
            committed = self._commit(job, round_, stored)
        if step.failed:
            yield from step.rejections()
            return
        report(self.config.run_id, ProgressEvent("committed", detail=f"{job}/{round_}"))
        yield committed

    def _commit(self, job: str, round_: int, stored: list[StoredUpdate]) -> CommittedRound:
        existing = self.store.find_manifest(job, round_)
        # the round's tensors in the job's canonical order (storage.commit), so the summaries
        # stream rows laid out as the manifest's columns will be
        if existing is not None:
            reference = existing.tensors
        else:
            reference = in_order(stored[0].reference, self.store.tensor_order(job))
        summaries = None
        if self.config.summarize and self._needs_summaries(stored, existing):
            summaries = self._summaries(job, round_, stored, existing, reference)
        puts = self.store.puts
        manifest = self.store.commit_round(
            job,
            round_,
            [s.entry for s in stored],
            summaries=summaries,
            specs={s.client: in_order(s.specs, [t.name for t in reference]) for s in stored},
        )
        written = self.store.puts > puts
        self.rounds.inc()
        if written:
            self.manifests.inc()
        counter(f"{COMMITTED_PREFIX}{job}/{round_}", self.config.run_id).inc()
        return CommittedRound(
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
        reference: tuple[TensorSpec, ...],
    ) -> dict[str, dict[str, float]]:
        # clients committed earlier and not in this run belong to the round too: read from S3
        others = sorted(set(existing.updates) - {s.client for s in stored}) if existing else []
        clients = [s.client for s in stored] + others

        def load(i: int) -> list[Any]:
            if i < len(stored):
                # validated when it was stored: parse only
                raw = self._reader().read(stored[i].path)
                tensors = parse_safetensors(raw, self.config.data_limits).tensors
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
            # the job's trainable parameters, as the cache node's cosine_select reads them
            columns=job_columns(reference, self.store.get_job_spec(job)),
        )
        return scores.summaries(INGEST_SUMMARIES)

    def teardown(self) -> None:
        self.store.close()


class CommitRounds(IngestStep):
    """Group stored updates by ``(job, round)``, summarize and commit each round; outputs
    ``committed`` (one :class:`CommittedRound` per round) and ``dead``.

    Input: ``(stored, models)``; ``models`` joins the grouping, under a key of no round
    (:data:`MODELS_STORED`), only so that a run's global and initial models are stored before any
    round looks for its base: a batch ``GroupByKey`` emits nothing before all of its input is in.
    (A side input did the same on FnApiRunner, but Beam's Dask runner recomputes a side input's
    whole upstream inside the consuming task: every header read and model stored twice.)
    """

    def expand(self, inputs: tuple[Any, Any]) -> Any:
        stored, models = inputs
        keyed = stored | "KeyByRound" >> beam.Map(lambda s: (s.key, s))
        barrier = models | "ModelsFirst" >> beam.Map(lambda key: (MODELS_STORED, key))
        return (
            (keyed, barrier)
            | "WithModels" >> beam.Flatten()
            | "GroupByRound" >> beam.GroupByKey()
            | "SummarizeAndCommit"
            >> TaggedParDo(SummarizeAndCommitFn(self.config), DEAD, main="committed")
        )
