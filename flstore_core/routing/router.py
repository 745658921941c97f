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
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import cachetools
import numpy as np

from flstore_core import config
from flstore_core.aws import lambda_client
from flstore_core.cache.budget import stack_budget
from flstore_core.cache.results import result_key, result_metadata
from flstore_core.cache.round_data import GramParts, JobContext
from flstore_core.cache.sharded import (
    ShardedRound,
    VectorExpr,
    content_digest,
    model_expr,
    parts_from_json,
    parts_to_json,
)
from flstore_core.cache.shards import ManifestReader
from flstore_core.cache.streamed import working_bytes
from flstore_core.cost import DEFAULT_PRICES, Invocation, Prices, flstore_request_cost
from flstore_core.data import layout
from flstore_core.data.manifest import RoundManifest
from flstore_core.errors import (
    NotFoundError,
    UnavailableError,
    ValidationError,
    error_from_dict,
)
from flstore_core.ids import validate_client, validate_job, validate_round
from flstore_core.routing.auth import TokenTable
from flstore_core.routing.failover import Answered, FailoverPolicy
from flstore_core.routing.invoker import Invoker, NodeAnswer, NodeFailure, NodeInvoker
from flstore_core.routing.placement import (
    ShardKey,
    meta_shard,
    model_shard,
    node_name,
    place_shard,
    rank_nodes,
    round_shard,
)
from flstore_core.routing.planner import NoLayoutError, RoundPlan, plan_round
from flstore_core.routing.request_body import parse_body
from flstore_core.storage.object_store import ObjectStore
from flstore_core.workloads import Workload, catalogue, get

RESPONSE_LIMIT = 6 * 1024 * 1024  # Lambda's synchronous response limit
ROUNDS_TTL_S = 5.0
# sharded rounds whose gathered Gram pieces the router keeps (n x n numbers each), so a second
# similarity workload on a sharded round costs no scatter
SHARDED_VIEWS = 32


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
    # serve every round in at least this many column blocks (None: as many as its size
    # needs); the strong-scaling benchmark spreads a round that fits one node over several
    min_blocks: int | None = None
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


