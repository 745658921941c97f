"""Round-class robust-aggregation, filtering and clustering workloads, against their references.

Each workload is pinned on a small case worked out by hand and checked on random inputs against
an independent computation: Flower's own Krum / Multi-Krum / trimmed-mean functions, scikit-learn
with the same seed, or a direct numpy transcription of the paper.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
from flwr.server.strategy.aggregate import aggregate_krum, aggregate_trimmed_avg
from flwr.serverapp.strategy.fedtrimmedavg import trim_mean
from flwr.serverapp.strategy.multikrum import select_multikrum
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords
from sklearn.cluster import AgglomerativeClustering, KMeans

from flstore_core.cache.node import CacheNode
from flstore_core.cache.round_data import RoundData
from flstore_core.data.codec import Update, decode_update
from flstore_core.errors import InvalidParamsError
from flstore_core.storage.object_store import ObjectStore
from flstore_core.workloads import WorkloadResult, catalogue, get
from flstore_core.workloads.trimmed_mean import trimmed_mean_rows
from tests.conftest import make_round, small_update

# the whole module runs in a few seconds; a hang (e.g. a non-reentrant artifact lock) fails fast
pytestmark = pytest.mark.timeout(15)

ROUND_WORKLOADS = ("malicious_cosine", "krum", "multi_krum", "trimmed_mean", "kmeans", "cfl_split")


def run(name: str, data: RoundData, **params: Any) -> WorkloadResult:
    """Run a workload as a cache node does: validate params first, then run."""
    workload = get(name)
    return workload.run(data, workload.validate(params))


def random_round(
    seed: int, n: int = 9, d: int = 40, outliers: int = 2
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32], list[int]]:
    """Weights ``base + update`` with a few far-off updates, the base, and example counts."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal(d).astype(np.float32)
    updates = rng.standard_normal((n, d)) * 0.1
    updates[:outliers] += rng.standard_normal((outliers, d)) * 3.0
    weights = (base + updates).astype(np.float32)
    return weights, base, rng.integers(1, 50, n).tolist()


def flower_records(weights: npt.NDArray[np.float32], examples: Sequence[int]) -> list[RecordDict]:
    return [
        RecordDict(
            {"arrays": ArrayRecord([row.copy()]), "metrics": MetricRecord({"num-examples": e})}
        )
        for row, e in zip(weights, examples, strict=True)
    ]


def _flat(records: Sequence[RecordDict] | ArrayRecord) -> npt.NDArray[np.float64]:
    if isinstance(records, ArrayRecord):
        return np.concatenate([a.ravel() for a in records.to_numpy_ndarrays()]).astype(np.float64)
    return np.stack([_flat(r.array_records["arrays"]) for r in records])


# --------------------------------------------------------------------------- the catalogue


def test_the_round_workloads_are_registered_with_schemas() -> None:
    listed = {w["name"]: w for w in catalogue()}
    for name in ROUND_WORKLOADS:
        assert listed[name]["class"] == "round" and listed[name]["reference"]
    assert listed["krum"]["params"]["f"]["default"] == 1
    assert listed["multi_krum"]["params"]["m"]["default"] is None
    assert listed["trimmed_mean"]["params"]["beta"]["default"] == 0.1
    assert listed["kmeans"]["params"]["k"]["minimum"] == 2
    assert listed["cfl_split"]["params"]["eps_2"]["default"] == 1.6


# --------------------------------------------------------------------------- malicious_cosine

# c3 points against the others; the round mean is (1.9, 0.1) / 4
OPPOSED = [[1.0, 0.0], [1.0, 0.1], [0.9, 0.0], [-1.0, 0.0]]


def test_malicious_cosine_flags_the_update_opposed_to_the_mean() -> None:
    out = run("malicious_cosine", make_round(OPPOSED)).result
    assert out["flagged"] == ["c3"]
    assert out["scores"]["c3"] == pytest.approx(-1.9 / np.hypot(1.9, 0.1))
    assert out["scores"]["c0"] == pytest.approx(1.9 / np.hypot(1.9, 0.1))


