"""Which shard a full cache node gives up first: the class policies of ARCHITECTURE §3.

A policy is one small object with one decision, :meth:`EvictionPolicy.victim`, so that the
shard cache owns the mechanics (byte accounting, pins, the last-use clock) and the policy can be
swapped and tested on plain keys. The default, :class:`ClassTieredEviction`, ranks entries by
class tier, lowest first:

* ``client`` histories are loaded on demand and cheap to rebuild: they go first, least recently
  used first;
* ``round`` shards beyond the latest ``hot_rounds`` of their job go next, oldest round first;
* then ``model`` shards, least recently used first;
* then the hot rounds themselves, oldest first;
* ``meta`` shards are tiny and wanted by every request of their job: they go only when nothing
  else is left.

Entries in use by a running request are pinned and never chosen.
"""

from __future__ import annotations

from collections.abc import Container, Iterable, Mapping
from dataclasses import dataclass
from enum import IntEnum
from typing import Protocol

from flstore_core.routing.placement import ShardKey


class EvictionTier(IntEnum):
    """The order in which shard classes give way; a lower tier is evicted first."""

    CLIENT = 0
    OLD_ROUND = 1
    MODEL = 2
    HOT_ROUND = 3
    META = 4


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


@dataclass(frozen=True)
class ClassTieredEviction:
    """Evict by class tier (:class:`EvictionTier`), then by age within the tier.

    Parameters
    ----------
    hot_rounds : int, default 2
        The latest rounds of each job (W in ARCHITECTURE §3) that stay ahead of model shards;
        older rounds of the job go right after client histories.
    """

    hot_rounds: int = 2

    def __post_init__(self) -> None:
        if self.hot_rounds < 1:
            raise ValueError(f"hot_rounds must be at least 1, not {self.hot_rounds}")

    def victim(
        self,
        entries: Iterable[ShardKey],
        pinned: Container[ShardKey],
        last_used: Mapping[ShardKey, int],
    ) -> ShardKey | None:
        """The unpinned entry of the lowest tier, oldest first; ``None`` if all are pinned.

        Which rounds are hot is decided over every entry, pinned ones included: a round in use
        is still one of its job's latest rounds.
        """
        held = list(entries)
        candidates = [k for k in held if k not in pinned]
        if not candidates:
            return None
        hot = self.hot_rounds_by_job(held)

        def rank(key: ShardKey) -> tuple[EvictionTier, int]:
            used = last_used.get(key, 0)
            if key.cls == "client":
                return (EvictionTier.CLIENT, used)
            if key.cls == "round":
                hot_now = key.round in hot[key.job]
                return (EvictionTier.HOT_ROUND if hot_now else EvictionTier.OLD_ROUND, key.round)
            if key.cls == "model":
                return (EvictionTier.MODEL, used)
            return (EvictionTier.META, used)

        # min keeps the first of equal ranks: ties go to the entry that entered the cache first
        return min(candidates, key=rank)

    def hot_rounds_by_job(self, entries: Iterable[ShardKey]) -> dict[str, set[int]]:
        """The latest ``hot_rounds`` round numbers held of each job."""
        rounds: dict[str, list[int]] = {}
        for key in entries:
            if key.cls == "round":
                rounds.setdefault(key.job, []).append(key.round)
        return {
            job: set(sorted(held, reverse=True)[: self.hot_rounds]) for job, held in rounds.items()
        }
