"""Encoding: an :class:`Update` to safetensors bytes (our own writer, which keeps the
state-dict order and writes bfloat16 from numpy), a float32 vector to the data-section bytes of
its tensors (a model result written in parts), and an update to its stored form, the frames of
:func:`frame_plan` with the index a manifest records of them."""

from __future__ import annotations

import base64
import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from flstore_core.data.codec.dtypes import (
    PRECISION_OF,
    PRECISIONS,
    Precision,
    dtype_name,
    float32_to_bfloat16_bits,
    np_dtype,
)
from flstore_core.data.codec.frames import (
    ZSTD_LEVEL,
    FrameIndex,
    compressor,
    frame_digest,
    frame_plan,
)
from flstore_core.data.codec.header import header_prefix, update_metadata
from flstore_core.data.codec.update import TensorSpec, Update, is_nonfinite, slices_of
from flstore_core.errors import CorruptUpdateError, ValidationError


def _check_finite(name: str, arr: npt.NDArray[Any], who: str) -> None:
    if is_nonfinite(arr):
        raise CorruptUpdateError(f"{who}: tensor {name!r} contains NaN or Inf values")


def _stored(
    name: str, arr: npt.NDArray[Any], precision: Precision, allow_nonfinite: bool, who: str
) -> npt.NDArray[Any]:
    """A tensor as stored: float32 cast to ``precision``, anything else little-endian as is."""
    if not allow_nonfinite:
        _check_finite(name, arr, who)
    if arr.dtype == np.float32 and precision == "bfloat16":
        return float32_to_bfloat16_bits(arr)
    if arr.dtype == np.float32 and precision == "float16":
        with np.errstate(over="ignore"):
            half = arr.astype("<f2")
        if not allow_nonfinite and not np.isfinite(half).all():
            raise ValidationError(
                f"{who}: tensor {name!r} overflows float16; store this job as float32 or bfloat16"
            )
        return half
    return np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<"), copy=False)


def serialize(
    update: Update,
    precision: Precision = "float32",
    *,
    allow_nonfinite: bool = False,
) -> bytes:
    """The uncompressed safetensors bytes of ``update``, float32 tensors cast to ``precision``."""
    return serialized_buffer(update, precision, allow_nonfinite=allow_nonfinite).tobytes()


class ScratchBuffer:
    """One reusable byte buffer, grown when a request is larger than any before: a loop that
    fills a large buffer per item (a Beam worker encoding update after update) writes into
    memory already mapped instead of a fresh allocation each time.

    Not thread-safe, and each :meth:`take` reuses the memory the previous one handed out: one
    per worker (a DoFn instance), and nothing may keep a view past the next item."""

    def __init__(self) -> None:
        self._buf = np.empty(0, np.uint8)

    def take(self, n: int) -> npt.NDArray[np.uint8]:
        """A view of ``n`` bytes of the buffer (contents undefined)."""
        if n > self._buf.size:
            self._buf = np.empty(0, np.uint8)  # free the old one before mapping the new
            self._buf = np.empty(n, np.uint8)
        return self._buf[:n]


