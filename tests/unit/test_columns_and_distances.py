"""Which tensors similarity workloads read, and distances that keep their digits.

References are written here in float64 numpy (and scikit-learn's KMeans on the float64 rows),
never the workloads' own helpers.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from sklearn.cluster import KMeans

from flstore_core.cache.round_data import JobContext, RoundData
from flstore_core.data.codec import TensorSpec
from flstore_core.data.columns import split_columns
from flstore_core.data.manifest import JobSpec
from flstore_core.workloads import WorkloadResult, get

F64 = npt.NDArray[np.float64]

# a digits-like layer, a BatchNorm layer (weight, bias, running stats, counter), a head
SPECS = (
    TensorSpec("conv.weight", "F32", (6, 4)),
    TensorSpec("bn.weight", "F32", (6,)),
    TensorSpec("bn.bias", "F32", (6,)),
    TensorSpec("bn.running_mean", "F32", (6,)),
    TensorSpec("bn.running_var", "F32", (6,)),
    TensorSpec("bn.num_batches_tracked", "I64", ()),
    TensorSpec("fc.weight", "F32", (3, 6)),
)
PARAMS = ("conv.weight", "bn.weight", "bn.bias", "fc.weight")


def _mask(names: tuple[str, ...]) -> npt.NDArray[np.bool_]:
    return np.concatenate([np.full(s.numel, s.name in names) for s in SPECS])


def _round(
    rows: npt.ArrayLike, *, base: npt.ArrayLike | None = None, parameters: Any = None
) -> RoundData:
    x = np.array(rows, dtype=np.float32)
    n = x.shape[0]
    spec = JobSpec("j", parameters=parameters)
    return RoundData(
        "j",
        0,
        [f"c{i}" for i in range(n)],
        x,
        SPECS,
        np.full(n, 10, dtype=np.int64),
        [{} for _ in range(n)],
        base=None if base is None else np.array(base, dtype=np.float32),
        context=JobContext(spec, lambda: (np.zeros((0,)), np.zeros(0))),  # type: ignore[arg-type]
    )


def _run(name: str, data: RoundData, **params: Any) -> WorkloadResult:
    w = get(name)
    result: WorkloadResult = w.run(data, w.validate(params))
    return result


def _bn_round(seed: int = 0, n: int = 6) -> tuple[F64, F64]:
    """Rows (n, d) whose parameters are base + small updates, one client flipped; running
    stats and counters large and client-dependent."""
    rng = np.random.default_rng(seed)
    d = sum(s.numel for s in SPECS)
    base = rng.standard_normal(d)
    direction = rng.standard_normal(d)
    rows = base + 0.1 * direction + 0.02 * rng.standard_normal((n, d))
    rows[n - 1] = base - 0.1 * direction + 0.02 * rng.standard_normal(d)  # the flipper
    stats = ~_mask(PARAMS)
    rows[:, stats] = 50.0 + 10.0 * rng.random((n, int(stats.sum())))
    counter = np.concatenate([np.full(s.numel, s.dtype == "I64") for s in SPECS])
    rows[:, counter] = 100.0 + np.arange(n)[:, None]
    base[stats] = 40.0
    base[counter] = 90.0
    return rows, base


def _cos_to_mean(x: F64) -> F64:
    m = x.mean(axis=0)
    out: F64 = x @ m / (np.linalg.norm(x, axis=1) * np.linalg.norm(m))
    return out


def _krum_ref(x: F64, f: int) -> F64:
    n = x.shape[0]
    d2 = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    return np.array([np.sort(np.delete(d2[i], i))[: n - f - 2].sum() for i in range(n)])


# --------------------------------------------------------------------------- the split rule


def test_the_name_and_dtype_rule_without_a_recorded_model() -> None:
    split = split_columns(SPECS)
    assert split.source == "names"
    assert [SPECS[i].name for i in split.parameters] == list(PARAMS)
    assert [SPECS[i].name for i in split.buffers] == ["bn.running_mean", "bn.running_var"]
    assert split.parameter_runs == ((0, 36), (49, 67))  # conv+bn params merged; the counter is 1


def test_a_recorded_parameter_list_decides_and_integers_are_never_read() -> None:
    split = split_columns(SPECS, ("conv.weight", "fc.weight"))
    assert split.source == "model"
    assert [SPECS[i].name for i in split.parameters] == ["conv.weight", "fc.weight"]
    # bn.weight/bias not recorded as parameters: float buffers; the counter: never
    assert "bn.num_batches_tracked" not in [SPECS[i].name for i in split.tensors(True)]
    # a list naming none of the round's tensors falls back to the rule
    assert split_columns(SPECS, ("other.weight",)).source == "names"


def test_job_spec_round_trips_the_recorded_split_and_old_files_still_read() -> None:
    spec = JobSpec("j", model="digits_cnn", parameters=PARAMS)
    assert JobSpec.from_json(spec.to_json()) == spec
    old = b'{"format": "flstore-job/1", "job": "j", "model": "digits_cnn", "precision": "float32"}'
    assert JobSpec.from_json(old).parameters is None


def test_job_create_records_the_models_named_parameters(store: Any) -> None:
    torch = pytest.importorskip("torch")
    from flstore_core import models
    from flstore_core.sdk.jobs import create_job

    create_job(store, "bnjob", model="resnet18_cifar")
    spec = store.get_job_spec("bnjob")
    model = models.build("resnet18_cifar")
    assert spec.parameters == tuple(n for n, _ in model.named_parameters())
    assert not any(n.endswith("num_batches_tracked") for n in spec.parameters)
    assert isinstance(model, torch.nn.Module)


# --------------------------------------------------------------------------- counters and stats


@pytest.mark.parametrize("parameters", [None, PARAMS])
@pytest.mark.parametrize("with_base", [True, False])
def test_counters_and_running_stats_do_not_move_the_scores(
    parameters: Any, with_base: bool
) -> None:
    rows, base = _bn_round()
    p = _mask(PARAMS)
    data = _round(rows, base=base if with_base else None, parameters=parameters)
    x = rows - base if with_base else rows
    cos = _cos_to_mean(x[:, p])
    out = _run("cosine_select", data, k=2).result
    np.testing.assert_allclose([out["scores"][c] for c in data.clients], cos, rtol=1e-5)
    flagged = _run("malicious_cosine", data, k=1).result["flagged"]
    if with_base:
        assert flagged == ["c5"]
    krum_ref = _krum_ref(rows[:, p], f=1)
    got = _run("krum", data, f=1).result["scores"]
    np.testing.assert_allclose([got[c] for c in data.clients], krum_ref, rtol=1e-4)
    # include_buffers: running stats join, the integer counter still never does
    with_stats = p | np.concatenate([np.full(s.numel, "running" in s.name) for s in SPECS])
    cos_all = _cos_to_mean(x[:, with_stats])
    out = _run("cosine_select", data, k=2, include_buffers=True).result
    np.testing.assert_allclose([out["scores"][c] for c in data.clients], cos_all, rtol=1e-5)
    assert not np.allclose(cos_all, cos, rtol=1e-3)
    got = _run("krum", data, f=1, include_buffers=True).result["scores"]
    np.testing.assert_allclose(
        [got[c] for c in data.clients], _krum_ref(rows[:, with_stats], 1), rtol=1e-4
    )


def test_cfl_personalize_and_fltrust_read_the_parameters_only() -> None:
    rows, base = _bn_round(1)
    p = _mask(PARAMS)
    data = _round(rows, base=base)
    x = (rows - base)[:, p]
    norms = np.linalg.norm(x, axis=1)
    out = _run("cfl_split", data).result
    assert out["max_norm"] == pytest.approx(norms.max(), rel=1e-5)
    assert out["labels"]["c5"] != out["labels"]["c0"]
    alpha = x @ x.T / np.outer(norms, norms)
    trust = _run("fltrust", data, server_client="c0").result["scores"]
    for i in range(1, 6):
        assert trust[f"c{i}"] == pytest.approx(max(alpha[i, 0], 0.0), abs=1e-6)
    assert trust["c5"] == 0.0


def test_fltrust_returns_a_complete_model_with_buffers_averaged_by_trust() -> None:
    rows, base = _bn_round(2)
    data = _round(rows, base=base)
    res = _run("fltrust", data, server_client="c0")
    model = res.model_vector()
    assert model is not None
    stats = ~_mask(PARAMS)
    share = np.array([res.result["weights"][f"c{i}"] for i in range(1, 6)])
    expect = base[stats] + share @ (rows[1:, stats] - base[stats])
    np.testing.assert_allclose(model[stats], expect, rtol=1e-5)


# --------------------------------------------------------------------------- large offsets


def _offset_round(seed: int, n: int = 10, d: int = 4000) -> tuple[F64, F64]:
    """Weights with ‖w‖² ≈ 1000 and client differences ≈ 1e-4; client 0 is the odd one."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(d) * np.sqrt(1000.0 / d)
    rows = w + 1e-4 * rng.standard_normal((n, d))
    rows[0] += 3e-4 * rng.standard_normal(d)
    return rows.astype(np.float32).astype(np.float64), w.astype(np.float32).astype(np.float64)


