"""A cache node: the shards it holds, the workloads it runs on them, and its operations.

One :class:`CacheNode` lives in the module state of one warm Lambda instance
(``lambdas/cache_node.py`` is a thin adapter). Its operations are JSON events:

* ``load``  — ``{"op": "load", "shards": ["job/round/3", …]}``: fetch now (ingestion prefetch);
  round artifacts are computed at once so the first request finds them;
* ``artifacts`` — ``{"op": "artifacts", "compute": {shard: [share, shares]}}``: this node's
  share of held rounds' model artifacts (:mod:`flstore_core.workloads.artifacts`), answered
  for the router to share; ``{"op": "artifacts", "rounds": {shard: {"content", "entries"}}}``:
  keep those another replica computed (prefetch's second and third steps);
* ``run``   — ``{"op": "run", "workload", "job", "round" | "rounds", "params"}``: run a
  workload on the cached data, loading what is missing;
* ``partial`` — ``{"op": "partial", "job", "round", "indices", "blocks", "buffers"}``: the
  Gram pieces of column blocks of a sharded round (:mod:`flstore_core.cache.sharded`), every
  block the router gives this node in one invocation;
* ``model_part`` — ``{"op": "model_part", "job", "round", "indices", "blocks", "expr",
  "part_keys", "metadata"}``: blocks of a model result, each written as one zstd frame to its
  part key (block 0 carries the safetensors header); the router joins the frames;
* ``run_clients`` — ``{"op": "run_clients", "workload", "job", "round", "params", "gram",
  "buffers", "is_delta", "rows"}``: a per-client model workload on a round this node does not
  hold (a sharded round), read one client at a time from S3 on a
  :class:`~flstore_core.cache.streamed.StreamedRound` with the Gram pieces the router sent;
  with ``rows``, only that group's scores (:class:`~flstore_core.workloads.ClientSplit`). A
  model that is a mean of rows is written here whole; a coordinate-wise one comes back as
  ``model_expr`` for the block holders to write;
* ``stats`` — hits, misses, loads, bytes held, evictions, S3 GETs, artifact reuse;
* ``evict`` — ``{"op": "evict", "shards": [...]}`` or ``{"op": "evict", "all": true}`` (which
  also drops the node's cached manifests and job contexts);
* ``ping``  — keep-warm.

:attr:`CacheNode.ops` maps each op name to the method that checks its arguments and runs it;
an unknown op is a caller error that lists the known ones. Reading a round from S3
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
import weakref
from collections.abc import Callable
from typing import Any

from flstore_core import config
from flstore_core.cache.budget import stack_budget
from flstore_core.cache.memo import ResultMemo
from flstore_core.cache.results import (
    as_body,
    result_frame,
    result_specs,
    run_round_workload,
    store_model,
)
from flstore_core.cache.round_data import ArtifactStats, JobContext, RoundData
from flstore_core.cache.round_loading import job_context, load_round, load_round_block
from flstore_core.cache.shard_cache import ShardCache
from flstore_core.cache.sharded import (
    VectorExpr,
    block_parts_json,
    content_digest,
    evaluate,
    parts_from_json,
)
from flstore_core.cache.shards import (
    ClientHistory,
    GlobalModels,
    JobMeta,
    ManifestReader,
    load_client,
    load_meta,
)
from flstore_core.cache.streamed import StreamedRound, working_bytes
from flstore_core.data.codec import header_prefix, stored_specs
from flstore_core.errors import FLStoreError, NotFoundError, ValidationError
from flstore_core.ids import validate_client, validate_job, validate_round
from flstore_core.routing.placement import (
    ShardKey,
    block_shard,
    meta_shard,
    model_shard,
    round_shard,
)
from flstore_core.storage.object_store import ObjectStore
from flstore_core.workloads import Workload, WorkloadResult, artifacts, get, load_all

Operation = Callable[[dict[str, Any]], dict[str, Any]]  # an event in, the node's answer out

# meta and client shards are refreshed from new manifests when older than this (prefetch
# after ingestion refreshes them at once)
REFRESH_S = 30.0
CONTEXT_TTL_S = 60.0
# aggregate models materialised when a round is prefetched (FLSTORE_PREFETCH_MODELS, comma list)
PREFETCH_MODELS = config.PREFETCH_MODELS.get_list()
# seconds a prefetch spends on a round's model artifacts (FLSTORE_ARTIFACTS_BUDGET_S)
ARTIFACTS_BUDGET_S = float(config.ARTIFACTS_BUDGET_S.get_int())


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
    ) -> None:
        self.store = store
        self.cache = ShardCache(
            budget_bytes or default_budget(),
            hot_rounds or config.HOT_ROUNDS.get_int(),
        )
        self.node_index = node_index if node_index is not None else config.NODE_INDEX.get_int()
        self.artifacts = ArtifactStats()
        self.manifests = ManifestReader(store)
        self._contexts: dict[str, tuple[float, JobContext]] = {}
        self.started = time.time()
        self.invocations = 0
        self._streamed_written: set[str] = set()  # model results run_clients wrote
        # answers of workloads computed, and reused from the memo of the shard they ran on
        self.answers = {"computed": 0, "reused": 0}
        # a round's memo lives as long as the round's copy in this node's cache
        self._round_answers: weakref.WeakKeyDictionary[RoundData, ResultMemo] = (
            weakref.WeakKeyDictionary()
        )
        # op name -> the method that checks its arguments and runs it (in the order the
        # unknown-op error lists them)
        self.ops: dict[str, Operation] = {
            "load": self.op_load,
            "run": self.op_run,
            "partial": self.op_partial,
            "model_part": self.op_model_part,
            "run_clients": self.op_run_clients,
            "artifacts": self.op_artifacts,
            "stats": self.op_stats,
            "evict": self.op_evict,
            "ping": self.op_ping,
        }

    # ------------------------------------------------------------------ loading

    def context(self, job: str) -> JobContext:
        """The job's spec and validation set, shared by every shard of the job on this node."""
        now = time.monotonic()
        cached = self._contexts.get(job)
        if cached is None or now - cached[0] > CONTEXT_TTL_S:
            cached = (now, job_context(self.store, job))
            self._contexts[job] = cached
        return cached[1]

    def _loader(self, key: ShardKey) -> Any:
        if key.is_block:
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
            return lambda: load_round(
                self.store, key.job, key.round, self.artifacts, self.context(key.job)
            )
        if key.cls == "meta":
            return lambda: load_meta(self.manifests, key.job)
        if key.cls == "client":
            return lambda: load_client(self.manifests, key.job, key.part)
        return lambda: GlobalModels(
            key.job, self.store, self.context(key.job), list_ttl_s=REFRESH_S
        )

    def _refresh(self, key: ShardKey, value: Any, force: bool = False) -> Any:
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
            fresh: Any = load_meta(self.manifests, key.job, known=value)
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
        listed: set[str] = set()  # jobs whose manifests this load listed (once per job)
        for text in shards:
            try:
                key = ShardKey.parse(text)
            except (ValueError, FLStoreError) as exc:
                raise ValidationError(f"bad shard key {text!r}: {exc}") from exc
            try:
                t0 = time.perf_counter()
                if key.cls == "round":
                    self._drop_if_rewritten(key, listed)
                with self.cache.using(key, self._loader(key)) as (value, hit):
                    t1 = time.perf_counter()
                    timing["load"] += (t1 - t0) * 1000
                    if isinstance(value, RoundData):
                        # a block's default models are written by the router, block by block
                        self._warm_round(value, text in with_models and not key.is_block)
                        timing["warm"] += (time.perf_counter() - t1) * 1000
                    elif hit:
                        self._refresh(key, value, force=True)
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
        }

    def compute_artifacts(self, shares: dict[str, tuple[int, int]]) -> dict[str, Any]:
        """This node's share ``(share, shares)`` of the model artifacts of each named round it
        holds (:mod:`flstore_core.workloads.artifacts`), and every value it then holds: round
        -> its ``content``, ``entries``, the ``tasks`` done, ``errors``, ``deferred``, ``ms``.
        A round not held here is skipped; an artifact that fails is reported, never raised."""
        out: dict[str, Any] = {}
        for text, (share, count) in shares.items():
            held = self.cache.get(self._whole_round(text))
            if isinstance(held, RoundData):
                out[text] = self._round_artifacts(held, share, count)
            else:
                out[text] = {"skipped": "round not held"}
        return out

    @staticmethod
    def _whole_round(text: str) -> ShardKey:
        try:
            key = ShardKey.parse(text)
        except (ValueError, FLStoreError) as exc:
            raise ValidationError(f"bad shard key {text!r}: {exc}") from exc
        if key.cls != "round" or key.is_block:
            raise ValidationError(f"model artifacts are kept for whole rounds, not {text!r}")
        return key

    @staticmethod
    def _round_artifacts(data: RoundData, share: int, shares: int) -> dict[str, Any]:
        """This node's share of the round's model artifacts, and every value it then holds
        (never raises: an artifact that fails is reported and left to the request)."""
        done = artifacts.compute(data, share, shares, ARTIFACTS_BUDGET_S)
        try:
            entries = artifacts.export(data)
        except Exception as exc:  # pragma: no cover - export of values this code computed
            done["errors"]["export"] = str(exc)
            entries = []
        return {"content": content_digest(data.sha256), "entries": entries, **done}

    def adopt_artifacts(self, rounds: dict[str, Any]) -> dict[str, Any]:
        """Keep model artifacts another replica computed for rounds this node holds (the
        router's exchange after a prefetch); a round not held here, or held with other content
        (a late client), is skipped."""
        adopted: dict[str, int] = {}
        skipped: dict[str, str] = {}
        for text, item in rounds.items():
            key = self._whole_round(text)
            if not isinstance(item, dict):
                raise ValidationError(f"artifacts of {text!r} must be {{'content', 'entries'}}")
            held = self.cache.get(key)
            if not isinstance(held, RoundData):
                skipped[text] = "round not held"
            elif content_digest(held.sha256) != item.get("content"):
                skipped[text] = "round held with other content"
            else:
                adopted[text] = artifacts.adopt(held, item.get("entries"))
        return {"adopted": adopted, "skipped": skipped, "node": self.node_index}

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

    def _warm_round(self, data: RoundData, models: bool) -> None:
        """Prefetch-time work on a round: the shared artifacts and, when asked, the round's
        default aggregate models written to ``results/`` so that a request for them does no
        PUT."""
        data.warm()
        for name in PREFETCH_MODELS if models else ():
            workload = get(name)
            run_round_workload(
                self.store, workload, data, workload.validate({}), data.results_written
            )

    # ------------------------------------------------------------------ running

    def run(self, event: dict[str, Any]) -> dict[str, Any]:
        workload = get(event.get("workload", ""))
        job = validate_job(event.get("job"))
        params = workload.validate(event.get("params"))
        gets_before, puts_before = self.store.gets, self.store.puts
        t0 = time.perf_counter()
        timing: dict[str, float] = {}  # "write": encoding and PUT of a model result
        if workload.cls == "round":
            key = round_shard(job, validate_round(event.get("round")))
            with self.cache.using(key, self._loader(key)) as (data, hit):
                t1 = time.perf_counter()
                result = self._answer(
                    self._round_memo(data),
                    workload.name,
                    {"params": params},
                    lambda: run_round_workload(
                        self.store, workload, data, params, data.results_written, timing
                    ),
                )
            hits = [hit]
        elif workload.cls == "client":
            result, hits, t1 = self._run_clients(workload, job, event, params)
        else:
            key = meta_shard(job) if workload.cls == "meta" else model_shard(job)
            with self.cache.using(key, self._loader(key)) as (value, hit):
                value = self._refresh(key, value)
                t1 = time.perf_counter()
                if isinstance(value, GlobalModels) and params.get("round", 0) is None:
                    # the latest stored global model, named: the answer is that round's
                    params = {**params, "round": value.latest_round()}
                request = {"params": params, "rounds": event.get("rounds")}
                result = self._memoised(value.memo, workload.name, request, value, params)
                if isinstance(value, GlobalModels):
                    self.cache.put(key, value)  # models loaded on demand: re-account its size
            hits = [hit]
        t2 = time.perf_counter()
        state = "hit" if all(hits) else "miss" if not any(hits) else "partial"
        return {
            "result": result,
            "cache": state,
            "node": self.node_index,
            "timing_ms": {"load": (t1 - t0) * 1000, "compute": (t2 - t1) * 1000, **timing},
            "s3_gets": self.store.gets - gets_before,
            "s3_puts": self.store.puts - puts_before,  # a model result written, if any
        }

    def _memoised(
        self,
        memo: ResultMemo,
        name: str,
        request: dict[str, Any],
        shard: Any,
        params: dict[str, Any],
    ) -> dict[str, Any]:
        """The workload's answer on ``shard``: kept from an identical earlier request on this
        version of the shard, else run and kept (:mod:`flstore_core.cache.memo`)."""
        workload = get(name)

        def compute() -> dict[str, Any]:
            out = workload.run(shard, params)
            result = dict(out.result if isinstance(out, WorkloadResult) else out)
            if workload.cls == "client" and workload.finalize is not None:
                result = workload.finalize(result, params)
            return result

        return self._answer(memo, name, request, compute)

    def _answer(
        self,
        memo: ResultMemo,
        name: str,
        request: dict[str, Any],
        compute: Callable[[], dict[str, Any]],
    ) -> dict[str, Any]:
        """``compute()``, or the answer ``memo`` kept for an identical request."""
        result, reused = memo.answer(ResultMemo.key(name, request), compute)
        self.answers["reused" if reused else "computed"] += 1
        return result

    def _round_memo(self, data: RoundData) -> ResultMemo:
        """The memo of answers on this copy of a round: it goes with the copy (evicted, or
        dropped for a rewritten manifest and read again), never outlives it."""
        memo = self._round_answers.get(data)
        if memo is None:
            memo = self._round_answers.setdefault(data, ResultMemo())
        return memo

    def _run_clients(
        self, workload: Workload, job: str, event: dict[str, Any], params: dict[str, Any]
    ) -> tuple[dict[str, Any], list[bool], float]:
        """A client-class workload on the job's meta shard, which holds every client's rows
        of every committed round: one node answers for all the clients asked (``clients`` of
        the params, else every client of the job), finalised here."""
        clients = event.get("clients") or params.get("clients") or None  # [] asks for all
        if clients is not None and not isinstance(clients, list):
            raise ValidationError("a client-class run's 'clients' must be a list of client ids")
        names = None if clients is None else [validate_client(c) for c in clients]
        rounds = event.get("rounds")
        wanted = None if rounds is None else {validate_round(r) for r in rounds}
        key = meta_shard(job)
        with self.cache.using(key, self._loader(key)) as (meta, hit):
            meta = self._refresh(key, meta)
            t1 = time.perf_counter()
            if names is None:
                names = meta.clients
                if not names:
                    raise NotFoundError(f"job {job!r} has no committed round with clients yet")
            histories = {
                c: ClientHistory(
                    job, c, [r for r in meta.history(c) if wanted is None or r.round in wanted]
                )
                for c in names
            }
            request = {
                "params": params,
                "clients": names,
                "rounds": None if wanted is None else sorted(wanted),
            }
            result = self._memoised(meta.memo, workload.name, request, histories, params)
        return result, [hit], t1

    # ------------------------------------------------------------------ column blocks

    @staticmethod
    def _block_keys(event: dict[str, Any]) -> list[ShardKey]:
        """The blocks a block op names: ``"indices": [i, …]`` (or one ``"block": i``) of
        ``"blocks": K`` of the round."""
        job = validate_job(event.get("job"))
        round_ = validate_round(event.get("round"))
        indices, blocks = event.get("indices"), event.get("blocks")
        if indices is None and "block" in event:
            indices = [event.get("block")]
        if (
            not isinstance(indices, list)
            or not indices
            or not all(isinstance(i, int) and not isinstance(i, bool) for i in indices)
            or not isinstance(blocks, int)
            or isinstance(blocks, bool)
        ):
            raise ValidationError(
                "a block op needs 'blocks' (the round's block count) and 'indices' (a non-empty "
                "list of block numbers) or 'block'"
            )
        try:
            return [block_shard(job, round_, i, blocks) for i in indices]
        except ValueError as exc:
            raise ValidationError(str(exc)) from exc

    @staticmethod
    def _state(hits: list[bool]) -> str:
        return "hit" if all(hits) else "miss" if not any(hits) else "partial"

    def partial(self, event: dict[str, Any]) -> dict[str, Any]:
        """The Gram pieces of each block named: of its parameters' columns, or of its buffers'.
        One invocation serves every block the router gives this node, one after the other (a
        node runs one invocation at a time)."""
        keys = self._block_keys(event)
        gets_before = self.store.gets
        load_ms = compute_ms = 0.0
        results: list[dict[str, Any]] = []
        hits: list[bool] = []
        deltas: set[bool] = set()
        contents: set[str] = set()
        for key in keys:
            t0 = time.perf_counter()
            with self.cache.using(key, self._loader(key)) as (data, hit):
                t1 = time.perf_counter()
                parts = block_parts_json(data, bool(event.get("buffers")))
                deltas.add(data.is_delta)
                contents.add(content_digest(data.sha256))
            load_ms += (t1 - t0) * 1000
            compute_ms += (time.perf_counter() - t1) * 1000
            hits.append(hit)
            results.append({"index": key.block, "parts": parts})
        return {
            "results": results,
            "is_delta": deltas.pop() if len(deltas) == 1 else None,
            "content": contents.pop() if len(contents) == 1 else None,
            "cache": self._state(hits),
            "node": self.node_index,
            "timing_ms": {"load": load_ms, "compute": compute_ms},
            "s3_gets": self.store.gets - gets_before,
        }

    def model_part(self, event: dict[str, Any]) -> dict[str, Any]:
        """Each named block of a model result: the expression evaluated on the block, in the
        stored dtypes, as one zstd frame at ``part_keys[i]`` (block 0 first writes the header);
        blocks are written one after the other, so the node holds one block's frame at a
        time."""
        keys = self._block_keys(event)
        part_keys = event.get("part_keys")
        if part_keys is None and "part_key" in event:
            part_keys = [event.get("part_key")]
        expr = event.get("expr")
        metadata = event.get("metadata")
        if (
            not isinstance(part_keys, list)
            or len(part_keys) != len(keys)
            or not all(isinstance(k, str) for k in part_keys)
            or not isinstance(expr, dict)
        ):
            raise ValidationError(
                "model_part needs 'expr' and 'part_keys': one string per block in 'indices'"
            )
        load_all()  # the coordinate-wise functions the expression may name
        gets_before = self.store.gets
        load_ms = compute_ms = 0.0
        results: list[dict[str, Any]] = []
        hits: list[bool] = []
        for key, part_key in zip(keys, part_keys, strict=True):
            t0 = time.perf_counter()
            with self.cache.using(key, self._loader(key)) as (data, hit):
                t1 = time.perf_counter()
                vector = evaluate(expr, data)
                block_specs = stored_specs(data.specs)
            header = b""
            if key.block == 0:
                if not isinstance(metadata, dict):
                    raise ValidationError("model_part of block 0 needs the result's 'metadata'")
                specs = self.manifests.get(key.job, key.round).tensors
                header = header_prefix(result_specs(specs), metadata)
            frame = result_frame(vector, block_specs, header)
            del vector
            self.store.put_result(part_key, as_body(frame), "application/octet-stream")
            load_ms += (t1 - t0) * 1000
            compute_ms += (time.perf_counter() - t1) * 1000
            hits.append(hit)
            results.append({"index": key.block, "part_key": part_key, "bytes": len(frame)})
        return {
            "results": results,
            "s3_puts": len(results),
            "cache": self._state(hits),
            "node": self.node_index,
            "timing_ms": {"load": load_ms, "compute": compute_ms},
            "s3_gets": self.store.gets - gets_before,
        }

    # ------------------------------------------------------------------ per-client workloads

    def run_clients(self, event: dict[str, Any]) -> dict[str, Any]:
        """A per-client model workload on a sharded round, one client at a time
        (:mod:`flstore_core.cache.streamed`): the rows read are kept while the budget this
        node's cache leaves free holds them, and dropped with the request."""
        workload = get(event.get("workload", ""))
        job = validate_job(event.get("job"))
        round_ = validate_round(event.get("round"))
        params = workload.validate(event.get("params"))
        gram, buffers, rows = event.get("gram"), event.get("buffers"), event.get("rows")
        if not isinstance(gram, dict) or not (buffers is None or isinstance(buffers, dict)):
            raise ValidationError("run_clients needs the round's Gram pieces ('gram', 'buffers')")
        if rows is not None:
            if workload.split is None:
                raise ValidationError(f"workload {workload.name!r} is not run in client groups")
            if not isinstance(rows, list) or not all(isinstance(r, int) for r in rows):
                raise ValidationError("run_clients' 'rows' must be a list of row indices")
        gets_before, puts_before = self.store.gets, self.store.puts
        t0 = time.perf_counter()
        manifest = self.manifests.get(job, round_)
        if rows is not None and not all(0 <= r < len(manifest.clients) for r in rows):
            raise ValidationError(f"row indices must be below {len(manifest.clients)}")
        free = self.cache.budget - self.cache.bytes_held - working_bytes(manifest.n_params)
        data = StreamedRound(
            self.store,
            manifest,
            parts_from_json(gram),
            None if buffers is None else parts_from_json(buffers),
            bool(event.get("is_delta")),
            capacity=free,
            context=self.context(job),
            stats=self.artifacts,
        )
        t1 = time.perf_counter()
        answer: dict[str, Any] = {}
        if rows is not None:
            assert workload.split is not None
            result = workload.split.score(data, params, rows)
        else:
            out = workload.run(data, params)
            result = dict(out.result)
            model = out.model_vector()
            if isinstance(model, VectorExpr):  # coordinate-wise: the block holders write it
                answer["model_expr"] = model.spec
            elif model is not None:
                result["model_key"] = store_model(
                    self.store, workload.name, data, params, model, self._streamed_written
                )
        t2 = time.perf_counter()
        return {
            "result": result,
            **answer,
            "cache": "miss",
            "node": self.node_index,
            "rows_read": data.rows_read,
            "timing_ms": {"load": (t1 - t0) * 1000, "compute": (t2 - t1) * 1000},
            "s3_gets": self.store.gets - gets_before,
            "s3_puts": self.store.puts - puts_before,
        }

    # ------------------------------------------------------------------ the rest

    def stats(self) -> dict[str, Any]:
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
            "answers": dict(self.answers),
            "invocations": self.invocations,
            "uptime_s": time.time() - self.started,
            "pid": os.getpid(),
            "peak_rss_mb": peak_rss_mb,
        }

    def evict(self, event: dict[str, Any]) -> dict[str, Any]:
        if event.get("all"):
            keys = self.cache.shard_keys()
            # the manifests and job contexts too: after ``evict all`` everything is read anew
            self.manifests.forget()
            self._contexts.clear()
        else:
            keys = [ShardKey.parse(s) for s in event.get("shards", [])]
        return {"evicted": [str(k) for k in keys if self.cache.evict(k)]}

    # ------------------------------------------------------------------ operations

    def op_load(self, event: dict[str, Any]) -> dict[str, Any]:
        """``{"op": "load", "shards": [...], "models": [...]}``: see :meth:`load`."""
        shards = event.get("shards")
        if not isinstance(shards, list):
            raise ValidationError("load needs 'shards': a list of shard keys")
        models = event.get("models")
        if models is not None and not isinstance(models, list):
            raise ValidationError("load's 'models' must be a list of shard keys")
        return self.load(shards, models)

    def op_artifacts(self, event: dict[str, Any]) -> dict[str, Any]:
        """``{"op": "artifacts", "compute": {shard: [share, shares]}}``: see
        :meth:`compute_artifacts`; ``{"op": "artifacts", "rounds": {shard: {"content",
        "entries"}}}``: see :meth:`adopt_artifacts`."""
        compute, rounds = event.get("compute"), event.get("rounds")
        if compute is None and rounds is None:
            raise ValidationError(
                "artifacts needs 'compute' (shard -> [share, shares]) or 'rounds' "
                "(shard -> {content, entries})"
            )
        answer: dict[str, Any] = {"node": self.node_index}
        if compute is not None:
            if not isinstance(compute, dict) or not all(
                isinstance(v, list)
                and len(v) == 2
                and all(isinstance(i, int) and not isinstance(i, bool) for i in v)
                and 0 <= v[0] < v[1]
                for v in compute.values()
            ):
                raise ValidationError(
                    "artifacts' 'compute' must map round shard keys to [share, shares] with "
                    "0 <= share < shares"
                )
            shares = {k: (v[0], v[1]) for k, v in compute.items()}
            answer["computed"] = self.compute_artifacts(shares)
        if rounds is not None:
            if not isinstance(rounds, dict):
                raise ValidationError(
                    "artifacts' 'rounds' must map shard keys to {content, entries}"
                )
            answer.update(self.adopt_artifacts(rounds))
        return answer

    def op_run(self, event: dict[str, Any]) -> dict[str, Any]:
        """``{"op": "run", "workload", "job", "round" | "rounds", "params"}``: see :meth:`run`."""
        return self.run(event)

    def op_partial(self, event: dict[str, Any]) -> dict[str, Any]:
        """``{"op": "partial", "job", "round", "indices", "blocks", "buffers"}``: see
        :meth:`partial`."""
        return self.partial(event)

    def op_model_part(self, event: dict[str, Any]) -> dict[str, Any]:
        """``{"op": "model_part", "job", "round", "indices", "blocks", "expr", "part_keys",
        "metadata"}``: see :meth:`model_part`."""
        return self.model_part(event)

    def op_run_clients(self, event: dict[str, Any]) -> dict[str, Any]:
        """``{"op": "run_clients", "workload", "job", "round", "params", "gram", "buffers",
        "is_delta", "rows"}``: see :meth:`run_clients`."""
        return self.run_clients(event)

    def op_stats(self, event: dict[str, Any]) -> dict[str, Any]:
        """``{"op": "stats"}``: see :meth:`stats`."""
        return self.stats()

    def op_evict(self, event: dict[str, Any]) -> dict[str, Any]:
        """``{"op": "evict", "shards": [...]}`` or ``{"op": "evict", "all": true}``."""
        return self.evict(event)

    def op_ping(self, event: dict[str, Any]) -> dict[str, Any]:
        """``{"op": "ping"}``: keeps the instance warm and says which node it is."""
        return {"ok": True, "node": self.node_index, "invocations": self.invocations}

    def handle(self, event: Any) -> dict[str, Any]:
        """Dispatch one JSON event through the op table; caller errors are returned, not
        raised."""
        self.invocations += 1
        try:
            if not isinstance(event, dict):
                raise ValidationError("a cache-node event must be a JSON object")
            op = event.get("op")
            # an op that is not a string (a list, say) is unknown too, not a crash
            operation = self.ops.get(op) if isinstance(op, str) else None
            if operation is None:
                names = list(self.ops)
                raise ValidationError(
                    f"unknown op {op!r}: use {', '.join(names[:-1])} or {names[-1]}"
                )
            return operation(event)
        except FLStoreError as exc:
            return {**exc.to_dict(), "status": exc.status}
