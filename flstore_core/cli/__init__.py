"""The ``flstore`` command line (typer + rich).

The CLI is one of ``flstore_core``'s two faces: it may compose the layers (start the local stack,
run a pipeline), and nothing else in ``flstore_core`` imports it. Commands that query FLStore go
through the HTTP API with :class:`flstore_core.sdk.client.FLStoreClient`, finding the local stack in
``.flstore/local.json`` unless ``--url``/``--token`` (or ``FLSTORE_URL``/``FLSTORE_TOKEN``) say
otherwise.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from flstore_core import __version__, config
from flstore_core.cli.local import local_app
from flstore_core.cli.logs import configure_logging
from flstore_core.cli.state import STATE, console
from flstore_core.errors import FLStoreError, ValidationError
from flstore_core.routing.placement import ShardKey

app = typer.Typer(
    name="flstore",
    help="FLStore: serverless storage and compute for federated-learning metadata.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
token_app = typer.Typer(help="Bearer tokens for the HTTP API.")
job_app = typer.Typer(help="Jobs: declare a model, a storage precision, a validation set.")
app.add_typer(local_app, name="local")
app.add_typer(job_app, name="job")
app.add_typer(token_app, name="token")

URL = typer.Option(
    None, "--url", envvar=config.URL.name, help="API base URL (default: local stack)"
)
TOKEN = typer.Option(None, "--token", envvar=config.TOKEN.name, help="Bearer token")


def _client(url: str | None, token: str | None) -> Any:
    from flstore_core.sdk.client import FLStoreClient

    if url:
        return FLStoreClient(url, token)
    return FLStoreClient.from_local(str(STATE))


def _fail(exc: FLStoreError) -> None:
    console.print(f"[red]error[/red] ({exc.status} {exc.code}): {exc.message}")
    raise typer.Exit(1)


@app.command()
def version() -> None:
    """Print FLStore's version."""
    typer.echo(__version__)


@app.command()
def demo(
    clients: int = typer.Option(10, min=3, help="Flower clients (one of them malicious)."),
    rounds: int = typer.Option(5, min=1, help="Flower rounds."),
    repetitions: int = typer.Option(3, min=1, help="Timed requests per workload and system."),
    out: str = typer.Option("demo-out", help="Where report.json and latency.png go."),
) -> None:
    """Run the main job: a Flower job feeding FLStore, then every workload via the HTTP API."""
    from evaluation.demo import run_demo

    run_demo(clients=clients, rounds=rounds, repetitions=repetitions, out=out)


# ---------------------------------------------------------------------- API commands


