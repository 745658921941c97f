"""A node's ``run`` op: a workload on the cached data, its answer kept for an identical request.

:class:`WorkloadAnswers` runs a workload on the shard its class lives on (a round, the job's
meta shard for a client-class workload, the meta or model shard otherwise), loading what is
missing, and keeps the answer in the memo of the shard it ran on
(:mod:`flstore_core.cache.memo`), so a repeated request on the same version of the shard is a
dictionary lookup. It counts the answers computed and reused for the node's ``stats``.

A round that gave up its rows under memory pressure (:mod:`flstore_core.cache.eviction`) still
answers every workload its Gram, distances and memoised artifacts suffice for — the selection
workloads — with no S3 read (a ``rowless_answers`` of the node's stats); a workload that reads
the rows raises :class:`~flstore_core.cache.round_data.RowsEvicted` and runs again once the node
has read them back (:meth:`~flstore_core.cache.node.CacheNode.reload_rows`): the artifacts it
reads are those computed from the same rows, so the answer is the same bits either way.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from flstore_core.cache.job_mix import Use
from flstore_core.cache.memo import ResultMemo
from flstore_core.cache.results import run_round_workload
from flstore_core.cache.round_data import RoundData, RowsEvicted
from flstore_core.cache.shards import ClientHistory, GlobalModels, JobMeta
from flstore_core.errors import NotFoundError, ValidationError
from flstore_core.ids import validate_client, validate_round
from flstore_core.protocol import RunOp
from flstore_core.routing.placement import meta_shard, model_shard, round_shard
from flstore_core.storage.results import NODE_INLINE_LIMIT, offload_if_large
from flstore_core.workloads import Workload, WorkloadResult, get

if TYPE_CHECKING:
    from flstore_core.cache.node import CacheNode


def cache_state(hits: list[bool]) -> str:
    """``hit`` when every shard read was held, ``miss`` when none was, else ``partial``."""
    return "hit" if all(hits) else "miss" if not any(hits) else "partial"


def lacks_rounds(shard: Any, rounds: Iterable[int] | None) -> bool:
    """Whether a meta shard lacks a round a request asks for. The router answers 404 for a
    round not committed, so such a shard was read before that round's commit and is read
    again now, not left to its next refresh point."""
    return (
        isinstance(shard, JobMeta) and rounds is not None and not set(rounds) <= shard.rounds.keys()
    )


class WorkloadAnswers:
    """The ``run`` op of one node, and the memo of answers on each round copy it holds."""

    def __init__(self, node: CacheNode) -> None:
        self.node = node
        # answers of workloads computed, and reused from the memo of the shard they ran on
        self.counts = {"computed": 0, "reused": 0}
        # answers a load kept (a round's default models), and how many a request then took:
        # what prefetch built, not counted as reused (a first request answered from it is one)
        self._kept_at_load: weakref.WeakKeyDictionary[ResultMemo, set[str]] = (
            weakref.WeakKeyDictionary()
        )
        self.prefetched = 0
        # a round's memo lives as long as the round's copy in this node's cache
        self._round_answers: weakref.WeakKeyDictionary[RoundData, ResultMemo] = (
            weakref.WeakKeyDictionary()
        )

    def run(self, op: RunOp) -> dict[str, Any]:
        """Run ``op``'s workload on the cached data, loading what is missing; the answer says
        whether the shards were held, the load and compute times and the S3 requests made.
        The node's :meth:`~flstore_core.cache.node.CacheNode.handle` runs it under the request
        deadline."""
        node = self.node
        workload = get(op.workload)
        job = op.job
        params = workload.validate(op.params)
        node.check_spec(job)  # a dictionary lookup between refresh points (REFRESH_S)
        gets_before, puts_before = node.store.gets, node.store.puts
        t0 = time.perf_counter()
        timing: dict[str, float] = {}  # "write": encoding and PUT of a model result
        if workload.cls == "round":
            result, hits, t1 = self._run_round(workload, op, params, timing)
        elif workload.cls == "client":
            result, hits, t1 = self._run_clients(workload, op, params)
        else:
            key = meta_shard(job) if workload.cls == "meta" else model_shard(job)
            with node.cache.using(key, node.loader(key)) as (value, hit):
                value = node.refresh(key, value, force=lacks_rounds(value, op.rounds))
                t1 = time.perf_counter()
                if isinstance(value, GlobalModels) and params.get("round", 0) is None:
                    # the latest stored global model, named: the answer is that round's
                    params = {**params, "round": value.latest_round()}
                rounds = None if op.rounds is None else sorted(set(op.rounds))
                request = {"params": params, "rounds": rounds}
                # a meta workload computes over the rounds asked, not the whole shard
                shard = (
                    value.restricted(rounds)
                    if isinstance(value, JobMeta) and rounds is not None
                    else value
                )
                result = self.memoised(
                    value.memo, workload, request, shard, params, value.spec_version, job
                )
                if isinstance(value, GlobalModels):
                    node.cache.put(key, value)  # models loaded on demand: re-account its size
            hits = [hit]
        if workload.cls != "round":
            model = workload.evaluates_models(params)
            node.cache.observe_request(Use(job, workload.cls, model=model))
        t2 = time.perf_counter()
        return {
            "result": result,
            "cache": cache_state(hits),
            "node": node.node_index,
            "timing_ms": {"load": (t1 - t0) * 1000, "compute": (t2 - t1) * 1000, **timing},
            "s3_gets": node.store.gets - gets_before,
            "s3_puts": node.store.puts - puts_before,  # a model result written, if any
        }

    def memoised(
        self,
        memo: ResultMemo,
        workload: Workload,
        request: dict[str, Any],
        shard: Any,
        params: dict[str, Any],
        version: str,
        job: str,
    ) -> dict[str, Any]:
        """The workload's answer on ``shard``: kept from an identical earlier request on this
        version of the shard and of the job's spec (``version``), else run and kept
        (:mod:`flstore_core.cache.memo`); offloaded to S3 when too large to answer inline."""

        def compute() -> dict[str, Any]:
            out = workload.run(shard, params)
            result = dict(out.result if isinstance(out, WorkloadResult) else out)
            return self.offloaded(job, workload, result)

        return self.answer(memo, workload.name, request, compute, version)

    def answer(
        self,
        memo: ResultMemo,
        name: str,
        request: dict[str, Any],
        compute: Callable[[], dict[str, Any]],
        version: str,
        at_load: bool = False,
    ) -> dict[str, Any]:
        """``compute()``, or the answer ``memo`` kept for an identical request on the job spec
        and validation set of ``version``; ``at_load``: kept by a load (prefetch), whose first
        reuse by a request is counted in :attr:`prefetched`, not as ``reused``."""
        key = ResultMemo.key(name, request, version)
        result, reused = memo.answer(key, compute)
        kept = self._kept_at_load.setdefault(memo, set())
        if at_load:  # not an answer to a request: counted when one takes it
            kept.add(key)
        elif reused and key in kept:
            kept.discard(key)
            self.prefetched += 1
        else:
            self.counts["reused" if reused else "computed"] += 1
        return result

    def round_memo(self, data: RoundData) -> ResultMemo:
        """The memo of answers on this copy of a round: it goes with the copy (evicted, or
        dropped for a rewritten manifest and read again), never outlives it."""
        memo = self._round_answers.get(data)
        if memo is None:
            memo = self._round_answers.setdefault(data, ResultMemo())
        return memo

    def tiers(self) -> dict[str, int]:
        """Bytes held by representation: round ``rows`` (whole rounds and column blocks), their
        ``gram`` pieces and distances, memoised model ``artifacts``, kept ``answers``, the
        ``models`` shards and the ``meta`` (meta and client-history) shards."""
        out = dict.fromkeys(("rows", "gram", "artifacts", "answers", "models", "meta"), 0)
        for key, value in self.node.cache.items():
            if isinstance(value, RoundData):
                out["rows"] += value.rows_nbytes
                out["gram"] += value.gram_bytes()
                out["artifacts"] += value.memo_bytes()
                memo = self._round_answers.get(value)
                out["answers"] += 0 if memo is None else memo.nbytes()
                continue
            kept = getattr(value, "memo", None)
            answers = kept.nbytes() if isinstance(kept, ResultMemo) else 0
            out["answers"] += answers
            out["models" if key.cls == "model" else "meta"] += int(value.nbytes)
        return out

    def _run_round(
        self, workload: Workload, op: RunOp, params: dict[str, Any], timing: dict[str, float]
    ) -> tuple[dict[str, Any], list[bool], float]:
        """A round-class workload on the round's copy held here (loaded on a miss): from its
        memo, from its Gram and artifacts if it gave up its rows and the workload needs no
        more, else on its rows (read back when dropped: then a miss)."""
        node = self.node
        key = round_shard(op.job, validate_round(op.round))
        with node.cache.using(key, node.loader(key)) as (data, hit):
            t1 = time.perf_counter()
            rowless, reloaded = not data.has_rows, []
            reads = getattr(data, "rows_reads", 0)

            def compute() -> dict[str, Any]:
                try:
                    return run_round_workload(
                        node.store, workload, data, params, data.results_written, timing
                    )
                except RowsEvicted:  # the rows were dropped and this workload reads them
                    reloaded.append(True)
                    rows = node.reload_rows(key, data)
                    return run_round_workload(
                        node.store, workload, rows, params, rows.results_written, timing
                    )

            memo = self.round_memo(data)
            version = data.context.version
            result = self.answer(memo, workload.name, {"params": params}, compute, version)
        if rowless and not reloaded:
            node.cache.stats.rowless_answers += 1
        rows = bool(reloaded) or getattr(data, "rows_reads", 0) > reads
        model = workload.evaluates_models(params)
        node.cache.observe_request(Use(op.job, "round", key.round, rows=rows, model=model))
        return result, [hit and not reloaded], t1

    def _run_clients(
        self, workload: Workload, op: RunOp, params: dict[str, Any]
    ) -> tuple[dict[str, Any], list[bool], float]:
        """A client-class workload on the job's meta shard, which holds every client's rows
        of every committed round: one node answers for all the clients asked (``clients`` of
        the op, else of the params, else every client of the job), finalised here."""
        node, job = self.node, op.job
        clients = op.clients or params.get("clients") or None  # [] asks for all
        if clients is not None and not isinstance(clients, list | tuple):
            raise ValidationError("a client-class run's 'clients' must be a list of client ids")
        names = None if clients is None else [validate_client(c) for c in clients]
        wanted = None if op.rounds is None else set(op.rounds)
        key = meta_shard(job)
        with node.cache.using(key, node.loader(key)) as (meta, hit):
            meta = node.refresh(key, meta, force=lacks_rounds(meta, wanted))
            t1 = time.perf_counter()
            if names is None:
                names = meta.clients
                if not names:
                    raise NotFoundError(f"job {job!r} has no committed round with clients yet")
            request = {
                "params": params,
                "clients": names,
                "rounds": None if wanted is None else sorted(wanted),
            }

            def compute() -> dict[str, Any]:
                answer = client_pass(workload, meta, names, wanted, params)
                return self.offloaded(job, workload, answer)

            result = self.answer(meta.memo, workload.name, request, compute, meta.spec_version)
        return result, [hit], t1

    def offloaded(self, job: str, workload: Workload, result: dict[str, Any]) -> dict[str, Any]:
        """``result``, or where its JSON is past what a node may answer inline, the pointer to
        it written under the job's ``results/`` (:func:`offload_if_large`): what is kept in the
        memo is then the pointer, not megabytes of answer."""
        return offload_if_large(self.node.store, job, workload.name, 0, result, NODE_INLINE_LIMIT)


# rows a client-class request turns into row objects at once: a job of 2,000 rounds × 100
# clients is 200,000 rows, ~110 MB as objects, so its clients are run in groups of 20,000 rows
# (~11 MB) and the groups' partial answers merged before the workload finalises them
ROWS_PER_PASS = 20_000


def client_pass(
    workload: Workload,
    meta: JobMeta,
    names: list[str],
    wanted: set[int] | None,
    params: dict[str, Any],
) -> dict[str, Any]:
    """A client-class workload over ``names``' histories in the meta shard, a group of clients
    at a time (:data:`ROWS_PER_PASS`), finalised. Each group's answer maps a field to a dict
    by client, so the groups' answers merge field by field."""
    rounds = len(meta.rounds) if wanted is None else len(wanted)
    group = max(1, ROWS_PER_PASS // max(rounds, 1))
    merged: dict[str, Any] = {}
    for start in range(0, len(names), group):
        rows = meta.histories(names[start : start + group], wanted)
        histories = {c: ClientHistory(meta.spec.job, c, h) for c, h in rows.items()}
        part = workload.run(histories, params)
        del histories, rows
        for name, values in dict(part.result if isinstance(part, WorkloadResult) else part).items():
            merged.setdefault(name, {}).update(values)
    return workload.finalize(merged, params) if workload.finalize is not None else merged