def serialized_buffer(
    update: Update,
    precision: Precision = "float32",
    *,
    allow_nonfinite: bool = False,
    scratch: ScratchBuffer | None = None,
) -> npt.NDArray[np.uint8]:
    """:func:`serialize`'s bytes in a numpy buffer, for callers that only read them (encoding).

    numpy backs a large buffer with huge pages; a fresh 47 MB ``bytearray`` (or ``bytes``) costs
    ~11,000 page faults, which measured 60-90 ms a ResNet-18 update on a loaded 2-core host
    against ~13 ms for this buffer and its one copy of the tensors. A fresh huge-page buffer
    still measured ~107 ms an update inside the Beam pipeline (the kernel compacting memory
    for each new mapping) against ~10 ms reused: with ``scratch`` the bytes are written into
    its memory (valid until its next use)."""
    if precision not in PRECISIONS:
        raise ValidationError(f"unknown precision {precision!r}: use one of {PRECISIONS}")
    if not update.tensors:
        raise ValidationError(f"{update.who}: an update needs at least one tensor")
    meta = update_metadata(update, precision)
    chunks: list[npt.NDArray[Any]] = []
    specs: list[TensorSpec] = []
    for name, value in update.tensors.items():
        if not isinstance(name, str) or not name or name == "__metadata__":
            raise ValidationError(f"{update.who}: invalid tensor name {name!r}")
        arr = np.asarray(value)
        st = dtype_name(arr.dtype)  # rejects unsupported dtypes early
        stored = _stored(name, arr, precision, allow_nonfinite, update.who)
        if stored.dtype != arr.dtype:
            st = "BF16" if precision == "bfloat16" else "F16"
        specs.append(TensorSpec(name, st, tuple(int(s) for s in arr.shape)))
        chunks.append(stored)
    head = header_prefix(specs, meta)
    size = len(head) + sum(c.nbytes for c in chunks)
    out = scratch.take(size) if scratch is not None else np.empty(size, np.uint8)
    # a memoryview's slice assignment is one memcpy (a bytearray's measured 8x slower)
    view = memoryview(out)  # type: ignore[arg-type]
    view[: len(head)] = head
    pos = len(head)
    for chunk in chunks:
        n = chunk.nbytes
        view[pos : pos + n] = memoryview(chunk.reshape(-1)).cast("B")  # type: ignore[arg-type]
        pos += n
    return out


def tensor_parts(
    vector: npt.NDArray[np.float32],
    specs: Sequence[TensorSpec],
    *,
    allow_nonfinite: bool = False,
    who: str = "model result",
) -> list[memoryview]:
    """The bytes :func:`tensor_bytes` returns, as one buffer per tensor, in order: a float32
    tensor stored as float32 is a view of ``vector`` (no copy), any other a converted copy."""
    vec = np.ascontiguousarray(vector, dtype=np.float32).reshape(-1)
    if vec.size != sum(s.numel for s in specs):
        raise ValueError(f"{vec.size} values for tensors of {sum(s.numel for s in specs)}")
    parts: list[memoryview] = []
    for spec, (a, b) in zip(specs, slices_of(specs), strict=True):
        part = vec[a:b]
        if spec.dtype in ("F32", "BF16", "F16"):
            stored = _stored(spec.name, part, PRECISION_OF[spec.dtype], allow_nonfinite, who)
        elif np_dtype(spec.dtype).kind == "f":
            wide = part.astype(np_dtype(spec.dtype))
            stored = _stored(spec.name, wide, "float32", allow_nonfinite, who)
        else:
            stored = np.rint(part).astype(np_dtype(spec.dtype))
        parts.append(memoryview(np.ascontiguousarray(stored)).cast("B"))  # type: ignore[arg-type]
    return parts


def tensor_bytes(
    vector: npt.NDArray[np.float32],
    specs: Sequence[TensorSpec],
    *,
    allow_nonfinite: bool = False,
    who: str = "model result",
) -> bytearray:
    """The data-section bytes of consecutive tensors (or parts of tensors: a column block's
    :func:`~flstore_core.data.blocks.block_specs`) taken from a float32 ``vector``, in the
    specs' *stored* dtypes exactly as :func:`serialize` writes the update
    :func:`~flstore_core.data.rows.unflatten` makes of the vector: float32 as is, ``BF16`` /
    ``F16`` converted as :func:`serialize` converts, other floats widened, integers and booleans
    rounded to the nearest integer (``np.rint``, as ``unflatten``)."""
    parts = tensor_parts(vector, specs, allow_nonfinite=allow_nonfinite, who=who)
    out = bytearray(sum(p.nbytes for p in parts))
    pos = 0
    for part in parts:
        out[pos : pos + part.nbytes] = part
        pos += part.nbytes
    return out