def _parse_param(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ValidationError(f"--param {text!r} must be key=value")
    key, raw = text.split("=", 1)
    try:
        value = json.loads(raw)
    except ValueError:
        value = raw  # plain strings need no quotes
    return key.strip(), value


@app.command()
def run(
    workload: str = typer.Argument(..., help="Workload name (see `flstore workloads`)."),
    job: str = typer.Option(..., "--job", "-j"),
    round_: int = typer.Option(None, "--round", "-r"),
    param: list[str] = typer.Option([], "--param", "-p", help="key=value (JSON values)"),
    as_json: bool = typer.Option(False, "--json", help="Print the raw response."),
    url: str = URL,
    token: str = TOKEN,
) -> None:
    """Run a workload through the HTTP API."""
    try:
        params = dict(_parse_param(p) for p in param)
        answer = _client(url, token).run(job, workload, round=round_, **params)
    except FLStoreError as exc:
        _fail(exc)
        return
    if as_json:
        typer.echo(json.dumps(answer, indent=2))
        return
    table = Table(title=f"{workload} on job {job!r} round {round_}")
    table.add_column("field")
    table.add_column("value", overflow="fold")
    for key, value in answer["result"].items():
        table.add_row(key, value if isinstance(value, str) else json.dumps(value))
    meta = answer["meta"]
    table.add_row(
        "meta",
        f"cache={meta['cache']} nodes={','.join(meta['nodes'])} "
        f"latency={meta['latency_ms']:.1f} ms cost=${meta['cost_usd']:.3g}",
    )
    console.print(table)


@app.command()
def rounds(job: str = typer.Option(..., "--job", "-j"), url: str = URL, token: str = TOKEN) -> None:
    """List the committed rounds of a job."""
    try:
        answer = _client(url, token).rounds(job)
    except FLStoreError as exc:
        _fail(exc)
        return
    table = Table(title=f"rounds of job {job!r}")
    for col in ("round", "clients", "bytes"):
        table.add_column(col, justify="right")
    for r in answer:
        table.add_row(str(r["round"]), str(len(r["clients"])), f"{r['bytes']:,}")
    console.print(table)


@app.command()
def workloads(url: str = URL, token: str = TOKEN) -> None:
    """List the workload catalogue."""
    try:
        answer = _client(url, token).workloads()
    except FLStoreError as exc:
        _fail(exc)
        return
    table = Table(title="workloads")
    for col in ("name", "class", "params", "description"):
        table.add_column(col, overflow="fold")
    for w in answer:
        ps = ", ".join(f"{k}={v['default']}" for k, v in w["params"].items())
        table.add_row(w["name"], w["class"], ps, w["description"])
    console.print(table)


@app.command()
def stats() -> None:
    """Per-node cache statistics of the local stack (hits, misses, loads, bytes, evictions)."""
    from flstore_core.aws import lambda_client

    if not STATE.exists():
        console.print("no local stack here: run `flstore local up` first")
        raise typer.Exit(1)
    state = json.loads(STATE.read_text())
    client = lambda_client(state["lambda_endpoint"], read_timeout=60)
    table = Table(title="cache nodes")
    cols = (
        "node",
        "shards",
        "blocks",
        "hits",
        "misses",
        "loads",
        "evictions",
        "MB held",
        "MB budget",
        "S3 GETs",
    )
    for col in cols:
        table.add_column(col, justify="right")
    held: dict[str, list[str]] = {}
    for i in range(int(state["nodes"])):
        name = f"{state['prefix']}-cache-{i}"
        resp = client.invoke(FunctionName=name, Payload=b'{"op": "stats"}')
        s = json.loads(resp["Payload"].read())
        blocks = block_summary(s["shards"])
        held[name] = blocks
        table.add_row(
            name,
            str(len(s["shards"])),
            str(sum(len(b.split(": ", 1)[1].split(",")) for b in blocks)),
            str(s["hits"]),
            str(s["misses"]),
            str(s["loads"]),
            str(s["evictions"]),
            f"{s['bytes_held'] / 1e6:.1f}",
            f"{s['budget_bytes'] / 1e6:.1f}",
            str(s["s3_gets"]),
        )
    console.print(table)
    for name, blocks in held.items():
        for line in blocks:
            console.print(f"{name}  {line}")


def block_summary(shards: list[str]) -> list[str]:
    """The column blocks among a node's shard keys, one line per round: ``job/round R: 0,3,7
    of 15``."""
    rounds: dict[tuple[str, int], list[int]] = {}
    for text in shards:
        key = ShardKey.parse(text)
        if key.is_block:
            rounds.setdefault((f"{key.job}/round {key.part}", key.blocks), []).append(key.block)
    return [
        f"{where}: {','.join(str(b) for b in sorted(blocks))} of {count}"
        for (where, count), blocks in sorted(rounds.items())
    ]


@app.command()
def plan(
    clients: int = typer.Option(..., "--clients", min=1, help="Clients in the round."),
    params: int = typer.Option(
        None, "--params", min=1, help="Parameters a client update has (float32 each)."
    ),
    model: str = typer.Option(None, "--model", help="A registry model instead of --params."),
    nodes: int = typer.Option(
        config.CACHE_NODES.default_int, "--nodes", min=1, help="Cache nodes of the stack."
    ),
    memory_mb: int = typer.Option(
        config.CACHE_MEMORY_MB.default_int, "--memory-mb", min=128, help="Memory of each node."
    ),
    budget_mb: int = typer.Option(
        None, "--cache-budget-mb", min=1, help="Cache budget (default: what the memory leaves)."
    ),
    replication: int = typer.Option(
        config.REPLICATION.default_int, "--replication", min=1, help="Replicas per shard."
    ),
) -> None:
    """How a round of this size is laid out on a stack: blocks, owners, load per node — or why
    no layout holds it (the 503 the router would answer)."""
    from flstore_core.cache.budget import MiB, cache_budget
    from flstore_core.data.codec import TensorSpec
    from flstore_core.routing.planner import plan_round

    if (params is None) == (model is None):
        console.print("give exactly one of --params or --model")
        raise typer.Exit(2)
    if model is not None:
        from flstore_core import models

        try:
            specs = tuple(models.state_specs(models.build(model)))
        except FLStoreError as exc:
            _fail(exc)
            return
    else:
        specs = (TensorSpec("params", "F32", (params,)),)
    budget = budget_mb * MiB if budget_mb else cache_budget(memory_mb)
    try:
        layout = plan_round(
            "plan", 0, specs, clients, nodes=nodes, replication=replication, budget=budget
        )
    except FLStoreError as exc:
        _fail(exc)
        return
    load: dict[int, int] = {}
    for block in layout.blocks:
        for node in block.owners:
            load[node] = load.get(node, 0) + block.nbytes
    copies = [len(b.owners) for b in layout.blocks]
    console.print(
        f"round of {clients} clients x {layout.n_params:,} parameters: "
        f"{layout.footprint / MiB:,.1f} MB in memory; node budget {budget / MiB:,.1f} MB"
    )
    console.print(
        f"{len(layout.blocks)} block(s) of up to {max(b.nbytes for b in layout.blocks) / MiB:,.1f}"
        f" MB; copies per block {min(copies)}-{max(copies)} (replication {replication}); "
        f"{len(load)} of {nodes} nodes hold some, the fullest "
        f"{max(load.values()) / MiB:,.1f} MB"
    )


def _store() -> Any:
    """The object store of the local stack (``.flstore/local.json``), else of the environment."""
    from flstore_core.storage.object_store import ObjectStore

    if STATE.exists() and not config.S3_ENDPOINT.get():
        state = json.loads(STATE.read_text())
        return ObjectStore(state["bucket"], endpoint_url=state["s3_endpoint"])
    return ObjectStore()


@job_app.command("create")
def job_create(
    job: str = typer.Argument(..., help="Job id."),
    model: str = typer.Option(None, "--model", help="Model architecture (digits_cnn, …)."),
    validation: Path = typer.Option(None, "--validation", help="safetensors file with x, y."),
    precision: str = typer.Option("float32", "--precision", help="float32, bf16 or fp16."),
) -> None:
    """Declare a job (or change its model, precision or validation set)."""
    from flstore_core.sdk.jobs import create_job

    try:
        spec = create_job(
            _store(),
            job,
            model=model,
            precision=precision,
            validation=str(validation) if validation else None,
        )
    except FLStoreError as exc:
        _fail(exc)
        return
    console.print(f"job [bold]{spec.job}[/bold]: model={spec.model} precision={spec.precision}")


@token_app.command("new")
def token_new(
    job: list[str] = typer.Option(["*"], "--job", "-j", help="Granted job (repeat; * for all)."),
) -> None:
    """Make a bearer token; prints it once and the hash entry for FLSTORE_TOKENS/tokenHashes."""
    from flstore_core.routing.auth import hash_token, new_token

    token = new_token()
    console.print(f"token (keep it secret): [bold]{token}[/bold]")
    typer.echo(json.dumps({hash_token(token): job}))


def _stack_target() -> tuple[str | None, str | None, Any]:
    """``(s3_endpoint, bucket, prefetch target)`` of the local stack, when one runs here and
    ``FLSTORE_S3_ENDPOINT`` does not point elsewhere."""
    if not STATE.exists() or config.S3_ENDPOINT.get():
        return None, None, None
    from pipelines.runtime import PrefetchTarget

    state = json.loads(STATE.read_text())
    return state["s3_endpoint"], state["bucket"], PrefetchTarget.from_local_state(STATE)


class _Bar:
    """A rich progress bar fed by the pipelines' progress events (in-process runners)."""

    def __init__(self, label: str, unit: str) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn(unit + "  {task.fields[mb]:.1f} MB"),
            TimeElapsedColumn(),
            console=console,
        )
        self.task = self.progress.add_task(label, total=None, mb=0.0)
        self.mb = 0.0

    def __call__(self, event: Any) -> None:
        if event.kind == "planned":
            self.progress.update(self.task, total=event.files)
        elif event.kind in ("stored", "model", "deadletter", "committed") and event.files:
            self.mb += event.bytes / 1e6
            self.progress.update(self.task, advance=event.files, mb=self.mb)
        if event.kind == "committed":
            self.progress.console.print(f"committed {event.detail}")

    def __enter__(self) -> _Bar:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()


