"""``flstore demo``: the main job on the embedded local stack.

Starts the local S3 (moto), writes a synthetic job through the store — R rounds × C clients of a
small CNN's state dict — commits every round, reads each round back verified into its matrix,
and prints a summary table.
"""

from __future__ import annotations

import time

import numpy as np
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from flstore_core.codec import PRECISIONS, Precision, Update
from flstore_core.errors import ValidationError
from flstore_core.manifest import JobSpec
from flstore_core.store import ObjectStore

# state-dict shapes of a small CNN for 1x8x8 digits (two conv layers, two linear layers)
SMALL_CNN_SHAPES: dict[str, tuple[int, ...]] = {
    "conv1.weight": (32, 1, 3, 3),
    "conv1.bias": (32,),
    "conv2.weight": (64, 32, 3, 3),
    "conv2.bias": (64,),
    "fc1.weight": (128, 256),
    "fc1.bias": (128,),
    "fc2.weight": (10, 128),
    "fc2.bias": (10,),
}


def synthetic_update(rng: np.random.Generator, base: dict[str, np.ndarray]) -> Update:
    """A client update: the base model plus a small random step."""
    tensors = {
        name: (w + 0.01 * rng.standard_normal(w.shape)).astype(np.float32)
        for name, w in base.items()
    }
    return Update(
        tensors,
        num_examples=int(rng.integers(50, 200)),
        metrics={"loss": float(rng.uniform(0.1, 2.0)), "duration_s": float(rng.uniform(1, 5))},
    )


def run_demo(rounds: int = 5, clients: int = 10, precision: str = "float32") -> dict[str, float]:
    """Write and read back a synthetic job; returns the figures it prints."""
    from lambdas.local_runtime.s3_server import LocalS3

    if precision not in PRECISIONS:
        raise ValidationError(f"unknown precision {precision!r}: use one of {PRECISIONS}")
    console = Console()
    rng = np.random.default_rng(0)
    base = {n: rng.standard_normal(s).astype(np.float32) * 0.1 for n, s in SMALL_CNN_SHAPES.items()}
    job = "demo"
    with LocalS3() as s3:
        console.print(f"local S3 (moto) at [bold]{s3.url}[/bold]")
        store = ObjectStore("flstore-demo", endpoint_url=s3.url)
        store.ensure_bucket()
        store.put_job_spec(JobSpec(job, model="digits_cnn", precision=_as_precision(precision)))
        raw_bytes = stored_bytes = 0
        write_s = read_s = 0.0
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task("writing and reading rounds", total=rounds)
            for r in range(rounds):
                updates = [synthetic_update(rng, base) for _ in range(clients)]
                t0 = time.perf_counter()
                entries = [
                    store.put_update(job, r, f"client-{i:02d}", u) for i, u in enumerate(updates)
                ]
                manifest = store.commit_round(job, r, entries)
                write_s += time.perf_counter() - t0
                t0 = time.perf_counter()
                rm = store.read_round(job, r)
                read_s += time.perf_counter() - t0
                _verify(rm.matrix, updates, precision)
                raw_bytes += manifest.raw_bytes
                stored_bytes += manifest.stored_bytes
                progress.advance(task)
        committed = store.list_rounds(job)
        store.close()
    mb = raw_bytes / 1e6
    figures = {
        "rounds": float(len(committed)),
        "clients": float(clients),
        "raw_mb": mb,
        "stored_mb": stored_bytes / 1e6,
        "write_mb_s": mb / write_s,
        "read_mb_s": mb / read_s,
    }
    table = Table(title=f"FLStore demo: job {job!r} on the local stack ({precision})")
    for col in ("rounds", "clients", "bytes raw", "bytes stored", "write MB/s", "read MB/s"):
        table.add_column(col, justify="right")
    table.add_row(
        str(len(committed)),
        str(clients),
        f"{raw_bytes:,}",
        f"{stored_bytes:,}",
        f"{figures['write_mb_s']:.1f}",
        f"{figures['read_mb_s']:.1f}",
    )
    console.print(table)
    console.print("every round read back and verified against its manifest (sha256)")
    return figures


def _as_precision(text: str) -> Precision:
    for p in PRECISIONS:
        if p == text:
            return p
    raise ValidationError(f"unknown precision {text!r}")


def _verify(matrix: np.ndarray, updates: list[Update], precision: str) -> None:
    tol = {"float32": 0.0, "bfloat16": 2.0**-8, "float16": 2.0**-11}[precision]
    for i, u in enumerate(updates):
        expect = np.concatenate([a.reshape(-1) for a in u.tensors.values()])
        if not np.all(np.abs(matrix[i] - expect) <= np.abs(expect) * tol + 1e-30):
            raise AssertionError(f"round read back differs for client {i}")
