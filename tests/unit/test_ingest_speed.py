"""The encoder's faster paths store exactly what the plain construction stores: the buffer
serializer's bytes are :func:`serialize`'s, and an encoded update's frames, digests and
checksum are those of compressing and hashing each frame of those bytes on its own."""

from __future__ import annotations

import hashlib
import struct

import numpy as np
import pytest
import zstandard

from flstore_core.data.codec import Update, encode_update, serialize
from flstore_core.data.codec.encode import serialized_buffer
from flstore_core.data.codec.frames import FRAME_DIGEST_HEX, ZSTD_LEVEL, frame_plan


def mixed_update(n: int) -> Update:
    rng = np.random.default_rng(n)
    return Update(
        {
            "conv.weight": rng.standard_normal((n, 3, 3)).astype(np.float32),
            "bn.num_batches_tracked": np.array(7, np.int64),
            "head.bias": rng.standard_normal(n).astype(np.float64),
            "mask": rng.random(5) > 0.5,
        },
        job="speed",
        round=2,
        client="c-1",
        num_examples=12,
        metrics={"loss": 0.25},
    )


@pytest.mark.parametrize("precision", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("n", [1, 40_000])
def test_buffer_serializer_writes_serialize_bytes(precision: str, n: int) -> None:
    update = mixed_update(n)
    buf = serialized_buffer(update, precision)  # type: ignore[arg-type]
    assert buf.dtype == np.uint8 and buf.ndim == 1
    assert buf.tobytes() == serialize(update, precision)  # type: ignore[arg-type]


@pytest.mark.parametrize("frame_bytes", [None, 100_000])
@pytest.mark.parametrize("n", [1, 40_000])
def test_encoded_update_is_each_frame_compressed_and_hashed_alone(
    n: int, frame_bytes: int | None
) -> None:
    update = mixed_update(n)
    raw = serialize(update)
    enc = encode_update(update, frame_bytes=frame_bytes)
    (head_len,) = struct.unpack("<Q", raw[:8])
    ends = frame_plan(len(raw), 8 + head_len, frame_bytes)
    cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_content_size=True)
    pieces = [raw[a:b] for a, b in zip([0, *ends[:-1]], ends, strict=True)]
    frames = [cctx.compress(p) for p in pieces]
    assert enc.data == b"".join(frames)
    assert isinstance(enc.data, bytes)
    assert enc.sha256 == hashlib.sha256(raw).hexdigest()
    assert enc.raw_bytes == len(raw)
    if len(ends) == 1:
        assert n == 1 and enc.frames == () and enc.frame_digests == ()
    else:
        assert enc.frame_digests == tuple(
            hashlib.sha256(p).hexdigest()[:FRAME_DIGEST_HEX] for p in pieces
        )
        stored = np.cumsum([len(f) for f in frames]).tolist()
        assert enc.frames == tuple(zip(ends, stored, strict=True))
