"""FLStore's class-tiered eviction against LRU, LFU, GDSF and an offline bound, on a trace of
many jobs (:mod:`benchmarks.cache_trace`) replayed with node memory below the working set.

The replay runs the cache nodes' own cache, :class:`~flstore_core.cache.shard_cache.ShardCache`
(its byte budget, pins, last-use clock and ``using`` load-once path), one per node, with the
policy injected; shards go to their primary owner by the router's placement
(:func:`~flstore_core.routing.placement.place_shard`, replication 1 so that the memory is all
distinct data). Each round's commit is prefetched onto its owners as ingestion does (the round,
then the job's meta and model shards), billed to ingestion, not to the requests. Entries are
placeholders of the real sizes: no data moves, so a request's latency is the measured
in-process time of its cache accesses plus a modelled Lambda invoke
(:class:`lambdas.local_runtime.network.NetworkModel`, ``lambda_invoke_ms``) plus, for a miss,
the modelled S3 GET of the entry (first byte, then its bytes at one connection's rate through
the node's Lambda interface: :class:`~lambdas.local_runtime.network.S3Link`, on the trace's
clock). Workload compute is not modelled (it is the same for every policy). A request's cost is
:func:`flstore_core.cost.flstore_request_cost` of one invocation per node it touched (billed
for its measured plus modelled S3 time, at the node memory that holds its budget with the torch
runtime) and its S3 GETs.

A hit is a request answered with no S3 read; its bytes are the bytes of the representation it
needs (a round's rows, or its Gram when the Gram suffices). A round's placeholder splits as the
node's round does (:mod:`flstore_core.cache.round_data`): under FLStore's policy (the one that
weighs representations) a round chosen for eviction first gives up its rows and stays as its
rowless remainder (the trace's ``rowless`` bytes); a Gram request on it is then a hit with no S3
read (counted in ``rowless_answers``), and a request that needs rows is a miss that reads the
rows' bytes and GETs back and re-attaches them. The generic policies evict rounds whole.

Run: ``python -m benchmarks.cache_policies --json OUT [--trace FILE | --replay FILE] [--plot
PNG]``.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import functools
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from benchmarks.cache_trace import (
    MODEL_WORKLOADS,
    Part,
    Request,
    TraceSetting,
    generate,
    read_trace,
    working_set,
)
from benchmarks.cache_trace import write_trace as write_trace_file
from benchmarks.report import parser, write_report
from flstore_core import cost
from flstore_core.cache.budget import RUNTIME_MB, WORKING_MB, MiB
from flstore_core.cache.eviction import EvictionPolicy
from flstore_core.cache.job_mix import JobMix, Use
from flstore_core.cache.policies import BeladySizeEviction, make_policy
from flstore_core.cache.shard_cache import ShardCache
from flstore_core.routing.placement import ShardKey, place_shard
from lambdas.local_runtime.network import NetworkModel

POLICIES = ("flstore", "flstore_static", "lru", "lfu", "gdsf", "belady")
FRACTIONS = (0.1, 0.25, 0.5, 1.0)
NODES = 4


@dataclass
class Held:
    """A cache entry of ``nbytes`` (the replay moves no data); a round's holds
    ``rows_nbytes`` of rows it can give up under pressure, as a node's round does."""

    nbytes: int
    rows_nbytes: int = 0

    def drop_rows(self) -> None:
        """Keep only the rowless remainder (what ``ShardCache`` asks of a round it shrinks)."""
        self.nbytes -= self.rows_nbytes
        self.rows_nbytes = 0

    def attach_rows(self, entry: int) -> None:
        """The rows read back: the whole ``entry`` again."""
        self.rows_nbytes = entry - self.nbytes
        self.nbytes = entry


def held(p: Part) -> Held:
    """The placeholder of a freshly loaded shard (a round's with its rows)."""
    return Held(p.entry, p.entry - p.rowless if p.rowless else 0)


class NextUse:
    """The trace's next-use table for the offline policy: the request positions of every
    shard, and the replay's current position."""

    def __init__(self, requests: Sequence[Request]) -> None:
        self.uses: dict[ShardKey, list[int]] = {}
        for i, q in enumerate(requests):
            if not q.prefetch:
                for p in q.parts:
                    self.uses.setdefault(ShardKey.parse(p.key), []).append(i)
        self.position = 0

    def distance(self, key: ShardKey) -> float:
        """Requests until ``key`` is next read after the current one; inf if never."""
        uses = self.uses.get(key, [])
        at = bisect.bisect_right(uses, self.position)
        return float(uses[at] - self.position) if at < len(uses) else math.inf


