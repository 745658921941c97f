"""FLStore sinks: where a wrapped Flower strategy hands each round.

The sink is the one boundary between Flower and storage: :class:`StoreSink` writes through an
:class:`~flstore_core.storage.object_store.ObjectStore`; :class:`RoundWriterSink` writes raw
update files and can run the Beam ingestion on each; any other sink plugs in the same way.
Anything with ``put_round`` is a sink (:class:`FLStoreSink`); one that also has
``put_initial`` stores the job's initial model (:class:`InitialModelSink`).

Nothing here imports flwr: a sink is plain FLStore code.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from flstore_core.data.codec import Update
from flstore_core.errors import ValidationError
from flstore_core.sdk.round_writer import RoundWriter

if TYPE_CHECKING:
    from flstore_core.storage.object_store import ObjectStore

__all__ = ["FLStoreSink", "InitialModelSink", "RoundWriterSink", "StoreSink"]


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
    """A sink that writes straight to FLStore's object store.

    Per round: every update (in parallel), then the global model, then the manifest — so a
    reader that sees the round committed also finds its global model, the base of the next.
    """

    def __init__(self, store: ObjectStore, *, max_workers: int = 8) -> None:
        self.store = store
        self.max_workers = max_workers

    def put_initial(self, job: str, update: Update) -> None:
        self.store.put_initial(job, update)

    def put_round(
        self,
        job: str,
        round: int,
        updates: dict[str, Update],
        global_model: Update | None,
    ) -> None:
        if not updates:
            raise ValidationError(f"round {round} of job {job!r} has no updates to store")
        with ThreadPoolExecutor(min(self.max_workers, len(updates))) as pool:
            entries = list(
                pool.map(lambda item: self.store.put_update(job, round, *item), updates.items())
            )
        if global_model is not None:
            self.store.put_global(job, round, global_model)
        self.store.commit_round(job, round, entries)

    def __repr__(self) -> str:
        return f"StoreSink(bucket={self.store.bucket!r})"
