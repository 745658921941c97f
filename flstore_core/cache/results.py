"""What a ``round``-class workload run answers, and the model results it stores in ``results/``.

Cache nodes and the aggregator baselines run round workloads through
:func:`run_round_workload`, so both answer the same JSON and write a model result to the same
deterministic key (:func:`result_key`): the same request writes the same object, whichever
system ran it and however often.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from flstore_core.cache.round_data import RoundData
from flstore_core.data import layout
from flstore_core.data.codec import (
    TensorSpec,
    Update,
    compress_frame,
    dtype_name,
    header_prefix,
    np_dtype,
    tensor_bytes,
    update_metadata,
)
from flstore_core.storage.object_store import ObjectStore
from flstore_core.workloads import Workload, WorkloadResult

# zstd level of a model result. Dense float32 weights barely compress (the exponent bytes are
# the only redundancy): on a ResNet-18 state dict (44.7 MB) level 1 gains 8.7% in 120-175 ms and
# readers decompress it in 130-140 ms; level -5 stores it nearly raw (ratio 1.0002-1.0015) in
# 25-55 ms and decompresses in 22-44 ms — the compression saves more time than uploading 8%
# more bytes costs at S3 PUT throughput (~3.7 MB, 40-70 ms at 50-100 MB/s), and every reader
# gains ~100 ms. Levels below -5 measured no faster. A result is one zstd frame: it has no
# manifest to index frames by, and no checksum to compute (nothing records one).
RESULT_LEVEL = -5


def result_key(workload: str, data: RoundData, params: dict[str, Any]) -> str:
    """Deterministic key of a model result: the same request writes the same object."""
    ident = json.dumps(
        {"params": params, "clients": data.sha256 or data.clients}, sort_keys=True
    ).encode()
    digest = hashlib.sha256(ident).hexdigest()[:16]
    return f"{layout.results_prefix(data.job, workload, data.round)}{digest}.safetensors.zst"


def result_specs(specs: tuple[TensorSpec, ...]) -> tuple[TensorSpec, ...]:
    """The tensors of a model result of a round with these tensors, as stored: each in the
    dtype :func:`~flstore_core.data.rows.unflatten` gives it (bfloat16 sources widen to
    float32), written at float32 precision."""
    return tuple(TensorSpec(s.name, dtype_name(np_dtype(s.dtype)), s.shape) for s in specs)


def result_update(workload: str, data: RoundData, tensors: dict[str, Any]) -> Update:
    """The update a model result is stored as (its metadata names the workload and round)."""
    return Update(
        tensors,
        num_examples=int(data.num_examples.sum()),
        metrics={"workload": workload},
        job=data.job,
        round=data.round,
        kind="global",
    )


def result_metadata(workload: str, data: RoundData) -> dict[str, str]:
    """The safetensors metadata of a model result of ``workload`` on ``data``: what a result
    written in parts puts in its header (:func:`store_model` writes the same)."""
    return update_metadata(result_update(workload, data, {}))


def store_model(
    store: ObjectStore,
    workload: str,
    data: RoundData,
    params: dict[str, Any],
    model: Any,
    written: set[str] | None = None,
) -> str:
    """Write a model result in the canonical update format; returns its key.

    Encoded as one zstd frame at :data:`RESULT_LEVEL`, without the checksum and frame index a
    stored client update carries (``encode_update``): nothing reads a result by frames or
    records its digest, and hashing 46 MB twice cost ~50 ms of a ResNet-18 krum request.

    The key is a function of the workload, its params and the round's content, so the object
    is the same every time: a caller that remembers what it wrote (``written``) skips the
    encode-and-PUT of a model that is already in S3.
    """
    key = result_key(workload, data, params)
    if written is not None and key in written:
        return key
    if callable(model):
        model = model()
    # the bytes serialize() writes for the update unflatten() makes of the vector, built as the
    # sharded path builds them (one copy of the vector, not unflatten's tensors and their join:
    # 73 ms instead of 112 for a ResNet-18)
    specs = result_specs(data.specs)
    raw = tensor_bytes(model, specs)
    del model
    raw[:0] = header_prefix(specs, result_metadata(workload, data))
    store.put_result(key, compress_frame(raw, RESULT_LEVEL), "application/octet-stream")
    if written is not None:
        written.add(key)
    return key


def finish(
    store: ObjectStore,
    workload: Workload,
    data: RoundData,
    params: dict[str, Any],
    out: WorkloadResult,
    written: set[str] | None = None,
) -> dict[str, Any]:
    """The JSON result of a workload run, with its model (if any) stored and keyed."""
    result = dict(out.result)
    if out.model is not None:
        result["model_key"] = store_model(store, workload.name, data, params, out.model, written)
    return result


def run_round_workload(
    store: ObjectStore,
    workload: Workload,
    data: RoundData,
    params: dict[str, Any],
    written: set[str] | None = None,
) -> dict[str, Any]:
    """Run a ``round``-class workload on a round: the code path nodes and baselines share."""
    return finish(store, workload, data, params, workload.run(data, params), written)
