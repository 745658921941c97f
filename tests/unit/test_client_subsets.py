"""The ``clients`` param of fedavg, trimmed_mean and multi_krum: the workload over a
subset of the round's clients equals the workload's definition applied to those clients' rows
alone — float64 numpy (FedAvg's weighted mean, Multi-Krum's scores), Flower's ``trim_mean``
— with and without a stored base; bad subsets are 400s naming the problem, unknown clients
404s; the model result's key differs by subset. Sharded rounds: tests/unit/test_sharded_round.py
runs the same params block by block against the whole round."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from flwr.serverapp.strategy.fedtrimmedavg import trim_mean

from flstore_core.cache.results import result_key
from flstore_core.cache.round_data import RoundData
from flstore_core.errors import InvalidParamsError, NotFoundError
from flstore_core.workloads import WorkloadResult, get
from tests.conftest import make_round

N, D = 9, 301


def run(name: str, data: RoundData, **params: Any) -> WorkloadResult:
    workload = get(name)
    out: WorkloadResult = workload.run(data, workload.validate(params))
    return out


def model(out: WorkloadResult) -> npt.NDArray[np.float32]:
    vector = out.model_vector()
    assert vector is not None
    return vector


def rounds(seed: int) -> tuple[npt.NDArray[np.float32], list[int], list[RoundData]]:
    """Weights around a common offset (two far-off clients), example counts, and the round
    as cached with and without a stored base."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal(D).astype(np.float32)
    updates = rng.standard_normal((N, D)) * 0.1
    updates[[3, 7]] += 5.0
    weights = (base + updates).astype(np.float32)
    examples = [int(e) for e in rng.integers(1, 50, size=N)]
    return (
        weights,
        examples,
        [
            make_round(weights, num_examples=examples),
            make_round(weights, base=base, num_examples=examples),
        ],
    )


SUBSETS = [["c0", "c2", "c5"], ["c8", "c1", "c3", "c4", "c6", "c7"], ["c4"]]


