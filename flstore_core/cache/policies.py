"""Generic eviction policies, the anchors FLStore's class tiers are measured against.

Each is an :class:`~flstore_core.cache.eviction.EvictionPolicy` (one decision, ``victim``) that
a :class:`~flstore_core.cache.shard_cache.ShardCache` takes as its ``policy``; those that need
more than the last-use clock also observe the cache (:class:`AccessObserver`):

* :class:`LRUEviction` — the least recently used entry;
* :class:`LFUEviction` — the least frequently used entry since it entered, LRU among equals;
* :class:`GDSFEviction` — GreedyDual-Size-Frequency (Cherkasova, "Improving WWW proxies
  performance with Greedy-Dual-Size-Frequency caching policy", HP Labs TR 98-69): an entry's
  priority is ``L + frequency × cost / size``, the lowest goes, and ``L`` rises to the priority
  of each victim, so entries not used since age out;
* :class:`BeladySizeEviction` — the offline reference: Belady's MIN generalised to object sizes
  by evicting the entry of largest ``next-use distance × size`` (entries never used again
  first, largest first). MIN is optimal for equal sizes; with sizes the optimum is NP-hard, and
  this rule is the usual size-aware approximation of it (it needs the future, so only a replay
  of a known trace can use it), not a proven bound.

:func:`make_policy` builds the online ones by name (``flstore``, ``flstore_static``, ``lru``,
``lfu``, ``gdsf``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Container, Iterable, Mapping
from typing import Protocol, runtime_checkable

from flstore_core.cache.eviction import ClassTieredEviction, EvictionPolicy, s3_reload_ms
from flstore_core.cache.job_policy import JobFollowingEviction
from flstore_core.routing.placement import ShardKey


@runtime_checkable
class AccessObserver(Protocol):
    """A policy that keeps state of its own about the cache's entries."""

    def accessed(self, key: ShardKey, nbytes: int) -> None:
        """``key`` (of ``nbytes``) was read from the cache or put into it."""
        ...

    def removed(self, key: ShardKey) -> None:
        """``key`` left the cache (evicted or dropped)."""
        ...


def _unpinned(entries: Iterable[ShardKey], pinned: Container[ShardKey]) -> list[ShardKey]:
    return [k for k in entries if k not in pinned]


class LRUEviction:
    """Evict the least recently used entry (never used counts as oldest)."""

    def victim(
        self,
        entries: Iterable[ShardKey],
        pinned: Container[ShardKey],
        last_used: Mapping[ShardKey, int],
    ) -> ShardKey | None:
        """The unpinned entry of the smallest last-use tick."""
        candidates = _unpinned(entries, pinned)
        return min(candidates, key=lambda k: last_used.get(k, -1), default=None)


class LFUEviction:
    """Evict the entry used least often since it entered the cache; LRU breaks ties."""

    def __init__(self) -> None:
        self.counts: dict[ShardKey, int] = {}

    def accessed(self, key: ShardKey, nbytes: int) -> None:
        """Count one use of ``key``."""
        self.counts[key] = self.counts.get(key, 0) + 1

    def removed(self, key: ShardKey) -> None:
        """An evicted entry starts again from zero when it comes back (in-cache LFU)."""
        self.counts.pop(key, None)

    def victim(
        self,
        entries: Iterable[ShardKey],
        pinned: Container[ShardKey],
        last_used: Mapping[ShardKey, int],
    ) -> ShardKey | None:
        """The unpinned entry of fewest uses, the least recent of those."""
        candidates = _unpinned(entries, pinned)
        return min(
            candidates, key=lambda k: (self.counts.get(k, 0), last_used.get(k, -1)), default=None
        )


