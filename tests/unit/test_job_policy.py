"""The job-following policy: what a job was seen to ask (JobMix) moves its shards between the
class tiers, and a job not yet known is ranked exactly as the static tiers rank it."""

from __future__ import annotations

import random

import pytest

from flstore_core.cache.eviction import ClassTieredEviction, EvictionTier
from flstore_core.cache.job_mix import JobMix, Use
from flstore_core.cache.job_policy import JobFollowingEviction
from flstore_core.routing.placement import ShardKey, client_shard, meta_shard, model_shard
from flstore_core.routing.placement import round_shard as rs

J = "job"


def play(mix: JobMix, rounds: int, *, reads: int = 2, job: str = J, extra: tuple[Use, ...] = ()):
    """``rounds`` rounds of ``job``: each committed, read ``reads`` times for its rows and once
    for its Gram, with ``extra`` uses after each."""
    for r in range(rounds):
        mix.note_round(job, r)
        mix.observe(Use(job, "round", r, rows=False))
        for _ in range(reads):
            mix.observe(Use(job, "round", r, rows=True))
        for use in extra:
            mix.observe(use)


def test_a_job_is_followed_only_once_enough_of_it_was_seen() -> None:
    mix = JobMix(min_requests=8)
    play(mix, 2)  # 6 uses
    assert not mix.known(J)
    assert mix.asks_models(J)  # unknown: assume it may
    assert not mix.asks_clients(J)
    play(mix, 3)
    assert mix.known(J) and not mix.asks_models(J)


def test_pending_reads_are_what_earlier_rounds_got_less_what_this_one_got() -> None:
    mix = JobMix(horizon=2)
    play(mix, 6, reads=2)
    mix.note_round(J, 6)
    assert mix.expected_reads(J) == 2.0
    assert mix.pending(J, 6) == 2.0
    mix.observe(Use(J, "round", 6, rows=True))
    assert mix.pending(J, 6) == 1.0
    mix.observe(Use(J, "round", 6, rows=False))  # a Gram answer reads no rows
    assert mix.pending(J, 6) == 1.0
    mix.observe(Use(J, "round", 6, rows=True))
    assert mix.pending(J, 6) == 0.0
    assert mix.pending(J, 3) == 0.0  # past the horizon: no early read waits for it


def test_a_round_this_observer_never_held_does_not_dilute_the_expectation() -> None:
    mix = JobMix(horizon=1)
    for r in range(0, 10, 2):  # this node holds the even rounds only
        mix.note_round(J, r)
        mix.observe(Use(J, "round", r, rows=True))
    assert mix.expected_reads(J) == 1.0


def test_revisits_are_rows_reads_past_the_horizon_spread_over_the_history() -> None:
    mix = JobMix(horizon=2, window_rounds=20)
    play(mix, 11)
    assert mix.revisits(J) == 0.0
    mix.observe(Use(J, "round", 3, rows=True))
    # one late read over the 11 rounds of the window, over the 9 rounds past the horizon
    assert mix.revisits(J) == pytest.approx(1 / 11 / 9)
    mix.observe(Use(J, "round", 4, rows=False))  # a Gram answer on an old round is not one
    assert mix.revisits(J) == pytest.approx(1 / 11 / 9)


def test_the_window_forgets_old_asks() -> None:
    mix = JobMix(window_rounds=5, min_requests=4)
    play(mix, 1, extra=(Use(J, "model", model=True), Use(J, "client")))
    play(mix, 4)
    assert mix.asks_models(J) and mix.asks_clients(J)
    for r in range(4, 12):
        mix.note_round(J, r)
        mix.observe(Use(J, "round", r, rows=True))
    assert not mix.asks_models(J) and not mix.asks_clients(J)


def test_a_bad_horizon_is_refused() -> None:
    with pytest.raises(ValueError):
        JobMix(window_rounds=2, horizon=3)


def followed(hot_rounds: int = 2) -> JobFollowingEviction:
    return JobFollowingEviction(hot_rounds=hot_rounds)


def held(policy: JobFollowingEviction, key: ShardKey, nbytes: int, rows: int = 0) -> None:
    policy.accessed(key, nbytes)
    policy.represented(key, nbytes, rows)


def test_the_mix_follows_the_tiers_hot_window() -> None:
    assert followed(3).mix.horizon == 3


def test_a_job_that_asks_no_model_gives_up_its_model_shard_first() -> None:
    policy = followed()
    play(policy.mix, 5)
    old_rows, model = rs(J, 1), model_shard(J)
    held(policy, old_rows, 1000, rows=900)
    held(policy, model, 10)
    assert policy.victim([old_rows, model], set(), {}) == model
    # the static tiers keep the model past old rows
    static = ClassTieredEviction()
    static.represented(old_rows, 1000, 900)
    static.represented(model, 10, 0)
    assert static.victim([old_rows, model], set(), {}) == old_rows
    # once the job asks a model workload its model shard is kept again
    policy.requested(Use(J, "model", model=True))
    assert policy.victim([old_rows, model], set(), {}) == old_rows


