"""FLStore sinks: where a wrapped Flower strategy hands each round.

The sink is the one boundary between Flower and storage: :class:`StoreSink` writes through an
:class:`~flstore_core.storage.object_store.ObjectStore`; :class:`RoundWriterSink` writes raw
update files and can run the Beam ingestion on each; any other sink plugs in the same way.
Anything with ``put_round`` is a sink (:class:`FLStoreSink`); one that also has
``put_initial`` stores the job's initial model (:class:`InitialModelSink`).

Nothing here imports flwr: a sink is plain FLStore code.
"""

from __future__ import annotations

import logging
import queue
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, runtime_checkable

import numpy as np

from flstore_core.data.codec import ScratchBuffer, TensorSpec, Update
from flstore_core.data.columns import job_columns
from flstore_core.data.rows import base_vector, flat_parts
from flstore_core.errors import ConflictError, ValidationError
from flstore_core.routing.placement import ShardKey, meta_shard, model_shard, round_shard
from flstore_core.sdk.round_writer import RoundWriter
from flstore_core.workloads.summaries import INGEST_SUMMARIES, stream_scores

if TYPE_CHECKING:
    from flstore_core.data.manifest import UpdateEntry
    from flstore_core.storage.object_store import ObjectStore

__all__ = ["FLStoreSink", "InitialModelSink", "Prefetcher", "RoundWriterSink", "StoreSink"]

log = logging.getLogger(__name__)

T = TypeVar("T")


@runtime_checkable
class FLStoreSink(Protocol):
    """Where a wrapped strategy hands each round: the boundary between Flower and storage.

    ``put_round`` receives the round's client updates (client id → update, each with
    ``num_examples`` and metrics) and the aggregated model, or ``None`` when the strategy
    produced none; it returns once the round is stored (committed, or handed to ingestion).
    """

    def put_round(
        self,
        job: str,
        round: int,
        updates: dict[str, Update],
        global_model: Update | None,
    ) -> None: ...


@runtime_checkable
class InitialModelSink(Protocol):
    """A sink that also stores the job's initial model (the base of round 0's deltas)."""

    def put_initial(self, job: str, update: Update) -> None: ...


class Prefetcher(Protocol):
    """Asks the cache nodes that own some shards to load them now (the router's ``prefetch``)."""

    def prefetch(self, shards: list[ShardKey]) -> dict[str, Any]: ...


def _copied(model: Update) -> Update:
    """A copy of ``model``'s tensors (its caller may change them in place afterwards: a
    state dict's arrays, training on)."""
    return Update({name: np.array(t, copy=True) for name, t in model.tensors.items()})


class RoundWriterSink:
    """A sink that drops each round as raw update files for ingestion (ARCHITECTURE §2).

    It wraps a :class:`~flstore_core.sdk.round_writer.RoundWriter`; give the writer an ``on_round``
    callback (``pipelines.ingest.ingest_on_drop(...)``) to run the Beam ingestion pipeline on
    every round as it ends — storing, summarising, committing and prefetching it — or leave it
    out and ingest the drop folder later with ``flstore ingest``.
    """

    def __init__(self, writer: RoundWriter) -> None:
        self.writer = writer

    def put_initial(self, job: str, update: Update) -> None:
        self._check(job)
        self.writer.write_initial(update)

    def put_round(
        self,
        job: str,
        round: int,
        updates: dict[str, Update],
        global_model: Update | None,
    ) -> None:
        self._check(job)
        self.writer.write_round(round, updates, global_model=global_model)

    def _check(self, job: str) -> None:
        if job != self.writer.job:
            raise ValidationError(f"this sink writes job {self.writer.job!r}, not {job!r}")


