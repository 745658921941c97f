"""Eager warming: updates staged on their round's owners before the commit change no answer.

A digits_cnn job (a validation set, an initial model, round 0 committed) writes round 1's
updates; the router stages some of them on the round's two owners (real cache nodes, in process
through JSON) from their S3 records, one staged client is then not committed, two committed
clients are never staged, and one is rewritten after its staging. After the commit's prefetch
every answer — cosine_select, fedavg, krum, contribution_loo — is the one a round loaded from S3
with nothing staged gives, byte for byte, and the nodes read from S3 only the updates they did
not hold with the digest the manifest names.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from flstore_core import models
from flstore_core.cache.node import CacheNode
from flstore_core.cache.results import run_round_workload
from flstore_core.cache.round_data import ArtifactStats
from flstore_core.cache.round_loading import load_round
from flstore_core.data import layout
from flstore_core.data.blocks import footprint
from flstore_core.data.codec import Update
from flstore_core.data.manifest import JobSpec
from flstore_core.errors import ValidationError
from flstore_core.protocol import StageOp
from flstore_core.routing.placement import round_shard
from flstore_core.routing.router import Router
from flstore_core.routing.update_staging import (
    LandedUpdate,
    UpdateStager,
    landed_updates,
    parse_update_key,
)
from flstore_core.storage.memory import MemoryBlobStore
from flstore_core.storage.object_store import ObjectStore
from flstore_core.workloads import get
from tests.fakes import InProcessNodes, make_router

JOB = "digits"
REQUESTS: dict[str, dict[str, Any]] = {
    "cosine_select": {"k": 3},
    "fedavg": {},
    "krum": {},
    "contribution_loo": {},
}
STAGED = ["c0", "c1", "c2", "c3", "gone"]  # "gone" is staged and never committed
COMMITTED = ["c0", "c1", "c2", "c3", "c4", "c5"]  # c4, c5 never staged
REWRITTEN = "c3"  # staged, then its object rewritten before the commit


def noisy(initial: dict[str, Any], rng: np.random.Generator, scale: float) -> Update:
    return Update(
        {
            k: (v + scale * rng.standard_normal(v.shape)).astype(np.float32)
            for k, v in initial.items()
        },
        num_examples=int(rng.integers(10, 40)),
    )


def new_store(base: bool = False) -> tuple[ObjectStore, dict[str, Any]]:
    """The job with round 0 committed; ``base``: with round 0's global model stored too (the
    base of round 1, whose staged rows are then held as deltas from it)."""
    st = ObjectStore("mem", blobs=MemoryBlobStore())
    st.put_job_spec(JobSpec(JOB, model="digits_cnn"))
    base = models.build("digits_cnn", seed=0)
    rng = np.random.default_rng(0)
    x = rng.random((32, 1, 8, 8), dtype=np.float32)
    st.put_validation_set(JOB, x, models.predict(base, x))
    initial = dict(models.state_arrays(base))
    st.put_initial(JOB, Update(initial))
    st.commit_round(
        JOB, 0, [st.put_update(JOB, 0, f"c{i}", noisy(initial, rng, 0.1)) for i in range(4)]
    )
    if base:
        st.put_global(JOB, 0, noisy(initial, rng, 0.02))
    return st, initial


def event_of(store: ObjectStore, clients: list[str], round_: int = 1) -> dict[str, Any]:
    """The S3 event of the updates' writes, as the bucket sends it."""
    return {
        "Records": [
            {
                "eventSource": "aws:s3",
                "eventName": "ObjectCreated:Put",
                "s3": {
                    "bucket": {"name": store.bucket},
                    "object": {"key": layout.update_key(JOB, round_, c), "eTag": f"e-{c}"},
                },
            }
            for c in clients
        ]
    }


ENTRIES: dict[str, Any] = {}  # client -> its round-1 entry, as last written


