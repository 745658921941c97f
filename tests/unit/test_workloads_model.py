"""Model-based workloads against their references, and on a simulated federated digits job.

The pure estimators are pinned on hand-checkable cases and against independent computations
(brute-force Shapley over all permutations, a numpy transcription of FLTrust's formula). The
digits job (:func:`evaluation.digits_job.simulate`: 10 clients × 5 rounds, ``client-09``
flipping its labels) is trained once per module into a moto bucket; the detectors are checked
on rounds 3 and 4, where the attack is established (round 0 models are still at their
initialisation).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from evaluation.digits_job import DigitsJob, simulate
from flstore_core import models
from flstore_core.cache.node import CacheNode
from flstore_core.cache.round_data import ArtifactStats, RoundData
from flstore_core.cache.round_loading import load_round
from flstore_core.data.codec import decode_update
from flstore_core.data.manifest import JobSpec
from flstore_core.errors import InvalidParamsError, NotFoundError
from flstore_core.storage.object_store import ObjectStore
from flstore_core.workloads import WorkloadResult, catalogue, get
from flstore_core.workloads.contribution_loo import leave_one_out
from flstore_core.workloads.contribution_shapley import exact_shapley, gtg_shapley
from flstore_core.workloads.feddebug import localize
from lambdas.local_runtime.s3_server import LocalS3
from tests.conftest import make_round, small_update

MODEL_WORKLOADS = (
    "accuracy_select",
    "contribution_loo",
    "contribution_shapley",
    "personalize",
    "feddebug",
    "fltrust",
)
MALICIOUS = "client-09"
ATTACKED_ROUNDS = (3, 4)


def run(name: str, data: RoundData, **params: Any) -> WorkloadResult:
    """Run a workload as a cache node does: validate params first, then run."""
    workload = get(name)
    return workload.run(data, workload.validate(params))


# ---------------------------------------------------------------------- the digits job


@pytest.fixture(scope="module")
def digits(s3_server: LocalS3) -> Iterator[tuple[ObjectStore, DigitsJob]]:
    store = ObjectStore("model-workloads", endpoint_url=s3_server.url)
    store.ensure_bucket()
    job = simulate(store, job="digits", clients=10, rounds=5, malicious=(MALICIOUS,))
    yield store, job
    store.close()


@pytest.fixture(scope="module")
def rounds(digits: tuple[ObjectStore, DigitsJob]) -> dict[int, RoundData]:
    store, job = digits
    return {r: load_round(store, job.job, r, ArtifactStats()) for r in ATTACKED_ROUNDS}


def test_the_digits_job_is_stored_and_learns(digits: tuple[ObjectStore, DigitsJob]) -> None:
    store, job = digits
    assert job.clients == [f"client-{i:02d}" for i in range(10)] and job.malicious == [MALICIOUS]
    assert store.list_rounds("digits") == [0, 1, 2, 3, 4]
    assert store.get_job_spec("digits").model == "digits_cnn"
    x, y = store.get_validation_set("digits")
    assert x.dtype == np.float32 and x.shape[1:] == (1, 8, 8) and y.dtype == np.int64
    assert x.min() >= 0.0 and x.max() <= 1.0
    manifest = store.get_manifest("digits", 4)
    entry = manifest.updates["client-00"]
    assert {"loss", "duration_s"} <= set(entry.metrics) and entry.num_examples > 0
    assert job.accuracy[-1] > 0.8 > job.initial_accuracy


# ---------------------------------------------------------------------- accuracy_select


@pytest.mark.parametrize("round_", ATTACKED_ROUNDS)
def test_accuracy_select_never_selects_the_label_flipper(
    rounds: dict[int, RoundData], round_: int
) -> None:
    out = run("accuracy_select", rounds[round_], k=9).result
    assert MALICIOUS not in out["selected"] and len(out["selected"]) == 9
    assert min(out["scores"], key=out["scores"].get) == MALICIOUS


def test_accuracy_select_scores_are_each_client_models_accuracy(
    digits: tuple[ObjectStore, DigitsJob], rounds: dict[int, RoundData]
) -> None:
    store, _ = digits
    data = rounds[4]
    x, y = store.get_validation_set("digits")
    model = models.build("digits_cnn")
    row = data.clients.index("client-03")
    models.load_vector(model, data.client_weights(row), data.specs)
    scores = run("accuracy_select", data, k=1).result["scores"]
    assert scores["client-03"] == pytest.approx(models.accuracy(model, x, y))


# ---------------------------------------------------------------------- contribution_loo


def test_leave_one_out_on_a_hand_checked_utility() -> None:
    # U(S) = |S ∩ {0, 1}|: clients 0 and 1 are worth 1 each, client 2 nothing
    total, without = leave_one_out(3, lambda s: float(len(s & {0, 1})))
    assert total == 2.0 and list(total - without) == [1.0, 1.0, 0.0]


@pytest.mark.parametrize("round_", ATTACKED_ROUNDS)
def test_contribution_loo_ranks_the_label_flipper_last(
    rounds: dict[int, RoundData], round_: int
) -> None:
    out = run("contribution_loo", rounds[round_]).result
    assert out["selected"][-1] == MALICIOUS and out["values"][MALICIOUS] < 0
    assert out["evaluations"] == 11
    for c, v in out["values"].items():
        assert v == pytest.approx(out["utility_all"] - out["utility_without"][c])


# ---------------------------------------------------------------------- Shapley


def brute_force_shapley(n: int, utility: Any) -> npt.NDArray[np.float64]:
    """Average marginal contribution over all n! orderings (the definition)."""
    values = np.zeros(n)
    for order in itertools.permutations(range(n)):
        members: set[int] = set()
        for player in order:
            before = utility(frozenset(members))
            members.add(player)
            values[player] += utility(frozenset(members)) - before
    return values / math.factorial(n)


def test_exact_shapley_on_the_textbook_three_player_game() -> None:
    # v(∅)=0, v(0)=40, v(1)=60, v(2)=80, v(01)=70, v(02)=75, v(12)=85, v(012)=90; over the six
    # orders client 0 adds 40, 40, 10, 5, -5, 5 (sum 95), client 1 30, 15, 60, 60, 15, 5 (185),
    # client 2 20, 35, 20, 25, 80, 80 (260)
    table = {(): 0, (0,): 40, (1,): 60, (2,): 80, (0, 1): 70, (0, 2): 75, (1, 2): 85}
    table[(0, 1, 2)] = 90
    est = exact_shapley(3, lambda s: float(table[tuple(sorted(s))]))
    assert est.values == pytest.approx([95 / 6, 185 / 6, 260 / 6])
    assert est.evaluations == 8 and est.values.sum() == pytest.approx(90)


def random_game(seed: int, n: int = 6) -> Any:
    """A non-additive game: saturating sum of player strengths plus pairwise interactions."""
    rng = np.random.default_rng(seed)
    strength = rng.uniform(0, 1, n)
    strength[-1] = -0.5  # one harmful player
    pairs = rng.normal(0, 0.1, (n, n))

    def utility(members: frozenset[int]) -> float:
        idx = sorted(members)
        pair_sum = sum(pairs[i, j] for i in idx for j in idx if i < j)
        return float(0.1 + 0.8 * (1 - np.exp(-strength[idx].sum())) + pair_sum)

    return utility


@pytest.mark.parametrize("seed", range(3))
def test_exact_shapley_matches_brute_force_enumeration(seed: int) -> None:
    game = random_game(seed, n=5)
    est = exact_shapley(5, game)
    assert est.values == pytest.approx(brute_force_shapley(5, game), abs=1e-12)
    assert est.evaluations == 2**5


@pytest.mark.parametrize("seed", range(5))
def test_gtg_shapley_is_within_tolerance_of_exact_for_six_players(seed: int) -> None:
    game = random_game(seed)
    exact = exact_shapley(6, game).values
    scale = float(np.max(np.abs(exact)))
    # without truncation and run to a tight convergence: within 3% of the largest value
    tight = gtg_shapley(6, game, eps=0.0, tolerance=0.001, max_permutations=3000)
    assert np.max(np.abs(tight.values - exact)) <= 0.03 * scale
    # the paper's knobs (eps 0.001, 5% relative change, 30..100 permutations): within 25%,
    # with the best and the harmful player identified
    default = gtg_shapley(6, game)
    assert np.max(np.abs(default.values - exact)) <= 0.25 * scale
    assert np.argmax(default.values) == np.argmax(exact) and np.argmin(default.values) == 5
    assert default.evaluations <= 2**6


def test_gtg_guided_sampling_lets_every_player_lead_in_turn() -> None:
    leaders: list[int] = []

    def utility(members: frozenset[int]) -> float:
        if len(members) == 1:
            leaders.extend(members)
        return float(len(members))

    gtg_shapley(4, utility, eps=0.0, min_permutations=4, max_permutations=4)
    assert leaders == [0, 1, 2, 3]


def test_gtg_within_round_truncation_skips_evaluations_once_the_prefix_reaches_u_of_n() -> None:
    calls: list[frozenset[int]] = []

    def utility(members: frozenset[int]) -> float:  # only player 0 matters
        calls.append(members)
        return 1.0 if 0 in members else 0.0

    est = gtg_shapley(8, utility, eps=0.001, max_permutations=80)
    assert est.values == pytest.approx([1.0] + [0.0] * 7)
    # a permutation stops evaluating once player 0 has joined: far fewer than 2^8 subsets
    assert len(calls) == est.evaluations < 2**8 // 2


def test_gtg_stops_on_convergence_and_truncates_a_round_without_progress() -> None:
    strengths = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    additive = gtg_shapley(6, lambda s: sum(strengths[i] for i in s))
    # every permutation gives exact marginals: converged at the first check (30 permutations)
    assert additive.converged and additive.permutations == 30
    assert additive.values == pytest.approx(strengths)
    flat = gtg_shapley(6, lambda s: 0.5 + 1e-4 * len(s), round_threshold=0.01)
    assert flat.round_truncated and not flat.values.any() and flat.evaluations == 2


@pytest.mark.parametrize("round_", ATTACKED_ROUNDS)
def test_contribution_shapley_ranks_the_label_flipper_last(
    rounds: dict[int, RoundData], round_: int
) -> None:
    out = run("contribution_shapley", rounds[round_]).result
    assert out["method"] == "gtg"  # 10 clients: auto estimates
    assert out["selected"][-1] == MALICIOUS and out["values"][MALICIOUS] < 0
    assert out["empty_model"] == "base" and 0 < out["evaluations"] <= 2**10
    # efficiency: the values add up to U(N) − U(∅), up to the truncation threshold
    total = sum(out["values"].values())
    assert total == pytest.approx(out["utility_all"] - out["utility_empty"], abs=0.01)


def sub_round(data: RoundData, rows: list[int]) -> RoundData:
    """The round restricted to ``rows`` (same base, same job context)."""
    assert data.base is not None
    return RoundData(
        data.job,
        data.round,
        [data.clients[i] for i in rows],
        data.matrix[rows] + data.base,
        data.specs,
        data.num_examples[rows],
        [data.metrics[i] for i in rows],
        base=data.base.copy(),
        context=data.context,
    )


def test_contribution_shapley_is_exact_on_six_digits_clients(
    rounds: dict[int, RoundData],
) -> None:
    data = sub_round(rounds[4], [0, 1, 2, 3, 4, 9])
    out = run("contribution_shapley", data).result
    assert out["method"] == "exact" and out["evaluations"] == 2**6
    assert out["selected"][-1] == MALICIOUS
    assert sum(out["values"].values()) == pytest.approx(
        out["utility_all"] - out["utility_empty"], abs=1e-9
    )
    # all 64 subsets are memoised after a few permutations: running long costs no evaluations
    gtg = run(
        "contribution_shapley", data, method="gtg", eps=0.0, tolerance=0.001, max_permutations=3000
    ).result
    assert gtg["selected"][-1] == MALICIOUS and gtg["evaluations"] <= 2**6
    assert gtg["values"][MALICIOUS] == pytest.approx(out["values"][MALICIOUS], rel=0.05)


def test_exact_shapley_refuses_rounds_too_large_to_enumerate() -> None:
    data = make_round(np.zeros((15, 2)))
    with pytest.raises(InvalidParamsError, match="use method 'gtg'"):
        run("contribution_shapley", data, method="exact")


# ---------------------------------------------------------------------- FedDebug


def test_feddebug_localizes_the_client_outside_the_largest_common_activation() -> None:
    # one input; clients 0–2 share neurons 0–1 (N∖{3} has 2 in common, any subset with
    # client 3 at most 1: neuron 2, shared by 0, 1 and 3)
    acts = np.array(
        [[[1, 1, 1, 0, 0]], [[1, 1, 1, 0, 1]], [[1, 1, 0, 1, 0]], [[0, 0, 1, 1, 1]]], dtype=bool
    )
    per_input, votes = localize(acts, num_faulty=1)
    assert per_input == [[3]] and list(votes) == [0, 0, 0, 1]
    # removing client 3 and repeating: {0, 1} have neurons 0–2 in common, other pairs two
    per_input, votes = localize(acts, num_faulty=2)
    assert per_input == [[3, 2]] and list(votes) == [0, 0, 1, 1]


def test_feddebug_votes_by_majority_over_inputs() -> None:
    rng = np.random.default_rng(0)
    common = rng.random(50) < 0.5
    acts = np.repeat(common[None, None, :], 5, axis=0).repeat(3, axis=1)
    acts[1, 0] = ~common  # client 1 deviates on input 0 only, client 4 on inputs 1 and 2
    acts[4, 1:] = ~common
    _, votes = localize(acts, num_faulty=1)
    assert list(votes) == [0, 1, 0, 0, 2]


@pytest.mark.parametrize("round_", ATTACKED_ROUNDS)
def test_feddebug_flags_the_label_flipper(rounds: dict[int, RoundData], round_: int) -> None:
    out = run("feddebug", rounds[round_]).result
    assert out["flagged"] == [MALICIOUS]
    assert out["votes"][MALICIOUS] > out["num_inputs"] // 2
    assert out["neurons"] == 16 * 64 + 32 * 64 + 64 + 10  # every Conv2d/Linear output


def test_feddebug_needs_two_clients_left_after_removing_the_faulty() -> None:
    data = make_round(np.zeros((4, 2)))
    with pytest.raises(InvalidParamsError, match="num_faulty <= 2"):
        run("feddebug", data, num_faulty=3)


@pytest.mark.parametrize("n", [1, 2])
def test_feddebug_on_a_round_too_small_asks_for_more_clients_not_num_faulty_0(n: int) -> None:
    with pytest.raises(InvalidParamsError, match="at least 3 clients") as err:
        run("feddebug", make_round(np.zeros((n, 2))), num_faulty=1)
    assert "num_faulty <=" not in err.value.message


# ---------------------------------------------------------------------- FLTrust


def fltrust_reference(
    g: npt.NDArray[np.float64], g0: npt.NDArray[np.float64], base: npt.NDArray[np.float64]
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Cao et al. NDSS'21, Algorithm 2, transcribed: trust scores and the new model."""
    ts = np.array([max(0.0, gi @ g0 / (np.linalg.norm(gi) * np.linalg.norm(g0))) for gi in g])
    g_bar = np.array([np.linalg.norm(g0) / np.linalg.norm(gi) * gi for gi in g])
    aggregate = sum(t * gb for t, gb in zip(ts, g_bar, strict=True)) / ts.sum()
    return ts, base + aggregate


