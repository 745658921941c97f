"""AWS Lambda handler of a cache node: module state is the node's cache (ARCHITECTURE §3).

A warm instance keeps :data:`NODE` between invocations, so the data stays in memory; the same
handler runs on AWS and in the local runtime.
"""

from __future__ import annotations

from typing import Any

from aws_lambda_powertools import Logger

from flstore_core.cache.node import CacheNode
from flstore_core.storage.object_store import ObjectStore

logger = Logger(service="flstore-cache-node")
NODE = CacheNode(ObjectStore())


@logger.inject_lambda_context(log_event=False)
def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    """Run one cache-node operation (:mod:`flstore_core.protocol` lists them)."""
    return NODE.handle(event)