def reload_ms(model: NetworkModel) -> Callable[[int], float]:
    """What reloading ``size`` bytes from S3 costs in ms, unshared (GDSF's cost)."""
    return lambda size: model.s3_get_ms + size / (model.s3_connection_mb_s * 1e6) * 1e3


def node_memory_mb(budget: int) -> int:
    """The Lambda memory that leaves ``budget`` bytes for data with the torch runtime."""
    return math.ceil(budget / MiB) + RUNTIME_MB["torch"] + WORKING_MB


@dataclass
class Tally:
    """What one replay measured."""

    latency_ms: list[float] = dataclasses.field(default_factory=list)
    cost_usd: list[float] = dataclasses.field(default_factory=list)
    need: dict[str, int] = dataclasses.field(default_factory=dict)  # by class
    hit_bytes: dict[str, int] = dataclasses.field(default_factory=dict)
    requests: dict[str, int] = dataclasses.field(default_factory=dict)
    hits: dict[str, int] = dataclasses.field(default_factory=dict)
    s3_bytes: int = 0
    s3_gets: int = 0
    prefetch_s3_bytes: int = 0
    rowless_answers: int = 0  # Gram answers from rounds whose rows were dropped, no S3 read
    rows_dropped: int = 0  # rounds that gave up their rows and stayed

    def add(self, cls: str, need: int, hit_bytes: int, hit: bool) -> None:
        for table, value in (
            (self.need, need),
            (self.hit_bytes, hit_bytes),
            (self.requests, 1),
            (self.hits, int(hit)),
        ):
            table[cls] = table.get(cls, 0) + value


class Replay:
    """One policy's nodes replaying a trace."""

    def __init__(
        self,
        requests: Sequence[Request],
        policy: str,
        budget: int,
        nodes: int,
        model: NetworkModel,
        prefetch: bool = True,
    ) -> None:
        self.requests = requests
        self.prefetching = prefetch
        self.model = model
        self.nodes = nodes
        self.memory_mb = node_memory_mb(budget)
        self.next_use = NextUse(requests) if policy == "belady" else None
        self.caches = [ShardCache(budget, policy=self._policy(policy)) for _ in range(nodes)]
        # FLStore's router follows each job's requests too: no model shard is prefetched for a
        # job that asks no model workload
        self.router_mix = JobMix() if policy == "flstore" else None
        self.links = [model.s3_link(model.lambda_nic) for _ in range(nodes)]
        self.tally = Tally()

    def _policy(self, name: str) -> EvictionPolicy:
        if name == "belady":
            assert self.next_use is not None
            return BeladySizeEviction(self.next_use.distance)
        return make_policy(name, cost=reload_ms(self.model))

    def owner(self, key: ShardKey) -> int:
        return place_shard(key, self.nodes, 1)[0]

    def run(self) -> Tally:
        for i, q in enumerate(self.requests):
            if self.next_use is not None:
                self.next_use.position = i
            if q.prefetch:
                if self.prefetching:
                    self.prefetch(q)
            else:
                self.request(q)
        self.tally.rows_dropped = sum(c.stats.rows_dropped for c in self.caches)
        return self.tally

    def prefetch(self, q: Request) -> None:
        """Ingestion's load of a committed round and its job's meta and model shards."""
        for p in q.parts:
            key = ShardKey.parse(p.key)
            if key.cls == "model" and self.router_mix and not self.router_mix.asks_models(q.job):
                continue
            cache = self.caches[self.owner(key)]
            have = cache.get(key)
            if have is None or have.nbytes != p.entry:
                self.tally.prefetch_s3_bytes += p.s3_bytes
                cache.put(key, held(p))

    def rowless(self, q: Request, cache: ShardCache, key: ShardKey, value: Held, p: Part) -> bool:
        """A request on a round held without its rows: a hit when the Gram answers it, else
        the rows are read back (a miss) and re-attached, as a node does
        (:meth:`~flstore_core.cache.node.CacheNode.reload_rows`)."""
        if q.needs != "rows":
            self.tally.rowless_answers += 1
            return True
        value.attach_rows(p.entry)
        if not cache.put(key, value):  # no room now: kept rowless, as accounted
            value.drop_rows()
        return False

    def request(self, q: Request) -> None:
        """One user request: each node it touches reads its shards (pinned together, as one
        run), loading what is missing."""
        by_node: dict[int, list[tuple[ShardKey, Part]]] = {}
        for p in q.parts:
            key = ShardKey.parse(p.key)
            by_node.setdefault(self.owner(key), []).append((key, p))
        hit_bytes, all_hit, slowest = 0, True, 0.0
        invocations = []
        gets = 0
        for node, parts in by_node.items():
            cache, link = self.caches[node], self.links[node]
            s3_ms = 0.0
            t0 = time.perf_counter()
            with contextlib.ExitStack() as stack:
                for key, p in parts:
                    value, hit = stack.enter_context(cache.using(key, functools.partial(held, p)))
                    if hit and p.rowless and value.rows_nbytes == 0:  # a rowless round
                        hit = self.rowless(q, cache, key, value, p)
                    elif hit and value.nbytes != p.entry:  # a grown meta shard, refreshed
                        cache.put(key, held(p))
                    if hit:
                        hit_bytes += p.need
                        continue
                    all_hit = False
                    gets += p.gets
                    self.tally.s3_bytes += p.s3_bytes
                    s3_ms += link.delay_s("GET", p.s3_bytes, now=q.t) * 1e3
            cache.observe_request(use(q))
            node_ms = (time.perf_counter() - t0) * 1e3 + s3_ms
            slowest = max(slowest, node_ms)
            invocations.append(cost.Invocation(f"cache-{node}", node_ms, self.memory_mb))
        if self.router_mix is not None:
            self.router_mix.observe(dataclasses.replace(use(q), rows=False))
        self.tally.s3_gets += gets
        self.tally.latency_ms.append(self.model.lambda_invoke_ms + slowest)
        self.tally.cost_usd.append(cost.flstore_request_cost(invocations, s3_gets=gets).total)
        self.tally.add(q.cls, q.need_bytes, hit_bytes, all_hit)


