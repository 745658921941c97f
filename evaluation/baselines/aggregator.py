"""The aggregator baselines of ARCHITECTURE §8: ``objstore-agg`` and ``cache-agg``.

What FLStore is measured against is today's practice: an always-on FL aggregator server that,
for every non-training request, pulls the round's client updates from where they are kept —
the object store (``--source s3``: ``objstore-agg``) or a cache in front of it (``--source
redis``: ``cache-agg``) — decodes them and runs the workload. It keeps nothing between requests:
that is exactly the cost FLStore removes by keeping the data in the function that computes.

To make the comparison about the data path alone, the aggregator

- runs as its own long-lived process (``python -m evaluation.baselines.aggregator``; started
  and stopped by :class:`Aggregator`), like a server that is always on;
- serves the same route and answers the same shape as FLStore's HTTP API (ARCHITECTURE §4):
  ``POST /v1/jobs/{job}/workloads/{name}`` with ``{"round", "params"}`` →
  ``{"job", "workload", "round", "result", "meta"}``, with the same typed ``{"error"}`` bodies;
- builds the round exactly as a cache node does on a miss
  (:func:`flstore_core.cache.round_loading.load_round`
  over S3 with parallel GETs, or its mirror over Redis) and runs the workload through
  :func:`flstore_core.cache.results.run_round_workload`, the code path nodes use, so a model
  result is written to ``results/`` under the same deterministic key;
- reports in ``meta`` its system, latency, cost (:func:`flstore_core.cost.objstore_agg_cost`,
  :func:`flstore_core.cost.cache_agg_cost`), the GETs it made and the fetch/compute split.

It has no authentication: it stands for a server inside the FL operator's network.

**Under the network model** (``Aggregator(..., network=model)``,
:mod:`lambdas.local_runtime.network`) the aggregator pays AWS's hops where it makes them:
every answer of its HTTP front door waits one VPC round trip (``vpc_round_trip_ms``: the FL
server reaching the aggregator inside its VPC), every S3 request goes through a
:class:`~lambdas.local_runtime.fault_proxy.FaultProxy` in the aggregator's process that waits
S3's first byte and the bytes' time through one EC2 interface (``model.ec2_nic``, the
instance's, shared by all its S3 traffic), and every Redis command waits ElastiCache's round
trip and its bytes (:class:`~evaluation.baselines.redis_source.RedisHop`, at the client side
of the hop). The model reaches the child process as JSON on its command line. Without a model
nothing is added.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, Literal
from urllib.parse import urlsplit

from evaluation.baselines.redis_source import (
    RedisHop,
    RedisObjects,
    RedisReader,
    load_round_from,
    mirror_store,
)
from flstore_core import config
from flstore_core.cache.results import run_round_workload
from flstore_core.cache.round_data import ArtifactStats, RoundData
from flstore_core.cache.round_loading import job_context, load_round
from flstore_core.cache.shards import (
    ClientHistory,
    GlobalModels,
    ManifestReader,
    load_client,
    load_meta,
)
from flstore_core.cost import DEFAULT_PRICES, Prices, cache_agg_cost, objstore_agg_cost
from flstore_core.errors import (
    FLStoreError,
    NotFoundError,
    PayloadTooLargeError,
    UnavailableError,
    ValidationError,
)
from flstore_core.ids import validate_job, validate_round
from flstore_core.routing.request_body import MAX_BODY_BYTES, parse_body
from flstore_core.storage.blobs import CountingBlobStore
from flstore_core.storage.object_store import ObjectStore
from flstore_core.workloads import Workload, WorkloadResult, get
from lambdas.local_runtime.fault_proxy import FaultProxy
from lambdas.local_runtime.network import NetworkModel, load_network

Source = Literal["s3", "redis"]
SYSTEM_OF: dict[str, str] = {"s3": "objstore-agg", "redis": "cache-agg"}
ROUTE = re.compile(r"/v1/jobs/([^/]+)/workloads/([^/]+)")
DEFAULT_WORKERS = 8  # parallel GET + decode threads, as many as ObjectStore uses by default


class AggregatorService:
    """One aggregator's request logic, independent of HTTP (tests call it directly too).

    Parameters
    ----------
    source : {"s3", "redis"}
        Where a request's round is read from: S3 (``objstore-agg``) or Redis (``cache-agg``).
    store : ObjectStore
        The job's bucket: read from by ``objstore-agg``, written to (model results) by both.
    redis : RedisObjects or None, default None
        The cache, required for ``source="redis"``.
    workers : int, default 8
        Threads fetching and decoding a round's updates in parallel.
    prices : Prices, default DEFAULT_PRICES
        The price table ``meta.cost_usd`` is computed from.
    on_close : sequence of callables, default ()
        Called by :meth:`close` after the stores are closed (the network model's S3 proxy).
    """

    def __init__(
        self,
        source: Source,
        store: ObjectStore,
        redis: RedisObjects | None = None,
        *,
        workers: int = DEFAULT_WORKERS,
        prices: Prices = DEFAULT_PRICES,
        on_close: Sequence[Callable[[], None]] = (),
    ) -> None:
        if source not in SYSTEM_OF:
            raise ValidationError(f"unknown aggregator source {source!r}: use s3 or redis")
        if source == "redis" and redis is None:
            raise ValidationError("the redis aggregator needs a Redis server (redis_url)")
        self.source = source
        self.system = SYSTEM_OF[source]
        self.store = store
        self.redis = redis
        self.workers = workers
        self.prices = prices
        self.requests = 0
        self.on_close = tuple(on_close)
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="fetch")

    def health(self) -> dict[str, Any]:
        """``GET /v1/health``: liveness plus what a test needs to tell one process from another."""
        return {
            "status": "ok",
            "system": self.system,
            "pid": os.getpid(),
            "requests": self.requests,
        }

    def run(self, job: str, name: str, body: bytes | str | None) -> dict[str, Any]:
        """Answer ``POST /v1/jobs/{job}/workloads/{name}`` as FLStore's router does.

        Validation happens in the router's order and before any I/O (400/404); the round is then
        read afresh from the source — never cached — and the workload run on it.
        """
        t0 = time.perf_counter()
        with self._lock:
            self.requests += 1
        job = validate_job(job)
        request = parse_body(body)
        workload = get(name)
        params = workload.validate(request.get("params"))
        if workload.cls != "round":
            return self._run_spanning(t0, job, name, workload, params, request)
        if "round" not in request:
            raise ValidationError(f"workload {name!r} needs 'round' in the body")
        round_ = validate_round(request["round"])
        # a per-request view of the shared boto3 client, so GET counts are this request's own
        # even when requests overlap
        store = self.store.view()
        counted = CountingBlobStore(self.redis) if self.redis is not None else None
        try:
            t1 = time.perf_counter()
            data = self._load(store, counted, job, round_)
            t2 = time.perf_counter()
            result = run_round_workload(store, workload, data, params)
            t3 = time.perf_counter()
            del data  # half a gigabyte: give it back before the answer is written
        finally:
            store.close()
        latency_ms = (time.perf_counter() - t0) * 1000
        meta: dict[str, Any] = {"system": self.system, "latency_ms": round(latency_ms, 3)}
        if counted is None:
            meta["cost_usd"] = objstore_agg_cost(latency_ms, store.gets, self.prices)
        else:
            meta["cost_usd"] = cache_agg_cost(latency_ms, self.prices)
        meta["s3_gets"] = store.gets
        if counted is not None:
            meta["redis_gets"] = counted.gets
        meta["fetch_ms"] = round((t2 - t1) * 1000, 3)
        meta["compute_ms"] = round((t3 - t2) * 1000, 3)
        return {"job": job, "workload": name, "round": round_, "result": result, "meta": meta}

    def _run_spanning(
        self,
        t0: float,
        job: str,
        name: str,
        workload: Workload,
        params: dict[str, Any],
        request: dict[str, Any],
    ) -> dict[str, Any]:
        """A ``meta``, ``client`` or ``model`` workload: its shard built afresh per request from
        the source (S3, or the Redis mirror of the job) with the loaders the nodes use."""
        if request.get("round") is not None:
            raise ValidationError(
                f"workload {name!r} is of class {workload.cls!r} and spans rounds: send "
                "'rounds' (a list) or nothing instead of 'round'"
            )
        rounds = request.get("rounds")
        wanted = None if rounds is None else {validate_round(r) for r in rounds}
        s3 = self.store.view()
        store = s3 if self.redis is None else mirror_store(s3, self.redis)
        try:
            if not store.job_exists(job):
                raise NotFoundError(f"unknown job {job!r}")
            t1 = time.perf_counter()
            reader = ManifestReader(store)
            if workload.cls == "meta":
                shard: Any = load_meta(reader, job)
            elif workload.cls == "model":
                shard = GlobalModels(job, store, job_context(store, job))
            else:
                clients = params.get("clients") or sorted(
                    {c for r in reader.rounds(job) for c in reader.get(job, r).updates}
                )
                shard = {}
                for c in clients:
                    h = load_client(reader, job, c)
                    rows = [r for r in h.rows if wanted is None or r.round in wanted]
                    shard[c] = ClientHistory(job, c, rows)
            t2 = time.perf_counter()
            out = workload.run(shard, params)
            result = dict(out.result if isinstance(out, WorkloadResult) else out)
            if workload.finalize is not None:
                result = workload.finalize(result, params)
            t3 = time.perf_counter()
        finally:
            s3.close()
        latency_ms = (time.perf_counter() - t0) * 1000
        meta: dict[str, Any] = {"system": self.system, "latency_ms": round(latency_ms, 3)}
        if self.redis is None:
            meta["cost_usd"] = objstore_agg_cost(latency_ms, store.gets, self.prices)
            meta["s3_gets"] = store.gets
        else:
            meta["cost_usd"] = cache_agg_cost(latency_ms, self.prices)
            meta["s3_gets"] = 0
            meta["redis_gets"] = store.gets
        meta["fetch_ms"] = round((t2 - t1) * 1000, 3)
        meta["compute_ms"] = round((t3 - t2) * 1000, 3)
        return {"job": job, "workload": name, "round": None, "result": result, "meta": meta}

    def _load(
        self, store: ObjectStore, counted: CountingBlobStore | None, job: str, round_: int
    ) -> RoundData:
        try:
            if counted is None:
                return load_round(store, job, round_, ArtifactStats())
            return load_round_from(counted, job, round_, ArtifactStats(), self._pool)
        except NotFoundError:
            # tell an unknown job from an unknown round; only the error path pays this HEAD
            if not store.job_exists(job):
                raise NotFoundError(f"unknown job {job!r}") from None
            raise

    def close(self) -> None:
        self._pool.shutdown(wait=False)
        if self.redis is not None:
            self.redis.close()
        self.store.close()
        for close in self.on_close:
            close()


# ---------------------------------------------------------------------- HTTP


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(
        self, address: tuple[str, int], service: AggregatorService, front_door_s: float = 0.0
    ) -> None:
        super().__init__(address, _Handler)
        self.service = service
        # the network model's VPC round trip, waited once per answer (0: none)
        self.front_door_s = front_door_s


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def setup(self) -> None:
        super().setup()
        # an answer leaves as header + body writes: without NODELAY, Nagle and the client's
        # delayed ACK add ~40 ms to every keep-alive request, which would be charged to the baseline
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        if urlsplit(self.path).path == "/v1/health":
            self._reply(200, self.server.service.health())
        else:
            self._error(NotFoundError(f"no route GET {self.path}: use POST {ROUTE.pattern}"))

    def do_POST(self) -> None:
        match = ROUTE.fullmatch(urlsplit(self.path).path)
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY_BYTES:
            self.close_connection = True  # the unread body would be taken for the next request
            self._error(
                PayloadTooLargeError(f"request body of {length} bytes exceeds {MAX_BODY_BYTES}")
            )
            return
        body = self.rfile.read(length) if length else b""
        if match is None:
            self._error(NotFoundError(f"no route POST {self.path}: use POST {ROUTE.pattern}"))
            return
        try:
            answer = self.server.service.run(match.group(1), match.group(2), body)
        except FLStoreError as exc:
            self._error(exc)
            return
        except Exception:  # a bug: the only thing allowed to become a 500
            traceback.print_exc(file=sys.stderr)
            self._error(FLStoreError("the aggregator failed; see its log"))
            return
        self._reply(200, answer)

    def _error(self, exc: FLStoreError) -> None:
        self._reply(exc.status, exc.to_dict())

    def _reply(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        if self.server.front_door_s > 0:
            time.sleep(self.server.front_door_s)
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def serve(
    service: AggregatorService,
    host: str = "127.0.0.1",
    port: int = 0,
    network: NetworkModel | None = None,
) -> _Server:
    """An HTTP server for ``service`` bound now (``port=0`` picks one); call ``serve_forever``.
    Under ``network``, every answer waits the model's VPC round trip first."""
    front_door_s = network.vpc_round_trip_ms / 1e3 if network is not None else 0.0
    return _Server((host, port), service, front_door_s)


def build_service(
    source: Source,
    s3_endpoint: str | None = None,
    bucket: str | None = None,
    redis_url: str | None = None,
    *,
    redis_reader: RedisReader = "resp",
    workers: int = DEFAULT_WORKERS,
    network: NetworkModel | None = None,
) -> AggregatorService:
    """The service of one aggregator process, from the settings :class:`Aggregator` passes.

    Under ``network``, S3 is reached through a pacing proxy started here (one EC2 interface
    for all the instance's S3 traffic) and every Redis command through a :class:`RedisHop`.
    """
    if source == "redis" and not redis_url:
        raise ValidationError("--source redis needs --redis-url redis://host:port/db")
    on_close: list[Callable[[], None]] = []
    if network is not None:
        if not s3_endpoint:
            raise ValidationError("the network model paces a local S3: give --s3-endpoint")
        proxy = FaultProxy(s3_endpoint, link=network.s3_link(network.ec2_nic)).start()
        s3_endpoint = proxy.url
        on_close.append(proxy.stop)
    store = ObjectStore(bucket, endpoint_url=s3_endpoint, max_workers=workers)
    hop = RedisHop(network) if network is not None else None
    cache = (
        RedisObjects(redis_url, reader=redis_reader, hop=hop)
        if source == "redis" and redis_url
        else None
    )
    return AggregatorService(source, store, cache, workers=workers, on_close=on_close)


def main(argv: list[str] | None = None) -> None:
    """Run one aggregator until SIGTERM/SIGINT; prints ``{"url", "pid", "system"}`` when ready."""
    p = argparse.ArgumentParser(
        prog="python -m evaluation.baselines.aggregator", description=__doc__.split("\n")[0]
    )
    p.add_argument("--source", choices=sorted(SYSTEM_OF), required=True)
    p.add_argument("--s3-endpoint", default=config.S3_ENDPOINT.get())
    p.add_argument("--bucket", default=config.BUCKET.get())
    p.add_argument("--redis-url", default=None)
    p.add_argument("--redis-reader", choices=["resp", "redis-py"], default="resp")
    p.add_argument("--workers", type=int, default=DEFAULT_WORKERS)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument(
        "--network-json",
        default=None,
        help="the network model's fields as a JSON object (lambdas.local_runtime.network)",
    )
    args = p.parse_args(argv)
    try:
        network = load_network(json.loads(args.network_json)) if args.network_json else None
        service = build_service(
            args.source,
            args.s3_endpoint,
            args.bucket,
            args.redis_url,
            redis_reader=args.redis_reader,
            workers=args.workers,
            network=network,
        )
    except FLStoreError as exc:
        p.error(exc.message)
    except ValueError as exc:  # a malformed model: JSONDecodeError or an unknown field
        p.error(f"--network-json: {exc}")
    server = serve(service, args.host, args.port, network)
    url = f"http://{args.host}:{server.server_port}"
    print(json.dumps({"url": url, "pid": os.getpid(), "system": service.system}), flush=True)
    sys.stdout = sys.stderr  # the parent stops reading after the ready line

    def stop(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    try:
        server.serve_forever(poll_interval=0.2)
    except (SystemExit, KeyboardInterrupt):
        pass
    finally:
        server.server_close()
        service.close()


# ---------------------------------------------------------------------- the process


class Aggregator:
    """An aggregator process: ``with Aggregator("s3", s3_endpoint, bucket) as agg: agg.url``.

    Parameters
    ----------
    source : {"s3", "redis"}
        ``s3`` runs ``objstore-agg``, ``redis`` runs ``cache-agg``.
    s3_endpoint : str or None
        S3 endpoint (a local moto server); ``None`` uses ``FLSTORE_S3_ENDPOINT`` or AWS.
    bucket : str or None
        The job bucket; ``None`` uses ``FLSTORE_BUCKET`` or the default.
    redis_url : str or None, default None
        ``redis://host:port/db`` of the cache; required for ``source="redis"``.
    redis_reader : {"resp", "redis-py"}, default "resp"
        How large values are read from Redis (see :mod:`evaluation.baselines.redis_source`).
    workers : int, default 8
        Parallel fetch-and-decode threads.
    network : NetworkModel or None, default None
        AWS's hops to wait at (see the module's docstring); ``None`` adds nothing.
    host : str, default "127.0.0.1"
        Interface the aggregator listens on (a free port is picked).
    startup_timeout : float, default 60
        Seconds to wait for the process to be ready.
    """

    def __init__(
        self,
        source: Source,
        s3_endpoint: str | None = None,
        bucket: str | None = None,
        redis_url: str | None = None,
        *,
        redis_reader: RedisReader = "resp",
        workers: int = DEFAULT_WORKERS,
        network: NetworkModel | None = None,
        host: str = "127.0.0.1",
        startup_timeout: float = 60.0,
    ) -> None:
        if source not in SYSTEM_OF:
            raise ValidationError(f"unknown aggregator source {source!r}: use s3 or redis")
        if source == "redis" and not redis_url:
            raise ValidationError("the redis aggregator needs redis_url='redis://host:port/db'")
        self.source = source
        self.system = SYSTEM_OF[source]
        self.s3_endpoint = s3_endpoint
        self.bucket = bucket
        self.redis_url = redis_url
        self.redis_reader = redis_reader
        self.workers = workers
        self.network = network
        self.host = host
        self.startup_timeout = startup_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._url: str | None = None

    @property
    def url(self) -> str:
        """Base URL of the running aggregator (``http://127.0.0.1:PORT``)."""
        if self._url is None:
            raise UnavailableError(f"{self.system} is not running: call start() first")
        return self._url

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def command(self) -> list[str]:
        """The command line of the aggregator process."""
        cmd = [sys.executable, "-m", "evaluation.baselines.aggregator", "--source", self.source]
        if self.s3_endpoint:
            cmd += ["--s3-endpoint", self.s3_endpoint]
        if self.bucket:
            cmd += ["--bucket", self.bucket]
        if self.redis_url:
            cmd += ["--redis-url", self.redis_url, "--redis-reader", self.redis_reader]
        if self.network is not None:
            cmd += ["--network-json", json.dumps(dataclasses.asdict(self.network))]
        return [*cmd, "--workers", str(self.workers), "--host", self.host, "--port", "0"]

    def start(self) -> Aggregator:
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        # the same BLAS threads as the local stack's cache nodes: equal compute, equal bits
        env.setdefault("OMP_NUM_THREADS", "2")
        self._proc = subprocess.Popen(
            self.command(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, env=env
        )
        assert self._proc.stdout is not None
        stdout = self._proc.stdout
        lines: list[bytes] = []
        reader = threading.Thread(target=lambda: lines.append(stdout.readline()), daemon=True)
        reader.start()
        reader.join(self.startup_timeout)
        try:
            info = json.loads(lines[0]) if lines and lines[0] else None
        except ValueError:
            info = None
        if not isinstance(info, dict) or not isinstance(info.get("url"), str):
            code = self._proc.poll()
            self.stop()
            state = f"exited with code {code}" if code is not None else "did not become ready"
            raise UnavailableError(
                f"{self.system} process {state} within {self.startup_timeout:g} s "
                f"(command: {' '.join(self.command())}); see its stderr"
            )
        self._url = info["url"]
        return self

    def stop(self) -> None:
        proc, self._proc, self._url = self._proc, None, None
        if proc is None:
            return
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()

    def __enter__(self) -> Aggregator:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


if __name__ == "__main__":
    main()