def test_fltrust_on_a_hand_checked_round() -> None:
    base = np.array([1.0, 1.0])
    deltas = np.array([[1.0, 0.0], [2.0, 0.0], [0.0, 3.0], [-1.0, 0.0]])  # c0 is the server
    data = make_round(base + deltas, base=base)
    out = run("fltrust", data, server_client="c0")
    # c1 points along g_0 (trust 1, rescaled to |g_0| = 1); c2 is orthogonal, c3 opposite
    assert out.result["scores"] == {"c1": 1.0, "c2": 0.0, "c3": 0.0}
    assert out.result["flagged"] == ["c2", "c3"]
    assert out.model is not None and out.model == pytest.approx([2.0, 1.0])


@pytest.mark.parametrize("seed", range(3))
def test_fltrust_matches_the_papers_formula(seed: int) -> None:
    rng = np.random.default_rng(seed)
    base = rng.standard_normal(30)
    g0 = rng.standard_normal(30)
    g = rng.standard_normal((8, 30)) * rng.uniform(0.1, 5, (8, 1))
    g[:4] += 2 * g0  # half the clients lean towards the server update
    data = make_round(base + np.vstack([g0, g]), base=base)
    out = run("fltrust", data, server_client="c0")
    ts, model = fltrust_reference(g, g0, base)
    assert [out.result["scores"][f"c{i + 1}"] for i in range(8)] == pytest.approx(ts, abs=1e-5)
    assert out.result["flagged"] == [f"c{i + 1}" for i in range(8) if ts[i] == 0]
    assert out.model is not None and out.model == pytest.approx(model, abs=1e-4)


