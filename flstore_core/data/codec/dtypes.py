"""The codec's dtype tables: storage precisions, safetensors dtype names and their numpy
equivalents, and the bfloat16 conversions numpy has no type for."""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from flstore_core.errors import ValidationError

Precision = Literal["float32", "bfloat16", "float16"]
PRECISIONS: tuple[Precision, ...] = ("float32", "bfloat16", "float16")
# the stored dtype of a float32 tensor in each precision, and back
STORED_AS: dict[Precision, str] = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
PRECISION_OF: dict[str, Precision] = {v: k for k, v in STORED_AS.items()}

# safetensors dtype names and their numpy equivalents; BF16 has no numpy type and is widened.
NP_BY_ST: dict[str, np.dtype[Any]] = {
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
# bytes per element of every safetensors dtype the codec reads and writes
ITEMSIZE: dict[str, int] = {**{k: v.itemsize for k, v in NP_BY_ST.items()}, "BF16": 2}
_ST_BY_NP: dict[str, str] = {v.str if v.itemsize > 1 else v.char: k for k, v in NP_BY_ST.items()}

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
    return np.dtype(np.float32) if st_dtype == "BF16" else NP_BY_ST[st_dtype]


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


def widen_into(buf: memoryview, st_dtype: str, dst: npt.NDArray[np.float32]) -> None:
    """Widen stored elements of a safetensors dtype into float32 ``dst`` (BF16 exactly, other
    dtypes by numpy's cast: round to nearest)."""
    if st_dtype == "BF16":
        bfloat16_bits_to_float32(np.frombuffer(buf, dtype="<u2"), dst)
    else:
        dst[...] = np.frombuffer(buf, dtype=NP_BY_ST[st_dtype])