def use(q: Request) -> Use:
    """What a node learns of request ``q`` (:class:`~flstore_core.cache.job_mix.Use`)."""
    round_ = q.rounds[0] if q.cls == "round" else None
    return Use(q.job, q.cls, round_, rows=q.needs == "rows", model=q.workload in MODEL_WORKLOADS)


def ratio(part: float, whole: float) -> float:
    return part / whole if whole else 0.0


def run_json(policy: str, fraction: float, tally: Tally, budget: int, nodes: int) -> dict[str, Any]:
    """One §9 run of a replay."""
    lat = np.asarray(tally.latency_ms)
    by_class = {
        cls: {
            "n": tally.requests[cls],
            "byte_hit_ratio": ratio(tally.hit_bytes[cls], tally.need[cls]),
            "request_hit_ratio": ratio(tally.hits[cls], tally.requests[cls]),
        }
        for cls in sorted(tally.requests)
    }
    run: dict[str, Any] = {
        "system": policy,
        "metric": "latency_ms",
        "n": int(lat.size),
        "memory_fraction": fraction,
        "node_budget_bytes": budget,
        "nodes": nodes,
        "byte_hit_ratio": ratio(sum(tally.hit_bytes.values()), sum(tally.need.values())),
        "request_hit_ratio": ratio(sum(tally.hits.values()), sum(tally.requests.values())),
        "by_class": by_class,
        "s3_bytes": tally.s3_bytes,
        "s3_gets": tally.s3_gets,
        "prefetch_s3_bytes": tally.prefetch_s3_bytes,
        "p50": float(np.percentile(lat, 50)),
        "p95": float(np.percentile(lat, 95)),
        "p99": float(np.percentile(lat, 99)),
        "cost_usd": float(np.mean(tally.cost_usd)),
    }
    if policy.startswith("flstore"):
        run["rowless_answers"] = tally.rowless_answers
        run["rows_dropped"] = tally.rows_dropped
    return run


def compare(
    requests: Sequence[Request],
    fractions: Sequence[float] = FRACTIONS,
    policies: Sequence[str] = POLICIES,
    nodes: int = NODES,
    model: NetworkModel | None = None,
    window_rounds: int = TraceSetting.window_rounds,
    prefetch: bool = True,
) -> tuple[int, list[dict[str, Any]]]:
    """The working set and, for each memory fraction, each policy's replay in turn."""
    model = model or NetworkModel()
    ws = working_set(requests, window_rounds)
    runs = []
    for fraction in fractions:
        budget = max(int(fraction * ws / nodes), 1)
        for policy in policies:
            tally = Replay(requests, policy, budget, nodes, model, prefetch).run()
            runs.append(run_json(policy, fraction, tally, budget, nodes))
    return ws, runs


