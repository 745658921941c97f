"""Model artifacts computed at prefetch: split over a round's replicas,
shared between them, and never a different answer.

On a digits_cnn job (10 clients whose models are the initial model plus noise of growing
scale, a stored base, a validation set of 64 images labelled by the initial model): two real
cache nodes
holding the round (replication 2) are invoked in process through JSON, as over
``lambda.invoke``. After ``Router.prefetch`` each node computed about half the tasks, holds every
value, and answers every model-based workload with the result a freshly loaded round (no
memo) gives — the same bytes on both replicas — without evaluating what prefetch evaluated. An
artifact that fails, or an exchange that does not reach a node, leaves the prefetch answered
and the requests right.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from flstore_core import models
from flstore_core.cache.job_mix import Use
from flstore_core.cache.job_policy import JobFollowingEviction
from flstore_core.cache.results import run_round_workload
from flstore_core.cache.round_data import ArtifactStats
from flstore_core.cache.round_loading import load_round
from flstore_core.data.codec import Update
from flstore_core.data.manifest import JobSpec
from flstore_core.routing.placement import model_shard, round_shard
from flstore_core.routing.prefetch import NO_MODEL_ASKS
from flstore_core.routing.router import Router
from flstore_core.storage.memory import MemoryBlobStore
from flstore_core.storage.object_store import ObjectStore
from flstore_core.workloads import artifacts, get
from tests.fakes import InProcessNodes, make_router

JOB = "digits"
ROUND = 0  # the initial model is its base
PREFIX = "art"
NODES = 2
# every model-based workload, with the params a user sends (Shapley on a small budget)
REQUESTS: dict[str, dict[str, Any]] = {
    "accuracy_select": {"k": 3},
    "contribution_loo": {},
    "contribution_shapley": {"method": "gtg", "min_permutations": 10, "max_permutations": 10},
    "personalize": {"client": "client-02"},
    "fltrust": {},
    "feddebug": {},
}


def two_nodes(store: ObjectStore) -> InProcessNodes:
    """Two cache nodes as an invoker, events and answers through JSON, each running every
    invocation on one thread of its own, as a node process runs its handler on its main
    thread: torch's float bits (fltrust's trained ``g_0``) differ between a process's main
    thread and other threads, so a node must compute at prefetch and at request time on the
    same kind of thread — and the references here are computed on a thread of their own too.
    Ops in ``failing`` (or ``artifacts:compute``, ``artifacts:rounds``) fail like a dead node."""
    return InProcessNodes(store, NODES, threads=True, billed_ms=7.0, memory_mb=1024)


def router_over(store: ObjectStore, nodes: InProcessNodes) -> Router:
    return make_router(store, nodes, tokens={"t": ["*"]}, prefix=PREFIX, nodes=NODES, replication=2)


@pytest.fixture(scope="module")
def store() -> Iterator[ObjectStore]:
    st = ObjectStore("mem", blobs=MemoryBlobStore())
    st.put_job_spec(JobSpec(JOB, model="digits_cnn"))
    base = models.build("digits_cnn", seed=0)
    rng = np.random.default_rng(0)
    x = rng.random((64, 1, 8, 8), dtype=np.float32)
    st.put_validation_set(JOB, x, models.predict(base, x))
    initial = models.state_arrays(base)
    st.put_initial(JOB, Update(dict(initial)))
    entries = []
    for i in range(10):
        noisy = {
            k: (v + (0.05 + 0.05 * i) * rng.standard_normal(v.shape)).astype(np.float32)
            for k, v in initial.items()
        }
        entries.append(
            st.put_update(JOB, ROUND, f"client-{i:02d}", Update(noisy, num_examples=20 + 3 * i))
        )
    st.commit_round(JOB, ROUND, entries)
    yield st
    st.close()


def references(store: ObjectStore, nodes: InProcessNodes, index: int) -> dict[str, dict[str, Any]]:
    """Each request on a freshly loaded round, nothing memoised, on node ``index``'s thread:
    what that node must answer."""

    def one(name: str) -> dict[str, Any]:
        workload = get(name)
        data = load_round(store, JOB, ROUND, ArtifactStats())
        return run_round_workload(store, workload, data, workload.validate(REQUESTS[name]))

    return {name: nodes.threads[index].submit(one, name).result() for name in REQUESTS}


def run(nodes: InProcessNodes, index: int, name: str) -> dict[str, Any]:
    answer = nodes.handle(
        index,
        {"op": "run", "workload": name, "job": JOB, "round": ROUND, "params": REQUESTS[name]},
    )
    assert "error" not in answer, answer
    assert answer["cache"] == "hit"
    result: dict[str, Any] = answer["result"]
    return result


def test_prefetch_splits_the_artifacts_and_every_replica_answers_from_them(
    store: ObjectStore,
) -> None:
    nodes = two_nodes(store)
    want = [references(store, nodes, i) for i in (0, 1)]
    answers = router_over(store, nodes).prefetch([round_shard(JOB, ROUND)])
    shard = str(round_shard(JOB, ROUND))
    expected = {
        t.name for t in artifacts.round_tasks(load_round(store, JOB, ROUND, ArtifactStats()))
    }
    done: list[str] = []
    for answer in answers.values():
        item = answer["artifacts"][shard]
        assert item["errors"] == {}
        assert item["tasks"]  # both replicas worked
        done += item["tasks"]
        # a load, its share of the artifacts, the others' values: each billed
        assert answer["invocations"] == 3 and answer["billed_ms"] == 21.0
        assert answer["memory_mb"] == 1024
        assert set(answer["timing_ms"]) == {"load", "warm"} and item["ms"] > 0
        assert answer["shared"][shard] > 0
    assert sorted(done) == sorted(expected) and len(done) == len(set(done))
    assert {"client:0", "subset_all", "subset_without:9", "subset_empty"} <= expected
    assert {"fltrust", "feddebug"} <= expected
    held = [
        set(a for a, _, _ in nodes.round(i, JOB, ROUND).memo_items(artifacts.CODECS))
        for i in (0, 1)
    ]
    assert held[0] == held[1] == set(artifacts.CODECS)

    for name in REQUESTS:
        before = [dict(nodes.round(i, JOB, ROUND).stats.computed) for i in (0, 1)]
        got = [run(nodes, i, name) for i in (0, 1)]
        # byte-identical on both replicas, and what a round with nothing memoised answers
        assert json.dumps(got[0], sort_keys=True) == json.dumps(got[1], sort_keys=True)
        assert got[0] == want[0][name] and got[1] == want[1][name], name
        for i in (0, 1):
            new = {
                k: v - before[i].get(k, 0)
                for k, v in nodes.round(i, JOB, ROUND).stats.computed.items()
                if v != before[i].get(k, 0)
            }
            if name == "personalize":  # its own aggregate is the one model it evaluates
                assert new == {"subset_accuracy": 1}, new
            elif name == "contribution_shapley":  # subsets of 2..n-2 clients are its own
                assert set(new) <= {"subset_accuracy", "model_accuracy"}
            else:  # everything it needed was computed at prefetch, on either replica
                assert new == {}, (name, new)


def test_a_failing_artifact_is_reported_and_the_request_computes_it(
    store: ObjectStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = artifacts._Runner.run

    def flaky(self: Any, task: artifacts.Task) -> None:
        if task.kind in ("fltrust", "client") and task.row in (None, 4):
            raise RuntimeError(f"injected failure of {task.name}")
        real(self, task)

    monkeypatch.setattr(artifacts._Runner, "run", flaky)
    nodes = two_nodes(store)
    want = references(store, nodes, 0)
    answers = router_over(store, nodes).prefetch([round_shard(JOB, ROUND)])
    shard = str(round_shard(JOB, ROUND))
    errors: dict[str, str] = {}
    for answer in answers.values():
        assert "error" not in answer and answer["loaded"] == [shard]
        errors.update(answer["artifacts"][shard]["errors"])
    assert set(errors) == {"fltrust", "client:4"}
    assert "injected failure" in errors["fltrust"]
    monkeypatch.setattr(artifacts._Runner, "run", real)
    for name in ("accuracy_select", "fltrust"):
        assert run(nodes, 0, name) == want[name]
        assert json.dumps(run(nodes, 1, name)) == json.dumps(want[name])


def test_an_exchange_that_fails_leaves_each_replica_its_share(store: ObjectStore) -> None:
    nodes = two_nodes(store)
    want = references(store, nodes, 0)
    nodes.failing.add("artifacts:rounds")
    answers = router_over(store, nodes).prefetch([round_shard(JOB, ROUND)])
    for answer in answers.values():
        assert "error" not in answer
        assert "Unhandled" in answer["shared"]["error"]
        assert answer["invocations"] == 2
    nodes.failing.clear()
    # each replica holds only its share; what it lacks it computes, to the same answer
    assert run(nodes, 0, "contribution_loo") == want["contribution_loo"]
    assert run(nodes, 1, "accuracy_select") == want["accuracy_select"]


def test_a_job_without_a_model_has_no_artifacts_and_no_exchange(store: ObjectStore) -> None:
    rows = {f"c{i}": Update({"w": np.full(4, i + 1.0, np.float32)}) for i in range(3)}
    entries = [store.put_update("plain", ROUND, c, u) for c, u in rows.items()]
    store.commit_round("plain", ROUND, entries)
    nodes = two_nodes(store)
    answers = router_over(store, nodes).prefetch([round_shard("plain", ROUND)])
    for answer in answers.values():
        assert answer["loaded"] == [str(round_shard("plain", ROUND))]
        assert "artifacts" not in answer and answer["invocations"] == 1
    assert [op for _, op in nodes.ops] == ["load", "load"]


def test_malformed_artifacts_are_refused_with_a_400(store: ObjectStore) -> None:
    nodes = two_nodes(store)
    router_over(store, nodes).prefetch([round_shard(JOB, ROUND)])
    shard = str(round_shard(JOB, ROUND))
    assert nodes.handle(0, {"op": "stats"})["shards"] == [shard]
    from flstore_core.cache.sharded import content_digest

    digest = content_digest(nodes.round(0, JOB, ROUND).sha256)
    for bad in (
        {"op": "artifacts"},
        {"op": "artifacts", "rounds": {shard: {"content": digest, "entries": [["no", "k", 1]]}}},
        {"op": "artifacts", "rounds": {shard: {"content": digest, "entries": "x"}}},
        {"op": "artifacts", "rounds": {"digits/meta": {"content": digest, "entries": []}}},
        {"op": "artifacts", "compute": {shard: [2, 2]}},
        {"op": "artifacts", "compute": {shard: "all"}},
        {"op": "artifacts", "compute": {"digits/meta": [0, 1]}},
    ):
        answer = nodes.handle(0, bad)
        assert answer["status"] == 400, (bad, answer)
    answer = nodes.handle(
        0,
        {
            "op": "artifacts",
            "rounds": {shard: {"content": digest, "entries": [["client_accuracy", "0/x", 1.5]]}},
        },
    )
    assert answer["status"] == 400 and "[0, 1]" in answer["error"]["message"]
    votes = [["feddebug_votes", "k", {"votes": [1, 2], "neurons": 3}]]  # 2 votes, 10 clients
    answer = nodes.handle(
        0, {"op": "artifacts", "rounds": {shard: {"content": digest, "entries": votes}}}
    )
    assert answer["status"] == 400 and "10 clients" in answer["error"]["message"]
    other = nodes.handle(
        0, {"op": "artifacts", "rounds": {shard: {"content": "other", "entries": []}}}
    )
    assert other["skipped"] == {shard: "round held with other content"}


def test_tasks_past_the_time_budget_are_deferred_to_the_requests(
    store: ObjectStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flstore_core.cache import artifact_exchange

    monkeypatch.setattr(artifact_exchange, "ARTIFACTS_BUDGET_S", 0.0)
    nodes = two_nodes(store)
    want = references(store, nodes, 1)
    answers = router_over(store, nodes).prefetch([round_shard(JOB, ROUND)])
    shard = str(round_shard(JOB, ROUND))
    deferred: list[str] = []
    for answer in answers.values():
        item = answer["artifacts"][shard]
        assert "error" not in answer and item["tasks"] == [] and item["errors"] == {}
        deferred += item["deferred"]
    assert len(deferred) == len(set(deferred)) > 20
    assert [op for _, op in nodes.ops] == ["load", "load", "artifacts", "artifacts"]
    assert run(nodes, 1, "contribution_loo") == want["contribution_loo"]


def test_a_failing_share_step_leaves_the_round_loaded(store: ObjectStore) -> None:
    nodes = two_nodes(store)
    want = references(store, nodes, 0)
    nodes.failing.add("artifacts:compute")
    answers = router_over(store, nodes).prefetch([round_shard(JOB, ROUND)])
    for answer in answers.values():
        assert answer["loaded"] == [str(round_shard(JOB, ROUND))] and "error" not in answer
        assert "Unhandled" in answer["artifacts"]["error"]
    nodes.failing.clear()
    assert run(nodes, 0, "feddebug") == want["feddebug"]


def test_a_job_that_asks_no_model_workload_gets_no_artifacts_built(store: ObjectStore) -> None:
    nodes = two_nodes(store)
    router = router_over(store, nodes)
    for _ in range(router.mix.min_requests):  # what the router saw: selections only
        router.mix.observe(Use(JOB, "round", ROUND))
    answers = router.prefetch([round_shard(JOB, ROUND), model_shard(JOB)])
    shard = str(round_shard(JOB, ROUND))
    assert answers[f"skipped:{shard}"] == {"skipped": NO_MODEL_ASKS}
    assert answers[f"skipped:{model_shard(JOB)}"] == {"skipped": NO_MODEL_ASKS}
    loads = [a for k, a in answers.items() if not k.startswith("skipped:")]
    assert len(loads) == 2
    for answer in loads:  # loaded, nothing else: one invocation, no model shard
        assert answer["loaded"] == [shard] and "artifacts" not in answer
        assert answer["invocations"] == 1
    # a model workload asked after all is computed by its request, to the same answer
    want = references(store, nodes, 0)
    assert run(nodes, 0, "accuracy_select") == want["accuracy_select"]
    # and the router now knows the job asks one: the next prefetch builds them
    router.mix.observe(Use(JOB, "round", ROUND, model=True))
    again = router.prefetch([round_shard(JOB, ROUND)])
    assert not any(k.startswith("skipped:") for k in again)


def test_a_node_learns_which_requests_read_a_rounds_rows(store: ObjectStore) -> None:
    nodes = two_nodes(store)
    router_over(store, nodes).prefetch([round_shard(JOB, ROUND)])
    policy = nodes.nodes[0].cache.policy
    assert isinstance(policy, JobFollowingEviction)
    asks = (
        ("cosine_select", {"k": 3}),
        ("fedavg", {}),
        ("trimmed_mean", {"beta": 0.2}),
        ("accuracy_select", {}),
    )
    for name, params in asks:
        answer = nodes.handle(
            0, {"op": "run", "workload": name, "job": JOB, "round": ROUND, "params": params}
        )
        assert "error" not in answer, answer
    uses = [use for _, use in policy.mix.jobs[JOB].uses]
    # the Gram answers cosine_select; the default fedavg was built at prefetch; a trimmed
    # mean reads the rows; accuracy_select is a model workload answered from the artifacts
    # prefetch built
    got = [(u.rows, u.model) for u in uses]
    assert got == [(False, False), (False, False), (True, False), (False, True)]
    assert policy.mix.early_reads_of(JOB, ROUND) == 1


def test_artifacts_in_chunks_take_turns_on_the_owners_and_resume_where_they_stopped(
    store: ObjectStore,
) -> None:
    nodes = two_nodes(store)
    want = references(store, nodes, 0)
    router = router_over(store, nodes)
    shard = str(round_shard(JOB, ROUND))
    loaded = router.prefetch([round_shard(JOB, ROUND)], artifacts=False)
    assert [op for _, op in nodes.ops] == ["load", "load"]
    assert all("artifacts" not in a for a in loaded.values())
    # a budget every task overruns: one task a chunk
    answers = router.prefetch_artifacts([round_shard(JOB, ROUND)], chunk_s=1e-6, total_s=60.0)
    expected = artifacts.round_tasks(load_round(store, JOB, ROUND, ArtifactStats()))
    shares = artifacts.assign(expected, 2)
    chunks = [(f, e) for f, e in nodes.calls if e["op"] == "artifacts" and "compute" in e]
    assert len(chunks) == len(expected)  # every task once, none again
    # the owners take turns while both have work: no two chunks in a row on one node
    both = 2 * min(len(s) for s in shares)
    assert all(chunks[i][0] != chunks[i + 1][0] for i in range(both - 1))
    starts = {f: [e["compute"][shard][2] for g, e in chunks if g == f] for f, _ in chunks}
    assert sorted(len(v) for v in starts.values()) == sorted(len(s) for s in shares)
    assert all(v == list(range(len(v))) for v in starts.values())
    done: list[str] = []
    for answer in answers.values():
        item = answer["artifacts"][shard]
        assert item["deferred"] == [] and item["errors"] == {}
        assert answer["chunks"] == len(item["tasks"]) == answer["invocations"] - 1
        assert answer["shared"][shard] > 0  # then the values are exchanged
        done += item["tasks"]
    assert sorted(done) == sorted(t.name for t in expected)
    for name in ("contribution_loo", "accuracy_select"):
        assert run(nodes, 0, name) == want[name] and run(nodes, 1, name) == want[name]


def test_chunked_artifacts_stop_at_their_total_budget(store: ObjectStore) -> None:
    nodes = two_nodes(store)
    router = router_over(store, nodes)
    router.prefetch([round_shard(JOB, ROUND)], artifacts=False)
    answers = router.prefetch_artifacts([round_shard(JOB, ROUND)], chunk_s=1e-6, total_s=0.0)
    assert answers == {} and [op for _, op in nodes.ops] == ["load", "load"]


def test_a_busy_owner_is_skipped_for_a_turn_and_resumed(
    store: ObjectStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flstore_core.routing import prefetch as prefetch_module
    from flstore_core.routing.invoker import NodeThrottled

    nodes = two_nodes(store)
    router = router_over(store, nodes)
    router.prefetch([round_shard(JOB, ROUND)], artifacts=False)
    real, busy = nodes.invoke, {"art-cache-0": 3}
    monkeypatch.setattr(prefetch_module, "CHUNK_GAP_S", 0.0)
    monkeypatch.setattr(prefetch_module, "BUSY_GAP_S", 0.0)

    def sometimes_busy(function: str, event: Any) -> Any:
        if event.get("op") == "artifacts" and busy.get(function, 0) > 0:
            busy[function] -= 1
            raise NodeThrottled(f"{function}: throttled")
        return real(function, event)

    monkeypatch.setattr(nodes, "invoke", sometimes_busy)
    answers = router.prefetch_artifacts([round_shard(JOB, ROUND)], chunk_s=60.0, total_s=60.0)
    assert busy == {"art-cache-0": 0}
    for answer in answers.values():
        assert (
            answer["chunks"] == 1
            and answer["artifacts"][str(round_shard(JOB, ROUND))]["deferred"] == []
        )


def test_a_load_waits_out_a_busy_node_and_gives_up_past_its_wait(
    store: ObjectStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flstore_core.routing import prefetch as prefetch_module
    from flstore_core.routing.invoker import NodeThrottled

    nodes = two_nodes(store)
    router = router_over(store, nodes)
    real, busy = nodes.invoke, {"art-cache-0": 3}
    monkeypatch.setattr(prefetch_module, "LOAD_RETRY_S", 0.0)

    def busy_at_first(function: str, event: Any) -> Any:
        if event.get("op") == "load" and busy.get(function, 0) > 0:
            busy[function] -= 1  # a staging of the round still running when it commits
            raise NodeThrottled(f"{function}: throttled")
        return real(function, event)

    monkeypatch.setattr(nodes, "invoke", busy_at_first)
    shard = str(round_shard(JOB, ROUND))
    answers = router.prefetch([round_shard(JOB, ROUND)], artifacts=False)
    assert busy == {"art-cache-0": 0}
    assert all(a["loaded"] == [shard] for a in answers.values())
    monkeypatch.setattr(prefetch_module, "LOAD_WAIT_S", 0.0)
    busy["art-cache-0"] = 10**6  # busy for good: the load gives up, as an unavailable answer
    again = router.prefetch([round_shard(JOB, ROUND)], artifacts=False)
    assert again["art-cache-0"]["error"]["code"] == "unavailable"
    assert again["art-cache-1"]["already"] == [shard]