def test_malicious_cosine_threshold_overrides_k() -> None:
    data = make_round(OPPOSED)
    assert run("malicious_cosine", data, threshold=0.5, k=4).result["flagged"] == ["c3"]
    # c0 and c2 share a direction (cos 0.99862), c1 is at 0.99889: worst first, ties by id
    flagged = run("malicious_cosine", data, threshold=0.999).result["flagged"]
    assert flagged == ["c3", "c0", "c2", "c1"]
    assert run("malicious_cosine", data, threshold=-1.0).result["flagged"] == []


def test_malicious_cosine_bottom_k_matches_numpy_on_deltas() -> None:
    weights, base, _ = random_round(1)
    out = run("malicious_cosine", make_round(weights, base=base), k=3).result
    x = weights.astype(np.float64) - base
    m = x.mean(0)
    cos = x @ m / (np.linalg.norm(x, axis=1) * np.linalg.norm(m))
    assert out["flagged"] == [f"c{i}" for i in np.argsort(cos)[:3]]
    np.testing.assert_allclose([out["scores"][f"c{i}"] for i in range(9)], cos, atol=1e-5)


# --------------------------------------------------------------------------- krum, multi_krum

# Five clients in 2-D, one far away; f = 1, so each score sums the n - f - 2 = 2 nearest others.
# Squared distances:       c0     c1     c2     c3     c4
#   c0 = (0, 0)             -      4      4      2    200   -> 2 + 4     = 6
#   c1 = (2, 0)             4      -      8      2    164   -> 2 + 4     = 6
#   c2 = (0, 2)             4      8      -      2    164   -> 2 + 4     = 6
#   c3 = (1, 1)             2      2      2      -    162   -> 2 + 2     = 4
#   c4 = (10, 10)         200    164    164    162      -   -> 162 + 164 = 326
POINTS = [[0.0, 0.0], [2.0, 0.0], [0.0, 2.0], [1.0, 1.0], [10.0, 10.0]]
KRUM_SCORES = {"c0": 6.0, "c1": 6.0, "c2": 6.0, "c3": 4.0, "c4": 326.0}


def test_krum_scores_and_selection_by_hand() -> None:
    base = np.array([0.5, -3.0])
    out = run("krum", make_round(np.array(POINTS) + base, base=base))
    assert out.result["selected"] == ["c3"]
    assert out.result["scores"] == pytest.approx(KRUM_SCORES)
    # the model is the selected client's weights, base added back to its delta
    assert out.model is not None
    np.testing.assert_allclose(out.model_vector(), np.array([1.0, 1.0]) + base, atol=1e-6)


def test_multi_krum_averages_the_m_best_by_examples_by_hand() -> None:
    # m = n - f = 4: c3 first, then the tied c0, c1, c2 by id; c4 (100 examples) is left out:
    # (1·(0,0) + 1·(2,0) + 2·(0,2) + 4·(1,1)) / 8 = (0.75, 1.0)
    out = run("multi_krum", make_round(POINTS, num_examples=[1, 1, 2, 4, 100]))
    assert out.result["selected"] == ["c3", "c0", "c1", "c2"]
    assert out.result["scores"] == pytest.approx(KRUM_SCORES)
    assert out.result["weights"] == pytest.approx({"c3": 0.5, "c0": 0.125, "c1": 0.125, "c2": 0.25})
    assert out.model is not None
    np.testing.assert_allclose(out.model_vector(), [0.75, 1.0], atol=1e-6)


def test_krum_excludes_self_even_when_updates_coincide() -> None:
    # c0 and c1 are identical: each counts the other at distance 0, never itself (with self
    # counted, c0 would score 0 + 0); f = 1, so 2 nearest others: c2 = 1 + 1, c3 = 4 + 9,
    # c4 = 16 + 36
    data = make_round([[0.0], [0.0], [1.0], [3.0], [7.0]])
    scores = run("krum", data).result["scores"]
    assert scores == pytest.approx({"c0": 1.0, "c1": 1.0, "c2": 2.0, "c3": 13.0, "c4": 52.0})


