"""Workloads of the meta, client and model classes: oort_select, reputation, incentive,
inference — on small hand-checkable cases and through a cache node."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any, cast

import numpy as np
import pytest

from flstore_core import models
from flstore_core.cache.node import CacheNode
from flstore_core.cache.shards import ClientHistory, ClientRound, JobMeta
from flstore_core.data.codec import Update
from flstore_core.data.manifest import JobSpec, RoundManifest, UpdateEntry
from flstore_core.routing.placement import meta_shard, node_name, rank_nodes
from flstore_core.storage.memory import MemoryBlobStore
from flstore_core.storage.object_store import ObjectStore
from flstore_core.workloads.oort_select import oort_select, statistical_utility
from flstore_core.workloads.reputation import reputation_series
from tests.conftest import small_update
from tests.fakes import InProcessNodes, make_router


@pytest.fixture
def store() -> ObjectStore:
    """What is tested here does not depend on the bucket: an in-memory one (S3's own behaviour
    is tested in test_store, test_blobs and test_checksums), many times quicker than moto."""
    return ObjectStore(blobs=MemoryBlobStore())


def _meta(rows: dict[int, dict[str, tuple[int, dict[str, float]]]]) -> JobMeta:
    return JobMeta(
        JobSpec("j"),
        {
            r: {c: ClientRound(r, n, m, {}) for c, (n, m) in clients.items()}
            for r, clients in rows.items()
        },
    )


def test_statistical_utility_is_examples_times_rms_loss() -> None:
    assert statistical_utility(100, {"loss_sq_mean": 4.0}) == 200.0
    assert statistical_utility(10, {"loss": -0.5}) == 5.0  # |mean loss| when only it is known


def oort_scores_reference(
    utils: dict[str, float],
    last_round: dict[str, int],
    durations: dict[str, float],
    planned: int,
    preferred: float,
    alpha: float = 2.0,
    clip_bound: float = 0.9,
) -> dict[str, float]:
    """Transcription of the authors' scoring (FedScale thirdparty/oort ``getTopK`` and
    ``get_norm``), rounds counted from 1 (``time_stamp = round + 1``, ``cur_time = R + 1``)."""
    rewards = sorted(u for u in utils.values() if u > 0)
    clip_value = rewards[min(int(len(rewards) * clip_bound), len(rewards) - 1)]
    min_reward = rewards[0] * 0.999
    range_reward = max(rewards[-1] - min_reward, 1e-4)
    cur_time = planned + 1
    scores = {}
    for c, reward in utils.items():
        sc = (min(reward, clip_value) - min_reward) / float(range_reward) + math.sqrt(
            0.1 * math.log(cur_time) / (last_round[c] + 1)
        )
        if durations[c] > preferred:
            sc *= (float(preferred) / max(1e-4, durations[c])) ** alpha
        scores[c] = abs(sc)
    return scores


def test_oort_scores_are_the_authors_normalised_utilities() -> None:
    meta = _meta(
        {
            1: {
                "a": (100, {"loss_sq_mean": 1.0, "duration_s": 10.0}),
                "b": (100, {"loss_sq_mean": 4.0, "duration_s": 10.0}),
                "c": (100, {"loss_sq_mean": 9.0, "duration_s": 40.0}),
                "d": (50, {"loss": 2.0, "duration_s": 5.0}),
            }
        }
    )
    out = oort_select(meta, k=1, epsilon=0.0, alpha=2.0, preferred_duration=10.0).result
    want = oort_scores_reference(
        {"a": 100.0, "b": 200.0, "c": 300.0, "d": 100.0},
        dict.fromkeys("abcd", 1),
        {"a": 10.0, "b": 10.0, "c": 40.0, "d": 5.0},
        planned=2,
        preferred=10.0,
    )
    assert out["scores"] == pytest.approx(want, rel=1e-12)
    assert out["selected"] == ["b"]  # c's loss is highest but it is 4x slower than T


def _stale_job(stale_round: int) -> JobMeta:
    """A client 's' (utility 150) and ten clients seen in the latest round 50 (10..200)."""
    rows: dict[int, dict[str, tuple[int, dict[str, float]]]] = {50: {}}
    rows.setdefault(stale_round, {})["s"] = (100, {"loss": 1.5, "duration_s": 1.0})
    for i, u in enumerate(np.linspace(10, 200, 10)):
        rows[50][f"f{i}"] = (100, {"loss": float(u) / 100, "duration_s": 1.0})
    return _meta(rows)


def test_oort_staleness_promotes_a_client_unseen_for_50_rounds() -> None:
    meta = _stale_job(stale_round=0)
    utils = {"s": 150.0} | {f"f{i}": float(u) for i, u in enumerate(np.linspace(10, 200, 10))}
    last = {"s": 0} | dict.fromkeys(utils.keys() - {"s"}, 50)
    want = oort_scores_reference(utils, last, dict.fromkeys(utils, 1.0), planned=51, preferred=1.0)
    assert max(want, key=want.__getitem__) == "s"  # the authors' scores rank it first
    picks = [oort_select(meta, k=1, epsilon=0.0, seed=s).result for s in range(200)]
    assert picks[0]["scores"] == pytest.approx(want, rel=1e-12)
    assert sum(p["selected"] == ["s"] for p in picks) == 200
    # seen last round with the same utility, it is no longer first: staleness promoted it
    fresh = oort_select(_stale_job(stale_round=50), k=1, epsilon=0.0).result
    assert fresh["scores"]["s"] < max(fresh["scores"].values()) and fresh["selected"] != ["s"]


@pytest.mark.parametrize("k", [1, 2, 3, 5, 7, 10, 20])
@pytest.mark.parametrize("epsilon", [0.0, 0.1, 0.15, 0.29, 0.3, 0.5, 0.7, 0.9, 1.0])
def test_oort_explores_as_many_clients_as_the_authors_code(k: int, epsilon: float) -> None:
    meta = _meta({0: {f"c{i:02d}": (50, {"loss": 1.0 + i}) for i in range(20)}})
    pool = [f"c{i:02d}" for i in range(20)] + [f"new{i:02d}" for i in range(20)]
    out = oort_select(meta, k=k, epsilon=epsilon, candidates=pool).result
    # FedScale thirdparty/oort getTopK: explorationLen = int(numOfSamples * self.exploration)
    assert len(out["explored"]) == int(k * epsilon)
    assert len(out["selected"]) == len(set(out["selected"])) == k


def test_oort_explores_unseen_candidates_and_is_deterministic() -> None:
    meta = _meta({0: {f"c{i}": (50, {"loss": 1.0 + i}) for i in range(4)}})
    kw = {"k": 4, "epsilon": 0.5, "candidates": [f"c{i}" for i in range(4)] + ["new1", "new2"]}
    first = oort_select(meta, seed=3, **kw).result  # type: ignore[arg-type]
    assert first == oort_select(meta, seed=3, **kw).result  # type: ignore[arg-type]
    assert sorted(first["explored"]) == ["new1", "new2"]
    assert len(first["selected"]) == 4 and len(set(first["selected"])) == 4


def test_reputation_is_the_decayed_mean_of_cosines() -> None:
    rows = [ClientRound(r, 10, {}, {"cos_to_mean": c}) for r, c in [(0, 1.0), (1, 0.0), (2, 0.5)]]
    rows.insert(1, ClientRound(5, 10, {}, {}))  # a round without the summary is reported
    out = reputation_series(ClientHistory("j", "a", rows), decay=0.5)
    # after round 2: (0.25*1 + 0.5*0 + 1*0.5) / (0.25 + 0.5 + 1)
    assert out["series"][-1] == [2, pytest.approx(0.75 / 1.75)]
    assert out["series"][0] == [0, 1.0] and out["missing"] == [5]


def _decayed_mean_reference(cosines: dict[int, float], decay: float, at: int) -> float:
    """The docstring's Σ_t γ^(T−t)·c_t / Σ_t γ^(T−t), weights by round, in float64."""
    rounds = np.array(sorted(r for r in cosines if r <= at), dtype=np.float64)
    c = np.array([cosines[int(r)] for r in rounds], dtype=np.float64)
    w = np.power(decay, at - rounds)
    return float((w * c).sum() / w.sum())


