"""Scale-out: rounds past one node's budget, and one round spread over more nodes.

**(a) Weak scaling of the round** — rounds of 10, 100 and 400 clients of ``--params`` float32
parameters each (with a stored base model, a tenth of the clients pulling the other way), on a
local stack of ``--nodes`` cache nodes of ``--memory-mb`` with an explicit cache budget of
``--budget-mb`` (:attr:`StackConfig.budget_bytes`). The defaults (250k parameters: 1 MB a
client; 96 MiB budget; 12 nodes of 512 MB) make the 400-client round's footprint
(:func:`flstore_core.data.blocks.footprint`) ≥ 4× one node's budget, and the stack holds it
twice (both replicas). For each size, on a fresh stack (so each node's peak RSS is this size's):

1. ingest: ``store.put_update`` per client and ``commit_round`` (``ingest_ms``);
2. prefetch through the router, every node's process already started (``prefetch_ms``: the
   block loads on their owners and the default fedavg model, written block by block);
3. check that flstore and objstore-agg give the same selections and models within 1e-6 (the
   largest deviation is in the JSON, ``check``);
4. time flstore-warm (HTTP gateway → router → nodes) against objstore-agg (an always-on
   aggregator reading the round from S3 per request), interleaved, for cosine_select, krum,
   fedavg and trimmed_mean with a β no earlier request used (each repetition and system its
   own, so no model result is ever found in S3).

**(b) Strong scaling** — one round that fits one node (``--strong-clients`` ×
``--strong-params``) served by stacks of 1, 2, 4 and 8 nodes, the router forcing k blocks
(:attr:`StackConfig.min_blocks`; the job's name is chosen so that the k blocks' primaries are
k different nodes, which rendezvous hashing alone does not promise). Two novel requests per
repetition, each through a new :class:`Router` (so it holds no gathered Gram pieces):
trimmed_mean with a new β (every block holder computes and writes its block of the model) and
cosine_select (every block holder answers its Gram pieces; the nodes computed them at prefetch).

Output: ARCHITECTURE §9 (``--json OUT``), each run with ``prefetch_ms`` and ``peak_rss_mb`` (the
largest peak RSS of the node processes, from their ``stats``; objstore-agg's is its process's);
PNG plots beside the JSON. ``--quick`` runs a tiny version (seconds) to check the script.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.report import interleave, parser, summarize, write_report
from benchmarks.scale_data import ROUND, specs_of, write_round
from benchmarks.scale_plot import plot
from evaluation.baselines import Aggregator
from flstore_core.aws import lambda_client
from flstore_core.data.blocks import footprint
from flstore_core.data.codec import decode_update
from flstore_core.protocol import PingOp, StatsOp
from flstore_core.routing.auth import TokenTable
from flstore_core.routing.invoker import NodeInvoker
from flstore_core.routing.placement import round_shard
from flstore_core.routing.planner import RoundPlan, plan_round
from flstore_core.routing.router import Router
from flstore_core.sdk.client import FLStoreClient
from flstore_core.storage.object_store import ObjectStore
from lambdas.local_runtime.s3_server import LocalS3
from lambdas.local_runtime.stack import LocalStack, StackConfig

MiB = 1024 * 1024
BUCKET = "scale"
WORKLOADS = ("cosine_select", "krum", "fedavg", "trimmed_mean")
TOLERANCE = 1e-6


# ---------------------------------------------------------------------- measuring


def vmhwm_mb(pid: int | None) -> float | None:
    """A process's peak resident set (``VmHWM``), in MB; None when it cannot be read."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


def node_peaks(stack: LocalStack) -> list[float | None]:
    """Every node's peak RSS (MB), from its ``stats``."""
    assert stack.router is not None
    return [
        stack.router.node_op(i, StatsOp()).get("peak_rss_mb") for i in range(stack.config.nodes)
    ]


def start_nodes(stack: LocalStack) -> None:
    """Start every node's process (a ping), so prefetch times loading, not process starts."""
    assert stack.router is not None
    for i in range(stack.config.nodes):
        stack.router.node_op(i, PingOp())


def timed_prefetch(stack: LocalStack, job: str) -> float:
    assert stack.router is not None
    t0 = time.perf_counter()
    answers = stack.router.prefetch([round_shard(job, ROUND)])
    ms = (time.perf_counter() - t0) * 1000
    failed = {f: a for f, a in answers.items() if "error" in a}
    if failed:
        raise SystemExit(f"prefetch failed on {sorted(failed)}: {json.dumps(failed)[:400]}")
    return ms


