"""Cached manifests know their version: a rewritten manifest (a backfill, a late client) is read
again at the next refresh point, an unchanged one is not, and a warm request reads nothing.

The rewrite is done the way the backfill does it (``ObjectStore.commit_round`` with new
summaries); what the caches must then hold is read back independently with
``ObjectStore.get_manifest`` on a fresh store.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from flstore_core.cache.node import CacheNode
from flstore_core.cache.round_data import RoundData
from flstore_core.cache.shards import ClientHistory, JobMeta, ManifestReader, load_meta
from flstore_core.data.manifest import CONTRIBUTION, JobSpec
from flstore_core.routing.placement import client_shard, meta_shard, round_shard
from flstore_core.storage.blobs import BlobInfo, Buffer
from flstore_core.storage.memory import MemoryBlobStore
from flstore_core.storage.object_store import ObjectStore
from tests.conftest import small_update

JOB = "j"


class CountingMemory(MemoryBlobStore):
    """Counts GETs and LISTs, the two calls a cache of manifests can make."""

    def __init__(self) -> None:
        super().__init__()
        self.gets = 0
        self.lists = 0

    def get(self, key: str) -> Buffer | None:
        self.gets += 1
        return super().get(key)

    def list(self, prefix: str, delimiter: str | None = None) -> Iterator[BlobInfo]:
        self.lists += 1
        return super().list(prefix, delimiter)


def committed(rounds: int = 2, clients: int = 3) -> tuple[ObjectStore, CountingMemory]:
    blobs = CountingMemory()
    store = ObjectStore(blobs=blobs)
    for r in range(rounds):
        for i in range(clients):
            store.put_update(JOB, r, f"c{i}", small_update(i + 10 * r))
        store.commit_round(JOB, r)
    return store, blobs


def backfill(store: ObjectStore, round_: int, scores: dict[str, float]) -> None:
    """Rewrite a committed round's summaries as ``pipelines.backfill`` does."""
    store.commit_round(JOB, round_, summaries={c: {CONTRIBUTION: v} for c, v in scores.items()})


def stored(store: ObjectStore, round_: int) -> dict[str, float | None]:
    """The contribution summaries in S3, read by a store that caches nothing."""
    manifest = ObjectStore(blobs=store.blobs).get_manifest(JOB, round_)
    return {c: e.summary.get(CONTRIBUTION) for c, e in manifest.updates.items()}


def test_a_rewritten_manifest_is_read_again_after_a_listing_and_an_unchanged_one_is_not() -> None:
    store, blobs = committed()
    reader = ManifestReader(store)
    assert reader.rounds(JOB) == [0, 1]
    old = {r: reader.get(JOB, r) for r in (0, 1)}
    backfill(store, 1, {"c0": 0.5, "c1": -0.25, "c2": 0.125})

    gets = blobs.gets
    # between refresh points the cached copy is served without any S3 call
    assert reader.get(JOB, 1) is old[1] and blobs.gets == gets
    assert reader.generation(JOB) == 0

    assert reader.rounds(JOB) == [0, 1]  # a refresh point: the listing carries the versions
    assert reader.generation(JOB) == 1
    assert reader.get(JOB, 0) is old[0]  # unchanged: not read again
    fresh = reader.get(JOB, 1)
    assert blobs.gets == gets + 1  # only the rewritten manifest
    assert {c: e.summary.get(CONTRIBUTION) for c, e in fresh.updates.items()} == stored(store, 1)
    assert stored(store, 1) == {"c0": 0.5, "c1": -0.25, "c2": 0.125}

    assert reader.rounds(JOB) == [0, 1]  # nothing rewritten since: nothing dropped
    assert reader.generation(JOB) == 1 and reader.get(JOB, 1) is fresh


def test_a_rewrite_with_the_same_summaries_writes_nothing_and_keeps_the_copy() -> None:
    store, blobs = committed()
    backfill(store, 0, {"c0": 1.0})
    reader = ManifestReader(store)
    reader.rounds(JOB)
    copy = reader.get(JOB, 0)
    puts = store.puts
    backfill(store, 0, {"c0": 1.0})  # the same scores: the manifest is not rewritten
    assert store.puts == puts
    gets = blobs.gets
    reader.rounds(JOB)
    assert reader.get(JOB, 0) is copy and reader.generation(JOB) == 0
    assert blobs.gets == gets