@pytest.fixture(params=[False, True], ids=["no-base", "base"])
def world(request: pytest.FixtureRequest) -> Iterator[tuple[ObjectStore, InProcessNodes, Router]]:
    store, initial = new_store(base=request.param)
    rng = np.random.default_rng(1)
    for i, client in enumerate([*COMMITTED, "gone"]):
        ENTRIES[client] = store.put_update(JOB, 1, client, noisy(initial, rng, 0.05 + 0.05 * i))
    nodes = InProcessNodes(store, 2, threads=True)
    router = make_router(store, nodes, tokens={"t": ["*"]}, nodes=2, replication=2)
    yield store, nodes, router
    store.close()


def commit(store: ObjectStore) -> None:
    """Commit round 1 without "gone", whose client dropped out (its object removed)."""
    store.blobs.delete(layout.update_key(JOB, 1, "gone"))
    store.commit_round(JOB, 1, [ENTRIES[c] for c in COMMITTED])
    assert sorted(store.get_manifest(JOB, 1).updates) == COMMITTED


def reference(
    store: ObjectStore, nodes: InProcessNodes, index: int, names: tuple[str, ...] = tuple(REQUESTS)
) -> dict[str, str]:
    """Each request on round 1 read from S3 with nothing staged, on node ``index``'s thread."""

    def one(name: str) -> str:
        workload = get(name)
        data = load_round(store, JOB, 1, ArtifactStats())
        answer = run_round_workload(store, workload, data, workload.validate(REQUESTS[name]))
        return json.dumps(answer, sort_keys=True)

    return {name: nodes.threads[index].submit(one, name).result() for name in names}


def answers(
    nodes: InProcessNodes, index: int, names: tuple[str, ...] = tuple(REQUESTS)
) -> dict[str, str]:
    out = {}
    for name in names:
        params = REQUESTS[name]
        event = {"op": "run", "workload": name, "job": JOB, "round": 1, "params": params}
        answer = nodes.handle(index, event)
        assert answer.get("cache") == "hit", answer
        out[name] = json.dumps(answer["result"], sort_keys=True)
    return out


def test_staged_rounds_answer_byte_for_byte_as_rounds_read_at_commit(
    world: tuple[ObjectStore, InProcessNodes, Router],
) -> None:
    store, nodes, router = world
    report = UpdateStager(router).handle(event_of(store, STAGED))
    assert len(report["staged"]) == 2 * len(STAGED) and not report["failed"], report
    rng = np.random.default_rng(9)  # c3's object rewritten after it was staged
    initial = dict(models.state_arrays(models.build("digits_cnn", seed=0)))
    ENTRIES[REWRITTEN] = store.put_update(JOB, 1, REWRITTEN, noisy(initial, rng, 0.3))
    commit(store)
    want = [reference(store, nodes, i) for i in (0, 1)]
    gets = [n.store.gets for n in nodes.nodes]
    router.prefetch([round_shard(JOB, 1)])
    for i, node in enumerate(nodes.nodes):
        staging = node.stats()["staging"]
        assert (staging["used"], staging["discarded"]) == (3, 2), staging  # gone, rewritten
        assert staging["pending"] == {} and staging["bytes"] == 0
        assert node.cache.reserved == 0
        # c3, c4, c5 and the base, manifests and specs: not the three staged updates
        assert node.store.gets - gets[i] < len(COMMITTED) + 6
        assert answers(nodes, i) == want[i]


def test_a_base_rewritten_after_staging_reads_every_row_again(
    world: tuple[ObjectStore, InProcessNodes, Router],
) -> None:
    store, nodes, router = world
    if store.get_base(JOB, 1) is None:
        pytest.skip("the rows are staged as stored: no base to rewrite")
    UpdateStager(router).handle(event_of(store, COMMITTED))
    held = nodes.nodes[0].staging._pending[(JOB, 1)]
    assert held.base is not None and held.base_etag  # the rows are deltas from it
    initial = dict(models.state_arrays(models.build("digits_cnn", seed=0)))
    store.blobs.delete(layout.global_key(JOB, 0))  # a backfill rewrites the base
    store.put_global(JOB, 0, noisy(initial, np.random.default_rng(5), 0.04))
    commit(store)
    want = reference(store, nodes, 0)
    gets = nodes.nodes[0].store.gets
    router.prefetch([round_shard(JOB, 1)])
    assert nodes.nodes[0].store.gets - gets >= len(COMMITTED)  # every row read again
    assert answers(nodes, 0) == want
    assert nodes.nodes[0].cache.reserved == 0


