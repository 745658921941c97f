"""Long jobs: ``reputation``, ``incentive`` and ``oort_select`` over a job's whole history.

Two shapes by default: ``--rounds`` (2,000) rounds × ``--clients`` (100) clients, and
``--wide-rounds`` (200) × ``--wide-clients`` (1,000), both of summary-sized rounds (the summary
job of ``benchmarks/paper.py``: :mod:`benchmarks.long_jobs_data` says how they are written fast).
For each shape, on a fresh local S3 and a fresh stack of ``--nodes`` (4) cache nodes of
``--memory-mb`` (512):

1. the meta shard's first load (the router's prefetch of ``job/meta/meta``, every node's process
   already started), its bytes as the node accounts them and the manifests' bytes in S3;
2. per repetition, interleaved with objstore-agg (the always-on aggregator that reads the
   request's manifests from S3 per request, :class:`evaluation.baselines.Aggregator`): each
   workload with params no earlier request used (``flstore-first``: the meta shard warm, the
   answer computed), the same request again (``flstore-repeat``: a hit of the node's answer memo,
   reported as such), then objstore-agg with the same params;
3. ``flstore-cold``: the first request after every node evicted everything (the meta shard read
   from S3 within the request);
4. every answer checked: flstore's equal to objstore-agg's (numbers within 1e-9 relative), and
   ``reputation``'s and ``incentive``'s values within 1e-9 of a float64 reference computed here
   from the manifests (the largest deviations are in the JSON, ``check``);
5. each node's peak RSS (``stats``: ``peak_rss_mb``, against ``--memory-mb``) and bytes held
   (against its budget), the cost of each request (``meta.cost_usd``: FLStore's billed
   invocations; objstore-agg's server time and S3 GETs, :mod:`flstore_core.cost`);
6. a refresh: one more round committed, the meta shard's prefetch timed (it reads the new
   manifest only), and ``flstore rounds`` (the CLI, paged by 1,000) over every round.

Output: ARCHITECTURE §9 (``--json OUT``). ``--quick`` runs a seconds-long version.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.long_jobs_data import LongJob
from benchmarks.report import parser, summarize, write_report
from evaluation.baselines import Aggregator
from flstore_core.data import layout
from flstore_core.data.manifest import COS_TO_MEAN
from flstore_core.errors import FLStoreError
from flstore_core.protocol import EvictOp, PingOp, StatsOp
from flstore_core.routing.placement import meta_shard
from flstore_core.sdk.client import FLStoreClient
from flstore_core.storage.object_store import ObjectStore
from lambdas.local_runtime.s3_server import LocalS3
from lambdas.local_runtime.stack import LocalStack, StackConfig

MiB = 1024 * 1024
BUCKET = "long-jobs"
WORKLOADS = ("reputation", "incentive", "oort_select")
TOLERANCE = 1e-9
WARMUP_JOB = "long-warmup"


def params_of(name: str, i: int) -> dict[str, Any]:
    """Request ``i``'s params: a value no other request of the run used."""
    if name == "reputation":
        return {"decay": round(0.8 - 0.0001 * (i % 5000), 5)}
    if name == "incentive":
        return {"budget": 100.0 + i}
    return {"k": 5, "seed": i}


# ---------------------------------------------------------------------- checking


def full_result(store: ObjectStore, answer: dict[str, Any]) -> dict[str, Any]:
    """An answer's result, read from S3 when it was too large to return inline."""
    result = answer["result"]
    if "result_key" in result:
        return dict(json.loads(store.get_object(result["result_key"])))
    return dict(result)


def rel_dev(a: Any, b: Any, path: str = "result") -> float:
    """The largest relative difference of the numbers of two answers of the same shape; a
    difference in anything else is an error naming where."""
    if isinstance(a, bool) or isinstance(b, bool) or isinstance(a, str) or a is None:
        if a != b:
            raise SystemExit(f"{path}: {a!r} != {b!r}")
        return 0.0
    if isinstance(a, int | float) and isinstance(b, int | float):
        return 0.0 if a == b else abs(a - b) / max(abs(a), abs(b), 1e-12)
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            raise SystemExit(f"{path}: keys differ")
        return max((rel_dev(a[k], b[k], f"{path}.{k}") for k in a), default=0.0)
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            raise SystemExit(f"{path}: lengths {len(a)} != {len(b)}")
        pairs = enumerate(zip(a, b, strict=True))
        return max((rel_dev(x, y, f"{path}[{i}]") for i, (x, y) in pairs), default=0.0)
    raise SystemExit(f"{path}: {type(a).__name__} vs {type(b).__name__}")