def _one_tensor_round(rows: F64, base: F64 | None) -> RoundData:
    n, d = rows.shape
    return RoundData(
        "j",
        0,
        [f"c{i}" for i in range(n)],
        rows.astype(np.float32),
        (TensorSpec("w", "F32", (d,)),),
        np.full(n, 10, dtype=np.int64),
        [{} for _ in range(n)],
        base=None if base is None else base.astype(np.float32),
    )


@pytest.mark.parametrize("with_base", [False, True])
@pytest.mark.parametrize("seed", range(5))
def test_large_offsets_keep_distances_krum_and_kmeans_right(seed: int, with_base: bool) -> None:
    rows, w = _offset_round(seed)
    data = _one_tensor_round(rows, w if with_base else None)
    d2 = ((rows[:, None, :] - rows[None, :, :]) ** 2).sum(-1)
    off = ~np.eye(len(rows), dtype=bool)
    np.testing.assert_allclose(data.distances()[off], d2[off], rtol=1e-4)
    ref = _krum_ref(rows, 2)
    res = _run("krum", data, f=2).result
    np.testing.assert_allclose([res["scores"][f"c{i}"] for i in range(10)], ref, rtol=1e-4)
    assert res["selected"] == [f"c{int(np.argmin(ref))}"]
    km = KMeans(n_clusters=3, n_init=10, random_state=0).fit(rows)
    out = _run("kmeans", data, k=3).result
    assert [out["labels"][f"c{i}"] for i in range(10)] == km.labels_.tolist()
    assert out["inertia"] == pytest.approx(km.inertia_, rel=1e-4)
    # cosines still come from the uncentred Gram (of deltas, or of weights without a base)
    x = rows - w if with_base else rows
    got = _run("cosine_select", data, k=1).result["scores"]
    np.testing.assert_allclose([got[f"c{i}"] for i in range(10)], _cos_to_mean(x), rtol=1e-5)


