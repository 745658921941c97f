"""Committed means final (ARCHITECTURE §2): a job's initial model and a round's global model,
clients, updates and ``num_examples`` are never replaced, commits are conditional creates, a
late client joins only where the job allows it, a backfill only adds summaries, and a job's
model and validation set change once it has rounds only when forced.

Each test runs on moto's S3 (the ``store`` fixture, conditional PUTs over HTTP) and on the
memory blob store.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import pytest

from flstore_core.data import layout
from flstore_core.data.manifest import CONTRIBUTION, JobSpec
from flstore_core.errors import ConflictError, PreconditionFailedError
from flstore_core.storage.memory import MemoryBlobStore
from flstore_core.storage.object_store import ObjectStore
from tests.conftest import small_update


@pytest.fixture(params=["s3", "memory"])
def any_store(request: pytest.FixtureRequest) -> Iterator[ObjectStore]:
    if request.param == "s3":
        yield request.getfixturevalue("store")
    else:
        yield ObjectStore(blobs=MemoryBlobStore())


def committed_round(store: ObjectStore, job: str = "j", round_: int = 0, n: int = 3) -> None:
    for i in range(n):
        store.put_update(job, round_, f"c{i}", small_update(i + 10 * round_))
    store.commit_round(job, round_)


# ---------------------------------------------------------------- 1. initial and global models


def test_an_initial_model_once_stored_is_never_replaced(any_store: ObjectStore) -> None:
    store = any_store
    store.put_initial("j", small_update(1))
    key = layout.initial_key("j")
    first = store.get_object(key)
    store.put_initial("j", small_update(1))  # the same model again: success
    with pytest.raises(ConflictError, match=r"initial model.*sha256 [0-9a-f]{64}") as caught:
        store.put_initial("j", small_update(2))
    assert caught.value.status == 409 and caught.value.code == "conflict"
    assert key in caught.value.message
    assert store.get_object(key) == first


def test_a_global_model_once_stored_is_never_replaced(any_store: ObjectStore) -> None:
    store = any_store
    store.put_global("j", 0, small_update(1))
    planted = small_update(7, scale=100.0)
    with pytest.raises(ConflictError, match="global model of round 0"):
        store.put_global("j", 0, planted)
    np.testing.assert_array_equal(
        store.get_global("j", 0).tensors["fc.bias"], small_update(1).tensors["fc.bias"]
    )
    store.put_global("j", 0, small_update(1))
    store.put_global("j", 1, planted)  # another round's: its own object


# ---------------------------------------------------------------- 2. a committed round's clients


def test_a_late_client_is_refused_by_default(any_store: ObjectStore) -> None:
    store = any_store
    committed_round(store)
    before = store.manifest_versions("j")
    evil = small_update(9)
    evil.num_examples = 10**9
    late = r"'evil' cannot join round 0.*late_clients is off"
    with pytest.raises(ConflictError, match=late):
        store.put_update("j", 0, "evil", evil)
    # refused before the write: nothing of it is left in the round's prefix
    assert store.blobs.head(layout.update_key("j", 0, "evil")) is None
    # an object that got there anyway (written straight to the bucket) is refused at commit
    stray = ObjectStore(blobs=store.blobs)
    store.blobs.put(
        layout.update_key("j", 0, "evil"), store.blobs.get(layout.update_key("j", 0, "c0"))
    )
    with pytest.raises(ConflictError, match=late):
        stray.commit_round("j", 0)
    assert store.manifest_versions("j") == before
    assert store.get_manifest("j", 0).clients == ["c0", "c1", "c2"]
    # and stays out of a recommit of the round's own entries (a backfill)
    entries = list(store.get_manifest("j", 0).updates.values())
    store.commit_round("j", 0, entries, summaries={"c0": {CONTRIBUTION: 1.0}})
    assert store.get_manifest("j", 0).clients == ["c0", "c1", "c2"]


def test_a_late_client_joins_within_the_window_and_the_version_changes(
    any_store: ObjectStore,
) -> None:
    store = any_store
    store.put_job_spec(JobSpec("j", late_clients={"within_s": 600}))
    committed_round(store)
    before = store.manifest_versions("j")[0]
    store.put_update("j", 0, "late", small_update(9))
    assert store.commit_round("j", 0).clients == ["c0", "c1", "c2", "late"]
    assert store.manifest_versions("j")[0] != before


def test_a_late_client_past_the_window_is_refused(any_store: ObjectStore) -> None:
    store = any_store
    store.put_job_spec(JobSpec("j", late_clients={"within_s": 0.001}))
    committed_round(store)
    time.sleep(0.05)
    with pytest.raises(ConflictError, match="past the job's late_clients window"):
        store.put_update("j", 0, "late", small_update(9))
    assert store.blobs.head(layout.update_key("j", 0, "late")) is None


def test_a_committed_clients_num_examples_are_final(any_store: ObjectStore) -> None:
    store = any_store
    committed_round(store)
    entry = store.get_manifest("j", 0).updates["c0"]
    forged = type(entry)(**{**entry.__dict__, "num_examples": 10**9})
    with pytest.raises(ConflictError, match=r"'c0' is committed.*num_examples"):
        store.commit_round("j", 0, [forged])
    assert store.get_manifest("j", 0).updates["c0"].num_examples == entry.num_examples


# ---------------------------------------------------------------- 3. conditional writes


def test_conditional_puts_of_every_blob_store(any_store: ObjectStore) -> None:
    blobs = any_store.blobs
    blobs.put("jobs/j/x", b"one", if_absent=True)
    with pytest.raises(PreconditionFailedError):
        blobs.put("jobs/j/x", b"two", if_absent=True)
    info = blobs.head("jobs/j/x")
    assert info is not None
    with pytest.raises(PreconditionFailedError):
        blobs.put("jobs/j/x", b"two", if_match="0" * 32)
    with pytest.raises(PreconditionFailedError):
        blobs.put("jobs/j/missing", b"two", if_match=info.etag)
    blobs.put("jobs/j/x", b"two", if_match=info.etag)
    assert blobs.get("jobs/j/x") == b"two"


class Interloper(MemoryBlobStore):
    """A memory store where another writer puts ``body`` under ``key`` just before our write."""

    def __init__(self) -> None:
        super().__init__()
        self.key = ""
        self.body = b""

    def put(self, key: str, body: bytes, **kwargs: Any) -> None:
        if key == self.key and self.body:
            body_first, self.body = self.body, b""
            super().put(key, body_first)
        super().put(key, body, **kwargs)


def test_a_first_commit_lost_to_an_identical_one_succeeds_to_another_conflicts() -> None:
    blobs = Interloper()
    store = ObjectStore(blobs=blobs)
    for i in range(3):
        store.put_update("j", 0, f"c{i}", small_update(i))
    twin = ObjectStore(blobs=MemoryBlobStore())
    for i in range(3):
        twin.put_update("j", 0, f"c{i}", small_update(i))
    blobs.key, blobs.body = layout.manifest_key("j", 0), twin.commit_round("j", 0).to_json()
    assert store.commit_round("j", 0).clients == ["c0", "c1", "c2"]  # the same commit won

    rival = ObjectStore(blobs=MemoryBlobStore())
    rival.put_update("j", 1, "c0", small_update(5))
    blobs.key, blobs.body = layout.manifest_key("j", 1), rival.commit_round("j", 1).to_json()
    store.put_update("j", 1, "c1", small_update(6))
    with pytest.raises(ConflictError, match="manifest of round 1"):
        store.commit_round("j", 1)
    assert store.get_manifest("j", 1).clients == ["c0"]


def test_a_rewrite_is_conditional_on_the_version_read() -> None:
    blobs = Interloper()
    store = ObjectStore(blobs=blobs)
    store.put_job_spec(JobSpec("j", late_clients={"within_s": 600}))
    committed_round(store)
    key = layout.manifest_key("j", 0)
    blobs.key, blobs.body = key, store.get_object(key) + b" "  # rewritten meanwhile
    store.put_update("j", 0, "late", small_update(9))
    with pytest.raises(ConflictError, match="changed while this commit was made"):
        store.commit_round("j", 0)
    assert "late" not in store.get_manifest("j", 0).clients


def test_concurrent_identical_commits_all_succeed(store: ObjectStore) -> None:
    for i in range(3):
        store.put_update("j", 0, f"c{i}", small_update(i))
    errors: list[BaseException] = []

    def commit() -> None:
        try:
            ObjectStore(store.bucket, client=store.blobs.client).commit_round("j", 0)  # type: ignore[attr-defined]
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=commit) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert store.get_manifest("j", 0).clients == ["c0", "c1", "c2"]


def test_concurrent_initial_models_one_wins(any_store: ObjectStore) -> None:
    outcomes: list[str] = []

    def put(seed: int) -> None:
        try:
            any_store.put_initial("j", small_update(seed))
            outcomes.append("stored")
        except ConflictError:
            outcomes.append("conflict")

    threads = [threading.Thread(target=put, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["conflict"] * 3 + ["stored"]


# ---------------------------------------------------------------- 4. a backfill adds summaries


def summaries(store: ObjectStore, value: float) -> Mapping[str, dict[str, float]]:
    return {c: {CONTRIBUTION: value} for c in store.get_manifest("j", 0).clients}


def test_a_backfill_adds_summaries_but_never_changes_one(any_store: ObjectStore) -> None:
    store = any_store
    committed_round(store)
    before = store.manifest_versions("j")[0]
    store.commit_round("j", 0, summaries=dict(summaries(store, 1.5)))
    assert store.manifest_versions("j")[0] != before  # a new field: the version moves on
    store.commit_round("j", 0, summaries=dict(summaries(store, 1.5)))  # the same values: fine
    with pytest.raises(ConflictError, match=r"summary 'contribution' is committed as 1.5"):
        store.commit_round("j", 0, summaries=dict(summaries(store, -3.0)))
    assert store.get_manifest("j", 0).updates["c0"].summary[CONTRIBUTION] == 1.5


# ---------------------------------------------------------------- 5. the job's model and data


def test_a_jobs_model_is_changed_once_it_has_rounds_only_when_forced(
    any_store: ObjectStore,
) -> None:
    store = any_store
    store.put_job_spec(JobSpec("j", model="mlp"))
    store.put_job_spec(JobSpec("j", model="cnn"))  # no rounds yet: free
    committed_round(store)
    store.put_job_spec(JobSpec("j", model="cnn", description="same model"))
    with pytest.raises(ConflictError, match=r"model 'cnn'.*force"):
        store.put_job_spec(JobSpec("j", model="mlp"))
    assert ObjectStore(blobs=store.blobs).get_job_spec("j").model == "cnn"
    store.put_job_spec(JobSpec("j", model="mlp"), force=True)
    assert ObjectStore(blobs=store.blobs).get_job_spec("j").model == "mlp"


def test_a_validation_set_is_changed_once_the_job_has_rounds_only_when_forced(
    any_store: ObjectStore,
) -> None:
    store = any_store
    x, y = np.ones((4, 2), np.float32), np.arange(4)
    store.put_validation_set("j", x, y)
    store.put_validation_set("j", x * 2, y)  # no rounds yet: free
    committed_round(store)
    store.put_validation_set("j", x * 2, y)  # the same set: fine
    with pytest.raises(ConflictError, match="validation set"):
        store.put_validation_set("j", x * 3, y)
    np.testing.assert_array_equal(store.get_validation_set("j")[0], x * 2)
    store.put_validation_set("j", x * 3, y, force=True)
    np.testing.assert_array_equal(store.get_validation_set("j")[0], x * 3)


class _OvertakenHead(MemoryBlobStore):
    """A store where another writer's ``job.json`` lands right after this writer's HEAD of
    it: the window a check-then-put would lose."""

    def __init__(self, other: JobSpec) -> None:
        super().__init__()
        self.other: JobSpec | None = other

    def head(self, key: str) -> Any:
        info = super().head(key)
        if key == layout.job_spec_key("j") and self.other is not None:
            other, self.other = self.other, None
            MemoryBlobStore.put(self, key, other.to_json())
        return info


@pytest.mark.parametrize("declared_before", [False, True])
def test_a_job_spec_written_under_another_writer_is_a_conflict(declared_before: bool) -> None:
    blobs = _OvertakenHead(JobSpec("j", model="cnn"))
    if declared_before:
        MemoryBlobStore.put(blobs, layout.job_spec_key("j"), JobSpec("j").to_json())
    with pytest.raises(ConflictError, match="written by someone else"):
        ObjectStore(blobs=blobs).put_job_spec(JobSpec("j", model="mlp"))
    assert ObjectStore(blobs=blobs).get_job_spec("j").model == "cnn"  # the other's stands
