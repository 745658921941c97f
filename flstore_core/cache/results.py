"""What a ``round``-class workload run answers, and the model results it stores in ``results/``.

Cache nodes and the aggregator baselines run round workloads through
:func:`run_round_workload`, so both answer the same JSON and write a model result to the same
deterministic key (:func:`result_key`): the same request writes the same object, whichever
system ran it and however often.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from typing import Any, cast

from flstore_core.cache.round_view import RoundView
from flstore_core.data import layout
from flstore_core.data.codec import (
    TensorSpec,
    Update,
    dtype_name,
    header_prefix,
    np_dtype,
    raw_frame,
    tensor_parts,
    update_metadata,
)
from flstore_core.storage.object_store import ObjectStore
from flstore_core.workloads import Workload, WorkloadResult

# A model result is one zstd frame of raw blocks (codec.raw_frame): dense float32 weights barely
# compress (the exponent bytes are the only redundancy). Measured on a ResNet-18 state dict
# (44.7 MB, 2 loaded cores, 10 interleaved runs): level -5 stored it at ratio 1.0013 for
# 54-164 ms (min-median) of tensor_bytes, header insert and compression; raw blocks write the
# header and the tensors' own memory into the frame in one copy, 25-46 ms, for 0.15% more bytes
# (~70 KB, 1 ms of PUT). Level 1 gains 8.7% in 120-175 ms. Readers decode raw blocks at memcpy
# speed. A result has no manifest to index frames by and no checksum to compute (nothing
# records one).


def result_key(workload: str, data: RoundView, params: dict[str, Any]) -> str:
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


def result_frame(vector: Any, specs: Sequence[TensorSpec], header: bytes = b"") -> bytearray:
    """``header`` then the tensor bytes of ``vector`` (:func:`tensor_parts`: float32 tensors
    straight from the vector's memory) as one zstd frame of raw blocks: a whole model result
    (``header`` its safetensors prefix), or one column block's part of it (the sharded path)."""
    return raw_frame([header, *tensor_parts(vector, specs)])


def as_body(frame: bytearray) -> bytes:
    """A frame as a PUT body, not copied: every blob store takes a bytearray (boto3 sends any
    bytes-like body; the memory store keeps ``bytes(body)``), only the annotation says bytes."""
    return cast(bytes, frame)


def result_update(workload: str, data: RoundView, tensors: dict[str, Any]) -> Update:
    """The update a model result is stored as (its metadata names the workload and round)."""
    return Update(
        tensors,
        num_examples=int(data.num_examples.sum()),
        metrics={"workload": workload},
        job=data.job,
        round=data.round,
        kind="global",
    )


def result_metadata(workload: str, data: RoundView) -> dict[str, str]:
    """The safetensors metadata of a model result of ``workload`` on ``data``: what a result
    written in parts puts in its header (:func:`store_model` writes the same)."""
    return update_metadata(result_update(workload, data, {}))


def store_model(
    store: ObjectStore,
    workload: str,
    data: RoundView,
    params: dict[str, Any],
    model: Any,
    written: set[str] | None = None,
    timing: dict[str, float] | None = None,
) -> str:
    """Write a model result in the canonical update format; returns its key.

    Encoded as one zstd frame of raw blocks (:func:`result_frame`), without the checksum and
    frame index a stored client update carries (``encode_update``): nothing reads a result by
    frames or records its digest, and hashing 46 MB twice cost ~50 ms of a ResNet-18 krum
    request.

    The key is a function of the workload, its params and the round's content, so the object
    is the same every time: a caller that remembers what it wrote (``written``) skips the
    encode-and-PUT of a model that is already in S3, and so does one that finds the object
    there (one HEAD: another replica of the round wrote it — the primary writes a round's
    default models at its prefetch), without computing a model given as a callable.
    ``timing`` (when given) receives ``write``: the milliseconds spent encoding and PUT-ting
    the model, after computing it.
    """
    key = result_key(workload, data, params)
    if written is not None and key in written:
        return key
    if written is not None and store.stat(key) is not None:
        written.add(key)
        return key
    if callable(model):
        model = model()
    t0 = time.perf_counter()
    # the bytes serialize() writes for the update unflatten() makes of the vector, built as the
    # sharded path builds them, copied once: into the frame
    specs = result_specs(data.specs)
    frame = result_frame(model, specs, header_prefix(specs, result_metadata(workload, data)))
    del model
    store.put_result(key, as_body(frame), "application/octet-stream")
    if written is not None:
        written.add(key)
    if timing is not None:
        timing["write"] = (time.perf_counter() - t0) * 1000
    return key


def finish(
    store: ObjectStore,
    workload: Workload,
    data: RoundView,
    params: dict[str, Any],
    out: WorkloadResult,
    written: set[str] | None = None,
    timing: dict[str, float] | None = None,
) -> dict[str, Any]:
    """The JSON result of a workload run, with its model (if any) stored and keyed."""
    result = dict(out.result)
    if out.model is not None:
        result["model_key"] = store_model(
            store, workload.name, data, params, out.model, written, timing
        )
    return result


def run_round_workload(
    store: ObjectStore,
    workload: Workload,
    data: RoundView,
    params: dict[str, Any],
    written: set[str] | None = None,
    timing: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Run a ``round``-class workload on a round: the code path nodes and baselines share
    (``timing``: see :func:`store_model`)."""
    return finish(store, workload, data, params, workload.run(data, params), written, timing)
