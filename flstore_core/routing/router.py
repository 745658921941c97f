"""The router: plans which cache nodes hold a request's data, invokes them, retries, gathers.

It runs behind API Gateway (``lambdas/router.py`` adapts HTTP API events to it) and talks to the
cache nodes only through boto3's ``lambda.invoke`` — on AWS, or against the local Lambda
endpoint. For a request it

1. authenticates the bearer token and checks the job is granted (401/403),
2. validates the body, the ids, the workload and its params before any invocation (400/404),
3. ranks the nodes for the request's shard by rendezvous hashing: the R replicas first, then the
   remaining nodes (any node can load a shard from S3),
4. invokes them in that order until one answers, as its failover policy
   (:class:`~flstore_core.routing.failover.FailoverPolicy`) decides: a function error, a timeout
   or a dead endpoint moves on to the next node, throttling backs off and tries again, a caller
   error (4xx from the node) is final,
5. answers ``{"job", "workload", "round", "result", "meta"}`` with the nodes tried, the cache
   state, the latency and the cost of the request; a result over the response limit is written
   to the job's ``results/`` prefix and replaced by its key.

How a node is invoked lives in :mod:`flstore_core.routing.invoker`, how a request body is
parsed in :mod:`flstore_core.routing.request_body`, and how the router fails over between nodes
in :mod:`flstore_core.routing.failover`.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from flstore_core import config
from flstore_core.aws import lambda_client
from flstore_core.cache.budget import stack_budget
from flstore_core.cache.shards import ManifestReader
from flstore_core.cost import DEFAULT_PRICES, Invocation, Prices, flstore_request_cost
from flstore_core.data import layout
from flstore_core.errors import NotFoundError, ValidationError, error_from_dict
from flstore_core.ids import validate_client, validate_job, validate_round
from flstore_core.routing.auth import TokenTable
from flstore_core.routing.failover import Answered, FailoverPolicy
from flstore_core.routing.invoker import Invoker, NodeAnswer, NodeFailure, NodeInvoker
from flstore_core.routing.placement import (
    ShardKey,
    client_shard,
    meta_shard,
    model_shard,
    node_name,
    place_shard,
    rank_nodes,
    round_shard,
)
from flstore_core.routing.request_body import parse_body
from flstore_core.storage.object_store import ObjectStore
from flstore_core.workloads import Workload, catalogue, get

RESPONSE_LIMIT = 6 * 1024 * 1024  # Lambda's synchronous response limit
ROUNDS_TTL_S = 5.0


@dataclass(frozen=True)
class RouterConfig:
    """Where the cache nodes are and how shards map onto them."""

    prefix: str = "flstore"
    nodes: int = 8
    replication: int = 2
    node_memory_mb: int = 3008
    # bytes of data a node holds (FLSTORE_CACHE_BUDGET_BYTES, else what its memory leaves once
    # its runtime is loaded): the planner cuts rounds into blocks that fit it
    cache_budget_bytes: int | None = None
    response_limit: int = RESPONSE_LIMIT
    max_attempts: int = 4
    throttle_passes: int = 40

    @classmethod
    def from_env(cls) -> RouterConfig:
        return cls(
            prefix=config.PREFIX.get() or "flstore",
            nodes=config.CACHE_NODES.get_int(),
            replication=config.REPLICATION.get_int(),
            node_memory_mb=config.CACHE_MEMORY_MB.get_int(),
            cache_budget_bytes=stack_budget(config.CACHE_MEMORY_MB.get_int()),
        )

    @property
    def budget(self) -> int:
        """The node budget the planner plans with."""
        return self.cache_budget_bytes or stack_budget(self.node_memory_mb)

    def failover_policy(self) -> FailoverPolicy:
        """The failover and back-off policy these settings describe."""
        return FailoverPolicy(max_attempts=self.max_attempts, throttle_passes=self.throttle_passes)


@dataclass
class Plan:
    """The nodes to try for one request, best first."""

    shard: str
    order: list[int]


class Router:
    """The logic behind every route of the HTTP API (ARCHITECTURE §4)."""

    def __init__(
        self,
        store: ObjectStore,
        invoker: Invoker,
        tokens: TokenTable,
        config: RouterConfig | None = None,
        prices: Prices = DEFAULT_PRICES,
        failover: FailoverPolicy | None = None,
    ) -> None:
        self.store = store
        self.invoker = invoker
        self.tokens = tokens
        self.config = config or RouterConfig()
        self.prices = prices
        # the config's max_attempts and throttle_passes, unless a policy is given outright
        self.failover = failover if failover is not None else self.config.failover_policy()
        self._known_jobs: dict[str, float] = {}
        # the rounds listing is cached briefly: client-class requests need the job's clients,
        # and a LIST per request would cost more than the workload; each listing also checks
        # the cached manifests' versions, so a late client or a backfill is seen within
        # ROUNDS_TTL_S, as a new round is
        self.manifests = ManifestReader(store, list_ttl_s=ROUNDS_TTL_S)
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(8, thread_name_prefix="router")

    @classmethod
    def from_env(cls) -> Router:
        config = RouterConfig.from_env()
        return cls(
            ObjectStore(),
            NodeInvoker(lambda_client(), config.node_memory_mb),
            TokenTable.from_env(),
            config,
        )

    # ------------------------------------------------------------------ routes

    def health(self) -> dict[str, Any]:
        return {"status": "ok"}

    def workloads(self, authorization: str | None) -> dict[str, Any]:
        self.tokens.authenticate(authorization)
        return {"workloads": catalogue()}

    def rounds(self, authorization: str | None, job: str) -> dict[str, Any]:
        job = validate_job(job)
        self.tokens.authorize(authorization, job)
        self._require_job(job)
        manifests = list(
            self._pool.map(lambda r: self.manifests.get(job, r), self.manifests.rounds(job))
        )
        return {
            "job": job,
            "rounds": [
                {"round": m.round, "clients": m.clients, "bytes": m.stored_bytes} for m in manifests
            ],
        }

    def run(
        self, authorization: str | None, job: str, name: str, body: bytes | str | None
    ) -> dict[str, Any]:
        t0 = time.perf_counter()
        job = validate_job(job)
        self.tokens.authorize(authorization, job)
        request = parse_body(body)
        workload = get(name)
        params = workload.validate(request.get("params"))
        round_: int | None = None
        rounds: list[int] | None = None
        if workload.cls == "round":
            if "round" not in request:
                raise ValidationError(f"workload {name!r} needs 'round' in the body")
            round_ = validate_round(request["round"])
        elif request.get("round") is not None:
            raise ValidationError(
                f"workload {name!r} is of class {workload.cls!r} and spans rounds: send "
                "'rounds' (a list) or nothing instead of 'round'"
            )
        if request.get("rounds") is not None:
            if not isinstance(request["rounds"], list):
                raise ValidationError("'rounds' must be a list of round numbers")
            rounds = [validate_round(r) for r in request["rounds"]]
        self._require_job(job)
        event: dict[str, Any] = {"op": "run", "workload": name, "job": job, "params": params}
        if workload.cls == "client":
            result, answers, tried, invocations = self._scatter_clients(
                workload, job, params, rounds, event
            )
        else:
            if workload.cls == "round":
                assert round_ is not None
                shard = round_shard(job, round_)
                event["round"] = round_
            else:
                shard = meta_shard(job) if workload.cls == "meta" else model_shard(job)
                if rounds is not None:
                    event["rounds"] = rounds
            answer, tried, invocations = self._invoke_in_order(self.plan(str(shard)), event)
            answers = [self._checked(answer.payload)]
            result = answers[0]["result"]
        result = self._maybe_offload(job, name, round_ or 0, result)
        s3_gets = sum(int(a.get("s3_gets", 0)) for a in answers)
        states = {a.get("cache", "miss") for a in answers}
        cost = flstore_request_cost(invocations, s3_gets=s3_gets, prices=self.prices)
        return {
            "job": job,
            "workload": name,
            "round": round_,
            "result": result,
            "meta": {
                "nodes": tried,
                "cache": states.pop() if len(states) == 1 else "partial",
                "latency_ms": round((time.perf_counter() - t0) * 1000, 3),
                "cost_usd": cost.total,
                "node_timing_ms": answers[0].get("timing_ms", {}) if len(answers) == 1 else {},
                "s3_gets": s3_gets,
            },
        }

    @staticmethod
    def _checked(payload: dict[str, Any]) -> dict[str, Any]:
        if "error" in payload:
            raise error_from_dict(payload, int(payload.get("status", 500)))
        return payload

    def job_clients(self, job: str) -> list[str]:
        """Every client that took part in a committed round of the job."""
        return sorted(
            {c for r in self.manifests.rounds(job) for c in self.manifests.get(job, r).updates}
        )

    def _scatter_clients(
        self,
        workload: Workload,
        job: str,
        params: dict[str, Any],
        rounds: list[int] | None,
        event: dict[str, Any],
    ) -> tuple[dict[str, Any], list[dict[str, Any]], list[str], list[Invocation]]:
        """Send each node the clients whose history it owns; merge what they return."""
        wanted = params.get("clients")
        clients = [validate_client(c) for c in wanted] if wanted else self.job_clients(job)
        if not clients:
            raise NotFoundError(f"job {job!r} has no committed round with clients yet")
        groups: dict[int, list[str]] = {}
        for c in clients:
            groups.setdefault(
                rank_nodes(str(client_shard(job, c)), self.config.nodes)[0], []
            ).append(c)

        def one(members: list[str]) -> tuple[NodeAnswer, list[str], list[Invocation]]:
            sub = {**event, "clients": members}
            if rounds is not None:
                sub["rounds"] = rounds
            # every member has this node as primary; the plan of the first is the group's
            return self._invoke_in_order(self.plan(str(client_shard(job, members[0]))), sub)

        outcomes = list(self._pool.map(one, [groups[i] for i in sorted(groups)]))
        answers = [self._checked(a.payload) for a, _, _ in outcomes]
        merged: dict[str, Any] = {}
        for a in answers:
            for key, value in a["result"].items():
                if isinstance(value, dict):
                    merged.setdefault(key, {}).update(value)
                else:
                    merged.setdefault(key, value)
        result = workload.finalize(merged, params) if workload.finalize else merged
        tried = [t for _, ts, _ in outcomes for t in ts]
        invocations = [i for _, _, inv in outcomes for i in inv]
        return result, answers, tried, invocations

    # ------------------------------------------------------------------ planning and invoking

    def plan(self, shard: str) -> Plan:
        """Replicas first (placement), then every other node in the shard's ranking."""
        order = rank_nodes(shard, self.config.nodes)
        return Plan(shard, order)

    def _invoke_in_order(self, plan: Plan, event: dict[str, Any]) -> Answered:
        ranked = [node_name(self.config.prefix, index) for index in plan.order]
        return self.failover.invoke(
            plan.shard, ranked, lambda function: self.invoker.invoke(function, event)
        )

    def _require_job(self, job: str) -> None:
        now = time.monotonic()
        with self._lock:
            seen = self._known_jobs.get(job)
        if seen is not None and now - seen < 60:
            return
        if not self.store.job_exists(job):
            raise NotFoundError(f"unknown job {job!r}")
        with self._lock:
            self._known_jobs[job] = now

    def _maybe_offload(
        self, job: str, workload: str, round_: int, result: dict[str, Any]
    ) -> dict[str, Any]:
        body = json.dumps(result, sort_keys=True).encode()
        if len(body) <= self.config.response_limit:
            return result
        digest = hashlib.sha256(body).hexdigest()[:16]
        key = f"{layout.results_prefix(job, workload, round_)}{digest}.json"
        self.store.put_result(key, body)
        return {"result_key": key, "bytes": len(body)}

    def prefetch(self, shards: list[ShardKey]) -> dict[str, Any]:
        """Ask every owner (primary and replicas) of each shard to load it now.

        Only the primary also materialises a round's default aggregate models in ``results/``:
        one writer per object.
        """
        by_node: dict[int, list[str]] = {}
        primary_of: dict[int, list[str]] = {}
        for shard in shards:
            owners = place_shard(shard, self.config.nodes, self.config.replication)
            for index in owners:
                by_node.setdefault(index, []).append(str(shard))
            primary_of.setdefault(owners[0], []).append(str(shard))

        def load(index: int) -> tuple[str, Any]:
            function = node_name(self.config.prefix, index)
            event = {"op": "load", "shards": by_node[index], "models": primary_of.get(index, [])}
            try:
                return function, self.invoker.invoke(function, event).payload
            except NodeFailure as exc:
                return function, {"error": {"code": "unavailable", "message": str(exc)}}

        return dict(self._pool.map(load, sorted(by_node)))

    def node_op(self, index: int, event: dict[str, Any]) -> dict[str, Any]:
        """Send one operation to one node (stats, evict, load); used by the CLI and ingestion."""
        return self.invoker.invoke(node_name(self.config.prefix, index), event).payload
