"""The per-request floor: what one warm, tiny request costs on each layer of the local path.

A warm ``oort_select`` (or ``cosine_select``) does ~0.1 ms of work on its node, so its latency
is the path's own cost. The layers, outermost first, each timed with ``--requests`` sequential
requests, interleaved so the machine's drift hits them alike (each pass starting one system
later, so none always follows a slow one):

* ``flstore-http``: :class:`FLStoreClient` -> local gateway -> authorizer (cached) -> router
  (Powertools) -> boto3 ``lambda.invoke`` -> local Lambda endpoint -> worker process; what the
  demo's table measures for FLStore;
* ``flstore-gateway``: the gateway's ``answer`` called in-process (no HTTP to the gateway);
* ``flstore-router``: ``Router.run`` called directly (no gateway, no Powertools);
* ``flstore-invoke``: the router's invoker alone (boto3 ``lambda.invoke`` to the endpoint);
* ``flstore-endpoint``: the local Lambda's ``invoke`` in-process (no HTTP, the worker's pipe);
* ``flstore-http-socket`` (``--socket``): the first layer with the router's ``lambda.invoke``
  sent over the loopback socket to the endpoint's HTTP server (``StackConfig.in_process_invoke``
  False), interleaved with the in-process one, for an A/B on one loaded machine;
* ``cache-agg`` / ``objstore-agg``: the aggregator baselines through the same client, when
  redis-server is installed (``--baselines``).

``--profile OUT`` also writes a cProfile of the gateway layer (every request in this thread) and
prints its top functions. Output: ARCHITECTURE §9 (``--json OUT``).

    .venv/bin/python benchmarks/request_floor.py --requests 2000 --socket \\
        --baselines cache-agg,objstore-agg --json bench-out/request_floor.json
"""

from __future__ import annotations

import cProfile
import json
import pstats
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.report import parser, summarize, write_report
from flstore_core.aws import lambda_client
from flstore_core.protocol import RunOp
from flstore_core.routing.invoker import NodeInvoker
from flstore_core.routing.placement import meta_shard, node_name, rank_nodes, round_shard
from flstore_core.sdk.client import FLStoreClient
from flstore_core.workloads import get
from lambdas.local_runtime.stack import LocalStack, StackConfig

JOB = "floor"
PARAMS: dict[str, dict[str, Any]] = {"oort_select": {"k": 3}, "cosine_select": {"k": 3}}


def main() -> None:
    p = parser(__doc__ or "")
    p.add_argument("--requests", type=int, default=2000, help="requests per layer")
    p.add_argument("--workloads", default="oort_select,cosine_select")
    p.add_argument("--layers", default="http,gateway,router,invoke,endpoint")
    p.add_argument(
        "--baselines",
        default="",
        help="also time these aggregators through the same client: cache-agg,objstore-agg",
    )
    p.add_argument("--socket", action="store_true", help="also time invokes over the socket")
    p.add_argument("--profile", metavar="OUT", help="cProfile of the gateway layer to OUT")
    args = p.parse_args()
    from evaluation.digits_job import simulate

    workloads = args.workloads.split(",")
    layers = args.layers.split(",")
    runs: list[dict[str, Any]] = []
    config = StackConfig(nodes=4, replication=2, memory_mb=2048)
    with LocalStack(config) as stack, ExitStack() as cm:
        assert stack.store is not None and stack.router is not None and stack.lam is not None
        assert stack.gateway is not None
        print("writing a small digits job …", flush=True)
        job = simulate(stack.store, job=JOB, clients=10, rounds=2, local_epochs=1)
        last = job.rounds - 1
        stack.router.prefetch([round_shard(JOB, last), meta_shard(JOB)])
        client = FLStoreClient(stack.gateway_url, stack.token)
        aggs: dict[str, FLStoreClient] = {}
        if args.baselines:
            aggs = _baselines(stack, cm, args.baselines.split(","))
        for name in workloads:
            cls = get(name).cls
            rnd = last if cls == "round" else None
            calls = layer_calls(stack, client, name, rnd)
            systems = {f"flstore-{layer}": calls[layer] for layer in layers}
            if args.socket:
                systems["flstore-http-socket"] = over_socket(stack, calls["http"])
            for system, agg in aggs.items():
                systems[system] = client_call(agg, name, rnd)
            for fn in systems.values():  # warm-up
                for _ in range(20):
                    fn()
            samples: dict[str, list[float]] = {s: [] for s in systems}
            order = list(systems)
            for i in range(args.requests):
                # each pass starts one system later: no system always follows the slow one
                for system in order[i % len(order) :] + order[: i % len(order)]:
                    t0 = time.perf_counter()
                    systems[system]()
                    samples[system].append((time.perf_counter() - t0) * 1000)
            for system, values in samples.items():
                runs.append(
                    {
                        "system": system,
                        "metric": "latency_ms",
                        **summarize(values),
                        "workload": name,
                        "class": cls,
                        "clients": 10,
                        "nodes": config.nodes,
                    }
                )
                r = runs[-1]
                print(f"{name:>14} {system:>17}: p50 {r['p50']:7.3f} ms  p95 {r['p95']:7.3f} ms")
            if args.profile and name == workloads[0]:
                prof = cProfile.Profile()
                prof.enable()
                for _ in range(args.requests):
                    calls["gateway"]()
                prof.disable()
                prof.dump_stats(args.profile)
                stats = pstats.Stats(prof).sort_stats("tottime")
                stats.print_stats(30)
                stats.sort_stats("cumulative").print_stats(40)
    write_report("request_floor", runs, args.json)