def test_reputation_decays_by_round_gap_under_sparse_participation() -> None:
    cosines = {0: 1.0, 10: -0.999}
    rows = [ClientRound(r, 10, {}, {"cos_to_mean": c}) for r, c in cosines.items()]
    out = reputation_series(ClientHistory("j", "a", rows), decay=0.5)
    want = _decayed_mean_reference(cosines, 0.5, 10)
    assert want == pytest.approx(-0.997, abs=1e-3)  # not (0.5·1 − 0.999) / 1.5 = −0.33
    assert out["series"] == [[0, 1.0], [10, pytest.approx(want, rel=1e-12)]]


def test_reputation_matches_the_formula_on_random_sparse_histories() -> None:
    rng = np.random.default_rng(7)
    for _ in range(50):
        rounds = sorted(rng.choice(40, size=int(rng.integers(1, 12)), replace=False).tolist())
        cosines = {int(r): float(rng.uniform(-1, 1)) for r in rounds}
        decay = float(rng.choice([0.0, 0.3, 0.8, 1.0]))
        rows = [ClientRound(r, 10, {}, {"cos_to_mean": c}) for r, c in cosines.items()]
        series = reputation_series(ClientHistory("j", "a", rows[::-1]), decay)["series"]
        assert [r for r, _ in series] == rounds
        for r, v in series:
            assert v == pytest.approx(_decayed_mean_reference(cosines, decay, r), rel=1e-9)