def brute_force_krum_scores(x: npt.NDArray[np.float64], f: int) -> npt.NDArray[np.float64]:
    """The definition, one client at a time: squared distances to the n - f - 2 nearest others."""
    n = len(x)
    out = []
    for i in range(n):
        others = [float(np.sum((x[i] - x[j]) ** 2)) for j in range(n) if j != i]
        out.append(sum(sorted(others)[: n - f - 2]))
    return np.array(out)


# Flower (1.42) scores with the same n - f - 2 neighbours as the paper (`max(1, n - f - 2)`, the
# clamp never applies since we require n > 2f + 2), excluding self by skipping the first entry of
# each row's argsort (the 0 on the diagonal). Flower's `aggregate_krum(..., to_keep=0)` returns the
# best client's weights; `select_multikrum` returns the m best, best first, which its MultiKrum
# strategy averages weighted by "num-examples" — the issue's example-weighted Multi-Krum. (Bulyan,
# not Krum, is where n - 2f appears; nothing here uses n - f neighbours.)
@pytest.mark.parametrize(("seed", "n", "f"), [(0, 9, 2), (1, 7, 1), (2, 12, 3), (3, 5, 0)])
def test_krum_matches_flower_and_the_definition(seed: int, n: int, f: int) -> None:
    weights, base, examples = random_round(seed, n=n)
    out = run("krum", make_round(weights, base=base, num_examples=examples), f=f)
    scores = np.array([out.result["scores"][f"c{i}"] for i in range(n)])
    np.testing.assert_allclose(scores, brute_force_krum_scores(weights.astype(np.float64), f), 1e-4)

    flower_best = aggregate_krum(
        [([w], e) for w, e in zip(weights, examples, strict=True)], f, to_keep=0
    )
    assert out.model is not None
    np.testing.assert_allclose(out.model_vector(), flower_best[0], atol=1e-5)
    picked = select_multikrum(flower_records(weights, examples), f, 1)
    assert out.result["selected"] == [f"c{int(np.argmin(scores))}"]
    np.testing.assert_allclose(_flat(picked)[0], weights[int(np.argmin(scores))], atol=0)


@pytest.mark.parametrize(("seed", "n", "f", "m"), [(0, 9, 2, None), (1, 7, 1, 3), (2, 12, 3, 1)])
def test_multi_krum_matches_flower(seed: int, n: int, f: int, m: int | None) -> None:
    weights, base, examples = random_round(seed, n=n)
    params = {"f": f} if m is None else {"f": f, "m": m}
    out = run("multi_krum", make_round(weights, base=base, num_examples=examples), **params)
    to_keep = n - f if m is None else m

    picked = select_multikrum(flower_records(weights, examples), f, to_keep)
    assert len(out.result["selected"]) == to_keep
    # same clients in the same order (best first): compare the rows Flower picked
    np.testing.assert_allclose(
        [weights[int(c[1:])] for c in out.result["selected"]], _flat(picked), atol=0
    )
    assert out.model is not None
    flower_model = _flat(aggregate_arrayrecords(picked, "num-examples"))
    np.testing.assert_allclose(out.model_vector(), flower_model, atol=1e-5)
    legacy = aggregate_krum(
        [([w], e) for w, e in zip(weights, examples, strict=True)], f, to_keep=to_keep
    )
    np.testing.assert_allclose(out.model_vector(), legacy[0], atol=1e-5)


# --------------------------------------------------------------------------- trimmed_mean