def row_sq_norm(update: Update) -> float:
    """Squared L2 norm of the update as a flattened float32 row (every tensor counts)."""
    sq = 0.0
    with np.errstate(over="ignore"):
        for arr in update.tensors.values():
            flat = np.asarray(arr, dtype=np.float32).reshape(-1)
            sq += float(np.dot(flat, flat))
    return sq


@dataclass(frozen=True)
class EncodedUpdate:
    """The stored form of an update: the zstd frame and what the manifest records of it."""

    data: bytes
    sha256: str
    raw_bytes: int
    specs: tuple[TensorSpec, ...]
    num_examples: int
    metrics: dict[str, Any]
    norm: float
    # the frames of ``data`` when it is several (:func:`frame_plan`); empty for a one-frame
    # update (read whole, as before frames existed)
    frame_index: FrameIndex = field(default_factory=FrameIndex)
    # the SHA-256 of ``data`` (the stored bytes) in base64, as S3's ``ChecksumSHA256`` carries
    # it: taken while encoding so that the PUT need not hash the object again; empty when
    # not known
    stored_sha256_b64: str = ""

    @property
    def stored_bytes(self) -> int:
        return len(self.data)

    @property
    def frames(self) -> tuple[tuple[int, int], ...]:
        """The frames' cumulative ``(raw_end, stored_end)`` offsets, as a manifest records them."""
        return self.frame_index.pairs

    @property
    def frame_digests(self) -> tuple[str, ...]:
        """Each frame's raw-bytes digest (:func:`frame_digest`), as a manifest records them."""
        return self.frame_index.digests


def encode_update(
    update: Update,
    precision: Precision = "float32",
    *,
    level: int = ZSTD_LEVEL,
    allow_nonfinite: bool = False,
    frame_bytes: int | None = None,
    scratch: ScratchBuffer | None = None,
) -> EncodedUpdate:
    """Serialize, checksum and compress ``update`` into its stored form: the frames of
    :func:`frame_plan`, each compressed alone (:func:`compress_frame`), concatenated. The raw
    bytes, and so the sha256, are those of the one-frame encoding; every reader decodes the
    frames as their concatenation, and a column-block reader fetches only the frames it needs
    (:func:`decode_frames_columns_into`).

    ``scratch`` holds the raw bytes while they are compressed (:func:`serialized_buffer`); the
    result never refers to it."""
    raw = serialized_buffer(update, precision, allow_nonfinite=allow_nonfinite, scratch=scratch)
    sq = row_sq_norm(update)
    head_len = int.from_bytes(raw[:8].tobytes(), "little")
    ends = frame_plan(len(raw), 8 + head_len, frame_bytes)
    several = len(ends) > 1
    view = memoryview(raw)  # type: ignore[arg-type]
    cctx = compressor(level)
    whole = hashlib.sha256()
    stored_hash = hashlib.sha256()
    parts: list[bytes] = []
    stored_ends: list[int] = []
    digests: list[str] = []
    start = stored = 0
    for end in ends:
        # each frame compressed and hashed while it is in cache: the whole file's sha256 and,
        # with several frames, the frame's own (one frame's digest would be the whole's)
        piece = view[start:end]
        part = cctx.compress(piece)
        parts.append(part)
        stored_hash.update(part)
        stored += len(part)
        stored_ends.append(stored)
        whole.update(piece)
        if several:
            digests.append(frame_digest(piece))
        start = end
    return EncodedUpdate(
        data=parts[0] if not several else b"".join(parts),
        sha256=whole.hexdigest(),
        raw_bytes=len(raw),
        specs=tuple(update.specs()),
        num_examples=int(update.num_examples),
        metrics=dict(update.metrics),
        norm=math.sqrt(sq),
        frame_index=FrameIndex(tuple(ends), tuple(stored_ends), tuple(digests))
        if several
        else FrameIndex(),
        stored_sha256_b64=base64.b64encode(stored_hash.digest()).decode("ascii"),
    )
