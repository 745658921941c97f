"""Requests nothing precomputed answers (issue 13 item 2): every workload of the catalogue, each
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

Output: ARCHITECTURE §9 (``--json OUT``) with a ``summary`` of the p50 ratios and the issue's
targets. ``--quick`` runs a small version (a digits_cnn round) in well under a minute.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.report import parser, summarize, write_report

BIG = "novel-round"
META = "novel-meta"
BUCKET = "novel"
ROUND = 0
SYSTEMS = ("flstore-warm", "objstore-agg", "cache-agg")
# the model-producing round workloads the ratio targets name
MODEL_TARGETS = ("fedavg", "trimmed_mean", "krum", "multi_krum", "fltrust", "personalize")
TOLERANCE = 1e-5

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


# ---------------------------------------------------------------------- the data


def client_ids(n: int) -> list[str]:
    return [f"client-{k:02d}" for k in range(n)]


def initial_state(model: str) -> dict[str, np.ndarray]:
    from flstore_core import models

    net = models.build(model, seed=0)
    return {k: v.detach().cpu().numpy().copy() for k, v in net.state_dict().items()}


def client_state(base: dict[str, np.ndarray], k: int, direction: dict[str, np.ndarray]) -> Any:
    """The base plus a shared step and the client's own noise; every tenth client steps the
    other way. BatchNorm statistics stay valid (variances positive), counters advance by one."""
    from flstore_core.data.codec import Update

    rng = np.random.default_rng(1000 + k)
    sign = -3.0 if k % 10 == 9 else 1.0
    out: dict[str, np.ndarray] = {}
    for name, w in base.items():
        if not np.issubdtype(w.dtype, np.floating):
            out[name] = w + 1
        elif name.endswith("running_var"):
            out[name] = (w * (1.0 + 0.05 * np.abs(rng.standard_normal(w.shape)))).astype(w.dtype)
        else:
            noise = rng.standard_normal(w.shape, dtype=np.float32)
            out[name] = (w + 0.01 * (sign * direction[name] + noise)).astype(w.dtype)
    return Update(
        out,
        num_examples=100 + 37 * (k % 11),
        metrics={"loss": round(0.5 + 0.01 * k, 4), "duration_s": round(20.0 + 3.0 * k, 2)},
    )


def write_model_job(store: Any, job: str, model: str, clients: int, validation: int) -> float:
    """The model job: spec, validation set, initial model (the base), one committed round and
    its global model. Returns the time it took (ms)."""
    from flstore_core import models
    from flstore_core.data.codec import Update
    from flstore_core.sdk.jobs import create_job

    t0 = time.perf_counter()
    rng = np.random.default_rng(7)
    shape = models.INPUT_SHAPES[model]
    x = rng.standard_normal((validation, *shape), dtype=np.float32)
    y = rng.integers(0, models.NUM_CLASSES[model], validation).astype(np.int64)
    create_job(store, job, model=model, validation=(x, y))
    base = initial_state(model)
    store.put_initial(job, Update(dict(base)))
    direction = {
        n: np.random.default_rng(5).standard_normal(w.shape, dtype=np.float32)
        for n, w in base.items()
        if np.issubdtype(w.dtype, np.floating)
    }
    entries = []
    for k, client in enumerate(client_ids(clients)):
        entries.append(store.put_update(job, ROUND, client, client_state(base, k, direction)))
    store.commit_round(job, ROUND, entries)
    store.put_global(job, ROUND, Update(dict(base)))
    return (time.perf_counter() - t0) * 1000


def write_meta_job(store: Any, job: str, rounds: int, clients: int) -> tuple[float, list[str]]:
    """A job of a small model for the meta and client workloads: ``rounds`` rounds, each with
    a random half of ``clients`` clients, loss and duration metrics. Returns the time it took
    (ms) and the clients that took part."""
    from flstore_core.data.codec import Update

    t0 = time.perf_counter()
    rng = np.random.default_rng(11)
    ids = [f"c{k:03d}" for k in range(clients)]
    took_part: set[str] = set()
    base = rng.standard_normal(256).astype(np.float32)
    store.put_initial(job, Update({"w": base}))
    for r in range(rounds):
        chosen = sorted(rng.choice(clients, size=max(3, clients // 2), replace=False))
        entries = []
        for k in chosen:
            w = base + 0.05 * rng.standard_normal(256).astype(np.float32)
            update = Update(
                {"w": w.astype(np.float32)},
                num_examples=int(50 + k),
                metrics={
                    "loss": float(round(1.0 / (1 + r) + 0.01 * k, 4)),
                    "duration_s": float(round(5.0 + (k % 7), 2)),
                },
            )
            entries.append(store.put_update(job, r, ids[k], update))
            took_part.add(ids[k])
        store.commit_round(job, r, entries)
        base = base + 0.01
        store.put_global(job, r, Update({"w": base.astype(np.float32)}))
    return (time.perf_counter() - t0) * 1000, sorted(took_part)


# ---------------------------------------------------------------------- new params


def novel_params(name: str, clients: list[str], repetitions: int) -> Iterator[dict[str, Any]]:
    """Params for repetition 0, 1, … of a workload, each set used by no earlier repetition (a
    workload whose params cannot vary yields the same, see :data:`HOW_NEW`)."""
    n = len(clients)
    pairs = [(a, b) for a in range(n) for b in range(a + 1, n)]
    for i in range(repetitions):
        if name == "fedavg":
            a, b = pairs[(3 * i) % len(pairs)]
            subset = [c for j, c in enumerate(clients) if j not in (a, b)]
            yield {"clients": subset, "weighted": i % 2 == 0}
        elif name == "trimmed_mean":
            beta = round(0.12 + 0.071 * (i % 5) + 0.0007 * i, 4)
            if i % 2:
                yield {"beta": beta, "clients": [c for j, c in enumerate(clients) if j != i % n]}
            else:
                yield {"beta": beta}
        elif name == "krum":
            f_max = (n - 3) // 2
            combos = [(f, b) for b in (False, True) for f in range(f_max, -1, -1)]
            f, buffers = combos[i % len(combos)]
            yield {"f": f, "include_buffers": buffers}
        elif name == "multi_krum":
            kept = None if i % 2 == 0 else [c for j, c in enumerate(clients) if j != i % n]
            m_n = n if kept is None else n - 1
            f = 1 + i % max(1, (m_n - 3) // 2)
            m = max(1, m_n - f - 1 - (i // 2) % 3)
            params: dict[str, Any] = {"f": f, "m": m}
            if kept is not None:
                params["clients"] = kept
            yield params
        elif name == "cosine_select":
            yield {"k": 2 + i % (n - 2), "use_delta": (i // (n - 2)) % 2 == 0}
        elif name == "accuracy_select":
            yield {"k": [2, 4, 5, 6, 7, 1, 8, 9, 3, 10][i % 10]}
        elif name == "malicious_cosine":
            yield {"threshold": round(-0.2 + 0.0731 * i, 4)}
        elif name == "kmeans":
            yield {"k": 2 + i % min(3, n - 1), "seed": 100 + i}
        elif name == "cfl_split":
            yield {"eps_1": round(0.4 + 0.013 * (i + 1), 4), "eps_2": round(1.6 + 0.017 * i, 4)}
        elif name == "fltrust":
            yield {"seed": 1 + i, "lr": round(0.04 + 0.003 * i, 4)}
        elif name == "personalize":
            yield {
                "client": clients[(3 * i + 1) % n],
                "peers": 2 + i % 3,
                "by": "similarity" if i % 2 == 0 else "accuracy",
            }
        elif name == "contribution_loo":
            if i == 2:
                return  # its only param has two values: two requests, both new
            yield {"weighted": i % 2 == 0}
        elif name == "contribution_shapley":
            yield {"method": "gtg", "seed": 1 + i, "min_permutations": 2, "max_permutations": 2}
        elif name == "feddebug":
            yield {"seed": 1 + i, "num_inputs": 8}
        elif name == "oort_select":
            yield {"k": 3 + i % 4, "seed": 1 + i}
        elif name == "incentive":
            yield {"budget": round(100.0 + 7.5 * (i + 1), 2)}
        elif name == "reputation":
            yield {"decay": round(0.8 - 0.013 * (i + 1), 4)}
        elif name == "inference":
            yield {"seed": i}  # replaced by a batch of inputs (see Bench.params_for)
        else:
            raise SystemExit(f"no novel params for workload {name!r}: add it to novel_params")


# ---------------------------------------------------------------------- comparing answers


def close(a: Any, b: Any, tol: float = TOLERANCE) -> bool:
    """Equal JSON values, numbers within a relative ``tol``."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(close(a[k], b[k], tol) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(close(x, y, tol) for x, y in zip(a, b, strict=True))
    if isinstance(a, bool) or isinstance(b, bool):
        return bool(a == b)
    if isinstance(a, int | float) and isinstance(b, int | float):
        return abs(a - b) <= tol * max(abs(a), abs(b), 1e-12)
    return bool(a == b)


