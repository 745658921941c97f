# mypy: disallow-untyped-calls=False
# (Apache Beam's transforms are not annotated)
"""What every step of one ingestion run is configured with: :class:`IngestConfig`.

The config is pickled with each step into the job graph, so it holds how to connect
(:class:`~pipelines.runtime.StoreTarget`, S3 options), never a client: the steps make theirs in
``DoFn.setup``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import apache_beam as beam

from flstore_core import config as settings
from flstore_core.data.codec import DEFAULT_LIMITS, CodecLimits, Precision
from pipelines.runtime import PrefetchTarget, StoreTarget


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
    # read where the run is launched (workers get it with the config)
    max_update_bytes: int = field(default_factory=settings.MAX_UPDATE_BYTES.get_int)

    @property
    def limits(self) -> CodecLimits:
        """The caps every raw file of the run is read under."""
        return replace(DEFAULT_LIMITS, max_update_bytes=self.max_update_bytes)

    @property
    def data_limits(self) -> CodecLimits:
        """The caps of an accepted file's data: the pipeline checks values itself, so that
        NaN/Inf get their own dead-letter code."""
        return replace(self.limits, allow_nonfinite=True)


class IngestStep(beam.PTransform[Any, Any]):
    """A composite step of ingestion, configured by the run's :class:`IngestConfig`."""

    def __init__(self, config: IngestConfig) -> None:
        super().__init__()
        self.config = config


class IngestFn(beam.DoFn):
    """A DoFn of ingestion: carries the run's :class:`IngestConfig` to the worker, where
    ``setup`` makes the clients it needs."""

    def __init__(self, config: IngestConfig) -> None:
        self.config = config