def test_rows_the_next_reads_want_outlast_models_and_go_once_read() -> None:
    policy = followed()
    play(policy.mix, 5, extra=(Use(J, "model", model=True),))
    latest, model = rs(J, 5), model_shard(J)
    held(policy, latest, 1000, rows=900)
    held(policy, model, 10)
    assert policy.rank(latest, {J: {4, 5}}, {})[0] == EvictionTier.PENDING_ROWS
    assert policy.victim([latest, model], set(), {}) == model
    policy.requested(Use(J, "round", 5, rows=True))
    policy.requested(Use(J, "round", 5, rows=True))  # its aggregation ran
    assert policy.rank(latest, {J: {4, 5}}, {})[0] == EvictionTier.OLD_ROWS
    assert policy.victim([latest, model], set(), {}) == latest


def test_old_rows_of_a_job_that_never_looks_back_go_before_those_of_one_that_does() -> None:
    policy = followed()
    play(policy.mix, 10, job="a")
    play(policy.mix, 10, job="b")
    policy.requested(Use("b", "round", 2, rows=True))  # b revisits its history
    a_old, b_old = rs("a", 3), rs("b", 3)
    for key in (b_old, a_old):
        held(policy, key, 1000, rows=900)
    assert policy.victim([b_old, a_old], set(), {}) == a_old


def test_histories_are_kept_while_the_job_asks_for_them() -> None:
    policy = followed()
    history, old_rows = client_shard(J, "c1"), rs(J, 1)
    held(policy, history, 100)
    held(policy, old_rows, 1000, rows=900)
    play(policy.mix, 5)
    assert policy.victim([history, old_rows], set(), {}) == history
    policy.requested(Use(J, "client"))
    assert policy.victim([history, old_rows], set(), {}) == old_rows


def test_an_unknown_job_is_ranked_as_the_static_tiers_rank_it() -> None:
    rng = random.Random(7)
    keys = [rs(J, r) for r in range(8)] + [model_shard(J), meta_shard(J), client_shard(J, "c")]
    for _ in range(50):
        policy, static = followed(), ClassTieredEviction()
        sizes = {k: rng.randint(1, 10_000) for k in keys}
        for key in keys:
            rows = rng.choice([0, sizes[key] // 2]) if key.cls == "round" else 0
            held(policy, key, sizes[key], rows)
            static.accessed(key, sizes[key])
            static.represented(key, sizes[key], rows)
        last = {k: rng.randint(0, 100) for k in keys}
        entries = rng.sample(keys, k=rng.randint(1, len(keys)))
        pinned = set(rng.sample(entries, k=rng.randint(0, len(entries) - 1)))
        assert policy.victim(entries, pinned, last) == static.victim(entries, pinned, last)


def test_flstore_stats_shows_the_jobs_a_node_follows() -> None:
    import io

    from rich.console import Console

    from flstore_core.cache.node import CacheNode
    from flstore_core.cli.stats import print_stats
    from flstore_core.storage.memory import MemoryBlobStore
    from flstore_core.storage.object_store import ObjectStore

    node = CacheNode(ObjectStore("mem", blobs=MemoryBlobStore()), budget_bytes=10**6, node_index=0)
    assert node.stats()["followed"] == {}  # nothing seen: nothing followed
    policy = node.cache.policy
    assert isinstance(policy, JobFollowingEviction)
    play(policy.mix, 5, job="fl-a", extra=(Use("fl-a", "client"),))
    followed = node.stats()["followed"]
    assert followed == {
        "fl-a": {
            "requests": 20,
            "asks_models": False,
            "asks_clients": True,
            "expected_reads": 2.0,
            "revisits": 0.0,
        }
    }
    out = Console(file=io.StringIO(), width=80, record=True)
    print_stats([{"node": "fl-cache-0", **node.stats()}], "fl", out)
    text = out.export_text()
    assert "jobs the eviction follows" in text
    line = next(x for x in text.splitlines() if "fl-a" in x)
    assert line.split() == ["0", "fl-a", "20", "no", "yes", "2.0", "0"]
    assert max(len(x) for x in text.splitlines()) <= 80


def test_a_mix_is_read_while_other_threads_record() -> None:
    # a router records requests on many threads while a commit's prefetch asks about the job:
    # iterating a deque another thread appends to would raise
    import threading

    mix = JobMix(window_rounds=50)
    stop = threading.Event()

    def record(job: str) -> None:
        r = 0
        while not stop.is_set():
            mix.observe(Use(job, "round", r // 10, rows=r % 3 == 0, model=r % 7 == 0))
            r += 1

    threads = [threading.Thread(target=record, args=(f"j{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    try:
        for _ in range(2000):
            for i in range(4):
                mix.asks_models(f"j{i}")
                mix.revisits(f"j{i}")
            mix.summary()
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert all(mix.known(f"j{i}") for i in range(4))
