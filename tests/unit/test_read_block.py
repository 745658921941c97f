"""Reading a column block of a round: ``ObjectStore.read_round_block`` streams each
client's update and keeps the block's columns; the blocks of every layout put side by side are
``read_round``'s matrix, bitwise, over S3 (moto) and memory, whatever order each client stored
its tensors in."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from flstore_core.data.blocks import block_ranges, block_specs
from flstore_core.data.codec import Update
from flstore_core.data.rows import base_vector
from flstore_core.errors import NotFoundError, StoredObjectCorruptError, ValidationError
from flstore_core.storage.memory import MemoryBlobStore
from flstore_core.storage.object_store import ObjectStore
from tests.conftest import small_update

N_CLIENTS = 5


def _reordered(update: Update, seed: int) -> Update:
    names = list(update.tensors)
    np.random.default_rng(seed).shuffle(names)
    return Update({n: update.tensors[n] for n in names}, update.num_examples, update.metrics)


@pytest.fixture(params=["memory", "s3"])
def round_store(request: pytest.FixtureRequest) -> ObjectStore:
    """A store holding round 1 of job ``j`` (each client's tensors in a different order, an
    int64 tensor among them) and its base, ``global/0``."""
    if request.param == "memory":
        st = ObjectStore(blobs=MemoryBlobStore(), max_workers=2)
    else:
        st = request.getfixturevalue("store")
    for i in range(N_CLIENTS):
        st.put_update("j", 1, f"c{i}", _reordered(small_update(i), seed=i))
    st.commit_round("j", 1)
    st.put_global("j", 0, _reordered(small_update(99), seed=7))
    return st


def test_blocks_of_every_layout_are_the_round_matrix(round_store: ObjectStore) -> None:
    whole = round_store.read_round("j", 1)
    manifest = round_store.get_manifest("j", 1)
    for k, chunk in itertools.product(range(1, 6), [7, 1 << 20]):
        view = round_store.view()
        blocks = [
            view.read_round_block("j", 1, cols, manifest=manifest, chunk_bytes=chunk)
            for cols in block_ranges(manifest.tensors, k)
        ]
        assert view.gets == k * N_CLIENTS  # one streamed GET per client and block
        joined = np.concatenate([b.matrix for b in blocks], axis=1)
        np.testing.assert_array_equal(joined.view(np.uint32), whole.matrix.view(np.uint32))
        for block, cols in zip(blocks, block_ranges(manifest.tensors, k), strict=True):
            assert block.clients == whole.clients
            assert block.specs == block_specs(manifest.tensors, cols)
            np.testing.assert_array_equal(block.num_examples, whole.num_examples)
            part = whole.matrix[:, cols[0] : cols[1]].astype(np.float64)
            np.testing.assert_allclose(block.sq_norms, (part**2).sum(axis=1), rtol=1e-5)


def test_a_subset_of_clients_reads_their_rows_only(round_store: ObjectStore) -> None:
    block = round_store.read_round_block("j", 1, (3, 40), clients=["c3", "c1"])
    whole = round_store.read_round("j", 1, ["c3", "c1"])
    np.testing.assert_array_equal(block.matrix, whole.matrix[:, 3:40])
    with pytest.raises(NotFoundError, match="'c9'"):
        round_store.read_round_block("j", 1, (0, 4), clients=["c9"])
    with pytest.raises(ValidationError, match="columns"):
        round_store.read_round_block("j", 1, (0, 10**6))


def test_the_base_block_is_the_base_vector_s_columns(round_store: ObjectStore) -> None:
    manifest = round_store.get_manifest("j", 1)
    base = base_vector(round_store.get_base("j", 1), manifest.tensors)
    assert base is not None
    for a, b in block_ranges(manifest.tensors, 3):
        got = round_store.read_base_block("j", 1, manifest.tensors, (a, b), chunk_bytes=16)
        assert got is not None
        np.testing.assert_array_equal(got, base[a:b])
    assert round_store.read_base_block("j", 5, manifest.tensors, (0, 4)) is None  # no global/4
    round_store.put_global("j", 3, Update({"other": np.ones(3, np.float32)}))
    assert round_store.read_base_block("j", 4, manifest.tensors, (0, 4)) is None  # no fit


def test_a_damaged_update_is_a_stored_object_error_naming_its_key() -> None:
    st = ObjectStore(blobs=MemoryBlobStore())
    for i in range(3):
        st.put_update("j", 0, f"c{i}", small_update(i))
    manifest = st.commit_round("j", 0)
    key = manifest.updates["c1"].key
    st.blobs.put(key, st.get_object(manifest.updates["c2"].key))  # another client's bytes
    with pytest.raises(StoredObjectCorruptError, match=f"{key}.*checksum"):
        st.read_round_block("j", 0, (0, 10))
