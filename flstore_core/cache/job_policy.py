"""The job-following policy: the class tiers, moved per job by what the job was seen to ask
(:class:`~flstore_core.cache.job_mix.JobMix`, ARCHITECTURE §3).

The static tiers (:class:`~flstore_core.cache.eviction.ClassTieredEviction`) assume every job
asks everything: each keeps its latest ``hot_rounds`` rounds' rows, its global models and its
histories in the same order. A job that the node has seen enough of (``JobMix.known``) is
ranked by what it asks instead:

* a round's rows that its job's next reads will want — the rows reads the job's earlier rounds
  got while they were the latest, less those this round already got (its aggregation still to
  run) — are kept last but for meta shards (``PENDING_ROWS``);
* rows no read is pending for go with the old rounds' rows (``OLD_ROWS``), valued by the chance
  that the job revisits one old round (``JobMix.revisits``: none for a job that never looks
  back), so a job that revisits its history keeps more of it than one that does not;
* the model shard of a job that asked no model workload in the window goes first (``CLIENT``),
  as do the client histories of a job that asks no client-class workload; those of a job whose
  incentives or reputations run are kept with the models (``MODEL``);
* rowless rounds and meta shards keep their static tiers.

A job not yet known is ranked by the static tiers, so a node that just started, or a job that
sends a few requests, is treated exactly as before. Within a tier the order is the static
policy's: value density, then age.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from flstore_core.cache.eviction import ClassTieredEviction, EvictionTier
from flstore_core.cache.job_mix import JobMix, Use
from flstore_core.routing.placement import ShardKey

Rank = tuple[EvictionTier, float, int]


@runtime_checkable
class RequestObserver(Protocol):
    """A policy told of every request a node answered (:class:`~flstore_core.cache.job_mix.Use`)."""

    def requested(self, use: Use) -> None:
        """One request answered."""
        ...


@dataclass
class JobFollowingEviction(ClassTieredEviction):
    """The class tiers, moved per job by its observed requests (module docstring)."""

    mix: JobMix = field(default_factory=JobMix, compare=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        # a round is early for the mix while it is hot for the tiers
        self.mix.horizon = self.hot_rounds
        self.mix.window_rounds = max(self.mix.window_rounds, self.hot_rounds)

    def requested(self, use: Use) -> None:
        """Learn one request."""
        self.mix.observe(use)

    def accessed(self, key: ShardKey, nbytes: int) -> None:
        """One more use of ``key``; a round held here tells the mix the job's latest round."""
        super().accessed(key, nbytes)
        if key.cls == "round":
            self.mix.note_round(key.job, key.round)

    def rank(
        self, key: ShardKey, hot: Mapping[str, set[int]], last_used: Mapping[ShardKey, int]
    ) -> Rank:
        """The rank a known job's mix gives ``key``, else the static tiers'."""
        followed = self.followed(key, last_used) if self.mix.known(key.job) else None
        return followed or super().rank(key, hot, last_used)

    def followed(self, key: ShardKey, last_used: Mapping[ShardKey, int]) -> Rank | None:
        """The rank a known job's request mix gives ``key``; ``None`` where it says nothing
        beyond the static tiers."""
        job, mix = key.job, self.mix
        if key.cls == "model" and not mix.asks_models(job):
            return (EvictionTier.CLIENT, 0.0, last_used.get(key, 0))
        if key.cls == "client":
            tier = EvictionTier.MODEL if mix.asks_clients(job) else EvictionTier.CLIENT
            return (tier, self.density(key, self.uses.get(key, 1)), last_used.get(key, 0))
        if key.cls != "round" or self.rows.get(key, 0) <= 0:
            return None
        pending = mix.pending(job, key.round)
        if pending is None:
            return None
        if pending > 0:
            return (EvictionTier.PENDING_ROWS, self.density(key, 1) * pending, key.round)
        # rows no early read waits for: worth what a revisit of this round would save
        return (EvictionTier.OLD_ROWS, self.density(key, 1) * mix.revisits(job), key.round)