def test_a_commit_with_nothing_staged_answers_the_same(
    world: tuple[ObjectStore, InProcessNodes, Router],
) -> None:
    store, nodes, router = world
    commit(store)
    want = reference(store, nodes, 0)
    router.prefetch([round_shard(JOB, 1)])
    assert nodes.nodes[0].stats()["staging"]["used"] == 0
    assert answers(nodes, 0) == want


def test_a_row_over_the_budget_drops_the_pending_round_and_the_commit_loads_it(
    world: tuple[ObjectStore, InProcessNodes, Router],
) -> None:
    store, _, _ = world
    row_bytes = 4 * store.get_manifest(JOB, 0).n_params
    # room for one row, and the base the rows are deltas from when there is one
    held = row_bytes * (1 if store.get_base(JOB, 1) is None else 2)
    node = CacheNode(store.view(), budget_bytes=held + 1, node_index=0)
    assert "staged" in node.handle(StageOp(JOB, 1, "c0", 0).to_event())
    answer = node.handle(StageOp(JOB, 1, "c1", 0).to_event())
    assert "refused" in answer
    assert node.staging.to_dict()["pending"] == {} and node.cache.reserved == 0


def test_a_staging_of_a_missing_object_fails_as_an_answer_not_an_error(
    world: tuple[ObjectStore, InProcessNodes, Router],
) -> None:
    store, _, _ = world
    node = CacheNode(store.view(), budget_bytes=10**8, node_index=0)
    answer = node.handle(StageOp(JOB, 1, "nobody", 0).to_event())
    assert answer["failed"] == f"{JOB}/1/nobody" and node.staging.stats.failed == 1
    assert node.cache.reserved == 0


def test_a_staging_names_a_committed_round_for_its_tensors_else_a_404(
    world: tuple[ObjectStore, InProcessNodes, Router],
) -> None:
    store, _, _ = world
    node = CacheNode(store.view(), budget_bytes=10**8, node_index=0)
    assert node.handle(StageOp(JOB, 1, "c0", 7).to_event())["status"] == 404


def test_updates_of_a_job_with_no_committed_round_are_not_staged() -> None:
    store = ObjectStore("mem", blobs=MemoryBlobStore())
    store.put_update("fresh", 0, "c0", Update({"w": np.ones(4, np.float32)}))
    nodes = InProcessNodes(store, 2)
    router = make_router(store, nodes, tokens={"t": ["*"]}, nodes=2, replication=2)
    report = UpdateStager(router).stage([LandedUpdate("fresh", 0, "c0")])
    assert report["staged"] == [] and "no committed round" in report["skipped"]["fresh/0/c0"]


def test_updates_of_a_committed_round_are_not_staged(
    world: tuple[ObjectStore, InProcessNodes, Router],
) -> None:
    _, _, router = world
    report = UpdateStager(router).stage([LandedUpdate(JOB, 0, "c0")])
    assert report["staged"] == [] and "committed" in report["skipped"][f"{JOB}/0/c0"]


def test_update_keys_are_parsed_and_other_keys_skipped() -> None:
    assert parse_update_key(layout.update_key("j", 3, "a.b")) == ("j", 3, "a.b")
    assert parse_update_key("jobs/j/global/00000003.safetensors.zst") is None
    assert parse_update_key("jobs/j/validation.safetensors.zst") is None
    with pytest.raises(ValidationError, match="canonical"):
        parse_update_key("jobs/j/rounds/3/updates/a.safetensors.zst")
    event = {
        "Records": [
            {
                "eventName": "ObjectCreated:Put",
                "s3": {"bucket": {"name": "b"}, "object": {"key": "jobs/j/rounds/x/updates/a"}},
            },
            {
                "eventName": "ObjectCreated:Put",
                "s3": {
                    "bucket": {"name": "b"},
                    "object": {"key": layout.update_key("j", 1, "a"), "eTag": "t"},
                },
            },
        ]
    }
    assert landed_updates(event, "b") == [LandedUpdate("j", 1, "a", "t")]
    assert landed_updates(event, "other") == []


