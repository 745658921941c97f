"""Running a round workload on a round held in column blocks (ARCHITECTURE §3).

A workload that decomposes over blocks runs in the router on a
:class:`~flstore_core.cache.sharded.ShardedRound`: the blocks' Gram pieces are gathered from
their holders (and kept, see :data:`SHARDED_VIEWS`), a model is written block by block
(:mod:`flstore_core.routing.model_results`). A workload that evaluates whole client models,
or needs a library the router does not carry, is handed to the streamed runner
(:mod:`flstore_core.routing.streamed_runner`).

Each request's invocations are accounted to its own :class:`~flstore_core.routing.scatter.Scatter`,
passed down explicitly; the view a request runs on is its own, and only what the router
gathered is shared between requests.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import cachetools
import numpy as np

from flstore_core.cache.round_data import GramParts, JobContext
from flstore_core.cache.sharded import (
    ShardedRound,
    content_digest,
    gram_piece_fetch,
    parts_from_json,
)
from flstore_core.cache.shards import ManifestReader
from flstore_core.cost import Invocation
from flstore_core.data.manifest import RoundManifest
from flstore_core.errors import UnavailableError
from flstore_core.protocol import PartialOp
from flstore_core.routing.model_results import ModelResultWriter
from flstore_core.routing.planner import RoundPlan
from flstore_core.routing.scatter import BlockScatter, Scatter
from flstore_core.routing.streamed_runner import StreamedRunner
from flstore_core.storage.object_store import ObjectStore
from flstore_core.workloads import Workload

# sharded rounds whose gathered Gram pieces the router keeps (n x n numbers each), so a second
# similarity workload on a sharded round costs no scatter
SHARDED_VIEWS = 32

# the Gram pieces of every block (``None`` where a block has none) and whether they are deltas
Gathered = tuple[list[GramParts | None], bool]


@dataclass
class ShardedRun:
    """What a round workload on a sharded round answered, and what serving it took."""

    result: dict[str, Any]
    answers: list[dict[str, Any]]  # every node answer (and the router's own S3 requests)
    tried: list[str]  # functions invoked, in order, repeats included
    invocations: list[Invocation]  # the billed invocations


def _no_validation() -> Any:
    raise UnavailableError("the router holds no validation set")


class GatheredRound:
    """One version of a sharded round as the router knows it: its manifest, its plan, its
    job's context, and the Gram pieces gathered so far (each kind once, whichever request
    asked first paying for it)."""

    def __init__(
        self, manifest: RoundManifest, plan: RoundPlan, context: JobContext, content: str
    ) -> None:
        self.manifest = manifest
        self.plan = plan
        self.context = context
        self.content = content
        self._lock = threading.Lock()
        self._gathered: dict[bool, Gathered] = {}

    def parts(self, buffers: bool, fetch: Any) -> Gathered:
        """The gathered pieces of the parameters' columns (or the buffers'): ``fetch(buffers)``
        the first time, the kept ones after."""
        with self._lock:
            if buffers not in self._gathered:
                self._gathered[buffers] = fetch(buffers)
            return self._gathered[buffers]


class ShardedRunner:
    """Runs round workloads on sharded rounds, keeping the Gram pieces it gathered."""

    def __init__(
        self,
        store: ObjectStore,
        manifests: ManifestReader,
        scatter: BlockScatter,
        streamed: StreamedRunner,
        models: ModelResultWriter,
    ) -> None:
        self.store = store
        self.manifests = manifests
        self.scatter = scatter
        self.streamed = streamed
        self.models = models
        self._lock = threading.Lock()
        # a sharded round's gathered Gram pieces, by round and content (see SHARDED_VIEWS)
        self._rounds: cachetools.LRUCache[tuple[Any, ...], GatheredRound] = cachetools.LRUCache(
            SHARDED_VIEWS
        )

    def run(
        self,
        workload: Workload,
        job: str,
        round_: int,
        params: dict[str, Any],
        plan: RoundPlan,
    ) -> ShardedRun:
        """Run a round workload on a round held in column blocks: Gram pieces gathered from the
        blocks' holders, a model written block by block (:mod:`flstore_core.cache.sharded`)."""
        scatter = Scatter()
        view = self.view(job, round_, plan, scatter)
        # a workload that evaluates client models, or imports a library the router does
        # not carry (scikit-learn), runs on a node with the round's Gram pieces
        if workload.evaluates_clients(params) or workload.needs:
            result = self.streamed.run(view, workload, params, plan, scatter)
        else:
            out = workload.run(view, params)
            result = dict(out.result)
            if out.model is not None:
                result["model_key"] = self.models.write(
                    view, workload.name, params, out.model, plan, scatter
                )
        if not scatter.answers:  # everything came from the router's gathered pieces
            scatter.answers.append({"cache": "hit", "s3_gets": 0})
        if scatter.s3_puts:  # the router's own requests to S3, in the state of the others
            state = scatter.answers[0].get("cache", "miss")
            scatter.answers.append({"cache": state, "s3_puts": scatter.s3_puts})
        return ShardedRun(result, scatter.answers, scatter.tried, scatter.invocations)

    def view(self, job: str, round_: int, plan: RoundPlan, scatter: Scatter) -> ShardedRound:
        """The round as ``scatter``'s request sees it: a view whose Gram pieces are the ones
        already gathered for this version of the round, or gathered now on its account."""
        gathered = self._gathered_round(job, round_, plan)
        manifest, clients = gathered.manifest, gathered.manifest.clients

        def fetch(buffers: bool) -> Gathered:
            return gathered.parts(buffers, lambda b: self._fetch(gathered, b, scatter))

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
            context=gathered.context,
        )

    def _gathered_round(self, job: str, round_: int, plan: RoundPlan) -> GatheredRound:
        manifest = self.manifests.get(job, round_)
        content = content_digest({c: e.sha256 for c, e in manifest.updates.items()})
        key = (job, round_, len(plan.blocks), content)
        with self._lock:
            known = self._rounds.get(key)
        if known is not None:
            return known
        expected = content_digest({c: manifest.updates[c].sha256 for c in manifest.clients})
        context = JobContext(self.store.get_job_spec(job), _no_validation)
        with self._lock:
            return self._rounds.setdefault(key, GatheredRound(manifest, plan, context, expected))

    def _fetch(self, gathered: GatheredRound, buffers: bool, scatter: Scatter) -> Gathered:
        """Gather the blocks' Gram pieces from their holders, on ``scatter``'s account."""
        plan = gathered.plan
        job, round_ = plan.job, plan.round
        answers = self.scatter.blocks(
            plan,
            lambda indices: PartialOp(job, round_, tuple(indices), len(plan.blocks), buffers),
            scatter,
        )
        if any(a.get("content") != gathered.content for _, a in answers):
            # a block holder read another version of the round (a late client joined it
            # between the router's manifest and the node's): nothing of this round is kept
            with self._lock:
                for key in [k for k in self._rounds if k[0] == job and k[1] == round_]:
                    self._rounds.pop(key, None)
            self.manifests.forget(job)
            raise UnavailableError(
                f"round {round_} of job {job!r} changed while it was read: retry the request"
            )
        deltas = {a.get("is_delta") for _, a in answers}
        if len(deltas) != 1 or None in deltas:
            raise UnavailableError(
                f"the blocks of round {round_} of job {job!r} disagree on its base model"
            )
        fetch = gram_piece_fetch(self.store, job, round_)  # the pieces past the payload limit
        parts = [
            None if item["parts"] is None else parts_from_json(item["parts"], fetch)
            for item, _ in answers
        ]
        return parts, bool(deltas.pop())
