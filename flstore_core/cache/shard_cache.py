"""The in-memory shard cache of a cache node, with the class policies of ARCHITECTURE §3.

Built on :class:`cachetools.Cache` (size accounting by bytes, eviction through ``popitem``). The
cache owns the mechanics — the byte budget, the pins of entries in use by a running request, the
last-use clock, loading a missing shard once — and asks its eviction policy
(:mod:`flstore_core.cache.eviction`; by default the class tiers moved by each job's observed
requests, :class:`~flstore_core.cache.job_policy.JobFollowingEviction`) which entry to give
up when it is full. Pinned entries are never chosen. With a policy that weighs representations
(a :class:`~flstore_core.cache.eviction.RepresentationObserver`, as the default is), a victim
that holds rows it can give up (a round: ``rows_nbytes`` > 0 and ``drop_rows()``) gives up
only those and stays, smaller; a generic policy evicts whole entries.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import cachetools

from flstore_core.cache.eviction import EvictionPolicy, RepresentationObserver
from flstore_core.cache.job_mix import Use
from flstore_core.cache.job_policy import JobFollowingEviction, RequestObserver
from flstore_core.cache.policies import AccessObserver
from flstore_core.routing.placement import ShardKey


class Sized(Protocol):
    @property
    def nbytes(self) -> int: ...


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    loads: int = 0
    evictions: int = 0
    uncacheable: int = 0  # loaded but larger than the free budget: served, not kept
    rows_dropped: int = 0  # rounds that gave up their rows and stayed, rowless
    rows_reloaded: int = 0  # rowless rounds whose rows a request read again
    rowless_answers: int = 0  # requests a rowless round answered with no S3 read

    def to_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


class _PolicyCache(cachetools.Cache[ShardKey, Any]):
    """A cachetools cache whose ``popitem`` asks its owner for the victim."""

    def __init__(self, maxsize: int, owner: ShardCache) -> None:
        super().__init__(maxsize=maxsize, getsizeof=lambda v: max(int(v.nbytes), 1))
        self._owner = owner

    def __setitem__(self, key: ShardKey, value: Any) -> None:
        # bytes reserved outside the cache (a node's staged updates) are room no entry has
        size = self.getsizeof(value)
        if size + self._owner.reserved > self.maxsize:
            raise ValueError("value too large")
        while self.currsize + self._owner.reserved + size - self._held_size(key) > self.maxsize:
            self.popitem()
        super().__setitem__(key, value)

    def _held_size(self, key: ShardKey) -> int:
        if key not in self:
            return 0
        return int(self.getsizeof(cachetools.Cache.__getitem__(self, key)))

    def popitem(self) -> tuple[ShardKey, Any]:
        key = self._owner.victim()
        if key is None:
            raise KeyError("nothing evictable: every entry is pinned or protected")
        value = self[key]
        if self._owner.sheds(value):
            value.drop_rows()
            # the same key, smaller: cachetools takes the size difference off its total
            cachetools.Cache.__setitem__(self, key, value)
            self._owner.stats.rows_dropped += 1
            self._owner.observe_represented(key, value)
            return key, value
        value = self.pop(key)
        self._owner.stats.evictions += 1
        self._owner.observe_removed(key)
        return key, value


class ShardCache:
    """Shards held in memory under a byte budget.

    ``hot_rounds`` configures the default policy (:class:`JobFollowingEviction`, at least 1);
    it is not used when a ``policy`` is given (:mod:`flstore_core.cache.policies` has the
    generic ones; one that is an :class:`AccessObserver` is told of every use and removal).
    """

    def __init__(
        self, budget_bytes: int, hot_rounds: int = 2, *, policy: EvictionPolicy | None = None
    ) -> None:
        if budget_bytes <= 0:
            raise ValueError("the cache budget must be positive")
        self.policy: EvictionPolicy = (
            policy if policy is not None else JobFollowingEviction(max(1, hot_rounds))
        )
        # checked once: a runtime protocol check costs microseconds on every get
        self._observer = self.policy if isinstance(self.policy, AccessObserver) else None
        self._tiers = self.policy if isinstance(self.policy, RepresentationObserver) else None
        self._requests = self.policy if isinstance(self.policy, RequestObserver) else None
        self.stats = CacheStats()
        self._cache = _PolicyCache(budget_bytes, self)
        self._pins: dict[ShardKey, int] = {}
        self._used: dict[ShardKey, int] = {}
        self._clock = itertools.count()
        self._lock = threading.RLock()
        self._loading: dict[ShardKey, threading.Lock] = {}
        self.reserved = 0  # bytes held outside the cache and counted against its budget

    def reserve(self, nbytes: int) -> bool:
        """Count ``nbytes`` held outside the cache (a node's staged updates) against the
        budget, evicting as for a new entry to make room; ``False`` (nothing reserved) when
        they cannot fit with every pinned entry kept."""
        with self._lock:
            if self.reserved + nbytes > self.budget:
                return False
            try:
                while self.bytes_held + self.reserved + nbytes > self.budget:
                    self._cache.popitem()
            except KeyError:  # every entry left is pinned
                return False
            self.reserved += nbytes
            return True

    def release(self, nbytes: int) -> None:
        """Give back ``nbytes`` of a :meth:`reserve`."""
        with self._lock:
            self.reserved = max(0, self.reserved - nbytes)

    # ------------------------------------------------------------------ policy

    def observe_access(self, key: ShardKey, value: Any) -> None:
        """Tell a policy that keeps its own state (frequencies, sizes) of a use of ``key``."""
        if self._observer is not None:
            self._observer.accessed(key, int(self._cache.getsizeof(value)))

    def observe_represented(self, key: ShardKey, value: Any) -> None:
        """Tell a policy that weighs representations what ``key`` holds now."""
        if self._tiers is not None:
            rows = int(getattr(value, "rows_nbytes", 0))
            self._tiers.represented(key, int(self._cache.getsizeof(value)), rows)

    def sheds(self, value: Any) -> bool:
        """Whether evicting ``value`` drops only its rows (the policy weighs representations
        and the value holds rows whose dropping frees bytes)."""
        return self._tiers is not None and int(getattr(value, "rows_nbytes", 0)) > 0

    def observe_request(self, use: Use) -> None:
        """Tell a policy that follows each job's requests of one request answered."""
        if self._requests is not None:
            with self._lock:
                self._requests.requested(use)

    def observe_removed(self, key: ShardKey) -> None:
        """Tell a policy that keeps its own state that ``key`` left the cache."""
        if self._observer is not None:
            self._observer.removed(key)

    def victim(self) -> ShardKey | None:
        """The entry to evict next, as the policy decides, or ``None`` if every entry is pinned."""
        pinned = {key for key, count in self._pins.items() if count}
        return self.policy.victim(list(self._cache), pinned, self._used)

    # ------------------------------------------------------------------ access

    def get(self, key: ShardKey) -> Any | None:
        with self._lock:
            value = self._cache.get(key)
            if value is not None:
                self._used[key] = next(self._clock)
                self.observe_access(key, value)
                self.observe_represented(key, value)
            return value

    def __contains__(self, key: ShardKey) -> bool:
        with self._lock:
            return key in self._cache

    def shard_keys(self) -> list[ShardKey]:
        with self._lock:
            return list(self._cache)

    @property
    def bytes_held(self) -> int:
        return int(self._cache.currsize)

    @property
    def budget(self) -> int:
        return int(self._cache.maxsize)

    def items(self) -> list[tuple[ShardKey, Any]]:
        """The entries held, with their values."""
        with self._lock:
            return list(self._cache.items())

    def put(self, key: ShardKey, value: Sized) -> bool:
        """Insert ``value`` (or re-account a held one whose size changed); returns False if it
        cannot fit: a new value is then not kept, and a held one keeps its former size."""
        with self._lock:
            try:
                self._cache[key] = value
            except (ValueError, KeyError):  # too large for the budget, or all else pinned
                self.stats.uncacheable += 1
                return False
            self._used[key] = next(self._clock)
            self.observe_access(key, value)
            self.observe_represented(key, value)
            return True

    def evict(self, key: ShardKey) -> bool:
        """Drop ``key`` unless it is pinned; returns whether it was dropped."""
        with self._lock:
            if self._pins.get(key) or key not in self._cache:
                return False
            del self._cache[key]
            self._used.pop(key, None)
            self.stats.evictions += 1
            self.observe_removed(key)
            return True

    def gate(self, key: ShardKey) -> threading.Lock:
        """The lock that makes concurrent loads of ``key`` (whole, or its rows read back) one."""
        with self._lock:
            return self._loading.setdefault(key, threading.Lock())

    @contextmanager
    def using(self, key: ShardKey, load: Callable[[], Sized]) -> Iterator[tuple[Any, bool]]:
        """Yield ``(value, hit)`` pinned for the duration of the block, loading on a miss.

        Concurrent misses of the same key load it once.
        """
        with self._lock:
            self._pins[key] = self._pins.get(key, 0) + 1
            gate = self._loading.setdefault(key, threading.Lock())
        try:
            value = self.get(key)
            hit = value is not None
            if value is None:
                with gate:
                    value = self.get(key)
                    hit = value is not None
                    if value is None:
                        value = load()
                        with self._lock:
                            self.stats.loads += 1
                        self.put(key, value)
            with self._lock:
                if hit:
                    self.stats.hits += 1
                else:
                    self.stats.misses += 1
            yield value, hit
        finally:
            with self._lock:
                self._pins[key] -= 1
                if not self._pins[key]:
                    del self._pins[key]
