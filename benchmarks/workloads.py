"""Latency of every workload of the catalogue, warm, through the full HTTP path; and the reuse of
a round's shared artifacts.

* ``flstore-warm`` for every workload: round-class similarity/aggregation workloads on a round of
  ``--clients`` ResNet-18-sized updates (11.7M float32 each, with a stored base model); the
  model-based ones (they rebuild and run torch models per client) on a digits job of the small
  CNN — ResNet-18 inference for 10 clients on 2 cores would measure torch, not FLStore; the
  ``meta``/``client``/``model`` classes on the digits job too.
* ``flstore-first`` vs ``flstore-reuse``: on a round loaded by a request (no prefetch, so no
  artifact yet), the first similarity request computes the Gram matrix; a second, different
  similarity workload on the same round reuses it.

Output: ARCHITECTURE §9 (``--json OUT``).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.codec import resnet18_sized_update
from benchmarks.report import parser, summarize, write_report
from flstore_core.data.codec import Update
from flstore_core.protocol import EvictOp
from flstore_core.routing.placement import client_shard, meta_shard, model_shard, round_shard
from flstore_core.sdk.client import FLStoreClient
from flstore_core.workloads import catalogue
from lambdas.local_runtime.stack import LocalStack, StackConfig

BIG = "resnet"
DIGITS = "digits"
MODEL_BASED = {
    "accuracy_select",
    "contribution_loo",
    "contribution_shapley",
    "personalize",
    "feddebug",
    "fltrust",
}
PARAMS: dict[str, dict[str, Any]] = {
    "cosine_select": {"k": 3},
    "malicious_cosine": {"k": 1},
    "krum": {"f": 1},
    "multi_krum": {"f": 1},
    "trimmed_mean": {"beta": 0.1},
    "kmeans": {"k": 2},
    "accuracy_select": {"k": 3},
    "personalize": {"client": "client-00"},
    "oort_select": {"k": 3},
}


def write_big_round(stack: LocalStack, clients: int, params: int) -> None:
    assert stack.store is not None
    store = stack.store
    base = resnet18_sized_update(10_000)
    if params < sum(a.size for a in base.tensors.values()):
        base = Update({"w": base.tensors[next(iter(base.tensors))].reshape(-1)[:params].copy()})
    store.put_initial(BIG, Update(dict(base.tensors)))
    rng = np.random.default_rng(0)
    entries = []
    for i in range(clients):
        tensors = {
            n: (a + 0.01 * rng.standard_normal(a.shape, dtype=np.float32)).astype(np.float32)
            for n, a in base.tensors.items()
        }
        entries.append(
            store.put_update(BIG, 0, f"client-{i:02d}", Update(tensors, num_examples=100 + i))
        )
    store.commit_round(BIG, 0, entries)


def write_jobs(stack: LocalStack, clients: int, params: int) -> int:
    """The digits job and the ResNet-18-sized round, prefetched as ingestion would; the digits
    job's last round."""
    from evaluation.digits_job import simulate

    assert stack.store is not None and stack.router is not None
    print("writing the digits job and the ResNet-18-sized round …", flush=True)
    digits = simulate(stack.store, job=DIGITS, clients=clients, rounds=5)
    write_big_round(stack, clients, params)
    last = digits.rounds - 1
    stack.router.prefetch(
        [
            round_shard(BIG, 0),
            round_shard(DIGITS, last),
            meta_shard(DIGITS),
            model_shard(DIGITS),
        ]
        + [client_shard(DIGITS, c) for c in digits.clients]
    )
    return last


def every_workload(client: FLStoreClient, last: int, args: Any) -> list[dict[str, Any]]:
    """Every workload of the catalogue once untimed, then ``repetitions`` interleaved passes."""
    names = [w["name"] for w in catalogue()]
    classes = {w["name"]: w["class"] for w in catalogue()}

    def job_of(name: str) -> str:
        return DIGITS if (name in MODEL_BASED or classes[name] != "round") else BIG

    def call(name: str) -> dict[str, Any]:
        job = job_of(name)
        rnd = (last if job == DIGITS else 0) if classes[name] == "round" else None
        return client.run(job, name, round=rnd, **PARAMS.get(name, {}))

    for name in names:  # warm-up: the first call of each also stores model results
        call(name)
    samples: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(args.repetitions):  # interleaved
        for name in names:
            t0 = time.perf_counter()
            call(name)
            samples[name].append((time.perf_counter() - t0) * 1000)
    runs: list[dict[str, Any]] = []
    for name in names:
        job = job_of(name)
        runs.append(
            {
                "system": "flstore-warm",
                "metric": "latency_ms",
                **summarize(samples[name]),
                "workload": name,
                "class": classes[name],
                "job": job,
                "clients": args.clients,
                "params": args.params if job == BIG else "digits_cnn",
            }
        )
        print(f"{name:>22}: p50 {runs[-1]['p50']:9.1f} ms  p95 {runs[-1]['p95']:9.1f} ms")
    return runs


def gram_reuse(stack: LocalStack, client: FLStoreClient, args: Any) -> list[dict[str, Any]]:
    """The first similarity request on a freshly loaded round (it builds the Gram matrix)
    against the next one (it reuses it)."""
    assert stack.router is not None
    first, reuse = [], []
    for _ in range(args.repetitions):
        for i in range(stack.config.nodes):
            stack.router.node_op(i, EvictOp(all=True))
        client.run(BIG, "fedavg", round=0)  # loads the round; fedavg needs no Gram matrix
        t0 = time.perf_counter()
        client.run(BIG, "cosine_select", round=0, k=3)
        first.append((time.perf_counter() - t0) * 1000)
        t0 = time.perf_counter()
        client.run(BIG, "malicious_cosine", round=0, k=1)
        reuse.append((time.perf_counter() - t0) * 1000)
    runs = [
        {
            "system": system,
            "metric": "latency_ms",
            **summarize(vals),
            "workload": workload,
            "clients": args.clients,
            "params": args.params,
        }
        for system, workload, vals in (
            ("flstore-first", "cosine_select", first),
            ("flstore-reuse", "malicious_cosine", reuse),
        )
    ]
    ratio = np.median(first) / np.median(reuse)
    print(
        f"first similarity request p50 {np.median(first):.1f} ms, "
        f"second (reuse) p50 {np.median(reuse):.1f} ms: {ratio:.1f}x"
    )
    return runs


def main() -> None:
    p = parser(__doc__ or "")
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--params", type=int, default=11_689_512, help="parameters per big update")
    args = p.parse_args()
    config = StackConfig(nodes=2, replication=1, memory_mb=8192, timeout_s=600)
    with LocalStack(config) as stack:
        last = write_jobs(stack, args.clients, args.params)
        client = FLStoreClient(stack.gateway_url, stack.token, timeout=900)
        runs = every_workload(client, last, args)
        runs += gram_reuse(stack, client, args)
    write_report("workloads", runs, args.json)


if __name__ == "__main__":
    main()
