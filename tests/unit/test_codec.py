"""The codec: round trips, precisions, interop with the safetensors library, hostile bytes."""

from __future__ import annotations

import contextlib
import hashlib
import json
import struct

import numpy as np
import pytest
import safetensors.numpy
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from flstore_core.data.codec import (
    CodecLimits,
    Update,
    bfloat16_bits_to_float32,
    decode_into,
    decode_update,
    decompress,
    encode_update,
    float32_to_bfloat16_bits,
    parse_safetensors,
    serialize,
)
from flstore_core.data.rawfile import read_raw_update, write_raw_update
from flstore_core.errors import CorruptUpdateError, LimitExceededError, ValidationError
from tests.conftest import small_update

ALL_DTYPES = ["<f8", "<f4", "<f2", "<i8", "<i4", "<i2", "i1", "<u8", "<u4", "<u2", "u1", "?"]


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_every_dtype_round_trips_exactly(dtype: str) -> None:
    rng = np.random.default_rng(1)
    arr = (rng.standard_normal((3, 5)) * 10).astype(dtype)
    enc = encode_update(Update({"t": arr}, num_examples=3, metrics={"loss": 0.25}))
    out = decode_update(enc.data, expected_sha256=enc.sha256)
    assert out.tensors["t"].dtype == np.dtype(dtype)
    np.testing.assert_array_equal(out.tensors["t"], arr)
    assert out.num_examples == 3 and out.metrics == {"loss": 0.25}


def test_tensor_order_is_kept() -> None:
    names = ["z", "a", "m", "b"]
    upd = Update({n: np.ones(2, np.float32) for n in names})
    assert list(decode_update(encode_update(upd).data).tensors) == names


def test_bfloat16_precision_is_within_its_error_bound() -> None:
    x = np.random.default_rng(2).standard_normal(100_000).astype(np.float32) * 3
    enc = encode_update(Update({"w": x}), "bfloat16")
    y = decode_update(enc.data).tensors["w"]
    assert y.dtype == np.float32
    # bfloat16 keeps 8 significant bits: round-to-nearest relative error <= 2^-8
    assert np.max(np.abs(y - x) / np.abs(x)) <= 2.0**-8
    assert enc.raw_bytes < x.nbytes * 0.51 + 1024


def test_float16_precision_is_within_its_error_bound() -> None:
    x = np.random.default_rng(3).uniform(-4, 4, 50_000).astype(np.float32)
    y = decode_update(encode_update(Update({"w": x}), "float16").data).tensors["w"]
    assert y.dtype == np.float32
    assert np.max(np.abs(y - x) / np.maximum(np.abs(x), 2.0**-14)) <= 2.0**-11


def test_float16_overflow_is_refused() -> None:
    with pytest.raises(ValidationError, match="overflows float16"):
        encode_update(Update({"w": np.array([1e6], np.float32)}), "float16")


def test_bfloat16_rounds_half_to_even() -> None:
    # 1 + 2^-8 is exactly between two bfloat16 values; ties go to the even mantissa (1.0)
    x = np.array([1 + 2.0**-8, 1 + 3 * 2.0**-8, -2.5], dtype=np.float32)
    y = bfloat16_bits_to_float32(float32_to_bfloat16_bits(x))
    np.testing.assert_array_equal(y, np.array([1.0, 1 + 2 * 2.0**-7, -2.5], np.float32))


def test_non_float_tensors_keep_their_dtype_under_reduced_precision() -> None:
    upd = small_update(4)
    out = decode_update(encode_update(upd, "bfloat16").data)
    assert out.tensors["bn.num_batches_tracked"].dtype == np.int64
    assert int(out.tensors["bn.num_batches_tracked"]) == 4


def test_our_files_load_with_the_safetensors_library() -> None:
    upd = small_update(1, job="j", round=2, client="c")
    raw = serialize(upd)
    loaded = safetensors.numpy.load(raw)
    for name, arr in upd.tensors.items():
        np.testing.assert_array_equal(loaded[name], arr)


def test_files_of_the_safetensors_library_parse() -> None:
    tensors = {"b": np.arange(6, dtype=np.float32).reshape(2, 3), "a": np.arange(3, dtype=np.int64)}
    raw = safetensors.numpy.save(tensors, metadata={"job": "j", "num_examples": "5"})
    upd = parse_safetensors(raw)
    assert upd.num_examples == 5 and upd.job == "j"
    for name, arr in tensors.items():
        np.testing.assert_array_equal(upd.tensors[name], arr)


def test_checksum_mismatch_is_detected() -> None:
    enc = encode_update(small_update())
    with pytest.raises(CorruptUpdateError, match="checksum"):
        decode_update(enc.data, expected_sha256="0" * 64)


