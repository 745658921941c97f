"""FLStore warm and cold against the two aggregator baselines, through the full HTTP path.

One round of ``--clients`` (10) client updates of ``--params`` (ResNet-18's 11.7M) float32
parameters, different per client, with an initial model as the round's base. Each request is
``cosine_select`` (k=3) or ``fedavg``, sent over HTTP by :class:`FLStoreClient`:

- ``flstore-warm``: to the local gateway → router → cache node, right after every node was
  emptied and the round prefetched — what the first request after ingestion costs: the data
  and its shared artifacts are in memory, and prefetch had the round's primary materialise the
  default FedAvg model in ``results/`` (the PUT happens at prefetch, not in the request);
- ``flstore-cold``: to the gateway after every node was emptied, so the node loads from S3;
- ``objstore-agg``: to the S3-backed aggregator process;
- ``cache-agg``: to the Redis-backed aggregator process;
- ``flstore-repeat``: the same request again on the warm node, right after ``flstore-warm``'s
  (the answer the node kept: a repeated request, told apart from the first).

All systems run interleaved in one run (``benchmarks.report.interleave``); the untimed
preparation (evict, prefetch) happens outside the measured call. Before timing, the four
systems must return the same ``result`` for each workload (fedavg's ``model_key`` too). Each run
records the client-side latency p50/p95 and the median server-side breakdown
(``node_timing_ms`` for FLStore, ``fetch_ms``/``compute_ms`` for the aggregators).

``--network aws|none|PATH`` (off by default) puts AWS's hops into the stack and both
aggregators alike (:mod:`lambdas.local_runtime.network`); the JSON's top-level ``network``
says which table was used.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.codec import RESNET18_PARAMS, resnet18_sized_update
from benchmarks.report import (
    add_network_flag,
    interleave,
    network_json,
    parser,
    summarize,
    write_report,
)
from evaluation.baselines import Aggregator, RedisServer, populate_redis
from flstore_core.data.codec import Update
from flstore_core.protocol import EvictOp
from flstore_core.routing.placement import round_shard
from flstore_core.sdk.client import FLStoreClient
from flstore_core.workloads import get
from lambdas.local_runtime.stack import LocalStack, StackConfig

JOB = "bench"
ROUND = 0
WORKLOADS: dict[str, dict[str, Any]] = {"cosine_select": {"k": 3}, "fedavg": {}}
# FLStore-warm p50 as a share of each baseline's p50: the targets this benchmark checks
TARGETS = {
    "cosine_select": {"objstore-agg": 0.10, "cache-agg": 0.25},
    "fedavg": {"objstore-agg": 0.25, "cache-agg": 0.50},
}


def client_update(seed: int, n_params: int) -> Update:
    """A ResNet-18-sized update (or a smaller one of the same kind), different per seed."""
    if n_params == RESNET18_PARAMS:
        update = resnet18_sized_update(seed)
    else:
        rng = np.random.default_rng(seed)
        head = min(1000, n_params // 10)
        update = Update(
            {
                "body.weight": (rng.standard_normal(n_params - head) * 0.05).astype(np.float32),
                "fc.weight": (rng.standard_normal(head) * 0.05).astype(np.float32),
            }
        )
    update.num_examples = 100 + 37 * (seed % 11)  # unequal, so fedavg's weights matter
    update.metrics = {"loss": 0.5 + 0.01 * seed}
    return update


def write_round(stack: LocalStack, clients: int, n_params: int) -> int:
    """Store the initial model and one committed round; returns the round's stored bytes."""
    assert stack.store is not None
    stack.store.put_initial(JOB, client_update(10_000, n_params))
    for i in range(clients):
        stack.store.put_update(JOB, ROUND, f"client-{i:02d}", client_update(i, n_params))
    return stack.store.commit_round(JOB, ROUND).stored_bytes


class Systems:
    """The measured call of every system: prepare (untimed), send one request (timed)."""

    def __init__(self, stack: LocalStack, objstore: Aggregator, cache: Aggregator) -> None:
        self.stack = stack
        self.flstore = FLStoreClient(stack.gateway_url, stack.token, timeout=900)
        self.objstore = FLStoreClient(objstore.url, timeout=900)
        self.cache = FLStoreClient(cache.url, timeout=900)
        self.answers: dict[str, list[dict[str, Any]]] = {}

    def evict_all(self) -> None:
        assert self.stack.router is not None
        for i in range(self.stack.config.nodes):
            self.stack.router.node_op(i, EvictOp(all=True))

    def prefetch(self) -> None:
        assert self.stack.router is not None
        self.stack.router.prefetch([round_shard(JOB, ROUND)])

    def request(self, system: str, workload: str) -> dict[str, Any]:
        """Prepare ``system`` (untimed), send one request; returns the answer with its latency."""
        params = WORKLOADS[workload]
        client = {"objstore-agg": self.objstore, "cache-agg": self.cache}.get(system, self.flstore)
        if system in ("flstore-warm", "flstore-cold"):
            self.evict_all()
        if system == "flstore-warm":
            self.prefetch()
        t0 = time.perf_counter()
        answer = client.run(JOB, workload, round=ROUND, **params)
        answer["client_ms"] = (time.perf_counter() - t0) * 1000.0
        cache = answer["meta"].get("cache")
        expected = {"flstore-cold": "miss"}.get(system, "hit")
        if system.startswith("flstore") and cache != expected:
            raise SystemExit(f"{system} {workload}: node answered cache={cache!r}, not {expected}")
        self.answers.setdefault(f"{workload}/{system}", []).append(answer)
        return answer

    def measure(self, system: str, workload: str) -> Callable[[], float]:
        return lambda: float(self.request(system, workload)["client_ms"])