def incentive_reference(
    manifests: list[RoundManifest], budget: float, metric: str = "auto"
) -> tuple[dict[str, float], dict[str, str]]:
    """The payouts by the definition, in float64 from the manifests themselves: round t pays
    ``budget · max(c_i, 0) / Σ_{j ∈ P_t} max(c_j, 0)`` over all its participants, c in the
    round's one unit (``auto``: contribution, else cos_to_mean, else num_examples — the first
    every participant has). Returns (payout per client, unit per round)."""
    pay: dict[str, float] = {}
    units: dict[str, str] = {}
    for m in manifests:
        entries = m.updates

        def value(
            c: str, source: str, entries: Mapping[str, UpdateEntry] = entries
        ) -> float | None:
            if source == "num_examples":
                return float(entries[c].num_examples)
            v = entries[c].summary.get(source)
            return None if v is None else float(v)

        if metric == "auto":
            order = ["contribution", "cos_to_mean", "num_examples"]
            unit = next(u for u in order if all(value(c, u) is not None for c in entries))
        else:
            unit = metric
        have = {c: value(c, unit) for c in entries}
        pos = np.array([max(v, 0.0) for v in have.values() if v is not None], dtype=np.float64)
        total = float(pos.sum())
        units[str(m.round)] = unit
        for c, v in have.items():
            pay.setdefault(c, 0.0)
            if v is not None and total > 0:
                pay[c] += budget * max(v, 0.0) / total
    return pay, units


def _incentive_job(store: ObjectStore) -> list[RoundManifest]:
    """Round 0: every client has a contribution; round 1: a partial backfill (some have
    one) and cosines for all, some negative; round 2: no summary; round 3: client c7 only."""
    rng = np.random.default_rng(11)
    clients = [f"c{i}" for i in range(8)]
    for r in range(4):
        members = clients if r < 3 else ["c7"]
        entries = [
            store.put_update("inc", r, c, small_update(r * 10 + i)) for i, c in enumerate(members)
        ]
        summaries: dict[str, dict[str, float]] = {}
        for i, c in enumerate(members):
            if r == 0:
                summaries[c] = {"contribution": float(rng.uniform(-0.5, 2.0)), "cos_to_mean": 0.5}
            elif r == 1:
                summaries[c] = {"cos_to_mean": float(rng.uniform(-1, 1))}
                if i % 3 == 0:
                    summaries[c]["contribution"] = 5.0
        store.commit_round("inc", r, entries, summaries=summaries or None)
    return [store.get_manifest("inc", r) for r in range(4)]


def test_incentive_pays_a_client_the_same_whoever_else_is_asked(store: ObjectStore) -> None:
    manifests = _incentive_job(store)
    nodes = InProcessNodes(store, 4, billed_ms=1.0, memory_mb=1024)
    router = make_router(store, nodes, tokens={"fls_t": ["*"]}, nodes=4, replication=2)

    def ask(params: dict[str, Any]) -> dict[str, Any]:
        answer = router.run("Bearer fls_t", "inc", "incentive", json.dumps({"params": params}))
        return cast(dict[str, Any], answer["result"])

    want, units = incentive_reference(manifests, 100.0)
    everyone = ask({})
    # one invocation, on the node holding the job's meta shard (every client's rows)
    assert [f for f, _ in nodes.calls] == [
        node_name("fl", rank_nodes(str(meta_shard("inc")), 4)[0])
    ]
    assert everyone["values"] == pytest.approx(want, rel=1e-12)
    # one unit per round, the first every participant has: never a cosine beside a count
    assert (
        everyone["units"]
        == units
        == {"0": "contribution", "1": "cos_to_mean", "2": "num_examples", "3": "num_examples"}
    )
    for paid in everyone["rounds"].values():
        assert sum(paid.values()) == pytest.approx(100.0)  # each round pays its whole budget
    for c in ("c0", "c4", "c7"):
        alone = ask({"clients": [c]})
        assert alone["values"] == {c: pytest.approx(want[c], rel=1e-12)}
        assert alone["units"] == {r: units[r] for r in alone["units"]}
    pair = ask({"clients": ["c3", "c1"]})
    assert pair["values"] == {c: pytest.approx(want[c], rel=1e-12) for c in ("c1", "c3")}
    # a forced metric some participants lack: they are reported, the others share the round
    forced, _ = incentive_reference(manifests, 100.0, "contribution")
    out = ask({"metric": "contribution", "clients": ["c1", "c3"]})
    assert out["values"] == {c: pytest.approx(forced[c], rel=1e-12) for c in ("c1", "c3")}
    assert out["missing_rounds"] == {"c1": [1, 2], "c3": [2]}


