"""FLStore's side of the paper benchmark: evicting the nodes and prefetching a round as
ingestion does, with what each prefetch was billed (its invocations, the S3 requests the nodes
made for it) — the round's work the cost accounting charges."""

from __future__ import annotations

import json
import statistics
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from flstore_core import cost
from flstore_core.protocol import EvictOp, StatsOp
from flstore_core.routing.invoker import Invoker, NodeAnswer
from flstore_core.routing.placement import ShardKey
from lambdas.local_runtime.stack import LocalStack


class RecordingInvoker:
    """Passes invocations through and keeps what each was billed (the prefetch's invocations)."""

    def __init__(self, inner: Invoker) -> None:
        self.inner = inner
        self.answers: list[NodeAnswer] = []
        self._lock = threading.Lock()

    def invoke(self, function: str, event: Mapping[str, Any]) -> NodeAnswer:
        answer = self.inner.invoke(function, event)
        with self._lock:
            self.answers.append(answer)
        return answer


@dataclass
class Prefetch:
    """One ingestion prefetch: its billed invocations, its S3 requests and its wall time."""

    job: str
    invocations: list[cost.Invocation]
    s3_gets: int
    s3_puts: int
    wall_ms: float
    kind: str  # "after_evict" (before a timed request) or "steady" (a new round, nodes warm)
    source: str = "invoker"  # where the billed durations come from: "router" or "invoker"
    invoker_billed_ms: float = 0.0  # the same prefetch's invocations as the invoker saw them
    artifacts_ms: float = 0.0  # the nodes' own time computing the round's model artifacts

    @property
    def usd(self) -> float:
        return cost.round_work_cost(self.invocations, self.s3_gets, self.s3_puts)


def ingestion_shards(job: str, round_: int, clients: list[str]) -> list[list[ShardKey]]:
    """What ingestion asks the owners to load after committing ``round_`` of ``job``, in its
    order (``pipelines.prefetch.prefetch_shards``, which the Flower sink follows too): the round
    on its own first, then the job's other shards."""
    from pipelines.prefetch import prefetch_shards
    from pipelines.records import CommittedRound

    committed = CommittedRound(job, round_, tuple(clients), 0, True, True)
    rounds, others = prefetch_shards(job, [committed], hot_rounds=1)
    return [rounds, others]


class Flstore:
    """The stack's operations around a timed request: evict every node, prefetch a job's round."""

    def __init__(self, stack: LocalStack) -> None:
        assert stack.router is not None
        self.stack = stack
        self.router = stack.router
        self.prefetches: list[Prefetch] = []

    def node_counts(self) -> tuple[int, int]:
        gets = puts = 0
        for i in range(self.stack.config.nodes):
            stats = self.router.node_op(i, StatsOp())
            gets += int(stats.get("s3_gets", 0))
            puts += int(stats.get("s3_puts", 0))
        return gets, puts

    def evict_all(self) -> None:
        for i in range(self.stack.config.nodes):
            self.router.node_op(i, EvictOp(all=True))

    def prefetch(
        self, job: str, round_: int, clients: list[str], kind: str = "after_evict"
    ) -> Prefetch:
        """Ingestion's prefetch of ``round_`` of ``job``, with its billed invocations and the S3
        requests the nodes made for it."""
        gets0, puts0 = self.node_counts()
        reported: list[cost.Invocation] | None = []
        artifacts_ms = 0.0
        inner = self.router.invoker
        recorder = RecordingInvoker(inner)
        self.router.invoker = recorder  # nothing else is in flight: requests are sequential
        t0 = time.perf_counter()
        try:
            for shards in ingestion_shards(job, round_, clients):
                answers = self.router.prefetch(shards)
                failed = {
                    f: a
                    for f, a in answers.items()
                    if not isinstance(a, dict) or a.get("error") or a.get("failed")
                }
                if failed:
                    raise SystemExit(f"prefetch of {job} failed: {json.dumps(failed)[:500]}")
                reported = reported_invocations(answers, reported)
                artifacts_ms += artifact_ms(answers)
        finally:
            self.router.invoker = inner
        wall = (time.perf_counter() - t0) * 1000
        gets1, puts1 = self.node_counts()
        seen = [cost.Invocation(a.function, a.billed_ms, a.memory_mb) for a in recorder.answers]
        # Router.prefetch reports what it cost on each node (6132ad0); the invoker's own record
        # of every invocation is the fallback and the cross-check
        invocations, source = (reported, "router") if reported else (seen, "invoker")
        record = Prefetch(
            job,
            invocations,
            gets1 - gets0,
            puts1 - puts0,
            wall,
            kind,
            source,
            sum(i.billed_ms for i in seen),
            artifacts_ms,
        )
        self.prefetches.append(record)
        return record


def reported_invocations(
    answers: Mapping[str, Any], so_far: list[cost.Invocation] | None
) -> list[cost.Invocation] | None:
    """``so_far`` plus the invocations a ``Router.prefetch`` answer reports for each node
    (``invocations``, ``billed_ms``, ``memory_mb``): the node's billed time as one invocation
    and its other invocations' request fees; None when any node's answer does not say."""
    if so_far is None:
        return None
    out = list(so_far)
    for function, answer in answers.items():
        if not isinstance(answer, dict) or "billed_ms" not in answer or "memory_mb" not in answer:
            return None
        count = max(1, int(answer.get("invocations", 1)))
        memory = int(answer["memory_mb"])
        out.append(cost.Invocation(function, float(answer["billed_ms"]), memory))
        out.extend(cost.Invocation(function, 0.0, memory) for _ in range(count - 1))
    return out


def artifact_ms(answers: Mapping[str, Any]) -> float:
    """The nodes' compute time on model artifacts that a ``Router.prefetch`` answer reports
    (``artifacts`` -> round -> ``ms`` of each node)."""
    total = 0.0
    for answer in answers.values():
        items = answer.get("artifacts") if isinstance(answer, dict) else None
        for item in items.values() if isinstance(items, dict) else ():
            if isinstance(item, dict) and isinstance(item.get("ms"), int | float):
                total += float(item["ms"])
    return total


def prefetch_stats(records: list[Prefetch]) -> dict[str, Any]:
    """Means and medians of some prefetches: cost, wall time, billed time, S3 requests."""
    return {
        "prefetches": len(records),
        "usd_mean": statistics.fmean(p.usd for p in records),
        "wall_ms_median": statistics.median(p.wall_ms for p in records),
        "invocations_per_prefetch": statistics.fmean(len(p.invocations) for p in records),
        "billed_ms_median": statistics.median(
            sum(i.billed_ms for i in p.invocations) for p in records
        ),
        "memory_mb": sorted({i.memory_mb for p in records for i in p.invocations}),
        "billed_from": sorted({p.source for p in records}),
        "invoker_billed_ms_median": statistics.median(p.invoker_billed_ms for p in records),
        "s3_gets_mean": statistics.fmean(p.s3_gets for p in records),
        "s3_puts_mean": statistics.fmean(p.s3_puts for p in records),
        "artifacts_ms_median": statistics.median(p.artifacts_ms for p in records),
    }
