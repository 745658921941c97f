"""Resident memory of a cache node's runtime, by the libraries its workloads import.

The figures behind :data:`flstore_core.cache.budget.RUNTIME_MB` and ``WORKING_MB``: a node's
cache budget is its function's memory minus what the runtime takes before it holds any data
(ARCHITECTURE §3), so these are measured, not guessed.

Each case is a fresh Python process (the Lambda runtime's cold start) that imports
``lambdas.cache_node`` — the handler module a deployed node loads, here over a moto S3 the
parent filled — then:

* ``import``: nothing else (a ping);
* ``round``: cosine_select, fedavg, krum and trimmed_mean on a 5-client ``digits_bn_cnn`` round
  (a job with a declared model, its parameter/buffer split recorded at ``job create``): the
  round-class math, numpy only — the ``base`` runtime;
* ``sklearn``: kmeans on the same round (scikit-learn and scipy imported);
* ``torch``: accuracy_select on a 4-client ``digits_cnn`` round (torch imported, models built);
* ``working``: trimmed_mean on a round of ``--clients`` × ``--params`` float32 updates; its
  peak minus the ``import`` case's and minus the bytes the node's cache holds afterwards is the
  request's working memory (decode buffers, the sort chunks, JSON).

The peak is the process's high-water resident set (``VmHWM`` of ``/proc/self/status``: it
starts afresh at ``exec``, whereas ``ru_maxrss`` keeps the parent's peak across ``exec`` on
Linux). Metric ``peak_rss_mb``; ``rounded_mb`` is the p95 rounded up to 16 MB, the figure
``budget.py`` records. Output: ARCHITECTURE §9 (``--json OUT``).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.report import parser, summarize, write_report
from evaluation.digits_job import simulate
from flstore_core import models
from flstore_core.data.codec import Update
from flstore_core.sdk.jobs import create_job
from flstore_core.storage.object_store import ObjectStore
from lambdas.local_runtime.s3_server import LocalS3

ROOT = Path(__file__).resolve().parent.parent
BUCKET = "node-runtime"
ROUND_JOB = "bn"  # digits_bn_cnn, 5 clients
MODEL_JOB = "digits"  # digits_cnn, 4 clients, validation set
BIG_JOB = "big"  # --clients x --params float32
ROUND_MATH = [
    ("cosine_select", {"k": 2}),
    ("fedavg", {}),
    ("krum", {"f": 1}),
    ("trimmed_mean", {"beta": 0.2}),
]
CASES: dict[str, list[tuple[str, str, dict[str, Any]]]] = {
    "import": [],
    "round": [(w, ROUND_JOB, p) for w, p in ROUND_MATH],
    "sklearn": [("kmeans", ROUND_JOB, {"k": 2})],
    "torch": [("accuracy_select", MODEL_JOB, {"k": 2})],
    "working": [("trimmed_mean", BIG_JOB, {"beta": 0.1})],
}
# the runtime class each case measures (budget.RUNTIME_MB's keys)
RUNTIME_OF = {"round": "base", "sklearn": "sklearn", "torch": "torch"}

# runs in the child: a cold node, the case's requests, then its peak and what it imported
CHILD = """
import json, sys
import lambdas.cache_node as cn
from flstore_core.protocol import RunOp, StatsOp

def hwm_mb():
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")

imported = hwm_mb()
for workload, job, params in json.loads(sys.argv[1]):
    answer = cn.NODE.handle(RunOp(workload, job, params=params, round=0).to_event())
    if "result" not in answer:
        raise SystemExit(f"{workload}: {answer}")
