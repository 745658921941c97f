"""Streaming column decode and multi-frame stored updates (ARCHITECTURE §2-§3).

A column block of a stored update, decoded by streaming (:func:`decode_columns_into`), is
bitwise the same columns of the whole row that :func:`decode_into` gives, whatever the file's
tensor order, dtypes, storage precision, frame layout and read size; the reference row is
built independently from :func:`decode_update` (a parse of the whole decompressed file, not
the streaming path). A model result written in parts (:func:`header_prefix`,
:func:`tensor_bytes`, one zstd frame each) is byte-identical, once decompressed, to the
single-frame encoding — also per the ``zstd`` command-line tool.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import shutil
import subprocess
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import safetensors.numpy
from hypothesis import given, settings
from hypothesis import strategies as st

from flstore_core.data.blocks import block_ranges, block_specs
from flstore_core.data.codec import (
    CodecLimits,
    Precision,
    TensorSpec,
    Update,
    compress_frame,
    decode_columns_into,
    decode_into,
    decode_update,
    decompress,
    encode_update,
    header_prefix,
    serialize,
    stored_specs,
    tensor_bytes,
    update_metadata,
    zstd_frames,
)
from flstore_core.data.rows import unflatten
from flstore_core.errors import CorruptUpdateError, LimitExceededError
from tests.conftest import small_update

DTYPES = ["float32", "float64", "float16", "int64", "int32", "uint8", "bool"]


@st.composite
def updates(draw: Any) -> tuple[Update, list[TensorSpec]]:
    """A random update (mixed dtypes, some empty or scalar tensors) and its canonical specs."""
    n = draw(st.integers(1, 6))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    tensors: dict[str, npt.NDArray[Any]] = {}
    for i in range(n):
        shape = tuple(draw(st.lists(st.integers(0, 5), min_size=0, max_size=3)))
        dtype = np.dtype(draw(st.sampled_from(DTYPES)))
        if dtype.kind == "f":
            arr = (rng.standard_normal(shape) * 3).astype(dtype)
        elif dtype.kind == "b":
            arr = rng.integers(0, 2, shape).astype(bool)
        else:
            arr = rng.integers(0, 200, shape).astype(dtype)
        tensors[f"layer{i}.w"] = np.asarray(arr)
    if sum(a.size for a in tensors.values()) == 0:
        tensors["bias"] = np.ones(3, np.float32)
    upd = Update(tensors, num_examples=7, metrics={"loss": 0.25}, job="j", round=1, client="c")
    return upd, upd.specs()


def _shuffled(upd: Update, seed: int) -> Update:
    names = list(upd.tensors)
    np.random.default_rng(seed).shuffle(names)
    return Update({k: upd.tensors[k] for k in names}, upd.num_examples, upd.metrics, "j", 1, "c")


def _split_frames(raw: bytes, cuts: list[int]) -> bytes:
    """``raw`` as several concatenated zstd frames, cut at ``cuts``."""
    points = sorted({0, len(raw), *(c % (len(raw) + 1) for c in cuts)})
    return b"".join(compress_frame(raw[a:b]) for a, b in itertools.pairwise(points))


def _reference_row(data: bytes, specs: list[TensorSpec]) -> npt.NDArray[np.float32]:
    """The flattened float32 row in ``specs`` order from a whole-file parse."""
    tensors = decode_update(data).tensors
    return np.concatenate([np.asarray(tensors[s.name]).astype(np.float32).ravel() for s in specs])


def _bits(x: npt.NDArray[np.float32]) -> npt.NDArray[np.uint32]:
    return x.view(np.uint32)


@settings(max_examples=60, deadline=None)
@given(
    updates(),
    st.sampled_from(["float32", "bfloat16", "float16", "library"]),
    st.integers(0, 2**16),
    st.lists(st.integers(0, 10**6), max_size=4),
    st.sampled_from([7, 64, 1 << 20]),
)
def test_every_block_streams_to_the_columns_of_the_whole_row(
    case: tuple[Update, list[TensorSpec]],
    writer: str,
    order_seed: int,
    cuts: list[int],
    chunk_bytes: int,
) -> None:
    upd, specs = case
    if writer == "library":  # the safetensors library: tensors sorted by dtype and name
        raw = safetensors.numpy.save(dict(upd.tensors), metadata={"num_examples": "7"})
    else:
        precision: Precision = writer  # type: ignore[assignment]
        raw = serialize(_shuffled(upd, order_seed), precision)
    sha = hashlib.sha256(raw).hexdigest()
    data = _split_frames(raw, cuts)
    reference = _reference_row(data, specs)
    row = np.empty(len(reference), np.float32)
    whole = decode_into(data, row, specs, expected_sha256=sha)
    np.testing.assert_array_equal(_bits(row), _bits(reference))
    assert (whole.sha256, whole.raw_bytes) == (sha, len(raw))
    for k in range(1, min(5, len(row)) + 1):
        for a, b in block_ranges(specs, k):
            out = np.full(b - a, np.nan, np.float32)
            got = decode_columns_into(
                io.BytesIO(data), out, specs, (a, b), expected_sha256=sha, chunk_bytes=chunk_bytes
            )
            np.testing.assert_array_equal(_bits(out), _bits(row[a:b]))
            assert (got.sha256, got.raw_bytes, got.metadata) == (sha, len(raw), whole.metadata)
            ref = reference[a:b].astype(np.float64)
            assert got.sq_norm == pytest.approx(float(ref @ ref), rel=1e-5, abs=1e-30)


def _stored_small() -> tuple[bytes, str, list[TensorSpec]]:
    upd = small_update(3, job="j", round=0, client="c3")
    enc = encode_update(upd)
    return enc.data, enc.sha256, list(enc.specs)


def test_a_wrong_checksum_is_refused() -> None:
    data, _, specs = _stored_small()
    out = np.empty(10, np.float32)
    with pytest.raises(CorruptUpdateError, match="checksum"):
        decode_columns_into(io.BytesIO(data), out, specs, (0, 10), expected_sha256="0" * 64)


@pytest.mark.parametrize("trim", [1, 4, 40])
def test_a_data_section_shorter_than_its_header_is_refused(trim: int) -> None:
    raw = serialize(small_update(3))
    data = compress_frame(raw[:-trim])
    specs = small_update(3).specs()
    out = np.empty(10, np.float32)
    with pytest.raises(CorruptUpdateError, match="shorter"):
        decode_columns_into(io.BytesIO(data), out, specs, (0, 10), chunk_bytes=7)
    with pytest.raises(CorruptUpdateError):
        decode_into(data, np.empty(sum(s.numel for s in specs), np.float32), specs)


def test_a_data_section_longer_than_its_header_is_refused() -> None:
    raw = serialize(small_update(3))
    specs = small_update(3).specs()
    data = compress_frame(raw) + compress_frame(b"\0" * 8)  # a trailing frame of junk data
    with pytest.raises(CorruptUpdateError, match="longer"):
        decode_columns_into(io.BytesIO(data), np.empty(10, np.float32), specs, (0, 10))
    with pytest.raises(CorruptUpdateError, match=r"trailing bytes|does not match"):
        decode_into(data, np.empty(sum(s.numel for s in specs), np.float32), specs)


def test_a_truncated_zstd_stream_is_refused() -> None:
    data, _, specs = _stored_small()
    with pytest.raises(CorruptUpdateError):
        decode_columns_into(io.BytesIO(data[:-12]), np.empty(10, np.float32), specs, (0, 10))


def test_a_wrong_shape_or_missing_tensor_is_refused_naming_it() -> None:
    data, _, specs = _stored_small()
    wrong = [
        TensorSpec(s.name, s.dtype, (s.numel + 1,)) if s.name == "fc.bias" else s for s in specs
    ]
    with pytest.raises(CorruptUpdateError, match=r"client 'c3'.*'fc\.bias' has shape"):
        decode_columns_into(
            io.BytesIO(data), np.empty(5, np.float32), wrong, (0, 5), who="client 'c3'"
        )
    extra = [*specs, TensorSpec("head.w", "F32", (2,))]
    with pytest.raises(CorruptUpdateError, match=r"'head\.w' is missing"):
        decode_columns_into(io.BytesIO(data), np.empty(5, np.float32), extra, (0, 5))


def test_non_finite_values_are_refused_only_in_the_block() -> None:
    upd = small_update(3)
    upd.tensors["fc.bias"][2] = np.nan
    specs = upd.specs()
    data = encode_update(upd, allow_nonfinite=True).data
    total = sum(s.numel for s in specs)
    bias = total - 10  # fc.bias is the last tensor
    with pytest.raises(CorruptUpdateError, match=r"'fc\.bias' contains NaN"):
        decode_columns_into(io.BytesIO(data), np.empty(10, np.float32), specs, (bias, total))
    head = decode_columns_into(io.BytesIO(data), np.empty(bias, np.float32), specs, (0, bias))
    assert np.isfinite(head.sq_norm)
    lax = CodecLimits(allow_nonfinite=True)
    out = np.empty(10, np.float32)
    decode_columns_into(io.BytesIO(data), out, specs, (bias, total), limits=lax)
    assert np.isnan(out[2])


def test_the_file_cap_holds_before_any_data_is_decoded() -> None:
    data, _, specs = _stored_small()
    with pytest.raises(LimitExceededError):
        decode_columns_into(
            io.BytesIO(data),
            np.empty(10, np.float32),
            specs,
            (0, 10),
            limits=CodecLimits(max_file_bytes=300),
        )


# --------------------------------------------------------------------------- multi-frame writes


@settings(max_examples=40, deadline=None)
@given(updates(), st.sampled_from(["float32", "bfloat16", "float16"]), st.integers(1, 5))
def test_a_result_written_in_block_frames_is_the_single_frame_encoding(
    case: tuple[Update, list[TensorSpec]], precision: Precision, k: int
) -> None:
    upd, specs = case
    # a model result is a float32 vector; the update it stands for is its unflatten
    vector = np.concatenate([np.asarray(a, np.float32).ravel() for a in upd.tensors.values()])
    result = Update(unflatten(vector, specs), num_examples=5, job="j", round=2, kind="global")
    whole = encode_update(result, precision)
    stored = stored_specs(specs, precision)
    pieces = [header_prefix(stored, update_metadata(result, precision))]
    pieces += [
        bytes(tensor_bytes(vector[a:b], block_specs(stored, (a, b))))
        for a, b in block_ranges(specs, min(k, len(vector)))
    ]
    assert b"".join(pieces) == serialize(result, precision)
    data = b"".join(compress_frame(p) for p in pieces)
    assert len(zstd_frames(data)) == len(pieces)
    assert hashlib.sha256(decompress(data)).hexdigest() == whole.sha256
    back, ref = decode_update(data, expected_sha256=whole.sha256), decode_update(whole.data)
    assert list(back.tensors) == list(ref.tensors)
    for name, arr in ref.tensors.items():
        assert back.tensors[name].dtype == arr.dtype
        np.testing.assert_array_equal(back.tensors[name], arr)
    row, ref_row = np.empty(len(vector), np.float32), np.empty(len(vector), np.float32)
    decode_into(data, row, specs, expected_sha256=whole.sha256)
    decode_into(whole.data, ref_row, specs)
    np.testing.assert_array_equal(_bits(row), _bits(ref_row))
    for a, b in block_ranges(specs, min(k, len(vector))):
        out = np.empty(b - a, np.float32)
        decode_columns_into(io.BytesIO(data), out, specs, (a, b), expected_sha256=whole.sha256)
        np.testing.assert_array_equal(_bits(out), _bits(ref_row[a:b]))


def test_tensor_bytes_rounds_integers_like_unflatten() -> None:
    specs = [TensorSpec("n", "I64", (3,)), TensorSpec("m", "BOOL", (2,))]
    got = tensor_bytes(np.array([1.4, 2.6, -0.5, 0.2, 0.7], np.float32), specs)
    assert bytes(got) == np.array([1, 3, 0], "<i8").tobytes() + np.array([0, 1], "?").tobytes()


@pytest.mark.skipif(shutil.which("zstd") is None, reason="the zstd command-line tool is absent")
def test_the_zstd_tool_decodes_a_multi_frame_result_to_the_same_bytes() -> None:
    upd = small_update(4, job="j", round=0, kind="global")
    specs = upd.specs()
    vector = np.concatenate([np.asarray(a, np.float32).ravel() for a in upd.tensors.values()])
    stored = stored_specs(specs, "bfloat16")
    data = compress_frame(header_prefix(stored, update_metadata(upd, "bfloat16")))
    for a, b in block_ranges(specs, 3):
        data += compress_frame(tensor_bytes(vector[a:b], block_specs(stored, (a, b))))
    out = subprocess.run(["zstd", "-d", "-c"], input=data, capture_output=True, check=True)
    assert out.stdout == serialize(upd, "bfloat16")
