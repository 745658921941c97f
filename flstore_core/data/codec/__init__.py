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
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import struct
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, cast

import numpy as np
import numpy.typing as npt
import zstandard

from flstore_core.errors import CorruptUpdateError, LimitExceededError, ValidationError
from flstore_core.ids import validate_client, validate_job, validate_round

Precision = Literal["float32", "bfloat16", "float16"]
PRECISIONS: tuple[Precision, ...] = ("float32", "bfloat16", "float16")
# the stored dtype of a float32 tensor in each precision, and back
_STORED_AS: dict[Precision, str] = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
_PRECISION_OF: dict[str, Precision] = {v: k for k, v in _STORED_AS.items()}
Kind = Literal["update", "global", "initial"]
KINDS: tuple[Kind, ...] = ("update", "global", "initial")

# safetensors dtype names and their numpy equivalents; BF16 has no numpy type and is widened.
_NP_BY_ST: dict[str, np.dtype[Any]] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_ITEMSIZE: dict[str, int] = {**{k: v.itemsize for k, v in _NP_BY_ST.items()}, "BF16": 2}
_ST_BY_NP: dict[str, str] = {v.str if v.itemsize > 1 else v.char: k for k, v in _NP_BY_ST.items()}

PRECISION_ALIASES: dict[str, Precision] = {
    "float32": "float32",
    "fp32": "float32",
    "f32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
    "f16": "float16",
    "half": "float16",
}

MAX_HEADER_BYTES = 100 * 1024 * 1024
ZSTD_LEVEL = 1
# A stored update is several zstd frames (:func:`frame_plan`) so that a column block is read
# with range GETs of the frames holding its bytes, not the whole object: the header alone, then
# the data section cut every ``FRAME_BYTES`` of raw bytes — fewer, larger frames for a large
# update (a manifest records one offset pair and digest per frame), smaller ones for a small
# update (so a block of it is still a fraction of it), at most ``MAX_FRAMES`` data frames until
# the frames reach ``FRAME_BYTES``; an update of at most ``MIN_FRAME_BYTES`` stays one frame.
FRAME_BYTES = 1 << 20
MIN_FRAME_BYTES = 64 << 10
MAX_FRAMES = 64
# hex digits kept of each frame's sha256 in a manifest: 128 bits, a second preimage (changing a
# frame's bytes without changing its digest) costs 2^128 hashes; the whole-file sha256 stays 64
FRAME_DIGEST_HEX = 32


@dataclass(frozen=True)
class CodecLimits:
    """Caps applied when decoding untrusted bytes; raise :class:`LimitExceededError` past them."""

    max_file_bytes: int = 8 * 1024**3
    max_tensor_bytes: int = 4 * 1024**3
    max_tensors: int = 100_000
    allow_nonfinite: bool = False


DEFAULT_LIMITS = CodecLimits()