# columns: [1, 2, 3, 4, 100] -> drop 1 and 100 -> 3;  [-50, 0, 5, 10, 6] -> drop -50 and 10 ->
# (0 + 5 + 6) / 3 = 11/3;  all 7 -> 7.   beta = 0.2, n = 5: floor(0.2 · 5) = 1 cut from each end
TRIM = [[1.0, -50.0, 7.0], [2.0, 0.0, 7.0], [3.0, 5.0, 7.0], [4.0, 10.0, 7.0], [100.0, 6.0, 7.0]]


def test_trimmed_mean_by_hand() -> None:
    out = run("trimmed_mean", make_round(TRIM), beta=0.2)
    assert (out.result["cut"], out.result["kept"]) == (1, 3)
    assert out.model is not None
    np.testing.assert_allclose(out.model_vector(), [3.0, 11.0 / 3.0, 7.0], rtol=1e-6)


def test_trimmed_mean_cuts_floor_beta_n_and_adds_the_base_back() -> None:
    base = np.array([10.0, 20.0, 30.0])
    data = make_round(np.array(TRIM) + base, base=base)
    median = run("trimmed_mean", data, beta=0.4)  # floor(2.0) = 2 per end: the median
    assert median.result["cut"] == 2 and median.model is not None
    np.testing.assert_allclose(median.model_vector(), np.array([3.0, 5.0, 7.0]) + base, rtol=1e-6)
    plain = run("trimmed_mean", data, beta=0.1)  # floor(0.5) = 0: the plain mean
    assert plain.result["cut"] == 0 and plain.model is not None
    np.testing.assert_allclose(plain.model_vector(), np.mean(TRIM, 0) + base, rtol=1e-6)


@pytest.mark.parametrize(("seed", "n", "beta"), [(0, 10, 0.1), (1, 9, 0.25), (2, 7, 0.49)])
def test_trimmed_mean_matches_flower(seed: int, n: int, beta: float) -> None:
    weights, base, examples = random_round(seed, n=n, d=300)
    out = run("trimmed_mean", make_round(weights, base=base), beta=beta)
    assert out.model is not None
    np.testing.assert_allclose(out.model_vector(), trim_mean(weights, beta), atol=1e-5)
    legacy = aggregate_trimmed_avg([([w], e) for w, e in zip(weights, examples, strict=True)], beta)
    np.testing.assert_allclose(out.model_vector(), legacy[0], atol=1e-5)


def test_trimmed_mean_chunks_give_the_same_answer() -> None:
    x = np.random.default_rng(5).standard_normal((7, 1001)).astype(np.float32)
    whole = trimmed_mean_rows(x, 2, chunk_elements=10**9)
    np.testing.assert_array_equal(trimmed_mean_rows(x, 2, chunk_elements=7 * 64), whole)
    np.testing.assert_array_equal(trimmed_mean_rows(x, 2, chunk_elements=1), whole)
    np.testing.assert_allclose(whole, trim_mean(x, 2 / 7 + 1e-9), atol=1e-6)


# --------------------------------------------------------------------------- kmeans


def test_kmeans_separates_two_obvious_groups() -> None:
    data = make_round([[0.0, 0.0], [0.1, 0.0], [0.0, 0.1], [5.0, 5.0], [5.1, 5.0], [5.0, 5.1]])
    out = run("kmeans", data).result
    labels = out["labels"]
    assert labels["c0"] == labels["c1"] == labels["c2"] != labels["c3"] == labels["c4"]
    assert labels["c3"] == labels["c5"] and sorted(out["sizes"]) == [3, 3]


@pytest.mark.parametrize(("seed", "k"), [(0, 2), (1, 3), (7, 4)])
def test_kmeans_matches_scikit_learn_with_the_same_seed(seed: int, k: int) -> None:
    weights, base, _ = random_round(seed, n=12, d=30, outliers=4)
    out = run("kmeans", make_round(weights, base=base), k=k, seed=seed).result
    expect = KMeans(n_clusters=k, n_init=10, random_state=seed).fit(weights - base)
    assert [out["labels"][f"c{i}"] for i in range(12)] == expect.labels_.tolist()
    assert out["sizes"] == np.bincount(expect.labels_, minlength=k).tolist()
    assert out["inertia"] == pytest.approx(expect.inertia_, rel=1e-5)


