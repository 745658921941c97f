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
    # a column block of a round too large for one node: block ``block`` of ``blocks``
    # (:mod:`flstore_core.data.blocks`); a whole round is block 0 of 1
    block: int = 0
    blocks: int = 1

    def __str__(self) -> str:
        text = f"{self.job}/{self.cls}/{self.part}"
        return text if self.blocks == 1 else f"{text}/{self.block}of{self.blocks}"

    @property
    def is_block(self) -> bool:
        """Whether this is one column block of a sharded round."""
        return self.blocks > 1

    def whole(self) -> ShardKey:
        """The shard of the whole round this block belongs to (itself if not a block)."""
        return ShardKey(self.job, self.cls, self.part)

    @property
    def round(self) -> int:
        if self.cls != "round":
            raise ValueError(f"{self} is not a round shard")
        return int(self.part)

    @classmethod
    def parse(cls, text: str) -> ShardKey:
        """Inverse of ``str()``; validates every part."""
        pieces = text.split("/") if isinstance(text, str) else []
        if len(pieces) == 4 and pieces[1] == "round":
            job, kind, part, block = pieces
            index, of, count = block.partition("of")
            if not (of and index.isdigit() and count.isdigit()):
                raise ValueError(f"shard key {text!r}: a block is written iofK, e.g. 0of4")
            return block_shard(job, int(part) if part.isdigit() else -1, int(index), int(count))
        if len(pieces) != 3:
            raise ValueError(f"shard key {text!r} is not job/class/part")
        job, kind, part = pieces
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


def block_shard(job: str, round_: int, block: int, blocks: int) -> ShardKey:
    """Column block ``block`` of ``blocks`` of a round (the whole round when ``blocks`` is 1)."""
    if blocks < 1 or not 0 <= block < blocks:
        raise ValueError(f"block {block} of {blocks} does not exist")
    return ShardKey(validate_job(job), "round", str(validate_round(round_)), block, blocks)


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