def workload_params(name: str, clients: int) -> dict[str, Any]:
    if name == "cosine_select":
        return {"k": max(3, clients // 10)}
    if name == "krum":
        return {"f": max(1, clients // 10)}
    return {}


def model_of(store: ObjectStore, key: str) -> dict[str, np.ndarray]:
    return {n: np.asarray(v) for n, v in decode_update(store.get_object(key)).tensors.items()}


def model_deviation(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    """The largest difference of two models, relative to each tensor's largest magnitude."""
    if list(a) != list(b):
        raise SystemExit(f"the models' tensors differ: {list(a)[:5]} vs {list(b)[:5]}")
    worst = 0.0
    for name in a:
        x, y = a[name].astype(np.float64), b[name].astype(np.float64)
        scale = max(float(np.abs(y).max()), 1e-30)
        worst = max(worst, float(np.abs(x - y).max()) / scale)
    return worst


def score_deviation(a: dict[str, float], b: dict[str, float]) -> float:
    if sorted(a) != sorted(b):
        raise SystemExit("the two systems scored different clients")
    return max(abs(a[c] - b[c]) / max(abs(b[c]), 1e-30) for c in a)


def check_agreement(
    store: ObjectStore,
    flstore: FLStoreClient,
    objstore: FLStoreClient,
    job: str,
    clients: int,
) -> dict[str, Any]:
    """flstore and objstore-agg must give the same selections, and scores and models within
    :data:`TOLERANCE` (relative), before anything is timed. Both write a model result under
    the same key: flstore's is read, deleted, then objstore-agg's written and read."""
    out: dict[str, Any] = {}
    for name in WORKLOADS:
        params = workload_params(name, clients)
        if name == "trimmed_mean":
            params = {"beta": 0.3}  # used by no timed request
        got = flstore.run(job, name, round=ROUND, **params)["result"]
        mine = model_of(store, got["model_key"]) if "model_key" in got else None
        if mine is not None:
            store.delete_results([got["model_key"]])
        ref = objstore.run(job, name, round=ROUND, **params)["result"]
        entry: dict[str, Any] = {}
        if "selected" in got:
            if got["selected"] != ref["selected"]:
                raise SystemExit(
                    f"{name}: flstore selected {got['selected']}, objstore-agg {ref['selected']}"
                )
            entry["selected_equal"] = True
            entry["max_score_rel_dev"] = score_deviation(got["scores"], ref["scores"])
        if mine is not None:
            if got["model_key"] != ref["model_key"]:
                raise SystemExit(
                    f"{name}: model keys differ: {got['model_key']} {ref['model_key']}"
                )
            entry["max_model_rel_dev"] = model_deviation(mine, model_of(store, ref["model_key"]))
        worst = max(v for k, v in entry.items() if k.startswith("max_"))
        if worst > TOLERANCE:
            raise SystemExit(f"{name}: flstore and objstore-agg differ by {worst:.2e} > 1e-6")
        out[name] = entry
        devs = ", ".join(f"{k}={v:.1e}" for k, v in entry.items() if k.startswith("max_"))
        print(f"    {name}: agree ({devs})", flush=True)
    return out


def weak_call(
    client: FLStoreClient,
    job: str,
    name: str,
    clients: int,
    offset: float,
    counter: dict[str, int],
) -> Callable[[], float]:
    """One timed request of weak scaling; trimmed_mean's β is ``0.1 + 0.01·i + offset`` in
    repetition ``i`` (flstore's offset 0, objstore-agg's 0.005: no β is ever used twice, so
    neither system finds the other's model result in S3)."""

    def once() -> float:
        params = workload_params(name, clients)
        if name == "trimmed_mean":
            params = {"beta": round(0.1 + 0.01 * counter["n"] + offset, 4)}
        t0 = time.perf_counter()
        client.run(job, name, round=ROUND, **params)
        ms = (time.perf_counter() - t0) * 1000
        if name == "trimmed_mean" and offset:
            counter["n"] += 1  # objstore-agg runs after flstore in each repetition
        return ms

    return once


@dataclass
class WeakPoint:
    """One weak-scaling stack's measurements: the round's shape, the agreement check, the
    samples of every workload on both systems, the prefetch and the peak memories."""

    shape: dict[str, Any]
    check: dict[str, Any]
    samples: dict[str, list[float]]
    prefetch_ms: float
    node_peaks: list[float | None]
    agg_peak: float | None

    @property
    def node_peak(self) -> float | None:
        return max((p for p in self.node_peaks if p is not None), default=None)


def measure_weak(args: Any, s3: str, clients: int, budget: int) -> WeakPoint:
    """A stack of ``args.nodes`` for a round of ``clients``: ingest, prefetch, check that both
    systems agree, then the interleaved repetitions of every workload."""
    job = f"weak-{clients}"
    config = StackConfig(
        nodes=args.nodes,
        replication=2,
        memory_mb=args.memory_mb,
        budget_bytes=budget,
        bucket=BUCKET,
        s3_endpoint=s3,
        timeout_s=900,
    )
    print(f"\n(a) {clients} clients x {args.params:,} parameters", flush=True)
    with LocalStack(config) as stack:
        assert stack.store is not None and stack.router is not None
        ingest_ms = write_round(stack.store, job, clients, args.params)
        plan: RoundPlan = stack.router.plan_round(job, ROUND)
        replicas = sorted({len(b.owners) for b in plan.blocks})
        print(
            f"  ingested in {ingest_ms / 1000:.1f} s; footprint "
            f"{plan.footprint / MiB:.0f} MiB = {plan.footprint / budget:.2f} budgets; "
            f"{len(plan.blocks)} block(s), replicas {replicas}",
            flush=True,
        )
        start_nodes(stack)
        prefetch_ms = timed_prefetch(stack, job)
        print(f"  prefetch {prefetch_ms:.0f} ms", flush=True)
        with Aggregator("s3", s3, BUCKET) as agg:
            flstore = FLStoreClient(stack.gateway_url, stack.token, timeout=900)
            objstore = FLStoreClient(agg.url, timeout=900)
            print("  checking that flstore and objstore-agg agree:", flush=True)
            check = check_agreement(stack.store, flstore, objstore, job, clients)
            measured: dict[str, Callable[[], float]] = {}
            counter = {"n": 0}
            for name in WORKLOADS:
                for system, client, offset in (
                    ("flstore-warm", flstore, 0.0),
                    ("objstore-agg", objstore, 0.005),
                ):
                    measured[f"{name}/{system}"] = weak_call(
                        client, job, name, clients, offset, counter
                    )
            samples = interleave(measured, args.repetitions, warmup=0)
            agg_peak = vmhwm_mb(agg.pid)
        peaks = node_peaks(stack)
    shape = {
        "clients": clients,
        "params": args.params,
        "nodes": args.nodes,
        "memory_mb": args.memory_mb,
        "budget_mb": round(budget / MiB, 2),
        "footprint_mb": round(plan.footprint / MiB, 1),
        "footprint_budgets": round(plan.footprint / budget, 2),
        "blocks": len(plan.blocks),
        "replicas": replicas,
        "ingest": "store.put_update + commit_round",
        "ingest_ms": round(ingest_ms, 1),
    }
    return WeakPoint(shape, check, samples, prefetch_ms, peaks, agg_peak)


def weak_runs(point: WeakPoint) -> list[dict[str, Any]]:
    """One run per workload and system of a weak-scaling point (ARCHITECTURE §9)."""
    clients = point.shape["clients"]
    runs = []
    for key, ms in point.samples.items():
        name, system = key.split("/")
        runs.append(
            {
                "system": system,
                "metric": "latency_ms",
                **summarize(ms),
                "workload": name,
                "scaling": "weak",
                **point.shape,
                "workload_params": "beta new per request"
                if name == "trimmed_mean"
                else workload_params(name, clients),
                "prefetch_ms": round(point.prefetch_ms, 1) if system == "flstore-warm" else None,
                "peak_rss_mb": point.node_peak if system == "flstore-warm" else point.agg_peak,
                "agrees_within_1e-6": True,
                "samples_ms": [round(x, 1) for x in ms],
            }
        )
    return runs


def weak_scaling(args: Any, s3: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """(a) One stack per round size: FLStore and objstore-agg on each of ``args.clients``."""
    budget = int(args.budget_mb * MiB)
    summary: dict[str, Any] = {}
    for clients in args.clients:
        point = measure_weak(args, s3, clients, budget)
        summary[str(clients)] = {
            **point.shape,
            "node_peak_rss_mb": point.node_peaks,
            "check": point.check,
        }
        runs.extend(weak_runs(point))
        for name in WORKLOADS:
            fl = np.median(point.samples[f"{name}/flstore-warm"])
            ob = np.median(point.samples[f"{name}/objstore-agg"])
            print(
                f"  {name:>14}: flstore-warm {fl:8.1f} ms  objstore-agg {ob:8.1f} ms  "
                f"({ob / fl:.1f}x)",
                flush=True,
            )
        print(
            f"  peak RSS: nodes {point.node_peak} MB, objstore-agg {point.agg_peak} MB",
            flush=True,
        )
    return summary


def spread_job(clients: int, n_params: int, counts: list[int], budget: int) -> str:
    """A job name whose plan with ``k`` forced blocks on ``k`` nodes has ``k`` different
    primaries for every ``k`` (rendezvous hashing may put two blocks on one node)."""
    specs = specs_of(n_params)
    for j in range(200_000):
        job = f"strong-{j}"
        if all(
            len(
                {
                    b.owners[0]
                    for b in plan_round(
                        job,
                        ROUND,
                        specs,
                        clients,
                        nodes=k,
                        replication=2,
                        budget=budget,
                        blocks=k,
                    ).blocks
                }
            )
            == k
            for k in counts
            if k > 1
        ):
            return job
    raise SystemExit("no job name spreads the blocks over distinct primaries")


class RouterFactory:
    """New routers on a stack's nodes: no gathered Gram pieces, no memory of written models."""

    def __init__(self, stack: LocalStack) -> None:
        assert stack.store is not None and stack.router is not None
        self.store, self.config = stack.store, stack.router.config
        self.endpoint, self.token = stack.lambda_endpoint, stack.token
        self.memory_mb = stack.config.memory_mb

    def __call__(self) -> Router:
        return Router(
            self.store,
            NodeInvoker(lambda_client(self.endpoint), self.memory_mb),
            TokenTable.with_tokens({self.token: ["*"]}),
            self.config,
        )


def strong_call(
    fresh: RouterFactory,
    auth: str,
    job: str,
    name: str,
    beta: list[int],
    invocations: list[int],
) -> Callable[[], float]:
    """One novel request through a new router (trimmed_mean: β = 0.2 + 0.001·i, i counting
    every strong-scaling request)."""

    def once() -> float:
        if name == "trimmed_mean":
            params: dict[str, Any] = {"beta": round(0.2 + 0.001 * beta[0], 4)}
            beta[0] += 1
        else:
            params = {"k": 3}
        router = fresh()
        body = json.dumps({"round": ROUND, "params": params})
        t0 = time.perf_counter()
        answer = router.run(auth, job, name, body)
        ms = (time.perf_counter() - t0) * 1000
        invocations.append(len(answer["meta"]["nodes"]))
        return ms

    return once


def measure_strong(
    args: Any, s3: str, job: str, k: int, budget: int, beta: list[int]
) -> tuple[
    RoundPlan, list[int], float, dict[str, list[float]], dict[str, list[int]], list[float | None]
]:
    """A stack of ``k`` nodes (``k`` blocks): prefetch, then novel requests through a new
    router each; the plan, its primaries, the prefetch, the samples, each request's node
    invocations and the nodes' peak memory."""
    config = StackConfig(
        nodes=k,
        replication=2,
        memory_mb=args.memory_mb,
        budget_bytes=budget,
        bucket=BUCKET,
        s3_endpoint=s3,
        timeout_s=900,
        min_blocks=k if k > 1 else None,
    )
    with LocalStack(config) as stack:
        assert stack.store is not None and stack.router is not None
        plan = stack.router.plan_round(job, ROUND)
        primaries = sorted({b.owners[0] for b in plan.blocks})
        start_nodes(stack)
        prefetch_ms = timed_prefetch(stack, job)
        auth = f"Bearer {stack.token}"
        fresh = RouterFactory(stack)
        invocations: dict[str, list[int]] = {"trimmed_mean": [], "cosine_select": []}
        samples = interleave(
            {
                n: strong_call(fresh, auth, job, n, beta, invocations[n])
                for n in ("trimmed_mean", "cosine_select")
            },
            args.repetitions,
            warmup=1,
        )
        peaks = node_peaks(stack)
    return plan, primaries, prefetch_ms, samples, invocations, peaks


def strong_scaling(args: Any, s3: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """(b) One round that fits one node, on 1, 2, 4 … nodes: the same novel requests."""
    budget = int(args.budget_mb * MiB)
    clients, n_params = args.strong_clients, args.strong_params
    need = footprint(clients, n_params)
    if need > budget:
        raise SystemExit(f"the strong-scaling round ({need / MiB:.0f} MiB) must fit one node")
    job = spread_job(clients, n_params, args.strong_nodes, budget)
    bootstrap = ObjectStore(BUCKET, endpoint_url=s3)
    ingest_ms = write_round(bootstrap, job, clients, n_params)
    bootstrap.close()
    print(
        f"\n(b) one round of {clients} clients x {n_params:,} parameters "
        f"({need / MiB:.0f} MiB, fits one node's {budget / MiB:.0f} MiB), job {job}",
        flush=True,
    )
    summary: dict[str, Any] = {
        "job": job,
        "footprint_mb": round(need / MiB, 1),
        "ingest_ms": ingest_ms,
    }
    beta = [0]
    for k in args.strong_nodes:
        plan, primaries, prefetch_ms, samples, invocations, peaks = measure_strong(
            args, s3, job, k, budget, beta
        )
        node_peak = max((p for p in peaks if p is not None), default=None)
        line = []
        for name, ms in samples.items():
            runs.append(
                {
                    "system": "flstore-novel",
                    "metric": "latency_ms",
                    **summarize(ms),
                    "workload": name,
                    "scaling": "strong",
                    "clients": clients,
                    "params": n_params,
                    "nodes": k,
                    "blocks": len(plan.blocks),
                    "primaries": len(primaries),
                    "memory_mb": args.memory_mb,
                    "budget_mb": round(budget / MiB, 2),
                    "footprint_mb": round(need / MiB, 1),
                    "request": "a new Router per request; trimmed_mean with a new beta",
                    "invocations_p50": float(np.median(invocations[name])),
                    "prefetch_ms": round(prefetch_ms, 1),
                    "peak_rss_mb": node_peak,
                    "samples_ms": [round(x, 1) for x in ms],
                }
            )
            line.append(f"{name} {np.median(ms):8.1f} ms")
        print(
            f"  {k} node(s), {len(plan.blocks)} block(s) on {len(primaries)} primaries: "
            f"{', '.join(line)}; prefetch {prefetch_ms:.0f} ms; node peak RSS {node_peak} MB",
            flush=True,
        )
    return summary


def main() -> None:
    p = parser(__doc__ or "")
    p.add_argument(
        "--clients", type=lambda s: [int(x) for x in s.split(",")], default=[10, 100, 400]
    )
    p.add_argument("--params", type=int, default=250_000, help="float32 parameters per client")
    p.add_argument("--nodes", type=int, default=12, help="cache nodes of the weak-scaling stack")
    p.add_argument("--memory-mb", type=int, default=512, help="memory of each cache node")
    p.add_argument("--budget-mb", type=float, default=96.0, help="cache budget of each node (MiB)")
    p.add_argument("--strong-clients", type=int, default=100)
    p.add_argument("--strong-params", type=int, default=200_000)
    p.add_argument(
        "--strong-nodes", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4, 8]
    )
    p.add_argument("--skip-weak", action="store_true")
    p.add_argument("--skip-strong", action="store_true")
    p.add_argument("--quick", action="store_true", help="a tiny run that checks the script")
    args = p.parse_args()
    if args.quick:
        args.clients, args.params, args.nodes, args.budget_mb = [6, 12], 20_000, 4, 1.0
        args.strong_clients, args.strong_params, args.strong_nodes = 8, 8_000, [1, 2]
        args.repetitions = min(args.repetitions, 2)
    out_dir = Path(os.path.dirname(os.path.abspath(args.json)) if args.json else "bench-out")
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    load_before = os.getloadavg()
    runs: list[dict[str, Any]] = []
    details: dict[str, Any] = {}
    with LocalS3() as s3:
        bucket = ObjectStore(BUCKET, endpoint_url=s3.url)
        bucket.ensure_bucket()
        bucket.close()
        if not args.skip_weak:
            details["weak"] = weak_scaling(args, s3.url, runs)
        if not args.skip_strong:
            details["strong"] = strong_scaling(args, s3.url, runs)
    report = write_report("scale", runs, None)
    report["setup"] = {
        **details,
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "wall_s": round(time.perf_counter() - t0, 1),
        "tolerance": TOLERANCE,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
        print(f"\nwrote {args.json}")
    for path in plot(runs, out_dir, WORKLOADS):
        print(f"wrote {path}")
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
