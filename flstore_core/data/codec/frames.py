"""zstd frames: the stored form of an update (RFC 8878). The frame writers (compressed, and
raw for bytes not worth compressing), the walker that finds an object's frames without
decompressing, the frame plan an update is cut by, the :class:`FrameIndex` a manifest records
of it, and the reader of frames by ranged fetches that checks each against its digest."""

from __future__ import annotations

import hashlib
import itertools
import struct
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, cast

import zstandard

from flstore_core.data.codec.update import DEFAULT_LIMITS, CodecLimits
from flstore_core.errors import CorruptUpdateError, LimitExceededError

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


# a raw block's largest size (RFC 8878 §3.1.1.2.4: Block_Maximum_Size is at most 128 KiB)
RAW_BLOCK_BYTES = 128 * 1024
# the first 4 bytes of every zstd frame (RFC 8878 §3.1.1: Magic_Number 0xFD2FB528, little-endian)
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_MAGIC_NUMBER = int.from_bytes(ZSTD_MAGIC, "little")
_SKIPPABLE_MASK, _SKIPPABLE_MAGIC = 0xFFFFFFF0, 0x184D2A50


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


def compressor(level: int) -> zstandard.ZstdCompressor:
    """This thread's zstd compressor at ``level`` (frames record their content size)."""
    cache: dict[int, zstandard.ZstdCompressor] = _tls.__dict__.setdefault("cctx", {})
    if level not in cache:
        cache[level] = zstandard.ZstdCompressor(level=level, write_content_size=True)
    return cache[level]


def decompressor() -> zstandard.ZstdDecompressor:
    """This thread's zstd decompressor."""
    # zstd decompression contexts are not thread-safe: one per thread
    dctx = _tls.__dict__.get("dctx")
    if dctx is None:
        dctx = _tls.dctx = zstandard.ZstdDecompressor()
    return cast(zstandard.ZstdDecompressor, dctx)


def compress_frame(raw: bytes | bytearray | memoryview, level: int = ZSTD_LEVEL) -> bytes:
    """``raw`` as one zstd frame that records its content size. Frames concatenate: a stored
    update written in parts (:func:`header_prefix`, :func:`tensor_bytes`) is the concatenation
    of its parts' frames, and every reader here decodes it as one file."""
    return compressor(level).compress(raw)


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
            if magic != _MAGIC_NUMBER:
                raise CorruptUpdateError("not a complete zstd frame: bad magic number")
            rest = buf[pos:]
            params = zstandard.get_frame_parameters(rest)
            size = zstandard.frame_content_size(rest)
            p = pos + zstandard.frame_header_size(rest)
            most = 0  # the most content the frame's blocks can hold
            while True:  # Block_Header: Last_Block (bit 0), Block_Type (2 bits), Block_Size
                if p + 3 > n:
                    raise CorruptUpdateError("not a complete zstd frame: truncated")
                block = int.from_bytes(buf[p : p + 3], "little")
                kind = (block >> 1) & 3
                if kind == 3:
                    raise CorruptUpdateError("not a complete zstd frame: reserved block type")
                p += 3 + (1 if kind == 1 else block >> 3)  # an RLE block stores one byte
                # raw and RLE blocks hold Block_Size bytes, a compressed one at most 128 KiB
                most += RAW_BLOCK_BYTES if kind == 2 else block >> 3
                if block & 1:
                    break
            if size > most:
                # a decoder allocates the declared size up front: 4 GiB for a 30-byte frame
                raise CorruptUpdateError(
                    f"not a complete zstd frame: it declares {size} bytes, its blocks hold "
                    f"at most {most}"
                )
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


def known_total(frames: Sequence[ZstdFrame], limits: CodecLimits) -> int | None:
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
    total = known_total(frames, limits)
    dctx = decompressor()
    try:
        if total is not None and len(frames) == 1:
            return dctx.decompress(view[frames[0].start : frames[0].end])
        if total is not None:  # one buffer of the known size, filled across the frames
            out = bytearray(total)
            got = fill(dctx.stream_reader(view, read_across_frames=True), memoryview(out))
            if got != total:
                raise CorruptUpdateError("not a complete zstd frame: shorter than it declares")
            return out
        return b"".join(_each_frame(view, frames, limits))
    except zstandard.ZstdError as exc:
        raise CorruptUpdateError(f"not a complete zstd frame: {exc}") from exc
    except MemoryError:  # an object within the caps that this process has no room for
        raise LimitExceededError(
            f"update of {total if total is not None else 'unknown'} bytes: out of memory"
        ) from None


def _each_frame(view: memoryview, frames: Sequence[ZstdFrame], limits: CodecLimits) -> list[bytes]:
    """Each frame decompressed alone, refusing output past ``max_file_bytes`` in all (a frame
    need not declare its size); raises ``zstandard.ZstdError`` on a damaged frame."""
    dctx = decompressor()
    parts: list[bytes] = []
    room = limits.max_file_bytes
    for f in frames:
        part = dctx.decompress(view[f.start : f.end], max_output_size=max(room, 1))
        room -= len(part)
        if room < 0:
            raise LimitExceededError(f"update exceeds the cap of {limits.max_file_bytes}")
        parts.append(part)
    return parts


def fill(reader: Any, view: memoryview) -> int:
    """Read from a zstd stream reader until ``view`` is full or the stream ends."""
    got = 0
    while got < len(view):
        k = reader.readinto(view[got:])
        if not k:
            break
        got += k
    return int(got)


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


