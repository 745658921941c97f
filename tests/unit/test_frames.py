"""Framed stored updates and range reads of column blocks (a block read costs its share
of the stored bytes, not every client's whole object).

An update is stored as several zstd frames (the header, then the data section in pieces): the
decompressed bytes and their sha256 are exactly the one-frame encoding's (checked against
:func:`serialize` and a one-frame :func:`compress_frame`), each frame decompresses alone to its
slice with the digest the manifest records. ``read_round_block`` on a framed round equals
``read_round``'s columns bitwise for every layout, over memory and S3 (moto), and reads exactly
the header frame plus the frames holding the block's bytes — computed here independently from
the file's own JSON header. A damaged frame is a ``StoredObjectCorruptError`` naming the key;
manifests written before frames existed are read as before.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import struct
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from flstore_core.data.blocks import block_ranges
from flstore_core.data.codec import (
    FrameIndex,
    TensorSpec,
    Update,
    compress_frame,
    decode_frames_columns_into,
    decode_into,
    decode_update,
    decompress,
    describe_frames,
    encode_update,
    frame_plan,
    serialize,
)
from flstore_core.data.codec import frames as codec_frames
from flstore_core.data.manifest import RoundManifest, UpdateEntry
from flstore_core.errors import CorruptUpdateError, StoredObjectCorruptError
from flstore_core.storage.memory import MemoryBlobStore
from flstore_core.storage.object_store import ObjectStore
from tests.conftest import small_update

DTYPES = ["float32", "float64", "float16", "int64", "int32", "uint8", "bool"]
N_CLIENTS = 5
SMALL_FRAMES = 96  # bytes: a small update is a dozen frames


@st.composite
def updates(draw: Any) -> tuple[Update, list[TensorSpec]]:
    """A random update (mixed dtypes, some empty tensors) in a random file order, and the
    canonical specs (the order it was drawn in)."""
    n = draw(st.integers(1, 6))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    tensors: dict[str, npt.NDArray[Any]] = {}
    for i in range(n):
        shape = tuple(draw(st.lists(st.integers(0, 9), min_size=0, max_size=3)))
        dtype = np.dtype(draw(st.sampled_from(DTYPES)))
        if dtype.kind == "f":
            arr = (rng.standard_normal(shape) * 3).astype(dtype)
        elif dtype.kind == "b":
            arr = rng.integers(0, 2, shape).astype(bool)
        else:
            arr = rng.integers(0, 200, shape).astype(dtype)
        tensors[f"layer{i}.w"] = np.asarray(arr)
    tensors["bias"] = rng.standard_normal(draw(st.integers(1, 40))).astype(np.float32)
    canonical = Update(tensors).specs()
    names = list(tensors)
    rng.shuffle(names)
    upd = Update({k: tensors[k] for k in names}, 7, {"loss": 0.25}, "j", 1, "c")
    return upd, canonical


def _row(data: bytes, specs: list[TensorSpec]) -> npt.NDArray[np.float32]:
    out = np.empty(sum(s.numel for s in specs), np.float32)
    decode_into(data, out, specs)
    return out


@settings(max_examples=150, deadline=None)
@given(
    updates(),
    st.sampled_from(["float32", "bfloat16", "float16"]),
    st.integers(1, 300),
    st.integers(1, 5),
)
def test_frames_are_the_one_frame_bytes_and_every_block_decodes_from_its_frames(
    drawn: tuple[Update, list[TensorSpec]], precision: Any, frame_bytes: int, k: int
) -> None:
    upd, specs = drawn
    raw = serialize(upd, precision)
    one = compress_frame(raw)  # today's encoding: the whole file, one frame
    enc = encode_update(upd, precision, frame_bytes=frame_bytes)
    assert decompress(enc.data) == raw
    assert (
        enc.sha256 == hashlib.sha256(raw).hexdigest() == hashlib.sha256(decompress(one)).hexdigest()
    )
    assert enc.raw_bytes == len(raw)
    ref = decode_update(one)
    got = decode_update(enc.data, expected_sha256=enc.sha256)
    for name, arr in ref.tensors.items():
        np.testing.assert_array_equal(got.tensors[name], arr)
    # the frame index: each frame alone decompresses to its raw slice, with its digest
    (head_len,) = struct.unpack("<Q", raw[:8])
    if len(raw) <= frame_bytes:
        assert enc.frames == () and enc.data == one
    else:
        assert len(enc.frames) >= 2 and enc.frames[0][0] == 8 + head_len  # the header alone
        assert enc.frames[-1] == (len(raw), len(enc.data))
        starts = [(0, 0), *enc.frames[:-1]]
        for (r0, s0), (r1, s1), digest in zip(starts, enc.frames, enc.frame_digests, strict=True):
            piece = zstandard.ZstdDecompressor().decompress(enc.data[s0:s1])
            assert piece == raw[r0:r1]
            assert digest == hashlib.sha256(piece).hexdigest()[:32]
            assert r1 - r0 <= max(frame_bytes, 8 + head_len)
        assert describe_frames(enc.data) == (raw, enc.frames, enc.frame_digests)
        whole = _row(one, specs)
        for a, b in block_ranges(specs, min(k, len(whole))):
            out = np.full(b - a, np.nan, np.float32)
            row = decode_frames_columns_into(
                lambda s, e: enc.data[s:e], enc.frame_index, out, specs, (a, b)
            )
            np.testing.assert_array_equal(out.view(np.uint32), whole[a:b].view(np.uint32))
            assert row.raw_bytes == len(raw)
            assert row.sq_norm == pytest.approx(float(np.dot(whole[a:b], whole[a:b])), rel=1e-5)


def test_frame_sizes_follow_the_plan() -> None:
    mib = 1 << 20
    assert frame_plan(1000, 100) == [1000]  # a tiny update stays one frame
    one_mb = frame_plan(1_000_000 + 200, 200)
    assert one_mb[0] == 200 and len(one_mb) == 1 + 16  # 64 KiB data frames
    resnet18 = frame_plan(46_800_000, 30_000)
    assert len(resnet18) - 1 == 64 and resnet18[-1] == 46_800_000
    resnet50 = frame_plan(102_000_000, 60_000)
    assert max(b - a for a, b in itertools.pairwise(resnet50)) == mib
    assert len(resnet50) - 1 == -(-(102_000_000 - 60_000) // mib)


@pytest.fixture
def small_frames(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(codec_frames, "FRAME_BYTES", SMALL_FRAMES)


def _reordered(update: Update, seed: int) -> Update:
    names = list(update.tensors)
    np.random.default_rng(seed).shuffle(names)
    return Update({n: update.tensors[n] for n in names}, update.num_examples, update.metrics)


@pytest.fixture(params=["memory", "s3"])
def framed_store(request: pytest.FixtureRequest, small_frames: None) -> ObjectStore:
    """Round 1 of job ``j``, each client's tensors in another order, stored in small frames."""
    if request.param == "memory":
        st_ = ObjectStore(blobs=MemoryBlobStore(), max_workers=2)
    else:
        st_ = request.getfixturevalue("store")
    for i in range(N_CLIENTS):
        st_.put_update("j", 1, f"c{i}", _reordered(small_update(i), seed=i))
    st_.commit_round("j", 1)
    return st_


