"""Placement of shards on cache nodes by rendezvous (highest-random-weight) hashing.

Every shard key ranks every node by a keyed hash; the first R nodes of the ranking hold the
shard (R = replication). Adding a node moves only the shards for which the new node enters the
top R (about R/(N+1) of the placements, 1/(N+1) of the primaries), and losing a node promotes the
next node of each ranking, so a shard with a live replica is never lost. Pure functions, no I/O:
the router, ingestion's prefetch and backfill agree because they compute the same thing.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal

from flstore_core.ids import validate_client, validate_job, validate_round

ShardClass = Literal["round", "client", "model", "meta"]


@dataclass(frozen=True, order=True)
class ShardKey:
    """What a cache node holds as one unit: ``(job, round)``, ``(job, client)``, …"""

    job: str
    cls: ShardClass
    part: str  # the round number as text, the client id, "global" or "meta"

    def __str__(self) -> str:
        return f"{self.job}/{self.cls}/{self.part}"

    @property
    def round(self) -> int:
        if self.cls != "round":
            raise ValueError(f"{self} is not a round shard")
        return int(self.part)

    @classmethod
    def parse(cls, text: str) -> ShardKey:
        """Inverse of ``str()``; validates every part."""
        try:
            job, kind, part = text.split("/")
        except ValueError:
            raise ValueError(f"shard key {text!r} is not job/class/part") from None
        if kind == "round":
            return round_shard(job, int(part) if part.isdigit() else -1)
        if kind == "client":
            return client_shard(job, part)
        if kind == "model":
            return model_shard(job)
        if kind == "meta":
            return meta_shard(job)
        raise ValueError(f"shard key {text!r} has unknown class {kind!r}")


def round_shard(job: str, round_: int) -> ShardKey:
    return ShardKey(validate_job(job), "round", str(validate_round(round_)))


def client_shard(job: str, client: str) -> ShardKey:
    return ShardKey(validate_job(job), "client", validate_client(client))


def model_shard(job: str) -> ShardKey:
    return ShardKey(validate_job(job), "model", "global")


def meta_shard(job: str) -> ShardKey:
    return ShardKey(validate_job(job), "meta", "meta")


def _weight(shard: str, node: int) -> int:
    digest = hashlib.blake2b(f"{node}\x00{shard}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def rank_nodes(shard: ShardKey | str, nodes: int) -> list[int]:
    """All node indexes ``0..nodes-1`` in the shard's preference order."""
    if nodes < 1:
        raise ValueError("a cache needs at least one node")
    text = str(shard)
    return sorted(range(nodes), key=lambda n: _weight(text, n), reverse=True)


def place_shard(shard: ShardKey | str, nodes: int, replication: int = 2) -> list[int]:
    """The ``replication`` nodes that hold ``shard``, primary first."""
    if replication < 1:
        raise ValueError("replication must be at least 1")
    return rank_nodes(shard, nodes)[: min(replication, nodes)]


def node_name(prefix: str, index: int) -> str:
    """Function name of cache node ``index``: ``{prefix}-cache-{i}`` (ARCHITECTURE §3)."""
    return f"{prefix}-cache-{index}"
