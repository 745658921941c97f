"""A real BatchNorm job: the similarity workloads read the parameters, not the BN buffers.

``digits_bn_cnn`` (:mod:`flstore_core.models`: conv → BatchNorm2d → ReLU twice, then a linear
layer) is trained with FedAvg for two rounds on scikit-learn digits by 8 clients holding
Dirichlet(α = 1) non-IID shares (:mod:`evaluation.digits_job`'s split and local SGD: one epoch,
batches of 32, so about 6 local steps). ``client-07`` sign-flips its update on the trainable
parameters (``w = base − (w_trained − base)``, Blanchard et al. 2017's "omniscient"-free
variant; its BatchNorm statistics stay what its training left). The job is declared with
``create_job(..., model=..., validation=...)`` so the parameter split is recorded in
``job.json`` and FLTrust has its root dataset; the initial and global models are stored, so
every round has a base.

Checked against references written here, in float64 over the tensors named by
``named_parameters()`` of the test's own state dicts: cosine to the mean (malicious_cosine,
cosine_select), Krum scores (Blanchard et al. 2017), CFL's complete-linkage bipartition
(scipy's ``linkage``, as Sattler et al.'s code does). Then the same rounds stored again with
every BatchNorm buffer replaced by wildly different values (counters ×1000·(k+1), running
variances ×100·(k+1), running means +10·(k+1) for client k) give the same scores and
selections, while ``include_buffers=True`` does not.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import squareform

from evaluation.digits_job import client_ids, deal_shares, load_split, train_local
from flstore_core import models
from flstore_core.cache.results import run_round_workload
from flstore_core.cache.round_data import ArtifactStats, RoundData
from flstore_core.cache.round_loading import load_round
from flstore_core.data.codec import Update, slices_of
from flstore_core.data.rows import flatten
from flstore_core.sdk.jobs import create_job
from flstore_core.storage.object_store import ObjectStore
from flstore_core.workloads import get

MODEL = "digits_bn_cnn"
CLIENTS = 8
ROUNDS = 2
MALICIOUS = "client-07"
SEED = 0
State = dict[str, npt.NDArray[Any]]
F64 = npt.NDArray[np.float64]


# ---------------------------------------------------------------------- the registry model


def test_digits_bn_cnn_state_dict_has_batchnorm_parameters_and_buffers() -> None:
    model = models.build(MODEL, seed=0)
    shapes = {k: (str(v.dtype), tuple(v.shape)) for k, v in model.state_dict().items()}
    f32, i64 = "torch.float32", "torch.int64"
    assert shapes == {
        "conv1.weight": (f32, (8, 1, 3, 3)),
        "bn1.weight": (f32, (8,)),
        "bn1.bias": (f32, (8,)),
        "bn1.running_mean": (f32, (8,)),
        "bn1.running_var": (f32, (8,)),
        "bn1.num_batches_tracked": (i64, ()),
        "conv2.weight": (f32, (16, 8, 3, 3)),
        "bn2.weight": (f32, (16,)),
        "bn2.bias": (f32, (16,)),
        "bn2.running_mean": (f32, (16,)),
        "bn2.running_var": (f32, (16,)),
        "bn2.num_batches_tracked": (i64, ()),
        "fc.weight": (f32, (10, 256)),
        "fc.bias": (f32, (10,)),
    }
    assert list(shapes) == list(models.state_names(MODEL))  # the job's canonical order
    assert models.INPUT_SHAPES[MODEL] == (1, 8, 8) and models.NUM_CLASSES[MODEL] == 10
    x = np.zeros((3, *models.INPUT_SHAPES[MODEL]), dtype=np.float32)
    assert models.predict(model, x).shape == (3,)


def test_create_job_records_the_models_parameters_not_its_buffers(store: ObjectStore) -> None:
    create_job(store, "bn-spec", model=MODEL)
    recorded = store.get_job_spec("bn-spec").parameters
    assert recorded is not None
    assert list(recorded) == [
        "conv1.weight",
        "bn1.weight",
        "bn1.bias",
        "conv2.weight",
        "bn2.weight",
        "bn2.bias",
        "fc.weight",
        "fc.bias",
    ]


# ---------------------------------------------------------------------- the job


@dataclass
class TrainedJob:
    """What the clients and the server computed, kept in memory for the references."""

    initial: State
    bases: list[State]  # bases[r]: the model round r started from
    states: list[dict[str, State]]  # states[r][client]: what the client reported
    num_examples: dict[str, int]
    validation: tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]
    globals_: list[State]


def fedavg(states: list[State], weights: list[int]) -> State:
    """Example-weighted mean of whole state dicts; integer buffers rounded (PyTorch dtypes kept)."""
    w = np.asarray(weights, dtype=np.float64) / sum(weights)
    out: State = {}
    for name, ref in states[0].items():
        mean = sum(wi * s[name].astype(np.float64) for wi, s in zip(w, states, strict=True))
        out[name] = (np.rint(mean) if ref.dtype.kind in "iu" else mean).astype(ref.dtype)
    return out


@pytest.fixture(scope="module")
def trained() -> TrainedJob:
    """Two FedAvg rounds of ``digits_bn_cnn``; ``client-07`` sign-flips its parameters."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x_tr, y_tr, x_val, y_val = load_split(SEED)
        ids = client_ids(CLIENTS)
        shares = deal_shares(y_tr, ids, set(), 1.0, np.random.default_rng(SEED))
        model = models.build(MODEL, seed=SEED)
        specs = models.state_specs(model)
        parameters = {name for name, _ in model.named_parameters()}
        initial = models.state_arrays(model)
        base = initial
        job = TrainedJob(
            initial,
            [],
            [],
            {c: len(s) for c, s in zip(ids, shares, strict=True)},
            (x_val, y_val),
            [],
        )
        for r in range(ROUNDS):
            job.bases.append(base)
            reported: dict[str, State] = {}
            for k, (client, share) in enumerate(zip(ids, shares, strict=True)):
                local = models.load_vector(models.build(MODEL), flatten(base), specs)
                train_local(
                    local,
                    x_tr[share],
                    y_tr[share],
                    epochs=1,
                    lr=0.05,
                    momentum=0.9,
                    batch_size=32,
                    seed=SEED * 1_000_003 + r * 1009 + k,
                )
                state = models.state_arrays(local)
                if client == MALICIOUS:  # sign flip: base − (w − base) on the parameters
                    for name in parameters:
                        state[name] = (2 * base[name] - state[name]).astype(np.float32)
                reported[client] = state
            job.states.append(reported)
            base = fedavg([reported[c] for c in ids], [job.num_examples[c] for c in ids])
            job.globals_.append(base)
        return job
    finally:
        torch.set_num_threads(threads)


