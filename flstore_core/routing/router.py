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

This module is routes → plan → dispatch. The mechanics and each decision live beside it: how
a node is invoked in :mod:`~flstore_core.routing.invoker`, how a request body is parsed in
:mod:`~flstore_core.routing.request_body`, how the router fails over between nodes in
:mod:`~flstore_core.routing.failover`, how blocks are scattered and gathered in
:mod:`~flstore_core.routing.scatter`, how a sharded round is served in
:mod:`~flstore_core.routing.sharded_runner` and :mod:`~flstore_core.routing.streamed_runner`,
how its model results are written in :mod:`~flstore_core.routing.model_results`, and what a
prefetch does in :mod:`~flstore_core.routing.prefetch`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from flstore_core import config
from flstore_core.aws import lambda_client
from flstore_core.cache.budget import stack_budget
from flstore_core.cache.job_mix import JobMix, Use
from flstore_core.cache.shards import ManifestReader
from flstore_core.cost import (
    DEFAULT_PRICES,
    ROUTER_MEMORY_MB,
    Prices,
    answer_cost,
    router_invocation,
)
from flstore_core.errors import NotFoundError, ValidationError
from flstore_core.ids import validate_client, validate_job, validate_round
from flstore_core.protocol import NodeOp, RunOp
from flstore_core.routing.auth import TokenTable
from flstore_core.routing.bounds import RequestBounds
from flstore_core.routing.failover import Answered, FailoverPolicy
from flstore_core.routing.invoker import Invoker, NodeInvoker
from flstore_core.routing.model_results import ModelResultWriter
from flstore_core.routing.paging import RoundListing, page_of
from flstore_core.routing.placement import (
    ShardKey,
    meta_shard,
    model_shard,
    rank_nodes,
    round_shard,
)
from flstore_core.routing.planner import RoundPlan, plan_round
from flstore_core.routing.prefetch import Prefetch
from flstore_core.routing.request_body import parse_body
from flstore_core.routing.scatter import BlockScatter, Scatter, checked
from flstore_core.routing.sharded_runner import SHARDED_VIEWS, ShardedRun, ShardedRunner
from flstore_core.routing.streamed_runner import StreamedRunner
from flstore_core.storage.object_store import ObjectStore
from flstore_core.storage.results import RESPONSE_LIMIT, offload_if_large
from flstore_core.workloads import Workload, catalogue, get

__all__ = [
    "RESPONSE_LIMIT",
    "ROUNDS_TTL_S",
    "SHARDED_VIEWS",
    "Plan",
    "Router",
    "RouterConfig",
    "Scatter",
    "ShardedRun",
]

ROUNDS_TTL_S = 5.0


def _default(setting: config.Setting) -> str:
    """A setting's default as declared in :mod:`flstore_core.config` (the one place it is
    written)."""
    assert setting.default is not None, setting.name
    return setting.default