def _expected_reads(
    store: ObjectStore, entry: UpdateEntry, specs: tuple[TensorSpec, ...], cols: tuple[int, int]
) -> tuple[int, int]:
    """(stored bytes, GETs) a framed block read needs: the header frame unless the file is in
    the round's tensor order, then the frames that overlap the block's byte ranges, one GET
    per run of consecutive frames. The byte ranges come from the file's own JSON header."""
    raw = decompress(store.get_object(entry.key))
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    ranges = []
    pos = 0
    for s in specs:
        lo, hi = max(pos, cols[0]), min(pos + s.numel, cols[1])
        if lo < hi:
            size = np.dtype(np.float32 if header[s.name]["dtype"] == "F32" else np.int64).itemsize
            start = 8 + n + header[s.name]["data_offsets"][0]
            ranges.append((start + (lo - pos) * size, start + (hi - pos) * size))
        pos += s.numel
    starts = [(0, 0), *entry.frames[:-1]]
    head = [i for i, (r0, _) in enumerate(starts) if r0 < 8 + n]
    # a file in the round's order has the header the manifest implies: not read
    in_order = [name for name in header if name != "__metadata__"] == [s.name for s in specs]
    need = [
        i
        for i, ((r0, _), (r1, _)) in enumerate(zip(starts, entry.frames, strict=True))
        if i not in head and any(lo < r1 and r0 < hi for lo, hi in ranges)
    ]
    size = sum(entry.frames[i][1] - starts[i][1] for i in ([] if in_order else head) + need)
    runs = sum(1 for j, i in enumerate(need) if j == 0 or need[j - 1] != i - 1)
    return size, (0 if in_order else 1) + runs