def reference_columns(store: ObjectStore, job: str) -> tuple[list[str], np.ndarray]:
    """Every round's ``cos_to_mean`` per client, float64, ``(rounds, clients)``, from the
    manifests (every client takes part in every round of these jobs)."""
    rounds = store.list_rounds(job)
    clients: list[str] = []
    cols = []
    for r in rounds:
        m = store.get_manifest(job, r)
        clients = sorted(m.updates)
        cols.append([float(m.updates[c].summary[COS_TO_MEAN]) for c in clients])
    return clients, np.asarray(cols, dtype=np.float64)


def reference_values(name: str, params: dict[str, Any], cos: np.ndarray) -> np.ndarray:
    """reputation's last value and incentive's payout per client, in float64 from the
    workloads' formulas (every client in every round, consecutive rounds)."""
    if name == "reputation":
        weights = params["decay"] ** np.arange(cos.shape[0] - 1, -1, -1, dtype=np.float64)
        return np.asarray((weights[:, None] * cos).sum(0) / weights.sum())
    positive = np.maximum(cos, 0.0)
    totals = positive.sum(1, keepdims=True)
    return np.asarray((params["budget"] * positive / totals).sum(0))


def check(
    store: ObjectStore,
    name: str,
    params: dict[str, Any],
    mine: dict[str, Any],
    theirs: dict[str, Any],
    reference: tuple[list[str], np.ndarray],
) -> dict[str, float]:
    """flstore's answer against objstore-agg's and (reputation, incentive) the reference."""
    out = {"max_rel_dev_objstore": rel_dev(mine, theirs)}
    if mine.get("selected") != theirs.get("selected"):
        raise SystemExit(f"{name}: the systems selected different clients")
    if name in ("reputation", "incentive"):
        clients, cos = reference
        want = reference_values(name, params, cos)
        got = np.array([mine["values"][c] for c in clients])
        out["max_rel_dev_reference"] = float(
            np.max(np.abs(got - want) / np.maximum(np.abs(want), 1e-12))
        )
    worst = max(out.values())
    if worst > TOLERANCE:
        raise SystemExit(f"{name} deviates by {worst:.2e} > {TOLERANCE:.0e} ({params})")
    return out


# ---------------------------------------------------------------------- measuring


class Systems:
    """The stack and objstore-agg, and what a timed request reports."""

    def __init__(self, stack: LocalStack, objstore: Aggregator, job: str) -> None:
        assert stack.store is not None and stack.router is not None
        self.stack, self.store, self.router, self.job = stack, stack.store, stack.router, job
        self.flstore = FLStoreClient(stack.gateway_url, stack.token, timeout=1800)
        self.objstore = FLStoreClient(objstore.url, timeout=1800)
        self.samples: dict[tuple[str, str], list[dict[str, Any]]] = {}

    def request(self, system: str, name: str, params: dict[str, Any]) -> dict[str, Any]:
        client = self.objstore if system == "objstore-agg" else self.flstore
        t0 = time.perf_counter()
        answer = client.run(self.job, name, **params)
        ms = (time.perf_counter() - t0) * 1000
        meta = answer["meta"]
        self.samples.setdefault((name, system), []).append(
            {
                "ms": ms,
                "cost_usd": float(meta.get("cost_usd", 0.0)),
                "cache": meta.get("cache"),
                "nodes": len(meta.get("nodes", [])),
                "inline": "result_key" not in answer["result"],
            }
        )
        return full_result(self.store, answer)

    def nodes(self) -> list[dict[str, Any]]:
        """Every node's peak RSS, bytes held and budget (``stats``)."""
        out = []
        for i in range(self.stack.config.nodes):
            s = self.router.node_op(i, StatsOp())
            out.append(
                {
                    "node": i,
                    "peak_rss_mb": s.get("peak_rss_mb"),
                    "bytes_held": s["bytes_held"],
                    "budget_bytes": s["budget_bytes"],
                    "shards": s["shards"],
                }
            )
        return out

    def reused(self) -> int:
        """Answers the nodes served from their memo so far."""
        return sum(
            int(self.router.node_op(i, StatsOp())["answers"].get("reused", 0))
            for i in range(self.stack.config.nodes)
        )

    def evict_all(self) -> None:
        for i in range(self.stack.config.nodes):
            self.router.node_op(i, EvictOp(all=True))

    def prefetch_meta(self) -> float:
        t0 = time.perf_counter()
        answers = self.router.prefetch([meta_shard(self.job)])
        ms = (time.perf_counter() - t0) * 1000
        failed = {f: a for f, a in answers.items() if isinstance(a, dict) and "error" in a}
        if failed:
            raise SystemExit(f"prefetch of the meta shard failed: {json.dumps(failed)[:400]}")
        return ms