def test_fltrust_with_no_trusted_client_returns_the_base() -> None:
    base = np.array([0.5, -0.5])
    data = make_round(base + np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, -2.0]]), base=base)
    out = run("fltrust", data, server_client="c0")
    assert out.result["flagged"] == ["c1", "c2"] and "note" in out.result
    assert out.model is not None and out.model == pytest.approx(base)


def test_fltrust_needs_a_base_model_and_a_known_server_client() -> None:
    with pytest.raises(InvalidParamsError, match="base model"):
        run("fltrust", make_round(np.ones((3, 2))), server_client="c0")
    with pytest.raises(NotFoundError, match="nobody"):
        run("fltrust", make_round(np.ones((3, 2)), base=np.zeros(2)), server_client="nobody")


@pytest.mark.parametrize("round_", ATTACKED_ROUNDS)
def test_fltrust_with_a_root_dataset_distrusts_the_label_flipper(
    rounds: dict[int, RoundData], round_: int
) -> None:
    data = rounds[round_]
    out = run("fltrust", data)
    assert out.result["server_update"] == "root_dataset"
    assert MALICIOUS in out.result["flagged"] and out.result["scores"][MALICIOUS] == 0.0
    assert len(out.result["flagged"]) <= 2
    fedavg = run("fedavg", data).model_vector()
    assert out.model is not None and fedavg is not None
    x, y = data.context.validation()
    model = models.build("digits_cnn")
    acc_fltrust = models.accuracy(models.load_vector(model, out.model, data.specs), x, y)
    acc_fedavg = models.accuracy(models.load_vector(model, fedavg, data.specs), x, y)
    assert acc_fltrust >= acc_fedavg - 0.02
    again = run("fltrust", data)  # deterministic given the seed
    assert again.model is not None and np.array_equal(again.model, out.model)