def wild_buffers(state: State, k: int) -> State:
    """The same state with every BatchNorm buffer replaced by far-off, client-dependent values."""
    out = dict(state)
    for name, value in state.items():
        if name.endswith("num_batches_tracked"):
            out[name] = (value * 1000 * (k + 1)).astype(value.dtype)
        elif name.endswith("running_var"):
            out[name] = (value * 100 * (k + 1)).astype(value.dtype)
        elif name.endswith("running_mean"):
            out[name] = (value + 10 * (k + 1)).astype(value.dtype)
    return out


def write_job(
    store: ObjectStore,
    job: str,
    trained: TrainedJob,
    transform: Callable[[State, int], State] = lambda s, _k: s,
) -> None:
    """Store the job through the object store: spec and validation set, initial model, every
    round's updates (after ``transform``) and manifest, every round's global model."""
    create_job(store, job, model=MODEL, validation=trained.validation)
    store.put_initial(job, Update(dict(trained.initial)))
    for r, reported in enumerate(trained.states):
        entries = [
            store.put_update(
                job, r, c, Update(transform(state, k), num_examples=trained.num_examples[c])
            )
            for k, (c, state) in enumerate(sorted(reported.items()))
        ]
        store.commit_round(job, r, entries)
        store.put_global(job, r, Update(dict(trained.globals_[r])))


