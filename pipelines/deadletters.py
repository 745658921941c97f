# mypy: disallow-untyped-calls=False
# (Apache Beam's transforms are not annotated)
"""Dead letters: every file a step rejects, with its reason, instead of a failed run.

A step that rejects a file yields :func:`reject` (counted, reported to the progress listener,
sent to the step's ``dead`` output, tag :data:`DEAD`); :class:`WriteDeadLetters` writes them as
one JSON-lines object per job and run, next to the job's data (:func:`deadletter_key`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import apache_beam as beam
from apache_beam import pvalue

from flstore_core.data import layout
from flstore_core.errors import FLStoreError
from pipelines.ingest_config import IngestFn, IngestStep
from pipelines.metrics import DEADLETTER_PREFIX, counter
from pipelines.records import DeadLetter
from pipelines.runtime import ProgressEvent, report

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
    code and message, an unreadable file is ``unreadable``, anything else ``error``."""
    if isinstance(exc, FLStoreError):
        code, reason = exc.code, exc.message
    elif isinstance(exc, OSError):
        code, reason = "unreadable", f"{type(exc).__name__}: {exc}"
    else:
        code, reason = "error", f"{type(exc).__name__}: {exc}"
    return DeadLetter(file, code, reason, job, round_, client, stage)


def reject(run_id: str, counter: Any, letter: DeadLetter) -> pvalue.TaggedOutput[str, DeadLetter]:
    """Count a rejected file, tell the progress listener, and route it to the dead letters."""
    counter.inc()
    report(run_id, ProgressEvent("deadletter", files=1, detail=letter.file))
    return pvalue.TaggedOutput(DEAD, letter)


class WriteDeadLettersFn(IngestFn):
    """Write one job's dead letters of the run as one object (sorted, so a re-run writes the
    same bytes) and count its key, which is how the run's summary finds it."""

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


class WriteDeadLetters(IngestStep):
    """One JSON-lines object per job and run, next to the job's data."""

    def expand(self, dead: Any) -> Any:
        return (
            dead
            | "KeyByJob" >> beam.Map(lambda d: (d.job or "", d))
            | "GroupByJob" >> beam.GroupByKey()
            | "Write" >> beam.ParDo(WriteDeadLettersFn(self.config))
        )