@dataclass(frozen=True)
class TensorSpec:
    """Name, safetensors dtype (as stored in the *source*, e.g. ``F32``) and shape of a tensor."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> TensorSpec:
        return cls(str(obj["name"]), str(obj["dtype"]), tuple(int(s) for s in obj["shape"]))


@dataclass
class Update:
    """One model update: an ordered ``name -> ndarray`` mapping plus its metadata.

    ``job``, ``round`` and ``client`` identify it in a raw update file; ``kind`` is ``update``
    (a client's), ``global`` (the aggregate after a round, no client) or ``initial`` (the model
    before round 0, neither client nor round).
    """

    tensors: dict[str, npt.NDArray[Any]]
    num_examples: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)
    job: str | None = None
    round: int | None = None
    client: str | None = None
    kind: Kind = "update"

    def specs(self) -> list[TensorSpec]:
        """The tensor specs in order, with source dtypes."""
        return [TensorSpec(n, dtype_name(a.dtype), tuple(a.shape)) for n, a in self.tensors.items()]

    @property
    def nbytes(self) -> int:
        return sum(int(a.nbytes) for a in self.tensors.values())


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
    # the frames of ``data`` when it is several (:func:`frame_plan`): cumulative
    # ``(raw_end, stored_end)`` offsets and each frame's raw-bytes digest (:func:`frame_digest`);
    # empty for a one-frame update (read whole, as before frames existed)
    frames: tuple[tuple[int, int], ...] = ()
    frame_digests: tuple[str, ...] = ()

    @property
    def stored_bytes(self) -> int:
        return len(self.data)


def parse_precision(text: str) -> Precision:
    """A storage precision by name or alias: ``bf16``, ``fp16``/``half``, ``fp32`` and the like."""
    try:
        return PRECISION_ALIASES[text.strip().lower()]
    except KeyError:
        raise ValidationError(
            f"unknown precision {text!r}: use one of {', '.join(PRECISIONS)} (or bf16, fp16)"
        ) from None


def dtype_name(dtype: np.dtype[Any]) -> str:
    """The safetensors name of a numpy dtype; raise :class:`ValidationError` if unsupported."""
    key = dtype.str if dtype.itemsize > 1 else dtype.char
    if dtype.byteorder == ">" or key not in _ST_BY_NP:
        raise ValidationError(f"unsupported tensor dtype {dtype}: use a little-endian numeric one")
    return _ST_BY_NP[key]


def np_dtype(st_dtype: str) -> np.dtype[Any]:
    """The numpy dtype of a safetensors dtype name (BF16 widens to float32)."""
    return np.dtype(np.float32) if st_dtype == "BF16" else _NP_BY_ST[st_dtype]


# --------------------------------------------------------------------------- bfloat16


def float32_to_bfloat16_bits(x: npt.NDArray[np.float32]) -> npt.NDArray[np.uint16]:
    """Round float32 to bfloat16 (round-to-nearest-even), returned as raw uint16 bits."""
    bits = np.ascontiguousarray(x, dtype="<f4").view("<u4")
    # add 0x7FFF plus the lowest kept bit, then truncate: IEEE round-half-to-even
    rounded = bits + (np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1)))
    out: npt.NDArray[np.uint16] = (rounded >> np.uint32(16)).astype("<u2")
    nan = np.isnan(x)
    if nan.any():
        out[nan] = np.uint16(0x7FC0)
    return out


def bfloat16_bits_to_float32(
    bits: npt.NDArray[np.uint16], out: npt.NDArray[np.float32] | None = None
) -> npt.NDArray[np.float32]:
    """Widen raw bfloat16 bits to float32 (exact)."""
    if out is None:
        out = np.empty(bits.shape, dtype=np.float32)
    out.view("<u4")[...] = bits.astype("<u4") << np.uint32(16)
    return out


# --------------------------------------------------------------------------- encoding


def update_metadata(update: Update, precision: Precision = "float32") -> dict[str, str]:
    """The ``__metadata__`` that :func:`serialize` writes for ``update`` (its tensors aside):
    what a writer of a file in parts (:func:`header_prefix`) passes for the same header."""
    if update.kind not in KINDS:
        raise ValidationError(f"unknown update kind {update.kind!r}: use one of {KINDS}")
    meta: dict[str, str] = {"kind": update.kind, "format": "flstore/1"}
    if update.job is not None:
        meta["job"] = validate_job(update.job)
    if update.round is not None:
        meta["round"] = str(validate_round(update.round))
    if update.client is not None:
        meta["client"] = validate_client(update.client)
    if precision != "float32":
        meta["precision"] = precision
    n = update.num_examples
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 0:
        raise ValidationError(f"num_examples must be a non-negative integer, got {n!r}")
    meta["num_examples"] = str(int(n))
    try:
        meta["metrics"] = json.dumps(update.metrics, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValidationError(
            f"metrics must be a flat JSON object of finite values: {exc}"
        ) from exc
    return meta


def first_nonfinite(tensors: Mapping[str, npt.NDArray[Any]]) -> str | None:
    """The name of the first float tensor holding NaN or Inf, or ``None`` if all are finite."""
    for name, arr in tensors.items():
        if is_nonfinite(arr):
            return name
    return None


def is_nonfinite(arr: npt.NDArray[Any]) -> bool:
    """Whether a float array holds a NaN or an Inf (integer arrays never do)."""
    return bool(arr.dtype.kind == "f" and arr.size and not np.isfinite(arr).all())


def _check_finite(name: str, arr: npt.NDArray[Any], who: str) -> None:
    if is_nonfinite(arr):
        raise CorruptUpdateError(f"{who}: tensor {name!r} contains NaN or Inf values")


def _who(update: Update) -> str:
    if update.client is not None:
        return f"client {update.client!r}"
    return f"{update.kind} model" if update.kind != "update" else "update"


def stored_specs(
    specs: Sequence[TensorSpec], precision: Precision = "float32"
) -> tuple[TensorSpec, ...]:
    """The specs as :func:`serialize` stores them: float32 tensors in ``precision`` (``BF16`` or
    ``F16``), every other dtype as it is."""
    st = _STORED_AS[precision]
    return tuple(TensorSpec(s.name, st if s.dtype == "F32" else s.dtype, s.shape) for s in specs)


def header_prefix(specs: Sequence[TensorSpec], metadata: Mapping[str, str]) -> bytes:
    """The bytes a safetensors file of these tensors has before its data section: the 8-byte
    little-endian header length, then the JSON header (``__metadata__`` first, the tensors in
    ``specs`` order, the data section padded to 8 bytes with spaces).

    ``specs`` carry the *stored* dtypes (:func:`stored_specs`). :func:`serialize` writes its
    header through this function, so a file written in parts — this prefix, then
    :func:`tensor_bytes` of consecutive column blocks — is byte-identical to the whole-file
    encoding, with the same sha256.
    """
    if not specs:
        raise ValidationError("an update needs at least one tensor")
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    offset = 0
    for spec in specs:
        name = spec.name
        if not isinstance(name, str) or not name or name == "__metadata__" or name in header:
            raise ValidationError(f"invalid or repeated tensor name {name!r}")
        if spec.dtype not in _ITEMSIZE:
            raise ValidationError(f"tensor {name!r}: unsupported dtype {spec.dtype!r}")
        nbytes = spec.numel * _ITEMSIZE[spec.dtype]
        header[name] = {
            "dtype": spec.dtype,
            "shape": [int(s) for s in spec.shape],
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # align the data section to 8 bytes
    return struct.pack("<Q", len(head)) + head


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
    if precision not in PRECISIONS:
        raise ValidationError(f"unknown precision {precision!r}: use one of {PRECISIONS}")
    if not update.tensors:
        raise ValidationError(f"{_who(update)}: an update needs at least one tensor")
    meta = update_metadata(update, precision)
    chunks: list[npt.NDArray[Any]] = []
    specs: list[TensorSpec] = []
    for name, value in update.tensors.items():
        if not isinstance(name, str) or not name or name == "__metadata__":
            raise ValidationError(f"{_who(update)}: invalid tensor name {name!r}")
        arr = np.asarray(value)
        st = dtype_name(arr.dtype)  # rejects unsupported dtypes early
        stored = _stored(name, arr, precision, allow_nonfinite, _who(update))
        if stored.dtype != arr.dtype:
            st = "BF16" if precision == "bfloat16" else "F16"
        specs.append(TensorSpec(name, st, tuple(int(s) for s in arr.shape)))
        chunks.append(stored)
    head = header_prefix(specs, meta)
    out = bytearray(len(head) + sum(c.nbytes for c in chunks))
    out[: len(head)] = head
    pos = len(head)
    for chunk in chunks:
        n = chunk.nbytes
        out[pos : pos + n] = memoryview(chunk.reshape(-1)).cast("B")  # type: ignore[arg-type]
        pos += n
    return bytes(out)


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
            stored = _stored(spec.name, part, _PRECISION_OF[spec.dtype], allow_nonfinite, who)
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


# a raw block's largest size (RFC 8878 §3.1.1.2.4: Block_Maximum_Size is at most 128 KiB)
RAW_BLOCK_BYTES = 128 * 1024
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def raw_frame_size(n: int) -> int:
    """Bytes of :func:`raw_frame` of ``n`` content bytes: magic, descriptor, 8-byte content
    size, then a 3-byte header per block (at least one)."""
    return 13 + 3 * max(1, -(-n // RAW_BLOCK_BYTES)) + n


def raw_frame(parts: Sequence[bytes | bytearray | memoryview]) -> bytearray:
    """The concatenation of ``parts`` as one zstd frame of raw (stored) blocks (RFC 8878
    §3.1.1): no compression work, only a 3-byte block header every 128 KiB, and the bytes
    copied once into the frame. The frame records its content size (single segment, so no
    window descriptor) and carries no checksum, as :func:`compress_frame` writes none; every
    zstd decoder reads it like any other frame, and it concatenates with frames of either kind.

    Dense float32 weights are what this is for: zstd gains ~0.1% on them at its fast levels (the
    exponent bytes' redundancy needs level 1, ~9%, at 3-5x the time), less than the time
    compression costs a request."""
    views = [memoryview(p).cast("B") for p in parts]
    n = sum(v.nbytes for v in views)
    out = bytearray(raw_frame_size(n))
    # Frame_Header_Descriptor: Frame_Content_Size_flag 3 (8 bytes), Single_Segment_flag set
    out[0:13] = ZSTD_MAGIC + bytes([0xE0]) + struct.pack("<Q", n)
    pos, left = 13, n
    blocks = iter(views)
    current, at = next(blocks, memoryview(b"")), 0
    while True:
        size = min(RAW_BLOCK_BYTES, left)
        left -= size
        last = 1 if left == 0 else 0
        # Block_Header: Last_Block bit, Block_Type 0 (raw), Block_Size, little-endian 24 bits
        header = (size << 3) | last
        out[pos : pos + 3] = bytes((header & 0xFF, (header >> 8) & 0xFF, header >> 16))
        pos += 3
        while size:
            if at == current.nbytes:
                current, at = next(blocks), 0
                continue
            take = min(size, current.nbytes - at)
            out[pos : pos + take] = current[at : at + take]
            pos, at, size = pos + take, at + take, size - take
        if last:
            return out


_tls = threading.local()


def _compressor(level: int) -> zstandard.ZstdCompressor:
    cache: dict[int, zstandard.ZstdCompressor] = _tls.__dict__.setdefault("cctx", {})
    if level not in cache:
        cache[level] = zstandard.ZstdCompressor(level=level, write_content_size=True)
    return cache[level]


def _decompressor() -> zstandard.ZstdDecompressor:
    # zstd decompression contexts are not thread-safe: one per thread
    dctx = _tls.__dict__.get("dctx")
    if dctx is None:
        dctx = _tls.dctx = zstandard.ZstdDecompressor()
    return cast(zstandard.ZstdDecompressor, dctx)


def compress_frame(raw: bytes | bytearray | memoryview, level: int = ZSTD_LEVEL) -> bytes:
    """``raw`` as one zstd frame that records its content size. Frames concatenate: a stored
    update written in parts (:func:`header_prefix`, :func:`tensor_bytes`) is the concatenation
    of its parts' frames, and every reader here decodes it as one file."""
    return _compressor(level).compress(raw)


def frame_digest(raw: bytes | bytearray | memoryview) -> str:
    """The digest a manifest records of one frame's raw bytes: sha256, its first
    ``FRAME_DIGEST_HEX`` hex digits."""
    return hashlib.sha256(raw).hexdigest()[:FRAME_DIGEST_HEX]


def frame_plan(raw_len: int, data_start: int, frame_bytes: int | None = None) -> list[int]:
    """The raw offsets where the frames of a file of ``raw_len`` bytes end, its data section
    starting at ``data_start``: ``[raw_len]`` (one frame) for a file of at most
    ``MIN_FRAME_BYTES``, else the header (``data_start``) then the data section every
    ``max(MIN_FRAME_BYTES, min(frame_bytes, ceil(data / MAX_FRAMES)))`` bytes.

    ``frame_bytes`` (default ``FRAME_BYTES``) caps the frame size; tests pass a small one.
    Sizes: a 1 MB update is 16 data frames of 64 KiB; ResNet-18's 46 MB, 64 frames of 720 KB
    (about 3.6 KB of manifest per client); ResNet-50's 100 MB, 96 frames of 1 MiB.
    """
    cap = FRAME_BYTES if frame_bytes is None else frame_bytes
    if cap < 1:
        raise ValueError("frame_bytes must be positive")
    if raw_len <= min(MIN_FRAME_BYTES, cap) or raw_len <= data_start:
        return [raw_len]
    data = raw_len - data_start
    step = max(min(MIN_FRAME_BYTES, cap), min(cap, -(-data // MAX_FRAMES)))
    return [data_start, *range(data_start + step, raw_len, step), raw_len]


def encode_update(
    update: Update,
    precision: Precision = "float32",
    *,
    level: int = ZSTD_LEVEL,
    allow_nonfinite: bool = False,
    frame_bytes: int | None = None,
) -> EncodedUpdate:
    """Serialize, checksum and compress ``update`` into its stored form: the frames of
    :func:`frame_plan`, each compressed alone (:func:`compress_frame`), concatenated. The raw
    bytes, and so the sha256, are those of the one-frame encoding; every reader decodes the
    frames as their concatenation, and a column-block reader fetches only the frames it needs
    (:func:`decode_frames_columns_into`)."""
    raw = serialize(update, precision, allow_nonfinite=allow_nonfinite)
    sq = row_sq_norm(update)
    (head_len,) = struct.unpack("<Q", raw[:8])
    ends = frame_plan(len(raw), 8 + head_len, frame_bytes)
    view = memoryview(raw)
    parts: list[bytes] = []
    frames: list[tuple[int, int]] = []
    digests: list[str] = []
    start = stored = 0
    for end in ends:
        part = _compressor(level).compress(view[start:end])
        parts.append(part)
        stored += len(part)
        frames.append((end, stored))
        digests.append(frame_digest(view[start:end]))
        start = end
    several = len(frames) > 1
    return EncodedUpdate(
        data=parts[0] if not several else b"".join(parts),
        sha256=hashlib.sha256(raw).hexdigest(),
        raw_bytes=len(raw),
        specs=tuple(update.specs()),
        num_examples=int(update.num_examples),
        metrics=dict(update.metrics),
        norm=math.sqrt(sq),
        frames=tuple(frames) if several else (),
        frame_digests=tuple(digests) if several else (),
    )


def describe_frames(
    data: bytes | bytearray | memoryview, limits: CodecLimits = DEFAULT_LIMITS
) -> tuple[bytes, tuple[tuple[int, int], ...], tuple[str, ...]]:
    """The raw bytes of a stored object and its frame index (as :func:`encode_update` records
    it), decompressing each frame alone: what a commit that did not write an object (another
    process did) records of it. An object of one frame, or with skippable frames between its
    frames, has no index (``()``): it is read whole."""
    view = memoryview(data).cast("B")
    found = zstd_frames(view)
    _known_total(found, limits)
    dctx = _decompressor()
    parts: list[bytes] = []
    room = limits.max_file_bytes
    try:
        for f in found:
            part = dctx.decompress(view[f.start : f.end], max_output_size=max(room, 1))
            room -= len(part)
            if room < 0:
                raise LimitExceededError(f"update exceeds the cap of {limits.max_file_bytes}")
            parts.append(part)
    except zstandard.ZstdError as exc:
        raise CorruptUpdateError(f"not a complete zstd frame: {exc}") from exc
    raw = b"".join(parts)
    contiguous = found[0].start == 0 and all(a.end == b.start for a, b in itertools.pairwise(found))
    if len(found) == 1 or not contiguous or found[-1].end != len(view):
        return raw, (), ()
    frames: list[tuple[int, int]] = []
    pos = 0
    for f, part in zip(found, parts, strict=True):
        pos += len(part)
        frames.append((pos, f.end))
    return raw, tuple(frames), tuple(frame_digest(p) for p in parts)


def row_sq_norm(update: Update) -> float:
    """Squared L2 norm of the update as a flattened float32 row (every tensor counts)."""
    sq = 0.0
    with np.errstate(over="ignore"):
        for arr in update.tensors.values():
            flat = np.asarray(arr, dtype=np.float32).reshape(-1)
            sq += float(np.dot(flat, flat))
    return sq


# --------------------------------------------------------------------------- decoding


@dataclass(frozen=True)
class HeaderEntry:
    """One tensor's entry in a safetensors header: dtype, shape and byte range in the data."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


@dataclass(frozen=True)
class Header:
    """A validated safetensors header: the tensors' entries in data order and ``__metadata__``."""

    entries: tuple[HeaderEntry, ...]
    metadata: dict[str, str]
    data_start: int  # offset of the data section in the file


def parse_header(head: bytes, total_len: int | None, limits: CodecLimits) -> Header:
    """Validate a safetensors JSON header; ``total_len`` is the whole file's size when known."""
    try:
        obj = json.loads(head)
    # ValueError: also integers past Python's digit limit; RecursionError: nesting too deep
    except (ValueError, RecursionError) as exc:
        raise CorruptUpdateError(f"not a safetensors file: header is not JSON ({exc})") from exc
    if not isinstance(obj, dict):
        raise CorruptUpdateError("not a safetensors file: header is not a JSON object")
    meta = obj.pop("__metadata__", {}) or {}
    if not isinstance(meta, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in meta.items()
    ):
        raise CorruptUpdateError("safetensors __metadata__ must map strings to strings")
    if len(obj) > limits.max_tensors:
        raise LimitExceededError(f"{len(obj)} tensors exceed the cap of {limits.max_tensors}")
    data_start = 8 + len(head)
    data_len = None if total_len is None else total_len - data_start
    entries: list[HeaderEntry] = []
    for name, info in obj.items():
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise CorruptUpdateError(f"tensor {name!r}: header entry needs dtype, shape, offsets")
        dtype, shape, offs = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str) or dtype not in _ITEMSIZE:  # a list is not hashable
            raise CorruptUpdateError(f"tensor {name!r}: unsupported dtype {dtype!r}")
        if not isinstance(shape, list) or not all(
            isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape
        ):
            raise CorruptUpdateError(f"tensor {name!r}: shape must be a list of integers >= 0")
        if (
            not isinstance(offs, list)
            or len(offs) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offs)
        ):
            raise CorruptUpdateError(f"tensor {name!r}: data_offsets must be two integers")
        start, end = offs
        nbytes = math.prod(shape) * _ITEMSIZE[dtype]
        if nbytes > limits.max_tensor_bytes:
            raise LimitExceededError(
                f"tensor {name!r}: {nbytes} bytes exceed the cap of {limits.max_tensor_bytes}"
            )
        if not 0 <= start <= end or end - start != nbytes:
            raise CorruptUpdateError(
                f"tensor {name!r}: data_offsets {offs} do not match dtype {dtype} shape {shape}"
            )
        if data_len is not None and end > data_len:
            raise CorruptUpdateError(
                f"tensor {name!r}: data_offsets {offs} point outside the {data_len}-byte data"
            )
        entries.append(HeaderEntry(name, dtype, tuple(shape), start, end))
    entries.sort(key=lambda e: (e.start, e.end))
    for a, b in itertools.pairwise(entries):
        if b.start < a.end:
            raise CorruptUpdateError(f"tensors {a.name!r} and {b.name!r} overlap in the data")
    if data_len is not None and entries and entries[-1].end != data_len:
        raise CorruptUpdateError("safetensors data section has trailing bytes")
    return Header(tuple(entries), dict(meta), data_start)


def header_length(prefix: bytes, limits: CodecLimits, total_len: int | None) -> int:
    """The JSON header's length from a file's first 8 bytes, checked against ``total_len``."""
    if len(prefix) < 8:
        raise CorruptUpdateError("not a safetensors file: shorter than its 8-byte header length")
    (n,) = struct.unpack("<Q", prefix[:8])
    if n > MAX_HEADER_BYTES or (total_len is not None and 8 + n > total_len):
        raise CorruptUpdateError(
            f"not a safetensors file: header length {n} points outside the buffer"
        )
    return int(n)


def parse_safetensors(
    raw: bytes | bytearray | memoryview, limits: CodecLimits = DEFAULT_LIMITS
) -> Update:
    """Parse uncompressed safetensors bytes into an :class:`Update` (arrays view ``raw``)."""
    buf = memoryview(raw).cast("B")
    n = header_length(bytes(buf[:8]), limits, len(buf))
    header = parse_header(bytes(buf[8 : 8 + n]), len(buf), limits)
    meta = header.metadata
    precision = meta.get("precision", "float32")
    tensors: dict[str, npt.NDArray[Any]] = {}
    for e in header.entries:
        start = header.data_start + e.start
        if e.dtype == "BF16":
            bits = np.frombuffer(buf, dtype="<u2", count=(e.end - e.start) // 2, offset=start)
            arr: npt.NDArray[Any] = bfloat16_bits_to_float32(bits)
        else:
            dt = _NP_BY_ST[e.dtype]
            arr = np.frombuffer(buf, dtype=dt, count=(e.end - e.start) // dt.itemsize, offset=start)
            if e.dtype == "F16" and precision == "float16":
                arr = arr.astype(np.float32)
        tensors[e.name] = arr.reshape(e.shape)
    update = update_from_metadata(tensors, meta)
    if not limits.allow_nonfinite:
        bad = first_nonfinite(tensors)
        if bad is not None:
            raise CorruptUpdateError(f"{_who(update)}: tensor {bad!r} contains NaN or Inf values")
    return update


def update_from_metadata(tensors: dict[str, npt.NDArray[Any]], meta: dict[str, str]) -> Update:
    """An :class:`Update` of ``tensors`` with the identity and metrics ``__metadata__`` holds."""
    kind = meta.get("kind", "update")
    if kind not in KINDS:
        raise CorruptUpdateError(f"unknown update kind {kind!r} in metadata: use one of {KINDS}")
    try:
        num_examples = int(meta.get("num_examples", "0"))
        metrics = json.loads(meta.get("metrics", "{}"))
        round_ = int(meta["round"]) if "round" in meta else None
    except (ValueError, json.JSONDecodeError) as exc:
        raise CorruptUpdateError(f"bad update metadata: {exc}") from exc
    if num_examples < 0 or not isinstance(metrics, dict):
        raise CorruptUpdateError("bad update metadata: num_examples < 0 or metrics not an object")
    return Update(
        tensors=tensors,
        num_examples=num_examples,
        metrics=metrics,
        job=meta.get("job"),
        round=round_,
        client=meta.get("client"),
        kind=kind,
    )


_ZSTD_MAGIC = 0xFD2FB528
_SKIPPABLE_MASK, _SKIPPABLE_MAGIC = 0xFFFFFFF0, 0x184D2A50


@dataclass(frozen=True)
class ZstdFrame:
    """One zstd frame of a stored object: its byte range and its declared content size
    (``-1`` when the frame does not record it)."""

    start: int
    end: int
    content_size: int


def zstd_frames(data: bytes | bytearray | memoryview) -> tuple[ZstdFrame, ...]:
    """The zstd frames ``data`` is made of, found by walking the frame and block headers
    (RFC 8878 §3.1) without decompressing; skippable frames are left out.

    A stored update may be several frames concatenated (a model result written in parts); this
    tells the readers its total size before they decode anything, so the file cap holds.
    """
    buf = memoryview(data).cast("B")
    n = len(buf)
    frames: list[ZstdFrame] = []
    pos = 0
    try:
        while pos < n:
            if n - pos < 4:
                raise CorruptUpdateError("not a complete zstd frame: trailing bytes")
            magic = int.from_bytes(buf[pos : pos + 4], "little")
            if magic & _SKIPPABLE_MASK == _SKIPPABLE_MAGIC:
                if n - pos < 8:
                    raise CorruptUpdateError("not a complete zstd frame: truncated skippable frame")
                pos += 8 + int.from_bytes(buf[pos + 4 : pos + 8], "little")
                if pos > n:
                    raise CorruptUpdateError("not a complete zstd frame: truncated skippable frame")
                continue
            if magic != _ZSTD_MAGIC:
                raise CorruptUpdateError("not a complete zstd frame: bad magic number")
            rest = buf[pos:]
            params = zstandard.get_frame_parameters(rest)
            size = zstandard.frame_content_size(rest)
            p = pos + zstandard.frame_header_size(rest)
            while True:  # Block_Header: Last_Block (bit 0), Block_Type (2 bits), Block_Size
                if p + 3 > n:
                    raise CorruptUpdateError("not a complete zstd frame: truncated")
                block = int.from_bytes(buf[p : p + 3], "little")
                kind = (block >> 1) & 3
                if kind == 3:
                    raise CorruptUpdateError("not a complete zstd frame: reserved block type")
                p += 3 + (1 if kind == 1 else block >> 3)  # an RLE block stores one byte
                if block & 1:
                    break
            p += 4 if params.has_checksum else 0
            if p > n:
                raise CorruptUpdateError("not a complete zstd frame: truncated")
            frames.append(ZstdFrame(pos, p, int(size)))
            pos = p
    except zstandard.ZstdError as exc:
        raise CorruptUpdateError(f"not a complete zstd frame: {exc}") from exc
    if not frames:
        raise CorruptUpdateError("not a complete zstd frame: no data")
    return tuple(frames)


def _known_total(frames: Sequence[ZstdFrame], limits: CodecLimits) -> int | None:
    """The decompressed size of all frames when each records it (checked against the cap)."""
    if any(f.content_size < 0 for f in frames):
        return None
    total = sum(f.content_size for f in frames)
    if total > limits.max_file_bytes:
        raise LimitExceededError(
            f"update of {total} bytes exceeds the cap of {limits.max_file_bytes}"
        )
    return total


def decompress(
    data: bytes | bytearray | memoryview, limits: CodecLimits = DEFAULT_LIMITS
) -> bytes | bytearray:
    """Decompress a stored object — one zstd frame or several concatenated, decoded as their
    concatenation — refusing anything that decodes past ``max_file_bytes``."""
    view = memoryview(data).cast("B")
    frames = zstd_frames(view)
    total = _known_total(frames, limits)
    dctx = _decompressor()
    try:
        if total is not None and len(frames) == 1:
            return dctx.decompress(view[frames[0].start : frames[0].end])
        if total is not None:  # one buffer of the known size, filled across the frames
            out = bytearray(total)
            got = _fill(dctx.stream_reader(view, read_across_frames=True), memoryview(out))
            if got != total:
                raise CorruptUpdateError("not a complete zstd frame: shorter than it declares")
            return out
        parts: list[bytes] = []
        room = limits.max_file_bytes
        for f in frames:
            part = dctx.decompress(view[f.start : f.end], max_output_size=max(room, 1))
            room -= len(part)
            if room < 0:
                raise LimitExceededError(f"update exceeds the cap of {limits.max_file_bytes}")
            parts.append(part)
        return b"".join(parts)
    except zstandard.ZstdError as exc:
        raise CorruptUpdateError(f"not a complete zstd frame: {exc}") from exc


def _fill(reader: Any, view: memoryview) -> int:
    """Read from a zstd stream reader until ``view`` is full or the stream ends."""
    got = 0
    while got < len(view):
        k = reader.readinto(view[got:])
        if not k:
            break
        got += k
    return int(got)


def decode_update(
    data: bytes | memoryview,
    *,
    expected_sha256: str | None = None,
    limits: CodecLimits = DEFAULT_LIMITS,
) -> Update:
    """Decompress, verify and parse a stored update."""
    raw = decompress(data, limits)
    if expected_sha256 is not None and hashlib.sha256(raw).hexdigest() != expected_sha256:
        raise CorruptUpdateError("checksum mismatch: the object does not match its manifest")
    return parse_safetensors(raw, limits)


@dataclass(frozen=True)
class DecodedRow:
    """What :func:`decode_into` learnt of an update while writing it into a row."""

    sha256: str
    raw_bytes: int
    sq_norm: float
    metadata: dict[str, str]


def decode_into(
    data: bytes | memoryview,
    out: npt.NDArray[np.float32],
    specs: tuple[TensorSpec, ...] | list[TensorSpec],
    *,
    expected_sha256: str | None = None,
    limits: CodecLimits = DEFAULT_LIMITS,
    who: str = "update",
) -> DecodedRow:
    """Decode a stored update into ``out`` (a float32 row) in the order of ``specs``.

    When the stored tensors are float32 in that order (the common case) the zstd stream is
    decompressed straight into ``out``; otherwise each tensor is converted into its slice.
    The checksum, the tensor names and shapes, and finiteness are verified; the squared L2 norm
    is returned because computing it is the cheapest finiteness test and workloads reuse it.
    A stored update of several zstd frames decodes as their concatenation.
    """
    if out.dtype != np.float32 or out.ndim != 1 or not out.flags.c_contiguous:
        raise ValueError("decode_into needs a contiguous 1-D float32 output")
    try:
        total = _known_total(zstd_frames(data), limits)
    except CorruptUpdateError as exc:
        raise CorruptUpdateError(f"{who}: {exc.message}") from exc
    try:
        reader = _decompressor().stream_reader(data, read_across_frames=True)
        digest = hashlib.sha256()
        header, head_bytes, data_len = _read_header(reader, total, limits, specs, who, digest)
        fast = [e.dtype for e in header.entries] == ["F32"] * len(specs) and [
            e.name for e in header.entries
        ] == [s.name for s in specs]
        if fast and header.entries[-1].end == out.nbytes:
            view = memoryview(out).cast("B")  # type: ignore[arg-type]
            got = _fill(reader, view)
            if got != len(view) or reader.read(1):
                raise CorruptUpdateError(f"{who}: data section does not match its header")
            digest.update(view)
        else:
            rest = bytearray(data_len)
            if _fill(reader, memoryview(rest)) != data_len or reader.read(1):
                raise CorruptUpdateError(f"{who}: data section does not match its header")
            digest.update(rest)
            _fill_row(rest, header, specs, out, who)
        raw_bytes = head_bytes + data_len
    except zstandard.ZstdError as exc:
        raise CorruptUpdateError(f"{who}: not a complete zstd frame: {exc}") from exc
    sha = digest.hexdigest()
    if expected_sha256 is not None and sha != expected_sha256:
        raise CorruptUpdateError(
            f"{who}: checksum mismatch, the object does not match its manifest"
        )
    return DecodedRow(
        sha, raw_bytes, _block_sq_norm(out, specs, (0, len(out)), limits, who), header.metadata
    )


def decode_columns_into(
    stream: Any,
    out: npt.NDArray[np.float32],
    specs: Sequence[TensorSpec],
    columns: tuple[int, int],
    *,
    expected_sha256: str | None = None,
    limits: CodecLimits = DEFAULT_LIMITS,
    who: str = "update",
    chunk_bytes: int = 1 << 20,
) -> DecodedRow:
    """Decode the columns ``[a, b)`` of a stored update's flattened row (``specs`` order, the
    round's canonical order) into ``out``, streaming: a column block of a round too large for
    one node (:mod:`flstore_core.data.blocks`) is read without holding the whole file.

    ``stream`` is a readable binary file object (an S3 body, a file) at the start of the stored
    object, one zstd frame or several. It is decompressed in reads of ``chunk_bytes``; every
    byte is hashed (checked against ``expected_sha256`` at the end, like :func:`decode_into`),
    the header is validated against ``specs`` (matched by name: the file may store tensors in
    any order), and the data section is walked in file order, converting the elements that fall
    in ``[a, b)`` as :func:`decode_into` does and skipping the rest. Memory is ``out`` plus
    O(``chunk_bytes``) (and the zstd window, at most the frame size). The returned
    ``sq_norm`` is the block's; non-finite values are refused in the block's columns only.
    """
    a, b = columns
    total_cols = sum(s.numel for s in specs)
    if not 0 <= a <= b <= total_cols:
        raise ValueError(f"columns [{a}, {b}) are outside a row of {total_cols}")
    if out.dtype != np.float32 or out.shape != (b - a,) or not out.flags.c_contiguous:
        raise ValueError(f"decode_columns_into needs a contiguous float32 output of {b - a}")
    if chunk_bytes < 1:
        raise ValueError("chunk_bytes must be positive")
    digest = hashlib.sha256()
    scratch = memoryview(bytearray(max(chunk_bytes, 8)))
    try:
        reader = _decompressor().stream_reader(
            stream, read_size=chunk_bytes, read_across_frames=True, closefd=False
        )
        header, head_bytes, data_len = _read_header(reader, None, limits, specs, who, digest)
        index = {s.name: i for i, s in enumerate(specs)}
        ranges = slices_of(specs)

        def take(view: memoryview) -> None:
            if _fill(reader, view) != len(view):
                raise CorruptUpdateError(
                    f"{who}: data section is shorter than its header says ({data_len} bytes)"
                )
            digest.update(view)

        def skip(nbytes: int) -> None:
            while nbytes > 0:
                step = min(nbytes, len(scratch))
                take(scratch[:step])
                nbytes -= step

        pos = 0  # in the data section
        for e in header.entries:  # file order
            skip(e.start - pos)
            size = _ITEMSIZE[e.dtype]
            lo, hi = ranges[index[e.name]]
            first, last = max(lo, a), min(hi, b)
            if first >= last:
                skip(e.end - e.start)
            else:
                skip((first - lo) * size)
                dst = out[first - a : last - a]
                if e.dtype == "F32":
                    take(memoryview(dst).cast("B"))  # type: ignore[arg-type]
                else:
                    per = max(1, len(scratch) // size)
                    for k in range(0, last - first, per):
                        m = min(per, last - first - k)
                        take(scratch[: m * size])
                        _convert_into(scratch[: m * size], e.dtype, dst[k : k + m])
                skip((hi - last) * size)
            pos = e.end
        if reader.read(1):
            raise CorruptUpdateError(
                f"{who}: data section is longer than its header says ({data_len} bytes)"
            )
    except zstandard.ZstdError as exc:
        raise CorruptUpdateError(f"{who}: not a complete zstd frame: {exc}") from exc
    sha = digest.hexdigest()
    if expected_sha256 is not None and sha != expected_sha256:
        raise CorruptUpdateError(
            f"{who}: checksum mismatch, the object does not match its manifest"
        )
    sq = _block_sq_norm(out, specs, columns, limits, who)
    return DecodedRow(sha, head_bytes + data_len, sq, header.metadata)


class _Sink:
    """Where the stored bytes ``[lo, hi)`` of the file (part of one tensor) go: the float32
    ``dst``, converted as they arrive in file order — float32 bytes copied straight in, other
    dtypes converted by whole elements (an element may straddle two frames)."""

    def __init__(self, lo: int, hi: int, dtype: str, dst: npt.NDArray[np.float32]) -> None:
        self.lo, self.hi, self.dtype, self.dst = lo, hi, dtype, dst
        self.size = _ITEMSIZE[dtype]
        self.done = 0  # elements written
        self.carry = b""
        self.fed = 0  # bytes received

    def feed(self, chunk: memoryview) -> None:
        if self.dtype == "F32":
            target = memoryview(self.dst).cast("B")  # type: ignore[arg-type]
            target[self.fed : self.fed + len(chunk)] = chunk
            self.fed += len(chunk)
            return
        self.fed += len(chunk)
        buf = memoryview(self.carry + bytes(chunk)) if self.carry else chunk
        whole = len(buf) // self.size
        if whole:
            _convert_into(
                buf[: whole * self.size], self.dtype, self.dst[self.done : self.done + whole]
            )
            self.done += whole
        self.carry = bytes(buf[whole * self.size :])


def frame_starts(frames: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Each frame's ``(raw_start, stored_start)``, from the cumulative ends."""
    return [(0, 0), *frames[:-1]]


def check_frames(
    frames: Sequence[tuple[int, int]], digests: Sequence[str], raw: int, stored: int
) -> None:
    """Raise ``ValueError`` unless ``frames`` (cumulative ``(raw_end, stored_end)``) increase
    strictly to ``(raw, stored)`` with one digest each: a manifest's frame index is checked
    when it is read, so a reader never plans a range outside the object."""
    if len(frames) != len(digests) or not frames:
        raise ValueError("frames and frame digests must be non-empty lists of equal length")
    prev = (0, 0)
    for r, st in frames:
        if r <= prev[0] or st <= prev[1]:
            raise ValueError(f"frame offsets {[r, st]} do not increase")
        prev = (r, st)
    if prev != (raw, stored):
        raise ValueError(f"the frames end at {list(prev)}, the object has {[raw, stored]} bytes")
    if not all(
        len(d) == FRAME_DIGEST_HEX and all(c in "0123456789abcdef" for c in d) for d in digests
    ):
        raise ValueError(f"frame digests must be {FRAME_DIGEST_HEX} hex digits")


def decode_frames_columns_into(
    fetch: Callable[[int, int], bytes | bytearray | memoryview],
    frames: Sequence[tuple[int, int]],
    digests: Sequence[str],
    out: npt.NDArray[np.float32],
    specs: Sequence[TensorSpec],
    columns: tuple[int, int],
    *,
    limits: CodecLimits = DEFAULT_LIMITS,
    who: str = "update",
    run_bytes: int = 8 << 20,
    header: bytes | None = None,
) -> DecodedRow:
    """Decode the columns ``[a, b)`` of a stored update (``specs`` order) into ``out`` from
    the frames that hold them, fetched by stored byte range: ``fetch(start, end)`` returns the
    stored bytes ``[start, end)`` (one ranged GET). ``frames`` and ``digests`` are the update's
    frame index from its manifest entry (:func:`encode_update`, :func:`check_frames`).

    The header is read from the first frame(s) (validated against ``specs`` by name, its
    offsets against the file's size), so the file's own tensor order is used; the block's
    columns map to byte ranges of the data section, the frames covering them are fetched with
    one range per run of consecutive frames (at most ``run_bytes`` stored bytes each: memory
    is ``out`` plus a run and a frame), each decompressed alone and checked against its
    digest before a byte of it is used. The whole-file sha256 cannot be checked without
    reading every frame, so the returned ``sha256`` is ``""``; the frames read are verified.

    ``header`` is the header frame the caller expects (:func:`header_prefix` of the round's
    specs and the update's metadata, both in its manifest): when the first frame is exactly
    those bytes by its digest, the file's layout is known without reading it and the header
    GET is saved; otherwise the header frame is read.
    """
    a, b = columns
    total_cols = sum(s.numel for s in specs)
    if not 0 <= a <= b <= total_cols:
        raise ValueError(f"columns [{a}, {b}) are outside a row of {total_cols}")
    if out.dtype != np.float32 or out.shape != (b - a,) or not out.flags.c_contiguous:
        raise ValueError(f"decode_frames_columns_into needs a contiguous float32 output of {b - a}")
    raw_len = frames[-1][0]
    if raw_len > limits.max_file_bytes:
        raise LimitExceededError(
            f"update of {raw_len} bytes exceeds the cap of {limits.max_file_bytes}"
        )
    starts = frame_starts(frames)
    dctx = _decompressor()

    def frame_raw(i: int, stored: memoryview) -> bytes:
        want = frames[i][0] - starts[i][0]
        try:
            size = zstandard.frame_content_size(stored)
            if size not in (-1, want):
                raise CorruptUpdateError(
                    f"{who}: frame {i} declares {size} bytes, its index {want}"
                )
            raw = dctx.decompress(stored, max_output_size=want)
        except zstandard.ZstdError as exc:
            raise CorruptUpdateError(f"{who}: frame {i} is not a zstd frame: {exc}") from exc
        if len(raw) != want or frame_digest(raw) != digests[i]:
            raise CorruptUpdateError(
                f"{who}: frame {i} (raw bytes {starts[i][0]}-{frames[i][0]}) does not match its "
                "digest in the manifest"
            )
        return raw

    def runs(needed: Sequence[int]) -> Iterator[list[int]]:
        run: list[int] = []
        for i in needed:
            if run and (i != run[-1] + 1 or frames[i][1] - starts[run[0]][1] > run_bytes):
                yield run
                run = []
            run.append(i)
        if run:
            yield run

    def read_frames(needed: Sequence[int]) -> Iterator[tuple[int, bytes]]:
        for run in runs(needed):
            lo, hi = starts[run[0]][1], frames[run[-1]][1]
            got = memoryview(fetch(lo, hi)).cast("B")
            if len(got) != hi - lo:
                raise CorruptUpdateError(
                    f"{who}: the object is shorter than its frame index ({lo + len(got)} of {hi})"
                )
            for i in run:
                yield i, frame_raw(i, got[starts[i][1] - lo : frames[i][1] - lo])

    # the header: the frame(s) holding the first 8 bytes, then those holding the rest of it
    head_raw = bytearray()
    k = 0  # frames read so far
    need = 8
    if header is not None and frames[0][0] == len(header) and frame_digest(header) == digests[0]:
        head_raw, k, need = bytearray(header), 1, len(header)
    while len(head_raw) < need and k < len(frames):
        ahead = [j for j in range(k, len(frames)) if starts[j][0] < need]
        for _, raw in read_frames(ahead):
            head_raw += raw
        k += len(ahead)
        if need == 8 and len(head_raw) >= 8:
            need = 8 + header_length(bytes(head_raw[:8]), limits, raw_len)
    n = header_length(bytes(head_raw[:8]), limits, raw_len)
    parsed = parse_header(bytes(head_raw[8 : 8 + n]), raw_len, limits)
    _check_specs(parsed, specs, who)
    ranges = slices_of(specs)
    by_name = {e.name: e for e in parsed.entries}
    sinks: list[_Sink] = []
    for s, (lo, hi) in zip(specs, ranges, strict=True):
        first, last = max(lo, a), min(hi, b)
        if first < last:
            e = by_name[s.name]
            size = _ITEMSIZE[e.dtype]
            start = parsed.data_start + e.start + (first - lo) * size
            sinks.append(
                _Sink(start, start + (last - first) * size, e.dtype, out[first - a : last - a])
            )
    sinks.sort(key=lambda sk: sk.lo)
    # bytes the header frames already hold (a one-frame update, or a header frame with data)
    have = len(head_raw)
    for sk in sinks:
        if sk.lo < have:
            sk.feed(memoryview(head_raw)[sk.lo : min(sk.hi, have)])
    needed = [
        i
        for i in range(k, len(frames))
        if any(sk.lo < frames[i][0] and starts[i][0] < sk.hi for sk in sinks)
    ]
    pending = [sk for sk in sinks if sk.hi > have]
    for i, raw in read_frames(needed):
        r0, r1 = starts[i][0], frames[i][0]
        view = memoryview(raw)
        for sk in pending:
            lo, hi = max(sk.lo, r0, have), min(sk.hi, r1)
            if lo < hi:
                sk.feed(view[lo - r0 : hi - r0])
    for sk in sinks:
        if sk.fed != sk.hi - sk.lo or sk.carry:
            raise CorruptUpdateError(f"{who}: a tensor's bytes are missing from its frames")
    sq = _block_sq_norm(out, specs, columns, limits, who)
    return DecodedRow("", raw_len, sq, parsed.metadata)


def _read_header(
    reader: Any,
    total: int | None,
    limits: CodecLimits,
    specs: Any,
    who: str,
    digest: Any,
) -> tuple[Header, int, int]:
    """Read and validate a stored update's header from a decompressing ``reader`` (checked
    against ``specs`` by name), feed its bytes to ``digest``; the header, the number of bytes
    before the data section, and the data section's length."""
    prefix = reader.read(8)
    n = header_length(prefix, limits, total)
    head = reader.read(n)
    if len(head) != n:
        raise CorruptUpdateError(f"{who}: truncated header")
    header = parse_header(head, total, limits)
    _check_specs(header, specs, who)
    digest.update(prefix)
    digest.update(head)
    return header, 8 + n, _data_len(header, n, limits)


def _data_len(header: Header, head_len: int, limits: CodecLimits) -> int:
    """The data section's length by the header, the whole file checked against the cap before
    a byte of data is decoded (a multi-frame object does not declare its total)."""
    data_len = max((e.end for e in header.entries), default=0)
    if 8 + head_len + data_len > limits.max_file_bytes:
        raise LimitExceededError(
            f"update of {8 + head_len + data_len} bytes exceeds the cap of {limits.max_file_bytes}"
        )
    return data_len


def _block_sq_norm(
    out: npt.NDArray[np.float32],
    specs: Sequence[TensorSpec],
    columns: tuple[int, int],
    limits: CodecLimits,
    who: str,
) -> float:
    """``out``'s squared norm; a non-finite one names the first tensor with a NaN or Inf in
    the columns (a finite row can still overflow the float32 sum, which is no error)."""
    sq = float(np.dot(out, out))
    if not math.isfinite(sq) and not limits.allow_nonfinite:
        a, b = columns
        for s, (lo, hi) in zip(specs, slices_of(specs), strict=True):
            first, last = max(lo, a), min(hi, b)
            if first < last and not np.isfinite(out[first - a : last - a]).all():
                raise CorruptUpdateError(f"{who}: tensor {s.name!r} contains NaN or Inf values")
    return sq


class TensorMismatchError(CorruptUpdateError):
    """A well-formed file whose tensors are not the expected ones (a name missing or extra, a
    shape differs): what a reader that may skip such a file (a base model that does not fit
    the round) tells apart from damaged bytes."""


def _check_specs(header: Header, specs: Any, who: str) -> None:
    by_name = {e.name: e for e in header.entries}
    want = {s.name for s in specs}
    for s in specs:
        e = by_name.get(s.name)
        if e is None:
            raise TensorMismatchError(f"{who}: tensor {s.name!r} is missing")
        if e.shape != s.shape:
            raise TensorMismatchError(
                f"{who}: tensor {s.name!r} has shape {list(e.shape)}, expected {list(s.shape)}"
            )
    extra = sorted(set(by_name) - want)
    if extra:
        raise TensorMismatchError(f"{who}: unexpected tensor {extra[0]!r}")


def _fill_row(
    data: bytes | bytearray, header: Header, specs: Any, out: npt.NDArray[np.float32], who: str
) -> None:
    by_name = {e.name: e for e in header.entries}
    buf = memoryview(data)
    data_len = len(buf)
    for spec, (a, b) in zip(specs, slices_of(specs), strict=True):
        e = by_name[spec.name]
        if e.end > data_len:
            raise CorruptUpdateError(f"{who}: tensor {e.name!r} is truncated")
        _convert_into(buf[e.start : e.end], e.dtype, out[a:b])


def _convert_into(buf: memoryview, st_dtype: str, dst: npt.NDArray[np.float32]) -> None:
    """Widen stored elements of a safetensors dtype into float32 ``dst`` (BF16 exactly, other
    dtypes by numpy's cast: round to nearest)."""
    if st_dtype == "BF16":
        bfloat16_bits_to_float32(np.frombuffer(buf, dtype="<u2"), dst)
    else:
        dst[...] = np.frombuffer(buf, dtype=_NP_BY_ST[st_dtype])


def slices_of(specs: Any) -> list[tuple[int, int]]:
    """Column ranges of each tensor in a flattened row, in ``specs`` order."""
    out: list[tuple[int, int]] = []
    pos = 0
    for s in specs:
        out.append((pos, pos + s.numel))
        pos += s.numel
    return out