def model_vector(store: Any, key: str, names: list[str]) -> np.ndarray:
    """A stored model result's float tensors, flattened in ``names`` order (float64)."""
    from flstore_core.data.codec import decode_update

    tensors = decode_update(store.get_object(key)).tensors
    return np.concatenate(
        [np.asarray(tensors[n], dtype=np.float64).ravel() for n in names if n in tensors]
    )


def model_deviation(a: np.ndarray, b: np.ndarray) -> float:
    if a.shape != b.shape:
        return float("inf")
    return float(np.abs(a - b).max() / max(float(np.abs(b).max()), 1e-30))


# ---------------------------------------------------------------------- the floor


def floor_worker(args: Any) -> None:
    """``--floor-worker``: read the round's matrix, time its sum along axis 0, save the mean."""
    from flstore_core.storage.object_store import ObjectStore

    store = ObjectStore(args.bucket, endpoint_url=args.s3)
    rm = store.read_round(args.job, ROUND)
    matrix = rm.matrix
    matrix.sum(axis=0)  # first touch of the pages, untimed
    samples = []
    total = None
    for _ in range(args.repetitions):
        t0 = time.perf_counter()
        total = matrix.sum(axis=0)
        samples.append((time.perf_counter() - t0) * 1000)
    assert total is not None
    np.save(args.floor_out, (total / matrix.shape[0]).astype(np.float32))
    print(
        json.dumps(
            {
                "samples_ms": samples,
                "shape": list(matrix.shape),
                "bytes": int(matrix.nbytes),
                "specs": [[s.name, s.dtype, list(s.shape)] for s in rm.specs],
            }
        )
    )