@dataclass(frozen=True)
class RouterConfig:
    """Where the cache nodes are and how shards map onto them (defaults: the
    :mod:`flstore_core.config` settings' and the failover policy's)."""

    prefix: str = _default(config.PREFIX)
    nodes: int = int(_default(config.CACHE_NODES))
    replication: int = int(_default(config.REPLICATION))
    node_memory_mb: int = int(_default(config.CACHE_MEMORY_MB))
    # the router function's own memory, what its invocation is billed at in meta.cost_usd: the
    # deployment's default (infra's routerMemoryMb) unless Lambda says otherwise (from_env)
    router_memory_mb: int = ROUTER_MEMORY_MB
    # bytes of data a node holds (FLSTORE_CACHE_BUDGET_BYTES, else what its memory leaves once
    # its runtime is loaded): the planner cuts rounds into blocks that fit it
    cache_budget_bytes: int | None = None
    # serve every round in at least this many column blocks (None: as many as its size
    # needs); the strong-scaling benchmark spreads a round that fits one node over several
    min_blocks: int | None = None
    response_limit: int = RESPONSE_LIMIT
    # the seconds a node gives one request, and the most a request's estimate may take
    deadline_s: float = float(_default(config.REQUEST_DEADLINE_S))
    max_attempts: int = FailoverPolicy.max_attempts
    throttle_passes: int = FailoverPolicy.throttle_passes

    @classmethod
    def from_env(cls) -> RouterConfig:
        """The settings of the environment (``FLSTORE_*``, :mod:`flstore_core.config`)."""
        return cls(
            prefix=config.PREFIX.get() or _default(config.PREFIX),
            nodes=config.CACHE_NODES.get_int(),
            replication=config.REPLICATION.get_int(),
            node_memory_mb=config.CACHE_MEMORY_MB.get_int(),
            router_memory_mb=config.LAMBDA_MEMORY_MB.get_int(),
            cache_budget_bytes=stack_budget(config.CACHE_MEMORY_MB.get_int()),
            deadline_s=float(config.REQUEST_DEADLINE_S.get_int()),
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


@dataclass(frozen=True)
class RunRequest:
    """A workload request, validated: what :meth:`Router.run` dispatches."""

    job: str
    workload: Workload
    params: dict[str, Any]
    round: int | None
    rounds: list[int] | None

    def use(self) -> Use:
        """What the request tells the job's mix (:class:`~flstore_core.cache.job_mix.Use`;
        whether it reads rows is the node's to say)."""
        model = self.workload.evaluates_models(self.params)
        return Use(self.job, self.workload.cls, self.round, model=model)


class Router:
    """The logic behind every route of the HTTP API (ARCHITECTURE §4): routes → plan →
    dispatch, to one node in failover order or to a sharded round's runners."""

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
        self.tokens = tokens
        self.config = config or RouterConfig()
        self.prices = prices
        # the config's max_attempts and throttle_passes, unless a policy is given outright
        self.scatter = BlockScatter(
            invoker,
            failover if failover is not None else self.config.failover_policy(),
            self.config.prefix,
        )
        self._known_jobs: dict[str, float] = {}
        # the rounds listing is cached briefly: client-class requests need the job's clients,
        # and a LIST per request would cost more than the workload; each listing also checks
        # the cached manifests' versions, so a late client or a backfill is seen within
        # ROUNDS_TTL_S, as a new round is
        self.manifests = ManifestReader(store, list_ttl_s=ROUNDS_TTL_S)
        self.listing = RoundListing()  # what the rounds route answers, per round
        self._lock = threading.Lock()
        # what each job was seen to ask: prefetch builds no model artifacts for a job that
        # asks no model workload (:mod:`flstore_core.cache.job_mix`)
        self.mix = JobMix()
        self.bounds = RequestBounds(
            store, self.manifests, self.config.node_memory_mb, self.config.deadline_s, ROUNDS_TTL_S
        )
        models = ModelResultWriter(store, self.scatter)
        streamed = StreamedRunner(self.scatter, models, self.config.nodes, self.config.budget)
        self.sharded = ShardedRunner(store, self.manifests, self.scatter, streamed, models)
        self._prefetch = Prefetch(
            store,
            self.scatter,
            self.plan_round,
            self.sharded,
            self.config.nodes,
            self.config.replication,
            self.mix,
        )

    @classmethod
    def from_env(cls) -> Router:
        """The router of the environment's stack: boto3 clients, ``FLSTORE_*`` settings."""
        config = RouterConfig.from_env()
        return cls(
            ObjectStore(),
            NodeInvoker(lambda_client(), config.node_memory_mb),
            TokenTable.from_env(),
            config,
        )

    @property
    def invoker(self) -> Invoker:
        """What invokes the cache nodes (replaceable: benchmarks wrap it to record)."""
        return self.scatter.invoker

    @invoker.setter
    def invoker(self, value: Invoker) -> None:
        self.scatter.invoker = value

    @property
    def failover(self) -> FailoverPolicy:
        """The failover and back-off policy every invocation follows."""
        return self.scatter.failover

    @failover.setter
    def failover(self, value: FailoverPolicy) -> None:
        self.scatter.failover = value

    # ------------------------------------------------------------------ routes

    def health(self) -> dict[str, Any]:
        """``GET /v1/health``."""
        return {"status": "ok"}

    def workloads(self, authorization: str | None) -> dict[str, Any]:
        """``GET /v1/workloads``: the catalogue."""
        self.tokens.authenticate(authorization)
        return {"workloads": catalogue()}

    def rounds(
        self, authorization: str | None, job: str, limit: object = None, after: object = None
    ) -> dict[str, Any]:
        """``GET /v1/jobs/{job}/rounds``: a page of the committed rounds, their clients and
        bytes, and ``next`` (:mod:`flstore_core.routing.paging`)."""
        job = validate_job(job)
        self.tokens.authorize(authorization, job)
        page = page_of(self.manifests.rounds(job), limit, after)  # 400 before the job's 404
        self._require_job(job)
        rows = self.listing.rows(
            job,
            page.rounds,
            self.manifests.listed(job),
            lambda r: self.manifests.fetch(job, r),
            self.scatter.pool.map,
        )
        return {"job": job, "rounds": rows, "next": page.next}

    def run(
        self, authorization: str | None, job: str, name: str, body: bytes | str | None
    ) -> dict[str, Any]:
        """``POST /v1/jobs/{job}/workloads/{name}``: the workload's result and its ``meta``."""
        t0 = time.perf_counter()
        request = self._validate(authorization, job, name, body)
        job, round_ = request.job, request.round
        served = self._dispatch(request)
        self.mix.observe(request.use())
        answers = served.answers
        result = self._maybe_offload(job, name, round_ or 0, served.result)
        s3_gets = sum(int(a.get("s3_gets", 0)) for a in answers)
        s3_puts = sum(int(a.get("s3_puts", 0)) for a in answers)
        states = {a.get("cache", "miss") for a in answers}
        latency_ms = (time.perf_counter() - t0) * 1000
        # the router's own invocation is billed for the request's duration in it, as measured
        # here (the handler's event parsing and answer encoding around it are not counted)
        router = router_invocation(latency_ms, self.config.router_memory_mb)
        body_bytes = len(body.encode() if isinstance(body, str) else body or b"")
        breakdown = answer_cost(
            served.invocations, router, s3_gets, s3_puts, body_bytes, prices=self.prices
        )
        return {
            "job": job,
            "workload": name,
            "round": round_,
            "result": result,
            "meta": {
                "nodes": served.tried,
                "cache": states.pop() if len(states) == 1 else "partial",
                "latency_ms": round(latency_ms, 3),
                "cost_usd": sum(breakdown.values()),
                "cost_breakdown": breakdown,
                "node_timing_ms": answers[0].get("timing_ms", {}) if len(answers) == 1 else {},
                "s3_gets": s3_gets,
                "s3_puts": s3_puts,
            },
        }

    def _validate(
        self, authorization: str | None, job: str, name: str, body: bytes | str | None
    ) -> RunRequest:
        """Authenticate, then check the body, ids, workload and params before any invocation
        (401/403, 400, 404)."""
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
        if workload.cls == "client" and params.get("clients"):
            for client in params["clients"]:
                validate_client(client)
        self._require_job(job)
        if rounds is not None:
            self._require_rounds(job, rounds)
        self.bounds.check(workload, job, round_, params)
        return RunRequest(job, workload, params, round_, rounds)

    def _require_rounds(self, job: str, rounds: list[int]) -> None:
        """404 naming every round of ``rounds`` the job has not committed: a workload spanning
        rounds computes over exactly those asked, so an absent one cannot be answered (as a
        round-class request on it is not)."""
        # a committed round stays committed: the cached listing is enough for those it holds,
        # and only a round it lacks (committed within ROUNDS_TTL_S, or never) costs a LIST
        committed = set(self.manifests.rounds(job))
        if set(rounds) <= committed:
            return
        missing = sorted(set(rounds) - set(self.store.manifest_versions(job)))
        if missing:
            raise NotFoundError(
                f"job {job!r} has not committed round{'s' if len(missing) > 1 else ''} "
                f"{', '.join(map(str, missing))}: GET /v1/jobs/{job}/rounds lists those it has"
            )

    def _dispatch(self, request: RunRequest) -> ShardedRun:
        """Serve a validated request: a sharded round by its runners, anything else by one
        node in failover order."""
        job, workload, round_ = request.job, request.workload, request.round
        if workload.cls == "round" and (plan := self._round_plan(job, round_)) is not None:
            assert round_ is not None
            return self._run_sharded(workload, job, round_, request.params, plan)
        if workload.cls == "round":
            assert round_ is not None
            shard = round_shard(job, round_)
            op = RunOp(workload.name, job, request.params, round=round_)
        else:
            # a client-class request is answered from the job's meta shard, which holds
            # every client's rows: one invocation, not a scatter over client shards
            shard = model_shard(job) if workload.cls == "model" else meta_shard(job)
            rounds = None if request.rounds is None else tuple(request.rounds)
            op = RunOp(workload.name, job, request.params, rounds=rounds)
        answer, tried, invocations = self._invoke_in_order(self.plan(str(shard)), op)
        answers = [checked(answer.payload)]
        return ShardedRun(answers[0]["result"], answers, tried, invocations)

    _checked = staticmethod(checked)

    # ------------------------------------------------------------------ sharded rounds

    def plan_round(self, job: str, round_: int | None) -> RoundPlan:
        """Where the round's blocks live on this stack (:mod:`flstore_core.routing.planner`);
        404 if the round is not committed, 503 if no layout can hold it."""
        assert round_ is not None
        # one HEAD of the manifest at most every ROUNDS_TTL_S: a rewritten manifest (a late
        # client, a backfill) is seen within that, and a plan is never older
        manifest = self.manifests.current(job, round_, ROUNDS_TTL_S)
        return plan_round(
            job,
            round_,
            manifest.tensors,
            len(manifest.updates),
            nodes=self.config.nodes,
            replication=self.config.replication,
            budget=self.config.budget,
            blocks=self.config.min_blocks,
        )

    def _round_plan(self, job: str, round_: int | None) -> RoundPlan | None:
        """The plan of a round served in blocks, or ``None`` for a round one node serves (as
        is, or not committed: its node answers the 404, as for any round)."""
        try:
            plan = self.plan_round(job, round_)
        except NotFoundError:
            return None
        return plan if plan.sharded else None

    def _run_sharded(
        self,
        workload: Workload,
        job: str,
        round_: int,
        params: dict[str, Any],
        plan: RoundPlan,
    ) -> ShardedRun:
        """Run a round workload on a round held in column blocks
        (:mod:`flstore_core.routing.sharded_runner`)."""
        return self.sharded.run(workload, job, round_, params, plan)

    # ------------------------------------------------------------------ planning and invoking

    def plan(self, shard: str) -> Plan:
        """Replicas first (placement), then every other node in the shard's ranking."""
        order = rank_nodes(shard, self.config.nodes)
        return Plan(shard, order)

    def _invoke_in_order(self, plan: Plan, op: NodeOp) -> Answered:
        return self.scatter.invoke_in_order(plan.shard, plan.order, op)

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
        return offload_if_large(
            self.store, job, workload, round_, result, self.config.response_limit
        )

    def prefetch(self, shards: list[ShardKey], artifacts: bool = True) -> dict[str, Any]:
        """Ask every owner (primary and replicas) of each shard to load it now
        (:mod:`flstore_core.routing.prefetch`); ``artifacts=False``: load only, the model
        artifacts left to :meth:`prefetch_artifacts`.

        Returns each node's answer by function name (and the planner's refusals): what it
        loaded and its ``timing_ms`` (``load``, ``warm``), ``artifacts`` (round -> ``tasks``
        done, ``errors``, ``deferred``, ``values`` held, ``ms``), ``shared`` (round -> values
        received), and what this prefetch cost there: ``invocations``, ``billed_ms`` (their
        sum) and ``memory_mb`` — the figures a cost model charges the prefetch with. An
        artifact that could not be computed or shared is reported, never an error of the
        prefetch."""
        return self._prefetch(shards, artifacts)

    def prefetch_artifacts(
        self, shards: list[ShardKey], chunk_s: float, total_s: float
    ) -> dict[str, Any]:
        """The model artifacts of rounds a ``prefetch(artifacts=False)`` loaded, in invocations
        of at most ``chunk_s`` seconds each (:meth:`Prefetch.artifacts_in_chunks`)."""
        return self._prefetch.artifacts_in_chunks(shards, chunk_s, total_s)

    def node_op(self, index: int, op: NodeOp | Mapping[str, Any]) -> dict[str, Any]:
        """Send one operation to one node (stats, evict, load, ping), as a
        :mod:`~flstore_core.protocol` op or its event; used by the CLI and ingestion."""
        event = op if isinstance(op, Mapping) else op.to_event()
        return self.invoker.invoke(self.scatter.function(index), event).payload
