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

from lambdas.local_runtime.network import NetworkModel, load_network


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


def network_arg(spec: str) -> NetworkModel | None:
    """``--network``'s value: ``aws`` (the published table), ``none``, or a JSON file of
    overrides (:func:`lambdas.local_runtime.network.load_network`); bad ones are usage errors."""
    try:
        return load_network(spec)
    except (OSError, ValueError) as exc:
        raise argparse.ArgumentTypeError(f"{spec}: {exc}") from exc


def add_network_flag(p: argparse.ArgumentParser) -> None:
    """``--network aws|none|PATH`` on the benchmarks that run FLStore and the baselines side
    by side; ``args.network`` is then the :class:`NetworkModel` or ``None``. Off by default:
    a run without the flag measures the loopback stack, as before the model existed."""
    p.add_argument(
        "--network",
        type=network_arg,
        default=None,
        metavar="aws|none|PATH",
        help="AWS's network hops injected into the local stack and both baselines: 'aws' "
        "(the published table), 'none' (loopback only, the default) or a JSON file of fields",
    )


def network_json(model: NetworkModel | None) -> dict[str, Any]:
    """The report's top-level ``network`` object: the table used, with its sources."""
    return model.to_json() if model is not None else {"name": "none"}
