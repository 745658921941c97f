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
from rich.text import Text

from flstore_core import __version__, config
from flstore_core.cli import push as push_commands
from flstore_core.cli.local import local_app
from flstore_core.cli.logs import configure_logging
from flstore_core.cli.output import emit_json, fail, row, say, table
from flstore_core.cli.state import STATE, console, local_store, stack_target
from flstore_core.cli.stats import block_summary, stats
from flstore_core.errors import FLStoreError, ValidationError

__all__ = ["app", "block_summary", "main"]

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
app.command("push")(push_commands.push)
app.command("example")(push_commands.example)
app.command("stats")(stats)

URL = typer.Option(
    None, "--url", envvar=config.URL.name, help="API base URL (default: local stack)"
)
TOKEN = typer.Option(None, "--token", envvar=config.TOKEN.name, help="Bearer token")


def _client(url: str | None, token: str | None) -> Any:
    from flstore_core.sdk.client import FLStoreClient

    if url:
        return FLStoreClient(url, token)
    return FLStoreClient.from_local(str(STATE))


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
    network: str | None = typer.Option(
        None,
        help="Network model of the local stack's hops: 'aws', or a JSON file of overrides.",
    ),
) -> None:
    """Run the main job: a Flower job feeding FLStore, then every workload via the HTTP API."""
    from evaluation.demo import run_demo

    run_demo(clients=clients, rounds=rounds, repetitions=repetitions, out=out, network=network)


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
        fail(exc)
    if as_json:
        emit_json(answer)
        return
    where = f" round {round_}" if round_ is not None else ""
    out = table(f"{workload} on job {job!r}{where}")
    out.add_column("field")
    out.add_column("value", overflow="fold")
    for key, value in answer["result"].items():
        out.add_row(*row(key, value if isinstance(value, str) else json.dumps(value)))
    meta = answer["meta"]
    out.add_row(
        *row(
            "meta",
            f"cache={meta['cache']} nodes={','.join(meta['nodes'])} "
            f"latency={meta['latency_ms']:.1f} ms cost=${meta['cost_usd']:.3g}",
        )
    )
    console.print(out)


AS_JSON = typer.Option(False, "--json", help="Print the data as JSON.")


@app.command()
def rounds(
    job: str = typer.Option(..., "--job", "-j"),
    limit: int | None = typer.Option(
        None, "--limit", min=1, help="List at most this many rounds (default: every round)."
    ),
    after: int | None = typer.Option(
        None, "--after", min=0, help="List the rounds after this round (default: from the first)."
    ),
    as_json: bool = AS_JSON,
    url: str = URL,
    token: str = TOKEN,
) -> None:
    """List the committed rounds of a job, read from the API a page of up to 1,000 at a time."""
    try:
        client = _client(url, token)
        if limit is None:
            answer, more = client.rounds(job, after=after), False
        else:  # one round past the limit says whether more remain
            answer = client.rounds(job, limit=limit + 1, after=after)
            answer, more = answer[:limit], len(answer) > limit
    except FLStoreError as exc:
        fail(exc)
    if as_json:
        emit_json(answer)
        return
    if not answer:
        # the job is declared (job create, or a first ingest or push whose files were all
        # refused) but nothing of it was committed: say so instead of an empty table
        say(
            f"job {job!r} holds no committed round yet. A round appears once committed "
            "(flstore push, flstore ingest, the SDK's commit_round or the Flower sink); an "
            "ingest whose files were all dead letters commits none: its summary, and its dead "
            f"letters under jobs/{job}/ingest/deadletter/, say why."
        )
        return
    out = table(f"rounds of job {job!r}")
    for col in ("round", "clients", "bytes"):
        out.add_column(col, justify="right")
    for r in answer:
        out.add_row(*row(r["round"], len(r["clients"]), f"{r['bytes']:,}"))
    console.print(out)
    if more:
        last = answer[-1]["round"]
        say(f"more rounds follow: flstore rounds --job {job} --after {last} --limit {limit}")


