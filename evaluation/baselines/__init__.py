"""The two aggregator baselines FLStore is measured against (ARCHITECTURE §8).

- ``objstore-agg``: an always-on aggregator process that fetches a request's round from S3 with
  parallel GETs, decodes it and runs the same workload code as a cache node;
- ``cache-agg``: the same aggregator fetching the round from a real Redis server.

Both answer FLStore's HTTP route and response shape, so a benchmark or a test drives all systems
through the same client. :class:`Aggregator` starts and stops one aggregator process,
:class:`RedisServer` a ``redis-server``, and :func:`populate_redis` copies a committed round into
Redis. Nothing in ``flstore_core`` imports this package: it is what FLStore is measured
against, not part of it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from evaluation.baselines.aggregator import Aggregator, AggregatorService, build_service
    from evaluation.baselines.redis_server import (
        RedisNotInstalledError,
        RedisServer,
        redis_server_binary,
    )
    from evaluation.baselines.redis_source import (
        RedisObjects,
        load_round_from,
        mirror_store,
        populate_redis,
        populate_redis_job,
    )

# Names are imported on first use: `python -m evaluation.baselines.aggregator` imports this
# package first, and an eager import of the module it is about to run would run it twice.
_HOME = {
    "Aggregator": "aggregator",
    "AggregatorService": "aggregator",
    "build_service": "aggregator",
    "RedisNotInstalledError": "redis_server",
    "RedisServer": "redis_server",
    "redis_server_binary": "redis_server",
    "RedisObjects": "redis_source",
    "load_round_from": "redis_source",
    "populate_redis": "redis_source",
    "populate_redis_job": "redis_source",
    "mirror_store": "redis_source",
}
__all__ = [
    "Aggregator",
    "AggregatorService",
    "RedisNotInstalledError",
    "RedisObjects",
    "RedisServer",
    "build_service",
    "load_round_from",
    "mirror_store",
    "populate_redis",
    "populate_redis_job",
    "redis_server_binary",
]


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOME[name]}"), name)