def client_call(client: FLStoreClient, name: str, rnd: int | None) -> Callable[[], object]:
    """One request of ``name`` through an HTTP client (FLStore's gateway or an aggregator)."""
    return lambda: client.run(JOB, name, round=rnd, **PARAMS.get(name, {}))


def over_socket(stack: LocalStack, call: Callable[[], object]) -> Callable[[], object]:
    """``call`` with the router invoking its nodes over HTTP (a client without the in-process
    transport), the router's own invoker put back after it."""
    router, lam = stack.router, stack.lam
    assert router is not None and lam is not None
    socket_invoker = NodeInvoker(lambda_client(lam.url), stack.config.memory_mb)

    def run() -> object:
        assert router is not None
        own, router.invoker = router.invoker, socket_invoker
        try:
            return call()
        finally:
            router.invoker = own

    return run


def layer_calls(
    stack: LocalStack, client: FLStoreClient, name: str, rnd: int | None
) -> dict[str, Callable[[], object]]:
    """One request of ``name`` on each layer of FLStore's path (see the module docstring)."""
    gateway, router, lam = stack.gateway, stack.router, stack.lam
    assert gateway is not None and router is not None and lam is not None
    params = PARAMS.get(name, {})
    body = {"params": params} | ({"round": rnd} if rnd is not None else {})
    raw = json.dumps(body).encode()
    target = f"/v1/jobs/{JOB}/workloads/{name}"
    headers = [
        ("Host", "127.0.0.1"),
        ("Authorization", f"Bearer {stack.token}"),
        ("Content-Type", "application/json"),
        ("Content-Length", str(len(raw))),
    ]
    shard = round_shard(JOB, rnd) if rnd is not None else meta_shard(JOB)
    cfg = stack.config
    function = node_name(cfg.prefix, rank_nodes(str(shard), cfg.nodes)[0])
    event = RunOp(name, JOB, params=params, round=rnd).to_event()
    payload = json.dumps(event).encode()
    auth = f"Bearer {stack.token}"

    def via_gateway() -> object:
        status, _, data = gateway.answer("POST", target, headers, raw, "127.0.0.1")
        assert status == 200, data[:300]
        return data

    return {
        "http": client_call(client, name, rnd),
        "gateway": via_gateway,
        "router": lambda: router.run(auth, JOB, name, raw),
        "invoke": lambda: router.invoker.invoke(function, event),
        "endpoint": lambda: lam.invoke(function, payload),
    }


def _baselines(stack: LocalStack, cm: ExitStack, which: list[str]) -> dict[str, FLStoreClient]:
    from evaluation.baselines import (
        Aggregator,
        RedisServer,
        populate_redis,
        populate_redis_job,
        redis_server_binary,
    )

    assert stack.store is not None
    out: dict[str, FLStoreClient] = {}
    if "objstore-agg" in which:
        s3 = cm.enter_context(Aggregator("s3", stack.s3_endpoint, stack.config.bucket))
        out["objstore-agg"] = FLStoreClient(s3.url, stack.token)
    if "cache-agg" in which and redis_server_binary() is not None:
        redis = cm.enter_context(RedisServer())
        rc = redis.client()
        for r in stack.store.list_rounds(JOB):
            populate_redis(stack.store, rc, JOB, r)
        populate_redis_job(stack.store, rc, JOB)
        rc.close()
        agg = cm.enter_context(
            Aggregator("redis", stack.s3_endpoint, stack.config.bucket, redis.url)
        )
        out["cache-agg"] = FLStoreClient(agg.url, stack.token)
    return out


if __name__ == "__main__":
    main()