@dataclass
class Scatter:
    """What one request's invocations of a sharded round answered, tried and cost."""

    answers: list[dict[str, Any]] = field(default_factory=list)
    tried: list[str] = field(default_factory=list)
    invocations: list[Invocation] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    s3_puts: int = 0

    def add_puts(self, count: int) -> None:
        with self.lock:
            self.s3_puts += count

    def add(self, answered: Answered) -> dict[str, Any]:
        payload = Router._checked(answered.answer.payload)
        with self.lock:
            self.answers.append(payload)
            self.tried.extend(answered.tried)
            self.invocations.extend(answered.invocations)
        return payload


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
        # a sharded round's gathered Gram pieces, by round and content (see SHARDED_VIEWS)
        self._views: cachetools.LRUCache[tuple[Any, ...], ShardedRound] = cachetools.LRUCache(
            SHARDED_VIEWS
        )
        self._request = threading.local()  # the Scatter of the request this thread serves
        self._written: set[str] = set()  # model results of sharded rounds already in S3

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
        if workload.cls == "client" and params.get("clients"):
            for client in params["clients"]:
                validate_client(client)
        self._require_job(job)
        event: dict[str, Any] = {"op": "run", "workload": name, "job": job, "params": params}
        if workload.cls == "round" and (plan := self._round_plan(job, round_)) is not None:
            assert round_ is not None
            result, answers, tried, invocations = self._run_sharded(
                workload, job, round_, params, plan
            )
        else:
            if workload.cls == "round":
                assert round_ is not None
                shard = round_shard(job, round_)
                event["round"] = round_
                order = self.plan(str(shard))
            else:
                # a client-class request is answered from the job's meta shard, which holds
                # every client's rows: one invocation, not a scatter over client shards
                shard = model_shard(job) if workload.cls == "model" else meta_shard(job)
                if rounds is not None:
                    event["rounds"] = rounds
                order = self.plan(str(shard))
            answer, tried, invocations = self._invoke_in_order(order, event)
            answers = [self._checked(answer.payload)]
            result = answers[0]["result"]
        result = self._maybe_offload(job, name, round_ or 0, result)
        s3_gets = sum(int(a.get("s3_gets", 0)) for a in answers)
        s3_puts = sum(int(a.get("s3_puts", 0)) for a in answers)
        states = {a.get("cache", "miss") for a in answers}
        cost = flstore_request_cost(
            invocations, s3_gets=s3_gets, s3_puts=s3_puts, prices=self.prices
        )
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
                "s3_puts": s3_puts,
            },
        }

    @staticmethod
    def _checked(payload: dict[str, Any]) -> dict[str, Any]:
        if "error" in payload:
            raise error_from_dict(payload, int(payload.get("status", 500)))
        return payload

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
    ) -> tuple[dict[str, Any], list[dict[str, Any]], list[str], list[Invocation]]:
        """Run a round workload on a round held in column blocks: Gram pieces gathered from the
        blocks' holders, a model written block by block (:mod:`flstore_core.cache.sharded`)."""
        scatter = Scatter()
        self._request.scatter = scatter
        try:
            view = self._sharded_view(job, round_, plan)
            # a workload that evaluates client models, or imports a library the router does
            # not carry (scikit-learn), runs on a node with the round's Gram pieces
            if workload.evaluates_clients(params) or workload.needs:
                result = self._run_streamed(view, workload, params, plan)
            else:
                out = workload.run(view, params)
                result = dict(out.result)
                if out.model is not None:
                    result["model_key"] = self._write_model(
                        view, workload.name, params, out.model, plan
                    )
        finally:
            self._request.scatter = None
        if not scatter.answers:  # everything came from the router's gathered pieces
            scatter.answers.append({"cache": "hit", "s3_gets": 0})
        if scatter.s3_puts:  # the router's own requests to S3, in the state of the others
            state = scatter.answers[0].get("cache", "miss")
            scatter.answers.append({"cache": state, "s3_puts": scatter.s3_puts})
        return result, scatter.answers, scatter.tried, scatter.invocations

    def _run_streamed(
        self, view: ShardedRound, workload: Workload, params: dict[str, Any], plan: RoundPlan
    ) -> dict[str, Any]:
        """A workload that evaluates whole client models, on a sharded round (workload
        affinity, :mod:`flstore_core.cache.streamed`): its unit is a client, not a block, so a
        node reads the clients it evaluates from S3 one at a time, with the round's Gram
        pieces (gathered from the blocks, kept here) sent along.

        A workload with a :class:`~flstore_core.workloads.ClientSplit` (accuracy_select: one
        evaluation per client, independent of the others) is scored in groups of clients on
        as many nodes in parallel, and merged here; the others (contribution_loo/shapley's
        aggregates of subsets, feddebug's leave-one-out over every client's activations,
        personalize, fltrust's trained ``g_0``) run whole on the round's affinity node. A
        coordinate-wise model (fltrust's) comes back as an expression the block holders write.
        """
        job, round_ = view.job, view.round
        shard = round_shard(job, round_)
        # a 503 before any node is invoked
        order = self._affinity_order(shard, plan, workload.evaluates_clients(params))
        if workload.split is not None:
            workload.split.check(view.clients, params)
        parts = view.gram_parts()
        buffers = view.gram_parts(buffers=True)
        assert parts is not None
        event: dict[str, Any] = {
            "op": "run_clients",
            "workload": workload.name,
            "job": job,
            "round": round_,
            "params": params,
            "gram": parts_to_json(parts),
            "buffers": None if buffers is None else parts_to_json(buffers),
            "is_delta": view.is_delta,
        }
        if workload.split is not None:
            split = workload.split
            groups = [g.tolist() for g in np.array_split(np.arange(view.n), len(order)) if len(g)]

            def one(index: int) -> dict[str, Any]:
                # group g starts at the g-th node of the order and fails over along it
                rotated = order[index:] + order[:index]
                return self._scatter_one(shard, rotated, {**event, "rows": groups[index]})

            answers = self._gather(one, len(groups))
            return split.merge(view.clients, params, [a["result"] for a in answers])
        answer = self._scatter_one(shard, order, event)
        result = dict(answer["result"])
        if answer.get("model_expr") is not None:
            result["model_key"] = self._write_model(
                view, workload.name, params, VectorExpr(answer["model_expr"]), plan
            )
        return result

    def _affinity_order(self, shard: ShardKey, plan: RoundPlan, clients: bool = True) -> list[int]:
        """The nodes to run a per-client workload of a sharded round on: the whole round's
        rendezvous ranking, nodes whose budget the plan's blocks leave room for the streamed
        round's working memory first (:func:`~flstore_core.cache.streamed.working_bytes`);
        503 when no node's budget holds it. A workload that evaluates no client model
        (``clients`` false: kmeans, cfl_split, which only need a library the router lacks)
        reads no row and needs only the Gram pieces."""
        need = working_bytes(plan.n_params) if clients else 0
        if need > self.config.budget:
            raise UnavailableError(
                f"round {plan.round} of job {plan.job!r} has {plan.n_params} parameters: "
                f"evaluating one client model needs {need / 2**20:.1f} MB of a node's "
                f"{self.config.budget / 2**20:.1f} MB budget; deploy nodes with more memory"
            )
        held = {i: 0 for i in range(self.config.nodes)}
        for block in plan.blocks:
            for owner in block.owners:
                held[owner] += block.nbytes
        ranked = rank_nodes(str(shard), self.config.nodes)
        roomy = [i for i in ranked if self.config.budget - held[i] >= need]
        return roomy + [i for i in ranked if i not in roomy]

    def _sharded_view(self, job: str, round_: int, plan: RoundPlan) -> ShardedRound:
        manifest = self.manifests.get(job, round_)
        content = content_digest({c: e.sha256 for c, e in manifest.updates.items()})
        key = (job, round_, len(plan.blocks), content)
        with self._lock:
            view = self._views.get(key)
        if view is not None:
            return view
        view = self._new_view(job, round_, manifest, plan)
        with self._lock:
            return self._views.setdefault(key, view)

    def _new_view(
        self, job: str, round_: int, manifest: RoundManifest, plan: RoundPlan
    ) -> ShardedRound:
        clients = manifest.clients

        def fetch(buffers: bool) -> tuple[list[GramParts | None], bool]:
            answers = self._scatter_blocks(
                plan,
                lambda indices: {
                    "op": "partial",
                    "job": job,
                    "round": round_,
                    "indices": indices,
                    "blocks": len(plan.blocks),
                    "buffers": buffers,
                },
            )
            expected = content_digest({c: manifest.updates[c].sha256 for c in clients})
            if any(a.get("content") != expected for _, a in answers):
                # a block holder read another version of the round (a late client joined it
                # between the router's manifest and the node's): nothing of this view is kept
                with self._lock:
                    for key in [
                        k for k, v in self._views.items() if v.job == job and v.round == round_
                    ]:
                        self._views.pop(key, None)
                self.manifests.forget(job)
                raise UnavailableError(
                    f"round {round_} of job {job!r} changed while it was read: retry the request"
                )
            deltas = {a.get("is_delta") for _, a in answers}
            if len(deltas) != 1 or None in deltas:
                raise UnavailableError(
                    f"the blocks of round {round_} of job {job!r} disagree on its base model"
                )
            parts = [
                None if item["parts"] is None else parts_from_json(item["parts"])
                for item, _ in answers
            ]
            return parts, bool(deltas.pop())

        return ShardedRound(
            job,
            round_,
            clients,
            manifest.tensors,
            np.array([manifest.updates[c].num_examples for c in clients], dtype=np.int64),
            [manifest.updates[c].metrics for c in clients],
            len(plan.blocks),
            fetch,
            sha256={c: manifest.updates[c].sha256 for c in clients},
            context=JobContext(self.store.get_job_spec(job), self._no_validation),
        )

    @staticmethod
    def _no_validation() -> Any:
        raise UnavailableError("the router holds no validation set")

    def _gather(self, one: Any, count: int) -> list[dict[str, Any]]:
        """``one(i)`` for every block, in parallel; the answers in block order."""
        scatter = getattr(self._request, "scatter", None)

        def run(index: int) -> dict[str, Any]:
            self._request.scatter = scatter  # the pool thread works for the same request
            try:
                result: dict[str, Any] = one(index)
                return result
            finally:
                self._request.scatter = None

        return list(self._pool.map(run, range(count)))

    def _scatter_blocks(
        self, plan: RoundPlan, event: Callable[[list[int]], dict[str, Any]]
    ) -> list[tuple[dict[str, Any], dict[str, Any]]]:
        """Ask the block holders for every block of ``plan``: each node gets ONE invocation
        carrying all the blocks assigned to it (a cache node runs one invocation at a time: two
        concurrent ones would be throttled), blocks spread over their owners; a node that fails
        has its blocks reassigned along their orders in the next pass. Returns, in block order,
        each block's item of its node's answer and that answer."""
        count = len(plan.blocks)
        pending = list(range(count))
        failed: dict[int, set[int]] = {i: set() for i in pending}
        out: dict[int, tuple[dict[str, Any], dict[str, Any]]] = {}
        scatter: Scatter | None = getattr(self._request, "scatter", None)
        while pending:
            assigned: dict[int, list[int]] = {}
            for i in pending:
                block = plan.blocks[i]
                candidates = [n for n in block.order if n not in failed[i]]
                candidates = candidates[: self.failover.max_attempts]
                if not candidates:
                    raise UnavailableError(
                        f"no cache node could answer for block {block.key}: tried "
                        + ", ".join(node_name(self.config.prefix, n) for n in sorted(failed[i]))
                    )
                owners = [n for n in candidates if n in block.owners] or candidates[:1]
                node = min(owners, key=lambda n: (len(assigned.get(n, [])), owners.index(n)))
                assigned.setdefault(node, []).append(i)

            def call(job: tuple[int, list[int]]) -> tuple[int, Answered | None]:
                node, indices = job
                function = node_name(self.config.prefix, node)
                payload = event(indices)
                try:
                    answered = self.failover.invoke(
                        f"{plan.job}/round/{plan.round} blocks {indices}",
                        [function],
                        lambda f: self.invoker.invoke(f, payload),
                    )
                except UnavailableError:
                    if scatter is not None:
                        with scatter.lock:
                            scatter.tried.append(function)
                    return node, None
                return node, answered

            pending = []
            for node, answered in self._pool.map(call, sorted(assigned.items())):
                if answered is None:
                    for i in assigned[node]:
                        failed[i].add(node)
                    pending.extend(assigned[node])
                    continue
                payload = (
                    scatter.add(answered)
                    if scatter is not None
                    else self._checked(answered.answer.payload)
                )
                for item in payload["results"]:
                    out[int(item["index"])] = (item, payload)
            pending.sort()
        return [out[i] for i in range(count)]

    def _scatter_one(
        self, shard: ShardKey, order: list[int], event: dict[str, Any]
    ) -> dict[str, Any]:
        answered = self._invoke_in_order(Plan(str(shard), order), event)
        scatter: Scatter | None = getattr(self._request, "scatter", None)
        if scatter is None:
            return self._checked(answered.answer.payload)
        return scatter.add(answered)

    def _write_model(
        self,
        view: ShardedRound,
        workload: str,
        params: dict[str, Any],
        model: Any,
        plan: RoundPlan,
    ) -> str:
        """Write a model result of a sharded round as one object in the canonical format: each
        block holder writes its block as one zstd frame (block 0 with the header), and the
        frames are joined into the result's key without passing through any function; the
        key is the one an unsharded round's result has (:func:`result_key`)."""
        key = result_key(workload, view, params)
        with self._lock:
            if key in self._written:
                return key
        if self.store.stat(key) is None:
            expr = model_expr(model)
            metadata = result_metadata(workload, view)
            part_keys = [f"{key}.parts/{i:05d}" for i in range(len(plan.blocks))]

            def event(indices: list[int]) -> dict[str, Any]:
                return {
                    "op": "model_part",
                    "job": view.job,
                    "round": view.round,
                    "indices": indices,
                    "blocks": len(plan.blocks),
                    "expr": expr,
                    "part_keys": [part_keys[i] for i in indices],
                    "metadata": metadata if 0 in indices else None,
                }

            try:
                self._scatter_blocks(plan, event)
                self.store.compose_result(key, part_keys)
                # the multipart upload: its creation, one copied or uploaded part per frame at
                # most, its completion (S3 bills each as a PUT-class request)
                scatter: Scatter | None = getattr(self._request, "scatter", None)
                if scatter is not None:
                    scatter.add_puts(len(part_keys) + 2)
            finally:
                self.store.delete_results(part_keys)
        with self._lock:
            self._written.add(key)
        return key

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
        one writer per object. A whole round's model artifacts
        (:mod:`flstore_core.workloads.artifacts`: client models' accuracies, leave-one-out
        aggregates, fltrust's ``g_0``, feddebug's votes) are split over its owners: once every
        ``load`` answered, each owner computes its share (an ``artifacts`` invocation), then
        is sent the values the others computed (another), so each replica holds them all.

        Returns each node's answer by function name (and the planner's refusals): what it
        loaded and its ``timing_ms`` (``load``, ``warm``), ``artifacts`` (round -> ``tasks``
        done, ``errors``, ``deferred``, ``values`` held, ``ms``), ``shared`` (round -> values
        received), and what this prefetch cost there: ``invocations``, ``billed_ms`` (their
        sum) and ``memory_mb`` — the figures a cost model charges the prefetch with. An
        artifact that could not be computed or shared is reported, never an error of the
        prefetch.
        """
        by_node: dict[int, list[str]] = {}
        primary_of: dict[int, list[str]] = {}
        # whole rounds: shard -> its owners, each computing one share of its model artifacts
        round_owners: dict[str, list[int]] = {}
        sharded: list[tuple[ShardKey, RoundPlan]] = []
        refused: dict[str, Any] = {}
        for shard in shards:
            if shard.cls == "round":
                try:
                    plan = self.plan_round(shard.job, shard.round)
                except NotFoundError:
                    plan = None  # not committed: the owners answer "failed" as before
                except NoLayoutError as exc:
                    # no node is sent a round it cannot hold; the run that committed it does
                    # not fail for it (requests get the same 503)
                    refused[f"planner:{shard}"] = exc.to_dict()
                    continue
                if plan is not None and plan.sharded:
                    # each block to its owners; the default models are written afterwards,
                    # block by block
                    for block in plan.blocks:
                        for index in block.owners:
                            by_node.setdefault(index, []).append(str(block.key))
                    sharded.append((shard, plan))
                    continue
            owners = place_shard(shard, self.config.nodes, self.config.replication)
            for index in owners:
                by_node.setdefault(index, []).append(str(shard))
            primary_of.setdefault(owners[0], []).append(str(shard))
            if shard.cls == "round" and self._declares_model(shard.job):
                round_owners[str(shard)] = owners

        def load(index: int) -> tuple[str, Any]:
            function = node_name(self.config.prefix, index)
            event = {"op": "load", "shards": by_node[index], "models": primary_of.get(index, [])}
            try:
                answer = self.invoker.invoke(function, event)
            except NodeFailure as exc:
                return function, {"error": {"code": "unavailable", "message": str(exc)}}
            payload = dict(answer.payload)
            if "error" not in payload:
                payload.update(
                    invocations=1, billed_ms=answer.billed_ms, memory_mb=answer.memory_mb
                )
            return function, payload

        answers = dict(self._pool.map(load, sorted(by_node)))
        self._compute_artifacts(round_owners, answers)
        self._share_artifacts(round_owners, answers)
        for shard, plan in sharded:
            self._prefetch_models(shard, plan)
        return {**answers, **refused}

    def _declares_model(self, job: str) -> bool:
        """Whether the job declares a model (only then has a round model artifacts)."""
        try:
            return self.store.get_job_spec(job).model is not None
        except NotFoundError:
            return False

    def _compute_artifacts(
        self, round_owners: dict[str, list[int]], answers: dict[str, Any]
    ) -> None:
        """Ask each owner that loaded a prefetched round for its share of the round's model
        artifacts (one ``artifacts`` invocation per node, after every ``load`` answered, so a
        round is held and reported loaded whatever its artifacts cost); what each computed goes
        into its answer (``artifacts``)."""
        shares: dict[str, dict[str, list[int]]] = {}
        for shard, owners in round_owners.items():
            for k, index in enumerate(owners):
                function = node_name(self.config.prefix, index)
                answer = answers.get(function, {})
                if "error" not in answer and shard in answer.get("loaded", []) + answer.get(
                    "already", []
                ):
                    shares.setdefault(function, {})[shard] = [k, len(owners)]

        events = {f: {"op": "artifacts", "compute": share} for f, share in shares.items()}
        for function, outcome in self._invoke_each(events):
            payload = answers[function]
            if isinstance(outcome, str):
                payload["artifacts"] = {"error": outcome}
                continue
            payload["artifacts"] = outcome.payload.get("computed", outcome.payload)
            self._bill(payload, outcome)

    def _share_artifacts(self, round_owners: dict[str, list[int]], answers: dict[str, Any]) -> None:
        """Send each owner of a prefetched round the model artifacts its other owners computed
        (only those it does not hold, only from owners that read the same content), then
        replace the values in ``answers`` by their count. A node that cannot be reached keeps
        its own share; a request there computes the rest."""
        sends: dict[str, dict[str, Any]] = {}
        for shard, owners in round_owners.items():
            held: dict[str, dict[str, Any]] = {}
            for index in owners:
                function = node_name(self.config.prefix, index)
                item = answers.get(function, {}).get("artifacts", {}).get(shard)
                if isinstance(item, dict) and isinstance(item.get("entries"), list):
                    held[function] = item
            for function, item in held.items():
                own = {(e[0], e[1]) for e in item["entries"]}
                give: list[Any] = []
                for other, theirs in held.items():
                    if other == function or theirs.get("content") != item.get("content"):
                        continue
                    for entry in theirs["entries"]:
                        if (entry[0], entry[1]) not in own:
                            own.add((entry[0], entry[1]))
                            give.append(entry)
                if give:
                    sends.setdefault(function, {})[shard] = {
                        "content": item.get("content"),
                        "entries": give,
                    }

        events = {f: {"op": "artifacts", "rounds": rounds} for f, rounds in sends.items()}
        for function, outcome in self._invoke_each(events):
            payload = answers[function]
            if isinstance(outcome, str):
                payload["shared"] = {"error": outcome}
                continue
            payload["shared"] = outcome.payload.get("adopted", outcome.payload.get("error"))
            self._bill(payload, outcome)
        for payload in answers.values():
            for item in payload.get("artifacts", {}).values() if isinstance(payload, dict) else ():
                if isinstance(item, dict):
                    item["values"] = len(item.pop("entries", None) or [])

    def _invoke_each(self, events: dict[str, dict[str, Any]]) -> list[tuple[str, NodeAnswer | str]]:
        """Invoke each function with its event, in parallel, in name order: ``(function, its
        answer)``, or the failure's message where the node could not answer."""

        def one(function: str) -> tuple[str, NodeAnswer | str]:
            try:
                return function, self.invoker.invoke(function, events[function])
            except NodeFailure as exc:
                return function, str(exc)

        return list(self._pool.map(one, sorted(events)))

    @staticmethod
    def _bill(payload: dict[str, Any], outcome: NodeAnswer) -> None:
        """Count one more invocation of a prefetch's node, and its billed duration."""
        payload["invocations"] = payload.get("invocations", 0) + 1
        payload["billed_ms"] = payload.get("billed_ms", 0.0) + outcome.billed_ms

    def _prefetch_models(self, shard: ShardKey, plan: RoundPlan) -> None:
        """Write a sharded round's default aggregate models (``FLSTORE_PREFETCH_MODELS``), as
        a round's primary does for an unsharded one; a failure leaves them to the first
        request."""
        for name in config.PREFETCH_MODELS.get_list():
            workload = get(name)
            try:
                self._run_sharded(workload, shard.job, shard.round, workload.validate({}), plan)
            except (UnavailableError, NodeFailure):
                continue

    def node_op(self, index: int, event: dict[str, Any]) -> dict[str, Any]:
        """Send one operation to one node (stats, evict, load); used by the CLI and ingestion."""
        return self.invoker.invoke(node_name(self.config.prefix, index), event).payload