def test_kmeans_on_stored_weights_matches_scikit_learn() -> None:
    weights, _, _ = random_round(3, n=10, d=30, outliers=3)
    out = run("kmeans", make_round(weights), k=3, seed=11, use_delta=False).result
    expect = KMeans(n_clusters=3, n_init=10, random_state=11).fit(weights)
    assert [out["labels"][f"c{i}"] for i in range(10)] == expect.labels_.tolist()


# --------------------------------------------------------------------------- cfl_split

# c0, c1 point along +x, c2, c3 along +y (all with norm √1.01); equal examples.
# cross-cluster cosines: c0·c2 = 0.2/1.01, c0·c3 = 0, c1·c2 = 0, c1·c3 = -0.2/1.01
# mean update = (0.5, 0.5): mean_norm = √0.5;  max_norm = √1.01
TWO_TASKS = [[1.0, 0.1], [1.0, -0.1], [0.1, 1.0], [-0.1, 1.0]]


def test_cfl_split_by_hand() -> None:
    out = run("cfl_split", make_round(TWO_TASKS)).result
    assert sorted(out["clusters"]) == [["c0", "c1"], ["c2", "c3"]]
    assert out["labels"]["c0"] == out["labels"]["c1"] != out["labels"]["c2"]
    assert out["alpha_max"] == pytest.approx(0.2 / 1.01)
    assert out["mean_norm"] == pytest.approx(np.sqrt(0.5))
    assert out["max_norm"] == pytest.approx(np.sqrt(1.01))
    assert out["split"] is False  # mean_norm 0.707 is not below eps_1 = 0.4
    relaxed = run("cfl_split", make_round(TWO_TASKS), eps_1=0.8, eps_2=1.0).result
    assert relaxed["split"] is True


def test_cfl_split_mean_norm_weights_clients_by_examples() -> None:
    # (3·(1, 0.1) + 1·(-0.1, 1)) / 4 = (0.725, 0.325)
    data = make_round([[1.0, 0.1], [-0.1, 1.0]], num_examples=[3, 1])
    assert run("cfl_split", data).result["mean_norm"] == pytest.approx(np.hypot(0.725, 0.325))


def cfl_transcription(
    dw: npt.NDArray[np.float64], examples: Sequence[int]
) -> tuple[list[int], float, float, float]:
    """Sattler et al.'s reference code, in numpy: pairwise angles of the flattened updates,
    complete linkage on -S, the weighted mean update norm of the paper and the max norm."""
    flat = dw / np.linalg.norm(dw, axis=1, keepdims=True)
    s = flat @ flat.T
    labels = AgglomerativeClustering(n_clusters=2, metric="precomputed", linkage="complete")
    lab = labels.fit(-s).labels_
    c1, c2 = np.argwhere(lab == 0).ravel(), np.argwhere(lab == 1).ravel()
    alpha_max = max(s[i, j] for i in c1 for j in c2)
    w = np.asarray(examples, dtype=np.float64) / sum(examples)
    mean_norm = float(np.linalg.norm((w[:, None] * dw).sum(0)))
    max_norm = max(float(np.linalg.norm(u)) for u in dw)
    return lab.tolist(), float(alpha_max), mean_norm, max_norm


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cfl_split_matches_a_direct_transcription(seed: int) -> None:
    rng = np.random.default_rng(seed)
    base = rng.standard_normal(60)
    directions = rng.standard_normal((2, 60))
    dw = np.repeat(directions, 5, axis=0) + 0.8 * rng.standard_normal((10, 60))
    examples = rng.integers(1, 40, 10).tolist()
    out = run("cfl_split", make_round(base + dw, base=base, num_examples=examples)).result
    # the transcription sees the float32 deltas the node holds
    held = (np.float32(base + dw) - np.float32(base)).astype(np.float64)
    labels, alpha_max, mean_norm, max_norm = cfl_transcription(held, examples)
    assert [out["labels"][f"c{i}"] for i in range(10)] == labels
    assert out["alpha_max"] == pytest.approx(alpha_max, abs=1e-5)
    assert out["mean_norm"] == pytest.approx(mean_norm, rel=1e-5)
    assert out["max_norm"] == pytest.approx(max_norm, rel=1e-5)
    assert out["split"] == (mean_norm < 0.4 and max_norm > 1.6)


