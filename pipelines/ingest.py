# mypy: disallow-untyped-calls=False
# (Apache Beam's transforms and filesystems are not annotated)
"""Ingestion: raw update files → canonical objects, committed rounds, warm cache nodes.

``flstore ingest SRC --job J [--precision bf16] [beam options…]`` and :func:`run_ingest` build
one Beam pipeline (the steps are in :mod:`pipelines.transforms`)::

    ReadRawUpdates | ValidateUpdates | EncodeAndStore | CommitRounds | PrefetchOwners

``SRC`` is a file, a glob, or a directory/prefix (every ``*.safetensors`` under it) on any of
Beam's filesystems: a local directory or ``s3://bucket/prefix`` locally, also ``gs://`` on
Dataflow. The run is offline by default, on Beam's ``FnApiRunner`` with one worker thread per
core; every standard Beam option passes through unchanged, so ``--runner=DataflowRunner``
(``FlinkRunner``, ``SparkRunner``) runs the same pipeline elsewhere.

A run is idempotent and restartable: a second run over the same files stores nothing and
commits the same manifests; a run that dies half-way leaves no visible half-round (a round is
committed only after all its updates are stored) and the next run completes it, skipping the
objects already in place. Files that fail validation are listed with their reason in
``jobs/{job}/ingest/deadletter/{run-id}.jsonl`` and in the returned :class:`IngestSummary`.

Run it without the CLI as ``python -m pipelines.ingest SRC --job J [beam options…]``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from flstore_core import config as settings
from flstore_core.aws import local_credentials_needed
from flstore_core.data.codec import Precision, parse_precision
from flstore_core.ids import validate_job
from flstore_core.storage.object_store import ObjectStore
from pipelines.metrics import run_counters
from pipelines.outputs import run_every_branch
from pipelines.records import DeadLetter
from pipelines.runtime import (
    PrefetchTarget,
    ProgressCallback,
    ProgressEvent,
    StoreTarget,
    beam_s3_options,
    ensure_job_spec,
    listen,
    new_run_id,
    release,
    report,
)
from pipelines.sources import source_pattern
from pipelines.transforms import (
    COMMITTED_PREFIX,
    DEADLETTER_PREFIX,
    CommitRounds,
    EncodeAndStore,
    IngestConfig,
    PrefetchOwners,
    ReadRawUpdates,
    StoreModels,
    ValidateUpdates,
    WriteDeadLetters,
)

if TYPE_CHECKING:
    from flstore_core.routing.router import Router
    from flstore_core.sdk.round_writer import RoundDrop

# each local worker holds an update or two in memory (~100 MB apiece for ResNet-18): cap them
MAX_LOCAL_WORKERS = 8
IN_PROCESS_RUNNERS = {"fnapirunner", "directrunner", "swappingdirectrunner", "bundlebasedrunner"}
# runners Beam ships but does not know by their short name (``--runner=DaskRunner``)
RUNNER_PATHS = {"daskrunner": "apache_beam.runners.dask.dask_runner.DaskRunner"}


# ---------------------------------------------------------------------- options


def _has_flag(args: Sequence[str], name: str) -> bool:
    return any(a == f"--{name}" or a.startswith(f"--{name}=") for a in args)


def beam_options(beam_args: Sequence[str], s3_endpoint: str | None = None) -> PipelineOptions:
    """Beam's options from the pass-through arguments, with FLStore's local defaults added
    only where the caller said nothing.

    * ``--runner=FnApiRunner`` (offline) unless a runner is given, in ``multi_threading`` mode
      with one worker per core up to ``MAX_LOCAL_WORKERS`` (the default ``in_memory`` mode runs
      one bundle at a time);
    * with a custom S3 endpoint (moto), Beam's S3 filesystem points at it too, with the
      local-endpoint credentials when the environment has none (as ``ObjectStore`` does).
    """
    args = list(beam_args)
    if not _has_flag(args, "runner"):
        args.append("--runner=FnApiRunner")
    runner = str(PipelineOptions(args).view_as(StandardOptions).runner or "").lower()
    if runner in RUNNER_PATHS:  # the last --runner is the one Beam takes
        args.append(f"--runner={RUNNER_PATHS[runner]}")
    in_process = runner in IN_PROCESS_RUNNERS
    if in_process and not _has_flag(args, "direct_running_mode"):
        args.append("--direct_running_mode=multi_threading")
        if not _has_flag(args, "direct_num_workers"):
            args.append(f"--direct_num_workers={min(os.cpu_count() or 1, MAX_LOCAL_WORKERS)}")
    if s3_endpoint and not _has_flag(args, "s3_endpoint_url"):
        args.append(f"--s3_endpoint_url={s3_endpoint}")
        if not _has_flag(args, "s3_access_key_id") and local_credentials_needed(s3_endpoint):
            args += ["--s3_access_key_id=local", "--s3_secret_access_key=local"]
        if not _has_flag(args, "s3_region_name"):
            args.append(f"--s3_region_name={settings.AWS_REGION.get()}")
    return PipelineOptions(args)


def store_target(
    options: PipelineOptions, s3_endpoint: str | None, bucket: str | None
) -> StoreTarget:
    """Where the run writes: ``bucket``/``s3_endpoint`` or the ``FLSTORE_*`` environment;
    explicit Beam S3 credentials, when given, are the workers' credentials for it too."""
    s3 = beam_s3_options(options)
    return StoreTarget(
        bucket=bucket or settings.BUCKET.get() or "",
        endpoint_url=s3_endpoint,
        access_key_id=s3["s3_access_key_id"],
        secret_access_key=s3["s3_secret_access_key"],
        region_name=s3["s3_region_name"],
    )


