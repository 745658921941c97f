"""Column blocks: how a round too large for one cache node is cut (ARCHITECTURE §3).

A round is held as a ``(clients, parameters)`` float32 matrix. When that matrix, with what a
node keeps beside it, is larger than a node's cache budget, the round is split into ``count``
**column blocks** of the flattened parameter vector: block ``i`` holds columns ``[a_i, b_i)`` of
every client's row. The cut points are a pure function of the round's tensor specs and
``count`` (:func:`block_ranges`), so the router, the cache nodes and ingestion's prefetch agree
on them without storing anything: a shard key ``job/round/R/iofK`` names a block completely
given the round's committed manifest, which never changes its tensors. How many blocks a round
needs follows from its size and the stack's shape (:func:`blocks_needed` is where the planner
starts; it cuts finer until the blocks pack, :mod:`flstore_core.routing.planner`): a resized
stack gets another ``count``, hence other shard keys, and never reads a block of the old layout
as its own.

Cuts are aligned to tensor boundaries where a boundary lies near the ideal cut (within
:data:`SNAP` of a block's width), else placed inside the tensor: a ResNet's 2.4M-element
convolution may be larger than a block. Blocks are then at most ``(1 + 2·SNAP)`` times the
ideal width, which :func:`blocks_needed` allows for.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass

from flstore_core.data.codec import TensorSpec, slices_of

# a cut moves to a tensor boundary within this share of the ideal block width
SNAP = 0.1
# bytes a node keeps per column of a round, per client row and besides the rows: the row
# itself (float32), and the base, the mean artifact and a model result being written (its
# vector, its serialized bytes and their compressed frame) — 5 row-sized vectors. Measured on
# a local stack of 2 nodes of 512 MB under a 160 MiB budget holding a 20-client x 2.98M-float32
# round packed to 89% (158 MiB planned a node, 126 MiB of it rows): peak RSS rose from 65 to
# 211 MiB through prefetch (default models written), cosine_select, krum and fedavg, i.e. the
# rows plus 3.2 row-sized vectors. Kept at 5 until the heavier writers (trimmed_mean's sort
# chunks, multi_krum, model workloads) are measured the same way
ROW_BYTES = 4
EXTRA_ROWS = 5
# the planner first cuts a sharded round into blocks of at most this share of a node's budget,
# so that the placement can spread them evenly and a node holds blocks of more than one round;
# it cuts finer when these do not pack (a round near the stack's total budget)
BLOCK_SHARE = 0.25


def column_bytes(n_clients: int) -> int:
    """Bytes a node holds per column of a round of ``n_clients`` clients (see
    :data:`EXTRA_ROWS`)."""
    return ROW_BYTES * (max(n_clients, 0) + EXTRA_ROWS)


def footprint(n_clients: int, n_params: int) -> int:
    """Bytes a node needs to hold a whole round and serve it (rows, base, artifacts, a model
    result being written)."""
    return column_bytes(n_clients) * n_params


def blocks_needed(n_clients: int, n_params: int, budget_bytes: int) -> int:
    """The fewest column blocks a round is served in by nodes of ``budget_bytes``: 1 when the
    whole round fits a node, else enough blocks of at most :data:`BLOCK_SHARE` of the budget
    (widened by the snapping to tensor boundaries). The planner starts from this count."""
    if budget_bytes <= 0:
        raise ValueError("the node budget must be positive")
    if n_params <= 0 or footprint(n_clients, n_params) <= budget_bytes:
        return 1
    max_columns = max(1, int(budget_bytes * BLOCK_SHARE) // column_bytes(n_clients))
    count = math.ceil(n_params * (1 + 2 * SNAP) / max_columns)
    return max(2, min(count, n_params))


def block_ranges(specs: Sequence[TensorSpec], count: int) -> tuple[tuple[int, int], ...]:
    """The ``[a, b)`` column ranges of the ``count`` blocks of rows with these tensors.

    Cut ``k`` is ideally at ``k·P/count``; it moves to the nearest tensor boundary within
    ``SNAP·P/count`` of that, if there is one. Every block is non-empty.
    """
    total = sum(s.numel for s in specs)
    if count < 1:
        raise ValueError("a round has at least one block")
    if count > max(total, 1):
        raise ValueError(f"cannot cut {total} columns into {count} blocks")
    if count == 1:
        return ((0, total),)
    boundaries = sorted({b for _, b in slices_of(specs)} | {0})
    width = total / count
    cuts = [0]
    for k in range(1, count):
        ideal = k * width
        j = bisect.bisect_left(boundaries, ideal)
        near = [boundaries[i] for i in (j - 1, j) if 0 <= i < len(boundaries)]
        best = min(near, key=lambda b: (abs(b - ideal), b), default=None)
        cut = best if best is not None and abs(best - ideal) <= SNAP * width else round(ideal)
        cuts.append(min(max(cut, cuts[-1] + 1), total - (count - k)))
    cuts.append(total)
    return tuple((cuts[i], cuts[i + 1]) for i in range(count))


@dataclass(frozen=True)
class BlockSlice:
    """The part of one tensor that falls in a block: the tensor's index in the specs, and the
    element range ``[start, stop)`` of the (flattened) tensor, at ``offset`` in the block."""

    tensor: int
    start: int
    stop: int
    offset: int


def block_slices(specs: Sequence[TensorSpec], columns: tuple[int, int]) -> tuple[BlockSlice, ...]:
    """Which element ranges of which tensors make up the columns ``[a, b)``, in order."""
    a, b = columns
    out: list[BlockSlice] = []
    for i, (lo, hi) in enumerate(slices_of(specs)):
        start, stop = max(lo, a), min(hi, b)
        if start < stop:
            out.append(BlockSlice(i, start - lo, stop - lo, start - a))
    return tuple(out)


def block_specs(specs: Sequence[TensorSpec], columns: tuple[int, int]) -> tuple[TensorSpec, ...]:
    """Specs of the block's columns: each tensor that falls in it, whole or in part, as a flat
    tensor of the same name and dtype (the names keep the parameter/buffer split)."""
    return tuple(
        TensorSpec(specs[s.tensor].name, specs[s.tensor].dtype, (s.stop - s.start,))
        for s in block_slices(specs, columns)
    )