@pytest.mark.parametrize("outlier", ["sign-flipped", "scaled x10"])
@pytest.mark.parametrize("with_base", [False, True])
@pytest.mark.parametrize("seed", range(3))
def test_large_offsets_with_an_outlier_keep_distances_and_cosines_right(
    seed: int, with_base: bool, outlier: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An offset-dominated round (‖w‖² ≈ 1000, differences ≈ 1e-3) with one client far off:
    the centred blocks must not take a centre the outlier drags away from the others (the
    rows' mean did: distances off by 1e-4 with a sign flip, 5e-3 with a scaled client)."""
    import flstore_core.cache.gram as gram

    # several column blocks, so the first block's choice carries to the others
    monkeypatch.setattr(gram, "BLOCK_ELEMENTS", 1 << 14)
    monkeypatch.setattr(gram, "MIN_BLOCK_COLUMNS", 256)
    rng = np.random.default_rng(seed)
    n, d = 10, 20_000
    w = rng.standard_normal(d) * np.sqrt(1000.0 / d)
    x = w + 1e-3 * rng.standard_normal((n, d))
    if outlier == "sign-flipped":
        x[0] = -x[0]
    else:
        x[3] *= 10.0
    base = 0.5 * w if with_base else None  # deltas x − b still dominated by w / 2
    data = _one_tensor_round(x, base)
    # float64 references on the float32 values stored (rows as stored: x − b with a base)
    x32 = x.astype(np.float32)
    stored = x32.astype(np.float64)
    if base is not None:
        stored = (x32 - base.astype(np.float32)).astype(np.float64)
    d2 = ((stored[:, None, :] - stored[None, :, :]) ** 2).sum(-1)
    off = ~np.eye(n, dtype=bool)
    np.testing.assert_allclose(data.distances()[off], d2[off], rtol=1e-5)
    got = data.gram(True)
    expect = stored @ stored.T
    norms = np.sqrt(np.diag(expect))
    cos = got / np.sqrt(np.outer(np.diag(got), np.diag(got)))
    np.testing.assert_allclose(cos, expect / np.outer(norms, norms), atol=1e-6)


def test_kmeans_with_one_client_says_it_needs_two() -> None:
    from flstore_core.errors import InvalidParamsError

    with pytest.raises(InvalidParamsError, match="needs at least 2 clients"):
        _run("kmeans", _one_tensor_round(np.ones((1, 3)), None), k=2)
