"""The scale benchmark's plots: weak scaling (p50 against clients in the round, FLStore and
objstore-agg) and strong scaling (p50 of one novel request against cache nodes)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def plot(runs: list[dict[str, Any]], out_dir: Path, workloads: Sequence[str]) -> list[str]:
    """The weak-scaling p50s of each of ``workloads`` against clients, the strong-scaling ones
    against nodes; the paths of the PNGs written into ``out_dir``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    weak = [r for r in runs if r.get("scaling") == "weak"]
    if weak:
        fig, axes = plt.subplots(1, len(workloads), figsize=(4 * len(workloads), 3.6))
        for ax, name in zip(axes, workloads, strict=True):
            for system, style in (("flstore-warm", "o-"), ("objstore-agg", "s--")):
                rs = sorted(
                    (r for r in weak if r["workload"] == name and r["system"] == system),
                    key=lambda r: r["clients"],
                )
                ax.plot([r["clients"] for r in rs], [r["p50"] for r in rs], style, label=system)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_title(name)
            ax.set_xlabel("clients in the round")
            ax.grid(True, which="both", alpha=0.3)
        axes[0].set_ylabel("p50 latency (ms)")
        axes[0].legend()
        fig.tight_layout()
        path = out_dir / "scale_weak.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(str(path))
    strong = [r for r in runs if r.get("scaling") == "strong"]
    if strong:
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        for name, style in (("trimmed_mean", "o-"), ("cosine_select", "s-")):
            rs = sorted((r for r in strong if r["workload"] == name), key=lambda r: r["nodes"])
            ax.plot([r["nodes"] for r in rs], [r["p50"] for r in rs], style, label=name)
            if name == "trimmed_mean" and rs:
                ideal = [rs[0]["p50"] / r["nodes"] for r in rs]
                ax.plot([r["nodes"] for r in rs], ideal, ":", color="grey", label="ideal 1/k")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("cache nodes (= blocks)")
        ax.set_ylabel("p50 latency (ms)")
        ax.set_title(f"one novel request, {os.cpu_count()} cores")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = out_dir / "scale_strong.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(str(path))
    return written