# ---------------------------------------------------------------------- the pipeline


def build_ingest(pipeline: beam.Pipeline, config: IngestConfig, pattern: str) -> dict[str, Any]:
    """Add the ingestion steps to ``pipeline``; returns its named outputs."""
    files = pipeline | "ReadRawUpdates" >> ReadRawUpdates(pattern)
    valid = files | "ValidateUpdates" >> ValidateUpdates(config)
    models = valid["models"] | "StoreModels" >> StoreModels(config)
    stored = valid["updates"] | "EncodeAndStore" >> EncodeAndStore(config)
    commits = (stored.stored, models.stored) | "CommitRounds" >> CommitRounds(config)
    committed = commits.committed
    outputs: dict[str, Any] = {"committed": committed, "models": models.stored}
    if config.prefetch is not None:
        outputs["prefetched"] = committed | "PrefetchOwners" >> PrefetchOwners(
            config.prefetch, config.store, config.run_id
        )
    rejected = (valid["dead"], stored.dead, models.dead, commits.dead)
    dead = rejected | "AllRejected" >> beam.Flatten()
    outputs["deadletters"] = dead | "WriteDeadLetters" >> WriteDeadLetters(config)
    run_every_branch(outputs["deadletters"], outputs.get("prefetched", committed))
    return outputs


# ---------------------------------------------------------------------- the summary


@dataclass
class IngestSummary:
    """What one run did (from Beam's metrics, so it is the same on every runner)."""

    run_id: str
    source: str
    pattern: str
    job: str | None
    files: int = 0
    updates_written: int = 0
    updates_already_stored: int = 0
    updates_unchanged: int = 0
    models_written: int = 0
    models_unchanged: int = 0
    raw_bytes: int = 0
    stored_bytes: int = 0
    rounds_committed: int = 0
    manifests_written: int = 0
    committed: list[str] = field(default_factory=list)  # "job/round"
    deadletters: list[DeadLetter] = field(default_factory=list)
    deadletter_keys: list[str] = field(default_factory=list)
    prefetch: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def updates(self) -> int:
        """Client updates now stored (written, found in place, or already committed)."""
        return self.updates_written + self.updates_already_stored + self.updates_unchanged

    @property
    def throughput_mb_s(self) -> float:
        """Raw update bytes per second of wall time, in MB (10⁶ bytes)."""
        return self.raw_bytes / 1e6 / self.seconds if self.seconds > 0 else 0.0

    def reasons(self) -> dict[str, int]:
        """Dead letters counted by code."""
        out: dict[str, int] = {}
        for d in self.deadletters:
            out[d.code] = out.get(d.code, 0) + 1
        return dict(sorted(out.items()))

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["deadletters"] = [json.loads(d.to_json_line()) for d in self.deadletters]
        out["updates"] = self.updates
        out["throughput_mb_s"] = round(self.throughput_mb_s, 3)
        return out


def named(counters: dict[str, int], prefix: str) -> list[str]:
    """The names carried by counters ``{prefix}{name}``."""
    return [k[len(prefix) :] for k in counters if k.startswith(prefix)]


def read_deadletters(store: ObjectStore, keys: Sequence[str]) -> list[DeadLetter]:
    out: list[DeadLetter] = []
    for key in sorted(keys):
        for line in store.get_object(key).decode().splitlines():
            if line.strip():
                out.append(DeadLetter.from_json(json.loads(line)))
    return out


