"""``flstore local up`` / ``flstore local down``: the embedded local stack in the foreground."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import typer
from rich.text import Text

from flstore_core import config
from flstore_core.cli.state import STATE, console

# relative to the directory `local up` runs in, beside .flstore/local.json
DATA_DIR = Path(".flstore") / "data"
STOP_WAIT_TICKS = 600  # of 0.1 s: a stack saving a large bucket takes a while to stop

local_app = typer.Typer(help="The embedded local stack (moto S3, local Lambda, local gateway).")


@local_app.command("up")
def local_up(
    nodes: int = typer.Option(4, min=1, help="Cache-node functions."),
    replication: int = typer.Option(
        config.REPLICATION.default_int, min=1, help="Replicas per shard."
    ),
    hot_rounds: int = typer.Option(
        config.HOT_ROUNDS.default_int, min=1, help="Latest rounds per job kept hot (W)."
    ),
    memory_mb: int = typer.Option(
        config.CACHE_MEMORY_MB.default_int, min=128, help="Memory of each cache node."
    ),
    cache_budget_mb: int = typer.Option(
        None,
        min=1,
        help="Data each cache node holds, in MB (default: what --memory-mb leaves once the "
        "node's runtime is loaded). A small budget makes a test round span many nodes.",
    ),
    bucket: str = typer.Option("flstore-local", help="S3 bucket."),
    s3_endpoint: str = typer.Option(None, help="Use this S3 endpoint instead of starting moto."),
    data_dir: Path = typer.Option(
        DATA_DIR,
        help="Where the embedded S3 keeps its objects between `local down` and `local up` "
        "(delete it for an empty store; unused with --s3-endpoint).",
    ),
    network: str = typer.Option(
        "none",
        help="AWS's hops modelled on top of the local ones: 'aws' (the published table), "
        "'none', or a JSON file overriding the table's fields.",
    ),
) -> None:
    """Start the local stack in the foreground until interrupted; writes .flstore/local.json
    and keeps the bucket's objects in --data-dir."""
    from flstore_core.cache.budget import MiB
    from lambdas.local_runtime.network import load_network
    from lambdas.local_runtime.stack import LocalStack, StackConfig

    if cache_budget_mb is not None and cache_budget_mb >= memory_mb:
        raise typer.BadParameter(
            f"{cache_budget_mb} MB does not fit a node of --memory-mb {memory_mb}: give a "
            "budget below the node's memory (the rest holds its runtime)",
            param_hint="'--cache-budget-mb'",
        )
    try:
        model = load_network(network)
    except (OSError, ValueError) as exc:  # a missing or malformed model file, unknown fields
        raise typer.BadParameter(str(exc), param_hint="'--network'") from exc
    config = StackConfig(
        nodes=nodes,
        replication=replication,
        hot_rounds=hot_rounds,
        memory_mb=memory_mb,
        budget_bytes=None if cache_budget_mb is None else cache_budget_mb * MiB,
        bucket=bucket,
        s3_endpoint=s3_endpoint,
        data_dir=None if s3_endpoint else data_dir,
        network=model,
    )
    stopping = {"flag": False}

    def stop(*_: object) -> None:
        stopping["flag"] = True

    signal.signal(signal.SIGTERM, stop)
    with LocalStack(config, workdir=Path.cwd()) as stack:
        console.print(Text.assemble("gateway   ", (stack.gateway_url, "bold")))
        console.print(f"lambda    {stack.lambda_endpoint}   s3 {stack.s3_endpoint}")
        console.print(Text.assemble("token     ", (stack.token, "bold")))
        console.print(f"network   {'none (loopback only)' if model is None else model.name}")
        if stack.data_dir is not None:
            console.print(f"data      {stack.data_dir}{_restored(stack.restored_jobs())}")
        console.print(f"state     {STATE} (Ctrl-C or `flstore local down` to stop)")
        try:
            while not stopping["flag"]:
                time.sleep(0.2)
        except KeyboardInterrupt:
            pass
    console.print("local stack stopped")


def _restored(jobs: list[str]) -> str:
    """What the data line says came back: the jobs, or that the store starts empty."""
    if not jobs:
        return " (no jobs restored)"
    shown = ", ".join(jobs[:5]) + (", …" if len(jobs) > 5 else "")
    return f" (restored {len(jobs)} job{'s' if len(jobs) != 1 else ''}: {shown})"


@local_app.command("down")
def local_down() -> None:
    """Stop the local stack started by `flstore local up` in this directory."""
    if not STATE.exists():
        console.print("no local stack is running here")
        raise typer.Exit(0)
    pid = int(json.loads(STATE.read_text())["pid"])
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        STATE.unlink(missing_ok=True)
        console.print("the local stack was not running; removed its stale state file")
        return
    # the stack saves its objects to its --data-dir before it removes the state file
    for _ in range(STOP_WAIT_TICKS):
        if not STATE.exists():
            console.print(f"stopped local stack (pid {pid}); its objects stay in its --data-dir")
            return
        time.sleep(0.1)
    console.print(f"local stack (pid {pid}) is still stopping (saving its objects)")