@app.command()
def workloads(as_json: bool = AS_JSON, url: str = URL, token: str = TOKEN) -> None:
    """List the workload catalogue."""
    try:
        answer = _client(url, token).workloads()
    except FLStoreError as exc:
        fail(exc)
    if as_json:
        emit_json(answer)
        return
    out = table("workloads")
    for col in ("name", "class", "params", "description"):
        out.add_column(col, overflow="fold")
    for w in answer:
        ps = ", ".join(f"{k}={v['default']}" for k, v in w["params"].items())
        out.add_row(*row(w["name"], w["class"], ps, w["description"]))
    console.print(out)


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
        None,
        "--cache-budget-mb",
        min=1,
        help="Cache budget in MiB (default: what the memory leaves).",
    ),
    replication: int = typer.Option(
        config.REPLICATION.default_int, "--replication", min=1, help="Replicas per shard."
    ),
    as_json: bool = AS_JSON,
) -> None:
    """How a round of this size is laid out on a stack: blocks, owners, load per node — or why
    no layout holds it (the 503 the router would answer)."""
    from flstore_core.cache.budget import MiB, cache_budget
    from flstore_core.data.codec import TensorSpec
    from flstore_core.routing.planner import plan_round

    if (params is None) == (model is None):
        say("give exactly one of --params or --model")
        raise typer.Exit(2)
    try:
        if model is not None:
            from flstore_core import models

            specs = tuple(models.state_specs(models.build(model)))
        else:
            specs = (TensorSpec("params", "F32", (params,)),)
        budget = budget_mb * MiB if budget_mb else cache_budget(memory_mb)
        layout = plan_round(
            "plan", 0, specs, clients, nodes=nodes, replication=replication, budget=budget
        )
    except FLStoreError as exc:
        fail(exc)
    load = layout.node_bytes()
    copies = [len(b.owners) for b in layout.blocks]
    fill = {n: load.get(n, 0) for n in range(nodes)}
    figures = {
        "clients": clients,
        "params": layout.n_params,
        "footprint_mib": layout.footprint / MiB,
        "budget_mib": budget / MiB,
        "stack_fill": layout.footprint / (nodes * budget),
        "blocks": len(layout.blocks),
        "largest_block_mib": max(b.nbytes for b in layout.blocks) / MiB,
        "copies": [min(copies), max(copies)],
        "replication": replication,
        "nodes": nodes,
        "nodes_used": len(load),
        "fullest_node_mib": max(load.values()) / MiB,
        "node_bytes": [fill[n] for n in range(nodes)],
        "node_fill": [fill[n] / budget for n in range(nodes)],
    }
    if as_json:
        emit_json(figures)
        return
    _say_plan(figures)


_MIB = 1024 * 1024


def _say_plan(figures: dict[str, Any]) -> None:
    """``flstore plan``'s lines: the round, its blocks, and how full each node is."""
    nodes, budget = figures["nodes"], figures["budget_mib"] * _MIB
    say(
        f"round of {figures['clients']} clients x {figures['params']:,} parameters: "
        f"{figures['footprint_mib']:,.1f} MiB in memory "
        f"({figures['stack_fill']:.0%} of the stack's {nodes * figures['budget_mib']:,.1f} MiB); "
        f"node budget {figures['budget_mib']:,.1f} MiB"
    )
    low, high = figures["copies"]
    say(
        f"{figures['blocks']} block(s) of up to {figures['largest_block_mib']:,.1f} MiB; "
        f"copies per block {low}-{high} (replication {figures['replication']}); "
        f"{figures['nodes_used']} of {nodes} nodes hold some, the fullest "
        f"{figures['fullest_node_mib']:,.1f} MiB"
    )
    for node, held in enumerate(figures["node_bytes"]):
        say(
            f"  node {node}: {held:,} bytes ({held / _MIB:,.1f} MiB), "
            f"{held / budget:.0%} of its budget"
        )


@job_app.command("create")
def job_create(
    job: str = typer.Argument(..., help="Job id."),
    model: str = typer.Option(
        None, "--model", help="Model architecture (digits_cnn, …); default: the job's own."
    ),
    validation: Path = typer.Option(
        None,
        "--validation",
        help="Validation set holding x and y: .npz, .safetensors, or a dict saved with "
        "torch.save (.pt, loaded with weights_only=True).",
    ),
    precision: str = typer.Option(
        None, "--precision", help="float32, bf16 or fp16; default: the job's own, else float32."
    ),
    force: bool = typer.Option(
        False,
        "--force",
        help="Change the model or validation set of a job with committed rounds, even one "
        "its rounds do not fit (past answers were computed with the old ones).",
    ),
) -> None:
    """Declare a job (or change its model, precision or validation set; what is not given
    stays as it was)."""
    from flstore_core.sdk.jobs import create_job, read_validation_file, serving_problems

    store = local_store()
    try:
        old = store.get_job_spec(job) if store.job_exists(job) else None
        chosen = model or (old.model if old else None)
        data = read_validation_file(validation) if validation else None
        problems = serving_problems(
            store, job, model=chosen, validation_shape=None if data is None else data[0].shape
        )
        if problems:
            say(f"declaring job {job!r} this way breaks what it holds:", "yellow")
            for problem in problems:
                say(f"  {problem}")
            if not force:
                say("nothing changed; give --force to declare it anyway")
                raise typer.Exit(1)
        spec = create_job(
            store,
            job,
            model=chosen,
            precision=precision or (old.precision if old else "float32"),
            validation=data,
            hyperparameters=dict(old.hyperparameters) if old else None,
            force=force,
        )
    except FLStoreError as exc:
        fail(exc)
    say(f"job {spec.job}: model={spec.model} precision={spec.precision}")


