"""Rendezvous placement: balance, minimal movement, replicas, determinism."""

from __future__ import annotations

import collections

import pytest

from flstore_core.routing.placement import (
    ShardKey,
    client_shard,
    place_shard,
    rank_nodes,
    round_shard,
)

KEYS = [f"job-{i % 7}/round/{i}" for i in range(10_000)]


def test_every_node_holds_within_15_percent_of_the_mean() -> None:
    counts = collections.Counter(place_shard(k, 8, 1)[0] for k in KEYS)
    mean = len(KEYS) / 8
    assert set(counts) == set(range(8))
    assert all(abs(c - mean) <= 0.15 * mean for c in counts.values()), counts


def test_replicas_are_balanced_too() -> None:
    counts = collections.Counter(n for k in KEYS for n in place_shard(k, 8, 2))
    mean = 2 * len(KEYS) / 8
    assert all(abs(c - mean) <= 0.15 * mean for c in counts.values()), counts


def test_adding_a_node_moves_at_most_1_3_over_n_of_the_keys() -> None:
    moved = sum(place_shard(k, 8, 1) != place_shard(k, 9, 1) for k in KEYS)
    assert moved / len(KEYS) <= 1.3 / 9
    # and every moved key moved to the new node
    assert all(
        place_shard(k, 9, 1) == [8] for k in KEYS if place_shard(k, 8, 1) != place_shard(k, 9, 1)
    )


def test_losing_a_node_keeps_every_shard_on_a_live_replica() -> None:
    for k in KEYS[:2000]:
        primary, replica = place_shard(k, 8, 2)
        survivors = [n for n in rank_nodes(k, 8) if n != primary]
        assert survivors[0] == replica


def test_replicas_are_distinct_and_capped_by_the_node_count() -> None:
    assert len(set(place_shard("a/round/1", 8, 3))) == 3
    assert sorted(place_shard("a/round/1", 2, 5)) == [0, 1]


def test_placement_is_deterministic_across_calls() -> None:
    assert [place_shard(k, 8) for k in KEYS[:100]] == [place_shard(k, 8) for k in KEYS[:100]]


def test_shard_keys_parse_back() -> None:
    for key in (round_shard("j", 12), client_shard("j", "c.1")):
        assert ShardKey.parse(str(key)) == key
    with pytest.raises(ValueError):
        ShardKey.parse("j/round")


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError):
        place_shard("a", 0)
    with pytest.raises(ValueError):
        place_shard("a", 3, 0)