held = cn.NODE.handle(StatsOp().to_event())["bytes_held"]
print(json.dumps({
    "peak_mb": hwm_mb(),
    "import_mb": imported,
    "held_mb": held / 2**20,
    "torch": "torch" in sys.modules,
    "sklearn": "sklearn" in sys.modules,
}))
"""


def fill(store: ObjectStore, clients: int, params: int) -> int:
    """Write the three jobs; returns the big round's raw bytes."""
    create_job(store, ROUND_JOB, model="digits_bn_cnn")
    base = models.state_arrays(models.build("digits_bn_cnn", seed=0))
    store.put_initial(ROUND_JOB, Update(dict(base)))
    rng = np.random.default_rng(0)
    entries = []
    for i in range(5):
        tensors = {
            n: (a + 0.01 * rng.standard_normal(a.shape)).astype(a.dtype)
            if a.dtype.kind == "f"
            else a
            for n, a in base.items()
        }
        entries.append(store.put_update(ROUND_JOB, 0, f"c{i}", Update(tensors, num_examples=10)))
    store.commit_round(ROUND_JOB, 0, entries)

    simulate(store, job=MODEL_JOB, clients=4, rounds=1, malicious=(), local_epochs=1)

    create_job(store, BIG_JOB)
    entries = []
    for i in range(clients):
        w = rng.standard_normal(params, dtype=np.float32)
        entries.append(store.put_update(BIG_JOB, 0, f"c{i:03d}", Update({"w": w})))
    store.commit_round(BIG_JOB, 0, entries)
    return clients * params * 4


def run_case(requests: list[tuple[str, str, dict[str, Any]]], env: dict[str, str]) -> Any:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(requests)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        raise SystemExit(f"case failed:\n{out.stderr[-3000:]}{out.stdout[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def rounded(mb: float, step: int = 16) -> int:
    return int(math.ceil(mb / step) * step)


def main() -> None:
    p = parser(__doc__ or "")
    p.add_argument("--clients", type=int, default=40, help="clients of the working-memory round")
    p.add_argument("--params", type=int, default=2_000_000, help="its parameters per client")
    args = p.parse_args()
    with LocalS3() as s3:
        store = ObjectStore(BUCKET, endpoint_url=s3.url)
        store.ensure_bucket()
        round_bytes = fill(store, args.clients, args.params)
        env = dict(
            os.environ,
            FLSTORE_S3_ENDPOINT=s3.url,
            FLSTORE_BUCKET=BUCKET,
            FLSTORE_CACHE_BUDGET_BYTES=str(4 * 2**30),  # nothing evicted while measuring
            FLSTORE_NODE_INDEX="0",
        )
        samples: dict[str, list[Any]] = {case: [] for case in CASES}
        for _ in range(args.repetitions):  # interleaved: drift hits every case alike
            for case, requests in CASES.items():
                samples[case].append(run_case(requests, env))
    runs = []
    for case, got in samples.items():
        peaks = [g["peak_mb"] for g in got]
        run: dict[str, Any] = {
            "system": f"cache-node-{case}",
            "metric": "peak_rss_mb",
            **summarize(peaks),
            "case": case,
            "workloads": [w for w, _, _ in CASES[case]],
            "import_mb": summarize([g["import_mb"] for g in got])["p50"],
            "torch_imported": any(g["torch"] for g in got),
            "sklearn_imported": any(g["sklearn"] for g in got),
        }
        run["rounded_mb"] = rounded(run["p95"])
        if case in RUNTIME_OF:
            run["runtime"] = RUNTIME_OF[case]
        if case == "working":
            import_p50 = summarize([g["peak_mb"] for g in samples["import"]])["p50"]
            working = [g["peak_mb"] - import_p50 - g["held_mb"] for g in got]
            run.update(
                clients=args.clients,
                params=args.params,
                round_mb=round(round_bytes / 2**20, 1),
                held_mb=round(got[0]["held_mb"], 1),
                working_mb=summarize(working),
                working_rounded_mb=rounded(summarize(working)["p95"]),
            )
        runs.append(run)
    write_report("node_runtime", runs, args.json)
    for r in runs:
        extra = f"  working {r['working_mb']['p50']:.0f} MB" if "working_mb" in r else ""
        print(
            f"{r['system']:>26}: peak p50 {r['p50']:6.1f} MB  p95 {r['p95']:6.1f} MB  "
            f"-> {r['rounded_mb']:4d} MB  torch={r['torch_imported']} "
            f"sklearn={r['sklearn_imported']}  n={r['n']}{extra}"
        )


if __name__ == "__main__":
    main()