def run(store: ObjectStore, data: RoundData, name: str, **params: Any) -> dict[str, Any]:
    """A workload as a cache node runs it: validated params, the shared round code path."""
    workload = get(name)
    return run_round_workload(store, workload, data, workload.validate(params))


@pytest.fixture
def rounds(store: ObjectStore, trained: TrainedJob) -> Iterator[dict[int, RoundData]]:
    write_job(store, "bn", trained)
    yield {r: load_round(store, "bn", r, ArtifactStats()) for r in range(ROUNDS)}


# ---------------------------------------------------------------------- float64 references


def parameter_deltas(trained: TrainedJob, r: int) -> tuple[list[str], F64]:
    """``Δ_i = w_i − base`` over the model's ``named_parameters()``, float64, clients sorted."""
    names = [n for n, _ in models.build(MODEL).named_parameters()]
    clients = sorted(trained.states[r])
    base = trained.bases[r]
    rows = [
        np.concatenate(
            [
                (trained.states[r][c][n].astype(np.float64) - base[n].astype(np.float64)).ravel()
                for n in names
            ]
        )
        for c in clients
    ]
    return clients, np.stack(rows)


def reference_cosine_to_mean(d: F64) -> F64:
    mean = d.mean(axis=0)
    return (d @ mean) / (np.linalg.norm(d, axis=1) * np.linalg.norm(mean))  # type: ignore[no-any-return]


def reference_krum_scores(d: F64, f: int) -> F64:
    n = len(d)
    sq = np.array([[float(np.sum((d[i] - d[j]) ** 2)) for j in range(n)] for i in range(n)])
    # s(i) = Σ of the n − f − 2 smallest ‖x_i − x_j‖², j ≠ i
    return np.array([np.sort(np.delete(sq[i], i))[: n - f - 2].sum() for i in range(n)])


def reference_cfl_clusters(clients: list[str], d: F64) -> list[list[str]]:
    unit = d / np.linalg.norm(d, axis=1, keepdims=True)
    dissimilarity = np.clip(1.0 - unit @ unit.T, 0.0, None)
    np.fill_diagonal(dissimilarity, 0.0)
    tree = linkage(squareform(dissimilarity, checks=False), method="complete")
    labels = fcluster(tree, t=2, criterion="maxclust")
    return sorted(
        [[c for c, lab in zip(clients, labels, strict=True) if lab == side] for side in (1, 2)]
    )


# ---------------------------------------------------------------------- isolation


@pytest.mark.parametrize("round_", range(ROUNDS))
def test_the_sign_flipper_is_isolated_by_every_similarity_detector(
    store: ObjectStore, trained: TrainedJob, rounds: dict[int, RoundData], round_: int
) -> None:
    data = rounds[round_]
    assert data.is_delta and data.columns.source == "model"
    clients, d = parameter_deltas(trained, round_)
    assert data.clients == clients

    mc = run(store, data, "malicious_cosine", k=1)
    assert mc["flagged"] == [MALICIOUS]
    cos = reference_cosine_to_mean(d)
    assert [mc["scores"][c] for c in clients] == pytest.approx(cos, abs=1e-6)
    assert mc["scores"][MALICIOUS] < 0 < min(s for c, s in mc["scores"].items() if c != MALICIOUS)

    krum = run(store, data, "krum", f=1)
    assert max(krum["scores"], key=krum["scores"].get) == MALICIOUS
    assert MALICIOUS not in krum["selected"]
    expected = reference_krum_scores(d, 1)
    assert [krum["scores"][c] for c in clients] == pytest.approx(expected, rel=1e-5)

    cfl = run(store, data, "cfl_split")
    assert [MALICIOUS] in cfl["clusters"]
    assert sorted(cfl["clusters"]) == reference_cfl_clusters(clients, d)

    ft = run(store, data, "fltrust")
    assert ft["server_update"] == "root_dataset"
    assert ft["flagged"] == [MALICIOUS] and ft["scores"][MALICIOUS] == 0.0
    assert "model_key" in ft  # the aggregate is a complete state dict, stored


