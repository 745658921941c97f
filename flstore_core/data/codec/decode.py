"""Decoding: the readers of a stored update. :func:`decode_update` parses it whole into an
:class:`Update`; the three decoders write float32 into a round matrix — :func:`decode_into` a
whole row, :func:`decode_columns_into` a column block streamed through the whole object,
:func:`decode_frames_columns_into` a column block from only the frames that hold it. Each
validates the header before it touches data and refuses non-finite values."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import zstandard

from flstore_core.data.codec.dtypes import ITEMSIZE, NP_BY_ST, bfloat16_bits_to_float32, widen_into
from flstore_core.data.codec.frames import (
    FrameIndex,
    FrameReader,
    decompress,
    decompressor,
    fill,
    frame_digest,
    known_total,
    zstd_frames,
)
from flstore_core.data.codec.header import (
    Header,
    check_specs,
    data_length,
    header_length,
    parse_header,
    update_from_metadata,
)
from flstore_core.data.codec.update import (
    DEFAULT_LIMITS,
    CodecLimits,
    TensorSpec,
    Update,
    first_nonfinite,
    slices_of,
)
from flstore_core.errors import CorruptUpdateError, LimitExceededError


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
            dt = NP_BY_ST[e.dtype]
            arr = np.frombuffer(buf, dtype=dt, count=(e.end - e.start) // dt.itemsize, offset=start)
            if e.dtype == "F16" and precision == "float16":
                arr = arr.astype(np.float32)
        tensors[e.name] = arr.reshape(e.shape)
    update = update_from_metadata(tensors, meta)
    if not limits.allow_nonfinite:
        bad = first_nonfinite(tensors)
        if bad is not None:
            raise CorruptUpdateError(f"{update.who}: tensor {bad!r} contains NaN or Inf values")
    return update


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
        total = known_total(zstd_frames(data), limits)
    except CorruptUpdateError as exc:
        raise CorruptUpdateError(f"{who}: {exc.message}") from exc
    try:
        reader = decompressor().stream_reader(data, read_across_frames=True)
        digest = hashlib.sha256()
        header, head_bytes, data_len = _read_header(reader, total, limits, specs, who, digest)
        fast = [e.dtype for e in header.entries] == ["F32"] * len(specs) and [
            e.name for e in header.entries
        ] == [s.name for s in specs]
        if fast and header.entries[-1].end == out.nbytes:
            view = memoryview(out).cast("B")  # type: ignore[arg-type]
            got = fill(reader, view)
            if got != len(view) or reader.read(1):
                raise CorruptUpdateError(f"{who}: data section does not match its header")
            digest.update(view)
        else:
            rest = bytearray(data_len)
            if fill(reader, memoryview(rest)) != data_len or reader.read(1):
                raise CorruptUpdateError(f"{who}: data section does not match its header")
            digest.update(rest)
            _fill_row(rest, header, specs, out, who)
        raw_bytes = head_bytes + data_len
    except zstandard.ZstdError as exc:
        raise CorruptUpdateError(f"{who}: not a complete zstd frame: {exc}") from exc
    sha = digest.hexdigest()
    _check_sha256(sha, expected_sha256, who)
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
    _check_block_out(out, specs, columns, "decode_columns_into")
    if chunk_bytes < 1:
        raise ValueError("chunk_bytes must be positive")
    digest = hashlib.sha256()
    try:
        reader = decompressor().stream_reader(
            stream, read_size=chunk_bytes, read_across_frames=True, closefd=False
        )
        header, head_bytes, data_len = _read_header(reader, None, limits, specs, who, digest)
        _DataWalk(reader, digest, data_len, who, chunk_bytes).columns(header, specs, columns, out)
        if reader.read(1):
            raise CorruptUpdateError(
                f"{who}: data section is longer than its header says ({data_len} bytes)"
            )
    except zstandard.ZstdError as exc:
        raise CorruptUpdateError(f"{who}: not a complete zstd frame: {exc}") from exc
    sha = digest.hexdigest()
    _check_sha256(sha, expected_sha256, who)
    sq = _block_sq_norm(out, specs, columns, limits, who)
    return DecodedRow(sha, head_bytes + data_len, sq, header.metadata)


class _DataWalk:
    """A stored update's data section read in file order from a decompressing ``reader``:
    every byte hashed into ``digest``, the elements of the wanted columns converted into their
    place, the rest skipped through a scratch buffer of ``chunk_bytes``."""

    def __init__(self, reader: Any, digest: Any, data_len: int, who: str, chunk_bytes: int) -> None:
        self.reader, self.digest, self.data_len, self.who = reader, digest, data_len, who
        self.scratch = memoryview(bytearray(max(chunk_bytes, 8)))

    def columns(
        self,
        header: Header,
        specs: Sequence[TensorSpec],
        columns: tuple[int, int],
        out: npt.NDArray[np.float32],
    ) -> None:
        """Walk the whole data section, writing the columns ``[a, b)`` of the row into ``out``."""
        a, b = columns
        index = {s.name: i for i, s in enumerate(specs)}
        ranges = slices_of(specs)
        pos = 0  # in the data section
        for e in header.entries:  # file order
            self.skip(e.start - pos)
            size = ITEMSIZE[e.dtype]
            lo, hi = ranges[index[e.name]]
            first, last = max(lo, a), min(hi, b)
            if first >= last:
                self.skip(e.end - e.start)
            else:
                self.skip((first - lo) * size)
                self.convert(e.dtype, out[first - a : last - a])
                self.skip((hi - last) * size)
            pos = e.end

    def take(self, view: memoryview) -> None:
        """Fill ``view`` with the next bytes of the data section."""
        if fill(self.reader, view) != len(view):
            raise CorruptUpdateError(
                f"{self.who}: data section is shorter than its header says ({self.data_len} bytes)"
            )
        self.digest.update(view)

    def skip(self, nbytes: int) -> None:
        """Read past the next ``nbytes`` of the data section."""
        while nbytes > 0:
            step = min(nbytes, len(self.scratch))
            self.take(self.scratch[:step])
            nbytes -= step

    def convert(self, dtype: str, dst: npt.NDArray[np.float32]) -> None:
        """Widen the next ``len(dst)`` stored elements of ``dtype`` into ``dst``."""
        if dtype == "F32":
            self.take(memoryview(dst).cast("B"))  # type: ignore[arg-type]
            return
        size = ITEMSIZE[dtype]
        per = max(1, len(self.scratch) // size)
        for k in range(0, len(dst), per):
            m = min(per, len(dst) - k)
            self.take(self.scratch[: m * size])
            widen_into(self.scratch[: m * size], dtype, dst[k : k + m])


class _Sink:
    """Where the stored bytes ``[lo, hi)`` of the file (part of one tensor) go: the float32
    ``dst``, converted as they arrive in file order — float32 bytes copied straight in, other
    dtypes converted by whole elements (an element may straddle two frames)."""

    def __init__(self, lo: int, hi: int, dtype: str, dst: npt.NDArray[np.float32]) -> None:
        self.lo, self.hi, self.dtype, self.dst = lo, hi, dtype, dst
        self.size = ITEMSIZE[dtype]
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
            widen_into(
                buf[: whole * self.size], self.dtype, self.dst[self.done : self.done + whole]
            )
            self.done += whole
        self.carry = bytes(buf[whole * self.size :])


def decode_frames_columns_into(
    fetch: Callable[[int, int], bytes | bytearray | memoryview],
    index: FrameIndex,
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
    stored bytes ``[start, end)`` (one ranged GET). ``index`` is the update's frame index from
    its manifest entry (:func:`encode_update`, :func:`check_frames`).

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
    _check_block_out(out, specs, columns, "decode_frames_columns_into")
    if not index:
        raise ValueError("decode_frames_columns_into needs a frame index of at least one frame")
    raw_len = index.raw_bytes
    if raw_len > limits.max_file_bytes:
        raise LimitExceededError(
            f"update of {raw_len} bytes exceeds the cap of {limits.max_file_bytes}"
        )
    reader = FrameReader(fetch, index, who, run_bytes)
    head_raw, k = _header_frames(reader, header, limits)
    n = header_length(bytes(head_raw[:8]), limits, raw_len)
    parsed = parse_header(bytes(head_raw[8 : 8 + n]), raw_len, limits)
    check_specs(parsed, specs, who)
    sinks = _block_sinks(parsed, specs, columns, out)
    _feed_sinks(reader, sinks, head_raw, k)
    for sk in sinks:
        if sk.fed != sk.hi - sk.lo or sk.carry:
            raise CorruptUpdateError(f"{who}: a tensor's bytes are missing from its frames")
    sq = _block_sq_norm(out, specs, columns, limits, who)
    return DecodedRow("", raw_len, sq, parsed.metadata)


def _header_frames(
    reader: FrameReader, header: bytes | None, limits: CodecLimits
) -> tuple[bytearray, int]:
    """The raw bytes of the frames that hold the file's header, and how many frames that is:
    the frame(s) holding the first 8 bytes, then those holding the rest of it — or none read
    when the first frame is the expected ``header`` by its digest."""
    index = reader.index
    head_raw = bytearray()
    k = 0  # frames read so far
    need = 8
    if (
        header is not None
        and index.raw_ends[0] == len(header)
        and frame_digest(header) == index.digests[0]
    ):
        head_raw, k, need = bytearray(header), 1, len(header)
    while len(head_raw) < need and k < len(index):
        ahead = [j for j in range(k, len(index)) if index.raw_range(j)[0] < need]
        for _, raw in reader.read(ahead):
            head_raw += raw
        k += len(ahead)
        if need == 8 and len(head_raw) >= 8:
            need = 8 + header_length(bytes(head_raw[:8]), limits, index.raw_bytes)
    return head_raw, k


def _block_sinks(
    header: Header,
    specs: Sequence[TensorSpec],
    columns: tuple[int, int],
    out: npt.NDArray[np.float32],
) -> list[_Sink]:
    """A sink for each tensor slice of the columns ``[a, b)``, by where its bytes are in the
    file (the file's own tensor order), in file order."""
    a, b = columns
    by_name = {e.name: e for e in header.entries}
    sinks: list[_Sink] = []
    for s, (lo, hi) in zip(specs, slices_of(specs), strict=True):
        first, last = max(lo, a), min(hi, b)
        if first < last:
            e = by_name[s.name]
            size = ITEMSIZE[e.dtype]
            start = header.data_start + e.start + (first - lo) * size
            sinks.append(
                _Sink(start, start + (last - first) * size, e.dtype, out[first - a : last - a])
            )
    sinks.sort(key=lambda sk: sk.lo)
    return sinks


def _feed_sinks(reader: FrameReader, sinks: list[_Sink], head_raw: bytearray, k: int) -> None:
    """Feed the sinks their bytes: those the header frames already hold (a one-frame update,
    or a header frame with data), then the frames after the first ``k`` that overlap a sink."""
    index = reader.index
    have = len(head_raw)
    for sk in sinks:
        if sk.lo < have:
            sk.feed(memoryview(head_raw)[sk.lo : min(sk.hi, have)])
    needed = [
        i
        for i in range(k, len(index))
        if any(sk.lo < index.raw_ends[i] and index.raw_range(i)[0] < sk.hi for sk in sinks)
    ]
    pending = [sk for sk in sinks if sk.hi > have]
    for i, raw in reader.read(needed):
        r0, r1 = index.raw_range(i)
        view = memoryview(raw)
        for sk in pending:
            lo, hi = max(sk.lo, r0, have), min(sk.hi, r1)
            if lo < hi:
                sk.feed(view[lo - r0 : hi - r0])


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
    check_specs(header, specs, who)
    digest.update(prefix)
    digest.update(head)
    return header, 8 + n, data_length(header, n, limits)


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
        widen_into(buf[e.start : e.end], e.dtype, out[a:b])


def _check_block_out(
    out: npt.NDArray[np.float32], specs: Sequence[TensorSpec], columns: tuple[int, int], who: str
) -> None:
    """Raise ``ValueError`` unless ``[a, b)`` is a column range of the row and ``out`` a
    contiguous float32 array of its length (``who``: the decoder, named in the message)."""
    a, b = columns
    total_cols = sum(s.numel for s in specs)
    if not 0 <= a <= b <= total_cols:
        raise ValueError(f"columns [{a}, {b}) are outside a row of {total_cols}")
    if out.dtype != np.float32 or out.shape != (b - a,) or not out.flags.c_contiguous:
        raise ValueError(f"{who} needs a contiguous float32 output of {b - a}")


def _check_sha256(sha: str, expected_sha256: str | None, who: str) -> None:
    if expected_sha256 is not None and sha != expected_sha256:
        raise CorruptUpdateError(
            f"{who}: checksum mismatch, the object does not match its manifest"
        )