# --------------------------------------------------------------------------- shared artifacts


def test_similarity_workloads_share_one_gram_matrix() -> None:
    weights, base, _ = random_round(4)
    data = make_round(weights, base=base)
    run("cosine_select", data, k=2)
    run("malicious_cosine", data)
    run("cfl_split", data)
    assert data.stats.computed["gram"] == 1 and data.stats.reused["gram"] == 2
    run("krum", data)  # distances are derived from the same Gram matrix
    run("multi_krum", data)
    assert data.stats.computed == {"gram": 1, "distances": 1}
    assert data.stats.reused["distances"] == 1


# --------------------------------------------------------------------------- through a cache node


def test_model_results_are_stored_as_weights_through_a_cache_node(store: ObjectStore) -> None:
    store.put_initial("j", small_update(99))  # the base: the node holds deltas
    for i in range(5):
        store.put_update("j", 0, f"c{i}", small_update(i, scale=1.0 + 2.0 * (i == 4)))
    store.commit_round("j", 0)
    node = CacheNode(store, budget_bytes=10**8)
    held = store.read_round("j", 0)
    weights = held.matrix.astype(np.float64)
    # integer tensors (BatchNorm's counter) are stored rounded back to their dtype
    is_int = np.concatenate([np.full(s.numel, s.dtype.startswith("I")) for s in held.specs])

    def model_of(answer: dict[str, Any]) -> npt.NDArray[np.float64]:
        model = decode_update(store.get_object(answer["result"]["model_key"]))
        return np.concatenate([np.asarray(a, np.float64).ravel() for a in model.tensors.values()])

    krum = node.handle({"op": "run", "workload": "krum", "job": "j", "round": 0})
    assert "error" not in krum
    best = int(krum["result"]["selected"][0][1:])
    assert best != 4  # the scaled-up client is not Krum's choice
    np.testing.assert_allclose(model_of(krum), weights[best], atol=1e-5)

    trimmed = node.handle(
        {"op": "run", "workload": "trimmed_mean", "job": "j", "round": 0, "params": {"beta": 0.2}}
    )
    expect = np.sort(weights, axis=0)[1:4].mean(axis=0)  # floor(0.2 · 5) = 1 cut per end
    np.testing.assert_allclose(
        model_of(trimmed), np.where(is_int, np.rint(expect), expect), atol=1e-5
    )


