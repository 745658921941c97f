"""Model evaluations shared on a round: computed once per round per node.

On the simulated digits job (10 clients, a label flipper): every client model's accuracy is
computed once and reused by accuracy_select, personalize and a repeated request; leave-one-out's
``U(N)`` is personalize's FedAvg model; fltrust trains ``g_0`` once for requests that differ
only in ``global_lr``; feddebug's identical request runs no model. Every memoised answer equals
the answer on a freshly loaded round (no memo) and the reference the test computes with
:func:`flstore_core.models.accuracy` directly.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from evaluation.digits_job import DigitsJob, simulate
from flstore_core import models
from flstore_core.cache.round_data import ArtifactStats, RoundData
from flstore_core.cache.round_loading import load_round
from flstore_core.storage.object_store import ObjectStore
from flstore_core.workloads import WorkloadResult, get
from flstore_core.workloads.evaluation import ValidationScorer, validation_digest
from lambdas.local_runtime.s3_server import LocalS3

ROUND = 3


def run(name: str, data: RoundData, **params: Any) -> WorkloadResult:
    workload = get(name)
    out: WorkloadResult = workload.run(data, workload.validate(params))
    return out


@pytest.fixture(scope="module")
def digits(s3_server: LocalS3) -> Iterator[tuple[ObjectStore, DigitsJob]]:
    store = ObjectStore("model-evaluations", endpoint_url=s3_server.url)
    store.ensure_bucket()
    job = simulate(store, job="digits", clients=10, rounds=ROUND + 1, malicious=("client-09",))
    yield store, job
    store.close()


def fresh(digits: tuple[ObjectStore, DigitsJob]) -> RoundData:
    store, job = digits
    return load_round(store, job.job, ROUND, ArtifactStats())


def test_client_accuracies_are_computed_once_and_shared(
    digits: tuple[ObjectStore, DigitsJob],
) -> None:
    store, job = digits
    data = fresh(digits)
    first = run("accuracy_select", data, k=3).result
    assert data.stats.computed == {"client_accuracy": 10, "model_accuracy": 10}
    again = run("accuracy_select", data, k=3).result
    assert again == first and data.stats.reused["client_accuracy"] == 10
    assert data.stats.computed["model_accuracy"] == 10  # the repeat evaluated nothing
    # the reference: each client's model evaluated directly
    x, y = store.get_validation_set(job.job)
    model = models.build("digits_cnn")
    for i, c in enumerate(data.clients):
        ref = models.accuracy(models.load_vector(model, data.client_weights(i), data.specs), x, y)
        assert first["scores"][c] == ref

    loo = run("contribution_loo", data).result  # U(N) and the 10 leave-one-out aggregates
    assert data.stats.computed["model_accuracy"] == 20 + 1
    assert data.stats.computed["subset_accuracy"] == 1 + 10
    pers = run("personalize", data, client="client-02", peers=3, by="accuracy").result
    # peers' and the client's accuracies, and the FedAvg model (= U(N), the same coefficients'
    # key), come from memory: only the personalized model is evaluated, keyed by its
    # coefficients as a U(S) is (its weights are not hashed)
    assert data.stats.computed["model_accuracy"] == 21
    assert data.stats.computed["subset_accuracy"] == 12
    assert pers["global_accuracy"] == loo["utility_all"]
    assert pers["client_accuracy"] == first["scores"]["client-02"]
    other = fresh(digits)
    assert run("contribution_loo", other).result == loo
    assert run("personalize", other, client="client-02", peers=3, by="accuracy").result == pers


def test_shapley_shares_subsets_with_leave_one_out(digits: tuple[ObjectStore, DigitsJob]) -> None:
    data = fresh(digits)
    loo = run("contribution_loo", data).result
    before = data.stats.computed["model_accuracy"]
    shap = run(
        "contribution_shapley", data, method="gtg", min_permutations=10, max_permutations=10
    ).result
    assert shap["utility_all"] == loo["utility_all"]
    # U(N) was memoised; every other subset a permutation reached is evaluated at most once
    assert data.stats.computed["model_accuracy"] - before < shap["evaluations"]
    repeat = run(
        "contribution_shapley", data, method="gtg", min_permutations=10, max_permutations=10
    ).result
    assert repeat == shap
    assert run(
        "contribution_shapley",
        fresh(digits),
        method="gtg",
        min_permutations=10,
        max_permutations=10,
    ).result == (shap)


def test_fltrust_trains_g0_once_per_knobs(digits: tuple[ObjectStore, DigitsJob]) -> None:
    data = fresh(digits)
    run("fltrust", data, global_lr=1.0)
    second = run("fltrust", data, global_lr=0.5)
    assert data.stats.computed["server_update"] == 1 and data.stats.reused["server_update"] == 1
    ref = run("fltrust", fresh(digits), global_lr=0.5)
    assert second.result == ref.result
    got, want = second.model_vector(), ref.model_vector()
    assert got is not None and want is not None and np.array_equal(got, want)
    run("fltrust", data, global_lr=0.5, seed=1)  # a new g_0
    assert data.stats.computed["server_update"] == 2


def test_feddebug_repeat_is_answered_from_memory(digits: tuple[ObjectStore, DigitsJob]) -> None:
    data = fresh(digits)
    first = run("feddebug", data, num_inputs=4).result
    assert run("feddebug", data, num_inputs=4).result == first
    assert data.stats.reused["feddebug_votes"] == 1
    assert run("feddebug", fresh(digits), num_inputs=4).result == first
    run("feddebug", data, num_inputs=4, threshold=0.01)
    assert data.stats.computed["feddebug_votes"] == 2


def test_evaluations_are_keyed_by_the_validation_set(
    digits: tuple[ObjectStore, DigitsJob],
) -> None:
    store, job = digits
    x, y = store.get_validation_set(job.job)
    y2 = y.copy()
    y2[0] = (y2[0] + 1) % 10
    assert validation_digest(x, y) != validation_digest(x, y2)
    assert validation_digest(x, y) == validation_digest(x.copy(), y.copy())
    scorer = ValidationScorer(fresh(digits))
    assert validation_digest(scorer.x, scorer.y) in scorer.key and "digits_cnn" in scorer.key