def test_stats_show_rows_staged_and_used_per_node() -> None:
    from flstore_core.cli.stats import staging_summary

    assert staging_summary({"staged": 0, "failed": 0, "refused": 0}) == ""
    line = staging_summary(
        {"staged": 5, "used": 3, "discarded": 2, "failed": 1, "refused": 0, "pending": {"j/1": 2}}
    )
    assert line == "staged 5, used at commit 3, discarded 2, failed 1, refused 0, pending 2"


def test_a_commit_of_the_clients_of_the_round_before_takes_the_staged_matrix_itself(
    world: tuple[ObjectStore, InProcessNodes, Router],
) -> None:
    store, nodes, router = world
    same = ["c0", "c1", "c2", "c3"]  # round 0's clients: the staged matrix is laid out so
    UpdateStager(router).handle(event_of(store, same[:3]))  # c3 is read at the commit
    pending = nodes.nodes[0].staging._pending[(JOB, 1)]
    assert pending.order == same and pending.matrix is not None
    staged_matrix = pending.matrix
    for other in ("c4", "c5", "gone"):  # not in this round: a commit takes every object
        store.blobs.delete(layout.update_key(JOB, 1, other))
    store.commit_round(JOB, 1, [ENTRIES[c] for c in same])
    few = ("cosine_select", "fedavg", "contribution_loo")  # krum needs more than 4 clients
    want = reference(store, nodes, 0, few)
    router.prefetch([round_shard(JOB, 1)])
    data = nodes.round(0, JOB, 1)
    assert data.matrix is staged_matrix  # neither copied nor allocated again
    assert nodes.nodes[0].stats()["staging"]["used"] == 3
    assert answers(nodes, 0, few) == want
    assert nodes.nodes[0].cache.reserved == 0


def test_a_failed_restaging_forgets_the_row_it_overwrote(
    world: tuple[ObjectStore, InProcessNodes, Router],
) -> None:
    store, nodes, router = world
    UpdateStager(router).handle(event_of(store, ["c0", "c1"]))
    node = nodes.nodes[0]
    store.blobs.put(layout.update_key(JOB, 1, "c1"), b"not an update")  # rewritten, corrupt
    answer = node.handle(StageOp(JOB, 1, "c1", 0, etag="e-new").to_event())
    assert "failed" in answer
    assert sorted(node.staging._pending[(JOB, 1)].rows) == ["c0"]


def test_a_round_read_into_a_full_cache_makes_its_room_before_a_byte_is_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    store, initial = new_store()
    rng = np.random.default_rng(2)
    store.commit_round(
        JOB, 1, [store.put_update(JOB, 1, c, noisy(initial, rng, 0.1)) for c in COMMITTED]
    )
    n_params = store.get_manifest(JOB, 1).n_params
    one_round = footprint(len(COMMITTED), n_params)  # what the cache counts round 1 at
    budget = one_round + footprint(4, n_params) // 2  # room for round 1, not round 0 beside it
    node = CacheNode(store.view(), budget_bytes=budget, node_index=0)
    node.handle({"op": "load", "shards": [str(round_shard(JOB, 0))]})
    assert round_shard(JOB, 0) in node.cache
    seen: list[int] = []
    read_round = node.store.read_round

    def reading(*args: Any, **kw: Any) -> Any:
        # what the node holds and has promised when round 1's rows are about to be read
        seen.append(node.cache.bytes_held)
        return read_round(*args, **kw)

    monkeypatch.setattr(node.store, "read_round", reading)
    node.handle({"op": "load", "shards": [str(round_shard(JOB, 1))]})
    assert seen, "round 1 was not read"
    # round 0 gave up its rows (a round's first tier to go) before round 1 was read
    assert seen[0] + one_round <= budget
    assert round_shard(JOB, 1) in node.cache and node.cache.reserved == 0