# ---------------------------------------------------------------------- personalize


def test_personalize_averages_the_client_with_its_most_similar_peers(
    rounds: dict[int, RoundData],
) -> None:
    data = rounds[4]
    out = run("personalize", data, client="client-00", peers=2)
    row = data.clients.index("client-00")
    d = data.matrix.astype(np.float64)
    cos = d @ d[row] / (np.linalg.norm(d, axis=1) * np.linalg.norm(d[row]))
    cos[row] = -np.inf
    expected_peers = [data.clients[i] for i in np.argsort(-cos)[:2]]
    assert out.result["peers"] == expected_peers
    members = [row] + [data.clients.index(c) for c in expected_peers]
    n = data.num_examples[members].astype(np.float64)
    weights = np.stack([data.client_weights(i) for i in members])
    assert out.model is not None
    assert out.model == pytest.approx((n / n.sum()) @ weights, abs=1e-5)
    assert set(out.result["weights"]) == {"client-00", *expected_peers}
    for key in ("accuracy", "client_accuracy", "global_accuracy"):
        assert 0.0 <= out.result[key] <= 1.0


def test_personalize_by_accuracy_never_picks_the_label_flipper(
    rounds: dict[int, RoundData],
) -> None:
    out = run("personalize", rounds[4], client="client-00", peers=8, by="accuracy")
    assert MALICIOUS not in out.result["peers"] and len(out.result["peers"]) == 8
    assert min(out.result["scores"], key=out.result["scores"].get) == MALICIOUS