def describe_frames(
    data: bytes | bytearray | memoryview, limits: CodecLimits = DEFAULT_LIMITS
) -> tuple[bytes, tuple[tuple[int, int], ...], tuple[str, ...]]:
    """The raw bytes of a stored object and its frame index (as :func:`encode_update` records
    it), decompressing each frame alone: what a commit that did not write an object (another
    process did) records of it. The index is in the manifest's form, :attr:`FrameIndex.pairs`
    and :attr:`FrameIndex.digests`. An object of one frame, or with skippable frames between
    its frames, has no index (``()``): it is read whole."""
    view = memoryview(data).cast("B")
    found = zstd_frames(view)
    known_total(found, limits)
    try:
        parts = _each_frame(view, found, limits)
    except zstandard.ZstdError as exc:
        raise CorruptUpdateError(f"not a complete zstd frame: {exc}") from exc
    raw = b"".join(parts)
    contiguous = found[0].start == 0 and all(a.end == b.start for a, b in itertools.pairwise(found))
    if len(found) == 1 or not contiguous or found[-1].end != len(view):
        return raw, (), ()
    index = FrameIndex(
        tuple(itertools.accumulate(len(p) for p in parts)),
        tuple(f.end for f in found),
        tuple(frame_digest(p) for p in parts),
    )
    return raw, index.pairs, index.digests


@dataclass(frozen=True)
class FrameIndex:
    """Where the frames of a stored update lie (:func:`frame_plan`): frame ``i`` holds the raw
    bytes :meth:`raw_range` ``(i)`` of the safetensors file, is stored as the bytes
    :meth:`stored_range` ``(i)`` of the object, and ``digests[i]`` is the :func:`frame_digest`
    of its raw bytes. The ends are cumulative, as a manifest records them (:attr:`pairs`).
    An update of one frame has an empty index (false): it is read whole."""

    raw_ends: tuple[int, ...] = ()
    stored_ends: tuple[int, ...] = ()
    digests: tuple[str, ...] = ()

    @classmethod
    def from_pairs(cls, frames: Sequence[tuple[int, int]], digests: Sequence[str]) -> FrameIndex:
        """The index a manifest records: cumulative ``(raw_end, stored_end)`` pairs (checked by
        :func:`check_frames` when the manifest is read) and one digest per frame."""
        return cls(tuple(r for r, _ in frames), tuple(s for _, s in frames), tuple(digests))

    @property
    def pairs(self) -> tuple[tuple[int, int], ...]:
        """Each frame's cumulative ``(raw_end, stored_end)``, the form a manifest records."""
        return tuple(zip(self.raw_ends, self.stored_ends, strict=True))

    def __len__(self) -> int:
        return len(self.raw_ends)

    @property
    def raw_bytes(self) -> int:
        """The decompressed file's size: where its last frame ends."""
        return self.raw_ends[-1]

    def raw_range(self, i: int) -> tuple[int, int]:
        """Frame ``i``'s bytes ``[start, end)`` in the decompressed file."""
        return (self.raw_ends[i - 1] if i else 0, self.raw_ends[i])

    def stored_range(self, i: int) -> tuple[int, int]:
        """Frame ``i``'s bytes ``[start, end)`` in the stored object."""
        return (self.stored_ends[i - 1] if i else 0, self.stored_ends[i])


class FrameReader:
    """The frames of a stored object, read by ranged fetches and checked against its index:
    ``fetch(start, end)`` returns the stored bytes ``[start, end)`` (one ranged GET). Frames
    are fetched one range per run of consecutive frames, at most ``run_bytes`` stored bytes
    each (memory is a run and a frame), and each is decompressed alone and checked against its
    digest before a byte of it is used."""

    def __init__(
        self,
        fetch: Callable[[int, int], bytes | bytearray | memoryview],
        index: FrameIndex,
        who: str,
        run_bytes: int,
    ) -> None:
        self.fetch, self.index, self.who, self.run_bytes = fetch, index, who, run_bytes
        self._dctx = decompressor()

    def read(self, needed: Sequence[int]) -> Iterator[tuple[int, bytes]]:
        """``(i, raw bytes)`` of each frame in ``needed`` (increasing), verified."""
        index = self.index
        for run in self._runs(needed):
            lo, hi = index.stored_range(run[0])[0], index.stored_ends[run[-1]]
            got = memoryview(self.fetch(lo, hi)).cast("B")
            if len(got) != hi - lo:
                raise CorruptUpdateError(
                    f"{self.who}: the object is shorter than its frame index "
                    f"({lo + len(got)} of {hi})"
                )
            for i in run:
                s0, s1 = index.stored_range(i)
                yield i, self._raw(i, got[s0 - lo : s1 - lo])

    def _runs(self, needed: Sequence[int]) -> Iterator[list[int]]:
        index = self.index
        run: list[int] = []
        for i in needed:
            start = index.stored_range(run[0])[0] if run else 0
            if run and (i != run[-1] + 1 or index.stored_ends[i] - start > self.run_bytes):
                yield run
                run = []
            run.append(i)
        if run:
            yield run

    def _raw(self, i: int, stored: memoryview) -> bytes:
        r0, r1 = self.index.raw_range(i)
        want = r1 - r0
        try:
            size = zstandard.frame_content_size(stored)
            if size not in (-1, want):
                raise CorruptUpdateError(
                    f"{self.who}: frame {i} declares {size} bytes, its index {want}"
                )
            raw = self._dctx.decompress(stored, max_output_size=want)
        except zstandard.ZstdError as exc:
            raise CorruptUpdateError(f"{self.who}: frame {i} is not a zstd frame: {exc}") from exc
        if len(raw) != want or frame_digest(raw) != self.index.digests[i]:
            raise CorruptUpdateError(
                f"{self.who}: frame {i} (raw bytes {r0}-{r1}) does not match its "
                "digest in the manifest"
            )
        return raw
