"""``flstore stats``: per-node cache statistics of the local stack, in a table that fits 80
terminal columns (node numbers instead of function names, units in a legend), and when each
committed round became warm (the warm markers commit-driven warming writes:
:mod:`flstore_core.routing.commit_warming`)."""

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


# the held-by-tier table: node, then the node stats' ``tiers`` fields in eviction order (rows
# are dropped first, meta shards last)
TIERS = ("node", "rows", "gram", "artifacts", "answers", "models", "meta")
TIERS_LEGEND = (
    "bytes (K/M/G binary); dropped = rounds that gave up their rows and stayed; rowless = "
    "requests such a round answered from its Gram without reading S3"
)


def stats(as_json: bool = typer.Option(False, "--json", help="Print the data as JSON.")) -> None:
    """Per-node cache statistics of the local stack (hits, misses, loads, bytes, evictions),
    and when each round was committed and became warm."""
    from flstore_core.aws import lambda_client
    from flstore_core.routing.commit_warming import warm_times
    from flstore_core.storage.object_store import ObjectStore

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
    warm = warm_times(ObjectStore(state["bucket"], endpoint_url=state["s3_endpoint"]))
    if as_json:
        emit_json({"nodes": nodes, "warm": warm})
        return
    print_stats(nodes, str(state["prefix"]), console)
    print_warm_times(warm, console)


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
    print_tiers(nodes, out)
    print_followed(nodes, out)
    for i, s in enumerate(nodes):
        if line := staging_summary(s.get("staging")):
            out.print(f"node {i}  {line}", markup=False, highlight=False)
        for line in block_summary(s["shards"]):
            out.print(f"node {i}  {line}", markup=False, highlight=False)


def size_text(nbytes: int) -> str:
    """Bytes in the largest binary unit that keeps a number of at least 1: ``447.0M``,
    ``21.3K``, ``512``."""
    for unit, scale in (("G", 2**30), ("M", 2**20), ("K", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f}{unit}"
    return str(nbytes)


def print_tiers(nodes: list[dict[str, Any]], out: Console) -> None:
    """What each node holds by representation (its ``stats``' ``tiers``): round rows, their
    Gram pieces and distances, model artifacts, kept answers, model and meta shards; and how
    many requests a round that gave up its rows answered with no S3 read. Nodes that do not
    report tiers (an older node) are left out."""
    reported = [(i, s) for i, s in enumerate(nodes) if isinstance(s.get("tiers"), dict)]
    if not reported:
        return
    grid = table("held by tier", compact=True)
    for col in (*TIERS, "dropped", "rowless"):
        grid.add_column(col, justify="right", no_wrap=True)
    for i, s in reported:
        sizes = [size_text(int(s["tiers"].get(t, 0))) for t in TIERS[1:]]
        grid.add_row(*row(i, *sizes, s.get("rows_dropped", 0), s.get("rowless_answers", 0)))
    out.print(grid)
    out.print(TIERS_LEGEND, markup=False, highlight=False)


def print_followed(nodes: list[dict[str, Any]], out: Console) -> None:
    """The jobs each node's eviction policy follows (its ``stats``' ``followed``): requests
    seen, whether it asks model and client-class workloads, the rows reads a new round gets,
    and how often an old round's rows are read again."""
    lines = [
        (i, job, f)
        for i, s in enumerate(nodes)
        for job, f in sorted((s.get("followed") or {}).items())
    ]
    if not lines:
        return
    grid = table("jobs the eviction follows", compact=True)
    for col in ("node", "job", "seen", "models", "clients", "reads", "revisits"):
        grid.add_column(col, justify="left" if col == "job" else "right", no_wrap=True)
    for i, job, f in lines:
        reads = f.get("expected_reads")
        grid.add_row(
            *row(
                i,
                job,
                f.get("requests", 0),
                "yes" if f.get("asks_models") else "no",
                "yes" if f.get("asks_clients") else "no",
                "-" if reads is None else f"{reads:.1f}",
                f"{float(f.get('revisits', 0.0)):.2g}",
            )
        )
    out.print(grid)
    out.print(
        "seen = requests in the window; reads = rows reads a new round gets; revisits = the "
        "chance, per round, that one old round's rows are read again",
        markup=False,
        highlight=False,
    )


def staging_summary(staging: Any) -> str:
    """A node's updates staged before their commit (its ``stats``' ``staging``) in one line:
    ``staged 10, used at commit 9, discarded 1, failed 0, refused 0, pending 0``; empty when
    nothing was staged (or the node does not report it)."""
    if not isinstance(staging, dict) or not any(
        staging.get(k) for k in ("staged", "failed", "refused")
    ):
        return ""
    pending = sum(int(n) for n in (staging.get("pending") or {}).values())
    return (
        f"staged {staging.get('staged', 0)}, used at commit {staging.get('used', 0)}, "
        f"discarded {staging.get('discarded', 0)}, failed {staging.get('failed', 0)}, "
        f"refused {staging.get('refused', 0)}, pending {pending}"
    )


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


def print_warm_times(markers: list[dict[str, Any]], out: Console, latest: int = 5) -> None:
    """When each job's latest ``latest`` rounds became warm (:func:`~flstore_core.routing.
    commit_warming.warm_times`): the time of the commit, of the warm marker, and from the
    commit to each: the round warm, and its model artifacts built."""
    if not markers:
        out.print("no round warmed by its commit yet", markup=False, highlight=False)
        return
    grid = table("rounds warmed by their commit", compact=True)
    for col in ("job", "round", "committed", "warm at", "after s", "models s"):
        grid.add_column(col, justify="left" if col == "job" else "right", no_wrap=True)
    by_job: dict[str, list[dict[str, Any]]] = {}
    for marker in markers:
        by_job.setdefault(str(marker["job"]), []).append(marker)
    for job, rounds in sorted(by_job.items()):
        for m in rounds[-latest:]:
            after = m.get("commit_to_warm_ms")
            grid.add_row(
                *row(
                    job,
                    m["round"],
                    _clock(str(m.get("committed_at", ""))),
                    _clock(str(m.get("warmed_at", ""))),
                    "-" if after is None else f"{after / 1000:.2f}",
                    _seconds(m.get("commit_to_artifacts_ms")),
                )
            )
    out.print(grid)
    out.print(
        "times UTC; after s = from commit to warm (its owners hold the round); models s = to "
        "its model artifacts built (- not yet; --json has the owners' load time, warm_ms)",
        markup=False,
        highlight=False,
    )


def _seconds(ms: Any) -> str:
    """Milliseconds as seconds; ``-`` when not known (artifacts building or left to requests)."""
    return "-" if ms is None else f"{float(ms) / 1000:.2f}"


def _clock(iso: str) -> str:
    """``2026-12-07T15:40:01.123Z`` as ``15:40:01.123`` (UTC; the table's width)."""
    return iso[11:23] if len(iso) >= 23 else iso or "-"
