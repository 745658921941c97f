"""How the demo times a workload: FLStore's first request after the round is warm, the same
request repeated, and the two stateless aggregator baselines, interleaved.

A cache node keeps every answer it computed (:mod:`flstore_core.cache.memo`), so an identical
request is a dictionary lookup, while the baselines compute every request anew. The demo reports
both of FLStore's cases, named for what they time:

* ``flstore-first`` — the first request of the workload after the round was warmed: before each
  sample, untimed, the shards the workload answers from are evicted from every cache node and
  warmed again as the Flower sink warmed them when the round committed (:class:`WarmRound`: the
  round shard, with the Gram and model artifacts prefetch computes, or the job's meta and model
  shards). What prefetch built is there; an answer memoised by an earlier request, or an
  artifact an earlier timed request built lazily, is not. Every sample is checked: the nodes'
  count of memo answers reused must not move during it (:class:`FirstRequestMemoised`
  otherwise);
* ``flstore-repeat`` — the same request again right after it, which the owner answers from its
  memo (counted in the row's ``memo_hits``);
* ``objstore-agg``, ``cache-agg`` — the aggregator over S3 and over Redis: stateless, every
  request computed.

Each pass times every system in turn; a workload gets ``repetitions`` passes, and more (up to
``MAX_REPETITIONS``) while its passes so far, re-warm included, took under ``EXTRA_S``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from flstore_core.errors import FLStoreError
from flstore_core.protocol import EvictOp, RunOp, StatsOp
from flstore_core.routing.placement import ShardKey, meta_shard, model_shard, round_shard

FIRST = "flstore-first"
REPEAT = "flstore-repeat"
BASELINES = ("objstore-agg", "cache-agg")
SYSTEMS = (FIRST, REPEAT, *BASELINES)
# a workload is timed in more passes than the asked repetitions, up to this many in all, while
# its passes so far took under EXTRA_S seconds, each pass's untimed re-warm included (which
# takes a second or more on a round: the demo stays minutes long)
MAX_REPETITIONS = 15
EXTRA_S = 1.0

Request = Callable[[], dict[str, Any]]


class FirstRequestMemoised(RuntimeError):
    """A timed ``flstore-first`` request was answered from a node's memo: the reset before it
    did not drop the memoised answers, so the sample would time a lookup."""


@dataclass
class FlstoreRequest:
    """FLStore's side of one workload: the request, and the untimed steps around it."""

    call: Request
    reset: Callable[[], None]  # its shards back in the state right after warming (untimed)
    reused: Callable[[], int]  # answers the nodes have taken from their memos so far


class WarmRound:
    """A round's shards put back, on demand, into the state the Flower sink's warming left them.

    ``reset(cls)`` evicts, on every node, the shards a workload of class ``cls`` answers from —
    the round shard for a round workload (with it go its memo, its Gram and model artifacts and
    whatever a request built on it lazily), else the job's meta and model shards (with their
    memos) — and warms them again as ``StoreSink`` does when a round commits (the round on its
    owners, which compute its model artifacts and exchange them; the meta and model shards in
    one batch). The nodes' manifests, job contexts and imported libraries stay: they are what
    any warm node holds. On the demo's digits rounds a round's re-warm takes 0.5-2.5 s (the
    artifacts: a few dozen evaluations of the CNN; measured with the machine shared), a meta
    and model shard's a fraction of that."""

    def __init__(self, router: Any, nodes: int, job: str, round_: int) -> None:
        self.router = router
        self.nodes = nodes
        self.job = job
        self.round = round_

    def shards(self, cls: str) -> list[ShardKey]:
        """What a workload of class ``cls`` answers from, in one warming batch of the sink."""
        if cls == "round":
            return [round_shard(self.job, self.round)]
        return [meta_shard(self.job), model_shard(self.job)]

    def reset(self, cls: str) -> None:
        """Evict the shards of ``cls`` everywhere, then warm them on their owners."""
        shards = self.shards(cls)
        for i in range(self.nodes):
            self.router.node_op(i, EvictOp(tuple(str(k) for k in shards)))
        answers = self.router.prefetch(shards)
        failed = {
            node: answer
            for node, answer in answers.items()
            if not isinstance(answer, dict) or answer.get("error") or answer.get("failed")
        }
        if failed:
            raise RuntimeError(f"re-warming {[str(k) for k in shards]}: {failed}")

    def reused(self) -> int:
        """Answers every node has taken from its memo so far (its ``stats``)."""
        total = 0
        for i in range(self.nodes):
            stats = self.router.node_op(i, StatsOp())
            total += int(stats.get("answers", {}).get("reused", 0))
        return total

    def import_on_every_node(
        self, round_: int, requests: Iterable[tuple[str, dict[str, Any]]]
    ) -> None:
        """Run each ``(workload, params)`` on ``round_`` on every node directly, so that a
        library a workload imports on first use (scikit-learn) is loaded in every node's
        process, whichever node placement makes the timed round's primary."""
        for i in range(self.nodes):
            for name, params in requests:
                self.router.node_op(i, RunOp(name, self.job, params, round=round_))


