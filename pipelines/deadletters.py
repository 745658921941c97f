# mypy: disallow-untyped-calls=False
# (Apache Beam's transforms are not annotated)
"""Dead letters: every file a step rejects, with its reason, instead of a failed run.

A step does each file's work inside a :class:`FileStep`, which turns any exception into the
file's dead letter; a step that rejects a file yields :func:`reject` (counted, reported to the
progress listener, sent to the step's ``dead`` output, tag :data:`DEAD`);
:class:`WriteDeadLetters` writes them as one JSON-lines object per job and run, next to the
job's data (:func:`deadletter_key`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import apache_beam as beam
from apache_beam import pvalue

from flstore_core.data import layout
from flstore_core.errors import FLStoreError
from pipelines.metrics import DEADLETTER_PREFIX, counter
from pipelines.records import DeadLetter
from pipelines.runtime import ProgressEvent, StoreTarget, report

DEAD = "dead"  # the output tag of rejected files


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
    """The dead letter of ``file`` rejected at ``stage`` for ``exc``: FLStore errors keep their
    code and message, an unreadable file is ``unreadable``, anything else ``error``; every
    letter names the exception's type."""
    if isinstance(exc, FLStoreError):
        code, reason = exc.code, exc.message
    elif isinstance(exc, OSError):
        code, reason = "unreadable", f"{type(exc).__name__}: {exc}"
    else:
        code, reason = "error", f"{type(exc).__name__}: {exc}"
    return DeadLetter(file, code, reason, job, round_, client, stage, type(exc).__name__)


def reject(run_id: str, counter: Any, letter: DeadLetter) -> pvalue.TaggedOutput[str, DeadLetter]:
    """Count a rejected file, tell the progress listener, and route it to the dead letters."""
    counter.inc()
    report(run_id, ProgressEvent("deadletter", files=1, detail=letter.file))
    return pvalue.TaggedOutput(DEAD, letter)


@dataclass
class FileStep:
    """One unit of a step's work on ``files`` (``(path, client)`` pairs: one file, or every
    file of a round): any ``Exception`` raised inside ``with`` — an FLStore error, or the
    ``ValueError``, ``MemoryError``, ``RecursionError`` or ``OverflowError`` a hostile file
    provokes in a library — is caught and becomes each file's dead letter
    (:meth:`rejections`), so one file never stops the run. Other ``BaseException`` types
    (``KeyboardInterrupt``, ``SystemExit``) still stop it.

    ::

        step = FileStep(run_id, rejected, "store", [(path, client)], job, round_)
        with step:
            ...
        if step.failed:
            yield from step.rejections()
            return
    """

    run_id: str
    counter: Any
    stage: str
    files: Sequence[tuple[str, str | None]]
    job: str | None = None
    round: int | None = None
    error: Exception | None = None

    def __enter__(self) -> FileStep:
        return self

    def __exit__(self, kind: object, exc: BaseException | None, tb: object) -> bool:
        if isinstance(exc, Exception):
            self.error = exc
            return True
        return False

    @property
    def failed(self) -> bool:
        return self.error is not None

    def rejections(self) -> Iterator[pvalue.TaggedOutput[str, DeadLetter]]:
        """The dead letter of each file, counted and reported (none when nothing failed)."""
        if self.error is None:
            return
        for file, client in self.files:
            letter = dead_letter(self.error, file, self.stage, self.job, self.round, client)
            yield reject(self.run_id, self.counter, letter)


class RunTarget(Protocol):
    """What writing a run's dead letters needs of its config (ingestion's or backfill's)."""

    @property
    def run_id(self) -> str: ...

    @property
    def store(self) -> StoreTarget: ...


class WriteDeadLettersFn(beam.DoFn):
    """Write one job's dead letters of the run as one object (sorted, so a re-run writes the
    same bytes) and count its key, which is how the run's summary finds it."""

    def __init__(self, config: RunTarget) -> None:
        self.config = config

    def setup(self) -> None:
        self.store = self.config.store.store()

    def process(self, element: tuple[str, Iterable[DeadLetter]]) -> Iterator[str]:
        job, letters = element
        ordered = sorted(letters, key=lambda d: (d.file, d.stage, d.code))
        key = deadletter_key(job or None, self.config.run_id)
        body = "".join(d.to_json_line() + "\n" for d in ordered).encode()
        self.store.put_object(key, body, "application/x-ndjson")
        counter(DEADLETTER_PREFIX + key, self.config.run_id).inc(len(ordered))
        yield key

    def teardown(self) -> None:
        self.store.close()


class WriteDeadLetters(beam.PTransform[Any, Any]):
    """One JSON-lines object per job and run, next to the job's data."""

    def __init__(self, config: RunTarget) -> None:
        super().__init__()
        self.config = config

    def expand(self, dead: Any) -> Any:
        return (
            dead
            | "KeyByJob" >> beam.Map(lambda d: (d.job or "", d))
            | "GroupByJob" >> beam.GroupByKey()
            | "Write" >> beam.ParDo(WriteDeadLettersFn(self.config))
        )
