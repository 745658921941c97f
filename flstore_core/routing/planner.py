"""Planning by size: which nodes hold which column blocks of a round (ARCHITECTURE §3).

The router, ingestion's prefetch and ``flstore stats`` all call :func:`plan_round` with the
round's manifest and the stack's shape (nodes, replication, node budget), and get the same
:class:`RoundPlan`: a pure function, no I/O.

* A round whose footprint (:func:`flstore_core.data.blocks.footprint`) fits one node's budget is
  one shard placed as before: rendezvous hashing of ``job/round/R``, R replicas.
* A larger round is cut into column blocks (:func:`~flstore_core.data.blocks.blocks_needed`)
  and each block is placed by rendezvous hashing of its own key *with bounded loads*: a block
  goes to the highest-ranked nodes whose share of this round, with it, still fits their budget.
  Primaries are placed first for every block, then replicas as far as room allows, so a stack
  that can hold the round once holds it, and one with room to spare holds it R times.
* A round no placement can hold — a block larger than a node, or more blocks than the nodes
  have room for — raises :class:`NoLayoutError` (503), naming the round's size and the node
  budget, before any node is invoked: no node is sent a shard it cannot hold.

A node that is not an owner of a block may still serve it when the owners fail (it loads the
block from S3), but only if the plan leaves it room for it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from flstore_core.data.blocks import (
    block_ranges,
    blocks_needed,
    column_bytes,
    footprint,
)
from flstore_core.data.codec import TensorSpec
from flstore_core.errors import UnavailableError
from flstore_core.routing.placement import ShardKey, block_shard, rank_nodes

MiB = 1024 * 1024


class NoLayoutError(UnavailableError):
    """No placement of the stack can hold the round (503)."""

    code = "no_layout"


@dataclass(frozen=True)
class BlockPlan:
    """One block of a round: its shard key, columns, bytes and the nodes that hold it."""

    key: ShardKey
    columns: tuple[int, int]
    nbytes: int
    owners: tuple[int, ...]  # primary first
    fallback: tuple[int, ...]  # other nodes with room for it, best first

    @property
    def order(self) -> list[int]:
        """The nodes to try for this block, best first."""
        return [*self.owners, *self.fallback]


@dataclass(frozen=True)
class RoundPlan:
    """Where a round's blocks live on a stack of ``nodes`` nodes of ``budget`` bytes."""

    job: str
    round: int
    n_clients: int
    n_params: int
    budget: int
    blocks: tuple[BlockPlan, ...]

    @property
    def sharded(self) -> bool:
        return len(self.blocks) > 1

    @property
    def footprint(self) -> int:
        return footprint(self.n_clients, self.n_params)

    def node_blocks(self) -> dict[int, list[ShardKey]]:
        """The blocks each node owns (primary or replica)."""
        out: dict[int, list[ShardKey]] = {}
        for block in self.blocks:
            for node in block.owners:
                out.setdefault(node, []).append(block.key)
        return out

    def describe(self) -> dict[str, object]:
        """A JSON summary (``flstore stats``, the benchmark)."""
        return {
            "job": self.job,
            "round": self.round,
            "blocks": len(self.blocks),
            "footprint_mb": round(self.footprint / MiB, 1),
            "budget_mb": round(self.budget / MiB, 1),
            "owners": {str(b.key): list(b.owners) for b in self.blocks},
        }


def _refusal(job: str, round_: int, need: int, nodes: int, budget: int, why: str) -> NoLayoutError:
    return NoLayoutError(
        f"no layout can hold round {round_} of job {job!r}: it needs {need / MiB:.1f} MiB in "
        f"memory and the stack has {nodes} cache node(s) of {budget / MiB:.1f} MiB budget each "
        f"({why}); add nodes or give them more memory"
    )


def plan_round(
    job: str,
    round_: int,
    specs: Sequence[TensorSpec],
    n_clients: int,
    *,
    nodes: int,
    replication: int,
    budget: int,
    blocks: int | None = None,
) -> RoundPlan:
    """The round's blocks and their owners on this stack (module docstring).

    ``blocks`` forces at least that many blocks (never more than the round has columns) on a
    round that would need fewer: the strong-scaling benchmark serves a round that fits one
    node from several. The cuts and the placement follow the same rules as for any count.
    """
    n_params = sum(s.numel for s in specs)
    count = blocks_needed(n_clients, n_params, budget)
    if blocks is not None:
        if blocks < 1:
            raise ValueError(f"a round has at least one block, not {blocks}")
        count = max(count, min(blocks, n_params))
    ranges = block_ranges(specs, count) if n_params else ((0, 0),)
    per_column = column_bytes(n_clients)
    sizes = [(b - a) * per_column for a, b in ranges]
    need = footprint(n_clients, n_params)
    keys = [block_shard(job, round_, i, count) for i in range(count)]
    if max(sizes) > budget:
        raise _refusal(job, round_, need, nodes, budget, "one block is larger than a node")
    replicas = max(1, min(replication, nodes))
    if count == 1:
        ranked = rank_nodes(keys[0], nodes)
        block = BlockPlan(
            keys[0], ranges[0], sizes[0], tuple(ranked[:replicas]), tuple(ranked[replicas:])
        )
        return RoundPlan(job, round_, n_clients, n_params, budget, (block,))
    load = [0] * nodes
    rankings = [rank_nodes(key, nodes) for key in keys]
    owners: list[list[int]] = [[] for _ in keys]
    for copy in range(replicas):
        for i, ranked in enumerate(rankings):
            node = next(
                (n for n in ranked if n not in owners[i] and load[n] + sizes[i] <= budget), None
            )
            if node is None:
                if copy == 0:
                    raise _refusal(
                        job,
                        round_,
                        need,
                        nodes,
                        budget,
                        f"{count} blocks of up to {max(sizes) / MiB:.1f} MiB do not fit",
                    )
                continue  # no room for this replica: the block is held fewer times
            owners[i].append(node)
            load[node] += sizes[i]
    placed = tuple(
        BlockPlan(
            keys[i],
            ranges[i],
            sizes[i],
            tuple(owners[i]),
            tuple(n for n in rankings[i] if n not in owners[i] and load[n] + sizes[i] <= budget),
        )
        for i in range(count)
    )
    return RoundPlan(job, round_, n_clients, n_params, budget, placed)