@pytest.mark.parametrize("subset", SUBSETS)
@pytest.mark.parametrize("weighted", [True, False])
def test_fedavg_over_a_subset_is_the_weighted_mean_of_its_rows(
    subset: list[str], weighted: bool
) -> None:
    weights, examples, datas = rounds(1)
    rows = sorted(int(c[1:]) for c in subset)
    w = np.array([examples[i] if weighted else 1 for i in rows], np.float64)
    want = (w[:, None] * weights[rows].astype(np.float64)).sum(axis=0) / w.sum()
    for data in datas:
        out = run("fedavg", data, weighted=weighted, clients=subset)
        assert out.result["clients"] == [f"c{i}" for i in rows]
        assert out.result["weights"] == pytest.approx(
            {f"c{i}": wi / w.sum() for i, wi in zip(rows, w, strict=True)}
        )
        assert out.result["total_examples"] == sum(examples[i] for i in rows)
        np.testing.assert_allclose(model(out), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("subset", SUBSETS)
@pytest.mark.parametrize("beta", [0.0, 0.2, 0.34, 0.49])
def test_trimmed_mean_over_a_subset_trims_among_its_rows(subset: list[str], beta: float) -> None:
    weights, _, datas = rounds(2)
    rows = sorted(int(c[1:]) for c in subset)
    want = trim_mean(weights[rows].astype(np.float64), beta)  # Flower: floor(beta * n) per end
    for data in datas:
        out = run("trimmed_mean", data, beta=beta, clients=subset)
        cut = int(np.floor(beta * len(rows)))
        assert (out.result["cut"], out.result["kept"]) == (cut, len(rows) - 2 * cut)
        assert out.result["clients"] == [f"c{i}" for i in rows]
        np.testing.assert_allclose(model(out), want, rtol=1e-6, atol=1e-6)


def krum_reference(
    x: npt.NDArray[np.float64], f: int, m: int
) -> tuple[npt.NDArray[np.float64], list[int]]:
    """Blanchard et al.: s(i) = Σ of the n − f − 2 smallest ‖x_i − x_j‖², j ≠ i; the m least."""
    n = x.shape[0]
    d = ((x[:, None, :] - x[None, :, :]) ** 2).sum(axis=2)
    scores = np.array([np.sort(np.delete(d[i], i))[: n - f - 2].sum() for i in range(n)])
    return scores, [int(i) for i in np.argsort(scores, kind="stable")[:m]]


@pytest.mark.parametrize(
    ("subset", "f", "m"),
    [(["c0", "c1", "c2", "c3", "c7"], 1, None), (["c8", "c1", "c3", "c4", "c6", "c7"], 1, 2)],
)
def test_multi_krum_over_a_subset_scores_and_selects_among_it(
    subset: list[str], f: int, m: int | None
) -> None:
    weights, examples, datas = rounds(3)
    rows = sorted(int(c[1:]) for c in subset)
    x = weights[rows].astype(np.float64)
    scores, best = krum_reference(x, f, len(rows) - f if m is None else m)
    chosen = [rows[i] for i in best]
    w = np.array([examples[i] for i in chosen], np.float64)
    want = (w[:, None] * weights[chosen].astype(np.float64)).sum(axis=0) / w.sum()
    for data in datas:
        out = run("multi_krum", data, f=f, m=m, clients=subset)
        assert out.result["selected"] == [f"c{i}" for i in chosen]
        assert out.result["m"] == len(chosen)
        got = out.result["scores"]
        assert list(got) == [f"c{i}" for i in rows]
        np.testing.assert_allclose([got[f"c{i}"] for i in rows], scores, rtol=1e-5)
        np.testing.assert_allclose(model(out), want, rtol=1e-6, atol=1e-6)


def test_the_subset_is_a_set_and_its_result_key_is_its_own() -> None:
    _, _, (data, _) = rounds(4)
    for name, params in (("fedavg", {}), ("trimmed_mean", {"beta": 0.2}), ("multi_krum", {})):
        a = model(run(name, data, clients=["c1", "c2", "c3", "c4", "c5"], **params))
        b = model(run(name, data, clients=["c5", "c3", "c1", "c4", "c2"], **params))
        np.testing.assert_array_equal(a, b)
        workload = get(name)
        keys = {
            result_key(name, data, workload.validate({**params, "clients": clients}))
            for clients in (None, ["c1", "c2", "c3", "c4", "c5"], ["c1", "c2", "c3", "c4", "c6"])
        }
        assert len(keys) == 3


@pytest.mark.parametrize("name", ["fedavg", "trimmed_mean", "multi_krum"])
def test_bad_subsets_are_400s_naming_the_problem_and_unknown_clients_404s(name: str) -> None:
    _, _, (data, _) = rounds(5)
    with pytest.raises(InvalidParamsError, match="'clients' is empty"):
        run(name, data, clients=[])
    with pytest.raises(InvalidParamsError, match="lists client 'c1' twice"):
        run(name, data, clients=["c1", "c2", "c1", "c3", "c4"])
    with pytest.raises(InvalidParamsError, match="client ids"):
        run(name, data, clients=["c1", 2, "c3", "c4", "c5"])
    with pytest.raises(InvalidParamsError, match="type array"):
        run(name, data, clients="c1")
    with pytest.raises(NotFoundError, match="client 'c42' is not in round 0"):
        run(name, data, clients=["c1", "c42", "c3", "c4", "c5"])


def test_multi_krum_needs_a_subset_larger_than_2f_plus_2() -> None:
    _, _, (data, _) = rounds(6)
    with pytest.raises(InvalidParamsError, match="param 'clients' lists n=4 clients: use f <= 0"):
        run("multi_krum", data, f=1, clients=["c0", "c1", "c2", "c3"])
    with pytest.raises(InvalidParamsError, match="at least 3 clients"):
        run("multi_krum", data, f=0, clients=["c0", "c1"])
    with pytest.raises(InvalidParamsError, match="m=5 but param 'clients' lists only 4"):
        run("multi_krum", data, f=0, m=5, clients=["c0", "c1", "c2", "c3"])
    assert run("multi_krum", data, f=0, clients=["c0", "c1", "c2"]).result["m"] == 3