def run_floor(s3: str, job: str, repetitions: int, out: str) -> dict[str, Any]:
    """The floor in a process started like a cache node's (same interpreter, environment and
    ``OMP_NUM_THREADS`` as :class:`~lambdas.local_runtime.stack.LocalStack` gives its nodes)."""
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = os.environ.get("OMP_NUM_THREADS", "2")
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--floor-worker",
        "--s3",
        s3,
        "--bucket",
        BUCKET,
        "--job",
        job,
        "--repetitions",
        str(repetitions),
        "--floor-out",
        out,
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, check=False)
    if done.returncode != 0:
        raise SystemExit(f"the floor process failed: {done.stderr[-2000:]}")
    answer: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return answer


# ---------------------------------------------------------------------- the benchmark


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
        reps = self.args.repetitions
        ids = client_ids(self.args.clients)
        samples: dict[str, list[float]] = {s: [] for s in SYSTEMS}
        compute: list[float] = []
        write: list[float] = []
        baseline_compute: dict[str, list[float]] = {s: [] for s in SYSTEMS[1:]}
        costs: dict[str, list[float]] = {s: [] for s in SYSTEMS}
        used: list[dict[str, Any]] = []
        seen: set[str] = set()
        check: dict[str, Any] = {"identical": 0, "within_tolerance": 0, "differ": [], "models": 0}
        for i, raw in enumerate(novel_params(name, ids, reps)):
            params = self.params_for(name, raw)
            fingerprint = json.dumps(raw, sort_keys=True)
            repeated = fingerprint in seen
            seen.add(fingerprint)
            used.append(raw)
            answers: dict[str, dict[str, Any]] = {}
            models: dict[str, np.ndarray] = {}
            for system in SYSTEMS:
                ms, answer = self.call(system, name, params)
                samples[system].append(ms)
                meta = answer.get("meta", {})
                if isinstance(meta.get("cost_usd"), int | float):
                    costs[system].append(float(meta["cost_usd"]))
                if system == "flstore-warm":
                    timing = meta.get("node_timing_ms") or {}
                    if "compute" in timing:
                        compute.append(float(timing["compute"]))
                        if "write" in timing:
                            write.append(float(timing["write"]))
                elif "compute_ms" in meta:
                    baseline_compute[system].append(float(meta["compute_ms"]))
                answers[system] = answer["result"]
                key = answer["result"].get("model_key")
                if key:
                    models[system] = model_vector(self.store, key, self.float_names)
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
            check.setdefault("repeated_params", 0)
            check["repeated_params"] += int(repeated)
        runs = []
        cls = self.classes[name]
        for system in SYSTEMS:
            run: dict[str, Any] = {
                "system": system,
                "metric": "latency_ms",
                **summarize(samples[system]),
                "workload": name,
                "class": cls,
                "job": META if cls in ("meta", "client") else BIG,
                "model": "meta vector (256)" if cls in ("meta", "client") else self.model,
                "clients": self.args.clients if cls not in ("meta", "client") else None,
                "how_new": HOW_NEW[name],
                "params": used if name != "inference" else [{"inputs": "new batch"}] * len(used),
                "samples_ms": [round(x, 2) for x in samples[system]],
                "cost_usd": float(np.median(costs[system])) if costs[system] else None,
            }
            if system == "flstore-warm":
                run["node_compute_ms"] = float(np.median(compute)) if compute else None
                run["write_ms"] = float(np.median(write)) if write else None
                # the workload's own computation: the node's compute less the model write
                kernel = [c - w for c, w in zip(compute, write, strict=True)] if write else compute
                run["compute_ms"] = float(np.median(kernel)) if kernel else None
                run["compute_ms_note"] = (
                    None
                    if compute
                    else "answered by several nodes: the router reports no node timing"
                )
            elif baseline_compute[system]:
                run["compute_ms"] = float(np.median(baseline_compute[system]))
            runs.append(run)
        return runs, check


