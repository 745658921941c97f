"""The novel benchmark's floor and answer checks: one numpy pass over the round's matrix in a
process started like a cache node's (the least any system could spend on a round), checked
against FLStore's fedavg; and how two systems' answers and model results are compared."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.novel_data import BUCKET, ROUND

TOLERANCE = 1e-5
# the floor runs in ``benchmarks/novel.py --floor-worker`` (the script's own command line)
SCRIPT = Path(__file__).resolve().parent / "novel.py"


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
    root = str(SCRIPT.parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    cmd = [
        sys.executable,
        str(SCRIPT),
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


def floor_check(
    floor_mean: np.ndarray, specs: list[Any], fedavg: np.ndarray, float_names: list[str]
) -> dict[str, Any]:
    """The floor's mean of the rows against ``fedavg``, FLStore's unweighted fedavg over every
    client as a vector of ``float_names`` (the same numbers: a check that the floor read the
    round every system computes on)."""
    offsets: dict[str, tuple[int, int]] = {}
    at = 0
    for name, _dtype, shape in specs:
        size = int(np.prod(shape)) if shape else 1
        offsets[name] = (at, at + size)
        at += size
    theirs = np.concatenate(
        [floor_mean[offsets[n][0] : offsets[n][1]].astype(np.float64) for n in float_names]
    )
    dev = model_deviation(theirs, fedavg)
    return {"compared_with": "fedavg weighted=false, every client", "max_rel_dev": dev}