# a BatchNorm layer's state dict from four clients (examples 1, 1, 2, 4): every tensor is
# aggregated like the weights, the integer counter rounded to the nearest integer
BN_CLIENTS = {
    "c0": (1, [1.0, 0.0], [0.0, 4.0], [1.0, 1.0], 10),
    "c1": (1, [0.0, 1.0], [2.0, 4.0], [3.0, 1.0], 11),
    "c2": (2, [1.0, 1.0], [4.0, 0.0], [2.0, 5.0], 12),
    "c3": (4, [2.0, 2.0], [1.0, 1.0], [9.0, 1.0], 14),
}
# fedavg, weights 1/8, 1/8, 2/8, 4/8:
#   weight       (1 + 0 + 2 + 8, 0 + 1 + 2 + 8) / 8 = (11/8, 11/8)
#   running_mean (0 + 2 + 8 + 4, 4 + 4 + 0 + 4) / 8 = (14/8, 12/8)
#   running_var  (1 + 3 + 4 + 36, 1 + 1 + 10 + 4) / 8 = (44/8, 16/8)
#   counter      (10 + 11 + 24 + 56) / 8 = 101/8 = 12.625 → 13 (load_state_dict would truncate: 12)
BN_FEDAVG = {
    "bn.weight": [11 / 8, 11 / 8],
    "bn.running_mean": [14 / 8, 12 / 8],
    "bn.running_var": [44 / 8, 16 / 8],
    "bn.num_batches_tracked": 13,
}
# trimmed_mean β = 0.25: ⌊0.25·4⌋ = 1 cut per end, the middle two of each coordinate averaged
#   weight (0, 1, 1, 2) → (1 + 1)/2 = 1; (0, 1, 1, 2) → 1
#   running_mean (0, 1, 2, 4) → 1.5; (0, 1, 4, 4) → 2.5
#   running_var (1, 2, 3, 9) → 2.5; (1, 1, 1, 5) → 1
#   counter (10, 11, 12, 14) → 11.5 → 12
# β = 0 (nothing cut: the plain mean) — weight (1, 1); running_mean (7/4, 9/4);
#   running_var (15/4, 8/4); counter 47/4 = 11.75 → 12
BN_TRIMMED = {
    0.25: {
        "bn.weight": [1.0, 1.0],
        "bn.running_mean": [1.5, 2.5],
        "bn.running_var": [2.5, 1.0],
        "bn.num_batches_tracked": 12,
    },
    0.0: {
        "bn.weight": [1.0, 1.0],
        "bn.running_mean": [7 / 4, 9 / 4],
        "bn.running_var": [15 / 4, 8 / 4],
        "bn.num_batches_tracked": 12,
    },
}


def _bn_update(weight: list[float], mean: list[float], var: list[float], count: int) -> Update:
    return Update(
        {
            "bn.weight": np.array(weight, np.float32),
            "bn.running_mean": np.array(mean, np.float32),
            "bn.running_var": np.array(var, np.float32),
            "bn.num_batches_tracked": np.array(count, np.int64),
        }
    )


@pytest.mark.parametrize("with_base", [False, True], ids=["weights", "deltas"])
def test_aggregates_average_running_stats_and_round_the_counters(
    store: ObjectStore, with_base: bool
) -> None:
    if with_base:  # the node holds deltas and adds the base back: the same state dict
        store.put_initial("bn", _bn_update([0.5, -1.0], [3.0, 0.0], [1.0, 2.0], 7))
    records = []
    for client, (examples, *tensors) in BN_CLIENTS.items():
        update = _bn_update(*tensors)
        update.num_examples = examples
        store.put_update("bn", 0, client, update)
        records.append(
            RecordDict(
                {
                    "arrays": ArrayRecord({k: Array(v) for k, v in update.tensors.items()}),
                    "metrics": MetricRecord({"num-examples": examples}),
                }
            )
        )
    store.commit_round("bn", 0)
    node = CacheNode(store, budget_bytes=10**8)

    def model(workload: str, **params: Any) -> dict[str, npt.NDArray[Any]]:
        answer = node.handle(
            {"op": "run", "workload": workload, "job": "bn", "round": 0, "params": params}
        )
        assert "error" not in answer, answer
        return decode_update(store.get_object(answer["result"]["model_key"])).tensors

    flower_avg = aggregate_arrayrecords(records, "num-examples")  # every array, counters too

    def flower_trim(beta: float) -> dict[str, npt.NDArray[Any]]:
        return {
            k: trim_mean(np.stack([r["arrays"][k].numpy() for r in records]), beta)
            for k in BN_FEDAVG
        }

    cases = [(model("fedavg"), BN_FEDAVG, {k: flower_avg[k].numpy() for k in BN_FEDAVG})]
    cases += [
        (model("trimmed_mean", beta=beta), by_hand, flower_trim(beta))
        for beta, by_hand in BN_TRIMMED.items()
    ]
    for got, by_hand, flower in cases:
        assert list(got) == list(by_hand)  # a complete state dict, in state-dict order
        for name, want in by_hand.items():
            if name == "bn.num_batches_tracked":
                assert got[name].dtype == np.int64 and got[name].shape == ()
                assert int(got[name]) == want == int(np.rint(flower[name]))
            else:
                np.testing.assert_allclose(got[name], want, rtol=1e-6)
                np.testing.assert_allclose(got[name], flower[name], rtol=1e-6)