def prefetch(stack: Any, shards: list[Any]) -> float:
    t0 = time.perf_counter()
    answers = stack.router.prefetch(shards)
    failed = {f: a for f, a in answers.items() if isinstance(a, dict) and "error" in a}
    if failed:
        raise SystemExit(f"prefetch failed: {json.dumps(failed)[:600]}")
    return (time.perf_counter() - t0) * 1000


def floor_check(bench: Bench, floor_mean: np.ndarray, specs: list[Any]) -> dict[str, Any]:
    """The floor's mean of the rows against FLStore's unweighted fedavg over every client (the
    same numbers: a check that the floor read the round every system computes on)."""
    _, answer = bench.call("flstore-warm", "fedavg", {"weighted": False})
    key = answer["result"]["model_key"]
    mine = model_vector(bench.store, key, bench.float_names)
    offsets: dict[str, tuple[int, int]] = {}
    at = 0
    for name, _dtype, shape in specs:
        size = int(np.prod(shape)) if shape else 1
        offsets[name] = (at, at + size)
        at += size
    theirs = np.concatenate(
        [floor_mean[offsets[n][0] : offsets[n][1]].astype(np.float64) for n in bench.float_names]
    )
    dev = model_deviation(theirs, mine)
    return {"compared_with": "fedavg weighted=false, every client", "max_rel_dev": dev}


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


