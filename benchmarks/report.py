"""The benchmark output format of ARCHITECTURE §9, shared by every ``benchmarks/*.py``."""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np


def machine() -> dict[str, Any]:
    """What ran the benchmark."""
    import zstandard

    info: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "zstandard": zstandard.__version__,
        "platform": platform.platform(),
        "processor": platform.machine(),
    }
    try:
        import psutil

        info["memory_gb"] = round(psutil.virtual_memory().total / 1024**3, 1)
    except ImportError:  # pragma: no cover - psutil is a dependency
        pass
    return info


def summarize(samples: Sequence[float]) -> dict[str, float]:
    """p50 and p95 of the samples (linear interpolation), and their count."""
    arr = np.asarray(samples, dtype=np.float64)
    return {
        "p50": float(np.percentile(arr, 50)),
        "p95": float(np.percentile(arr, 95)),
        "n": int(arr.size),
    }


def interleave(
    systems: dict[str, Callable[[], float]], repetitions: int, warmup: int = 1
) -> dict[str, list[float]]:
    """Run each system's measurement in turn, ``repetitions`` times, so drift hits all alike."""
    for _ in range(warmup):
        for fn in systems.values():
            fn()
    out: dict[str, list[float]] = {name: [] for name in systems}
    for _ in range(repetitions):
        for name, fn in systems.items():
            out[name].append(fn())
    return out


def timed(fn: Callable[[], object]) -> float:
    """Wall time of one call in milliseconds."""
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1000.0


def write_report(name: str, runs: list[dict[str, Any]], path: str | None) -> dict[str, Any]:
    """Write the §9 object to ``path`` (when given) and return it."""
    report = {"benchmark": name, "machine": machine(), "runs": runs}
    if path:
        with open(path, "w") as fh:
            json.dump(report, fh, indent=2)
    return report


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--json", metavar="OUT", help="write the result object to OUT")
    p.add_argument("--repetitions", type=int, default=5)
    return p
