"""Bounded fuzzing of the parsers of untrusted bytes.

Arbitrary bytes and mutations of valid files (flipped bits, truncations, edits of the header
JSON) go to the codec's decoders, the raw-file header reader and the manifest parsers; each may
succeed or raise an :class:`FLStoreError` subclass, never another exception, and never allocate
past a bound (a header claiming 2^60 elements is refused before anything is allocated):
``tracemalloc`` measures the peak of every case.
"""

from __future__ import annotations

import io
import json
import struct
import tracemalloc
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flstore_core.data.codec import (
    DEFAULT_LIMITS,
    decode_columns_into,
    decode_into,
    decode_update,
    decompress,
    encode_update,
    parse_header,
    parse_safetensors,
    serialize,
)
from flstore_core.data.manifest import JobSpec, RoundManifest, UpdateEntry
from flstore_core.data.rawfile import read_raw_header
from flstore_core.errors import CorruptUpdateError, FLStoreError, StoredObjectCorruptError
from tests.conftest import small_update

FUZZ = settings(
    max_examples=1000,
    deadline=2000,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
PEAK_BYTES = 16 * 1024 * 1024  # every input here is under 64 KiB: 16 MiB is generous
# a zstd frame header may ask for a window of up to zstandard's default max_window_size
# (2^27 bytes) whatever its size: that much, never more, is the decoders' bound
ZSTD_PEAK_BYTES = 2**27 + PEAK_BYTES

UPDATE = small_update(1)
ENCODED = encode_update(UPDATE)
RAW = bytes(serialize(UPDATE))
SPECS = ENCODED.specs
N = sum(s.numel for s in SPECS)
JOB = JobSpec("fuzz", model="digits_cnn", parameters=("conv.weight",)).to_json()
MANIFEST = RoundManifest(
    "fuzz",
    0,
    "float32",
    SPECS,
    {
        "c0": UpdateEntry(
            client="c0",
            key="jobs/fuzz/rounds/0/updates/c0.st.zst",
            sha256=ENCODED.sha256,
            raw_bytes=ENCODED.raw_bytes,
            stored_bytes=len(ENCODED.data),
            num_examples=ENCODED.num_examples,
            metrics=ENCODED.metrics,
        )
    },
).to_json()


def only_typed_errors(parse: Callable[[], Any], bound: int = PEAK_BYTES) -> None:
    """Run ``parse``: success or an FLStoreError, with a peak allocation under ``bound``."""
    tracemalloc.start()
    try:
        parse()
    except FLStoreError:
        pass
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak < bound, f"peak allocation {peak} bytes"


def mutations(valid: bytes) -> st.SearchStrategy[bytes]:
    """Bytes near ``valid``: bits flipped, cut short, spliced with random bytes."""

    def flip(data: bytes, positions: list[int]) -> bytes:
        out = bytearray(data)
        for p in positions:
            out[p % len(out)] ^= 1 << (p % 8)
        return bytes(out)

    return st.one_of(
        st.lists(st.integers(0, 8 * len(valid)), min_size=1, max_size=8).map(
            lambda ps: flip(valid, ps)
        ),
        st.integers(0, len(valid)).map(lambda n: valid[:n]),
        st.tuples(st.integers(0, len(valid)), st.binary(max_size=64)).map(
            lambda t: valid[: t[0]] + t[1] + valid[t[0] :]
        ),
        st.binary(max_size=2048),
    )


# header JSON edits: valid safetensors headers with one field replaced by something hostile
HOSTILE = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**64), 2**64),
    st.floats(),
    st.text(max_size=8),
    st.lists(st.integers(-(2**62), 2**62), max_size=4),
    st.just([2**30, 2**30]),
    st.just([0, 2**60]),
    st.just([2**60]),
)


@st.composite
def edited_headers(draw: st.DrawFn) -> bytes:
    n = struct.unpack("<Q", RAW[:8])[0]
    header = json.loads(RAW[8 : 8 + n])
    name = draw(st.sampled_from(sorted(header)))
    if name == "__metadata__":
        key = draw(st.sampled_from([*sorted(header[name]), "extra"]))
        header[name][key] = draw(HOSTILE | st.text(max_size=8))
    else:
        field = draw(st.sampled_from(["dtype", "shape", "data_offsets", "other"]))
        header[name][field] = draw(HOSTILE | st.sampled_from(["F32", "BF16", "I64", "F64", "U8"]))
    head = json.dumps(header).encode()
    data = RAW[8 + n :]
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    return struct.pack("<Q", len(head)) + head + data


RAW_INPUTS = st.one_of(mutations(RAW), edited_headers())
STORED_INPUTS = st.one_of(
    mutations(ENCODED.data),
    RAW_INPUTS.map(lambda raw: encode_raw(raw)),
)


def encode_raw(raw: bytes) -> bytes:
    import zstandard

    return zstandard.ZstdCompressor().compress(raw)


@FUZZ
@given(RAW_INPUTS)
def test_parse_safetensors(data: bytes) -> None:
    only_typed_errors(lambda: parse_safetensors(data))


@FUZZ
@given(RAW_INPUTS)
def test_parse_header(data: bytes) -> None:
    only_typed_errors(lambda: parse_header(data[8:], len(data), DEFAULT_LIMITS))


