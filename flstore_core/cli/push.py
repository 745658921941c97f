"""``flstore push`` (per-client checkpoints into a committed round) and ``flstore example``
(a small ready job to push)."""

from __future__ import annotations

import shlex
from collections import Counter
from pathlib import Path
from typing import Any

import typer

from flstore_core.cli.output import emit_json, fail, say
from flstore_core.cli.state import local_store, stack_target
from flstore_core.errors import FLStoreError, ValidationError


def push(
    directory: Path = typer.Argument(
        ...,
        help="Folder of per-client checkpoints: .pt/.pth (torch.save state dicts, loaded with "
        "weights_only=True), .safetensors, .npz. The file's stem is the client id.",
    ),
    job: str = typer.Option(..., "--job", "-j", help="The job (declare it first: job create)."),
    round_: int = typer.Option(..., "--round", "-r", min=0, help="The round to commit."),
    clients: Path = typer.Option(
        None,
        "--clients",
        help='Client ids by file name: JSON {"a.pt": "client-a"} or CSV file,client.',
    ),
    meta: Path = typer.Option(
        None,
        "--meta",
        help="Per-client num_examples and metrics: CSV (client,num_examples,<metric>…) or JSON "
        '{client: {"num_examples": n, "metrics": {…}}}.',
    ),
    num_examples: int = typer.Option(
        None,
        "--num-examples",
        min=1,
        help="Examples of every client without a --meta entry (else the file's own "
        "safetensors metadata, else 1: FedAvg then weighs clients equally).",
    ),
    metric: list[str] = typer.Option([], "--metric", help="name=value for every client (repeat)."),
    prefetch: bool = typer.Option(
        True, "--prefetch/--no-prefetch", help="Warm the round's cache nodes afterwards."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Commit a round from per-client checkpoints. Every file is read and checked against the
    job's model first: a file that does not fit is refused, naming the tensor, and nothing of
    the round is written."""
    from flstore_core.sdk import checkpoints

    store = local_store()
    try:
        names = checkpoints.read_client_map(clients) if clients else None
        files = checkpoints.checkpoint_files(directory, names)
        side = checkpoints.read_client_meta(meta) if meta else None
        model = store.get_job_spec(job).model if store.job_exists(job) else None
        updates = checkpoints.read_round(
            files, model, side, num_examples=num_examples, metrics=_metrics(metric)
        )
        manifest = checkpoints.push_round(store, job, round_, updates)
    except FLStoreError as exc:
        fail(exc)
    warmed = _warm(store, job, round_) if prefetch else None
    if as_json:
        emit_json(
            {
                "job": job,
                "round": round_,
                "clients": manifest.clients,
                "files": {client: str(file) for file, client in files},
                "bytes": manifest.stored_bytes,
                "prefetch": warmed,
            }
        )
        return
    say(
        f"committed round {round_} of job {job!r}: {len(updates)} clients pushed, the round "
        f"has {len(manifest.clients)} ({manifest.stored_bytes / 2**20:.2f} MiB stored)"
    )
    if model is None:
        say("the job declares no model: tensors were checked against each other only")
    if warmed is not None:
        say(
            f"prefetch: {warmed['loaded']} loaded, {warmed['already']} already warm, "
            f"{warmed['failed'] + warmed['errors']} refused"
        )


def _metrics(pairs: list[str]) -> dict[str, float]:
    out = {}
    for text in pairs:
        key, sep, value = text.partition("=")
        try:
            if not sep:
                raise ValueError
            out[key.strip()] = float(value)
        except ValueError:
            fail(ValidationError(f"--metric {text!r} must be name=number"))
    return out


def _warm(store: Any, job: str, round_: int) -> dict[str, int] | None:
    """Ask the owners of the round, and of the job's meta and model shards, to load them, as
    ingestion does after a commit; ``None`` when no local stack runs here."""
    _, _, target = stack_target()
    if target is None:
        return None
    from flstore_core.routing.placement import meta_shard, model_shard, round_shard
    from pipelines.prefetch import tally_prefetch

    router = target.router(store)
    total: Counter[str] = Counter({"loaded": 0, "already": 0, "failed": 0, "errors": 0})
    # the round first and on its own, as ingestion does: a node that does not serve another
    # shard class yet refuses a whole load call
    for shards in ([round_shard(job, round_)], [meta_shard(job), model_shard(job)]):
        try:
            total.update(tally_prefetch(router.prefetch(shards)))
        except FLStoreError:
            total["errors"] += 1  # a cold cache is slower, not wrong: the commit stands
    return dict(total)


def example(
    directory: Path = typer.Argument(..., help="Folder to write the example job to."),
    job: str = typer.Option("demo", "--job", "-j", help="Job id the printed commands use."),
    clients: int = typer.Option(10, "--clients", min=2, help="Clients."),
    rounds: int = typer.Option(3, "--rounds", min=1, help="Rounds."),
    seed: int = typer.Option(0, "--seed", help="Seed: the same seed writes the same files."),
    as_json: bool = typer.Option(False, "--json", help="Print what was written as JSON."),
) -> None:
    """Write a small ready job (scikit-learn digits, torch.save checkpoints of digits_cnn, a
    validation .npz) and print the commands that load it into FLStore."""
    from flstore_core.sdk.example import write_example

    written = write_example(directory, clients=clients, rounds=rounds, seed=seed)
    commands = [
        f"flstore job create {job} --model {written.model} "
        f"--validation {shlex.quote(str(written.validation))}",
        *(
            f"flstore push {shlex.quote(str(folder))} --job {job} --round {r} "
            f"--meta {shlex.quote(str(folder / 'meta.csv'))}"
            for r, folder in enumerate(written.rounds)
        ),
        f"flstore run cosine_select --job {job} --round {len(written.rounds) - 1} --param k=3",
    ]
    if as_json:
        emit_json(
            {
                "directory": str(written.directory),
                "model": written.model,
                "validation": str(written.validation),
                "rounds": [str(r) for r in written.rounds],
                "clients": list(written.clients),
                "commands": commands,
            }
        )
        return
    say(
        f"wrote {len(written.clients)} clients x {len(written.rounds)} rounds of "
        f"{written.model} checkpoints and a validation set to {written.directory}; next:"
    )
    for command in commands:
        say(f"  {command}")