def test_personalize_validates_its_client_and_peers(rounds: dict[int, RoundData]) -> None:
    data = rounds[4]
    with pytest.raises(InvalidParamsError, match="needs param 'client'"):
        run("personalize", data)
    with pytest.raises(NotFoundError, match="client-99"):
        run("personalize", data, client="client-99")
    with pytest.raises(InvalidParamsError, match="k=10"):
        run("personalize", data, client="client-00", peers=10)
    with pytest.raises(InvalidParamsError, match="must be one of"):
        run("personalize", data, client="client-00", by="luck")


# ---------------------------------------------------------------------- through a cache node


def test_model_workloads_are_registered_as_round_workloads() -> None:
    described = {w["name"]: w for w in catalogue()}
    for name in MODEL_WORKLOADS:
        assert described[name]["class"] == "round" and described[name]["reference"]


def test_model_results_are_stored_and_keyed_by_the_cache_node(
    digits: tuple[ObjectStore, DigitsJob],
) -> None:
    store, _ = digits
    node = CacheNode(store, budget_bytes=10**8)
    answer = node.handle(
        {
            "op": "run",
            "workload": "personalize",
            "job": "digits",
            "round": 4,
            "params": {"client": "client-03"},
        }
    )
    assert "error" not in answer, answer
    stored = decode_update(store.get_object(answer["result"]["model_key"]))
    assert list(stored.tensors) == [s.name for s in models.state_specs(models.build("digits_cnn"))]
    missing = node.handle(
        {
            "op": "run",
            "workload": "personalize",
            "job": "digits",
            "round": 4,
            "params": {"client": "client-42"},
        }
    )
    assert missing["status"] == 404