def _job_with_summaries(store: ObjectStore) -> None:
    for r in range(3):
        entries = [store.put_update("j", r, f"c{i}", small_update(i + 10 * r)) for i in range(4)]
        summaries = {
            f"c{i}": {"cos_to_mean": 0.9 - 0.3 * i, "contribution": 4.0 - i} for i in range(4)
        }
        store.commit_round("j", r, entries, summaries=summaries)


def test_client_workloads_run_on_a_node_from_summaries_only(store: ObjectStore) -> None:
    _job_with_summaries(store)
    node = CacheNode(store, budget_bytes=10**8)
    before = store.gets
    ans = node.handle(
        {
            "op": "run",
            "workload": "reputation",
            "job": "j",
            "params": {"clients": ["c0", "c3"], "threshold": 0.5},
        }
    )
    assert "error" not in ans, ans
    # the node answers for every client asked, finalised: the router has nothing to merge
    final = ans["result"]
    assert final["values"]["c0"] == pytest.approx(0.9)
    assert final["values"]["c3"] == pytest.approx(0.0, abs=1e-9)
    assert final["selected"] == ["c0", "c3"] and final["flagged"] == ["c3"]
    # only the job spec and the manifests were read: no update object
    assert store.gets - before <= 1 + 3


def test_meta_workload_runs_on_a_node(store: ObjectStore) -> None:
    for r in range(2):
        for i in range(3):
            u = small_update(i)
            u.metrics = {"loss": 0.5 + i, "duration_s": 1.0}
            store.put_update("j", r, f"c{i}", u)
        store.commit_round("j", r)
    node = CacheNode(store, budget_bytes=10**8)
    ans = node.handle(
        {"op": "run", "workload": "oort_select", "job": "j", "params": {"k": 2, "epsilon": 0.0}}
    )
    assert ans["result"]["selected"][0] == "c2", ans
    again = node.handle(
        {"op": "run", "workload": "oort_select", "job": "j", "params": {"k": 2, "epsilon": 0.0}}
    )
    assert again["cache"] == "hit" and again["s3_gets"] == 0


def test_inference_matches_a_direct_evaluation(store: ObjectStore) -> None:
    model = models.build("digits_cnn", seed=1)
    store.put_job_spec(JobSpec("m", model="digits_cnn"))
    store.put_global("m", 0, Update(models.state_arrays(model)))
    rng = np.random.default_rng(0)
    x = rng.random((20, 1, 8, 8)).astype(np.float32)
    y = rng.integers(0, 10, 20)
    store.put_validation_set("m", x, y)
    node = CacheNode(store, budget_bytes=10**8)
    ans = node.handle({"op": "run", "workload": "inference", "job": "m", "params": {}})
    assert ans["result"]["accuracy"] == pytest.approx(models.accuracy(model, x, y))
    direct = models.predict(model, x[:3]).tolist()
    ans = node.handle(
        {"op": "run", "workload": "inference", "job": "m", "params": {"inputs": x[:3].tolist()}}
    )
    assert ans["result"]["predictions"] == direct
    bad = node.handle(
        {"op": "run", "workload": "inference", "job": "m", "params": {"inputs": [[1.0, 2.0]]}}
    )
    assert bad["status"] == 400 and "shape" in bad["error"]["message"]
    labelled = {"inputs": x[:3].tolist(), "labels": y[:3].tolist()}
    ans = node.handle({"op": "run", "workload": "inference", "job": "m", "params": labelled})
    assert ans["result"]["accuracy"] == pytest.approx(float((np.array(direct) == y[:3]).mean()))
    for params, says in [
        ({"labels": y[:3].tolist()}, "send 'inputs' with them"),  # not silently ignored
        ({"inputs": x[:2].tolist(), "labels": [0, 10]}, "class indices in [0, 9]"),
        ({"inputs": x[:2].tolist(), "labels": [0, -1]}, "class indices in [0, 9]"),
        ({"inputs": x[:2].tolist(), "labels": [0, 1.5]}, "integers"),
        ({"inputs": x[:2].tolist(), "labels": [0]}, "list of 2 integers"),
    ]:
        bad = node.handle({"op": "run", "workload": "inference", "job": "m", "params": params})
        assert bad["status"] == 400 and says in bad["error"]["message"], (params, bad)


def test_model_workload_without_model_is_400(store: ObjectStore) -> None:
    store.put_global("nomodel", 0, small_update(0))
    node = CacheNode(store, budget_bytes=10**8)
    ans = node.handle({"op": "run", "workload": "inference", "job": "nomodel", "params": {}})
    assert ans["status"] == 400 and "--model" in ans["error"]["message"]