def test_blocks_of_a_framed_round_are_the_round_matrix_and_read_only_their_frames(
    framed_store: ObjectStore,
) -> None:
    whole = framed_store.read_round("j", 1)
    manifest = framed_store.get_manifest("j", 1)
    assert all(len(e.frames) > 5 for e in manifest.updates.values())
    stored = manifest.stored_bytes
    for k in range(1, 6):
        view = framed_store.view()
        layout = block_ranges(manifest.tensors, k)
        blocks = [view.read_round_block("j", 1, cols, manifest=manifest) for cols in layout]
        joined = np.concatenate([b.matrix for b in blocks], axis=1)
        np.testing.assert_array_equal(joined.view(np.uint32), whole.matrix.view(np.uint32))
        for block, cols in zip(blocks, layout, strict=True):
            part = whole.matrix[:, cols[0] : cols[1]].astype(np.float64)
            np.testing.assert_allclose(block.sq_norms, (part**2).sum(axis=1), rtol=1e-5)
        if k == 1:  # the whole row: one streamed GET per client, the whole-file sha256
            assert view.gets == N_CLIENTS and view.range_bytes == 0
            continue
        want = [
            _expected_reads(framed_store, e, manifest.tensors, cols)
            for cols in layout
            for e in manifest.updates.values()
        ]
        assert view.range_bytes == sum(b for b, _ in want)
        assert view.gets == sum(g for _, g in want)
        # every block reads about its share: stored/k plus, per client, the header frame and
        # two edge frames per tensor slice of the block (tensors reordered in each file)
        biggest = max(
            s1 - s0
            for e in manifest.updates.values()
            for (_, s0), (_, s1) in zip([(0, 0), *e.frames[:-1]], e.frames, strict=True)
        )
        assert view.range_bytes < stored + k * N_CLIENTS * 2 * 2 * biggest


def test_a_large_float32_block_reads_its_share(monkeypatch: pytest.MonkeyPatch) -> None:
    """100k float32 parameters in 40 tensors, in canonical order, 4 KiB frames: a block of a
    quarter of the columns reads at most a quarter of the stored bytes plus, per client, the
    header frame and two edge frames."""
    monkeypatch.setattr(codec_frames, "FRAME_BYTES", 4096)
    st_ = ObjectStore(blobs=MemoryBlobStore(), max_workers=2)
    rng = np.random.default_rng(3)
    for i in range(3):
        tensors = {f"t{j}": rng.standard_normal(2500).astype(np.float32) for j in range(40)}
        st_.put_update("big", 0, f"c{i}", Update(tensors))
    manifest = st_.commit_round("big", 0)
    whole = st_.read_round("big", 0)
    for cols in block_ranges(manifest.tensors, 4):
        view = st_.view()
        block = view.read_round_block("big", 0, cols, manifest=manifest)
        np.testing.assert_array_equal(block.matrix, whole.matrix[:, cols[0] : cols[1]])
        edges = sum(
            e.frames[0][1] + 2 * max(b[1] - a[1] for a, b in itertools.pairwise(e.frames))
            for e in manifest.updates.values()
        )
        assert view.range_bytes <= manifest.stored_bytes / 4 + edges
        assert view.gets == len(manifest.updates)  # one run each: the header is known


def test_a_damaged_frame_is_a_stored_object_error_naming_its_key(small_frames: None) -> None:
    st_ = ObjectStore(blobs=MemoryBlobStore())
    for i in range(3):
        st_.put_update("j", 0, f"c{i}", small_update(i))
    manifest = st_.commit_round("j", 0)
    entry = manifest.updates["c1"]
    data = bytearray(st_.get_object(entry.key))
    # frame 1: the first data bytes (conv.weight's, the columns [0, 10) read below)
    (r0, s0), (r1, s1) = entry.frames[0], entry.frames[1]
    raw = bytearray(decompress(bytes(data))[r0:r1])
    raw[0] ^= 0x40  # one changed value; the frame still decompresses
    forged = compress_frame(raw)
    assert len(forged) == s1 - s0
    data[s0:s1] = forged
    st_.blobs.put(entry.key, bytes(data))
    with pytest.raises(StoredObjectCorruptError, match=f"{entry.key}.*frame 1.*digest"):
        st_.read_round_block("j", 0, (0, 10))
    data[s0 + 5] ^= 0xFF  # damaged compressed bytes
    st_.blobs.put(entry.key, bytes(data))
    with pytest.raises(StoredObjectCorruptError, match=entry.key):
        st_.read_round_block("j", 0, (0, 10))
    with pytest.raises(StoredObjectCorruptError, match=entry.key):
        st_.read_round("j", 0)  # the whole-file sha256 too


