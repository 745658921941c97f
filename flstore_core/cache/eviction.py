"""Which shard a full cache node gives up first: the class policies of ARCHITECTURE §3.

A policy is one small object with one decision, :meth:`EvictionPolicy.victim`, so that the
shard cache owns the mechanics (byte accounting, pins, the last-use clock) and the policy can be
swapped and tested on plain keys. :class:`ClassTieredEviction` ranks entries by tier, lowest
first (the node's default, :class:`~flstore_core.cache.job_policy.JobFollowingEviction`, moves
a known job's shards between these tiers by what the job was seen to ask), and a round gives up
its *rows* before it is evicted whole (the cache drops the rows of a round the policy chooses
while it holds them, keeping its Gram, norms, distances, model artifacts and answers:
:meth:`~flstore_core.cache.round_data.RoundData.drop_rows`):

* ``client`` histories are loaded on demand and cheap to rebuild: they go first;
* the rows of rounds beyond the latest ``hot_rounds`` of their job;
* the rows of the hot rounds;
* rowless rounds beyond the hot window (their Gram and artifacts: kilobytes);
* ``model`` shards;
* rowless hot rounds;
* ``meta`` shards are tiny and wanted by every request of their job: they go only when nothing
  else is left.

The rows come first because they are the bulk of every round (ResNet-18 × 10 clients: 447 MB
of rows against a 21 KB remainder) and only the aggregation and model workloads read them,
while the Gram alone answers the selection workloads; the hot rounds' rows go before the model
shards because a model shard is small and read by every inference (measured on the replayed
trace, ``benchmarks/cache_policies.py --no-prefetch``: with models evicted before hot rounds,
inference hit 34% of requests against LRU's 91%).

Within a tier the entry of least *value density* goes first: ``uses × reload_cost(size) /
size``, where ``size`` is the bytes evicting it frees (a round's rows, or the entry), and
``reload_cost`` the time to read it back from S3 (first byte plus bytes at one connection's
rate); ``uses`` is how often a client, model or meta shard was read since it entered, and 1 for
rounds, whose tier already says whether they are expected (the latest rounds) or not. Large,
rarely read entries give way before small, frequently read ones; ties go to the oldest round,
or the least recently used entry. The policy learns sizes, uses and which rounds hold their
rows from the cache (:class:`RepresentationObserver`); an entry it knows nothing of counts as
a whole entry of unknown size, so on plain keys the order is by class and age alone.

Entries in use by a running request are pinned and never chosen.
"""

from __future__ import annotations

from collections.abc import Callable, Container, Iterable, Mapping
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Protocol, runtime_checkable

from flstore_core.routing.placement import ShardKey


class EvictionTier(IntEnum):
    """The order in which shard classes give way; a lower tier is evicted first."""

    CLIENT = 0
    OLD_ROWS = 1
    HOT_ROWS = 2
    OLD_ROUND = 3
    MODEL = 4
    HOT_ROUND = 5
    PENDING_ROWS = 6  # rows the job's next reads will want (the job-following policy only)
    META = 7


# S3's first byte and one connection's rate (lambdas/local_runtime/network.py's figures: 27 ms
# p50 small-object GET, 85-90 MB/s a connection): what reading an evicted entry back costs
RELOAD_FIRST_BYTE_MS = 27.0
RELOAD_BYTES_PER_MS = 87.5e3


def s3_reload_ms(size: int) -> float:
    """Milliseconds to read ``size`` bytes back from S3 over one connection."""
    return RELOAD_FIRST_BYTE_MS + size / RELOAD_BYTES_PER_MS


class EvictionPolicy(Protocol):
    """Anything that picks the entry a full cache evicts next."""

    def victim(
        self,
        entries: Iterable[ShardKey],
        pinned: Container[ShardKey],
        last_used: Mapping[ShardKey, int],
    ) -> ShardKey | None:
        """The entry to evict among ``entries`` not in ``pinned``, or ``None`` if there is none.

        ``last_used`` maps an entry to the tick of the cache's clock at its last use (larger is
        more recent; an entry missing from it counts as never used).
        """
        ...


@runtime_checkable
class RepresentationObserver(Protocol):
    """A policy told of each entry's uses, sizes and held rows; a shard cache with one drops a
    round's rows (keeping the rest of it) when the policy chooses a round that holds them."""

    def accessed(self, key: ShardKey, nbytes: int) -> None:
        """``key`` (of ``nbytes``) was read from the cache or put into it."""
        ...

    def removed(self, key: ShardKey) -> None:
        """``key`` left the cache."""
        ...

    def represented(self, key: ShardKey, nbytes: int, rows_nbytes: int) -> None:
        """``key`` now holds ``nbytes``, of which dropping its rows would free
        ``rows_nbytes`` (0: no rows held)."""
        ...


