# mypy: disallow-untyped-calls=False
# (Apache Beam's transforms and filesystems are not annotated)
"""Reading raw update files and validating them from their headers alone, file by file and then
round by round, so that a file is rejected before any of its data is read or stored (the step's
rules are in :mod:`pipelines.transforms`)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import apache_beam as beam
from apache_beam import pvalue
from apache_beam.io import fileio
from apache_beam.io.filesystem import CompressionTypes

from flstore_core.errors import (
    DuplicateClientError,
    MismatchError,
    PrecisionConflictError,
    ValidationError,
)
from flstore_core.sdk.checkpoints import fit_problems
from flstore_core.storage.commit import check_agreement, majority_specs
from pipelines.deadletters import DEAD, FileStep, dead_letter, reject
from pipelines.ingest_config import IngestFn, IngestStep
from pipelines.metrics import counter
from pipelines.outputs import TaggedParDo
from pipelines.records import PlannedUpdate, RawHeader, RoundKey
from pipelines.runtime import ProgressEvent, ensure_job_spec, report
from pipelines.sources import RawFileReader

MODELS = "models"  # the output tag of global and initial model headers


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


class ReadHeaderFn(IngestFn):
    """Header-level checks; update headers keyed by round, model headers aside."""

    def setup(self) -> None:
        self.reader = RawFileReader(self.config.s3_options)
        self.matched = counter("files_matched", self.config.run_id)
        self.rejected = counter("deadletters", self.config.run_id)

    def process(self, readable: Any) -> Iterator[Any]:
        path = str(readable.metadata.path)
        size = int(readable.metadata.size_in_bytes)
        self.matched.inc()
        report(self.config.run_id, ProgressEvent("header", detail=path))
        step = FileStep(
            self.config.run_id, self.rejected, "header", [(path, None)], self.config.job
        )
        with step:
            header = self.reader.header(path, size, self.config.job, self.config.limits)
        if step.failed:
            yield from step.rejections()
            return
        if header.kind == "update":
            yield (header.key, header)
        else:
            yield pvalue.TaggedOutput(MODELS, header)

    def teardown(self) -> None:
        self.reader.close()


class CheckRoundFn(IngestFn):
    """Round-level checks on one ``(job, round)`` group of headers: the job's precision,
    duplicate clients, and agreement of names, shapes and dtypes."""

    def setup(self) -> None:
        self.store = self.config.store.store()
        self.rejected = counter("deadletters", self.config.run_id)

    def process(self, element: tuple[RoundKey, Iterable[RawHeader]]) -> Iterator[Any]:
        (job, round_), group = element
        headers = sorted(group, key=lambda h: h.path)
        every = FileStep(
            self.config.run_id,
            self.rejected,
            "round",
            [(h.path, h.client) for h in headers],
            job,
            round_,
        )
        with every:
            try:
                spec = ensure_job_spec(self.store, job, self.config.precision)
                manifest = self.store.find_manifest(job, round_)
            except ValidationError as exc:
                raise PrecisionConflictError(exc.message) from exc
        if every.failed:
            yield from every.rejections()
            return
        kept: dict[str, RawHeader] = {}
        for client, copies in _by_client(headers).items():
            if len(copies) == 1:
                kept[client] = copies[0]
                continue
            for h in copies:  # no copy wins: which one the client meant is not ours to guess
                others = ", ".join(o.path for o in copies if o is not h)
                err = DuplicateClientError(
                    f"client {client!r} of round {round_} comes twice in this run: also from "
                    f"{others}"
                )
                yield reject(
                    self.config.run_id,
                    self.rejected,
                    dead_letter(err, h.path, "round", job, round_, client),
                )
        # a declared model is the reference before any majority: files that do not load into it
        # are dead letters, and the files that do are not outvoted by them
        for client, h in list(kept.items()):
            step = FileStep(
                self.config.run_id, self.rejected, "round", [(h.path, client)], job, round_
            )
            with step:
                check_fits_model(spec.model, h)
            if step.failed:
                yield from step.rejections()
                del kept[client]
        if manifest is not None:
            reference = manifest.tensors
        else:
            # the commit rule's majority; ties go to the first file by path: ``kept`` is in path
            # order, which stands in for the order the updates were written
            order = {client: f"{i:08d}" for i, client in enumerate(kept)}
            reference = majority_specs({c: h.specs for c, h in kept.items()}, order)
        for client, h in kept.items():
            step = FileStep(
                self.config.run_id, self.rejected, "round", [(h.path, client)], job, round_
            )
            with step:
                check_agreement(reference, h.specs, client)
            if step.failed:
                yield from step.rejections()
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


def check_fits_model(model: str | None, header: RawHeader) -> None:
    """Refuse a file whose tensors do not load into the job's declared registry model (a
    :class:`MismatchError` naming the tensor): committed, it would answer only at query time,
    with an error no re-ingestion could fix."""
    if model is None:
        return
    problems = fit_problems(model, header.specs)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise MismatchError(
            f"{header.path} does not fit job {header.job!r}'s model: {problems[0]}{more}; "
            f"declare the job's model anew (flstore job create {header.job} --model NAME "
            "--force) only if every round was trained with it"
        )


def _by_client(headers: list[RawHeader]) -> dict[str, list[RawHeader]]:
    """The headers of each client, in path order (the clients in order of their first path)."""
    out: dict[str, list[RawHeader]] = {}
    for h in headers:
        assert h.client is not None
        out.setdefault(h.client, []).append(h)
    return out


class ValidateUpdates(IngestStep):
    """Header and round-level validation; outputs ``updates`` (accepted client updates, spread
    over workers), ``models`` (global/initial headers) and ``dead``."""

    def expand(self, files: Any) -> dict[str, Any]:
        headers = files | "ReadHeaders" >> TaggedParDo(
            ReadHeaderFn(self.config), DEAD, MODELS, main="updates"
        )
        checked = (
            headers.updates
            | "GroupByRound" >> beam.GroupByKey()
            | "CheckRounds" >> TaggedParDo(CheckRoundFn(self.config), DEAD, main="planned")
        )
        dead = (headers[DEAD], checked[DEAD]) | "Rejected" >> beam.Flatten()
        updates = checked.planned | "Spread" >> beam.Reshuffle()
        return {"updates": updates, "models": headers[MODELS], "dead": dead}
