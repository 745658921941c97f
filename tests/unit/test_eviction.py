"""The class-tiered eviction policy on plain shard keys, without a cache around it."""

from __future__ import annotations

from collections.abc import Callable, Container, Iterable, Mapping
from dataclasses import dataclass

import pytest

from flstore_core.cache.eviction import ClassTieredEviction, EvictionTier
from flstore_core.cache.job_policy import JobFollowingEviction
from flstore_core.cache.shard_cache import ShardCache
from flstore_core.routing.placement import (
    ShardKey,
    client_shard,
    meta_shard,
    model_shard,
    round_shard,
)

NOTHING_PINNED: frozenset[ShardKey] = frozenset()


def victim(
    policy: ClassTieredEviction,
    entries: list[ShardKey],
    pinned: frozenset[ShardKey] = NOTHING_PINNED,
    last_used: dict[ShardKey, int] | None = None,
) -> ShardKey | None:
    return policy.victim(entries, pinned, last_used or {})


def test_the_tiers_are_client_rows_old_round_model_hot_round_meta() -> None:
    assert list(EvictionTier) == [
        EvictionTier.CLIENT,
        EvictionTier.OLD_ROWS,
        EvictionTier.HOT_ROWS,
        EvictionTier.OLD_ROUND,
        EvictionTier.MODEL,
        EvictionTier.HOT_ROUND,
        EvictionTier.PENDING_ROWS,
        EvictionTier.META,
    ]


def test_entries_give_way_in_tier_order() -> None:
    policy = ClassTieredEviction(hot_rounds=1)
    entries = [
        meta_shard("j"),
        round_shard("j", 5),  # hot
        model_shard("j"),
        round_shard("j", 1),  # old
        client_shard("j", "c1"),
    ]
    order = []
    while entries:
        chosen = victim(policy, entries)
        assert chosen is not None
        order.append(chosen)
        entries.remove(chosen)
    assert order == [
        client_shard("j", "c1"),
        round_shard("j", 1),
        model_shard("j"),
        round_shard("j", 5),
        meta_shard("j"),
    ]


def test_old_rounds_go_oldest_first_before_model_shards() -> None:
    policy = ClassTieredEviction(hot_rounds=2)
    entries = [model_shard("j"), *(round_shard("j", r) for r in (4, 2, 3, 1))]
    assert victim(policy, entries) == round_shard("j", 1)
    assert victim(policy, entries[:-1]) == round_shard("j", 2)


def test_hot_rounds_are_the_latest_w_of_each_job() -> None:
    policy = ClassTieredEviction(hot_rounds=2)
    entries = [round_shard("a", 7), round_shard("a", 8), round_shard("b", 1), round_shard("b", 2)]
    assert policy.hot_rounds_by_job(entries) == {"a": {7, 8}, "b": {1, 2}}
    # every round is hot in its own job: ahead of the model shard, the oldest round goes first
    assert victim(policy, [model_shard("a"), *entries]) == model_shard("a")
    assert victim(policy, entries) == round_shard("b", 1)


def test_a_newer_round_of_one_job_does_not_cool_another_job() -> None:
    policy = ClassTieredEviction(hot_rounds=1)
    entries = [round_shard("a", 1), round_shard("b", 9), round_shard("b", 8), model_shard("a")]
    # a/1 is a's latest round, b/8 is b's old round
    assert victim(policy, entries) == round_shard("b", 8)


def test_hot_rounds_count_pinned_rounds() -> None:
    policy = ClassTieredEviction(hot_rounds=1)
    entries = [round_shard("j", 1), round_shard("j", 2), model_shard("j")]
    # round 2 is pinned but still the latest: round 1 is old and goes before the model
    assert victim(policy, entries, frozenset({round_shard("j", 2)})) == round_shard("j", 1)


def client_of(i: int) -> ShardKey:
    return client_shard("j", f"c{i}")


def model_of(i: int) -> ShardKey:
    return model_shard(f"j{i}")


def meta_of(i: int) -> ShardKey:
    return meta_shard(f"j{i}")


@pytest.mark.parametrize("make", [client_of, model_of, meta_of], ids=["client", "model", "meta"])
def test_least_recently_used_goes_first_within_a_tier(make: Callable[[int], ShardKey]) -> None:
    policy = ClassTieredEviction()
    entries = [make(i) for i in range(3)]
    last_used = {entries[0]: 30, entries[1]: 10, entries[2]: 20}
    assert victim(policy, entries, last_used=last_used) == entries[1]


def test_never_used_counts_as_oldest() -> None:
    entries = [client_shard("j", "c1"), client_shard("j", "c2")]
    assert victim(ClassTieredEviction(), entries, last_used={entries[0]: 5}) == entries[1]


def test_equal_ranks_go_to_the_entry_first_in_the_cache() -> None:
    entries = [client_shard("j", "c2"), client_shard("j", "c1")]
    assert victim(ClassTieredEviction(), entries) == entries[0]


def test_pinned_entries_are_never_chosen() -> None:
    policy = ClassTieredEviction(hot_rounds=1)
    entries = [client_shard("j", "c1"), round_shard("j", 0), round_shard("j", 1), meta_shard("j")]
    pinned = frozenset(entries[:3])
    assert victim(policy, entries, pinned) == meta_shard("j")


def test_nothing_when_every_entry_is_pinned() -> None:
    entries = [client_shard("j", "c1"), meta_shard("j")]
    assert victim(ClassTieredEviction(), entries, frozenset(entries)) is None
    assert victim(ClassTieredEviction(), []) is None


def test_hot_rounds_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="hot_rounds"):
        ClassTieredEviction(hot_rounds=0)


@dataclass
class Blob:
    nbytes: int


@dataclass
class EvictNewestRound:
    """A stand-in policy: the shard cache asks whichever policy it is given."""

    asked: int = 0

    def victim(
        self,
        entries: Iterable[ShardKey],
        pinned: Container[ShardKey],
        last_used: Mapping[ShardKey, int],
    ) -> ShardKey | None:
        self.asked += 1
        return max(entries, key=lambda k: k.round)


def test_the_shard_cache_asks_its_policy() -> None:
    policy = EvictNewestRound()
    cache = ShardCache(budget_bytes=200, policy=policy)
    for r in range(3):
        cache.put(round_shard("j", r), Blob(100))
    assert policy.asked == 1
    assert sorted(k.round for k in cache.shard_keys()) == [0, 2]


def test_the_default_policy_keeps_the_clamped_hot_window() -> None:
    cache = ShardCache(budget_bytes=100, hot_rounds=0)
    assert cache.policy == JobFollowingEviction(hot_rounds=1)
    assert isinstance(cache.policy, JobFollowingEviction) and cache.policy.mix.horizon == 1