@FUZZ
@given(RAW_INPUTS)
def test_read_raw_header(data: bytes) -> None:
    stream = io.BytesIO(data)
    only_typed_errors(lambda: read_raw_header(stream.read, len(data)))


@FUZZ
@given(STORED_INPUTS)
def test_decompress(data: bytes) -> None:
    only_typed_errors(lambda: decompress(data), ZSTD_PEAK_BYTES)


@FUZZ
@given(STORED_INPUTS)
def test_decode_update(data: bytes) -> None:
    only_typed_errors(lambda: decode_update(data), ZSTD_PEAK_BYTES)


@FUZZ
@given(STORED_INPUTS)
def test_decode_into(data: bytes) -> None:
    out = np.zeros(N, dtype=np.float32)
    only_typed_errors(lambda: decode_into(data, out, SPECS), ZSTD_PEAK_BYTES)


@FUZZ
@given(STORED_INPUTS, st.integers(0, N), st.integers(0, N))
def test_decode_columns_into(data: bytes, a: int, b: int) -> None:
    a, b = min(a, b), max(a, b)
    out = np.zeros(b - a, dtype=np.float32)
    only_typed_errors(
        lambda: decode_columns_into(io.BytesIO(data), out, SPECS, (a, b), chunk_bytes=64),
        ZSTD_PEAK_BYTES,
    )


@st.composite
def edited_json(draw: st.DrawFn, valid: bytes) -> bytes:
    obj = json.loads(valid)
    paths: list[list[Any]] = []

    def walk(node: Any, path: list[Any]) -> None:
        paths.append(path)
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, [*path, k])
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, [*path, i])

    walk(obj, [])
    path = draw(st.sampled_from(paths[1:]))
    node = obj
    for step in path[:-1]:
        node = node[step]
    if draw(st.booleans()) and isinstance(node, dict):
        del node[path[-1]]
    else:
        node[path[-1]] = draw(HOSTILE | st.dictionaries(st.text(max_size=4), HOSTILE, max_size=2))
    return json.dumps(obj).encode()


@FUZZ
@given(st.one_of(mutations(MANIFEST), edited_json(MANIFEST)))
def test_round_manifest_from_json(data: bytes) -> None:
    only_typed_errors(lambda: RoundManifest.from_json(data))


@FUZZ
@given(st.one_of(mutations(JOB), edited_json(JOB)))
def test_job_spec_from_json(data: bytes) -> None:
    only_typed_errors(lambda: JobSpec.from_json(data))


def test_valid_inputs_parse() -> None:
    # the mutations start from files the parsers accept
    assert RoundManifest.from_json(MANIFEST).updates["c0"].sha256 == ENCODED.sha256
    assert JobSpec.from_json(JOB).job == "fuzz"
    assert set(decode_update(ENCODED.data).tensors) == set(UPDATE.tensors)
    assert set(parse_safetensors(RAW).tensors) == set(UPDATE.tensors)


# --- regressions the fuzzers found ------------------------------------------------------------


def test_regression_header_dtype_that_is_a_list_is_corrupt() -> None:
    n = struct.unpack("<Q", RAW[:8])[0]
    header = json.loads(RAW[8 : 8 + n])
    header["conv.bias"]["dtype"] = [1, 2]  # was TypeError: unhashable type: 'list'
    head = json.dumps(header).encode()
    with pytest.raises(CorruptUpdateError, match="unsupported dtype"):
        parse_safetensors(struct.pack("<Q", len(head)) + head + RAW[8 + n :])


@pytest.mark.parametrize("head", [b"[" * 100_000, b'{"a": ' + b"1" * 5000 + b"}"])
def test_regression_header_too_deep_or_too_long_a_number_is_corrupt(head: bytes) -> None:
    # were RecursionError and ValueError (int digit limit), not JSONDecodeError
    with pytest.raises(CorruptUpdateError, match="not JSON"):
        parse_header(head, None, DEFAULT_LIMITS)


@pytest.mark.parametrize("data", [b"0", b"[]", b'"x"', b"[" * 100_000])
def test_regression_manifest_and_job_that_are_not_objects_are_corrupt(data: bytes) -> None:
    # were AttributeError ('int' object has no attribute 'get') and RecursionError
    with pytest.raises(StoredObjectCorruptError):
        RoundManifest.from_json(data)
    with pytest.raises(StoredObjectCorruptError):
        JobSpec.from_json(data)


@pytest.mark.parametrize(
    ("field", "value"),
    [("raw_bytes", b"1e400"), ("num_examples", b"1e400"), ("num_examples", b"1" + b"0" * 30)],
)
def test_regression_manifest_numbers_past_an_int_are_corrupt(field: str, value: bytes) -> None:
    # were OverflowError (int(inf)), or a num_examples that made fedavg overflow on the round
    obj = json.loads(MANIFEST)
    obj["updates"]["c0"][field] = "HOSTILE"
    data = json.dumps(obj).encode().replace(b'"HOSTILE"', value)
    with pytest.raises(StoredObjectCorruptError):
        RoundManifest.from_json(data)
