"""Requests nothing precomputed answers: every workload of the catalogue, each
request with params no earlier request of the run used.

Setting (the paper's): a ``resnet18_cifar`` job, one round of ``--clients`` (10) client models
of 11.2M parameters (44.7 MB each in float32; BatchNorm buffers included; a tenth of the clients
pull the other way), its initial model stored as the round's base, a stored global model (what
``inference`` serves) and a generated CIFAR-shaped validation set of ``--validation`` images
(3×32×32, random labels; what the model-based workloads evaluate on). The round is prefetched
through the router before anything is timed, as ingestion's prefetch does after a commit. The
``meta`` and ``client`` workloads (which read per-round summaries, never tensors) run on a job
of ``--meta-rounds`` × ``--meta-clients`` updates of a small vector with loss and duration
metrics.

Systems, interleaved in one run, each over HTTP: ``flstore-warm`` (gateway → router → cache
node holding the prefetched round), ``objstore-agg`` (an always-on aggregator reading the round
from S3 per request) and ``cache-agg`` (the same reading a real Redis); and ``floor``: one numpy
pass over the round's matrix — its ``(n, d)`` float32 sum along axis 0 — timed in a process
started as the cache nodes are (same interpreter, environment and BLAS threads), the least any
coordinate-wise model computation over the round costs.

What makes a request new: repetition ``i`` of a workload draws params no earlier request of the
run used (:func:`novel_params`; e.g. fedavg over a new client subset, trimmed_mean with a new β
and subset, krum with a new f). ``flstore-warm`` runs them first, so nothing FLStore stored or
memoised for an earlier request answers it: only the round's shared artifacts (the Gram matrix,
the mean, model evaluations memoised by other requests) are reused, which is the design. The
baselines keep nothing between requests (:mod:`evaluation.baselines.aggregator`), so they then
run the *same* params — which lets every repetition compare the three answers (``agree``).
contribution_loo's only param (``weighted``) has two values, so it runs two repetitions, one
with each.

Each flstore run carries, from the answering node's ``meta.node_timing_ms``: ``node_compute_ms``
(median of ``compute``: everything after the round was in hand, the model result's encoding and
PUT included), ``write_ms`` (median of ``write``: that encoding and PUT) and ``compute_ms`` (median
of their difference: the workload's own computation, what the floor bounds). On a path answered
by several nodes (a sharded round, a scatter over nodes) the router reports no node timing and
they are null.

``--network aws|none|PATH`` (off by default) puts AWS's hops into the stack and both
aggregators alike (:mod:`lambdas.local_runtime.network`); the floor stays a computation on the
round already in memory, paced by nothing. The JSON's top-level ``network`` says which table
was used.

Each run's ``cost_usd`` is the median of its answers' own ``meta.cost_usd``, per request: on
flstore-warm the node invocations, the router function's own invocation, API Gateway and S3
(``meta.cost_breakdown``; the round's prefetch and keep-warm are not spread over requests here —
``benchmarks/paper.py``'s ``cost_usd`` does that); on a baseline its servers' time for the
request and its S3 GETs.

Output: ARCHITECTURE §9 (``--json OUT``) with a ``summary`` of the p50 ratios and the issue's
targets. ``--quick`` runs a small version (a digits_cnn round) in well under a minute.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.novel_data import (
    BIG,
    BUCKET,
    META,
    ROUND,
    client_ids,
    novel_params,
    write_meta_job,
    write_model_job,
)
from benchmarks.novel_floor import (
    TOLERANCE,
    close,
    floor_check,
    floor_worker,
    model_deviation,
    model_vector,
    run_floor,
)
from benchmarks.report import (
    add_network_flag,
    network_json,
    parser,
    summarize,
    write_report,
)

SYSTEMS = ("flstore-warm", "objstore-agg", "cache-agg")
# the model-producing round workloads the ratio targets name
MODEL_TARGETS = ("fedavg", "trimmed_mean", "krum", "multi_krum", "fltrust", "personalize")

# how each workload's requests are made new (the README table's column)
HOW_NEW: dict[str, str] = {
    "fedavg": "a new client subset (two clients dropped), weighted alternating",
    "cosine_select": "a new (k, use_delta)",
    "accuracy_select": "a new k",
    "malicious_cosine": "a new cosine threshold",
    "krum": "a new (f, include_buffers)",
    "multi_krum": "a new (f, m, client subset)",
    "trimmed_mean": "a new beta, over all clients or a new subset",
    "fltrust": "a new server seed and learning rate",
    "kmeans": "a new (k, seed)",
    "cfl_split": "new eps_1 / eps_2",
    "contribution_loo": "its only param (weighted) has two values: two requests, one each",
    "contribution_shapley": "a new permutation seed",
    "personalize": "a new (client, peers, by)",
    "feddebug": "a new seed of the random inputs",
    "inference": "a new batch of inputs",
    "oort_select": "a new (k, seed)",
    "incentive": "a new budget",
    "reputation": "a new decay",
}


@dataclass
class Observed:
    """One workload's measurements over its repetitions, per system where it has one."""

    samples: dict[str, list[float]] = field(default_factory=lambda: {s: [] for s in SYSTEMS})
    costs: dict[str, list[float]] = field(default_factory=lambda: {s: [] for s in SYSTEMS})
    compute: list[float] = field(default_factory=list)  # FLStore's node compute
    write: list[float] = field(default_factory=list)  # ... of which the model write
    baseline_compute: dict[str, list[float]] = field(
        default_factory=lambda: {s: [] for s in SYSTEMS[1:]}
    )
    used: list[dict[str, Any]] = field(default_factory=list)  # the params, as generated