# --------------------------------------------------------------------------- validation


def test_the_schema_states_the_bounds_the_workload_enforces() -> None:
    # β ∈ [0, 1/2) (Yin et al. 2018): the served schema must not admit 0.5
    spec = get("trimmed_mean").describe()["params"]["beta"]
    assert spec["minimum"] == 0.0 and spec["exclusive_maximum"] == 0.5 and "maximum" not in spec
    data = make_round(OPPOSED)
    assert run("trimmed_mean", data, beta=math.nextafter(0.5, 0.0)).result["cut"] == 1


@pytest.mark.parametrize(
    ("name", "params", "says"),
    [
        ("malicious_cosine", {"k": 5}, "use k <= 4"),
        ("kmeans", {"k": 5}, "use k <= 4"),
        ("kmeans", {"k": 1}, "'k' must be >= 2"),
        ("krum", {"f": 1}, "at least 3 clients"),
        ("multi_krum", {"m": 9, "f": 0}, "use m <= 4"),
        ("trimmed_mean", {"beta": 0.5}, "must be < 0.5"),
        ("trimmed_mean", {"beta": 0.7}, "must be < 0.5"),
        ("trimmed_mean", {"beta": -0.1}, "must be >= 0.0"),
        ("cfl_split", {"eps": 1.0}, "its params are: eps_1, eps_2, include_buffers, use_delta"),
        ("krum", {"k": 1}, "has no param 'k'"),
        ("malicious_cosine", {"threshold": "low"}, "must be of type float"),
    ],
)
def test_bad_params_are_400s_that_say_what_to_change(
    name: str, params: dict[str, Any], says: str
) -> None:
    data = make_round(OPPOSED if name != "krum" else OPPOSED[:2])
    with pytest.raises(InvalidParamsError) as err:
        run(name, data, **params)
    assert err.value.status == 400 and says in err.value.message


@pytest.mark.parametrize(("n", "f", "max_f"), [(4, 1, 0), (6, 2, 1), (9, 4, 3), (10, 4, 3)])
def test_krum_with_n_at_most_2f_plus_2_names_the_largest_valid_f(
    n: int, f: int, max_f: int
) -> None:
    data = make_round(np.random.default_rng(n).standard_normal((n, 3)))
    for name in ("krum", "multi_krum"):
        with pytest.raises(InvalidParamsError, match=rf"f={f} .* use f <= {max_f}$"):
            run(name, data, f=f)
    run("krum", data, f=max_f)  # the largest valid f runs


def test_cfl_split_needs_two_clients() -> None:
    with pytest.raises(InvalidParamsError, match="at least 2 clients"):
        run("cfl_split", make_round([[1.0, 2.0]]))


def test_kmeans_reuses_the_gram_matrix_and_never_reads_the_rows() -> None:
    weights, base, _ = random_round(5, n=8, d=40, outliers=2)
    data = make_round(weights, base=base)
    run("cosine_select", data)
    data.matrix = np.full_like(data.matrix, np.nan)  # a fit on the rows would now fail
    out = run("kmeans", data, k=2).result
    expect = KMeans(n_clusters=2, n_init=10, random_state=0).fit(weights - base)
    assert [out["labels"][f"c{i}"] for i in range(8)] == expect.labels_.tolist()
    assert data.stats.computed["gram"] == 1 and data.stats.reused["gram"] >= 1
