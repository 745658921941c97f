"""The blob-store protocol: S3 and memory behave alike; wrappers add behaviour by composition;
the object store's rules hold over any blob store."""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from flstore_core.errors import (
    ConflictError,
    MismatchError,
    NotFoundError,
    UnavailableError,
    ValidationError,
)
from flstore_core.storage.blobs import BlobStore, CountingBlobStore, ReadThroughBlobStore
from flstore_core.storage.memory import MemoryBlobStore
from flstore_core.storage.object_store import ObjectStore
from tests.conftest import small_update


@pytest.fixture(params=["memory", "s3"])
def blobs(request: pytest.FixtureRequest) -> BlobStore:
    if request.param == "memory":
        return MemoryBlobStore()
    s3_store: ObjectStore = request.getfixturevalue("store")
    return s3_store.blobs


def test_missing_keys_are_none(blobs: BlobStore) -> None:
    assert blobs.get("jobs/j/none") is None
    assert blobs.head("jobs/j/none") is None


def test_put_get_head_agree(blobs: BlobStore) -> None:
    blobs.put("jobs/j/a", b"hello", content_type="text/plain")
    assert bytes(blobs.get("jobs/j/a") or b"") == b"hello"
    info = blobs.head("jobs/j/a")
    assert info is not None and info.size == 5
    assert info.etag == hashlib.md5(b"hello", usedforsecurity=False).hexdigest()


def test_listings_are_in_key_order_with_common_prefixes(blobs: BlobStore) -> None:
    for key in ["jobs/b/x", "jobs/a/2", "jobs/a/1", "jobs/a/sub/3"]:
        blobs.put(key, b".")
    assert [i.key for i in blobs.list("jobs/a/")] == ["jobs/a/1", "jobs/a/2", "jobs/a/sub/3"]
    assert list(blobs.list_prefixes("jobs/")) == ["jobs/a/", "jobs/b/"]
    assert list(blobs.list_prefixes("jobs/a/")) == ["jobs/a/sub/"]


def test_a_delimited_listing_leaves_out_what_it_rolls_up(blobs: BlobStore) -> None:
    keys = ["jobs/j/rounds/00000000/manifest.json", "jobs/j/rounds/00000001/manifest.json"]
    keys += [
        f"jobs/j/rounds/0000000{r}/updates/c{i}.safetensors.zst" for r in (0, 1) for i in (1, 2)
    ]
    for key in keys:
        blobs.put(key, b".")
    listed = [i.key for i in blobs.list("jobs/j/rounds/", delimiter="/updates/")]
    assert listed == keys[:2]
    assert len(list(blobs.list("jobs/j/rounds/"))) == len(keys)  # no delimiter: every key


@pytest.mark.slow  # lists thousands of moto objects
def test_manifest_versions_list_one_page_whatever_the_updates(store: ObjectStore) -> None:
    """A job's rounds are found from its manifests alone: 1,200 update objects (more than one
    LIST page of 1,000 keys) are not listed."""
    pages: list[int] = []
    client = store.blobs.client  # type: ignore[attr-defined]

    def count(**kwargs: object) -> None:
        pages.append(1)

    client.meta.events.register("before-call.s3.ListObjectsV2", count)
    keys = [
        f"jobs/j/rounds/{r:08d}/updates/c{i}.safetensors.zst" for r in range(2) for i in range(600)
    ]
    with ThreadPoolExecutor(8) as pool:  # moto's server is threaded: 1,200 PUTs in a few seconds
        list(pool.map(lambda key: store.blobs.put(key, b"."), keys))
    for r in range(2):
        store.blobs.put(f"jobs/j/rounds/{r:08d}/manifest.json", b"{}")
    pages.clear()
    versions = store.manifest_versions("j")
    assert list(versions) == [0, 1] and all(versions.values())
    assert len(pages) == 1


def test_delete_removes_and_tolerates_missing(blobs: BlobStore) -> None:
    blobs.put("jobs/j/a", b"1")
    blobs.delete("jobs/j/a")
    blobs.delete("jobs/j/a")
    assert blobs.get("jobs/j/a") is None


def test_counting_wrapper_counts_what_passes_through_it() -> None:
    inner = MemoryBlobStore()
    counted = CountingBlobStore(inner)
    counted.put("k", b"1")
    counted.get("k")
    counted.get("missing")
    inner.get("k")  # not through the wrapper
    assert (counted.gets, counted.puts) == (2, 1)


def test_read_through_wrapper_reads_one_store_and_writes_the_other() -> None:
    mirror, durable = MemoryBlobStore(), MemoryBlobStore()
    mirror.put("k", b"mirrored")
    both = ReadThroughBlobStore(reads=mirror, writes=durable)
    assert both.get("k") == b"mirrored"
    both.put("result", b"r")
    assert durable.get("result") == b"r" and mirror.get("result") is None