def measure_requests(
    sys_: Systems, reps: int, reference: tuple[list[str], np.ndarray]
) -> dict[str, dict[str, float]]:
    """Per repetition and workload: flstore-first, flstore-repeat, objstore-agg (same params);
    every answer checked. Returns the largest deviations per workload."""
    worst: dict[str, dict[str, float]] = {}
    for i in range(reps):
        for name in WORKLOADS:
            params = params_of(name, i)
            first = sys_.request("flstore-first", name, params)
            before = sys_.reused()
            again = sys_.request("flstore-repeat", name, params)
            sys_.samples[(name, "flstore-repeat")][-1]["memo_hit"] = sys_.reused() == before + 1
            if again != first:
                raise SystemExit(f"{name}: a repeated request answered differently")
            theirs = sys_.request("objstore-agg", name, params)
            dev = check(sys_.store, name, params, first, theirs, reference)
            held = worst.setdefault(name, {})
            for k, v in dev.items():
                held[k] = max(held.get(k, 0.0), v)
        line = ", ".join(
            f"{n} {sys_.samples[(n, 'flstore-first')][-1]['ms']:.0f}/"
            f"{sys_.samples[(n, 'objstore-agg')][-1]['ms']:.0f} ms"
            for n in WORKLOADS
        )
        print(f"    repetition {i}: first/objstore-agg {line}", flush=True)
    return worst


def measure_cold(sys_: Systems, reps: int, offset: int) -> dict[str, str]:
    """``flstore-cold``: every node emptied, then a request no earlier one made (the meta
    shard read within the request, under its deadline); the refusals, by workload."""
    errors: dict[str, str] = {}
    for i in range(reps):
        for name in WORKLOADS:
            sys_.evict_all()
            try:
                sys_.request("flstore-cold", name, params_of(name, offset + i))
            except FLStoreError as exc:
                errors[name] = f"{exc.status} {exc.code}: {exc.message}"
                print(f"    flstore-cold {name}: {errors[name]}", flush=True)
    return errors


def rounds_listing(sys_: Systems, expected: int) -> dict[str, Any]:
    """``flstore rounds`` over every round (the CLI, which reads the pages one by one), and one
    page of the route."""
    from typer.testing import CliRunner

    from flstore_core.cli import app

    env = {"FLSTORE_URL": sys_.stack.gateway_url, "FLSTORE_TOKEN": sys_.stack.token}
    t0 = time.perf_counter()
    out = CliRunner().invoke(app, ["rounds", "--job", sys_.job, "--json"], env=env)
    cli_ms = (time.perf_counter() - t0) * 1000
    if out.exit_code != 0:
        raise SystemExit(f"flstore rounds failed: {out.output[-400:]}")
    listed = json.loads(out.output)
    if [r["round"] for r in listed] != list(range(expected)):
        raise SystemExit(f"flstore rounds listed {len(listed)} rounds, not {expected}")
    t0 = time.perf_counter()
    page = sys_.flstore.rounds_page(sys_.job, 1000)
    page_ms = (time.perf_counter() - t0) * 1000
    return {
        "rounds": len(listed),
        "cli_ms": round(cli_ms, 1),
        "page_ms": round(page_ms, 1),
        "page_rounds": len(page["rounds"]),
        "next": page["next"],
    }


