"""A model result as stored (cache/results.py): the canonical update format — ``kind: global``,
the workload in its metrics, the job's tensor order, float32 — in one zstd frame of raw blocks.
Checked against the codec's own reader (decode_update), against the bytes the sharded path
assembles from parts (header_prefix + tensor_bytes), as zstd sees them, and the raw-block frame
against zstd's own decoder at the block boundaries."""

from __future__ import annotations

import numpy as np
import zstandard

from flstore_core.cache.results import (
    result_frame,
    result_metadata,
    result_specs,
    run_round_workload,
    store_model,
)
from flstore_core.cache.round_data import RoundData
from flstore_core.data.codec import (
    RAW_BLOCK_BYTES,
    TensorSpec,
    decode_update,
    header_prefix,
    raw_frame,
    raw_frame_size,
    tensor_bytes,
)
from flstore_core.data.rows import unflatten
from flstore_core.storage.memory import MemoryBlobStore
from flstore_core.storage.object_store import ObjectStore
from flstore_core.workloads import get
from tests.conftest import make_round


def test_a_result_decodes_to_the_model_and_is_the_parts_bytes_in_one_frame() -> None:
    store = ObjectStore("mem", blobs=MemoryBlobStore())
    rng = np.random.default_rng(0)
    weights = rng.standard_normal((5, 4099)).astype(np.float32)
    data = make_round(weights, num_examples=[3, 1, 4, 1, 5])
    out = run_round_workload(store, get("krum"), data, get("krum").validate({"f": 1}))
    blob = store.get_object(out["model_key"])
    chosen = int(out["selected"][0][1:])
    update = decode_update(blob)
    assert update.kind == "global" and update.metrics == {"workload": "krum"}
    assert update.num_examples == 14 and list(update.tensors) == ["w"]
    np.testing.assert_array_equal(update.tensors["w"], weights[chosen])  # krum: the row, exactly
    # one frame recording its content size, and it is the bytes the sharded path writes in parts
    params = zstandard.get_frame_parameters(blob)
    raw = zstandard.ZstdDecompressor().decompress(blob)
    assert params.content_size == len(raw)
    header = header_prefix(result_specs(data.specs), result_metadata("krum", data))
    parts = header + tensor_bytes(weights[chosen], result_specs(data.specs))
    assert raw == parts
    # stored, not compressed: 13 bytes of frame header and 3 per 128 KiB block
    assert len(blob) == raw_frame_size(len(raw)) and blob == bytes(raw_frame([raw]))
    assert blob == bytes(result_frame(weights[chosen], result_specs(data.specs), header))


def test_a_raw_frame_is_what_zstd_decodes_at_every_block_boundary() -> None:
    dec = zstandard.ZstdDecompressor()
    rng = np.random.default_rng(1)
    for n in (0, 1, RAW_BLOCK_BYTES - 1, RAW_BLOCK_BYTES, RAW_BLOCK_BYTES + 1, 3 * RAW_BLOCK_BYTES):
        data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        for cut in sorted({0, n // 3, n}):  # the parts' boundary inside a block, or at an end
            frame = bytes(raw_frame([data[:cut], memoryview(data)[cut:]]))
            assert len(frame) == raw_frame_size(n)
            assert zstandard.get_frame_parameters(frame).content_size == n
            assert dec.decompress(frame) == data
            # frames concatenate: a raw frame then a compressed one read as one stream
            tail = zstandard.ZstdCompressor().compress(b"tail")
            assert dec.decompressobj().decompress(frame + tail)[:n] == data
    # a model result with a float32 tensor bigger than a block, an integer one, a header
    specs = (TensorSpec("w", "F32", (70_000,)), TensorSpec("n", "I64", ()))
    vector = rng.standard_normal(70_001).astype(np.float32)
    vector[-1] = 7.0
    frame = bytes(result_frame(vector, specs, b"head"))
    assert dec.decompress(frame) == b"head" + bytes(tensor_bytes(vector, specs))


def test_store_model_writes_a_vector_as_its_tensors() -> None:
    store = ObjectStore("mem", blobs=MemoryBlobStore())
    data = make_round(np.arange(12, dtype=np.float32).reshape(3, 4))
    vector = np.array([0.5, -1.0, 2.25, 1e30], np.float32)
    key = store_model(store, "fedavg", data, {"x": 1}, lambda: vector)
    got = decode_update(store.get_object(key)).tensors
    want = unflatten(vector, data.specs)
    assert list(got) == list(want)
    for name, value in want.items():
        np.testing.assert_array_equal(got[name], value)


def test_a_bfloat16_jobs_result_is_float32_and_integer_tensors_are_rounded() -> None:
    """results/ hold float32 whatever the job stores (result_specs): a BF16 tensor's result is
    F32, an integer buffer the rounded mean in its dtype — what unflatten makes of the vector."""
    store = ObjectStore("mem", blobs=MemoryBlobStore())
    specs = (TensorSpec("w", "BF16", (2, 2)), TensorSpec("steps", "I64", ()))
    rows = np.array([[1.0, 2.0, 3.0, 4.0, 10.0], [2.0, 3.0, 4.0, 5.0, 11.0]], np.float32)
    data = RoundData("j", 0, ["a", "b"], rows, specs, np.array([1, 1]), [{}, {}])
    vector = np.array([1.5, 2.5, 3.5, 4.5, 10.5], np.float32)
    got = decode_update(store.get_object(store_model(store, "fedavg", data, {}, vector))).tensors
    assert got["w"].dtype == np.float32 and got["steps"].dtype == np.int64
    np.testing.assert_array_equal(got["w"], [[1.5, 2.5], [3.5, 4.5]])
    assert int(got["steps"]) == 10  # np.rint: halves to even
