"""Long jobs on one node: the meta shard holds a round as columns (its rows equal the manifest's),
keeps rows rather than manifests, answers a client-class request a group of clients at a time
with the same answer as one pass, offloads an answer too large to return inline, and keeps
answers in its memo under a byte bound (:mod:`flstore_core.cache.meta_rows`,
:mod:`flstore_core.cache.answering`, :mod:`flstore_core.cache.memo`)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from benchmarks.long_jobs_data import LongJob
from flstore_core.cache import answering, meta_snapshot, shards
from flstore_core.cache.memo import ResultMemo
from flstore_core.cache.meta_rows import ClientIds, ClientRound, RoundTotals, round_rows
from flstore_core.cache.node import CacheNode
from flstore_core.cache.shards import JobMeta, ManifestReader, load_meta
from flstore_core.data import layout
from flstore_core.storage.memory import MemoryBlobStore
from flstore_core.storage.object_store import ObjectStore
from flstore_core.workloads.oort_select import last_seen
from tests.conftest import small_update

JOB = "long"


def run(node: CacheNode, workload: str, params: dict[str, Any]) -> dict[str, Any]:
    answer = node.handle({"op": "run", "workload": workload, "job": JOB, "params": params})
    assert "error" not in answer, answer
    return answer


@pytest.fixture
def long_store() -> ObjectStore:
    """40 rounds × 12 clients, written as the long-job benchmark writes them."""
    store = ObjectStore(blobs=MemoryBlobStore())
    LongJob(store, JOB, 12).write(40, log=lambda _: None)
    return store


def varied_store() -> ObjectStore:
    """Rounds of varying clients, one with a list metric and one without a summary."""
    store = ObjectStore(blobs=MemoryBlobStore())
    for r in range(5):
        members = [f"c{i}" for i in range(6) if (i + r) % 3]
        summaries = {}
        for i, c in enumerate(members):
            u = small_update(i + 10 * r)
            u.metrics = {"loss": 0.5 + 0.1 * i + 0.01 * r, "duration_s": 1.0 + i}
            if c == "c1":
                u.metrics["per_epoch"] = [0.5, 0.25]
            store.put_update(JOB, r, c, u)
            if c != "c2":
                summaries[c] = {"cos_to_mean": 0.9 - 0.15 * i, "contribution": 3.0 - 0.4 * i}
        store.commit_round(JOB, r, summaries=summaries)
    return store


def test_a_rounds_columns_give_the_manifests_rows() -> None:
    store = varied_store()
    ids = ClientIds()
    for r in store.list_rounds(JOB):
        manifest = store.get_manifest(JOB, r)
        rows = round_rows(manifest, ids)
        assert list(rows) == sorted(manifest.updates) and len(rows) == len(manifest.updates)
        totals = RoundTotals.of(manifest)
        for c, e in manifest.updates.items():
            want = ClientRound(r, e.num_examples, dict(e.metrics), dict(e.summary), totals)
            assert rows[c] == want
            assert type(rows[c].num_examples) is int
        assert "nobody" not in rows


def test_rounds_of_the_same_clients_share_their_ids(long_store: ObjectStore) -> None:
    meta = load_meta(ManifestReader(long_store), JOB)
    tuples = {id(rows.clients) for rows in meta.rounds.values()}  # type: ignore[attr-defined]
    assert len(meta.rounds) == 40 and len(tuples) == 1 and len(meta.ids) == 1
    # columns: ~50 bytes a row plus each round's kilobyte, far below a row object's ~1.6 KB
    assert meta.nbytes < 40 * 1024 + 40 * 12 * 80 + 12 * 200


def test_a_meta_load_keeps_rows_not_every_manifest(
    long_store: ObjectStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(shards, "MANIFEST_ROWS_KEPT", 8 * 12)
    reader = ManifestReader(long_store)
    meta = load_meta(reader, JOB)
    assert sum(1 for key in reader._cache if key[0] == JOB) == 8
    again = load_meta(reader, JOB, known=meta)  # nothing rewritten: every row reused
    assert all(again.rounds[r] is meta.rounds[r] for r in meta.rounds)
    assert again.ids is meta.ids


def test_a_listing_finds_a_rewrite_of_a_manifest_it_does_not_hold(
    long_store: ObjectStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(shards, "MANIFEST_ROWS_KEPT", 0)
    reader = ManifestReader(long_store)
    meta = load_meta(reader, JOB)
    manifest = long_store.get_manifest(JOB, 39)
    assert (JOB, 39) not in reader._cache
    body = json.loads(manifest.to_json())
    body["updates"]["client-00"]["summary"]["contribution"] = 1.0
    long_store.put_object(
        f"jobs/{JOB}/rounds/{39:08d}/manifest.json", json.dumps(body).encode(), "application/json"
    )
    reader.rounds(JOB)
    assert reader.generation(JOB) == meta.generation + 1
    fresh = load_meta(reader, JOB, known=meta)
    assert fresh.rounds[39]["client-00"].summary["contribution"] == 1.0
    assert fresh.rounds[38] is meta.rounds[38]


@pytest.mark.parametrize("workload", ["reputation", "incentive"])
def test_a_client_request_in_groups_answers_as_one_pass(
    long_store: ObjectStore, workload: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    params = {"decay": 0.7} if workload == "reputation" else {"budget": 10.0}
    whole = run(CacheNode(long_store, budget_bytes=10**8), workload, params)["result"]
    monkeypatch.setattr(answering, "ROWS_PER_PASS", 100)  # 2 clients of 40 rounds a group
    grouped = run(CacheNode(long_store, budget_bytes=10**8), workload, params)["result"]
    assert json.dumps(grouped, sort_keys=True) == json.dumps(whole, sort_keys=True)


def test_oort_reads_the_history_back_to_each_clients_last_round() -> None:
    store = varied_store()
    meta = load_meta(ManifestReader(store), JOB)
    full: dict[str, tuple[int, int, dict[str, Any]]] = {}
    for r, rows in sorted(meta.rounds.items()):
        for c, row in rows.items():
            full[c] = (r, row.num_examples, row.metrics)
    assert last_seen(meta, len(meta.clients)) == full


def test_an_answer_too_large_to_return_is_offloaded_and_its_pointer_memoised(
    long_store: ObjectStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = CacheNode(long_store, budget_bytes=10**8)
    inline = run(node, "reputation", {"decay": 0.6})["result"]
    monkeypatch.setattr(answering, "NODE_INLINE_LIMIT", 1000)
    node = CacheNode(long_store, budget_bytes=10**8)
    first = run(node, "reputation", {"decay": 0.6})["result"]
    assert set(first) == {"result_key", "bytes"} and first["result_key"].endswith(".json")
    stored = json.loads(long_store.get_object(first["result_key"]))
    assert stored == json.loads(json.dumps(inline))
    assert run(node, "reputation", {"decay": 0.6})["result"] == first
    assert node.answering.counts == {"computed": 1, "reused": 1}


def test_the_memo_is_bounded_in_bytes() -> None:
    memo = ResultMemo(capacity=4, max_bytes=1000)
    big = {"series": list(range(400))}  # ~1.6 KB of JSON: computed, not kept
    assert memo.answer("big", lambda: big) == (big, False)
    assert len(memo) == 0
    for k in range(6):  # each small answer counts 250 bytes: 4 kept
        memo.answer(f"k{k}", lambda: {"x": 1})
    assert len(memo) == 4 and memo.nbytes() == 4 * len('{"x":1}')


def test_a_meta_shard_without_columns_still_counts() -> None:
    from flstore_core.data.manifest import JobSpec

    rows = {"c": ClientRound(0, 1, {}, {})}
    assert JobMeta(JobSpec(JOB), {0: rows}).nbytes == 512 + 256


def rows_of_meta(meta: JobMeta) -> dict[int, dict[str, Any]]:
    return {r: {c: rows[c] for c in rows} for r, rows in meta.rounds.items()}


def test_a_snapshot_gives_back_every_row_and_version() -> None:
    store = varied_store()
    meta = load_meta(ManifestReader(store), JOB)
    back = meta_snapshot.decode(JOB, meta_snapshot.encode(meta))
    assert rows_of_meta(back) == rows_of_meta(meta)
    assert back.versions == meta.versions and back.versions[0]
    assert len(back.ids) == len(meta.ids)


def test_a_cold_node_starts_from_the_snapshot_and_reads_only_what_changed(
    long_store: ObjectStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(meta_snapshot, "SNAPSHOT_EVERY", 10)
    warm = CacheNode(long_store, budget_bytes=10**8)
    want = run(warm, "incentive", {"budget": 3.0})["result"]
    assert long_store.stat(layout.meta_rows_key(JOB)) is not None  # 40 rounds read: written
    manifest = long_store.get_manifest(JOB, 39)
    body = json.loads(manifest.to_json())
    body["updates"]["client-00"]["summary"]["cos_to_mean"] = 0.25  # rewritten after the snapshot
    long_store.put_object(
        layout.manifest_key(JOB, 39), json.dumps(body).encode(), "application/json"
    )
    cold = CacheNode(long_store, budget_bytes=10**8)
    gets = long_store.gets
    got = run(cold, "incentive", {"budget": 3.0})["result"]
    # the snapshot, the rewritten manifest, the job spec and its versions; not 40 manifests
    assert long_store.gets - gets <= 6
    assert got["rounds"]["39"]["client-00"] != want["rounds"]["39"]["client-00"]
    assert got["rounds"]["38"] == want["rounds"]["38"]
    fresh = run(
        CacheNode(ObjectStore(blobs=long_store.blobs), budget_bytes=10**8),
        "incentive",
        {"budget": 3.0},
    )
    assert fresh["result"] == got


def test_a_broken_snapshot_is_ignored(long_store: ObjectStore) -> None:
    long_store.put_object(layout.meta_rows_key(JOB), b"not a snapshot")
    assert meta_snapshot.read_snapshot(long_store, JOB) is None
    want = run(CacheNode(long_store, budget_bytes=10**8), "reputation", {"decay": 0.5})
    assert want["result"]["values"]