def warm_up(
    clients: Mapping[str, Any],
    job: str,
    round_: int,
    requests: Mapping[str, dict[str, Any]],
) -> float:
    """Untimed: every round workload of ``requests`` once on every system (``clients``: an
    FLStore client per system) on ``round_``, a round the table does not time, so that the
    aggregators and the nodes have imported what the workloads use. A refusal (4xx) is left
    to the timed request to report. Returns the seconds it took."""
    t0 = time.perf_counter()
    for name, params in requests.items():
        for client in clients.values():
            try:
                client.run(job, name, round=round_, **params)
            except FLStoreError as exc:
                if exc.status >= 500:
                    raise
    return time.perf_counter() - t0


def measure(
    name: str,
    cls: str,
    flstore: FlstoreRequest,
    baselines: Mapping[str, Request],
    repetitions: int,
    found: Callable[[dict[str, Any]], str],
) -> dict[str, Any]:
    """p50/p95 latency and mean cost of each system, the result FLStore returned, what it
    ``found``, and how many samples of each FLStore column its nodes answered from a memo.

    A pass: ``flstore.reset()`` (untimed), ``flstore-first``, ``flstore-repeat``, then each
    baseline. An FLStore error on the first request is the row's ``error``; an answer that
    differs from FLStore's first is listed in ``disagree``."""
    row: dict[str, Any] = {"class": cls, "systems": {}}
    calls: dict[str, Request] = {FIRST: flstore.call, REPEAT: flstore.call, **baselines}
    samples: dict[str, list[float]] = {s: [] for s in calls}
    costs: dict[str, list[float]] = {s: [] for s in calls}
    memo_hits = {FIRST: 0, REPEAT: 0}
    resets: list[float] = []  # the untimed re-warming before each pass, ms
    reference: dict[str, Any] | None = None
    done, t_start = 0, time.perf_counter()
    while done < repetitions or (
        done < MAX_REPETITIONS and time.perf_counter() - t_start < EXTRA_S
    ):
        done += 1
        t_reset = time.perf_counter()
        flstore.reset()
        resets.append((time.perf_counter() - t_reset) * 1000)
        reused = flstore.reused()
        for system, call in calls.items():  # interleaved
            t0 = time.perf_counter()
            try:
                answer = call()
            except FLStoreError as exc:
                if reference is not None or system != FIRST:
                    raise
                row["error"] = f"{exc.status} {exc.message}"
                return row
            elapsed = time.perf_counter() - t0
            samples[system].append(elapsed * 1000)
            costs[system].append(float(answer["meta"]["cost_usd"]))
            if system in memo_hits:
                before, reused = reused, flstore.reused()
                if reused > before:
                    memo_hits[system] += 1
                if reused > before and system == FIRST:
                    raise FirstRequestMemoised(
                        f"{name}: a timed first request was answered from a node's memo "
                        f"({reused - before} answers reused during it)"
                    )
            if reference is None:
                reference = answer["result"]
            elif answer["result"] != reference and system not in row.setdefault("disagree", []):
                row["disagree"].append(system)
    if not row.get("disagree"):
        row.pop("disagree", None)
    assert reference is not None
    row["result"] = reference
    row["found"] = found(reference)
    row["repetitions"] = done
    row["memo_hits"] = memo_hits
    row["rewarm_ms_median"] = float(np.median(resets))
    for system in calls:
        row["systems"][system] = {
            "p50_ms": float(np.percentile(samples[system], 50)),
            "p95_ms": float(np.percentile(samples[system], 95)),
            "cost_usd": float(np.mean(costs[system])),
        }
    return row