_BEAM = {"allow_extra_args": True, "ignore_unknown_options": True}


@app.command(context_settings=_BEAM)
def ingest(
    ctx: typer.Context,
    src: str = typer.Argument(
        ...,
        help="Raw update files: a directory or s3://bucket/prefix (every *.safetensors "
        "under it), a file, or a glob.",
    ),
    job: str = typer.Option(
        None, "--job", "-j", help="Ingest into this job (declared with the default spec if new)."
    ),
    precision: str = typer.Option(
        None, "--precision", help="Storage precision of a new job: float32, bf16 or fp16."
    ),
    bucket: str = typer.Option(None, "--bucket", help="Bucket (default: local stack, env)."),
    s3_endpoint: str = typer.Option(None, "--s3-endpoint", help="S3 endpoint URL."),
    prefetch: bool = typer.Option(
        True, "--prefetch/--no-prefetch", help="Warm the owning cache nodes afterwards."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Ingest raw client updates with Apache Beam; any other --option goes to Beam
    (e.g. --runner=DataflowRunner --project=… --region=… --temp_location=gs://…)."""
    from pipelines.ingest import run_ingest

    stack_endpoint, stack_bucket, target = _stack_target()
    bar = None if as_json else _Bar("ingest", "files")
    try:
        with bar or contextlib.nullcontext():
            summary = run_ingest(
                src,
                job=job,
                precision=precision,
                beam_args=list(ctx.args),
                s3_endpoint=s3_endpoint or stack_endpoint,
                bucket=bucket or stack_bucket,
                prefetch=target if prefetch else None,
                progress=bar,
            )
    except FLStoreError as exc:
        _fail(exc)
        return
    if as_json:
        typer.echo(json.dumps(summary.to_json(), indent=1))
        return
    table = Table(title=f"ingest {summary.run_id}", show_header=False)
    table.add_row("files", str(summary.files))
    table.add_row(
        "updates",
        f"{summary.updates} ({summary.updates_written} written, "
        f"{summary.updates_already_stored} already stored, "
        f"{summary.updates_unchanged} already committed)",
    )
    table.add_row("models", f"{summary.models_written} written, {summary.models_unchanged} kept")
    table.add_row(
        "bytes",
        f"{summary.raw_bytes / 1e6:.1f} MB raw → {summary.stored_bytes / 1e6:.1f} MB stored, "
        f"{summary.throughput_mb_s:.1f} MB/s",
    )
    table.add_row(
        "rounds",
        f"{summary.rounds_committed} committed ({summary.manifests_written} manifests written): "
        + ", ".join(summary.committed[:8])
        + (" …" if len(summary.committed) > 8 else ""),
    )
    if prefetch and target is not None:
        p = summary.prefetch
        table.add_row(
            "prefetch",
            f"{p.get('loaded', 0)} loaded, {p.get('already', 0)} already warm, "
            f"{p.get('failed', 0) + p.get('errors', 0)} refused",
        )
    reasons = ", ".join(f"{k}: {v}" for k, v in summary.reasons().items())
    table.add_row("dead letters", f"{len(summary.deadletters)} {reasons}".strip())
    console.print(table)
    for d in summary.deadletters[:20]:
        console.print(f"  [red]{d.code}[/red] {d.file}: {d.reason}")
    if summary.deadletter_keys:
        console.print("dead letters in " + ", ".join(summary.deadletter_keys))
    if summary.deadletters:
        raise typer.Exit(2)


@app.command(context_settings=_BEAM)
def backfill(
    ctx: typer.Context,
    job: str = typer.Option(..., "--job", "-j", help="Job to backfill."),
    rounds: str = typer.Option(
        None, "--rounds", help="A:B, rounds A to B-1 (either end optional); default all."
    ),
    nodes: int = typer.Option(
        None, "--nodes", min=1, help="The cache's node count now (re-warm its new owners)."
    ),
    bucket: str = typer.Option(None, "--bucket", help="Bucket (default: local stack, env)."),
    s3_endpoint: str = typer.Option(None, "--s3-endpoint", help="S3 endpoint URL."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Recompute per-client summaries and contribution scores over historical rounds, then
    re-warm the shard owners; any other --option goes to Beam."""
    from pipelines.backfill import run_backfill

    stack_endpoint, stack_bucket, target = _stack_target()
    bar = None if as_json else _Bar("backfill", "rounds")
    try:
        with bar or contextlib.nullcontext():
            summary = run_backfill(
                job,
                rounds,
                beam_args=list(ctx.args),
                s3_endpoint=s3_endpoint or stack_endpoint,
                bucket=bucket or stack_bucket,
                prefetch=target,
                nodes=nodes,
                progress=bar,
            )
    except FLStoreError as exc:
        _fail(exc)
        return
    if as_json:
        typer.echo(json.dumps(summary.to_json(), indent=1))
        return
    span = f"{summary.rounds[0]}–{summary.rounds[-1]}" if summary.rounds else "none"
    console.print(
        f"backfilled {summary.rounds_backfilled} rounds of [bold]{job}[/bold] ({span}), "
        f"{summary.manifests_written} manifests rewritten in {summary.seconds:.1f} s"
    )
    if target is not None:
        p = summary.prefetch
        console.print(
            f"re-warmed owners ({summary.nodes or target.nodes} nodes): {p.get('loaded', 0)} "
            f"loaded, {p.get('already', 0)} already warm, "
            f"{p.get('failed', 0) + p.get('errors', 0)} refused"
        )


def main() -> None:
    """Console-script entry point."""
    configure_logging(verbose=bool(config.VERBOSE.get()))
    app()
