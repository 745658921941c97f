"""``flstore demo`` (``make demo``): the main job, end to end, on the embedded local stack.

1. Start the local stack: moto S3, the cache-node functions behind the local Lambda endpoint,
   the router behind the local API Gateway.
2. Run a real Flower job — ``ServerApp`` + ``ClientApp``, a ``FedAvg`` wrapped with
   :func:`~flstore_core.integrations.flower.with_flstore` — of the small CNN on scikit-learn's
   digits, non-IID, one client flipping its labels. Every round is handed to FLStore as it ends
   and ingested (stored, committed, prefetched onto the owner nodes).
3. Run every workload of the catalogue through the HTTP API on the latest round, next to the two
   aggregator baselines (``objstore-agg`` over S3, ``cache-agg`` over a real Redis), and print
   what each found, its latency and its cost per request; write ``demo-out/report.json`` and
   ``demo-out/latency.png``.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from flstore_core.errors import FLStoreError

JOB = "digits"
SYSTEMS = ("flstore-warm", "objstore-agg", "cache-agg")


def workload_params(name: str, clients: list[str], malicious: list[str]) -> dict[str, Any]:
    """The request the demo sends for each workload."""
    benign = [c for c in clients if c not in malicious]
    table: dict[str, dict[str, Any]] = {
        "cosine_select": {"k": 3},
        "accuracy_select": {"k": 3},
        "oort_select": {"k": 3},
        "malicious_cosine": {"k": 1},
        "krum": {"f": 1},
        "multi_krum": {"f": 1},
        "kmeans": {"k": 2},
        "personalize": {"client": benign[0]},
        "feddebug": {"num_faulty": 1},
    }
    return table.get(name, {})


def model_name(key: str) -> str:
    """``results/{workload}/{round}/{digest}.safetensors.zst`` → ``{digest}`` (short)."""
    return key.rsplit("/", 1)[-1].split(".", 1)[0][:10] + "…"


def found(name: str, result: dict[str, Any]) -> str:
    """One line saying what a workload found."""

    def short(ids: list[str], n: int = 3) -> str:
        return ", ".join(ids[:n]) + (" …" if len(ids) > n else "")

    if "flagged" in result and name not in {"reputation"}:
        return f"flagged {short(result['flagged'])}" if result["flagged"] else "flagged none"
    if name in {"kmeans", "cfl_split"} and "labels" in result:
        labels: dict[str, int] = result["labels"]
        groups: dict[int, list[str]] = {}
        for c, lab in labels.items():
            groups.setdefault(lab, []).append(c)
        smallest = min(groups.values(), key=len)
        return f"{short(sorted(smallest))} apart from {len(labels) - len(smallest)} others"
    if name in {"contribution_loo", "contribution_shapley", "incentive", "reputation"}:
        values: dict[str, float] = result["values"]
        if not values:
            return "no values (summaries missing)"
        worst = min(values, key=lambda c: values[c])
        return f"lowest {worst} ({values[worst]:+.3g})"
    if "selected" in result:
        extra = f", model {model_name(result['model_key'])}" if "model_key" in result else ""
        return f"selected {short(result['selected'])}{extra}"
    if "accuracy" in result:
        return f"accuracy {result['accuracy']:.3f}"
    if "model_key" in result:
        return f"model {model_name(result['model_key'])}"
    return ", ".join(sorted(result))[:40]


@contextmanager
def baselines(stack: Any, console: Console) -> Iterator[dict[str, str]]:
    """Start the two aggregator baselines (cache-agg only when redis-server is installed)."""
    from evaluation.baselines import (
        Aggregator,
        RedisServer,
        populate_redis,
        populate_redis_job,
        redis_server_binary,
    )

    urls: dict[str, str] = {}
    with ExitStack() as stack_cm:
        s3 = stack_cm.enter_context(Aggregator("s3", stack.s3_endpoint, stack.config.bucket))
        urls["objstore-agg"] = s3.url
        if redis_server_binary() is None:
            console.print("[yellow]redis-server not installed: cache-agg skipped[/yellow]")
        else:
            redis = stack_cm.enter_context(RedisServer())
            client = redis.client()
            for r in stack.store.list_rounds(JOB):
                populate_redis(stack.store, client, JOB, r)
            populate_redis_job(stack.store, client, JOB)
            client.close()
            agg = Aggregator("redis", stack.s3_endpoint, stack.config.bucket, redis.url)
            urls["cache-agg"] = stack_cm.enter_context(agg).url
        yield urls


def run_demo(
    clients: int = 10, rounds: int = 5, repetitions: int = 3, out: str = "demo-out"
) -> dict[str, Any]:
    """Run the demo; returns (and writes) the report."""
    from evaluation.flower_digits import run_flower_job
    from flstore_core.integrations.flower import RoundWriterSink
    from flstore_core.sdk.client import FLStoreClient
    from flstore_core.sdk.round_writer import RoundWriter
    from flstore_core.workloads import catalogue
    from lambdas.local_runtime.stack import LocalStack, StackConfig
    from pipelines.ingest import ingest_on_drop

    console = Console()
    t_start = time.perf_counter()
    report: dict[str, Any] = {"job": JOB, "clients": clients, "rounds": rounds, "workloads": {}}
    with LocalStack(StackConfig(nodes=4, replication=2, memory_mb=2048)) as stack:
        assert stack.store is not None and stack.router is not None
        router, store = stack.router, stack.store
        console.print(
            f"local stack up: gateway [bold]{stack.gateway_url}[/bold], "
            f"{stack.config.nodes} cache nodes, S3 {stack.s3_endpoint}"
        )

        # every round Flower finishes is dropped as raw update files and ingested at once by
        # the Beam pipeline (stored, summarised, committed, prefetched onto its owner nodes)
        staging = tempfile.mkdtemp(prefix="flstore-demo-staging-")
        writer = RoundWriter(
            staging,
            JOB,
            on_round=ingest_on_drop(
                s3_endpoint=stack.s3_endpoint, bucket=stack.config.bucket, prefetch=router
            ),
        )

        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total} rounds"),
            TimeElapsedColumn(),
            console=console,
        ) as progress:
            task = progress.add_task("Flower training + Beam ingestion", total=rounds)

            def on_round(r: int, acc: float) -> None:
                progress.update(
                    task,
                    advance=1,
                    description=f"Flower training + Beam ingestion (round {r}: accuracy {acc:.2f})",
                )

            summary = run_flower_job(
                RoundWriterSink(writer),
                job=JOB,
                clients=clients,
                rounds=rounds,
                malicious=1,
                progress=on_round,
                store=store,
                name_clients=True,
            )
        shutil.rmtree(staging, ignore_errors=True)
        committed = store.list_rounds(JOB)
        report["flower"] = {
            "accuracy": summary.accuracy,
            "malicious": summary.malicious,
            "committed_rounds": committed,
            "seconds": round(time.perf_counter() - t_start, 1),
        }
        console.print(
            f"Flower job: {clients} clients × {rounds} rounds, global accuracy "
            f"{' → '.join(f'{a:.2f}' for a in summary.accuracy)}; malicious "
            f"{', '.join(summary.malicious)}; rounds committed {committed}"
        )
        last = committed[-1]
        api = FLStoreClient(stack.gateway_url, stack.token)
        with baselines(stack, console) as urls:
            agg_clients = {s: FLStoreClient(u, stack.token) for s, u in urls.items()}
            names = [w["name"] for w in catalogue()]
            classes = {w["name"]: w["class"] for w in catalogue()}
            with Progress(console=console, transient=True) as progress:
                task = progress.add_task("workloads through the HTTP API", total=len(names))
                for name in names:
                    params = workload_params(name, summary.clients, summary.malicious)
                    rnd = last if classes[name] == "round" else None
                    systems = {
                        s: bound_call(c, name, rnd, params)
                        for s, c in {"flstore-warm": api, **agg_clients}.items()
                    }
                    report["workloads"][name] = measure(name, classes[name], systems, repetitions)
                    progress.advance(task)
    report["seconds"] = round(time.perf_counter() - t_start, 1)
    print_table(console, report)
    write_outputs(console, report, Path(out))
    return report


def bound_call(
    client: Any, name: str, round_: int | None, params: dict[str, Any]
) -> Callable[[], dict[str, Any]]:
    """A request of one workload to one system, ready to time."""

    def call() -> dict[str, Any]:
        answer: dict[str, Any] = client.run(JOB, name, round=round_, **params)
        return answer

    return call


def measure(
    name: str, cls: str, systems: dict[str, Callable[[], dict[str, Any]]], repetitions: int
) -> dict[str, Any]:
    """p50 latency and mean cost of each system; the result FLStore returned."""
    row: dict[str, Any] = {"class": cls, "systems": {}}
    try:
        first = systems["flstore-warm"]()  # also warms the node's artifacts for this workload
    except FLStoreError as exc:
        row["error"] = f"{exc.status} {exc.message}"
        return row
    row["result"] = first["result"]
    row["found"] = found(name, first["result"])
    samples: dict[str, list[float]] = {s: [] for s in systems}
    costs: dict[str, list[float]] = {s: [] for s in systems}
    for _ in range(repetitions):  # interleaved
        for system, call in systems.items():
            t0 = time.perf_counter()
            answer = call()
            samples[system].append((time.perf_counter() - t0) * 1000)
            costs[system].append(float(answer["meta"]["cost_usd"]))
            if system != "flstore-warm" and answer["result"] != first["result"]:
                row.setdefault("disagree", []).append(system)
    for system in systems:
        row["systems"][system] = {
            "p50_ms": float(np.percentile(samples[system], 50)),
            "p95_ms": float(np.percentile(samples[system], 95)),
            "cost_usd": float(np.mean(costs[system])),
        }
    return row


def print_table(console: Console, report: dict[str, Any]) -> None:
    table = Table(
        title=f"FLStore demo: every workload on round {report['flower']['committed_rounds'][-1]} "
        f"of the Flower job (p50 latency · cost per request)",
        show_lines=False,
    )
    table.add_column("workload")
    table.add_column("class")
    table.add_column("found", max_width=38)
    for s in SYSTEMS:
        table.add_column(s, justify="right")
    table.add_column("speed-up", justify="right")
    for name, row in report["workloads"].items():
        if "error" in row:
            table.add_row(name, row["class"], f"[red]{row['error']}[/red]")
            continue
        cells = []
        for s in SYSTEMS:
            m = row["systems"].get(s)
            cells.append(f"{m['p50_ms']:.1f} ms · ${m['cost_usd']:.1e}" if m else "—")
        warm = row["systems"]["flstore-warm"]["p50_ms"]
        base = row["systems"].get("objstore-agg", {}).get("p50_ms")
        speed = f"{base / warm:.0f}×" if base and warm > 0 else "—"
        table.add_row(name, row["class"], row["found"], *cells, speed)
    Console(width=max(console.width, 160)).print(table)
    console.print(
        f"malicious client: [bold]{', '.join(report['flower']['malicious'])}[/bold]; "
        f"demo took {report['seconds']:.0f} s"
    )


def write_outputs(console: Console, report: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    names = [n for n, r in report["workloads"].items() if r.get("systems")]
    fig, ax = plt.subplots(figsize=(max(8, len(names) * 0.7), 4.5))
    width = 0.8 / len(SYSTEMS)
    for i, system in enumerate(SYSTEMS):
        values = [report["workloads"][n]["systems"].get(system, {}).get("p50_ms", 0) for n in names]
        ax.bar(np.arange(len(names)) + i * width, values, width, label=system)
    ax.set_xticks(np.arange(len(names)) + width * (len(SYSTEMS) - 1) / 2)
    ax.set_xticklabels(names, rotation=45, ha="right")
    ax.set_yscale("log")
    ax.set_ylabel("p50 latency (ms, log scale)")
    ax.set_title("FLStore vs aggregator baselines, per workload")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "latency.png", dpi=120)
    plt.close(fig)
    console.print(f"wrote {out / 'report.json'} and {out / 'latency.png'}")
