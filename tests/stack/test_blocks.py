"""Column blocks and the planner: cut points, owners, room and refusals (ARCHITECTURE §3)."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flstore_core.data.blocks import (
    BLOCK_SHARE,
    SNAP,
    block_ranges,
    block_slices,
    block_specs,
    blocks_needed,
    column_bytes,
    footprint,
)
from flstore_core.data.codec import TensorSpec, slices_of
from flstore_core.routing.placement import ShardKey, block_shard, round_shard
from flstore_core.routing.planner import NoLayoutError, plan_round
from lambdas.local_runtime.s3_server import LocalS3
from lambdas.local_runtime.stack import LocalStack, StackConfig

MiB = 1024 * 1024


def specs_of(sizes: list[int]) -> list[TensorSpec]:
    return [TensorSpec(f"t{i}", "F32", (n,)) for i, n in enumerate(sizes)]


@given(st.lists(st.integers(1, 5000), min_size=1, max_size=30), st.integers(1, 12))
@settings(max_examples=200, deadline=None)
def test_ranges_cover_the_row_in_order_and_snap_to_tensor_boundaries(
    sizes: list[int], count: int
) -> None:
    specs = specs_of(sizes)
    total = sum(sizes)
    count = min(count, total)
    ranges = block_ranges(specs, count)
    assert len(ranges) == count
    assert ranges[0][0] == 0 and ranges[-1][1] == total
    assert all(a < b for a, b in ranges)
    assert all(ranges[i][1] == ranges[i + 1][0] for i in range(count - 1))
    width = total / count
    boundaries = {b for _, b in slices_of(specs)}
    for k, (_, cut) in enumerate(ranges[:-1], start=1):
        near = [b for b in boundaries if abs(b - k * width) <= SNAP * width]
        if near:  # a boundary near the ideal cut: the cut is the nearest one
            assert cut in boundaries
            assert abs(cut - k * width) == min(abs(b - k * width) for b in near)
    # the blocks' slices rebuild every tensor exactly once
    seen: dict[int, int] = Counter()
    for columns in ranges:
        parts = block_slices(specs, columns)
        assert sum(p.stop - p.start for p in parts) == columns[1] - columns[0]
        for p in parts:
            seen[p.tensor] += p.stop - p.start
    assert [seen[i] for i in range(len(sizes))] == sizes


def test_block_specs_keep_names_and_dtypes_of_partial_tensors() -> None:
    specs = [TensorSpec("a", "F32", (2, 3)), TensorSpec("b.num_batches_tracked", "I64", ())]
    assert block_specs(specs, (4, 7)) == (
        TensorSpec("a", "F32", (2,)),
        TensorSpec("b.num_batches_tracked", "I64", (1,)),
    )


def test_a_round_that_fits_a_node_is_one_block() -> None:
    n, p = 10, 1000
    assert blocks_needed(n, p, footprint(n, p)) == 1
    assert blocks_needed(n, p, footprint(n, p) - 1) >= 2


def test_blocks_are_at_most_a_share_of_the_budget() -> None:
    n, p = 40, 2_000_000
    budget = 64 * MiB
    count = blocks_needed(n, p, budget)
    specs = specs_of([p // 7] * 7 + [p - 7 * (p // 7)])
    for a, b in block_ranges(specs, count):
        # the snapped width is at most (1 + 2·SNAP) ideal widths, which blocks_needed allows for
        assert (b - a) * column_bytes(n) <= budget * BLOCK_SHARE + 2 * column_bytes(n)


def test_block_keys_round_trip_and_a_whole_round_keeps_its_key() -> None:
    key = block_shard("job", 3, 2, 6)
    assert str(key) == "job/round/3/2of6"
    assert ShardKey.parse(str(key)) == key
    assert key.is_block and key.whole() == round_shard("job", 3)
    assert block_shard("job", 3, 0, 1) == round_shard("job", 3)
    assert str(block_shard("job", 3, 0, 1)) == "job/round/3"
    for bad in ("job/round/3/6of6", "job/round/3/x", "job/round/3/1of"):
        with pytest.raises(ValueError):
            ShardKey.parse(bad)


def test_plan_of_a_small_round_is_the_rendezvous_placement() -> None:
    from flstore_core.routing.placement import place_shard, rank_nodes

    plan = plan_round("job", 0, specs_of([100, 200]), 5, nodes=6, replication=2, budget=MiB)
    assert not plan.sharded
    (block,) = plan.blocks
    assert list(block.owners) == place_shard(round_shard("job", 0), 6, 2)
    assert block.order == rank_nodes(round_shard("job", 0), 6)


def test_plan_of_a_large_round_respects_every_budget_and_places_replicas() -> None:
    n, budget, nodes = 40, 4 * MiB, 8
    p = 3 * budget // column_bytes(n)  # three budgets' worth
    plan = plan_round(
        "job", 7, specs_of([p // 9] * 9), n, nodes=nodes, replication=2, budget=budget
    )
    assert plan.sharded
    load = Counter[int]()
    for block in plan.blocks:
        assert len(block.owners) == 2 and len(set(block.owners)) == 2
        for node in block.owners:
            load[node] += block.nbytes
        assert not set(block.fallback) & set(block.owners)
    assert max(load.values()) <= budget
    # the plan is a pure function: ingestion, the router and the nodes get the same
    again = plan_round(
        "job", 7, specs_of([p // 9] * 9), n, nodes=nodes, replication=2, budget=budget
    )
    assert again == plan


def test_plan_places_one_copy_when_replicas_do_not_fit() -> None:
    n, budget, nodes = 10, 2 * MiB, 4
    p = 3 * budget // column_bytes(n)
    plan = plan_round("j", 0, specs_of([p]), n, nodes=nodes, replication=2, budget=budget)
    assert all(len(b.owners) >= 1 for b in plan.blocks)
    assert sum(len(b.owners) for b in plan.blocks) < 2 * len(plan.blocks)


def test_a_round_no_layout_can_hold_is_refused_with_its_size_and_the_budget() -> None:
    n, budget, nodes = 10, 2 * MiB, 4
    p = 5 * budget // column_bytes(n)
    with pytest.raises(NoLayoutError) as err:
        plan_round("j", 2, specs_of([p]), n, nodes=nodes, replication=2, budget=budget)
    assert err.value.status == 503
    message = err.value.message
    assert f"{footprint(n, p) / MiB:.1f} MiB" in message and "2.0 MiB" in message
    assert "round 2" in message and math.isfinite(float(message.split(" MiB")[0].split()[-1]))


def test_plan_command_prints_the_layout_or_the_refusal() -> None:
    from typer.testing import CliRunner

    from flstore_core.cli import app

    runner = CliRunner()
    out = runner.invoke(
        app,
        [
            "plan",
            "--clients",
            "40",
            "--params",
            "2000000",
            "--nodes",
            "8",
            "--memory-mb",
            "512",
            "--cache-budget-mb",
            "64",
        ],
    )
    assert out.exit_code == 0, out.output
    text = " ".join(out.output.split())
    assert f"{footprint(40, 2_000_000) / MiB:,.1f} MiB in memory" in text
    count = blocks_needed(40, 2_000_000, 64 * MiB)
    assert f"{count} block(s)" in text
    refused = runner.invoke(
        app,
        [
            "plan",
            "--clients",
            "40",
            "--params",
            "2000000",
            "--nodes",
            "2",
            "--cache-budget-mb",
            "64",
        ],
    )
    assert refused.exit_code != 0
    assert "no layout can hold" in " ".join(refused.output.split())


def test_stats_summarises_blocks_per_round() -> None:
    from flstore_core.cli import block_summary

    shards = ["j/round/3/2of6", "j/round/3/0of6", "j/round/4", "j/meta/meta", "k/round/1/1of2"]
    assert block_summary(shards) == ["j/round 3: 0,2 of 6", "k/round 1: 1 of 2"]


# ---------------------------------------------------------------------- forced block counts


def test_a_forced_block_count_cuts_a_round_that_fits_one_node_by_the_same_rules() -> None:
    n, budget, nodes = 10, 4 * MiB, 8
    specs = specs_of([3000, 5000, 700, 9000])
    p = sum(s.numel for s in specs)
    assert footprint(n, p) <= budget  # one node holds it: one block unless forced
    assert not plan_round("j", 1, specs, n, nodes=nodes, replication=2, budget=budget).sharded
    for k in (2, 4, 8):
        plan = plan_round("j", 1, specs, n, nodes=nodes, replication=2, budget=budget, blocks=k)
        assert len(plan.blocks) == k
        # the cuts are block_ranges' for that count, the keys block keys of that count
        assert tuple(b.columns for b in plan.blocks) == block_ranges(specs, k)
        assert [b.key for b in plan.blocks] == [block_shard("j", 1, i, k) for i in range(k)]
        assert all(b.nbytes == (b.columns[1] - b.columns[0]) * column_bytes(n) for b in plan.blocks)
        # placement unchanged: both replicas fit (the whole round fits one node), on two nodes
        load = Counter[int]()
        for block in plan.blocks:
            assert len(block.owners) == 2 and len(set(block.owners)) == 2
            for node in block.owners:
                load[node] += block.nbytes
        assert max(load.values()) <= budget


def test_a_forced_count_never_lowers_the_count_a_round_needs_nor_exceeds_its_columns() -> None:
    n, budget, nodes = 40, 4 * MiB, 8
    specs = specs_of([3 * budget // column_bytes(n)])
    needed = plan_round("j", 0, specs, n, nodes=nodes, replication=2, budget=budget)
    assert len(needed.blocks) > 2
    assert plan_round("j", 0, specs, n, nodes=nodes, replication=2, budget=budget, blocks=2) == (
        needed
    )
    tiny = plan_round("j", 0, specs_of([3]), 2, nodes=4, replication=1, budget=budget, blocks=8)
    assert [b.columns for b in tiny.blocks] == [(0, 1), (1, 2), (2, 3)]
    one = plan_round("j", 0, specs_of([3]), 2, nodes=4, replication=1, budget=budget, blocks=1)
    assert one == plan_round("j", 0, specs_of([3]), 2, nodes=4, replication=1, budget=budget)
    with pytest.raises(ValueError):
        plan_round("j", 0, specs_of([3]), 2, nodes=4, replication=1, budget=budget, blocks=0)


def test_the_router_and_the_local_stack_plan_with_min_blocks() -> None:
    from flstore_core.data.codec import Update
    from flstore_core.routing.auth import TokenTable
    from flstore_core.routing.router import Router, RouterConfig
    from flstore_core.storage.memory import MemoryBlobStore
    from flstore_core.storage.object_store import ObjectStore

    store = ObjectStore("mem", blobs=MemoryBlobStore())
    tensors = {"a": np.arange(600, dtype=np.float32), "b": np.ones(400, np.float32)}
    for c in ("c0", "c1", "c2"):
        store.put_update("j", 0, c, Update(dict(tensors), num_examples=1))
    manifest = store.commit_round("j", 0)

    def router(min_blocks: int | None) -> Router:
        config = RouterConfig(nodes=4, replication=2, cache_budget_bytes=MiB, min_blocks=min_blocks)
        return Router(store, object(), TokenTable.with_tokens({}), config)  # type: ignore[arg-type]

    assert not router(None).plan_round("j", 0).sharded
    plan = router(3).plan_round("j", 0)
    assert plan == plan_round(
        "j", 0, manifest.tensors, 3, nodes=4, replication=2, budget=MiB, blocks=3
    )
    assert len(plan.blocks) == 3
    assert StackConfig().min_blocks is None


def test_a_local_stack_gives_its_router_min_blocks(s3_server: LocalS3) -> None:
    config = StackConfig(nodes=2, min_blocks=4, bucket="min-blocks", s3_endpoint=s3_server.url)
    with LocalStack(config) as stack:
        assert stack.router is not None and stack.router.config.min_blocks == 4