def summarize_run(
    result: Any, config: IngestConfig, source: str, pattern: str, seconds: float
) -> IngestSummary:
    counters = run_counters(result, config.run_id)
    summary = IngestSummary(config.run_id, source, pattern, config.job, seconds=seconds)
    for name in (
        "updates_written",
        "updates_already_stored",
        "updates_unchanged",
        "models_written",
        "models_unchanged",
        "raw_bytes",
        "stored_bytes",
        "rounds_committed",
        "manifests_written",
    ):
        setattr(summary, name, counters.get(name, 0))
    summary.files = counters.get("files_matched", 0)
    summary.committed = sorted(
        named(counters, COMMITTED_PREFIX),
        key=lambda s: (s.rsplit("/", 1)[0], int(s.rsplit("/", 1)[1])),
    )
    summary.deadletter_keys = sorted(named(counters, DEADLETTER_PREFIX))
    summary.prefetch = {
        k: counters.get(f"prefetch_{k}", 0) for k in ("loaded", "already", "failed", "errors")
    }
    if summary.deadletter_keys:
        store = config.store.store()
        try:
            summary.deadletters = read_deadletters(store, summary.deadletter_keys)
        finally:
            store.close()
    return summary


# ---------------------------------------------------------------------- entry points


def count_files(pattern: str) -> int:
    """How many files ``pattern`` matches now (for a progress bar's total)."""
    from apache_beam.io.filesystems import FileSystems

    try:
        return len(FileSystems.match([pattern])[0].metadata_list)
    except Exception:  # an empty or unreadable source: the pipeline reports it
        return 0


def run_ingest(
    src: str,
    job: str | None = None,
    precision: str | Precision | None = None,
    beam_args: Sequence[str] = (),
    s3_endpoint: str | None = None,
    bucket: str | None = None,
    prefetch: Router | PrefetchTarget | None = None,
    progress: ProgressCallback | None = None,
    *,
    summarize: bool = True,
) -> IngestSummary:
    """Ingest the raw update files at ``src``; returns when the pipeline has finished.

    ``job`` restricts the run to one job (files naming another job are dead-lettered, files
    naming none are taken as this job's) and declares it — default spec, ``precision`` if
    given — before anything runs. ``prefetch`` (a live :class:`Router`, or a
    :class:`PrefetchTarget`) warms the owning cache nodes after the commits. ``progress``
    receives :class:`ProgressEvent`\\ s while an in-process runner works.
    """
    job = validate_job(job) if job is not None else None
    wanted = parse_precision(precision) if precision is not None else None
    endpoint = s3_endpoint or settings.S3_ENDPOINT.get()
    options = beam_options(beam_args, endpoint)
    target = store_target(options, endpoint, bucket)
    if job is not None:
        store = target.store()
        try:
            ensure_job_spec(store, job, wanted)  # fail before any work on a precision clash
        finally:
            store.close()
    if prefetch is not None and not isinstance(prefetch, PrefetchTarget):
        prefetch = PrefetchTarget.from_router(prefetch)
    config = IngestConfig(
        run_id=new_run_id(),
        store=target,
        s3_options=beam_s3_options(options),
        job=job,
        precision=wanted,
        prefetch=prefetch,
        summarize=summarize,
    )
    pattern = source_pattern(src)
    pipeline = beam.Pipeline(options=options)  # also points Beam's filesystems at S3 options
    build_ingest(pipeline, config, pattern)
    listen(config.run_id, progress)
    try:
        if progress is not None:
            report(config.run_id, ProgressEvent("planned", files=count_files(pattern)))
        t0 = time.perf_counter()
        result = pipeline.run()
        result.wait_until_finish()
        seconds = time.perf_counter() - t0
        try:
            summary = summarize_run(result, config, src, pattern, seconds)
        finally:
            release(result)
        report(config.run_id, ProgressEvent("done", files=summary.files))
        return summary
    finally:
        listen(config.run_id, None)


def ingest_on_drop(**kwargs: Any) -> Callable[[RoundDrop], IngestSummary]:
    """A callback for :class:`flstore_core.sdk.round_writer.RoundWriter` (``on_round=``) that
    ingests each dropped round at once; ``kwargs`` go to :func:`run_ingest`."""

    def ingest(drop: RoundDrop) -> IngestSummary:
        return run_ingest(drop.source, job=drop.job, **kwargs)

    return ingest


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m pipelines.ingest SRC [--job J] [--precision P] [beam options…]``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("src")
    parser.add_argument("--job")
    parser.add_argument("--precision")
    parser.add_argument("--bucket")
    parser.add_argument("--s3-endpoint", dest="s3_endpoint")
    parser.add_argument("--no-prefetch", action="store_true")
    args, beam_args = parser.parse_known_args(argv)
    prefetch = None
    if not args.no_prefetch and os.path.exists(".flstore/local.json"):
        prefetch = PrefetchTarget.from_local_state()
    summary = run_ingest(
        args.src,
        job=args.job,
        precision=args.precision,
        beam_args=beam_args,
        s3_endpoint=args.s3_endpoint,
        bucket=args.bucket,
        prefetch=prefetch,
    )
    json.dump(summary.to_json(), sys.stdout, indent=1)
    print()
    return 1 if summary.deadletters else 0


if __name__ == "__main__":
    raise SystemExit(main())
