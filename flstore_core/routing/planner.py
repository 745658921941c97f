"""Planning by size: which nodes hold which column blocks of a round (ARCHITECTURE §3).

The router, ingestion's prefetch and ``flstore stats`` all call :func:`plan_round` with the
round's manifest and the stack's shape (nodes, replication, node budget), and get the same
:class:`RoundPlan`: a pure function, no I/O.

* A round whose footprint (:func:`flstore_core.data.blocks.footprint`) fits one node's budget is
  one shard placed as before: rendezvous hashing of ``job/round/R``, R replicas.
* A larger round is cut into column blocks (:func:`~flstore_core.data.blocks.block_ranges`,
  snapped to tensor boundaries) and the blocks are **bin-packed** into the node budgets.

The packing policy, in order:

1. **Copies.** The planner first tries to hold every block ``R`` times (R = replication, at
   most the node count), then ``R - 1`` times, …, down to once: a round is held once when it
   cannot be held twice. ``c`` copies are tried only if they fit the stack's total budget.
2. **Block count.** For ``c`` copies it starts at the count whose blocks are at most
   :data:`~flstore_core.data.blocks.BLOCK_SHARE` of a budget
   (:func:`~flstore_core.data.blocks.blocks_needed`, the layout of every round that packed
   before) and cuts finer (counts growing by :data:`COUNT_STEP`) until the blocks pack, up to
   :data:`MAX_BLOCKS_PER_NODE` blocks a node.
3. **Placement: worst-fit decreasing.** Blocks, largest first, copy level by copy level, each go
   to the node with the most room left that does not hold a copy of that block yet (ties by
   the round's rendezvous ranking, so rounds spread differently). This balances the nodes
   (every node works on a scattered request) and, being an any-fit rule, always succeeds
   once every block is at most ``budget − c·F/(N − c + 1)`` (F the footprint, N nodes): a
   copy that fits nowhere would mean the ``N − c + 1`` nodes that may take it hold more than
   ``budget − block`` each, more than the ``c·F`` there is. With blocks at most 1.2 ideal
   widths, :data:`MAX_BLOCKS_PER_NODE` blocks a node reach that bound for one copy of any
   round up to 93% of the stack's total budget (``N × budget``), so every round of at most
   90% gets a layout.
4. **Replicas where room remains.** Copies past the ``c`` that packed are then added per
   block, same rule, where a node still has room: some blocks may be held twice and others
   once.

A round no placement can hold — larger than the stack, a block larger than a node, or no cut
that packs — raises :class:`NoLayoutError` (503), naming the round's size and the node budget,
before any node is invoked: no node is sent a shard it cannot hold.

A node that is not an owner of a block may still serve it when the owners fail (it loads the
block from S3), but only if the plan leaves it room for it.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from flstore_core.data.blocks import (
    block_ranges,
    blocks_needed,
    column_bytes,
    footprint,
)
from flstore_core.data.codec import TensorSpec
from flstore_core.errors import UnavailableError
from flstore_core.routing.placement import ShardKey, block_shard, rank_nodes, round_shard

MiB = 1024 * 1024
# the finest cut the planner tries: blocks a node holds on average. 16 reaches the any-fit
# bound of the module docstring for one copy of a round up to 93% of the stack's budget
MAX_BLOCKS_PER_NODE = 16
# block counts tried grow by this factor (at least one): ~40 tries from a quarter-budget cut
# to the finest, each a cut and a placement of at most a few thousand blocks
COUNT_STEP = 1.08


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

    def node_bytes(self) -> dict[int, int]:
        """Bytes of this round each node holding some of it holds (every copy counted)."""
        out: dict[int, int] = {}
        for block in self.blocks:
            for node in block.owners:
                out[node] = out.get(node, 0) + block.nbytes
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
            "node_mb": {str(n): round(b / MiB, 1) for n, b in sorted(self.node_bytes().items())},
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
    specs = tuple(specs)
    n_params = sum(s.numel for s in specs)
    count = blocks_needed(n_clients, n_params, budget)
    if blocks is not None:
        if blocks < 1:
            raise ValueError(f"a round has at least one block, not {blocks}")
        count = max(count, min(blocks, n_params))
    need = footprint(n_clients, n_params)
    replicas = max(1, min(replication, nodes))
    if count == 1:
        key = block_shard(job, round_, 0, 1)
        columns = (0, n_params)
        nbytes = n_params * column_bytes(n_clients)
        if nbytes > budget:  # only a forced single block of a round larger than a node
            raise _refusal(job, round_, need, nodes, budget, "one block is larger than a node")
        ranked = rank_nodes(key, nodes)
        block = BlockPlan(key, columns, nbytes, tuple(ranked[:replicas]), tuple(ranked[replicas:]))
        return RoundPlan(job, round_, n_clients, n_params, budget, (block,))
    if need > nodes * budget:
        raise _refusal(
            job, round_, need, nodes, budget, "it is larger than all the nodes' budgets together"
        )
    packed = _pack(job, round_, specs, n_clients, nodes, replicas, budget, count)
    if packed is None:
        raise _refusal(
            job,
            round_,
            need,
            nodes,
            budget,
            f"no cut into {count} to {_finest(count, nodes, n_params)} blocks packs into the "
            f"nodes: the round is {need / (nodes * budget):.0%} of their budgets together",
        )
    ranges, owners = packed
    count = len(ranges)
    sizes = [(b - a) * column_bytes(n_clients) for a, b in ranges]
    load = [0] * nodes
    for i, held in enumerate(owners):
        for node in held:
            load[node] += sizes[i]
    placed = []
    for i in range(count):
        key = block_shard(job, round_, i, count)
        room = [
            n for n in rank_nodes(key, nodes) if n not in owners[i] and load[n] + sizes[i] <= budget
        ]
        placed.append(BlockPlan(key, ranges[i], sizes[i], owners[i], tuple(room)))
    return RoundPlan(job, round_, n_clients, n_params, budget, tuple(placed))


Ranges = tuple[tuple[int, int], ...]


def _finest(first: int, nodes: int, n_params: int) -> int:
    """The largest block count tried (:data:`MAX_BLOCKS_PER_NODE`)."""
    return min(n_params, max(first, MAX_BLOCKS_PER_NODE * nodes))


def _counts(first: int, last: int) -> Iterator[int]:
    """Block counts to try, ``first`` to ``last`` growing by :data:`COUNT_STEP`."""
    count = first
    while count < last:
        yield count
        count = max(count + 1, math.ceil(count * COUNT_STEP))
    yield last


@functools.lru_cache(maxsize=512)
def _pack(
    job: str,
    round_: int,
    specs: tuple[TensorSpec, ...],
    n_clients: int,
    nodes: int,
    replicas: int,
    budget: int,
    first: int,
) -> tuple[Ranges, tuple[tuple[int, ...], ...]] | None:
    """The cut and the owners of every block (policy in the module docstring), or ``None``.

    Cached: the router plans a round on every request and the search cuts it several times.
    """
    n_params = sum(s.numel for s in specs)
    per_column = column_bytes(n_clients)
    need = per_column * n_params
    tie = rank_nodes(round_shard(job, round_), nodes)
    for copies in range(replicas, 0, -1):
        if copies * need > nodes * budget:
            continue
        # any-fit succeeds once every block is at most this (module docstring)
        bound = budget - copies * need / (nodes - copies + 1)
        for count in _counts(first, _finest(first, nodes, n_params)):
            ranges = block_ranges(specs, count)
            sizes = [(b - a) * per_column for a, b in ranges]
            if max(sizes) > budget:
                continue
            owners = _place(sizes, budget, copies, replicas, tie)
            if owners is not None:
                return ranges, owners
            if max(sizes) <= bound:
                break  # cannot happen by the bound; finer cuts would not help either
    return None


def _place(
    sizes: Sequence[int], budget: int, copies: int, replicas: int, tie: Sequence[int]
) -> tuple[tuple[int, ...], ...] | None:
    """Worst-fit decreasing: ``copies`` copies of every block or ``None``, then up to
    ``replicas`` where room remains."""
    load = dict.fromkeys(tie, 0)
    owners: list[list[int]] = [[] for _ in sizes]
    order = sorted(range(len(sizes)), key=lambda i: (-sizes[i], i))
    for copy in range(replicas):
        for i in order:
            room = [n for n in tie if n not in owners[i] and load[n] + sizes[i] <= budget]
            if not room:
                if copy < copies:
                    return None
                continue  # no room for this replica: the block is held fewer times
            node = min(room, key=load.__getitem__)  # most room left; ties by the ranking
            owners[i].append(node)
            load[node] += sizes[i]
    return tuple(tuple(o) for o in owners)
