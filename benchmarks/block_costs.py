"""What one column block of a large round costs a cache node: the durations behind the sizing and
cost tables of ``docs/deployment.md``.

A block of ``--clients`` rows × ``--columns`` float32 columns with a stored base — by default a
block of a 100-client ResNet-18 round on 3,008 MB nodes (1.3M columns, 0.52 GB of rows), as
``flstore plan --clients 100 --model resnet18_cifar`` cuts it — measured in process (no
invocation, no S3):

* ``warm``: the Gram pieces computed when the block is prefetched (``RoundData.warm``);
* ``partial``: what a warm ``partial`` request then does for the block (its pieces as JSON);
* ``fedavg``: the block's frame of a model nothing precomputed (a weighted mean of the rows,
  to stored bytes, one zstd frame);
* ``trimmed_mean``: the block's frame of a trimmed mean with a new β (the column sort).

Output: ARCHITECTURE §9 (``--json OUT``), metric ``ms`` per block.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.report import parser, summarize, write_report
from flstore_core.cache.round_data import RoundData
from flstore_core.cache.sharded import parts_to_json
from flstore_core.data.codec import TensorSpec, compress_frame, tensor_bytes
from flstore_core.workloads import load_all


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=100)
    p.add_argument("--columns", type=int, default=1_296_000)
    args = p.parse_args()
    load_all()
    n, cols = args.clients, args.columns
    rng = np.random.default_rng(0)
    base = rng.normal(0, 0.05, cols).astype(np.float32)
    rows = base + rng.normal(0, 0.01, (n, cols)).astype(np.float32)
    specs = (TensorSpec("w", "F32", (cols,)),)
    clients = [f"c{i}" for i in range(n)]

    def block() -> RoundData:
        return RoundData(
            "bench", 0, clients, rows.copy(), specs, np.ones(n, np.int64), [{}] * n, base=base
        )

    samples: dict[str, list[float]] = {k: [] for k in ("warm", "partial", "fedavg", "trimmed_mean")}
    for rep in range(args.repetitions):
        data = block()
        t0 = time.perf_counter()
        data.warm()
        samples["warm"].append((time.perf_counter() - t0) * 1000)
        t0 = time.perf_counter()
        json.dumps(parts_to_json(data.gram_parts()))
        samples["partial"].append((time.perf_counter() - t0) * 1000)
        t0 = time.perf_counter()
        compress_frame(tensor_bytes(data.to_weights(data.weighted_mean(np.ones(n))), specs))
        samples["fedavg"].append((time.perf_counter() - t0) * 1000)
        cut = int((0.1 + 0.01 * rep) * n)  # a new beta every repetition
        t0 = time.perf_counter()
        compress_frame(
            tensor_bytes(data.to_weights(data.columnwise("trimmed_mean", cut=cut)), specs)
        )
        samples["trimmed_mean"].append((time.perf_counter() - t0) * 1000)
        del data
    runs: list[dict[str, Any]] = [
        {
            "system": "flstore-node",
            "workload": name,
            "metric": "ms",
            "clients": n,
            "columns": cols,
            **summarize(values),
        }
        for name, values in samples.items()
    ]
    report = write_report("block_costs", runs, args.json)
    for run in report["runs"]:
        print(f"{run['workload']:>13}  p50 {run['p50']:8.1f} ms  p95 {run['p95']:8.1f} ms")


if __name__ == "__main__":
    main()
