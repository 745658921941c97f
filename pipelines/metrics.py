# mypy: disallow-untyped-calls=False
# (Apache Beam's metrics are not annotated)
"""The Beam counters the pipelines count with, in FLStore's metrics namespace.

A run's summary is read back from these counters (:func:`pipelines.ingest.read_counters`), so
it is the same on every runner. Beam string-set metrics lose values across parallel bundles on
FnApiRunner (2.77), so the names of committed rounds and dead-letter objects travel as counter
names instead: ``{COMMITTED_PREFIX}{job}/{round}`` and ``{DEADLETTER_PREFIX}{key}``.
"""

from __future__ import annotations

from typing import Any

from apache_beam.metrics.metric import Metrics

from pipelines.runtime import METRICS_NAMESPACE

COMMITTED_PREFIX = "committed:"
DEADLETTER_PREFIX = "deadletter_object:"


def counter(name: str) -> Any:
    """The run-wide counter ``name`` (make it in ``DoFn.setup``, increment it per element)."""
    return Metrics.counter(METRICS_NAMESPACE, name)