@dataclass
class ClassTieredEviction:
    """Evict by tier (:class:`EvictionTier`), then by value density, then by age (module
    docstring).

    Parameters
    ----------
    hot_rounds : int, default 2
        The latest rounds of each job (W in ARCHITECTURE §3) that stay ahead of model shards;
        older rounds of the job go right after client histories.
    cost : callable, optional
        Milliseconds to reload an entry of ``size`` bytes (default :func:`s3_reload_ms`).
    """

    hot_rounds: int = 2
    cost: Callable[[int], float] = field(default=s3_reload_ms, compare=False)
    sizes: dict[ShardKey, int] = field(default_factory=dict, compare=False, repr=False)
    rows: dict[ShardKey, int] = field(default_factory=dict, compare=False, repr=False)
    uses: dict[ShardKey, int] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.hot_rounds < 1:
            raise ValueError(f"hot_rounds must be at least 1, not {self.hot_rounds}")

    def accessed(self, key: ShardKey, nbytes: int) -> None:
        """One more use of ``key``."""
        self.uses[key] = self.uses.get(key, 0) + 1
        self.sizes[key] = max(int(nbytes), 1)

    def removed(self, key: ShardKey) -> None:
        """Forget ``key``."""
        for table in (self.sizes, self.rows, self.uses):
            table.pop(key, None)

    def represented(self, key: ShardKey, nbytes: int, rows_nbytes: int) -> None:
        """``key``'s size and the bytes its rows hold (0: none)."""
        self.sizes[key] = max(int(nbytes), 1)
        self.rows[key] = max(int(rows_nbytes), 0)

    def density(self, key: ShardKey, uses: int) -> float:
        """``uses × cost(size) / size`` of what evicting ``key`` frees (its rows when it holds
        them); 0 when its size is unknown."""
        size = self.rows.get(key) or self.sizes.get(key, 0)
        return uses * self.cost(size) / size if size > 0 else 0.0

    def victim(
        self,
        entries: Iterable[ShardKey],
        pinned: Container[ShardKey],
        last_used: Mapping[ShardKey, int],
    ) -> ShardKey | None:
        """The unpinned entry of the lowest tier, then of least value density, then oldest;
        ``None`` if all are pinned. A round chosen while it holds its rows gives up its rows
        only (the cache does that).

        Which rounds are hot is decided over every entry, pinned ones included: a round in use
        is still one of its job's latest rounds.
        """
        held = list(entries)
        candidates = [k for k in held if k not in pinned]
        if not candidates:
            return None
        hot = self.hot_rounds_by_job(held)
        # min keeps the first of equal ranks: ties go to the entry that entered the cache first
        return min(candidates, key=lambda key: self.rank(key, hot, last_used))

    def rank(
        self, key: ShardKey, hot: Mapping[str, set[int]], last_used: Mapping[ShardKey, int]
    ) -> tuple[EvictionTier, float, int]:
        """``(tier, value density, age)`` of ``key``: the least goes first. ``hot`` holds the
        latest ``hot_rounds`` round numbers of each job."""
        if key.cls == "round":
            hot_now = key.round in hot[key.job]
            if self.rows.get(key, 0) > 0:
                tier = EvictionTier.HOT_ROWS if hot_now else EvictionTier.OLD_ROWS
            else:
                tier = EvictionTier.HOT_ROUND if hot_now else EvictionTier.OLD_ROUND
            return (tier, self.density(key, 1), key.round)
        tier = {"client": EvictionTier.CLIENT, "model": EvictionTier.MODEL}.get(
            key.cls, EvictionTier.META
        )
        return (tier, self.density(key, self.uses.get(key, 1)), last_used.get(key, 0))

    def hot_rounds_by_job(self, entries: Iterable[ShardKey]) -> dict[str, set[int]]:
        """The latest ``hot_rounds`` round numbers held of each job."""
        rounds: dict[str, list[int]] = {}
        for key in entries:
            if key.cls == "round":
                rounds.setdefault(key.job, []).append(key.round)
        return {
            job: set(sorted(held, reverse=True)[: self.hot_rounds]) for job, held in rounds.items()
        }
