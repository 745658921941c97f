# mypy: disallow-untyped-calls=False
# (Apache Beam's metrics are not annotated)
"""The counters the pipelines count with, in FLStore's metrics namespace.

A run's summary is read back from these counters (:func:`run_counters`), so it is the same on
every runner. Beam string-set metrics lose values across parallel bundles on FnApiRunner (2.77),
so the names of committed rounds and dead-letter objects travel as counter names instead:
``{COMMITTED_PREFIX}{job}/{round}`` and ``{DEADLETTER_PREFIX}{key}``.

Each increment goes to Beam's counter *and* to a tally of the worker process, keyed by run id:
Beam's Dask runner collects no metrics (its result's ``metrics()`` raises), so there the driver
sums the tallies of the cluster's worker processes instead (``Client.run``). A tally counts
attempts: a task Dask retries counts twice, where Beam's committed metrics would not.
"""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any

from apache_beam.metrics.metric import Metrics, MetricsFilter

from pipelines.runtime import METRICS_NAMESPACE

COMMITTED_PREFIX = "committed:"
DEADLETTER_PREFIX = "deadletter_object:"

_tallies: dict[str, Counter[str]] = {}
_tallies_lock = threading.Lock()


class RunCounter:
    """One run-wide counter: Beam's, and this process's tally of the run."""

    def __init__(self, name: str, run_id: str) -> None:
        self.name = name
        self.run_id = run_id
        self.beam = Metrics.counter(METRICS_NAMESPACE, name)

    def inc(self, n: int = 1) -> None:
        self.beam.inc(n)
        with _tallies_lock:
            _tallies.setdefault(self.run_id, Counter())[self.name] += n


def counter(name: str, run_id: str) -> RunCounter:
    """The counter ``name`` of run ``run_id`` (make it in ``DoFn.setup``, increment it per
    element)."""
    return RunCounter(name, run_id)


def take_tally(run_id: str) -> dict[str, int]:
    """This process's tally of ``run_id``, forgotten once taken (a long-lived worker process
    serves many runs)."""
    with _tallies_lock:
        return dict(_tallies.pop(run_id, Counter()))


def _metric_value(result: Any) -> Any:
    return result.committed if result.committed is not None else result.attempted


def run_counters(result: Any, run_id: str) -> dict[str, int]:
    """The finished run's counters by name, summed over steps (and over worker processes)."""
    local = take_tally(run_id)  # in-process runners tally in this process: drop it either way
    try:
        query = result.metrics().query(MetricsFilter().with_namespace(METRICS_NAMESPACE))
    except NotImplementedError:
        client = getattr(result, "client", None)  # Beam's DaskRunnerResult
        if client is None:
            return local
        total: Counter[str] = Counter(local)
        for tally in client.run(take_tally, run_id).values():
            total.update(tally)
        return dict(total)
    counters: dict[str, int] = {}
    for r in query.get("counters", []):
        counters[r.key.metric.name] = counters.get(r.key.metric.name, 0) + int(_metric_value(r))
    return counters