@token_app.command("new")
def token_new(
    job: list[str] = typer.Option(["*"], "--job", "-j", help="Granted job (repeat; * for all)."),
) -> None:
    """Make a bearer token; prints it once and the hash entry for FLSTORE_TOKENS/tokenHashes."""
    from flstore_core.routing.auth import hash_token, new_token

    token = new_token()
    console.print(Text.assemble("token (keep it secret): ", (token, "bold")))
    typer.echo(json.dumps({hash_token(token): job}))


# what rawfile.check_identity says of a file without FLStore's identity metadata
_NO_IDENTITY = ("metadata needs 'job'", "needs 'client' and 'round'", "needs 'round'")


def identity_hint(reason: str) -> str | None:
    """How to fix a dead letter for missing identity metadata (a plain checkpoint, most
    likely), or ``None`` for any other reason."""
    if not reason.startswith("raw update file:") or not any(n in reason for n in _NO_IDENTITY):
        return None
    return (
        "a raw update file carries its identity in the safetensors __metadata__: add the keys "
        "job, round, client and num_examples (metrics optional, as a JSON object); for plain "
        "checkpoints (a state dict from safetensors or torch.save) use "
        "`flstore push DIR --job J --round R` instead"
    )


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

    stack_endpoint, stack_bucket, target = stack_target()
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
        fail(exc)
    if as_json:
        found = summary.to_json()
        for d in found["deadletters"]:
            d["hint"] = identity_hint(d["reason"])
        typer.echo(json.dumps(found, indent=1))
    else:
        _print_ingest(summary, prefetch and target is not None)
    if summary.deadletters:  # the good files are committed; the exit code says not all were
        raise typer.Exit(2)


def _print_ingest(summary: Any, warmed: bool) -> None:
    """The human summary of an ingestion run, each dead letter with a hint where one helps."""
    out = table(f"ingest {summary.run_id}", show_header=False)
    out.add_row(*row("files", summary.files))
    out.add_row(
        "updates",
        f"{summary.updates} ({summary.updates_written} written, "
        f"{summary.updates_already_stored} already stored, "
        f"{summary.updates_unchanged} already committed)",
    )
    out.add_row("models", f"{summary.models_written} written, {summary.models_unchanged} kept")
    out.add_row(
        "bytes",
        f"{summary.raw_bytes / 1e6:.1f} MB raw → {summary.stored_bytes / 1e6:.1f} MB stored, "
        f"{summary.throughput_mb_s:.1f} MB/s",
    )
    committed = ", ".join(summary.committed[:8]) + (" …" if len(summary.committed) > 8 else "")
    out.add_row(
        *row(
            "rounds",
            f"{summary.rounds_committed} committed ({summary.manifests_written} manifests "
            f"written): {committed}",
        )
    )
    if warmed:
        p = summary.prefetch
        out.add_row(
            "prefetch",
            f"{p.get('loaded', 0)} loaded, {p.get('already', 0)} already warm, "
            f"{p.get('failed', 0) + p.get('errors', 0)} refused",
        )
    reasons = ", ".join(f"{k}: {v}" for k, v in summary.reasons().items())
    out.add_row(*row("dead letters", f"{len(summary.deadletters)} {reasons}".strip()))
    console.print(out)
    for d in summary.deadletters[:20]:
        console.print(Text.assemble("  ", (d.code, "red"), f" {d.file}: {d.reason}"))
        hint = identity_hint(d.reason)
        if hint:
            say(f"    hint: {hint}", "yellow")
    if summary.deadletter_keys:
        say("dead letters in " + ", ".join(summary.deadletter_keys))


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

    stack_endpoint, stack_bucket, target = stack_target()
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
        fail(exc)
    if as_json:
        typer.echo(json.dumps(summary.to_json(), indent=1))
    else:
        _print_backfill(summary, job, target)
    if summary.deadletters:
        raise typer.Exit(2)


def _print_backfill(summary: Any, job: str, target: Any) -> None:
    """The human summary of a backfill run, with its dead letters."""
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
    for d in summary.deadletters[:20]:
        say(f"dead letter: {d.file}: {d.reason}")


def main() -> None:
    """Console-script entry point."""
    configure_logging(verbose=bool(config.VERBOSE.get()))
    app()