class GDSFEviction:
    """GreedyDual-Size-Frequency: evict the lowest ``H = L + frequency × cost(size) / size``.

    Parameters
    ----------
    cost : callable, optional
        What reloading an entry of ``size`` bytes costs (e.g. its S3 read time); ``1`` for
        every entry when not given (GDSF(1), which favours small entries by size alone).
    """

    def __init__(self, cost: Callable[[int], float] | None = None) -> None:
        self.cost = cost or (lambda _size: 1.0)
        self.inflation = 0.0  # L: the priority of the last victim
        self.counts: dict[ShardKey, int] = {}
        self.sizes: dict[ShardKey, int] = {}
        self.priority: dict[ShardKey, float] = {}

    def accessed(self, key: ShardKey, nbytes: int) -> None:
        """One more use: the entry's priority is recomputed from the current ``L``."""
        self.counts[key] = self.counts.get(key, 0) + 1
        size = max(int(nbytes), 1)
        self.sizes[key] = size
        self.priority[key] = self.inflation + self.counts[key] * self.cost(size) / size

    def removed(self, key: ShardKey) -> None:
        """``L`` rises to the leaving entry's priority; its frequency is forgotten."""
        if key in self.priority:
            self.inflation = max(self.inflation, self.priority[key])
        self.counts.pop(key, None)
        self.sizes.pop(key, None)
        self.priority.pop(key, None)

    def victim(
        self,
        entries: Iterable[ShardKey],
        pinned: Container[ShardKey],
        last_used: Mapping[ShardKey, int],
    ) -> ShardKey | None:
        """The unpinned entry of lowest priority, the least recent of equals."""
        candidates = _unpinned(entries, pinned)
        return min(
            candidates,
            key=lambda k: (self.priority.get(k, self.inflation), last_used.get(k, -1)),
            default=None,
        )


class BeladySizeEviction:
    """Offline: evict the entry whose next use is farthest, weighted by its size.

    Parameters
    ----------
    next_use : callable
        ``next_use(key)``: the distance (in requests, or seconds) to the key's next use in
        the trace from the current position, ``math.inf`` if it is never used again. The
        replay moves the position; the policy only reads it.
    """

    def __init__(self, next_use: Callable[[ShardKey], float]) -> None:
        self.next_use = next_use
        self.sizes: dict[ShardKey, int] = {}

    def accessed(self, key: ShardKey, nbytes: int) -> None:
        """Remember the entry's size (the weight of its distance)."""
        self.sizes[key] = max(int(nbytes), 1)

    def removed(self, key: ShardKey) -> None:
        """Forget the entry's size."""
        self.sizes.pop(key, None)

    def victim(
        self,
        entries: Iterable[ShardKey],
        pinned: Container[ShardKey],
        last_used: Mapping[ShardKey, int],
    ) -> ShardKey | None:
        """Never used again first (largest first), then the largest distance × size."""

        def rank(key: ShardKey) -> tuple[bool, float]:
            distance = self.next_use(key)
            size = self.sizes.get(key, 1)
            return (math.isinf(distance), size if math.isinf(distance) else distance * size)

        return max(_unpinned(entries, pinned), key=rank, default=None)


ONLINE_POLICIES = ("flstore", "flstore_static", "lru", "lfu", "gdsf")


def make_policy(
    name: str, *, hot_rounds: int = 2, cost: Callable[[int], float] | None = None
) -> EvictionPolicy:
    """A fresh online policy by name: ``flstore`` (the class tiers moved by each job's
    observed requests, :class:`~flstore_core.cache.job_policy.JobFollowingEviction`, with
    ``hot_rounds``), ``flstore_static`` (the class tiers alone, :class:`ClassTieredEviction`),
    ``lru``, ``lfu`` or ``gdsf``; the FLStore ones and ``gdsf`` weigh an entry's reload
    ``cost`` (FLStore's: S3's, :func:`~flstore_core.cache.eviction.s3_reload_ms`, when not
    given)."""
    if name == "flstore":
        return JobFollowingEviction(hot_rounds, cost=cost or s3_reload_ms)
    if name == "flstore_static":
        return ClassTieredEviction(hot_rounds, cost=cost or s3_reload_ms)
    if name == "lru":
        return LRUEviction()
    if name == "lfu":
        return LFUEviction()
    if name == "gdsf":
        return GDSFEviction(cost)
    raise ValueError(f"unknown eviction policy {name!r}; known: {', '.join(ONLINE_POLICIES)}")