def test_manifests_without_frames_are_read_whole(small_frames: None) -> None:
    st_ = ObjectStore(blobs=MemoryBlobStore())
    for i in range(3):
        st_.put_update("j", 0, f"c{i}", small_update(i))
    manifest = st_.commit_round("j", 0)
    old = RoundManifest(
        manifest.job,
        manifest.round,
        manifest.precision,
        manifest.tensors,
        {
            c: dataclasses.replace(e, frames=(), frame_sha256=())
            for c, e in manifest.updates.items()
        },
    )
    as_read = json.loads(old.to_json())
    assert all("frames" not in e for e in as_read["updates"].values())  # the old format
    old = RoundManifest.from_json(old.to_json())
    view = st_.view()
    block = view.read_round_block("j", 0, (5, 30), manifest=old)
    np.testing.assert_array_equal(block.matrix, st_.read_round("j", 0).matrix[:, 5:30])
    assert view.gets == 3 and view.range_bytes == 0  # one streamed GET per client


def test_a_bad_frame_index_is_a_corrupt_manifest(small_frames: None) -> None:
    st_ = ObjectStore(blobs=MemoryBlobStore())
    st_.put_update("j", 0, "c0", small_update(0))
    manifest = json.loads(st_.commit_round("j", 0).to_json())
    entry = manifest["updates"]["c0"]
    for bad in (
        {"frames": entry["frames"][:-1]},  # digests and frames disagree
        {"frames": [*entry["frames"][:-1], [entry["raw_bytes"], entry["stored_bytes"] + 9]]},
        {"frame_sha256": ["z" * 32] * len(entry["frames"])},
    ):
        obj = {**manifest, "updates": {"c0": {**entry, **bad}}}
        with pytest.raises(StoredObjectCorruptError, match="manifest is not valid"):
            RoundManifest.from_json(json.dumps(obj).encode())


def test_a_commit_of_updates_another_process_wrote_records_their_frames(
    small_frames: None,
) -> None:
    blobs = MemoryBlobStore()
    writer = ObjectStore(blobs=blobs)
    written = {f"c{i}": writer.put_update("j", 0, f"c{i}", small_update(i)) for i in range(3)}
    manifest = ObjectStore(blobs=blobs).commit_round("j", 0)  # reads the objects back
    for client, entry in written.items():
        assert entry.frames and manifest.updates[client].frames == entry.frames
        assert manifest.updates[client].frame_sha256 == entry.frame_sha256
        assert manifest.updates[client].sha256 == entry.sha256


def test_a_one_frame_object_has_no_index() -> None:
    raw = serialize(small_update(0))
    assert describe_frames(compress_frame(raw)) == (raw, (), ())
    enc = encode_update(small_update(0))
    assert enc.frames == () and not enc.frame_index  # tiny: one frame, as before


def test_a_frame_index_gives_each_frames_raw_and_stored_range() -> None:
    index = FrameIndex.from_pairs([(10, 4), (30, 9), (35, 12)], ["a", "b", "c"])
    assert len(index) == 3 and index.raw_bytes == 35
    assert [index.raw_range(i) for i in range(3)] == [(0, 10), (10, 30), (30, 35)]
    assert [index.stored_range(i) for i in range(3)] == [(0, 4), (4, 9), (9, 12)]
    assert index.pairs == ((10, 4), (30, 9), (35, 12)) and index.digests == ("a", "b", "c")


def test_an_encoded_updates_frame_index_is_what_its_manifest_records() -> None:
    enc = encode_update(small_update(0), frame_bytes=64)
    assert len(enc.frame_index) >= 2
    assert FrameIndex.from_pairs(enc.frames, enc.frame_digests) == enc.frame_index


@pytest.mark.parametrize("backend", ["memory", "s3"])
def test_ranged_gets(backend: str, request: pytest.FixtureRequest) -> None:
    blobs = MemoryBlobStore() if backend == "memory" else request.getfixturevalue("store").blobs
    blobs.put("jobs/x/a", bytes(range(100)))
    assert bytes(blobs.get_range("jobs/x/a", 10, 20) or b"?") == bytes(range(10, 20))
    assert bytes(blobs.get_range("jobs/x/a", 95, 200) or b"?") == bytes(range(95, 100))
    assert blobs.get_range("jobs/x/missing", 0, 4) is None


def test_frame_reads_refuse_a_short_object() -> None:
    enc = encode_update(small_update(0), frame_bytes=64)
    specs = small_update(0).specs()
    out = np.empty(10, np.float32)
    with pytest.raises(CorruptUpdateError, match="shorter than its frame index"):
        decode_frames_columns_into(
            lambda s, e: enc.data[s : min(e, 200)],
            enc.frame_index,
            out,
            specs,
            (0, 10),
        )
