"""Writing the model result of a workload on a round held in column blocks.

A sharded round's model is never assembled in one function: each block holder writes its
block as one zstd frame, and the frames are joined into the result's key by S3 (a multipart
upload), so the object is the canonical format an unsharded round's result has, under the
same key (:func:`~flstore_core.cache.results.result_key`).
"""

from __future__ import annotations

import threading
from typing import Any

from flstore_core.cache.results import result_key, result_metadata
from flstore_core.cache.sharded import ShardedRound, model_expr
from flstore_core.protocol import ModelPartOp
from flstore_core.routing.planner import RoundPlan
from flstore_core.routing.scatter import BlockScatter, Scatter
from flstore_core.storage.object_store import ObjectStore


class ModelResultWriter:
    """Writes sharded rounds' model results block by block, each key at most once per router."""

    def __init__(self, store: ObjectStore, scatter: BlockScatter) -> None:
        self.store = store
        self.scatter = scatter
        self._lock = threading.Lock()
        self._written: set[str] = set()  # model results of sharded rounds already in S3

    def write(
        self,
        view: ShardedRound,
        workload: str,
        params: dict[str, Any],
        model: Any,
        plan: RoundPlan,
        scatter: Scatter,
    ) -> str:
        """Write a model result of a sharded round as one object in the canonical format: each
        block holder writes its block as one zstd frame (block 0 with the header), and the
        frames are joined into the result's key without passing through any function; the
        key is the one an unsharded round's result has (:func:`result_key`). What it costs is
        accounted to ``scatter``."""
        key = result_key(workload, view, params)
        with self._lock:
            if key in self._written:
                return key
        if self.store.stat(key) is None:
            expr = model_expr(model)
            metadata = result_metadata(workload, view)
            part_keys = [f"{key}.parts/{i:05d}" for i in range(len(plan.blocks))]

            def event(indices: list[int]) -> ModelPartOp:
                return ModelPartOp(
                    view.job,
                    view.round,
                    tuple(indices),
                    len(plan.blocks),
                    expr,
                    tuple(part_keys[i] for i in indices),
                    metadata if 0 in indices else None,
                )

            try:
                self.scatter.blocks(plan, event, scatter)
                self.store.compose_result(key, part_keys)
                # the multipart upload: its creation, one copied or uploaded part per frame at
                # most, its completion (S3 bills each as a PUT-class request)
                scatter.add_puts(len(part_keys) + 2)
            finally:
                self.store.delete_results(part_keys)
        with self._lock:
            self._written.add(key)
        return key