class Bench:
    """Systems, jobs and what the run measured."""

    def __init__(self, args: Any, stack: Any, urls: dict[str, str], classes: dict[str, str]):
        from flstore_core.sdk.client import FLStoreClient

        self.args = args
        self.stack = stack
        self.store = stack.store
        self.classes = classes
        self.clients = {
            "flstore-warm": FLStoreClient(stack.gateway_url, stack.token, timeout=1800),
            "objstore-agg": FLStoreClient(urls["objstore-agg"], timeout=1800),
            "cache-agg": FLStoreClient(urls["cache-agg"], timeout=1800),
        }
        manifest = self.store.get_manifest(BIG, ROUND)
        self.float_names = [s.name for s in manifest.tensors if s.dtype in ("F32", "F16", "BF16")]
        self.model = args.model

    def params_for(self, name: str, params: dict[str, Any]) -> dict[str, Any]:
        if name != "inference":
            return params
        from flstore_core import models

        rng = np.random.default_rng(500 + int(params["seed"]))
        shape = models.INPUT_SHAPES[self.model]
        x = rng.standard_normal((self.args.inference_batch, *shape)).astype(np.float32)
        x = np.round(x, 3)
        y = rng.integers(0, 10, len(x))
        return {"inputs": x.tolist(), "labels": [int(v) for v in y]}

    def call(self, system: str, name: str, params: dict[str, Any]) -> tuple[float, dict[str, Any]]:
        cls = self.classes[name]
        job = META if cls in ("meta", "client") else BIG
        rnd = ROUND if cls == "round" else None
        client = self.clients[system]
        t0 = time.perf_counter()
        answer = client.run(job, name, round=rnd, **params)
        return (time.perf_counter() - t0) * 1000, answer

    def workload(self, name: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Every repetition of one workload, the systems interleaved; the runs and the check."""
        ids = client_ids(self.args.clients)
        seen: set[str] = set()
        observed = Observed()
        check: dict[str, Any] = {"identical": 0, "within_tolerance": 0, "differ": [], "models": 0}
        for i, raw in enumerate(novel_params(name, ids, self.args.repetitions)):
            fingerprint = json.dumps(raw, sort_keys=True)
            repeated = fingerprint in seen
            seen.add(fingerprint)
            observed.used.append(raw)
            answers, models = self.ask_every_system(name, self.params_for(name, raw), observed)
            compare(i, answers, models, check)
            check.setdefault("repeated_params", 0)
            check["repeated_params"] += int(repeated)
        return [self.run_of(name, system, observed) for system in SYSTEMS], check

    def ask_every_system(
        self, name: str, params: dict[str, Any], observed: Observed
    ) -> tuple[dict[str, dict[str, Any]], dict[str, np.ndarray]]:
        """One request to each system in turn: their results, and the model each wrote."""
        answers: dict[str, dict[str, Any]] = {}
        models: dict[str, np.ndarray] = {}
        for system in SYSTEMS:
            ms, answer = self.call(system, name, params)
            observed.samples[system].append(ms)
            meta = answer.get("meta", {})
            if isinstance(meta.get("cost_usd"), int | float):
                observed.costs[system].append(float(meta["cost_usd"]))
            if system == "flstore-warm":
                timing = meta.get("node_timing_ms") or {}
                if "compute" in timing:
                    observed.compute.append(float(timing["compute"]))
                    if "write" in timing:
                        observed.write.append(float(timing["write"]))
            elif "compute_ms" in meta:
                observed.baseline_compute[system].append(float(meta["compute_ms"]))
            answers[system] = answer["result"]
            key = answer["result"].get("model_key")
            if key:
                models[system] = model_vector(self.store, key, self.float_names)
        return answers, models

    def run_of(self, name: str, system: str, observed: Observed) -> dict[str, Any]:
        """One system's run of ``name`` (ARCHITECTURE §9) from what was observed."""
        cls = self.classes[name]
        samples, costs, used = observed.samples[system], observed.costs[system], observed.used
        run: dict[str, Any] = {
            "system": system,
            "metric": "latency_ms",
            **summarize(samples),
            "workload": name,
            "class": cls,
            "job": META if cls in ("meta", "client") else BIG,
            "model": "meta vector (256)" if cls in ("meta", "client") else self.model,
            "clients": self.args.clients if cls not in ("meta", "client") else None,
            "how_new": HOW_NEW[name],
            "params": used if name != "inference" else [{"inputs": "new batch"}] * len(used),
            "samples_ms": [round(x, 2) for x in samples],
            "cost_usd": float(np.median(costs)) if costs else None,
        }
        compute, write = observed.compute, observed.write
        if system == "flstore-warm":
            run["node_compute_ms"] = float(np.median(compute)) if compute else None
            run["write_ms"] = float(np.median(write)) if write else None
            # the workload's own computation: the node's compute less the model write
            kernel = [c - w for c, w in zip(compute, write, strict=True)] if write else compute
            run["compute_ms"] = float(np.median(kernel)) if kernel else None
            run["compute_ms_note"] = (
                None if compute else "answered by several nodes: the router reports no node timing"
            )
        elif observed.baseline_compute[system]:
            run["compute_ms"] = float(np.median(observed.baseline_compute[system]))
        return run


def compare(
    i: int,
    answers: dict[str, dict[str, Any]],
    models: dict[str, np.ndarray],
    check: dict[str, Any],
) -> None:
    """Repetition ``i``'s baseline answers (and model results) against FLStore's, into ``check``."""
    ref = answers["flstore-warm"]
    for system in SYSTEMS[1:]:
        if answers[system] == ref:
            check["identical"] += 1
        elif close(answers[system], ref):
            check["within_tolerance"] += 1
        else:
            check["differ"].append({"repetition": i, "system": system})
    if models:
        check["models"] += 1
        dev = max(
            (model_deviation(models[s], models["flstore-warm"]) for s in SYSTEMS[1:]),
            default=0.0,
        )
        check["max_model_rel_dev"] = max(check.get("max_model_rel_dev", 0.0), dev)
        if dev > TOLERANCE:
            check["differ"].append({"repetition": i, "model_rel_dev": dev})


def prefetch(stack: Any, shards: list[Any]) -> float:
    t0 = time.perf_counter()
    answers = stack.router.prefetch(shards)
    failed = {f: a for f, a in answers.items() if isinstance(a, dict) and "error" in a}
    if failed:
        raise SystemExit(f"prefetch failed: {json.dumps(failed)[:600]}")
    return (time.perf_counter() - t0) * 1000


def main() -> None:
    p = parser(__doc__ or "")
    p.set_defaults(repetitions=3)
    p.add_argument("--clients", type=int, default=10, help="clients in the model job's round")
    p.add_argument("--model", default="resnet18_cifar", help="model of the round's job")
    p.add_argument("--validation", type=int, default=16, help="validation images")
    p.add_argument("--meta-rounds", type=int, default=30)
    p.add_argument("--meta-clients", type=int, default=60)
    p.add_argument(
        "--inference-batch",
        type=int,
        default=4,
        help="inputs of an inference request (the 256 KiB request body holds ~6 CIFAR images)",
    )
    p.add_argument("--nodes", type=int, default=2)
    p.add_argument("--memory-mb", type=int, default=8192)
    p.add_argument("--workloads", help="comma-separated subset of the catalogue")
    p.add_argument("--quick", action="store_true", help="a small run that checks the script")
    p.add_argument("--floor-worker", action="store_true", help=argparse_hidden())
    p.add_argument("--s3", help=argparse_hidden())
    p.add_argument("--bucket", help=argparse_hidden())
    p.add_argument("--job", help=argparse_hidden())
    p.add_argument("--floor-out", help=argparse_hidden())
    add_network_flag(p)
    args = p.parse_args()
    if args.floor_worker:
        floor_worker(args)
        return
    # a SIGTERM unwinds the stack, the baselines and Redis (their processes would outlive us)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    if args.quick:
        args.model, args.validation, args.meta_rounds, args.meta_clients = "digits_cnn", 16, 4, 8
        args.repetitions = min(args.repetitions, 2)
        args.inference_batch = 4
    run(args)


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


@dataclass
class Setup:
    """What setting up measured: the round's size, ingest, meta job and prefetch times."""

    n_params: int
    round_mb: float
    ingest_ms: float
    prefetch_ms: float


def start_systems(cm: ExitStack, args: Any, classes: dict[str, str]) -> tuple[Bench, Setup]:
    """The stack with both jobs written and prefetched, Redis filled, both aggregators up."""
    from evaluation.baselines import Aggregator, RedisServer, populate_redis, populate_redis_job
    from flstore_core.protocol import PingOp
    from flstore_core.routing.placement import meta_shard, model_shard, round_shard
    from lambdas.local_runtime.stack import LocalStack, StackConfig

    config = StackConfig(
        nodes=args.nodes,
        replication=1,
        memory_mb=args.memory_mb,
        bucket=BUCKET,
        timeout_s=1800,
        network=args.network,
    )
    stack = cm.enter_context(LocalStack(config))
    assert stack.store is not None and stack.router is not None
    print(f"writing {args.clients} x {args.model} and the meta job …", flush=True)
    ingest_ms = write_model_job(stack.store, BIG, args.model, args.clients, args.validation)
    meta_ms, _ = write_meta_job(stack.store, META, args.meta_rounds, args.meta_clients)
    manifest = stack.store.get_manifest(BIG, ROUND)
    round_mb = manifest.n_params * 4 * args.clients / 1e6
    print(
        f"  model job in {ingest_ms / 1000:.1f} s ({manifest.n_params:,} parameters a client,"
        f" {round_mb:.0f} MB a round as float32); meta job in {meta_ms / 1000:.1f} s",
        flush=True,
    )
    for i in range(config.nodes):  # start every node's process: prefetch times loading
        stack.router.node_op(i, PingOp())
    prefetch_ms = prefetch(stack, [round_shard(BIG, ROUND), model_shard(BIG), meta_shard(META)])
    print(f"  prefetch {prefetch_ms / 1000:.1f} s", flush=True)
    redis = cm.enter_context(RedisServer())
    rc = redis.client()
    populate_redis(stack.store, rc, BIG, ROUND)
    populate_redis_job(stack.store, rc, BIG)
    populate_redis_job(stack.store, rc, META)
    rc.close()
    s3 = stack.s3_endpoint
    urls = {
        "objstore-agg": cm.enter_context(Aggregator("s3", s3, BUCKET, network=args.network)).url,
        "cache-agg": cm.enter_context(
            Aggregator("redis", s3, BUCKET, redis.url, network=args.network)
        ).url,
    }
    bench = Bench(args, stack, urls, classes)
    return bench, Setup(manifest.n_params, round_mb, ingest_ms, prefetch_ms)


def measure_floor(bench: Bench, checks: dict[str, Any]) -> tuple[dict[str, Any], float]:
    """The floor's run and p50, its agreement with FLStore's fedavg kept in ``checks``."""
    args = bench.args
    with tempfile.TemporaryDirectory() as tmp:
        floor = run_floor(
            bench.stack.s3_endpoint, BIG, max(5, args.repetitions), str(Path(tmp) / "floor.npy")
        )
        floor_mean = np.load(Path(tmp) / "floor.npy")
    floor_p50 = float(np.median(floor["samples_ms"]))
    _, answer = bench.call("flstore-warm", "fedavg", {"weighted": False})
    fedavg = model_vector(bench.store, answer["result"]["model_key"], bench.float_names)
    checks["floor"] = floor_check(floor_mean, floor["specs"], fedavg, bench.float_names)
    print(
        f"  floor: sum over axis 0 of {floor['shape']} float32 "
        f"({floor['bytes'] / 1e6:.0f} MB) p50 {floor_p50:.1f} ms; agrees with fedavg "
        f"(max rel dev {checks['floor']['max_rel_dev']:.1e})",
        flush=True,
    )
    run = {
        "system": "floor",
        "metric": "latency_ms",
        **summarize(floor["samples_ms"]),
        "workload": "one numpy pass: (n, d) float32 sum along axis 0",
        "clients": args.clients,
        "model": args.model,
        "shape": floor["shape"],
        "bytes": floor["bytes"],
        "samples_ms": [round(x, 2) for x in floor["samples_ms"]],
    }
    return run, floor_p50


def measure_workloads(
    bench: Bench, names: list[str], runs: list[dict[str, Any]], checks: dict[str, Any]
) -> None:
    """Every workload in turn, a row printed (and the JSON rewritten) as each finishes."""
    print(
        f"\n{'workload':>21} {'flstore':>9} {'objstore':>9} {'cache':>9}"
        f" {'fl/obj':>7} {'fl/cache':>8} {'compute':>8} {'write':>7}",
        flush=True,
    )
    for name in names:
        t0 = time.perf_counter()
        got, check = bench.workload(name)
        runs.extend(got)
        checks[name] = check
        p50 = {r["system"]: r["p50"] for r in got}
        fl = got[0]
        comp = "-" if fl.get("compute_ms") is None else f"{fl['compute_ms']:.0f}"
        wr = "-" if fl.get("write_ms") is None else f"{fl['write_ms']:.0f}"
        bad = " DIFFER" if check["differ"] else ""
        if bench.args.json:  # what is measured so far, should the run be stopped
            partial = write_report("novel", runs, None)
            partial["network"] = network_json(bench.args.network)
            partial["checks"] = checks
            partial["partial"] = True
            Path(bench.args.json).write_text(json.dumps(partial, indent=2))
        print(
            f"{name:>21} {p50['flstore-warm']:9.1f} {p50['objstore-agg']:9.1f}"
            f" {p50['cache-agg']:9.1f} {p50['flstore-warm'] / p50['objstore-agg']:7.3f}"
            f" {p50['flstore-warm'] / p50['cache-agg']:8.3f} {comp:>8} {wr:>7}"
            f"  ({time.perf_counter() - t0:.0f} s){bad}",
            flush=True,
        )


def setup_of(
    args: Any, setup: Setup, load_before: tuple[float, ...], t_start: float
) -> dict[str, Any]:
    """The report's ``setup``: the sizes, the setting and the host's load around the run."""
    return {
        "model": args.model,
        "clients": args.clients,
        "params_per_client": setup.n_params,
        "round_mb_float32": round(setup.round_mb, 1),
        "validation_images": args.validation,
        "validation": "generated: standard normal x of the model's input shape, random labels",
        "meta_job": f"{args.meta_rounds} rounds, half of {args.meta_clients} clients each, "
        "256-float updates",
        "nodes": args.nodes,
        "memory_mb": args.memory_mb,
        "repetitions": args.repetitions,
        "prefetch_ms": round(setup.prefetch_ms, 1),
        "ingest_ms": round(setup.ingest_ms, 1),
        "order": "per repetition: flstore-warm, objstore-agg, cache-agg, the same new params",
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "wall_s": round(time.perf_counter() - t_start, 1),
    }


def chosen_workloads(args: Any, classes: dict[str, str]) -> list[str]:
    """The catalogue's workloads, or the ``--workloads`` subset of it in catalogue order."""
    names = list(classes)
    if args.workloads:
        wanted = args.workloads.split(",")
        unknown = [w for w in wanted if w not in classes]
        if unknown:
            raise SystemExit(f"unknown workloads: {unknown}")
        names = [n for n in names if n in wanted]
    return names


def run(args: Any) -> None:
    """Set up, measure the floor and every workload, summarise, write the JSON."""
    from evaluation.baselines import redis_server_binary
    from flstore_core.workloads import catalogue

    if redis_server_binary() is None:
        raise SystemExit("redis-server is not installed: cache-agg needs it")
    t_start = time.perf_counter()
    load_before = os.getloadavg()
    classes = {w["name"]: w["class"] for w in catalogue()}
    names = chosen_workloads(args, classes)
    runs: list[dict[str, Any]] = []
    checks: dict[str, Any] = {}
    with ExitStack() as cm:
        bench, setup = start_systems(cm, args, classes)
        floor_run, floor_p50 = measure_floor(bench, checks)
        runs.append(floor_run)
        measure_workloads(bench, names, runs, checks)
    summary = summarize_targets(runs, floor_p50)
    report = write_report("novel", runs, None)
    report["network"] = network_json(args.network)
    report["summary"] = summary
    report["checks"] = checks
    report["setup"] = setup_of(args, setup, load_before, t_start)
    print(
        f"\ntargets: {json.dumps(summary['targets'])}\nwall {report['setup']['wall_s']:.0f} s",
        flush=True,
    )
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")


def summarize_targets(runs: list[dict[str, Any]], floor_p50: float) -> dict[str, Any]:
    """p50 ratios per workload and the issue's targets."""
    by: dict[str, dict[str, dict[str, Any]]] = {}
    for r in runs:
        if r["system"] in SYSTEMS:
            by.setdefault(r["workload"], {})[r["system"]] = r
    ratios: dict[str, Any] = {}
    for name, rs in by.items():
        fl = rs["flstore-warm"]["p50"]
        ratios[name] = {
            "vs_objstore": fl / rs["objstore-agg"]["p50"],
            "vs_cache": fl / rs["cache-agg"]["p50"],
            "compute_vs_floor": None
            if rs["flstore-warm"].get("compute_ms") is None
            else rs["flstore-warm"]["compute_ms"] / floor_p50,
        }
    model = [n for n in MODEL_TARGETS if n in ratios]
    targets = {
        "model_workloads_le_0.20_objstore": all(ratios[n]["vs_objstore"] <= 0.20 for n in model),
        "model_workloads_le_0.50_cache": all(ratios[n]["vs_cache"] <= 0.50 for n in model),
        "none_slower_than_a_baseline": all(
            r["vs_objstore"] <= 1.0 and r["vs_cache"] <= 1.0 for r in ratios.values()
        ),
    }
    if "trimmed_mean" in ratios and ratios["trimmed_mean"]["compute_vs_floor"] is not None:
        targets["trimmed_mean_compute_le_4x_floor"] = (
            ratios["trimmed_mean"]["compute_vs_floor"] <= 4.0
        )
    return {"floor_p50_ms": floor_p50, "ratios": ratios, "targets": targets}


if __name__ == "__main__":
    main()