def run(args: Any) -> None:
    from evaluation.baselines import (
        Aggregator,
        RedisServer,
        populate_redis,
        populate_redis_job,
        redis_server_binary,
    )
    from flstore_core.routing.placement import meta_shard, model_shard, round_shard
    from flstore_core.workloads import catalogue
    from lambdas.local_runtime.stack import LocalStack, StackConfig

    if redis_server_binary() is None:
        raise SystemExit("redis-server is not installed: cache-agg needs it")
    t_start = time.perf_counter()
    load_before = os.getloadavg()
    classes = {w["name"]: w["class"] for w in catalogue()}
    names = list(classes)
    if args.workloads:
        wanted = args.workloads.split(",")
        unknown = [w for w in wanted if w not in classes]
        if unknown:
            raise SystemExit(f"unknown workloads: {unknown}")
        names = [n for n in names if n in wanted]
    config = StackConfig(
        nodes=args.nodes, replication=1, memory_mb=args.memory_mb, bucket=BUCKET, timeout_s=1800
    )
    runs: list[dict[str, Any]] = []
    checks: dict[str, Any] = {}
    with ExitStack() as cm:
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
            stack.router.node_op(i, {"op": "ping"})
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
            "objstore-agg": cm.enter_context(Aggregator("s3", s3, BUCKET)).url,
            "cache-agg": cm.enter_context(Aggregator("redis", s3, BUCKET, redis.url)).url,
        }
        bench = Bench(args, stack, urls, classes)
        with tempfile.TemporaryDirectory() as tmp:
            floor = run_floor(s3, BIG, max(5, args.repetitions), str(Path(tmp) / "floor.npy"))
            floor_mean = np.load(Path(tmp) / "floor.npy")
        floor_p50 = float(np.median(floor["samples_ms"]))
        checks["floor"] = floor_check(bench, floor_mean, floor["specs"])
        print(
            f"  floor: sum over axis 0 of {floor['shape']} float32 "
            f"({floor['bytes'] / 1e6:.0f} MB) p50 {floor_p50:.1f} ms; agrees with fedavg "
            f"(max rel dev {checks['floor']['max_rel_dev']:.1e})",
            flush=True,
        )
        runs.append(
            {
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
        )
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
            if args.json:  # what is measured so far, should the run be stopped
                partial = write_report("novel", runs, None)
                partial["checks"] = checks
                partial["partial"] = True
                Path(args.json).write_text(json.dumps(partial, indent=2))
            print(
                f"{name:>21} {p50['flstore-warm']:9.1f} {p50['objstore-agg']:9.1f}"
                f" {p50['cache-agg']:9.1f} {p50['flstore-warm'] / p50['objstore-agg']:7.3f}"
                f" {p50['flstore-warm'] / p50['cache-agg']:8.3f} {comp:>8} {wr:>7}"
                f"  ({time.perf_counter() - t0:.0f} s){bad}",
                flush=True,
            )
    summary = summarize_targets(runs, floor_p50)
    report = write_report("novel", runs, None)
    report["summary"] = summary
    report["checks"] = checks
    report["setup"] = {
        "model": args.model,
        "clients": args.clients,
        "params_per_client": manifest.n_params,
        "round_mb_float32": round(round_mb, 1),
        "validation_images": args.validation,
        "validation": "generated: standard normal x of the model's input shape, random labels",
        "meta_job": f"{args.meta_rounds} rounds, half of {args.meta_clients} clients each, "
        "256-float updates",
        "nodes": args.nodes,
        "memory_mb": args.memory_mb,
        "repetitions": args.repetitions,
        "prefetch_ms": round(prefetch_ms, 1),
        "ingest_ms": round(ingest_ms, 1),
        "order": "per repetition: flstore-warm, objstore-agg, cache-agg, the same new params",
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "wall_s": round(time.perf_counter() - t_start, 1),
    }
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
