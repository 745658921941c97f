"""The tensor codec: an :class:`Update` ⇄ safetensors bytes ⇄ zstd frame (ARCHITECTURE §2).

Objects in S3 are untrusted input, so nothing here unpickles: an update is a safetensors file
(an 8-byte little-endian header length, a JSON header with ``__metadata__``, then the raw
tensor bytes) compressed as one zstandard frame. The sha256 of the *uncompressed* bytes goes to
the round manifest and is checked on read.

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
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, cast

import numpy as np
import numpy.typing as npt
import zstandard

from flstore_core.errors import CorruptUpdateError, LimitExceededError, ValidationError
from flstore_core.ids import validate_client, validate_job, validate_round

Precision = Literal["float32", "bfloat16", "float16"]
PRECISIONS: tuple[Precision, ...] = ("float32", "bfloat16", "float16")
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


def _metadata(update: Update, precision: Precision) -> dict[str, str]:
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
    header: dict[str, Any] = {"__metadata__": _metadata(update, precision)}
    chunks: list[npt.NDArray[Any]] = []
    offset = 0
    for name, value in update.tensors.items():
        if not isinstance(name, str) or not name or name == "__metadata__":
            raise ValidationError(f"{_who(update)}: invalid tensor name {name!r}")
        arr = np.asarray(value)
        dtype_name(arr.dtype)  # rejects unsupported dtypes early
        if not allow_nonfinite:
            _check_finite(name, arr, _who(update))
        if arr.dtype == np.float32 and precision == "bfloat16":
            stored: npt.NDArray[Any] = float32_to_bfloat16_bits(arr)
            st = "BF16"
        elif arr.dtype == np.float32 and precision == "float16":
            with np.errstate(over="ignore"):
                stored = arr.astype("<f2")
            if not allow_nonfinite and not np.isfinite(stored).all():
                raise ValidationError(
                    f"{_who(update)}: tensor {name!r} overflows float16; store this job as "
                    "float32 or bfloat16"
                )
            st = "F16"
        else:
            stored = np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<"), copy=False)
            st = dtype_name(arr.dtype)
        header[name] = {
            "dtype": st,
            "shape": [int(s) for s in arr.shape],
            "data_offsets": [offset, offset + stored.nbytes],
        }
        offset += stored.nbytes
        chunks.append(stored)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # align the data section to 8 bytes
    out = bytearray(8 + len(head) + offset)
    struct.pack_into("<Q", out, 0, len(head))
    out[8 : 8 + len(head)] = head
    pos = 8 + len(head)
    for chunk in chunks:
        n = chunk.nbytes
        out[pos : pos + n] = memoryview(chunk.reshape(-1)).cast("B")  # type: ignore[arg-type]
        pos += n
    return bytes(out)


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


def encode_update(
    update: Update,
    precision: Precision = "float32",
    *,
    level: int = ZSTD_LEVEL,
    allow_nonfinite: bool = False,
) -> EncodedUpdate:
    """Serialize, checksum and compress ``update`` into its stored form."""
    raw = serialize(update, precision, allow_nonfinite=allow_nonfinite)
    sq = row_sq_norm(update)
    return EncodedUpdate(
        data=_compressor(level).compress(raw),
        sha256=hashlib.sha256(raw).hexdigest(),
        raw_bytes=len(raw),
        specs=tuple(update.specs()),
        num_examples=int(update.num_examples),
        metrics=dict(update.metrics),
        norm=math.sqrt(sq),
    )


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
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
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
        if dtype not in _ITEMSIZE:
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


def decompress(data: bytes | memoryview, limits: CodecLimits = DEFAULT_LIMITS) -> bytes:
    """Decompress one zstd frame, refusing frames that decode past ``max_file_bytes``."""
    try:
        size = zstandard.frame_content_size(data)
        if size > limits.max_file_bytes:
            raise LimitExceededError(
                f"update of {size} bytes exceeds the cap of {limits.max_file_bytes}"
            )
        dctx = _decompressor()
        if size >= 0:
            return dctx.decompress(data)
        return dctx.decompress(data, max_output_size=limits.max_file_bytes)
    except zstandard.ZstdError as exc:
        raise CorruptUpdateError(f"not a complete zstd frame: {exc}") from exc


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
    """
    if out.dtype != np.float32 or out.ndim != 1 or not out.flags.c_contiguous:
        raise ValueError("decode_into needs a contiguous 1-D float32 output")
    total = zstandard.frame_content_size(data) if len(data) >= 4 else -1
    try:
        reader = _decompressor().stream_reader(data, read_across_frames=False)
        prefix = reader.read(8)
        n = header_length(prefix, limits, total if total >= 0 else None)
        head = reader.read(n)
        if len(head) != n:
            raise CorruptUpdateError(f"{who}: truncated header")
        header = parse_header(head, total if total >= 0 else None, limits)
        _check_specs(header, specs, who)
        digest = hashlib.sha256(prefix)
        digest.update(head)
        fast = [e.dtype for e in header.entries] == ["F32"] * len(specs) and [
            e.name for e in header.entries
        ] == [s.name for s in specs]
        if fast and header.entries[-1].end == out.nbytes:
            view = memoryview(out).cast("B")  # type: ignore[arg-type]
            got = 0
            while got < len(view):
                k = reader.readinto(view[got:])
                if not k:
                    break
                got += k
            if got != len(view) or reader.read(1):
                raise CorruptUpdateError(f"{who}: data section does not match its header")
            digest.update(view)
            raw_bytes = 8 + n + got
        else:
            rest = reader.read()
            digest.update(rest)
            raw_bytes = 8 + n + len(rest)
            _fill_row(rest, header, specs, out, who)
    except zstandard.ZstdError as exc:
        raise CorruptUpdateError(f"{who}: not a complete zstd frame: {exc}") from exc
    sha = digest.hexdigest()
    if expected_sha256 is not None and sha != expected_sha256:
        raise CorruptUpdateError(
            f"{who}: checksum mismatch, the object does not match its manifest"
        )
    sq = float(np.dot(out, out))
    if not math.isfinite(sq) and not limits.allow_nonfinite:
        bad = next(
            (
                s.name
                for s, (a, b) in zip(specs, slices_of(specs), strict=True)
                if not np.isfinite(out[a:b]).all()
            ),
            None,
        )
        if bad is not None:
            raise CorruptUpdateError(f"{who}: tensor {bad!r} contains NaN or Inf values")
    return DecodedRow(sha, raw_bytes, sq, header.metadata)