def check_same_results(systems: Systems, names: list[str]) -> None:
    """Every system must answer the same ``result`` for each workload before anything is timed."""
    for workload in WORKLOADS:
        results = {s: systems.request(s, workload)["result"] for s in names}
        reference = results[names[0]]
        for system, result in results.items():
            if result != reference:
                raise SystemExit(
                    f"{workload}: {system} answered {json.dumps(result)[:400]}\n"
                    f"but {names[0]} answered {json.dumps(reference)[:400]}"
                )
        shown = reference.get("selected", reference.get("model_key"))
        print(f"  {workload}: all {len(names)} systems agree ({shown})", flush=True)


def breakdown(answers: list[dict[str, Any]]) -> dict[str, float]:
    """Median server-side timings of a run's answers."""
    keys: dict[str, list[float]] = {}
    for a in answers:
        meta = a["meta"]
        parts = {"server_latency_ms": meta["latency_ms"]}
        for name, value in (meta.get("node_timing_ms") or {}).items():
            parts[f"node_{name}_ms"] = value
        for name in ("fetch_ms", "compute_ms"):
            if name in meta:
                parts[name] = meta[name]
        for name, value in parts.items():
            keys.setdefault(name, []).append(float(value))
    return {k: round(statistics.median(v), 1) for k, v in keys.items()}


def main() -> None:
    p = parser(__doc__ or "")
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--params", type=int, default=RESNET18_PARAMS, help="parameters per update")
    p.add_argument("--memory-mb", type=int, default=4096, help="memory of each cache node")
    add_network_flag(p)
    args = p.parse_args()
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)

    network = args.network
    config = StackConfig(
        nodes=2,
        replication=2,
        memory_mb=args.memory_mb,
        bucket="warm-vs-cold",
        network=network,
    )
    print(f"{args.clients} clients x {args.params:,} float32 parameters", flush=True)
    with LocalStack(config) as stack, RedisServer() as redis_server:
        assert stack.store is not None
        t0 = time.perf_counter()
        stored = write_round(stack, args.clients, args.params)
        redis = redis_server.client()
        populate_redis(stack.store, redis, JOB, ROUND)
        redis.close()
        print(f"round written: {stored / 1e6:.0f} MB stored ({time.perf_counter() - t0:.1f} s)")
        with (
            Aggregator("s3", stack.s3_endpoint, config.bucket, network=network) as objstore,
            Aggregator(
                "redis", stack.s3_endpoint, config.bucket, redis_server.url, network=network
            ) as cache,
        ):
            systems = Systems(stack, objstore, cache)
            names = ["flstore-warm", "flstore-cold", "objstore-agg", "cache-agg"]
            print("checking that every system answers the same result:", flush=True)
            check_same_results(systems, names)
            systems.answers.clear()
            measured: dict[str, Callable[[], float]] = {}
            for workload in WORKLOADS:
                for system in names:
                    measured[f"{workload}/{system}"] = systems.measure(system, workload)
                    if system == "flstore-warm":
                        repeat = "flstore-repeat"  # right after flstore-warm: same node
                        measured[f"{workload}/{repeat}"] = systems.measure(repeat, workload)
            samples = interleave(measured, args.repetitions, warmup=0)

    runs = []
    for key, ms in samples.items():
        workload, system = key.split("/")
        runs.append(
            {
                "system": system,
                "metric": "latency_ms",
                **summarize(ms),
                "workload": workload,
                "clients": args.clients,
                "params": get(workload).validate(WORKLOADS[workload]),
                "model_params": args.params,
                "round_stored_mb": round(stored / 1e6, 1),
                "server_ms": breakdown(systems.answers[key]),
                "samples_ms": [round(x, 1) for x in ms],
            }
        )
    report = write_report("warm_vs_cold", runs, None)
    report["network"] = network_json(network)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=2)
    print_table(runs)
    if args.json:
        print(f"\nwrote {args.json}")


def print_table(runs: list[dict[str, Any]]) -> None:
    """p50/p95 per workload and system, the server-side breakdown, and the target ratios."""
    for workload in WORKLOADS:
        print(f"\n{workload}")
        print(f"  {'system':<20} {'p50 ms':>9} {'p95 ms':>9} {'n':>3}  server-side medians (ms)")
        by = {r["system"]: r for r in runs if r["workload"] == workload}
        for system, r in by.items():
            parts = ", ".join(f"{k}={v:g}" for k, v in r["server_ms"].items())
            print(f"  {system:<20} {r['p50']:>9.1f} {r['p95']:>9.1f} {r['n']:>3}  {parts}")
        warm = by["flstore-warm"]["p50"]
        for baseline, target in TARGETS[workload].items():
            ratio = warm / by[baseline]["p50"]
            verdict = "meets" if ratio <= target else "MISSES"
            print(
                f"  flstore-warm / {baseline:<12} p50 = {ratio:6.1%}  "
                f"({verdict} the target <= {target:.0%})"
            )


if __name__ == "__main__":
    main()