def test_meta_shard_rebuilds_only_the_rounds_whose_manifest_was_rewritten() -> None:
    store, _ = committed(rounds=3)
    reader = ManifestReader(store)
    known = load_meta(reader, JOB)
    backfill(store, 1, {"c2": 0.75})
    meta = load_meta(reader, JOB, known=known)
    assert meta.rounds[0] is known.rounds[0] and meta.rounds[2] is known.rounds[2]
    assert {c: row.summary.get(CONTRIBUTION) for c, row in meta.rounds[1].items()} == stored(
        store, 1
    )
    assert meta.rounds[1]["c2"].summary[CONTRIBUTION] == 0.75


def payouts(answer: dict[str, object]) -> dict[str, dict[str, float]]:
    """``{client: {round: tokens}}`` of a node's ``incentive`` answer."""
    result = answer["result"]
    assert isinstance(result, dict)
    out: dict[str, dict[str, float]] = {c: {} for c in result["values"]}
    for r, paid in result["rounds"].items():
        for c, tokens in paid.items():
            out[c][r] = tokens
    return out


def assert_paid(got: dict[str, dict[str, float]], want: dict[str, dict[str, float]]) -> None:
    assert got.keys() == want.keys()
    for c in want:
        assert got[c] == pytest.approx(want[c]), c


def paid(store: ObjectStore, rounds: range, clients: list[str]) -> dict[str, dict[str, float]]:
    """What ``incentive`` pays ``clients`` with ``metric=contribution`` and the default budget of
    100 from the stored contributions: each round split by the positive parts of all of them (a
    client without one is paid nothing there)."""
    out: dict[str, dict[str, float]] = {c: {} for c in clients}
    for r in rounds:
        values = {c: v for c, v in stored(store, r).items() if v is not None}
        total = sum(max(v, 0.0) for v in values.values())
        for c in clients:
            if c in values:
                out[c][str(r)] = 100.0 * max(values[c], 0.0) / total if total > 0 else 0.0
    return out


def test_a_load_after_a_backfill_serves_the_new_summaries_and_warm_requests_read_nothing() -> None:
    store, blobs = committed()
    node = CacheNode(store, budget_bytes=10**8)
    clients = ["c0", "c1", "c2"]
    shards = [str(meta_shard(JOB))] + [str(client_shard(JOB, c)) for c in clients]
    node.handle({"op": "load", "shards": shards})
    event = {
        "op": "run",
        "workload": "incentive",
        "job": JOB,
        "clients": clients,
        "params": {"metric": CONTRIBUTION},
    }
    assert payouts(node.handle(event)) == {c: {} for c in clients}  # no summaries yet

    backfill(store, 0, {"c0": 0.5, "c1": 0.25, "c2": -1.0})
    backfill(store, 1, {"c0": 0.125, "c1": 2.0, "c2": 0.0})
    gets, lists = blobs.gets, blobs.lists
    stale = node.handle(event)  # a warm request: no S3 call of any kind
    assert (blobs.gets, blobs.lists, stale["s3_gets"]) == (gets, lists, 0)

    answer = node.handle({"op": "load", "shards": shards})  # the backfill's re-warm
    assert sorted(answer["already"]) == sorted(shards)
    assert blobs.gets == gets + 2  # the two rewritten manifests, once each
    assert_paid(payouts(node.handle(event)), paid(store, range(2), clients))
    meta = node.cache.get(meta_shard(JOB))
    assert isinstance(meta, JobMeta)
    assert {
        r: {c: row.summary[CONTRIBUTION] for c, row in rows.items()}
        for r, rows in meta.rounds.items()
    } == {r: stored(store, r) for r in (0, 1)}

    gets, lists = blobs.gets, blobs.lists
    node.handle(event)
    assert (blobs.gets, blobs.lists) == (gets, lists)  # warm again