# ---------------------------------------------------------------------- buffers move nothing


def scores_of(store: ObjectStore, data: RoundData, **flags: Any) -> dict[str, Any]:
    """Everything the similarity detectors answer that must not depend on BN buffers."""
    out: dict[str, Any] = {}
    cs = run(store, data, "cosine_select", k=3, **flags)
    out["cosine_select"] = (cs["selected"], cs["scores"])
    mc = run(store, data, "malicious_cosine", k=1, **flags)
    out["malicious_cosine"] = (mc["flagged"], mc["scores"])
    kr = run(store, data, "krum", f=1, **flags)
    out["krum"] = (kr["selected"], kr["scores"])
    out["kmeans"] = run(store, data, "kmeans", k=2, **flags)["labels"]
    cfl = run(store, data, "cfl_split", **flags)
    out["cfl_split"] = (
        sorted(cfl["clusters"]),
        [cfl["alpha_max"], cfl["mean_norm"], cfl["max_norm"]],
    )
    ft = run(store, data, "fltrust", **flags)
    out["fltrust"] = (ft["flagged"], ft["scores"])
    return out


def assert_same(a: dict[str, Any], b: dict[str, Any]) -> None:
    for name in ("cosine_select", "malicious_cosine", "krum", "fltrust"):
        (sel_a, sc_a), (sel_b, sc_b) = a[name], b[name]
        assert sel_a == sel_b, name
        assert sc_b == pytest.approx(sc_a, rel=1e-6, abs=1e-6), name
    assert a["kmeans"] == b["kmeans"]
    assert a["cfl_split"][0] == b["cfl_split"][0]
    assert b["cfl_split"][1] == pytest.approx(a["cfl_split"][1], rel=1e-6, abs=1e-6)


def test_batchnorm_counters_and_running_statistics_do_not_move_the_scores(
    store: ObjectStore, trained: TrainedJob, rounds: dict[int, RoundData]
) -> None:
    write_job(store, "bn-wild", trained, wild_buffers)
    parameters = set(store.get_job_spec("bn").parameters or ())
    for r, plain in rounds.items():
        wild = load_round(store, "bn-wild", r, ArtifactStats())
        # the stored rows differ in every buffer and in nothing else
        for spec, (a, b) in zip(plain.specs, slices_of(plain.specs), strict=True):
            same = np.array_equal(wild.matrix[:, a:b], plain.matrix[:, a:b])
            assert same == (spec.name in parameters), spec.name
        assert_same(scores_of(store, plain), scores_of(store, wild))


def counters_only(state: State, k: int) -> State:
    """The same state with only the integer ``num_batches_tracked`` counters far off."""
    return {
        n: (v * 1000 * (k + 1)).astype(v.dtype) if n.endswith("num_batches_tracked") else v
        for n, v in state.items()
    }


def test_include_buffers_reads_the_running_statistics_but_never_the_counters(
    store: ObjectStore, trained: TrainedJob, rounds: dict[int, RoundData]
) -> None:
    write_job(store, "bn-wild", trained, wild_buffers)
    write_job(store, "bn-counters", trained, counters_only)
    for r, plain in rounds.items():
        wild = load_round(store, "bn-wild", r, ArtifactStats())
        default = run(store, wild, "cosine_select")["scores"]
        with_buffers = run(store, wild, "cosine_select", include_buffers=True)["scores"]
        assert max(abs(with_buffers[c] - default[c]) for c in default) > 0.1
        plain_buffers = run(store, plain, "cosine_select", include_buffers=True)["scores"]
        assert max(abs(with_buffers[c] - plain_buffers[c]) for c in default) > 0.1
        counters = load_round(store, "bn-counters", r, ArtifactStats())
        assert run(store, counters, "cosine_select", include_buffers=True)["scores"] == (
            pytest.approx(plain_buffers, abs=1e-6)
        )