def run_shape(args: Any, rounds: int, clients: int, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One shape on a fresh S3 and stack: write, load, measure, refresh, list."""
    job = f"long-{rounds}x{clients}"
    print(f"\n{rounds} rounds x {clients} clients ({job})", flush=True)
    with LocalS3() as s3:
        store = ObjectStore(BUCKET, endpoint_url=s3.url)
        store.ensure_bucket()
        t0 = time.perf_counter()
        data = LongJob(store, job, clients)
        manifest_bytes = data.write(rounds)
        write_s = time.perf_counter() - t0
        reference = reference_columns(store, job)
        LongJob(store, WARMUP_JOB, 4).write(3, log=lambda _: None)
        config = StackConfig(
            nodes=args.nodes,
            memory_mb=args.memory_mb,
            bucket=BUCKET,
            s3_endpoint=s3.url,
            timeout_s=900,
        )
        with LocalStack(config) as stack, Aggregator("s3", s3.url, BUCKET) as objstore:
            sys_ = Systems(stack, objstore, job)
            for i in range(args.nodes):
                sys_.router.node_op(i, PingOp())
            load_ms = sys_.prefetch_meta()
            print(f"  meta shard loaded in {load_ms:.0f} ms", flush=True)
            held_after_load = sys_.nodes()
            # untimed: every process imports what these workloads use (objstore-agg on a tiny
            # job: on this one each of its requests reads every manifest)
            for name in WORKLOADS:
                sys_.request("warmup", name, params_of(name, 4_999))
                tiny = params_of(name, 4_999) | ({"k": 2} if name == "oort_select" else {})
                sys_.objstore.run(WARMUP_JOB, name, **tiny)
            check_ = measure_requests(sys_, args.repetitions, reference)
            cold_errors = measure_cold(sys_, args.cold, 1000)
            nodes = sys_.nodes()
            put = data.manifest(rounds)
            store.put_object(layout.manifest_key(job, rounds), put.to_json(), "application/json")
            refresh_ms = sys_.prefetch_meta()
            listing = rounds_listing(sys_, rounds + 1)
        store.close()
    shape = {
        "rounds": rounds,
        "clients": clients,
        "job": job,
        "write_s": round(write_s, 1),
        "manifest_bytes": manifest_bytes,
        "meta_load_ms": round(load_ms, 1),
        "meta_refresh_ms": round(refresh_ms, 1),
        "meta_bytes": max(n["bytes_held"] for n in held_after_load),
        "nodes_after_load": held_after_load,
        "nodes": nodes,
        "rounds_listing": listing,
        "check": check_,
        "cold_errors": cold_errors,
    }
    add_runs(args, sys_.samples, shape, runs)
    return shape


def add_runs(
    args: Any,
    samples: dict[tuple[str, str], list[dict[str, Any]]],
    shape: dict[str, Any],
    runs: list[dict[str, Any]],
) -> None:
    peak = max((n["peak_rss_mb"] or 0.0) for n in shape["nodes"])
    for (name, system), got in sorted(samples.items()):
        if "warmup" in system:
            continue
        ms = [s["ms"] for s in got]
        runs.append(
            {
                "system": system,
                "metric": "latency_ms",
                **summarize(ms),
                "workload": name,
                "rounds": shape["rounds"],
                "clients": shape["clients"],
                "nodes": args.nodes,
                "memory_mb": args.memory_mb,
                "cost_usd": float(np.mean([s["cost_usd"] for s in got])),
                "cache": sorted({str(s["cache"]) for s in got}),
                "memo_hits": sum(bool(s.get("memo_hit")) for s in got),
                "invocations_p50": float(np.median([s["nodes"] for s in got])),
                "inline": all(s["inline"] for s in got),
                "meta_bytes": shape["meta_bytes"],
                "peak_rss_mb": peak,
                "samples_ms": [round(x, 1) for x in ms],
            }
        )


def table(runs: list[dict[str, Any]], shapes: list[dict[str, Any]]) -> None:
    for shape in shapes:
        print(
            f"\n{shape['rounds']} x {shape['clients']}: meta shard {shape['meta_bytes'] / 1e6:.2f} "
            f"MB, load {shape['meta_load_ms']:.0f} ms, refresh {shape['meta_refresh_ms']:.0f} ms; "
            f"node peak RSS {[n['peak_rss_mb'] for n in shape['nodes']]} MB of {shape['memory']}"
        )
        for name in WORKLOADS:
            cells = {
                r["system"]: r
                for r in runs
                if r["workload"] == name and r["rounds"] == shape["rounds"]
            }
            print(
                f"  {name:12s} "
                + "  ".join(
                    f"{s} {cells[s]['p50']:.0f} ms ${cells[s]['cost_usd']:.2e}"
                    for s in ("flstore-first", "flstore-repeat", "flstore-cold", "objstore-agg")
                    if s in cells
                )
            )


def main() -> None:
    p = parser(__doc__ or "")
    p.add_argument("--rounds", type=int, default=2000)
    p.add_argument("--clients", type=int, default=100)
    p.add_argument("--wide-rounds", type=int, default=200)
    p.add_argument("--wide-clients", type=int, default=1000)
    p.add_argument("--nodes", type=int, default=4)
    p.add_argument("--memory-mb", type=int, default=512)
    p.add_argument("--cold", type=int, default=2, help="flstore-cold requests per workload")
    p.add_argument("--skip-wide", action="store_true")
    p.add_argument("--quick", action="store_true", help="a seconds-long run of the script")
    args = p.parse_args()
    if args.quick:
        args.rounds, args.clients, args.wide_rounds, args.wide_clients = 30, 8, 6, 40
        args.nodes, args.repetitions, args.cold = 2, 2, 1
    t0 = time.perf_counter()
    load_before = os.getloadavg()
    runs: list[dict[str, Any]] = []
    shapes: list[dict[str, Any]] = []
    todo = [(args.rounds, args.clients)]
    if not args.skip_wide:
        todo.append((args.wide_rounds, args.wide_clients))
    for rounds, clients in todo:
        shapes.append(run_shape(args, rounds, clients, runs))
        shapes[-1]["memory"] = args.memory_mb
        report = write_report("long_jobs", runs, None)
        report["setup"] = {
            "shapes": shapes,
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in os.getloadavg()],
            "wall_s": round(time.perf_counter() - t0, 1),
            "tolerance": TOLERANCE,
        }
        if args.json:  # after each shape: a long run stopped early keeps what it measured
            Path(args.json).write_text(json.dumps(report, indent=2))
    table(runs, shapes)
    if args.json:
        print(f"\nwrote {args.json}")
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