def plot(runs: list[dict[str, Any]], path: str) -> None:
    """Byte hit ratio against node memory (a fraction of the working set), one line a policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for policy in dict.fromkeys(r["system"] for r in runs):
        mine = sorted(
            (r for r in runs if r["system"] == policy), key=lambda r: r["memory_fraction"]
        )
        ax.plot(
            [r["memory_fraction"] for r in mine],
            [r["byte_hit_ratio"] for r in mine],
            marker="o",
            label=policy,
        )
    ax.set_xlabel("node memory / working set")
    ax.set_ylabel("byte hit ratio")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table(runs: list[dict[str, Any]], fraction: float) -> str:
    """The runs at ``fraction`` as a Markdown table."""
    head = "| policy | byte hit | request hit | S3 GB | p50 ms | p99 ms | $/request |"
    lines = [head, "|---|---|---|---|---|---|---|"]
    for r in runs:
        if r["memory_fraction"] == fraction:
            lines.append(
                f"| {r['system']} | {r['byte_hit_ratio']:.3f} | {r['request_hit_ratio']:.3f} "
                f"| {r['s3_bytes'] / 1e9:.1f} | {r['p50']:.1f} | {r['p99']:.1f} "
                f"| {r['cost_usd']:.3g} |"
            )
    return "\n".join(lines)


SEED_FIELDS = ("byte_hit_ratio", "request_hit_ratio", "s3_bytes", "p99", "cost_usd")


def over_seeds(args: Any, first: list[dict[str, Any]]) -> dict[str, Any]:
    """Each policy's mean, min and max of :data:`SEED_FIELDS` at each memory fraction over
    the traces of seeds 0..``args.seeds``-1 (``first``: seed 0's runs)."""
    runs = list(first)
    for seed in range(1, args.seeds):
        trace = generate(dataclasses.replace(TraceSetting(), seed=seed))
        runs += compare(trace, args.fractions, nodes=args.nodes, prefetch=not args.no_prefetch)[1]
    out: dict[str, Any] = {}
    for r in runs:
        cell = out.setdefault(r["system"], {}).setdefault(str(r["memory_fraction"]), {})
        for name in SEED_FIELDS:
            cell.setdefault(name, []).append(r[name])
    for cells in out.values():
        for cell in cells.values():
            for name in SEED_FIELDS:
                v = cell[name]
                cell[name] = {"mean": float(np.mean(v)), "min": min(v), "max": max(v)}
    return out


def seeds_table(seeds: dict[str, Any]) -> str:
    """Byte hit ratio and cost per request over the seeds, a row a policy and fraction."""
    lines = ["| policy | memory | byte hit | $/request |", "|---|---|---|---|"]
    for policy, cells in seeds.items():
        for fraction, cell in cells.items():
            b, c = cell["byte_hit_ratio"], cell["cost_usd"]
            lines.append(
                f"| {policy} | {fraction} | {b['mean']:.4f} [{b['min']:.4f}, {b['max']:.4f}] "
                f"| {c['mean']:.3g} [{c['min']:.3g}, {c['max']:.3g}] |"
            )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--trace", metavar="OUT", help="write the generated trace (JSONL) to OUT")
    p.add_argument("--replay", metavar="FILE", help="replay this trace instead of generating")
    p.add_argument("--plot", metavar="PNG", help="plot byte hit ratio against node memory")
    p.add_argument("--fractions", type=float, nargs="+", default=list(FRACTIONS))
    p.add_argument("--nodes", type=int, default=NODES)
    p.add_argument(
        "--seeds",
        type=int,
        default=1,
        help="also replay traces of seeds 1..N-1 (which old rounds are revisited) and report "
        "each policy's mean, min and max over the N traces (summary.seeds)",
    )
    p.add_argument(
        "--no-prefetch",
        action="store_true",
        help="skip the commit-time prefetch: every shard is loaded by the first request on it",
    )
    args = p.parse_args(argv)
    setting = TraceSetting()
    requests = read_trace(args.replay) if args.replay else generate(setting)
    if args.trace:
        write_trace_file(requests, args.trace)
    t0 = time.perf_counter()
    ws, runs = compare(requests, args.fractions, nodes=args.nodes, prefetch=not args.no_prefetch)
    print(f"working set {ws / 1e9:.2f} GB; {len(runs)} replays in {time.perf_counter() - t0:.0f} s")
    for fraction in args.fractions:
        print(f"\nnode memory = {fraction} × working set\n{table(runs, fraction)}")
    report = write_report("cache_policies", runs, None)
    if args.seeds > 1 and not args.replay:
        report["summary"] = {"seeds": over_seeds(args, runs)}
        print(f"\nover {args.seeds} traces (seeds 0..{args.seeds - 1}): mean [min, max]")
        print(seeds_table(report["summary"]["seeds"]))
    report["setting"] = {
        **dataclasses.asdict(setting),
        "trace": args.replay or "generated",
        "scale": 1.0,
        "working_set_bytes": ws,
        "nodes": args.nodes,
        "replication": 1,
        "prefetch": not args.no_prefetch,
        "network": "aws",
    }
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=2)
    if args.plot:
        plot(runs, args.plot)
    return report


if __name__ == "__main__":
    main()
