"""A cache node: the shards it holds, the workloads it runs on them, and its operations.

One :class:`CacheNode` lives in the module state of one warm Lambda instance
(``lambdas/cache_node.py`` is a thin adapter). Its operations are JSON events, each parsed into
its typed op by :func:`flstore_core.protocol.parse_event` (which documents every field):

* ``load`` — fetch shards now (ingestion prefetch); round artifacts are computed at once so
  the first request finds them, and the rounds named in ``models`` get their default aggregate
  models written;
* ``artifacts`` — this node's share of held rounds' model artifacts, or those another replica
  computed, to keep (:mod:`flstore_core.cache.artifact_exchange`);
* ``run`` — a workload on the cached data, loading what is missing
  (:mod:`flstore_core.cache.answering`);
* ``partial``, ``model_part``, ``run_clients`` — the ops on a round held in column blocks
  (:mod:`flstore_core.cache.sharded_ops`);
* ``stage`` — read and hold one update of a round before its commit, which then reads only
  the rest (:mod:`flstore_core.cache.staging`);
* ``stats`` — hits, misses, loads, bytes held, evictions, S3 GETs, artifact reuse;
* ``evict`` — the shards named, or all of them (which also drops the node's cached manifests,
  job contexts and job spec versions);
* ``ping`` — keep-warm.

:attr:`CacheNode.ops` maps each op class to the handler that runs it. Reading a round from S3
(:mod:`flstore_core.cache.round_loading`) and running a round workload with its stored model
result (:mod:`flstore_core.cache.results`) live in modules of their own, shared with the
aggregator baselines.

Errors a caller caused come back as ``{"error": {...}, "status": 4xx}`` (not a function error,
so the router does not retry them elsewhere); anything else raises and the router retries on a
replica.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from typing import Any

from flstore_core import config
from flstore_core.cache import artifact_exchange, sharded_ops
from flstore_core.cache.answering import WorkloadAnswers
from flstore_core.cache.budget import stack_budget
from flstore_core.cache.eviction import EvictionPolicy
from flstore_core.cache.meta_snapshot import load_meta_snapshotted
from flstore_core.cache.results import run_round_workload
from flstore_core.cache.round_data import ArtifactStats, JobContext, RoundData
from flstore_core.cache.round_loading import job_context, load_round, load_round_block
from flstore_core.cache.shard_cache import ShardCache
from flstore_core.cache.shards import (
    ClientHistory,
    GlobalModels,
    JobMeta,
    ManifestReader,
    load_client,
)
from flstore_core.cache.spec_versions import SpecVersions
from flstore_core.cache.staging import StagedRounds
from flstore_core.data.blocks import footprint
from flstore_core.data.manifest import RoundManifest
from flstore_core.errors import FLStoreError, NotFoundError, ValidationError
from flstore_core.protocol import (
    ArtifactsOp,
    EvictOp,
    LoadOp,
    ModelPartOp,
    NodeOp,
    PartialOp,
    PingOp,
    RunClientsOp,
    RunOp,
    StageOp,
    StatsOp,
    parse_event,
)
from flstore_core.routing.placement import ShardKey, round_shard
from flstore_core.storage.object_store import ObjectStore
from flstore_core.workloads import get
from flstore_core.workloads.deadline import running_until

Handler = Callable[[Any], dict[str, Any]]  # a typed op in, the node's answer out

# meta and client shards are refreshed from new manifests when older than this (prefetch
# after ingestion refreshes them at once)
REFRESH_S = 30.0
CONTEXT_TTL_S = 60.0
# the ops a caller waits on while they run a workload (or its part): each is stopped at the
# request deadline
_REQUEST_OPS = (RunOp, PartialOp, ModelPartOp, RunClientsOp)


def default_budget() -> int:
    """Cache budget in bytes: ``FLSTORE_CACHE_BUDGET_BYTES``, else what this function's memory
    (``AWS_LAMBDA_FUNCTION_MEMORY_SIZE``) leaves once the runtime of every workload class —
    torch included — is loaded (:func:`flstore_core.cache.budget.stack_budget`, the figure the
    router plans blocks with)."""
    return stack_budget(config.LAMBDA_MEMORY_MB.get_int())


class CacheNode:
    """The state and operations of one cache node."""

    def __init__(
        self,
        store: ObjectStore,
        *,
        budget_bytes: int | None = None,
        hot_rounds: int | None = None,
        node_index: int | None = None,
        policy: EvictionPolicy | None = None,
    ) -> None:
        self.store = store
        # ``policy`` replaces the class tiers (a replay of a trace compares the generic ones)
        self.cache = ShardCache(
            budget_bytes or default_budget(),
            hot_rounds or config.HOT_ROUNDS.get_int(),
            policy=policy,
        )
        self.node_index = node_index if node_index is not None else config.NODE_INDEX.get_int()
        self.artifacts = ArtifactStats()
        self.manifests = ManifestReader(store)
        self._contexts: dict[str, tuple[float, JobContext]] = {}
        self.versions = SpecVersions(store, REFRESH_S)
        self.started = time.time()
        self.invocations = 0
        self.streamed_written: set[str] = set()  # model results run_clients wrote
        self.answering = WorkloadAnswers(self)
        # the steps of the last whole round this node read (load_round's timing), for load
        self.load_steps: dict[str, float] = {}
        self.staging = StagedRounds(store, self.cache, self.manifests.get)
        # op class -> the handler that runs it (the unknown-op error lists the op names in
        # the protocol's order)
        self.ops: dict[type[NodeOp], Handler] = {
            LoadOp: self.load_op,
            RunOp: self.answering.run,
            PartialOp: lambda op: sharded_ops.partial(self, op),
            ModelPartOp: lambda op: sharded_ops.model_part(self, op),
            RunClientsOp: lambda op: sharded_ops.run_clients(self, op),
            ArtifactsOp: lambda op: artifact_exchange.exchange(self, op),
            StageOp: self.stage,
            StatsOp: lambda op: self.stats(),
            EvictOp: self.evict,
            PingOp: self.ping,
        }

    # ------------------------------------------------------------------ loading

    def context(self, job: str) -> JobContext:
        """The job's spec and validation set, shared by every shard of the job on this node."""
        now = time.monotonic()
        cached = self._contexts.get(job)
        if cached is None or now - cached[0] > CONTEXT_TTL_S:
            cached = (now, job_context(self.store, job, self.versions.current(job)))
            self._contexts[job] = cached
        return cached[1]

    def check_spec(self, job: str, force: bool = False) -> None:
        """A refresh point of the job's spec and validation set (``load``: ``force``; a request:
        every ``REFRESH_S``; :class:`~flstore_core.cache.spec_versions.SpecVersions`). When
        either changed (forced: ARCHITECTURE §2), every shard of the job held here — round
        copies with their model artifacts and answers, the meta and model shards with theirs —
        and its context are dropped, so the next request reads and computes anew. A shard in
        use by a concurrent request stays until the next refresh point; its answers are keyed
        on the version it was read at, never on the new one."""
        if not self.versions.check(job, force):
            return
        self._contexts.pop(job, None)
        for key in self.cache.shard_keys():
            if key.job == job:
                self.cache.evict(key)

    def loader(self, key: ShardKey) -> Any:
        """How to read ``key``'s shard from S3 (for :meth:`ShardCache.using`)."""
        if key.is_block:
            self.staging.drop(key.job, key.round)  # staged whole, loaded in blocks: re-planned
            return lambda: load_round_block(
                self.store,
                key.job,
                key.round,
                key.block,
                key.blocks,
                self.artifacts,
                self.context(key.job),
            )
        if key.cls == "round":
            return self._with_room(
                key,
                lambda manifest: load_round(
                    self.store,
                    key.job,
                    key.round,
                    self.artifacts,
                    self.context(key.job),
                    held=self.staging.take,
                    timing=self.load_steps,
                    manifest=manifest,
                ),
            )
        if key.cls == "meta":
            return lambda: load_meta_snapshotted(
                self.manifests, key.job, spec_version=self.versions.current(key.job)
            )
        if key.cls == "client":
            return lambda: load_client(self.manifests, key.job, key.part)
        return lambda: GlobalModels(
            key.job, self.store, self.context(key.job), list_ttl_s=REFRESH_S
        )

    def _with_room(
        self, key: ShardKey, load: Callable[[RoundManifest], RoundData]
    ) -> Callable[[], RoundData]:
        """``load`` of a whole round (given its manifest, read here once), with room made
        first: the round's footprint, less what its staged rows hold, is reserved (evicting)
        before a byte is read, and given back once the cache counts the round itself. Else a
        round read into a full cache overshot the budget by itself: an OOM at a commit that
        found half the round staged."""

        def run() -> RoundData:
            t0 = time.perf_counter()
            manifest = self.store.get_manifest(key.job, key.round)
            read_ms = (time.perf_counter() - t0) * 1000
            need = footprint(len(manifest.updates), manifest.n_params)
            need -= self.staging.held_bytes(key.job, key.round)
            room = need > 0 and self.cache.reserve(need)
            try:
                data = load(manifest)
            finally:
                if room:
                    self.cache.release(need)
            if "manifest" in self.load_steps:  # the read above is the load's manifest step
                self.load_steps["manifest"] += read_ms
            return data

        return run

    def refresh(self, key: ShardKey, value: Any, force: bool = False) -> Any:
        """Bring a meta or client shard up to date with newly committed rounds and rewritten
        manifests (a late client, a backfill).

        The refresh points are ``load`` (``force``: the re-warm after ingestion or a backfill),
        a shard older than ``REFRESH_S``, and a shard read before a listing of this node found
        a rewritten manifest of its job (the reader's generation moved on): a dictionary
        lookup, so a warm request costs no S3 call. The model shard's listing of stored global
        models (which names the latest) is kept ``REFRESH_S`` and taken again at every ``load``.
        """
        if isinstance(value, GlobalModels):
            if force:
                value.relist()  # the latest global model named anew (a new round's)
            return value
        if not isinstance(value, JobMeta | ClientHistory):
            return value
        fresh_enough = time.monotonic() - value.loaded_at < REFRESH_S
        current = value.generation == self.manifests.generation(key.job)
        if not force and fresh_enough and current:
            return value
        if isinstance(value, JobMeta):
            version = self.versions.current(key.job)
            fresh: Any = load_meta_snapshotted(
                self.manifests, key.job, known=value, spec_version=version
            )
        else:
            fresh = load_client(self.manifests, key.job, key.part)
        self.cache.put(key, fresh)
        return fresh

    def load(self, shards: list[str], models: list[str] | None = None) -> dict[str, Any]:
        """Load shards now; round shards listed in ``models`` also get their default aggregate
        models written (the router asks only a round's primary, so one node writes them). The
        answer's ``timing_ms`` says how long reading from S3 (``load``) and the shared
        artifacts and default models (``warm``) took."""
        with_models = set(models or ())
        loaded: list[str] = []
        already: list[str] = []
        failed: dict[str, str] = {}
        timing = {"load": 0.0, "warm": 0.0}
        steps: dict[str, dict[str, float]] = {}  # round -> load_round's steps, when read now
        listed: set[str] = set()  # jobs whose manifests this load listed (once per job)
        checked: set[str] = set()  # jobs whose spec versions this load checked (once per job)
        for text in shards:
            try:
                key = ShardKey.parse(text)
            except (ValueError, FLStoreError) as exc:
                raise ValidationError(f"bad shard key {text!r}: {exc}") from exc
            if key.job not in checked:  # before its shards are loaded: a change drops them
                self.check_spec(key.job, force=True)
                checked.add(key.job)
            try:
                t0 = time.perf_counter()
                if key.cls == "round":
                    self._drop_if_rewritten(key, listed)
                self.load_steps = {}
                with self.cache.using(key, self.loader(key)) as (value, hit):
                    if self.load_steps:
                        steps[text] = {k: round(v, 1) for k, v in self.load_steps.items()}
                    if isinstance(value, RoundData) and not value.has_rows:
                        value = self.reload_rows(key, value)  # a prefetch brings the rows in
                    t1 = time.perf_counter()
                    timing["load"] += (t1 - t0) * 1000
                    if isinstance(value, RoundData):
                        # a block's default models are written by the router, block by block
                        warmed = self._warm_round(value, text in with_models and not key.is_block)
                        steps.setdefault(text, {}).update(warmed)
                        timing["warm"] += (time.perf_counter() - t1) * 1000
                    elif hit:
                        self.refresh(key, value, force=True)
                    if isinstance(value, GlobalModels) and value.warm():
                        # the latest global model read and built: re-account its size
                        self.cache.put(key, value)
                        timing["warm"] += (time.perf_counter() - t1) * 1000
                (already if hit else loaded).append(text)
            except NotFoundError as exc:
                failed[text] = exc.message
        return {
            "loaded": loaded,
            "already": already,
            "failed": failed,
            "timing_ms": {k: round(v, 3) for k, v in timing.items()},
            "steps_ms": steps,
        }

    def stage(self, op: StageOp) -> dict[str, Any]:
        """The ``stage`` op: hold one update of a round before its commit
        (:mod:`flstore_core.cache.staging`); a round held here already stages nothing."""
        return self.staging.stage(op, held=round_shard(op.job, op.round) in self.cache)

    def load_op(self, op: LoadOp) -> dict[str, Any]:
        """The ``load`` op: see :meth:`load`."""
        return self.load(list(op.shards), None if op.models is None else list(op.models))

    def reload_rows(self, key: ShardKey, data: RoundData) -> RoundData:
        """Read the rows of a held round that gave them up, and the round that has them: the
        held one with them re-attached and re-accounted (its Gram, artifacts and answers kept),
        or — when the cache has no room for them now (everything else pinned), or the round
        was rewritten since (a late client) — the copy just read, which then replaces it.
        Concurrent requests on the round read its rows once."""
        with self.cache.gate(key):
            if data.has_rows:  # another request read them back meanwhile
                return data
            fresh: RoundData = self.loader(key)()
            self.cache.stats.rows_reloaded += 1
            try:
                data.attach_rows(fresh)
            except ValueError:  # other content: the fresh copy is the round now
                self.cache.put(key, fresh)
                return fresh
            if self.cache.put(key, data):
                return data
            data.drop_rows()  # kept rowless as accounted; this request runs on the copy read
            return fresh

    def _drop_if_rewritten(self, key: ShardKey, listed: set[str]) -> None:
        """Evict a held round whose clients or updates no longer match its manifest (a late
        client joined it), so that this ``load`` reads it again; a LIST per job and load, and a
        GET only of a manifest this node has no current copy of."""
        held = self.cache.get(key)
        if not isinstance(held, RoundData):
            return
        if key.job not in listed:
            self.manifests.rounds(key.job)
            listed.add(key.job)
        manifest = self.manifests.get(key.job, key.round)
        if {c: e.sha256 for c, e in manifest.updates.items()} != held.sha256:
            self.cache.evict(key)

    def _warm_round(self, data: RoundData, models: bool) -> dict[str, float]:
        """Prefetch-time work on a round: the shared artifacts and, when asked, the round's
        default aggregate models written to ``results/`` and their answers kept, so that a
        request for them (the default params) is a memo lookup. The milliseconds of each:
        ``gram`` (the Gram and distances; 0 when held already) and ``models``."""
        t0 = time.perf_counter()
        data.warm()
        t1 = time.perf_counter()
        memo, version = self.answering.round_memo(data), data.context.version
        # read at call time, as the router's prefetch reads it, so the two agree
        for name in config.PREFETCH_MODELS.get_list() if models else ():
            workload = get(name)
            params = workload.validate({})

            def compute(workload: Any = workload, params: Any = params) -> dict[str, Any]:
                return run_round_workload(self.store, workload, data, params, data.results_written)

            self.answering.answer(memo, name, {"params": params}, compute, version, at_load=True)
        t2 = time.perf_counter()
        return {"gram": round((t1 - t0) * 1000, 1), "models": round((t2 - t1) * 1000, 1)}

    def stats(self) -> dict[str, Any]:
        """Hits, misses, loads, bytes held, evictions, S3 requests, artifact and answer reuse,
        invocations and the process's peak resident set."""
        # the process's peak resident set so far: VmHWM starts afresh at exec (ru_maxrss would
        # carry the spawning process's peak over; benchmarks/node_runtime.py); None off Linux
        peak_rss_mb: float | None = None
        with contextlib.suppress(OSError), open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    peak_rss_mb = round(int(line.split()[1]) / 1024, 1)  # kB
        return {
            "node": self.node_index,
            **self.cache.stats.to_dict(),
            "bytes_held": self.cache.bytes_held,
            "budget_bytes": self.cache.budget,
            "shards": sorted(str(k) for k in self.cache.shard_keys()),
            "s3_gets": self.store.gets,
            "s3_puts": self.store.puts,
            "artifacts": self.artifacts.to_dict(),
            "staging": self.staging.to_dict(),
            "answers": dict(self.answering.counts),
            # answers a load kept (the default models) that a request then took
            "answers_prefetched": self.answering.prefetched,
            # bytes held by representation: rows, Gram, model artifacts, answers, other shards
            "tiers": self.answering.tiers(),
            # the jobs the eviction policy follows, and what it learned of each
            "followed": mix.summary() if (mix := getattr(self.cache.policy, "mix", None)) else {},
            "invocations": self.invocations,
            "uptime_s": time.time() - self.started,
            "pid": os.getpid(),
            "peak_rss_mb": peak_rss_mb,
        }

    def evict(self, op: EvictOp) -> dict[str, Any]:
        """Drop the shards ``op`` names, or every shard; answers those that were held."""
        if op.all:
            keys = self.cache.shard_keys()
            # the manifests, job contexts and spec versions too: after ``evict all`` everything
            # is read anew
            self.manifests.forget()
            self._contexts.clear()
            self.versions.forget()
        else:
            keys = [ShardKey.parse(s) for s in op.shards]
        return {"evicted": [str(k) for k in keys if self.cache.evict(k)]}

    def ping(self, op: PingOp) -> dict[str, Any]:
        """Keeps the instance warm and says which node it is."""
        return {"ok": True, "node": self.node_index, "invocations": self.invocations}

    def handle(self, event: Any) -> dict[str, Any]:
        """Parse one JSON event into its typed op and run its handler; caller errors are
        returned, not raised."""
        self.invocations += 1
        try:
            op = parse_event(event)
            if not isinstance(op, _REQUEST_OPS):
                return self.ops[type(op)](op)
            # a caller waits for these: past the deadline it has gone, so the workload's long
            # loops stop there (503 deadline_exceeded) and the node stays up for the next one
            with running_until(config.REQUEST_DEADLINE_S.get_int()):
                return self.ops[type(op)](op)
        except FLStoreError as exc:
            return {**exc.to_dict(), "status": exc.status}