def test_a_rewrite_found_by_one_refresh_makes_the_nodes_other_shards_of_the_job_stale() -> None:
    store, _ = committed()
    node = CacheNode(store, budget_bytes=10**8)
    node.handle({"op": "load", "shards": [str(client_shard(JOB, c)) for c in ("c0", "c1")]})
    backfill(store, 0, {"c0": 0.5, "c1": 0.25})
    # the re-warm names only c0's shard; c1's, on the same node, must not wait for REFRESH_S
    node.handle({"op": "load", "shards": [str(client_shard(JOB, "c0"))]})
    held = node.cache.get(client_shard(JOB, "c1"))
    assert isinstance(held, ClientHistory) and held.generation < node.manifests.generation(JOB)
    event = {
        "op": "run",
        "workload": "incentive",
        "job": JOB,
        "clients": ["c1"],
        "params": {"metric": CONTRIBUTION},
    }
    got = payouts(node.handle(event))
    assert_paid(got, paid(store, range(1), ["c1"]))
    assert got["c1"]["0"] > 0


def test_evict_all_drops_the_cached_manifests() -> None:
    store, blobs = committed()
    node = CacheNode(store, budget_bytes=10**8)
    node.handle({"op": "load", "shards": [str(meta_shard(JOB))]})
    assert node.manifests.version(JOB, 0) != ""
    node.handle({"op": "evict", "all": True})
    assert node.manifests.version(JOB, 0) == "" and node.manifests.version(JOB, 1) == ""
    gets = blobs.gets
    node.handle({"op": "load", "shards": [str(meta_shard(JOB))]})
    assert blobs.gets >= gets + 2  # both manifests read anew


def test_a_late_client_reloads_a_held_round_at_the_next_load() -> None:
    store, _ = committed(rounds=1)
    store.put_job_spec(JobSpec(JOB, late_clients={"within_s": 600}))  # late clients allowed
    node = CacheNode(store, budget_bytes=10**8)
    shard = str(round_shard(JOB, 0))
    assert node.handle({"op": "load", "shards": [shard]})["loaded"] == [shard]
    assert node.handle({"op": "load", "shards": [shard]})["already"] == [shard]
    store.put_update(JOB, 0, "late", small_update(99))
    store.commit_round(JOB, 0)  # the late client joins the committed round
    assert node.handle({"op": "load", "shards": [shard]})["loaded"] == [shard]
    held = node.cache.get(round_shard(JOB, 0))
    assert isinstance(held, RoundData)
    assert list(held.clients) == ObjectStore(blobs=store.blobs).get_manifest(JOB, 0).clients
    assert "late" in held.clients


def test_current_checks_one_manifest_with_a_head_at_most_every_max_age() -> None:
    import time

    store, blobs = committed()
    heads: list[str] = []
    inner_head = blobs.head

    def head(key: str) -> BlobInfo | None:
        heads.append(key)
        return inner_head(key)

    blobs.head = head  # type: ignore[method-assign]
    lists = blobs.lists  # the commits listed; the reader must not
    reader = ManifestReader(store)
    first = reader.current(JOB, 1, max_age_s=0.2)
    gets = blobs.gets
    assert reader.current(JOB, 1, max_age_s=0.2) is first  # within max_age: no call at all
    assert len(heads) == 1 and blobs.gets == gets and blobs.lists == lists
    time.sleep(0.25)
    assert reader.current(JOB, 1, max_age_s=0.2) is first  # unchanged: a HEAD, no GET
    assert len(heads) == 2 and blobs.gets == gets
    backfill(store, 1, {"c0": 0.5, "c1": 0.25, "c2": 0.125})
    time.sleep(0.25)
    fresh = reader.current(JOB, 1, max_age_s=0.2)  # rewritten: read again
    assert fresh is not first
    assert {c: e.summary.get(CONTRIBUTION) for c, e in fresh.updates.items()} == stored(store, 1)
    assert all(k.endswith("/00000001/manifest.json") for k in heads)
