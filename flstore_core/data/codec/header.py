"""The safetensors header, built and parsed: the 8-byte little-endian length, then the JSON
header (``__metadata__`` with the update's identity and metrics, and each tensor's dtype, shape
and byte range in the data section). Every field of a header read from untrusted bytes is
validated before a byte of data is touched."""

from __future__ import annotations

import itertools
import json
import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy.typing as npt

from flstore_core.data.codec.dtypes import ITEMSIZE, STORED_AS, Precision
from flstore_core.data.codec.metadata import (
    checked_metrics,
    checked_num_examples,
    loads_bounded,
    parse_num_examples,
)
from flstore_core.data.codec.update import KINDS, CodecLimits, TensorSpec, Update
from flstore_core.errors import CorruptUpdateError, LimitExceededError, ValidationError
from flstore_core.ids import validate_client, validate_job, validate_round

MAX_HEADER_BYTES = 100 * 1024 * 1024
# numpy 2's NPY_MAXDIMS: a shape with more dimensions cannot be made into an array
MAX_DIMS = 64


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


class TensorMismatchError(CorruptUpdateError):
    """A well-formed file whose tensors are not the expected ones (a name missing or extra, a
    shape differs): what a reader that may skip such a file (a base model that does not fit
    the round) tells apart from damaged bytes."""


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
    try:
        meta["num_examples"] = str(checked_num_examples(update.num_examples))
        meta["metrics"] = json.dumps(
            checked_metrics(update.metrics, labels=update.kind != "update"),
            sort_keys=True,
            allow_nan=False,
        )
    except (TypeError, ValueError) as exc:
        raise ValidationError(f"update metadata: {exc}") from exc
    return meta


def update_from_metadata(tensors: dict[str, npt.NDArray[Any]], meta: dict[str, str]) -> Update:
    """An :class:`Update` of ``tensors`` with the identity and metrics ``__metadata__`` holds."""
    kind = meta.get("kind", "update")
    if kind not in KINDS:
        raise CorruptUpdateError(f"unknown update kind {kind!r} in metadata: use one of {KINDS}")
    try:
        num_examples = parse_num_examples(meta.get("num_examples", "0"))
        metrics = loads_bounded(meta.get("metrics", "{}"), "metrics")
        checked_metrics(metrics, labels=kind != "update")
        round_ = int(meta["round"]) if "round" in meta else None
    except ValueError as exc:
        raise CorruptUpdateError(f"bad update metadata: {exc}") from exc
    return Update(
        tensors=tensors,
        num_examples=num_examples,
        metrics=metrics,
        job=meta.get("job"),
        round=round_,
        client=meta.get("client"),
        kind=kind,
    )


def stored_specs(
    specs: Sequence[TensorSpec], precision: Precision = "float32"
) -> tuple[TensorSpec, ...]:
    """The specs as :func:`serialize` stores them: float32 tensors in ``precision`` (``BF16`` or
    ``F16``), every other dtype as it is."""
    st = STORED_AS[precision]
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
        if spec.dtype not in ITEMSIZE:
            raise ValidationError(f"tensor {name!r}: unsupported dtype {spec.dtype!r}")
        nbytes = spec.numel * ITEMSIZE[spec.dtype]
        header[name] = {
            "dtype": spec.dtype,
            "shape": [int(s) for s in spec.shape],
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # align the data section to 8 bytes
    return struct.pack("<Q", len(head)) + head


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
    declared = 0
    for name, info in obj.items():
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise CorruptUpdateError(f"tensor {name!r}: header entry needs dtype, shape, offsets")
        dtype, shape, offs = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str) or dtype not in ITEMSIZE:  # a list is not hashable
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
        nbytes = _tensor_bytes(name, dtype, shape, limits)
        declared += nbytes
        if declared > limits.max_update_bytes:
            raise LimitExceededError(
                f"the tensors declare more than {limits.max_update_bytes} bytes in all, the cap"
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


def _tensor_bytes(name: str, dtype: str, shape: list[int], limits: CodecLimits) -> int:
    """The bytes a tensor's entry declares, refused past the caps before numpy sees the shape:
    its size with the zero dimensions counted as 1 is capped too, since numpy refuses a shape
    whose other dimensions overflow (``[0, 2**62, 2**62]``: "array is too big") though it holds
    no element. Python ints throughout: no overflow."""
    if len(shape) > MAX_DIMS:
        raise LimitExceededError(f"tensor {name!r}: {len(shape)} dimensions exceed {MAX_DIMS}")
    nbytes = math.prod(shape) * ITEMSIZE[dtype]
    spanned = math.prod(max(s, 1) for s in shape) * ITEMSIZE[dtype]
    if max(nbytes, spanned) > limits.max_tensor_bytes:
        raise LimitExceededError(
            f"tensor {name!r}: shape {_short(shape)} of {dtype} exceeds the cap of "
            f"{limits.max_tensor_bytes} bytes"
        )
    return nbytes


def _short(shape: list[int]) -> str:
    text = str(shape)
    return text if len(text) <= 60 else text[:57] + "..."


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


def check_specs(header: Header, specs: Any, who: str) -> None:
    """Raise :class:`TensorMismatchError` unless the header holds exactly the tensors of
    ``specs`` (matched by name, in any order) with their shapes."""
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


def data_length(header: Header, head_len: int, limits: CodecLimits) -> int:
    """The data section's length by the header, the whole file checked against the cap before
    a byte of data is decoded (a multi-frame object does not declare its total)."""
    data_len = max((e.end for e in header.entries), default=0)
    if 8 + head_len + data_len > limits.max_file_bytes:
        raise LimitExceededError(
            f"update of {8 + head_len + data_len} bytes exceeds the cap of {limits.max_file_bytes}"
        )
    return data_len
