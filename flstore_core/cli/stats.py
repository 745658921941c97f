"""``flstore stats``: per-node cache statistics of the local stack, in a table that fits 80
terminal columns (node numbers instead of function names, units in a legend)."""

from __future__ import annotations

import json
from typing import Any

import typer
from rich.console import Console

from flstore_core.cli.output import emit_json, row, say, table
from flstore_core.cli.state import STATE, console
from flstore_core.routing.placement import ShardKey

MiB = 2**20
# (header, stats field or derived value); the legend explains the abbreviations
COLUMNS = ("node", "shards", "blocks", "hits", "misses", "loads", "evict", "held", "budget", "GETs")
LEGEND = (
    "node N is function {prefix}-cache-N; held and budget in MiB; evict = evictions; GETs = S3 GETs"
)


def stats(as_json: bool = typer.Option(False, "--json", help="Print the data as JSON.")) -> None:
    """Per-node cache statistics of the local stack (hits, misses, loads, bytes, evictions)."""
    from flstore_core.aws import lambda_client

    if not STATE.exists():
        say("no local stack here: run `flstore local up` first")
        raise typer.Exit(1)
    state = json.loads(STATE.read_text())
    client = lambda_client(state["lambda_endpoint"], read_timeout=60)
    nodes = []
    for i in range(int(state["nodes"])):
        name = f"{state['prefix']}-cache-{i}"
        resp = client.invoke(FunctionName=name, Payload=b'{"op": "stats"}')
        nodes.append({"node": name, **json.loads(resp["Payload"].read())})
    if as_json:
        emit_json(nodes)
        return
    print_stats(nodes, str(state["prefix"]), console)


def print_stats(nodes: list[dict[str, Any]], prefix: str, out: Console) -> None:
    """The stats table of ``nodes`` (each a node's ``stats`` answer plus its ``node`` name),
    its legend, then each node's column blocks per round."""
    grid = table("cache nodes", compact=True)
    for col in COLUMNS:
        grid.add_column(col, justify="right", no_wrap=True)
    for i, s in enumerate(nodes):
        blocks = block_summary(s["shards"])
        grid.add_row(
            *row(
                i,
                len(s["shards"]),
                sum(len(b.split(": ", 1)[1].split(" of ")[0].split(",")) for b in blocks),
                s["hits"],
                s["misses"],
                s["loads"],
                s["evictions"],
                f"{s['bytes_held'] / MiB:.1f}",
                f"{s['budget_bytes'] / MiB:.1f}",
                s["s3_gets"],
            )
        )
    out.print(grid)
    out.print(LEGEND.replace("{prefix}", prefix), markup=False, highlight=False)
    for i, s in enumerate(nodes):
        for line in block_summary(s["shards"]):
            out.print(f"node {i}  {line}", markup=False, highlight=False)


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