class StoreSink:
    """A sink that writes straight to FLStore's object store: a round ends up as the Beam
    ingestion leaves it, without files or a pipeline in between.

    Per round: every update (in parallel), then the global model, then the manifest — with the
    ingest summaries (``cos_to_mean``, ``update_norm``; computed as ingestion computes them, on
    deltas from the round's base, over the job's trainable parameters) — so a reader that sees
    the round committed also finds its global model, the base of the next. Then, given a
    ``prefetch`` target (a :class:`~flstore_core.routing.router.Router`), the cache nodes that
    own the round, the job's meta shard (every client's rows: meta and client workloads) and
    its model shard (which then names this round's global model as the latest) are asked to
    load them, so the first request is warm; warming is best effort (a node that cannot load is
    logged, the round stays stored).

    Parameters
    ----------
    store : ObjectStore
        Where the rounds go.
    prefetch : Prefetcher or None, default None
        Warms the owners of each committed round (``Router.prefetch``); None: rounds load on
        first use.
    summaries : bool, default True
        Write the ingest summaries into each manifest (``reputation`` and ``incentive`` read
        them).
    max_workers : int, default 8
        Updates written in parallel.
    model : str or None, default None
        The registry model the run trains (``digits_cnn``, …): :meth:`put_initial` declares it
        as the job's model, so the model workloads answer without a ``flstore job create``
        first. None: the job keeps the model it declares (a new job declares none).
    validation : (x, y) or None, default None
        The server's held-out set, declared with the model as the job's validation set.
    max_in_flight : int or None, default None
        Rounds a strategy wrapped by :func:`~flstore_core.integrations.flower.with_flstore` may
        hand this sink's background writer before it waits (``put_round`` itself always runs to
        the end: the wrapper calls it off the training loop); 0: inside ``aggregate_train``.
        None: the wrapper's default (2).
    """

    def __init__(
        self,
        store: ObjectStore,
        *,
        prefetch: Prefetcher | None = None,
        summaries: bool = True,
        max_workers: int = 8,
        model: str | None = None,
        validation: tuple[Any, Any] | None = None,
        max_in_flight: int | None = None,
    ) -> None:
        self.store = store
        self.max_in_flight = max_in_flight
        self.prefetch = prefetch
        self.with_summaries = summaries
        self.max_workers = max_workers
        self.model = model
        self.validation = validation
        # at most ``max_workers`` buffers, each the size of the largest update serialized
        self._scratch: queue.SimpleQueue[ScratchBuffer] = queue.SimpleQueue()
        # the model this sink last stored (job, round, model; round -1: the initial model): the
        # next round's base, read from here rather than back from the store
        self._stored_model: tuple[str, int, Update] | None = None
        self.last_round: dict[str, float] = {}
        """The last round :meth:`put_round` stored, and when each of its steps ended (seconds
        from its start): ``updates_s``, ``global_s``, ``summaries_s`` (these three at once),
        ``commit_s``."""

    def put_initial(self, job: str, update: Update) -> None:
        """Store the initial model of a run — refused when the job already holds rounds: a new
        run starts again at round 0 and would merge its clients into the earlier run's rounds."""
        committed = self.store.list_rounds(job)
        if committed:
            raise ConflictError(
                f"job {job!r} already holds rounds {committed[0]}…{committed[-1]} of an earlier "
                "run; a run starts at round 0, so give it a job of its own (in a Flower app: "
                f"--run-config \"flstore-job='{job}-2'\")"
            )
        if self.model is not None:
            self._declare(job)
        self.store.put_initial(job, update)
        self._stored_model = (job, -1, _copied(update))

    def _declare(self, job: str) -> None:
        """Declare the job's model before its first round; a job that already declares it
        (``flstore job create``, the demo) keeps its spec, hyper-parameters included."""
        from flstore_core.sdk.jobs import create_job

        old = self.store.get_job_spec(job) if self.store.job_exists(job) else None
        if old is None or old.model != self.model:
            create_job(
                self.store,
                job,
                model=self.model,
                precision=old.precision if old else "float32",
                hyperparameters=old.hyperparameters if old else None,
                validation=self.validation,
            )
        elif self.validation is not None:
            self.store.put_validation_set(job, *self.validation)

    def put_round(
        self,
        job: str,
        round: int,
        updates: dict[str, Update],
        global_model: Update | None,
    ) -> None:
        if not updates:
            raise ValidationError(f"round {round} of job {job!r} has no updates to store")
        # the summaries read the round in memory, so they are computed while its updates and
        # global model are written: the manifest waits for the longer of the two, not the sum
        self.store.ensure_job(job)  # before either reads the job's spec
        t0 = time.perf_counter()
        done: dict[str, float] = {}

        def timed(what: str, call: Callable[..., T], *args: Any) -> T:
            try:
                return call(*args)
            finally:
                done[what] = max(done.get(what, 0.0), time.perf_counter() - t0)

        with ThreadPoolExecutor(min(self.max_workers, len(updates)) + 2) as pool:
            scores = (
                pool.submit(timed, "summaries_s", self.summaries, job, round, updates)
                if self.with_summaries
                else None
            )
            model = (
                pool.submit(timed, "global_s", self.store.put_global, job, round, global_model)
                if global_model is not None
                else None
            )
            entries = list(
                pool.map(
                    lambda item: timed("updates_s", self._put_update, job, round, *item),
                    updates.items(),
                )
            )
            if model is not None:
                model.result()
                self._stored_model = (job, round, _copied(global_model))  # type: ignore[arg-type]
            summaries = scores.result() if scores is not None else None
        timed("commit_s", lambda: self.store.commit_round(job, round, entries, summaries=summaries))
        self.last_round = {"round": round, **done}
        # Where the store notifies its router of each commit (the local stack's S3 front, an S3
        # event on AWS), the commit alone warms the round and this second warming finds it
        # loaded; it stays for stores that do not notify. It runs off the training loop.
        if self.prefetch is not None:
            self._warm(job, round)

    def summaries(
        self, job: str, round_: int, updates: dict[str, Update]
    ) -> dict[str, dict[str, float]]:
        """The ingest summaries of a round held in memory, as :meth:`put_round` writes them into
        the manifest: the Beam ingestion's two streamed passes, over the updates in memory."""
        clients = sorted(updates)
        base = self._base(job, round_)
        specs: list[TensorSpec] = updates[clients[0]].specs()
        if base is not None and set(base.tensors) == {s.name for s in specs}:
            by_name = {s.name: s for s in specs}
            specs = [by_name[name] for name in base.tensors]  # the base's order, so it fits
        # the job's trainable parameters, as the cache node's cosine_select reads them
        columns = job_columns(specs, self.store.get_job_spec(job))
        # streamed over the updates in place, as the Beam ingestion streams its files: a
        # (clients × parameters) matrix would be a fresh copy of the round (~0.5 GB for
        # ResNet-18 × 10, whose first touch measured 4 s on a loaded host)
        scores = stream_scores(
            clients,
            lambda i: flat_parts(updates[clients[i]].tensors, specs),
            specs,
            base_vector(base, specs),
            columns=columns,
        )
        return scores.summaries(INGEST_SUMMARIES)

    def _base(self, job: str, round_: int) -> Update | None:
        """The round's base: the model this sink stored last when it is that model and the job
        stores float32 (its stored values are then exactly these: a GET and a decode spared),
        else the stored one."""
        kept = self._stored_model
        if (
            kept is not None
            and kept[:2] == (job, round_ - 1)
            and self.store.get_job_spec(job).precision == "float32"
        ):
            return kept[2]
        return self.store.get_base(job, round_)

    def _put_update(self, job: str, round_: int, client: str, update: Update) -> UpdateEntry:
        """Store one update, serialized in a buffer this sink keeps (one per writing thread,
        reused round after round: a fresh ~47 MB buffer per ResNet-18 update costs page faults
        and the kernel's compaction, ~0.1 s each on a loaded host)."""
        try:
            scratch = self._scratch.get_nowait()
        except queue.Empty:
            scratch = ScratchBuffer()
        try:
            return self.store.put_update(job, round_, client, update, scratch=scratch)
        finally:
            self._scratch.put(scratch)

    def _warm(self, job: str, round_: int) -> None:
        assert self.prefetch is not None
        # the round first and on its own: it is what the next request needs
        batches: list[list[ShardKey]] = [
            [round_shard(job, round_)],
            # the meta shard answers meta and client workloads; loading the model shard makes
            # it name this round's global model as the latest
            [meta_shard(job), model_shard(job)],
        ]
        for shards in batches:
            try:
                answers = self.prefetch.prefetch(shards)
            except Exception as exc:  # warming is an optimisation: the round is stored
                log.warning("FLStore: could not warm round %d of job %r: %s", round_, job, exc)
                return
            for node, answer in answers.items():
                problem = answer.get("error") or answer.get("failed") if answer else None
                if problem:
                    log.warning(
                        "FLStore: %s could not load round %d of job %r: %s",
                        node,
                        round_,
                        job,
                        problem,
                    )

    def __repr__(self) -> str:
        return f"StoreSink(bucket={self.store.bucket!r})"
