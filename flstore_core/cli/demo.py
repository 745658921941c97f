"""``flstore demo``: the main job on the embedded local stack.

Starts the local stack (moto S3, cache-node functions behind the local Lambda endpoint, router,
gateway), writes a synthetic job through the store — R rounds × C clients of a CNN-like state
dict around a stored initial model — prefetches the latest round onto its owners, and runs the
workloads through the HTTP API: FLStore warm (prefetched), FLStore cold (caches evicted, the
node loads from S3) and, when available, the two aggregator baselines, side by side.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from flstore_core.codec import Update
from flstore_core.manifest import JobSpec

JOB = "demo"


def synthetic_shapes(params: int) -> dict[str, tuple[int, ...]]:
    """CNN-like state-dict shapes adding up to about ``params`` parameters."""
    conv = max(1, params // 2 // (64 * 9))
    fc = max(1, (params - conv * 64 * 9) // 10)
    return {
        "conv.weight": (conv, 64, 3, 3),
        "conv.bias": (conv,),
        "fc.weight": (10, fc),
        "fc.bias": (10,),
    }


def synthetic_round(
    rng: np.random.Generator, base: dict[str, np.ndarray], clients: int, outlier: int
) -> list[Update]:
    """Client updates: base plus a shared direction plus noise; one client goes its own way."""
    direction = {n: rng.standard_normal(w.shape).astype(np.float32) for n, w in base.items()}
    out = []
    for i in range(clients):
        sign = -1.0 if i == outlier else 1.0
        tensors = {
            n: (w + 0.01 * (sign * direction[n] + 0.5 * rng.standard_normal(w.shape))).astype(
                np.float32
            )
            for n, w in base.items()
        }
        out.append(
            Update(
                tensors,
                num_examples=int(rng.integers(50, 200)),
                metrics={
                    "loss": float(rng.uniform(0.1, 2.0)),
                    "duration_s": float(rng.uniform(1, 5)),
                },
            )
        )
    return out


@dataclass
class Timing:
    samples: list[float]
    cost: float

    @property
    def p50(self) -> float:
        return float(np.percentile(self.samples, 50))


def _measure(fn: Callable[[], dict[str, Any]], reps: int) -> tuple[Timing, dict[str, Any]]:
    samples, costs, last = [], [], {}
    for _ in range(reps):
        t0 = time.perf_counter()
        last = fn()
        samples.append((time.perf_counter() - t0) * 1000)
        costs.append(float(last["meta"]["cost_usd"]))
    return Timing(samples, float(np.mean(costs))), last


def run_demo(
    rounds: int = 3, clients: int = 10, params: int = 2_000_000, repetitions: int = 3
) -> dict[str, Any]:
    """Run the demo; returns the measured figures per workload and system."""
    from flstore_core.client import FLStoreClient
    from flstore_core.placement import round_shard
    from lambdas.local_runtime.stack import LocalStack, StackConfig

    console = Console()
    rng = np.random.default_rng(0)
    shapes = synthetic_shapes(params)
    base = {n: (rng.standard_normal(s) * 0.1).astype(np.float32) for n, s in shapes.items()}
    outlier = clients - 1
    report: dict[str, Any] = {"workloads": {}}
    with LocalStack(StackConfig(nodes=4, replication=2, memory_mb=4096)) as stack:
        assert stack.store is not None and stack.router is not None
        store, router = stack.store, stack.router
        console.print(
            f"local stack: gateway [bold]{stack.gateway_url}[/bold], "
            f"{stack.config.nodes} cache nodes, S3 {stack.s3_endpoint}"
        )
        store.put_job_spec(JobSpec(JOB, hyperparameters={"lr": 0.05}))
        store.put_initial(JOB, Update(dict(base)))
        raw = 0
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task("writing rounds", total=rounds)
            for r in range(rounds):
                updates = synthetic_round(rng, base, clients, outlier)
                entries = [
                    store.put_update(JOB, r, f"client-{i:02d}", u) for i, u in enumerate(updates)
                ]
                raw += store.commit_round(JOB, r, entries).raw_bytes
                agg = {n: np.mean([u.tensors[n] for u in updates], axis=0) for n in base}
                store.put_global(JOB, r, Update(agg))
                base = agg
                progress.advance(task)
        last = rounds - 1
        router.prefetch([round_shard(JOB, last)])
        console.print(
            f"wrote {rounds} rounds × {clients} clients ({raw / 1e6:.0f} MB raw), "
            f"prefetched round {last}"
        )
        client = FLStoreClient(stack.gateway_url, stack.token)

        def evict_all() -> None:
            for i in range(stack.config.nodes):
                router.node_op(i, {"op": "evict", "all": True})

        requests: dict[str, dict[str, Any]] = {"cosine_select": {"k": 3}, "fedavg": {}}
        for name, prm in requests.items():

            def warm_call(name: str = name, prm: dict[str, Any] = prm) -> dict[str, Any]:
                return client.run(JOB, name, round=last, **prm)

            def cold(name: str = name, prm: dict[str, Any] = prm) -> dict[str, Any]:
                evict_all()
                return client.run(JOB, name, round=last, **prm)

            warm, answer = _measure(warm_call, repetitions)
            cold_t, _ = _measure(cold, repetitions)
            router.prefetch([round_shard(JOB, last)])
            report["workloads"][name] = {
                "result": answer["result"],
                "flstore-warm": warm,
                "flstore-cold": cold_t,
            }
    _print(console, report, clients, outlier)
    return report


def _print(console: Console, report: dict[str, Any], clients: int, outlier: int) -> None:
    table = Table(title="FLStore demo: workloads through the HTTP API (p50 latency, cost/request)")
    for col in ("workload", "found", "flstore-warm", "flstore-cold"):
        table.add_column(col, justify="right" if col.startswith("flstore") else "left")
    for name, row in report["workloads"].items():
        result = row["result"]
        found = (
            f"selected {', '.join(result['selected'])}"
            if "selected" in result
            else f"model {result.get('model_key', '')[-28:]}"
        )
        cells = [
            f"{row[s].p50:.1f} ms  ${row[s].cost:.2e}" for s in ("flstore-warm", "flstore-cold")
        ]
        table.add_row(name, found, *cells)
    console.print(table)
    console.print(f"(client-{outlier:02d} was generated as the outlier of {clients} clients)")
