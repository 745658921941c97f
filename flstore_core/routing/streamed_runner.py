"""Running a workload that evaluates whole client models on a round held in column blocks
(workload affinity, :mod:`flstore_core.cache.streamed`).

Its unit is a client, not a block, so a node reads the clients it evaluates from S3 one at a
time, with the round's Gram pieces (gathered from the blocks by the router) sent along. Which
nodes may run it is this module's decision (:meth:`StreamedRunner.affinity_order`): the round's
rendezvous ranking, nodes with room for the streamed round's working memory first.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np

from flstore_core.cache.sharded import ShardedRound, VectorExpr, gram_piece_spill, parts_to_json
from flstore_core.cache.streamed import working_bytes
from flstore_core.errors import UnavailableError
from flstore_core.protocol import RunClientsOp
from flstore_core.routing.model_results import ModelResultWriter
from flstore_core.routing.placement import ShardKey, rank_nodes, round_shard
from flstore_core.routing.planner import RoundPlan
from flstore_core.routing.scatter import BlockScatter, Scatter
from flstore_core.workloads import Workload


class StreamedRunner:
    """Runs per-client workloads of sharded rounds on nodes that stream the clients.

    Parameters
    ----------
    scatter : BlockScatter
        How nodes are invoked.
    models : ModelResultWriter
        Where a coordinate-wise model the node answers with is written.
    nodes : int
        The stack's cache nodes.
    budget : int
        Bytes of data one node holds.
    """

    def __init__(
        self, scatter: BlockScatter, models: ModelResultWriter, nodes: int, budget: int
    ) -> None:
        self.scatter = scatter
        self.models = models
        self.nodes = nodes
        self.budget = budget
        # the Gram pieces this router already wrote to S3 (named by content: never twice)
        self._spilled: set[str] = set()

    def run(
        self,
        view: ShardedRound,
        workload: Workload,
        params: dict[str, Any],
        plan: RoundPlan,
        scatter: Scatter,
    ) -> dict[str, Any]:
        """A workload that evaluates whole client models, on a sharded round, accounted to
        ``scatter``.

        A workload with a :class:`~flstore_core.workloads.ClientSplit` (accuracy_select: one
        evaluation per client, independent of the others) is scored in groups of clients on
        as many nodes in parallel, and merged here; the others (contribution_loo/shapley's
        aggregates of subsets, feddebug's leave-one-out over every client's activations,
        personalize, fltrust's trained ``g_0``) run whole on the round's affinity node. A
        coordinate-wise model (fltrust's) comes back as an expression the block holders write.
        """
        job, round_ = view.job, view.round
        key = round_shard(job, round_)
        shard = str(key)
        # a 503 before any node is invoked
        order = self.affinity_order(key, plan, workload.evaluates_clients(params))
        if workload.split is not None:
            workload.split.check(view.clients, params)
        parts = view.gram_parts()
        buffers = view.gram_parts(buffers=True)
        assert parts is not None
        # arrays past Lambda's payload limit go through S3 (the node reads them back)
        spill = gram_piece_spill(self.models.store, job, round_, self._spilled)
        op = RunClientsOp(
            workload.name,
            job,
            round_,
            parts_to_json(parts, spill),
            params,
            None if buffers is None else parts_to_json(buffers, spill),
            view.is_delta,
        )
        if workload.split is not None:
            split = workload.split
            groups = [g.tolist() for g in np.array_split(np.arange(view.n), len(order)) if len(g)]

            def one(index: int) -> dict[str, Any]:
                # group g starts at the g-th node of the order and fails over along it
                rotated = order[index:] + order[:index]
                group = replace(op, rows=tuple(groups[index]))
                return self.scatter.one(shard, rotated, group, scatter)

            answers = self.scatter.gather(one, len(groups))
            return split.merge(view.clients, params, [a["result"] for a in answers])
        answer = self.scatter.one(shard, order, op, scatter)
        result = dict(answer["result"])
        if answer.get("model_expr") is not None:
            result["model_key"] = self.models.write(
                view, workload.name, params, VectorExpr(answer["model_expr"]), plan, scatter
            )
        return result

    def affinity_order(self, shard: ShardKey, plan: RoundPlan, clients: bool = True) -> list[int]:
        """The nodes to run a per-client workload of a sharded round on: the whole round's
        rendezvous ranking, nodes whose budget the plan's blocks leave room for the streamed
        round's working memory first (:func:`~flstore_core.cache.streamed.working_bytes`);
        503 when no node's budget holds it. A workload that evaluates no client model
        (``clients`` false: kmeans, cfl_split, which only need a library the router lacks)
        reads no row and needs only the Gram pieces."""
        need = working_bytes(plan.n_params) if clients else 0
        if need > self.budget:
            raise UnavailableError(
                f"round {plan.round} of job {plan.job!r} has {plan.n_params} parameters: "
                f"evaluating one client model needs {need / 2**20:.1f} MiB of a node's "
                f"{self.budget / 2**20:.1f} MiB budget; deploy nodes with more memory"
            )
        held = {i: 0 for i in range(self.nodes)}
        for block in plan.blocks:
            for owner in block.owners:
                held[owner] += block.nbytes
        ranked = rank_nodes(str(shard), self.nodes)
        roomy = [i for i in ranked if self.budget - held[i] >= need]
        return roomy + [i for i in ranked if i not in roomy]
