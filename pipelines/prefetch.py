# mypy: disallow-untyped-calls=False
# (Apache Beam's transforms are not annotated)
"""Warming the cache after a run: the owners of what it committed (under the router's placement)
are asked to ``load`` it, so the first request after ingestion or a backfill is warm."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import apache_beam as beam

from flstore_core.routing.placement import meta_shard, model_shard, round_shard
from pipelines.metrics import counter
from pipelines.records import CommittedRound
from pipelines.runtime import PrefetchTarget, ProgressEvent, StoreTarget, report


def prefetch_shards(
    job: str, rounds: Iterable[CommittedRound], hot_rounds: int
) -> tuple[list[Any], list[Any]]:
    """``(round shards, other shards)`` to warm for a job after a run: its latest
    ``hot_rounds`` committed rounds, then its meta shard (which answers meta and client
    workloads: every client's rows) and its model shard (so that it names the run's last global
    model as the latest)."""
    ordered = sorted(rounds, key=lambda r: r.round)
    hot = ordered[-hot_rounds:] if hot_rounds > 0 else []
    return [round_shard(job, r.round) for r in hot], [meta_shard(job), model_shard(job)]


def tally_prefetch(answers: dict[str, Any]) -> dict[str, int]:
    """Counts of what the nodes said to a ``load`` (``loaded``, ``already``, ``failed``, and
    ``errors`` for nodes that answered with an error or not at all)."""
    out = {"loaded": 0, "already": 0, "failed": 0, "errors": 0}
    for payload in answers.values():
        if not isinstance(payload, dict) or "error" in payload:
            out["errors"] += 1
            continue
        out["loaded"] += len(payload.get("loaded", []))
        out["already"] += len(payload.get("already", []))
        out["failed"] += len(payload.get("failed", {}))
    return out


class PrefetchFn(beam.DoFn):
    """Ask the owners of a job's hot shards to load them (placement of the router)."""

    def __init__(self, target: PrefetchTarget, store: StoreTarget, run_id: str) -> None:
        self.target = target
        self.store_target = store
        self.run_id = run_id

    def setup(self) -> None:
        self.store = self.store_target.store()
        self.router = self.target.router(self.store)
        self.counters = {
            n: counter(f"prefetch_{n}", self.run_id) for n in ("loaded", "already", "failed")
        }
        self.errors = counter("prefetch_errors", self.run_id)

    def process(self, element: tuple[str, Iterable[CommittedRound]]) -> Iterator[dict[str, Any]]:
        job, rounds = element
        round_shards, other_shards = prefetch_shards(job, rounds, self.target.hot_rounds)
        # round shards first and on their own: a node that does not serve another class yet
        # refuses the whole load call, and the rounds are what the next request needs
        answers = {"round": self.router.prefetch(round_shards) if round_shards else {}}
        answers["other"] = self.router.prefetch(other_shards)
        total = {"loaded": 0, "already": 0, "failed": 0, "errors": 0}
        for part in answers.values():
            for k, v in tally_prefetch(part).items():
                total[k] += v
        for k in ("loaded", "already", "failed"):
            self.counters[k].inc(total[k])
        self.errors.inc(total["errors"])
        report(self.run_id, ProgressEvent("prefetched", detail=job))
        yield {"job": job, **total, "nodes": answers}


class PrefetchOwners(beam.PTransform[Any, Any]):
    """Warm the cache nodes that own what a run committed, one ``load`` per owner and job."""

    def __init__(self, target: PrefetchTarget, store: StoreTarget, run_id: str) -> None:
        super().__init__()
        self.target = target
        self.store = store
        self.run_id = run_id

    def expand(self, committed: Any) -> Any:
        return (
            committed
            | "KeyByJob" >> beam.Map(lambda r: (r.job, r))
            | "GroupByJob" >> beam.GroupByKey()
            | "Load" >> beam.ParDo(PrefetchFn(self.target, self.store, self.run_id))
        )
