"""Prefetch: ask every owner of each shard to load it now, and exchange a round's model
artifacts between its owners (:mod:`flstore_core.workloads.artifacts`).

Ingestion calls it when a round is committed (``Router.prefetch``). A sharded round's blocks go
to their owners and its default models are written block by block by the sharded runner; a
whole round is loaded by its R owners, its primary materialises the default models, and its
model artifacts are split over the owners and then shared between them.

A commit's warming (:mod:`flstore_core.routing.commit_warming`) splits the two: ``load`` only
(``artifacts=False``: the rows, the Gram and the default models, after which the round is warm),
then :meth:`Prefetch.artifacts_in_chunks`: the model artifacts in invocations of at most
``chunk_s`` seconds of work each (a node runs one invocation at a time, so a request that finds
it busy waits one chunk, not the round's artifacts). Of a round's R ≥ 2 owners one computes at
a time, the owners taking turns — the primary last, since a request tries it first and it holds
the default models' answers — so a request finds an owner free (its failover tries the next
replica at once). A round held by one node gets :data:`CHUNK_GAP_S` between its chunks; and
once an owner is found held by a request (a long one, e.g. a ``contribution_loo`` computing
what the artifacts have not yet), every chunk is followed by :data:`BUSY_GAP_S`, longer than
the failover's longest backoff, so a request waiting for the other owner finds it free within
one chunk and one pause.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from flstore_core import config
from flstore_core.cache.job_mix import JobMix
from flstore_core.errors import NotFoundError, UnavailableError
from flstore_core.protocol import ArtifactsOp, LoadOp
from flstore_core.routing.failover import FailoverPolicy
from flstore_core.routing.invoker import NodeAnswer, NodeFailure, NodeThrottled
from flstore_core.routing.placement import ShardKey, place_shard
from flstore_core.routing.planner import NoLayoutError, RoundPlan
from flstore_core.routing.scatter import BlockScatter
from flstore_core.routing.sharded_runner import ShardedRunner
from flstore_core.storage.object_store import ObjectStore
from flstore_core.workloads import get

PlanRound = Callable[[str, int], RoundPlan]
# why a prefetch skipped a job's model shard or model artifacts
NO_MODEL_ASKS = "the job asked no model workload in its recent rounds"
#: how long a prefetch's ``load`` waits out a busy node (the last staging of a round still
#: running when its commit lands, a request), asking again every LOAD_RETRY_S
LOAD_WAIT_S = 30.0
LOAD_RETRY_S = 0.02
#: a single owner's pause between two chunks of its artifacts (a throttled request's first
#: retries come 50 and 100 ms after it was refused: FailoverPolicy's backoff)
CHUNK_GAP_S = 0.15
#: the pause after a chunk while another owner is held by a request: a waiting request retries
#: at least every FailoverPolicy.backoff_cap_s (1 s), so it comes within the pause
BUSY_GAP_S = FailoverPolicy().backoff_cap_s + 0.05


class Prefetch:
    """Loads shards on their owners and spreads a round's model artifacts over them.

    Parameters
    ----------
    store : ObjectStore
        Where job specs are read (only a job that declares a model has model artifacts).
    scatter : BlockScatter
        How nodes are invoked.
    plan_round : callable
        ``plan_round(job, round)``: the round's blocks on this stack (404, 503 as the router's).
    runner : ShardedRunner
        Writes a sharded round's default models.
    nodes, replication : int
        The stack's cache nodes and replicas per shard.
    mix : JobMix, optional
        What each job was seen to ask (the router's): a job known to ask no model workload
        gets neither its model shard loaded nor its rounds' model artifacts built (the first
        request that asks one loads or computes them).
    """

    def __init__(
        self,
        store: ObjectStore,
        scatter: BlockScatter,
        plan_round: PlanRound,
        runner: ShardedRunner,
        nodes: int,
        replication: int,
        mix: JobMix | None = None,
    ) -> None:
        self.store = store
        self.scatter = scatter
        self.plan_round = plan_round
        self.runner = runner
        self.nodes = nodes
        self.replication = replication
        self.mix = mix

    def __call__(self, shards: list[ShardKey], artifacts: bool = True) -> dict[str, Any]:
        """Prefetch ``shards``; each node's answer by function name (``Router.prefetch``).
        ``artifacts=False``: load only, the model artifacts left to
        :meth:`artifacts_in_chunks`."""
        by_node: dict[int, list[str]] = {}
        primary_of: dict[int, list[str]] = {}
        # whole rounds: shard -> its owners, each computing one share of its model artifacts
        round_owners: dict[str, list[int]] = {}
        sharded: list[tuple[ShardKey, RoundPlan]] = []
        refused: dict[str, Any] = {}
        for shard in shards:
            if shard.cls == "model" and not self._wants_models(shard.job):
                refused[f"skipped:{shard}"] = {"skipped": NO_MODEL_ASKS}
                continue
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
            owners = place_shard(shard, self.nodes, self.replication)
            for index in owners:
                by_node.setdefault(index, []).append(str(shard))
            primary_of.setdefault(owners[0], []).append(str(shard))
            if shard.cls == "round" and self._declares_model(shard.job):
                if self._wants_models(shard.job):
                    round_owners[str(shard)] = owners
                else:
                    refused[f"skipped:{shard}"] = {"skipped": NO_MODEL_ASKS}

        answers = self._load(by_node, primary_of)
        if artifacts:
            self._compute_artifacts(round_owners, answers)
            self._share_artifacts(round_owners, answers)
        for shard, plan in sharded:
            self._prefetch_models(shard, plan)
        return {**answers, **refused}

    def _load(
        self, by_node: dict[int, list[str]], primary_of: dict[int, list[str]]
    ) -> dict[str, Any]:
        """One ``load`` invocation per node, in parallel: its answer (and what it was billed)
        by function name, or the failure as an ``unavailable`` error. A busy node (a staging or
        a request holding it) is asked again every :data:`LOAD_RETRY_S` for up to
        :data:`LOAD_WAIT_S`."""

        def load(index: int) -> tuple[str, Any]:
            function = self.scatter.function(index)
            op = LoadOp(tuple(by_node[index]), tuple(primary_of.get(index, [])))
            deadline = time.monotonic() + LOAD_WAIT_S
            while True:
                try:
                    answer = self.scatter.invoker.invoke(function, op.to_event())
                    break
                except NodeThrottled as exc:
                    if time.monotonic() < deadline:
                        time.sleep(LOAD_RETRY_S)
                        continue
                    return function, {"error": {"code": "unavailable", "message": str(exc)}}
                except NodeFailure as exc:
                    return function, {"error": {"code": "unavailable", "message": str(exc)}}
            payload = dict(answer.payload)
            if "error" not in payload:
                payload.update(
                    invocations=1, billed_ms=answer.billed_ms, memory_mb=answer.memory_mb
                )
            return function, payload

        return dict(self.scatter.pool.map(load, sorted(by_node)))

    def _wants_models(self, job: str) -> bool:
        """Whether the job may ask a model workload: not known to ask none (``mix``)."""
        return self.mix is None or self.mix.asks_models(job)

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
        shares: dict[str, dict[str, tuple[int, int]]] = {}
        for shard, owners in round_owners.items():
            for k, index in enumerate(owners):
                function = self.scatter.function(index)
                answer = answers.get(function, {})
                if "error" not in answer and shard in answer.get("loaded", []) + answer.get(
                    "already", []
                ):
                    shares.setdefault(function, {})[shard] = (k, len(owners))

        events = {f: ArtifactsOp(compute=share) for f, share in shares.items()}
        for function, outcome in self._invoke_each(events):
            payload = answers[function]
            if isinstance(outcome, str):
                payload["artifacts"] = {"error": outcome}
                continue
            payload["artifacts"] = outcome.payload.get("computed", outcome.payload)
            _bill(payload, outcome)

    def _share_artifacts(self, round_owners: dict[str, list[int]], answers: dict[str, Any]) -> None:
        """Send each owner of a prefetched round the model artifacts its other owners computed
        (only those it does not hold, only from owners that read the same content), then
        replace the values in ``answers`` by their count. A node that cannot be reached keeps
        its own share; a request there computes the rest."""
        sends: dict[str, dict[str, Any]] = {}
        for shard, owners in round_owners.items():
            held: dict[str, dict[str, Any]] = {}
            for index in owners:
                function = self.scatter.function(index)
                item = answers.get(function, {}).get("artifacts", {}).get(shard)
                if isinstance(item, dict) and isinstance(item.get("entries"), list):
                    held[function] = item
            for function, give in _missing_entries(held).items():
                sends.setdefault(function, {})[shard] = {
                    "content": held[function].get("content"),
                    "entries": give,
                }

        events = {f: ArtifactsOp(rounds=rounds) for f, rounds in sends.items()}
        for function, outcome in self._invoke_each(events):
            payload = answers[function]
            if isinstance(outcome, str):
                payload["shared"] = {"error": outcome}
                continue
            payload["shared"] = outcome.payload.get("adopted", outcome.payload.get("error"))
            _bill(payload, outcome)
        for payload in answers.values():
            for item in payload.get("artifacts", {}).values() if isinstance(payload, dict) else ():
                if isinstance(item, dict):
                    item["values"] = len(item.pop("entries", None) or [])

    def artifacts_in_chunks(
        self, shards: list[ShardKey], chunk_s: float, total_s: float
    ) -> dict[str, Any]:
        """The model artifacts of whole rounds their owners hold (a ``load`` came first), in
        ``artifacts`` invocations of at most ``chunk_s`` seconds of work each, the owners of a
        round taking turns (module docstring); after ``total_s`` seconds the rest is left to
        the requests. Then the owners exchange their values, as a whole prefetch's do. Each
        node's answer by function name: ``artifacts`` (round -> ``tasks`` done, ``deferred``,
        ``values``), ``chunks``, ``shared``, ``invocations``, ``billed_ms``."""
        round_owners: dict[str, list[int]] = {}
        answers_skipped: dict[str, Any] = {}
        for shard in shards:
            if shard.cls != "round" or not self._declares_model(shard.job):
                continue
            if not self._wants_models(shard.job):
                answers_skipped[f"skipped:{shard}"] = {"skipped": NO_MODEL_ASKS}
                continue
            try:
                if self.plan_round(shard.job, shard.round).sharded:
                    continue  # a sharded round's models are written block by block
            except (NotFoundError, NoLayoutError):
                continue
            round_owners[str(shard)] = place_shard(shard, self.nodes, self.replication)
        answers: dict[str, Any] = {}
        deadline = time.monotonic() + total_s
        for text, owners in round_owners.items():
            self._chunk_round(text, owners, chunk_s, deadline, answers)
        self._share_artifacts(round_owners, answers)
        return {**answers, **answers_skipped}

    def _chunk_round(
        self,
        shard: str,
        owners: list[int],
        chunk_s: float,
        deadline: float,
        answers: dict[str, Any],
    ) -> None:
        """Chunks of ``shard``'s artifacts on its owners in turn, until none has any deferred
        (or the deadline passed, or an owner failed: it keeps what it computed)."""
        # function -> (its share, shares, the share's tasks done or failed so far); the
        # primary's turn last
        left = {
            self.scatter.function(index): (k, len(owners), 0)
            for k, index in reversed(list(enumerate(owners)))
        }
        busy = False  # an owner was found held by a request
        while left and time.monotonic() < deadline:
            for function, share in list(left.items()):
                payload = answers.setdefault(function, {"chunks": 0})
                outcome = self._chunk(function, shard, share, chunk_s, payload)
                if outcome is None:  # throttled: a request holds it, the next turn
                    busy = True
                elif outcome < 0:
                    del left[function]
                else:
                    left[function] = (*share[:2], outcome)
                if left and (busy or len(owners) == 1):
                    # room for a waiting request (or for the one holding a node to end)
                    time.sleep(BUSY_GAP_S if busy else CHUNK_GAP_S)

    def _chunk(
        self,
        function: str,
        shard: str,
        share: tuple[int, int, int],
        chunk_s: float,
        payload: dict[str, Any],
    ) -> int | None:
        """One chunk of ``shard``'s share ``(share, shares, start)`` on ``function``, its
        answer kept in ``payload`` (the tasks done by every chunk so far): where the next chunk
        starts, -1 when none is needed (nothing deferred, or the node failed), ``None`` when
        the node was busy."""
        op = ArtifactsOp(compute={shard: share}, budget_s=chunk_s)
        try:
            outcome = self.scatter.invoker.invoke(function, op.to_event())
        except NodeThrottled:
            return None
        except NodeFailure as exc:
            payload.setdefault("artifacts", {})[shard] = {"error": str(exc)}
            return -1
        _bill(payload, outcome)
        payload["chunks"] += 1
        item = outcome.payload.get("computed", {}).get(shard, outcome.payload)
        held = payload.setdefault("artifacts", {})
        held[shard] = _merged(held.get(shard), item)
        if not isinstance(item, dict) or not item.get("deferred"):
            return -1
        return share[2] + len(item.get("tasks", [])) + len(item.get("errors", {}))

    def _invoke_each(self, events: dict[str, ArtifactsOp]) -> list[tuple[str, NodeAnswer | str]]:
        """Invoke each function with its op, in parallel, in name order: ``(function, its
        answer)``, or the failure's message where the node could not answer."""

        def one(function: str) -> tuple[str, NodeAnswer | str]:
            try:
                return function, self.scatter.invoker.invoke(function, events[function].to_event())
            except NodeFailure as exc:
                return function, str(exc)

        return list(self.scatter.pool.map(one, sorted(events)))

    def _prefetch_models(self, shard: ShardKey, plan: RoundPlan) -> None:
        """Write a sharded round's default aggregate models (``FLSTORE_PREFETCH_MODELS``), as
        a round's primary does for an unsharded one; a failure leaves them to the first
        request."""
        for name in config.PREFETCH_MODELS.get_list():
            workload = get(name)
            try:
                self.runner.run(workload, shard.job, shard.round, workload.validate({}), plan)
            except (UnavailableError, NodeFailure):
                continue


def _missing_entries(held: dict[str, dict[str, Any]]) -> dict[str, list[Any]]:
    """For each owner, the artifact entries the other owners that read the same content
    computed and it does not hold (none: not listed)."""
    out: dict[str, list[Any]] = {}
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
            out[function] = give
    return out


def _merged(before: Any, item: Any) -> Any:
    """A chunk's answer for a round with the ``tasks`` and ``errors`` of the chunks before it
    (its ``entries`` are every value the node holds already)."""
    if not isinstance(before, dict) or not isinstance(item, dict) or "tasks" not in item:
        return item
    out = dict(item)
    out["tasks"] = [*before.get("tasks", []), *item["tasks"]]
    out["errors"] = {**before.get("errors", {}), **item.get("errors", {})}
    return out


def _bill(payload: dict[str, Any], outcome: NodeAnswer) -> None:
    """Count one more invocation of a prefetch's node, and its billed duration."""
    payload["invocations"] = payload.get("invocations", 0) + 1
    payload["billed_ms"] = payload.get("billed_ms", 0.0) + outcome.billed_ms
