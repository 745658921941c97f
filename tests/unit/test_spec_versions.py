"""A forced change of a job's model or validation set reaches a warm cache node at its next
refresh point, never between them.

On a digits_cnn job (one round of 6 clients whose models are the initial model plus noise, a
validation set of 64 images labelled by the initial model), a node answers accuracy_select and
keeps the answer; the validation set is then replaced with force (the labels flipped, so every
accuracy changes). Until a refresh point the node answers from memory without any S3 request;
after one — a ``load``, the ``REFRESH_S`` interval, ``evict all`` — it recomputes on the new set
and answers what a freshly loaded round answers.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from flstore_core import models
from flstore_core.cache.memo import ResultMemo
from flstore_core.cache.node import CacheNode
from flstore_core.cache.results import run_round_workload
from flstore_core.cache.round_data import ArtifactStats
from flstore_core.cache.round_loading import load_round
from flstore_core.data.codec import Update
from flstore_core.data.manifest import JobSpec
from flstore_core.storage.blobs import BlobInfo
from flstore_core.storage.memory import MemoryBlobStore
from flstore_core.storage.object_store import ObjectStore
from flstore_core.workloads import get

JOB = "digits"
SHARD = f"{JOB}/round/0"


class HeadCountingBlobs(MemoryBlobStore):
    """A memory blob store that counts its HEADs (the object store counts GETs and PUTs)."""

    def __init__(self) -> None:
        super().__init__()
        self.heads = 0

    def head(self, key: str) -> BlobInfo | None:
        self.heads += 1
        return super().head(key)


def validation(flipped: bool = False) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """64 images labelled by the initial model (``9 − label`` when ``flipped``)."""
    x = np.random.default_rng(1).random((64, 1, 8, 8), dtype=np.float32)
    y = models.predict(models.build("digits_cnn", seed=0), x)
    return x, (9 - y if flipped else y)


@pytest.fixture
def blobs() -> HeadCountingBlobs:
    return HeadCountingBlobs()


@pytest.fixture
def store(blobs: HeadCountingBlobs) -> ObjectStore:
    st = ObjectStore("mem", blobs=blobs)
    st.put_job_spec(JobSpec(JOB, model="digits_cnn"))
    st.put_validation_set(JOB, *validation())
    initial = models.state_arrays(models.build("digits_cnn", seed=0))
    st.put_initial(JOB, Update(dict(initial)))
    rng = np.random.default_rng(0)
    entries = []
    for i in range(6):
        noisy = {
            k: (v + (0.1 + 0.1 * i) * rng.standard_normal(v.shape)).astype(np.float32)
            for k, v in initial.items()
        }
        entries.append(st.put_update(JOB, 0, f"client-{i:02d}", Update(noisy, num_examples=20)))
    st.commit_round(JOB, 0, entries)
    return st


def select(node: CacheNode) -> dict[str, Any]:
    answer = node.handle(
        {"op": "run", "workload": "accuracy_select", "job": JOB, "round": 0, "params": {"k": 3}}
    )
    assert "error" not in answer, answer
    return answer


def reference(store: ObjectStore) -> dict[str, Any]:
    """accuracy_select on a freshly loaded round: nothing memoised."""
    workload = get("accuracy_select")
    data = load_round(ObjectStore("mem", blobs=store.blobs), JOB, 0, ArtifactStats())
    return run_round_workload(store, workload, data, workload.validate({"k": 3}))


def force_flipped_labels(blobs: HeadCountingBlobs) -> None:
    """Another process (its own store object) replaces the validation set with force."""
    ObjectStore("mem", blobs=blobs).put_validation_set(JOB, *validation(True), force=True)


def warm_node(store: ObjectStore) -> tuple[CacheNode, dict[str, Any]]:
    node = CacheNode(store, budget_bytes=10**8)
    node.handle({"op": "load", "shards": [SHARD]})
    first = select(node)
    assert first["cache"] == "hit" and first["result"] == reference(store)
    return node, first


def test_a_warm_request_between_refresh_points_makes_no_s3_call(
    store: ObjectStore, blobs: HeadCountingBlobs
) -> None:
    node, first = warm_node(store)
    force_flipped_labels(blobs)
    gets, heads = store.gets, blobs.heads
    again = select(node)
    # the node has not reached a refresh point: the kept answer, no GET and no HEAD
    assert again["result"] == first["result"] and again["s3_gets"] == 0
    assert store.gets == gets and blobs.heads == heads
    assert node.stats()["answers"] == {"computed": 1, "reused": 1}


def test_after_a_load_the_new_validation_set_is_answered_and_recomputed(
    store: ObjectStore, blobs: HeadCountingBlobs
) -> None:
    node, first = warm_node(store)
    computed = node.stats()["artifacts"]["computed"]["client_accuracy"]
    force_flipped_labels(blobs)
    heads = blobs.heads
    node.handle({"op": "load", "shards": [SHARD]})  # the re-warm after ingestion
    assert blobs.heads - heads >= 2  # job.json's and the validation set's versions checked
    after = select(node)
    assert after["result"] != first["result"]
    assert after["result"] == reference(store)
    stats = node.stats()
    assert stats["answers"] == {"computed": 2, "reused": 0}
    # every client model evaluated again, on the new set
    assert stats["artifacts"]["computed"]["client_accuracy"] == 2 * computed


def test_a_load_with_nothing_changed_keeps_the_answers(store: ObjectStore) -> None:
    node, first = warm_node(store)
    node.handle({"op": "load", "shards": [SHARD]})
    assert select(node)["result"] == first["result"]
    assert node.stats()["answers"] == {"computed": 1, "reused": 1}


def test_the_refresh_interval_is_a_refresh_point(
    store: ObjectStore, blobs: HeadCountingBlobs
) -> None:
    node, first = warm_node(store)
    force_flipped_labels(blobs)
    node.versions.interval_s = 0.0  # REFRESH_S has passed
    after = select(node)
    assert after["result"] != first["result"] and after["result"] == reference(store)
    assert node.stats()["answers"] == {"computed": 2, "reused": 0}


def test_evict_all_reads_the_new_validation_set(
    store: ObjectStore, blobs: HeadCountingBlobs
) -> None:
    node, first = warm_node(store)
    force_flipped_labels(blobs)
    node.handle({"op": "evict", "all": True})
    after = select(node)
    assert after["cache"] == "miss" and after["result"] == reference(store)
    assert after["result"] != first["result"]


def test_a_forced_job_spec_is_read_again_after_a_version_check(blobs: HeadCountingBlobs) -> None:
    reader = ObjectStore("mem", blobs=blobs)
    ObjectStore("mem", blobs=blobs).put_job_spec(JobSpec(JOB, model="digits_cnn"))
    assert reader.get_job_spec(JOB).model == "digits_cnn"
    ObjectStore("mem", blobs=blobs).put_job_spec(JobSpec(JOB, model=None), force=True)
    assert reader.get_job_spec(JOB).model == "digits_cnn"  # cached: no GET per call
    assert reader.job_exists(JOB)  # the HEAD finds another version of job.json
    assert reader.get_job_spec(JOB).model is None


def test_every_memo_key_includes_the_spec_version() -> None:
    request = {"params": {"k": 3}}
    assert ResultMemo.key("w", request, "a/b") != ResultMemo.key("w", request, "a/c")
    assert ResultMemo.key("w", request, "a/b") != ResultMemo.key("w", request, "x/b")
    assert ResultMemo.key("w", request, "a/b") == ResultMemo.key("w", dict(request), "a/b")
