"""The object store on a moto S3 server: visibility, idempotence, concurrency, verification."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from flstore_core.data import layout
from flstore_core.data.codec import Update
from flstore_core.data.manifest import JobSpec
from flstore_core.errors import (
    ConflictError,
    MismatchError,
    NotFoundError,
    StoredObjectCorruptError,
    ValidationError,
)
from flstore_core.storage.object_store import ObjectStore
from tests.conftest import small_update


def _keys(store: ObjectStore, prefix: str = "jobs/") -> list[str]:
    resp = store.blobs.client.list_objects_v2(Bucket=store.bucket, Prefix=prefix)
    return sorted(o["Key"] for o in resp.get("Contents", []))


def test_round_is_invisible_until_committed(store: ObjectStore) -> None:
    store.put_update("j", 0, "c1", small_update(1))
    assert store.list_rounds("j") == []
    with pytest.raises(NotFoundError):
        store.get_manifest("j", 0)
    with pytest.raises(NotFoundError):
        store.read_round("j", 0)
    store.commit_round("j", 0)
    assert store.list_rounds("j") == [0]


def test_commit_writes_a_complete_manifest(store: ObjectStore) -> None:
    entries = [store.put_update("j", 2, f"c{i}", small_update(i)) for i in range(3)]
    manifest = store.commit_round("j", 2, entries)
    assert manifest.clients == ["c0", "c1", "c2"]
    again = store.get_manifest("j", 2)
    assert again.to_json() == manifest.to_json()
    e = again.updates["c1"]
    assert e.key == layout.update_key("j", 2, "c1")
    assert e.num_examples == 11 and e.metrics == {"loss": 1.5}
    assert len(e.sha256) == 64 and e.stored_bytes > 0 and e.raw_bytes > 0
    assert [t.name for t in again.tensors] == list(small_update().tensors)
    flat = np.concatenate(
        [np.asarray(a, np.float32).ravel() for a in small_update(1).tensors.values()]
    )
    assert e.summary["norm"] == pytest.approx(float(np.linalg.norm(flat)), rel=1e-5)


def test_rewriting_the_same_update_is_idempotent(store: ObjectStore) -> None:
    store.put_update("j", 0, "c1", small_update(1))
    first = store.commit_round("j", 0)
    keys = _keys(store)
    store.put_update("j", 0, "c1", small_update(1))
    second = store.commit_round("j", 0)
    assert first.to_json() == second.to_json()
    assert _keys(store) == keys


def test_a_different_update_for_a_committed_client_is_refused(store: ObjectStore) -> None:
    store.put_update("j", 0, "c1", small_update(1))
    before = store.commit_round("j", 0)
    with pytest.raises(ConflictError):
        store.put_update("j", 0, "c1", small_update(2))
    assert store.get_manifest("j", 0).to_json() == before.to_json()
    np.testing.assert_array_equal(
        store.get_update("j", 0, "c1").tensors["fc.weight"], small_update(1).tensors["fc.weight"]
    )


def test_recommit_with_a_late_client_gives_the_union(store: ObjectStore) -> None:
    # a late client joins a committed round only where the job spec allows it
    store.put_job_spec(JobSpec("j", late_clients={"within_s": 600}))
    store.put_update("j", 1, "a", small_update(1))
    store.commit_round("j", 1)
    store.put_update("j", 1, "b", small_update(2))
    assert store.get_manifest("j", 1).clients == ["a"]
    assert store.commit_round("j", 1).clients == ["a", "b"]


def test_eight_concurrent_writers_then_commit_lose_nothing(store: ObjectStore, s3_server) -> None:  # type: ignore[no-untyped-def]
    errors: list[BaseException] = []

    def write(i: int) -> None:
        try:
            # each writer has its own store, as separate processes would
            ObjectStore(store.bucket, endpoint_url=s3_server.url).put_update(
                "j", 0, f"client-{i}", small_update(i)
            )
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    manifest = store.commit_round("j", 0)
    assert manifest.clients == [f"client-{i}" for i in range(8)]
    rm = store.read_round("j", 0)
    for i, client in enumerate(rm.clients):
        expect = np.concatenate(
            [np.asarray(a, np.float32).ravel() for a in small_update(i).tensors.values()]
        )
        np.testing.assert_array_equal(rm.matrix[rm.row_of(client)], expect)


def test_shape_mismatch_is_refused_with_nothing_committed(store: ObjectStore) -> None:
    store.put_update("j", 0, "good", small_update(1))
    store.put_update("j", 0, "good2", small_update(3))
    bad = small_update(2)
    bad.tensors["fc.weight"] = np.zeros((10, 17), np.float32)
    store.put_update("j", 0, "bad", bad)
    with pytest.raises(MismatchError, match=r"client 'bad'.*fc\.weight"):
        store.commit_round("j", 0)
    assert store.list_rounds("j") == []


def test_mismatch_against_a_committed_round_is_refused_before_writing(store: ObjectStore) -> None:
    store.put_update("j", 0, "good", small_update(1))
    store.commit_round("j", 0)
    keys = _keys(store)
    bad = small_update(2)
    del bad.tensors["conv.bias"]
    with pytest.raises(MismatchError, match=r"client 'late'.*conv\.bias"):
        store.put_update("j", 0, "late", bad)
    assert _keys(store) == keys


def test_dtype_mismatch_names_client_and_tensor(store: ObjectStore) -> None:
    store.put_update("j", 0, "a", small_update(1))
    bad = small_update(2)
    bad.tensors["conv.bias"] = bad.tensors["conv.bias"].astype(np.float64)
    store.put_update("j", 0, "b", bad)
    with pytest.raises(MismatchError, match=r"client 'b'.*conv\.bias.*dtype"):
        store.commit_round("j", 0)


def test_read_round_gives_the_contiguous_matrix(store: ObjectStore) -> None:
    ups = {f"c{i}": small_update(i) for i in range(4)}
    for c, u in ups.items():
        store.put_update("j", 3, c, u)
    store.commit_round("j", 3)
    rm = store.read_round("j", 3)
    assert rm.matrix.flags.c_contiguous and rm.matrix.dtype == np.float32
    assert rm.matrix.shape == (4, sum(s.numel for s in rm.specs))
    assert rm.clients == sorted(ups)
    assert list(rm.num_examples) == [ups[c].num_examples for c in rm.clients]
    for c in rm.clients:
        back = rm.tensors_of(rm.matrix[rm.row_of(c)])
        for name, arr in ups[c].tensors.items():
            assert back[name].dtype == arr.dtype
            np.testing.assert_array_equal(back[name], arr)
    np.testing.assert_allclose(rm.sq_norms, (rm.matrix.astype(np.float64) ** 2).sum(1), rtol=1e-5)


def test_bfloat16_jobs_read_back_within_the_bound(store: ObjectStore) -> None:
    store.put_job_spec(JobSpec("bf", precision="bfloat16"))
    x = small_update(1)
    entry = store.put_update("bf", 0, "c", x)
    store.commit_round("bf", 0, [entry])
    row = store.read_round("bf", 0).matrix[0]
    expect = np.concatenate([np.asarray(a, np.float32).ravel() for a in x.tensors.values()])
    assert np.all(np.abs(row - expect) <= np.abs(expect) * 2.0**-8)
    assert entry.stored_bytes < encoded_size_f32(store, x)


def encoded_size_f32(store: ObjectStore, upd: Update) -> int:
    from flstore_core.data.codec import encode_update

    return encode_update(upd).stored_bytes


def test_corrupt_stored_object_is_not_served(store: ObjectStore) -> None:
    store.put_update("j", 0, "c", small_update(1))
    store.commit_round("j", 0)
    other = small_update(9)
    from flstore_core.data.codec import encode_update

    store.blobs.client.put_object(
        Bucket=store.bucket, Key=layout.update_key("j", 0, "c"), Body=encode_update(other).data
    )
    with pytest.raises(StoredObjectCorruptError, match="checksum"):
        store.read_round("j", 0)
    with pytest.raises(StoredObjectCorruptError):
        store.get_update("j", 0, "c")


def test_undeclared_job_gets_a_default_spec(store: ObjectStore) -> None:
    store.put_update("new-job", 0, "c", small_update())
    spec = store.view().get_job_spec("new-job")
    assert spec.precision == "float32" and spec.model is None


def test_job_spec_round_trips(store: ObjectStore) -> None:
    store.put_job_spec(JobSpec("j", model="digits_cnn", hyperparameters={"lr": 0.1}))
    fresh = store.view()
    spec = fresh.get_job_spec("j")
    assert (spec.model, spec.hyperparameters) == ("digits_cnn", {"lr": 0.1})
    with pytest.raises(NotFoundError):
        fresh.get_job_spec("nope")


def test_global_initial_and_validation_round_trip(store: ObjectStore) -> None:
    store.put_initial("j", small_update(0))
    store.put_global("j", 0, small_update(1))
    np.testing.assert_array_equal(
        store.get_global("j", 0).tensors["fc.bias"], small_update(1).tensors["fc.bias"]
    )
    assert store.get_base("j", 0) is not None and store.get_base("j", 1) is not None
    assert store.get_base("j", 5) is None
    x = np.random.default_rng(0).random((5, 1, 8, 8)).astype(np.float32)
    y = np.arange(5)
    store.put_validation_set("j", x, y)
    x2, y2 = store.get_validation_set("j")
    np.testing.assert_array_equal(x2, x)
    assert y2.dtype == np.int64 and list(y2) == list(y)


def test_bad_ids_fail_before_any_io(store: ObjectStore) -> None:
    before = store.puts + store.gets
    with pytest.raises(ValidationError):
        store.put_update("../x", 0, "c", small_update())
    with pytest.raises(ValidationError):
        store.put_update("j", -1, "c", small_update())
    with pytest.raises(ValidationError):
        store.put_update("j", 0, "..", small_update())
    assert store.puts + store.gets == before
    assert _keys(store) == []


def test_bad_validation_set_is_refused(store: ObjectStore) -> None:
    with pytest.raises(ValidationError):
        store.put_validation_set("j", np.zeros((3, 4)), np.zeros(2))


def test_recommit_with_new_summaries_rewrites_the_manifest(store: ObjectStore) -> None:
    store.put_update("j", 0, "c", small_update(1))
    store.commit_round("j", 0)
    store.commit_round("j", 0, summaries={"c": {"contribution": 0.5}})
    assert store.get_manifest("j", 0).updates["c"].summary["contribution"] == 0.5


# ---------------------------------------------------------------- one mapping of damaged bytes


def _memory_store() -> ObjectStore:
    from flstore_core.storage.memory import MemoryBlobStore

    return ObjectStore("mem", blobs=MemoryBlobStore())


def _big_update(seed: int) -> Update:
    """An update of several zstd frames (over 64 KiB), read by ranged GETs in blocks."""
    rng = np.random.default_rng(seed)
    return Update({"w": rng.standard_normal(40_000).astype(np.float32)}, num_examples=1)


def _flip_a_byte(store: ObjectStore, key: str) -> None:
    data = bytearray(store.get_object(key))
    data[len(data) // 2] ^= 0xFF
    store.blobs.put(key, bytes(data))


@pytest.mark.parametrize(
    "read",
    [
        lambda s: s.get_update("j", 0, "c"),
        lambda s: s.read_round("j", 0),
        lambda s: s.read_round_block("j", 0, (0, 40_000)),
        lambda s: s.read_round_block("j", 0, (30_000, 40_000)),
        lambda s: s.get_global("j", 0),
        lambda s: s.read_base_block("j", 1, s.get_manifest("j", 0).tensors, (0, 10)),
        lambda s: s.get_initial("j"),
    ],
    ids=["update", "round", "whole-block", "framed-block", "global", "base-block", "initial"],
)
def test_every_read_of_a_damaged_object_is_a_503_naming_its_key(read) -> None:  # type: ignore[no-untyped-def]
    store = _memory_store()
    store.put_update("j", 0, "c", _big_update(0))
    store.commit_round("j", 0)
    assert store.get_manifest("j", 0).updates["c"].frames  # the framed path is taken
    store.put_global("j", 0, _big_update(1))
    store.put_initial("j", _big_update(2))
    _flip_a_byte(store, layout.update_key("j", 0, "c"))  # fails its checksum or frame digest
    for key in (layout.global_key("j", 0), layout.initial_key("j")):  # no manifest checks these
        store.blobs.put(key, b"\x28\xb5\x2f\xfd not a zstd frame")
    with pytest.raises(StoredObjectCorruptError) as caught:
        read(store)
    assert caught.value.status == 503 and caught.value.code == "stored_object_corrupt"
    assert caught.value.message.startswith("jobs/j/")


def test_a_base_model_that_does_not_fit_the_round_is_no_base() -> None:
    store = _memory_store()
    store.put_update("j", 0, "c", _big_update(0))
    store.commit_round("j", 0)
    store.put_initial("j", small_update(1))
    tensors = store.get_manifest("j", 0).tensors
    assert store.read_base_block("j", 0, tensors, (0, 10)) is None
