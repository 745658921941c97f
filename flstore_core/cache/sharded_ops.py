"""A node's ops on a sharded round: ``partial``, ``model_part`` and ``run_clients``.

A round too large for one node is held in column blocks by several
(:mod:`flstore_core.cache.sharded`). The router asks each block holder for the Gram pieces of
its blocks (:func:`partial`) and, for a model result, to write its blocks as zstd frames
(:func:`model_part`); a per-client workload runs on a node that does not hold the round, one
client at a time from S3, with the Gram pieces the router gathered (:func:`run_clients`).
One invocation serves every block the router gives a node, one block after the other (a node
runs one invocation at a time, and holds one block's frame at a time).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from flstore_core.cache.answering import cache_state
from flstore_core.cache.results import as_body, result_frame, result_specs, store_model
from flstore_core.cache.sharded import (
    VectorExpr,
    block_parts_json,
    content_digest,
    evaluate,
    gram_piece_fetch,
    gram_piece_spill,
    parts_from_json,
)
from flstore_core.cache.streamed import StreamedRound, working_bytes
from flstore_core.data.codec import header_prefix, stored_specs
from flstore_core.errors import ValidationError
from flstore_core.protocol import ModelPartOp, PartialOp, RunClientsOp
from flstore_core.routing.placement import ShardKey, block_shard
from flstore_core.workloads import get, load_all

if TYPE_CHECKING:
    from flstore_core.cache.node import CacheNode


def block_keys(op: PartialOp | ModelPartOp) -> list[ShardKey]:
    """The shard keys of the blocks ``op`` names (a block number past the round's count is a
    caller error)."""
    try:
        return [block_shard(op.job, op.round, i, op.blocks) for i in op.indices]
    except ValueError as exc:
        raise ValidationError(str(exc)) from exc


def partial(node: CacheNode, op: PartialOp) -> dict[str, Any]:
    """The Gram pieces of each block named: of its parameters' columns, or of its buffers'."""
    keys = block_keys(op)
    gets_before = node.store.gets
    load_ms = compute_ms = 0.0
    results: list[dict[str, Any]] = []
    hits: list[bool] = []
    deltas: set[bool] = set()
    contents: set[str] = set()
    for key in keys:
        t0 = time.perf_counter()
        with node.cache.using(key, node.loader(key)) as (data, hit):
            t1 = time.perf_counter()
            # pieces past Lambda's payload limit go through S3, once per content
            spill = gram_piece_spill(node.store, key.job, key.round, data.results_written)
            parts = block_parts_json(data, op.buffers, spill)
            deltas.add(data.is_delta)
            contents.add(content_digest(data.sha256))
        load_ms += (t1 - t0) * 1000
        compute_ms += (time.perf_counter() - t1) * 1000
        hits.append(hit)
        results.append({"index": key.block, "parts": parts})
    return {
        "results": results,
        "is_delta": deltas.pop() if len(deltas) == 1 else None,
        "content": contents.pop() if len(contents) == 1 else None,
        "cache": cache_state(hits),
        "node": node.node_index,
        "timing_ms": {"load": load_ms, "compute": compute_ms},
        "s3_gets": node.store.gets - gets_before,
    }


def model_part(node: CacheNode, op: ModelPartOp) -> dict[str, Any]:
    """Each named block of a model result: the expression evaluated on the block, in the
    stored dtypes, as one zstd frame at its part key (block 0 first writes the header)."""
    keys = block_keys(op)
    load_all()  # the coordinate-wise functions the expression may name
    gets_before = node.store.gets
    load_ms = compute_ms = 0.0
    results: list[dict[str, Any]] = []
    hits: list[bool] = []
    for key, part_key in zip(keys, op.part_keys, strict=True):
        t0 = time.perf_counter()
        with node.cache.using(key, node.loader(key)) as (data, hit):
            t1 = time.perf_counter()
            vector = evaluate(dict(op.expr), data)
            block_specs = stored_specs(data.specs)
        header = b""
        if key.block == 0:
            assert op.metadata is not None  # the protocol refuses block 0 without it
            specs = node.manifests.get(key.job, key.round).tensors
            header = header_prefix(result_specs(specs), dict(op.metadata))
        frame = result_frame(vector, block_specs, header)
        del vector
        node.store.put_result(part_key, as_body(frame), "application/octet-stream")
        load_ms += (t1 - t0) * 1000
        compute_ms += (time.perf_counter() - t1) * 1000
        hits.append(hit)
        results.append({"index": key.block, "part_key": part_key, "bytes": len(frame)})
    return {
        "results": results,
        "s3_puts": len(results),
        "cache": cache_state(hits),
        "node": node.node_index,
        "timing_ms": {"load": load_ms, "compute": compute_ms},
        "s3_gets": node.store.gets - gets_before,
    }


def run_clients(node: CacheNode, op: RunClientsOp) -> dict[str, Any]:
    """A per-client model workload on a sharded round, one client at a time
    (:mod:`flstore_core.cache.streamed`): the rows read are kept while the budget this
    node's cache leaves free holds them, and dropped with the request. With ``rows``, only
    that group's scores; a model that is a mean of rows is written here whole, a
    coordinate-wise one comes back as ``model_expr`` for the block holders to write."""
    workload = get(op.workload)
    params = workload.validate(op.params)
    if op.rows is not None and workload.split is None:
        raise ValidationError(f"workload {workload.name!r} is not run in client groups")
    gets_before, puts_before = node.store.gets, node.store.puts
    t0 = time.perf_counter()
    manifest = node.manifests.get(op.job, op.round)
    if op.rows is not None and not all(0 <= r < len(manifest.clients) for r in op.rows):
        raise ValidationError(f"row indices must be below {len(manifest.clients)}")
    free = node.cache.budget - node.cache.bytes_held - working_bytes(manifest.n_params)
    fetch = gram_piece_fetch(node.store, op.job, op.round)  # pieces the router put in S3
    data = StreamedRound(
        node.store,
        manifest,
        parts_from_json(dict(op.gram), fetch),
        None if op.buffers is None else parts_from_json(dict(op.buffers), fetch),
        op.is_delta,
        capacity=free,
        context=node.context(op.job),
        stats=node.artifacts,
    )
    t1 = time.perf_counter()
    answer: dict[str, Any] = {}
    if op.rows is not None:
        assert workload.split is not None
        result = workload.split.score(data, params, list(op.rows))
    else:
        out = workload.run(data, params)
        result = dict(out.result)
        model = out.model_vector()
        if isinstance(model, VectorExpr):  # coordinate-wise: the block holders write it
            answer["model_expr"] = model.spec
        elif model is not None:
            result["model_key"] = store_model(
                node.store, workload.name, data, params, model, node.streamed_written
            )
    t2 = time.perf_counter()
    return {
        "result": result,
        **answer,
        "cache": "miss",
        "node": node.node_index,
        "rows_read": data.rows_read,
        "timing_ms": {"load": (t1 - t0) * 1000, "compute": (t2 - t1) * 1000},
        "s3_gets": node.store.gets - gets_before,
        "s3_puts": node.store.puts - puts_before,
    }
