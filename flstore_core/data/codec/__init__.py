"""The tensor codec: an :class:`Update` ⇄ safetensors bytes ⇄ zstd frame (ARCHITECTURE §2).

Objects in S3 are untrusted input, so nothing here unpickles: an update is a safetensors file
(an 8-byte little-endian header length, a JSON header with ``__metadata__``, then the raw
tensor bytes) compressed with zstandard — one frame for a small update, else the header in one
frame and the data section in frames of at most ``FRAME_BYTES`` (:func:`frame_plan`), whose
concatenation decodes to the same bytes. The sha256 of the *uncompressed* bytes goes to the
round manifest and is checked on read; so do the frames' offsets and digests, with which a
column block is read by ranged GETs of its frames (:func:`decode_frames_columns_into`).

The writer is our own, not ``safetensors.numpy.save``: the format is a dozen lines to write, the
library reorders tensors by dtype and name (we keep the state-dict order, which is the column
order of a round matrix) and cannot write bfloat16 from numpy. The reader validates every
header field before touching data, and :func:`decode_into` decompresses a float32 update
straight into a row of the round matrix so a round is read with no copy beyond decoding.
Tests check interoperability both ways with the ``safetensors`` library.

The package, by concern: :mod:`~flstore_core.data.codec.dtypes` (precisions, dtype tables,
bfloat16), :mod:`~flstore_core.data.codec.update` (:class:`Update`, :class:`TensorSpec`, the
caps), :mod:`~flstore_core.data.codec.header` (the safetensors header, built and parsed),
:mod:`~flstore_core.data.codec.frames` (zstd frames: writers, walker, plan, index, ranged
reader), :mod:`~flstore_core.data.codec.encode` and :mod:`~flstore_core.data.codec.decode`.
Every name is importable from here, as it was when the codec was one module.
"""

from __future__ import annotations

from flstore_core.data.codec.decode import (
    DecodedRow,
    decode_columns_into,
    decode_frames_columns_into,
    decode_into,
    decode_update,
    parse_safetensors,
)
from flstore_core.data.codec.dtypes import (
    PRECISION_ALIASES,
    PRECISIONS,
    Precision,
    bfloat16_bits_to_float32,
    dtype_name,
    float32_to_bfloat16_bits,
    np_dtype,
    parse_precision,
)
from flstore_core.data.codec.encode import (
    EncodedUpdate,
    ScratchBuffer,
    encode_update,
    row_sq_norm,
    serialize,
    tensor_bytes,
    tensor_parts,
)
from flstore_core.data.codec.frames import (
    FRAME_BYTES,
    FRAME_DIGEST_HEX,
    MAX_FRAMES,
    MIN_FRAME_BYTES,
    RAW_BLOCK_BYTES,
    ZSTD_LEVEL,
    ZSTD_MAGIC,
    FrameIndex,
    FrameReader,
    ZstdFrame,
    check_frames,
    compress_frame,
    decompress,
    describe_frames,
    frame_digest,
    frame_plan,
    raw_frame,
    raw_frame_size,
    zstd_frames,
)
from flstore_core.data.codec.header import (
    MAX_HEADER_BYTES,
    Header,
    HeaderEntry,
    TensorMismatchError,
    header_length,
    header_prefix,
    parse_header,
    stored_specs,
    update_from_metadata,
    update_metadata,
)
from flstore_core.data.codec.update import (
    DEFAULT_LIMITS,
    KINDS,
    CodecLimits,
    Kind,
    TensorSpec,
    Update,
    first_nonfinite,
    is_nonfinite,
    slices_of,
)

__all__ = [
    "DEFAULT_LIMITS",
    "FRAME_BYTES",
    "FRAME_DIGEST_HEX",
    "KINDS",
    "MAX_FRAMES",
    "MAX_HEADER_BYTES",
    "MIN_FRAME_BYTES",
    "PRECISIONS",
    "PRECISION_ALIASES",
    "RAW_BLOCK_BYTES",
    "ZSTD_LEVEL",
    "ZSTD_MAGIC",
    "CodecLimits",
    "DecodedRow",
    "EncodedUpdate",
    "FrameIndex",
    "FrameReader",
    "Header",
    "HeaderEntry",
    "Kind",
    "Precision",
    "ScratchBuffer",
    "TensorMismatchError",
    "TensorSpec",
    "Update",
    "ZstdFrame",
    "bfloat16_bits_to_float32",
    "check_frames",
    "compress_frame",
    "decode_columns_into",
    "decode_frames_columns_into",
    "decode_into",
    "decode_update",
    "decompress",
    "describe_frames",
    "dtype_name",
    "encode_update",
    "first_nonfinite",
    "float32_to_bfloat16_bits",
    "frame_digest",
    "frame_plan",
    "header_length",
    "header_prefix",
    "is_nonfinite",
    "np_dtype",
    "parse_header",
    "parse_precision",
    "parse_safetensors",
    "raw_frame",
    "raw_frame_size",
    "row_sq_norm",
    "serialize",
    "slices_of",
    "stored_specs",
    "tensor_bytes",
    "tensor_parts",
    "update_from_metadata",
    "update_metadata",
    "zstd_frames",
]