def test_truncated_frame_is_rejected() -> None:
    enc = encode_update(small_update())
    with pytest.raises(CorruptUpdateError):
        decode_update(enc.data[: len(enc.data) // 2])


def test_wrong_magic_is_rejected() -> None:
    enc = encode_update(small_update())
    with pytest.raises(CorruptUpdateError):
        decode_update(b"\x00\x01\x02\x03" + enc.data[4:])


def test_non_safetensors_content_is_rejected() -> None:
    blob = zstandard.ZstdCompressor().compress(b"\x80\x04 this is a pickle, not safetensors")
    with pytest.raises(CorruptUpdateError, match="not a safetensors file"):
        decode_update(blob)


def _with_header(header: dict[str, object], data: bytes) -> bytes:
    head = json.dumps(header).encode()
    return struct.pack("<Q", len(head)) + head + data


def test_header_length_pointing_outside_the_buffer_is_rejected() -> None:
    raw = serialize(small_update())
    lying = struct.pack("<Q", len(raw) * 4) + raw[8:]
    with pytest.raises(CorruptUpdateError, match="outside"):
        parse_safetensors(lying)


def test_data_offsets_pointing_outside_the_buffer_are_rejected() -> None:
    raw = _with_header({"t": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8)
    with pytest.raises(CorruptUpdateError, match="outside"):
        parse_safetensors(raw)


def test_offsets_that_disagree_with_the_shape_are_rejected() -> None:
    raw = _with_header({"t": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}, b"\0" * 8)
    with pytest.raises(CorruptUpdateError, match="do not match"):
        parse_safetensors(raw)


def test_overlapping_tensors_are_rejected() -> None:
    header = {
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
    }
    with pytest.raises(CorruptUpdateError, match="overlap"):
        parse_safetensors(_with_header(header, b"\0" * 12))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_values_are_rejected_naming_client_and_tensor(bad: float) -> None:
    upd = small_update(client="c9", round=0, job="j")
    upd.tensors["fc.bias"][3] = bad
    with pytest.raises(CorruptUpdateError, match=r"client 'c9'.*fc\.bias"):
        encode_update(upd)
    enc = encode_update(upd, allow_nonfinite=True)
    with pytest.raises(CorruptUpdateError, match=r"fc\.bias"):
        decode_update(enc.data)
    assert np.isnan(
        decode_update(enc.data, limits=CodecLimits(allow_nonfinite=True)).tensors["fc.bias"][3]
    ) == np.isnan(bad)


def test_tensor_and_file_caps_are_enforced() -> None:
    enc = encode_update(Update({"t": np.zeros(1000, np.float32)}))
    with pytest.raises(LimitExceededError):
        decode_update(enc.data, limits=CodecLimits(max_tensor_bytes=1000))
    with pytest.raises(LimitExceededError):
        decode_update(enc.data, limits=CodecLimits(max_file_bytes=2000))


def test_decompress_refuses_a_frame_without_size_that_grows_past_the_cap() -> None:
    cobj = zstandard.ZstdCompressor().compressobj()
    blob = cobj.compress(b"\0" * 100_000) + cobj.flush()
    with pytest.raises((LimitExceededError, CorruptUpdateError)):
        decompress(blob, CodecLimits(max_file_bytes=10_000))


def test_decode_into_fills_the_row_and_verifies() -> None:
    upd = small_update(5)
    enc = encode_update(upd)
    specs = enc.specs
    n = sum(s.numel for s in specs)
    row = np.empty(n, np.float32)
    info = decode_into(enc.data, row, specs, expected_sha256=enc.sha256)
    expect = np.concatenate([np.asarray(a, np.float32).reshape(-1) for a in upd.tensors.values()])
    np.testing.assert_array_equal(row, expect)
    assert info.sha256 == enc.sha256
    assert info.sq_norm == pytest.approx(float(np.dot(expect, expect)), rel=1e-6)


def test_decode_into_takes_the_direct_path_for_float32_updates() -> None:
    upd = Update({"a": np.arange(10, dtype=np.float32), "b": np.ones((2, 3), np.float32)})
    enc = encode_update(upd)
    row = np.empty(16, np.float32)
    info = decode_into(enc.data, row, enc.specs, expected_sha256=enc.sha256)
    assert info.raw_bytes == enc.raw_bytes
    np.testing.assert_array_equal(row[:10], np.arange(10))
    with pytest.raises(CorruptUpdateError, match="checksum"):
        decode_into(enc.data, row, enc.specs, expected_sha256=hashlib.sha256(b"x").hexdigest())


def test_raw_update_file_round_trips(tmp_path) -> None:  # type: ignore[no-untyped-def]
    upd = small_update(2, job="j", round=4, client="c2")
    path = str(tmp_path / "u.safetensors")
    write_raw_update(upd, path)
    back = read_raw_update(path)
    assert (back.job, back.round, back.client, back.kind) == ("j", 4, "c2", "update")
    assert back.num_examples == upd.num_examples and back.metrics == upd.metrics
    with open(path, "rb") as fh:
        raw = fh.read()
    header = json.loads(raw[8 : 8 + struct.unpack("<Q", raw[:8])[0]])
    assert header["__metadata__"]["num_examples"] == str(upd.num_examples)
    assert json.loads(header["__metadata__"]["metrics"]) == upd.metrics


@pytest.mark.parametrize(
    "meta",
    [
        {"round": 1, "client": "c"},
        {"job": "j", "client": "c"},
        {"job": "j", "round": 1, "client": "c", "kind": "global"},
        {"job": "j", "round": 1, "kind": "initial"},
    ],
)
def test_raw_update_files_need_their_identity(meta: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        write_raw_update(small_update(**meta))


@settings(max_examples=40, deadline=None)
@given(
    arrays=st.lists(
        hnp.arrays(
            dtype=st.sampled_from([np.float32, np.float64, np.int32, np.int64, np.uint8]),
            shape=hnp.array_shapes(min_dims=0, max_dims=3, max_side=5),
            elements={"allow_nan": False, "allow_infinity": False},
        ),
        min_size=1,
        max_size=4,
    )
)
def test_any_finite_update_round_trips(arrays: list[np.ndarray]) -> None:
    upd = Update({f"t{i}": a for i, a in enumerate(arrays)}, num_examples=1)
    out = decode_update(encode_update(upd).data)
    for name, arr in upd.tensors.items():
        np.testing.assert_array_equal(out.tensors[name], arr)
        assert out.tensors[name].shape == arr.shape


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_crash_the_parser(blob: bytes) -> None:
    with contextlib.suppress(CorruptUpdateError, LimitExceededError):
        parse_safetensors(blob)