def _commit_small_job(store: ObjectStore, job: str, model: str | None) -> None:
    store.put_job_spec(JobSpec(job, model=model))
    store.put_initial(job, small_update(99))  # a base, so that FLTrust gets to its own checks
    for i in range(4):
        store.put_update(job, 0, f"c{i}", small_update(i))
    store.commit_round(job, 0)


@pytest.mark.parametrize("workload", MODEL_WORKLOADS)
def test_a_job_without_model_or_validation_set_gets_a_400(
    digits: tuple[ObjectStore, DigitsJob], workload: str
) -> None:
    store, _ = digits
    if not store.job_exists("no-model"):
        _commit_small_job(store, "no-model", None)
        _commit_small_job(store, "no-validation", "digits_cnn")
    node = CacheNode(store, budget_bytes=10**8)
    params = {"client": "c0"} if workload == "personalize" else {}
    for job, what in (("no-model", "declares no model"), ("no-validation", "no validation set")):
        if workload == "feddebug" and job == "no-validation":
            continue  # FedDebug needs no validation data, only the model
        answer = node.handle(
            {"op": "run", "workload": workload, "job": job, "round": 0, "params": params}
        )
        assert answer["status"] == 400, answer
        assert answer["error"]["code"] == "invalid_params" and what in answer["error"]["message"]


# ---------------------------------------------------------------------- similarity detectors


def _run(name: str, data: RoundData, **params: object) -> dict[str, object]:
    workload = get(name)
    return workload.run(data, workload.validate(params)).result  # type: ignore[no-any-return]


@pytest.mark.parametrize("round_", ATTACKED_ROUNDS)
def test_malicious_cosine_and_krum_flag_the_label_flipper(
    rounds: dict[int, RoundData], round_: int
) -> None:
    data = rounds[round_]
    assert _run("malicious_cosine", data, k=1)["flagged"] == [MALICIOUS]
    scores = _run("krum", data, f=1)["scores"]
    assert max(scores, key=scores.get) == MALICIOUS  # type: ignore[arg-type]
    assert MALICIOUS not in _run("multi_krum", data, f=1, m=5)["selected"]  # type: ignore[operator]


@pytest.mark.parametrize("round_", ATTACKED_ROUNDS)
def test_kmeans_and_cfl_split_separate_the_label_flipper(
    rounds: dict[int, RoundData], round_: int
) -> None:
    data = rounds[round_]
    labels = _run("kmeans", data, k=2)["labels"]
    assert isinstance(labels, dict)
    assert all(labels[c] != labels[MALICIOUS] for c in data.clients if c != MALICIOUS)
    clusters = _run("cfl_split", data)["clusters"]
    assert [MALICIOUS] in clusters  # type: ignore[operator]