def _check_specs(header: Header, specs: Any, who: str) -> None:
    by_name = {e.name: e for e in header.entries}
    want = {s.name for s in specs}
    for s in specs:
        e = by_name.get(s.name)
        if e is None:
            raise CorruptUpdateError(f"{who}: tensor {s.name!r} is missing")
        if e.shape != s.shape:
            raise CorruptUpdateError(
                f"{who}: tensor {s.name!r} has shape {list(e.shape)}, expected {list(s.shape)}"
            )
    extra = sorted(set(by_name) - want)
    if extra:
        raise CorruptUpdateError(f"{who}: unexpected tensor {extra[0]!r}")


def _fill_row(
    data: bytes, header: Header, specs: Any, out: npt.NDArray[np.float32], who: str
) -> None:
    by_name = {e.name: e for e in header.entries}
    buf = memoryview(data)
    data_len = len(buf)
    for spec, (a, b) in zip(specs, slices_of(specs), strict=True):
        e = by_name[spec.name]
        if e.end > data_len:
            raise CorruptUpdateError(f"{who}: tensor {e.name!r} is truncated")
        if e.dtype == "BF16":
            bits = np.frombuffer(buf, dtype="<u2", count=b - a, offset=e.start)
            bfloat16_bits_to_float32(bits, out[a:b])
        else:
            dt = _NP_BY_ST[e.dtype]
            out[a:b] = np.frombuffer(buf, dtype=dt, count=b - a, offset=e.start)


def slices_of(specs: Any) -> list[tuple[int, int]]:
    """Column ranges of each tensor in a flattened row, in ``specs`` order."""
    out: list[tuple[int, int]] = []
    pos = 0
    for s in specs:
        out.append((pos, pos + s.numel))
        pos += s.numel
    return out