def test_object_store_rules_hold_over_memory() -> None:
    store = ObjectStore(blobs=MemoryBlobStore())
    entries = [store.put_update("j", 0, f"c{i}", small_update(i)) for i in range(3)]
    with pytest.raises(NotFoundError):
        store.get_manifest("j", 0)  # invisible until committed
    manifest = store.commit_round("j", 0, entries)
    assert store.list_rounds("j") == [0] and manifest.clients == ["c0", "c1", "c2"]
    rm = store.read_round("j", 0)
    assert rm.matrix.shape == (3, manifest.n_params)
    assert np.allclose(rm.sq_norms, [e.summary["norm"] ** 2 for e in manifest.updates.values()])
    assert store.put_update("j", 0, "c1", small_update(1)) == manifest.updates["c1"]
    with pytest.raises(ConflictError):
        store.put_update("j", 0, "c1", small_update(7))
    bad = small_update(4)
    bad.tensors["fc.bias"] = np.zeros(3, dtype=np.float32)
    with pytest.raises(MismatchError, match=r"'c4'.*'fc\.bias'"):
        store.put_update("j", 0, "c4", bad)
    assert store.list_jobs() == ["j"]


def test_a_view_shares_the_blobs_but_counts_its_own_gets() -> None:
    store = ObjectStore(blobs=MemoryBlobStore())
    store.put_update("j", 0, "c0", small_update(0))
    store.commit_round("j", 0)
    view = store.view()
    view.read_round("j", 0)
    assert view.gets == 2 and store.gets < view.gets  # manifest + one update


def test_put_object_stays_inside_the_jobs_and_ingest_prefixes() -> None:
    store = ObjectStore(blobs=MemoryBlobStore())
    store.put_object("ingest/deadletter/run.jsonl", b"{}")
    assert store.stat("ingest/deadletter/run.jsonl") is not None
    with pytest.raises(ValidationError, match="outside"):
        store.put_object("elsewhere/x", b"")


def test_s3_refusals_become_unavailable_errors(store: ObjectStore) -> None:
    broken = ObjectStore("no-such-bucket-here", client=store.blobs.client)  # type: ignore[attr-defined]
    with pytest.raises(UnavailableError, match="S3 refused"):
        broken.blobs.put("jobs/j/x", b"1")


def test_open_streams_the_blob_in_pieces(blobs: BlobStore) -> None:
    body = bytes(range(256)) * 40
    blobs.put("jobs/j/big", body)
    stream = blobs.open("jobs/j/big")
    assert stream is not None
    pieces = []
    while piece := stream.read(1000):
        pieces.append(piece)
    stream.close()
    assert b"".join(pieces) == body and max(map(len, pieces)) <= 1000
    assert blobs.open("jobs/j/none") is None


def test_wrappers_stream_like_they_get() -> None:
    mirror, durable = MemoryBlobStore(), MemoryBlobStore()
    mirror.put("k", b"mirrored")
    durable.put("k", b"durable")
    counted = CountingBlobStore(ReadThroughBlobStore(reads=mirror, writes=durable))
    stream = counted.open("k")
    assert stream is not None and stream.read() == b"mirrored"
    assert counted.open("missing") is None
    assert counted.gets == 2  # a streamed read is one GET


@pytest.mark.parametrize(
    "sizes",
    [
        [10, 20, 30],  # smaller than S3's minimum part: one PUT
        [6 << 20, 100, 6 << 20, 7],  # large parts copied, a small one joined with its neighbour
        [100, 200, 6 << 20],  # small parts first: joined until they reach the minimum
        [6 << 20],
    ],
    ids=["small", "mixed", "small-first", "one"],
)
def test_compose_concatenates_the_parts_in_order(blobs: BlobStore, sizes: list[int]) -> None:
    rng = np.random.default_rng(len(sizes))
    parts = [f"jobs/j/results/x.parts/{i:05d}" for i in range(len(sizes))]
    bodies = [rng.integers(0, 256, size, dtype=np.uint8).tobytes() for size in sizes]
    for key, body in zip(parts, bodies, strict=True):
        blobs.put(key, body)
    blobs.compose("jobs/j/results/x", parts, tags={"flstore:kind": "result"})
    assert bytes(blobs.get("jobs/j/results/x") or b"") == b"".join(bodies)
    assert all(blobs.get(p) is not None for p in parts)  # the parts stay until deleted


def test_compose_of_a_missing_part_is_unavailable(blobs: BlobStore) -> None:
    blobs.put("jobs/j/results/y.parts/0", b"abc")
    with pytest.raises(UnavailableError, match="does not exist"):
        blobs.compose("jobs/j/results/y", ["jobs/j/results/y.parts/0", "jobs/j/results/y.parts/1"])
    assert blobs.get("jobs/j/results/y") is None
