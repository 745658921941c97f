"""Property tests: every model-less round workload against a float64 reference written here.

Random rounds (hypothesis) of a small BatchNorm-shaped model — float
trainable parameters, running statistics, an integer ``num_batches_tracked`` counter — are
written through the object store (an in-memory blob store) with each client's tensors in a
random order, committed, and read back with :func:`load_round`, as a cache node does. The rounds
cover 1–3 clients, identical, parallel, opposite and zero-norm updates, grid values (exact
ties), rounds with and without a stored base, and common offsets of 1e3 that dwarf the client
differences. Every reference below works on float64 copies of the float32 values written,
matched by tensor name, and never calls the workloads' helpers:

* the columns read are named here (``PARAMS``, ``BUFFERS``), the rule of
  :mod:`flstore_core.data.columns` restated;
* rankings break ties by client id, with the workloads' documented float32 tie rule restated
  (scores within 1e-6 of the largest |score| of their neighbour are tied): identical and
  parallel updates score the same mathematically but a few ulps apart in float32; an example
  whose reference has a gap within a factor 4 of that threshold is not asserted on (counted);
* tolerances: selections, labels and flags exact; numbers 1e-6 relative to the magnitude of
  their inputs, cosines to the mean 1e-5 (``COSINE_TOL``); squared distances (and Krum scores)
  1e-4 relative plus 1e-6 of the round's largest squared distance from the mean (a float32
  GEMM per column block, on the raw rows or, where a common offset dominates, on rows centred
  on the row nearest their mean).

The largest deviation each workload showed is kept in ``LOG`` (a ``DeviationLog``) and printed
at the end of the module (``pytest -s``). The model-based workloads (accuracy_select,
contribution_loo/shapley, feddebug, personalize by accuracy) are property-tested in
``test_model_workload_properties.py``; fltrust's trust formula and norm scaling are covered here
with ``server_client``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from unittest import mock

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import squareform
from sklearn.cluster import KMeans

from flstore_core.cache.round_data import ArtifactStats, RoundData
from flstore_core.cache.round_loading import load_round
from flstore_core.data.codec import Update
from flstore_core.data.manifest import JobSpec
from flstore_core.errors import InvalidParamsError
from flstore_core.storage.memory import MemoryBlobStore
from flstore_core.storage.object_store import ObjectStore
from flstore_core.workloads import WorkloadResult, get
from tests.deviation_log import DeviationLog

F64 = npt.NDArray[np.float64]

# the model, in its state-dict order; PARAMS are read by similarity workloads, BUFFERS only with
# include_buffers, the integer counter never
SHAPES: dict[str, tuple[int, ...]] = {
    "conv.weight": (3, 2),
    "bn.weight": (3,),
    "bn.bias": (3,),
    "bn.running_mean": (3,),
    "bn.running_var": (3,),
    "bn.num_batches_tracked": (),
    "fc.weight": (2, 3),
}
PARAMS = ("conv.weight", "bn.weight", "bn.bias", "fc.weight")
BUFFERS = ("bn.running_mean", "bn.running_var")
COUNTER = "bn.num_batches_tracked"
FLOATS = PARAMS + BUFFERS

# the workloads' documented tie rule (cosine_select.FLOAT32_TIE): scores within 1e-6 of the
# largest |score| of their neighbour are tied and ordered by client id; reference gaps within a
# factor UNDECIDED of that threshold could fall either side after float32 rounding
TIE = 1e-6
UNDECIDED = 4.0

LOG = DeviationLog("the float64 reference", "selections/labels")

# cosines to the mean come from the float32 Gram: a round hypothesis found on CI (7 Dec 2026:
# five clients, two of them near-opposite) deviated 1.6e-6 from the float64 reference, past the
# 1e-6 the other numbers keep; its cause (the Gram's cancellation under a common offset, or
# another) is not yet pinned down, so the bound is 1e-5 rather than a loose one everywhere
COSINE_TOL = 1e-5

PROPS = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


@pytest.fixture(scope="module", autouse=True)
def report() -> Iterator[None]:
    yield
    print("\n" + "\n".join(LOG.lines()))


# --------------------------------------------------------------------------- random rounds


@dataclass
class Round:
    """What the test wrote (float64 copies of the float32 values) and what a node loaded."""

    clients: list[str]
    weights: dict[str, dict[str, F64]]  # client -> tensor name -> values
    base: dict[str, F64] | None
    num_examples: dict[str, int]
    data: RoundData

    @property
    def n(self) -> int:
        return len(self.clients)

    def stack(self, names: tuple[str, ...], delta: bool) -> F64:
        """(n, d) rows over ``names`` (in this order), deltas when asked and a base exists."""
        rows = []
        for c in self.clients:
            parts = []
            for name in names:
                v = self.weights[c][name].ravel()
                if delta and self.base is not None:
                    v = v - self.base[name].ravel()
                parts.append(v)
            rows.append(np.concatenate(parts))
        return np.array(rows)

    def columns(self, include_buffers: bool) -> tuple[str, ...]:
        return PARAMS + BUFFERS if include_buffers else PARAMS


@st.composite
def rounds(draw: st.DrawFn, min_clients: int = 1, max_clients: int = 7) -> Round:
    n = draw(st.integers(min_clients, max_clients))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    grid = draw(st.booleans())  # values on a 0.25 grid: many exact ties
    with_base = draw(st.booleans())
    offset = draw(st.sampled_from([0.0, 1.0, 1e3]))
    scale = draw(st.sampled_from([1e-2, 1.0]))

    def values(shape: tuple[int, ...]) -> F64:
        if grid:
            return rng.integers(-4, 5, size=shape) * 0.25 * scale
        return rng.standard_normal(shape) * scale

    base = {name: offset * rng.standard_normal(SHAPES[name]) for name in FLOATS}
    deltas: list[dict[str, F64]] = []
    for i in range(n):
        kind = draw(st.sampled_from(["fresh"] * 4 + ["same", "parallel", "opposite", "zero"]))
        if kind == "fresh" or (i == 0 and kind != "zero"):
            deltas.append({name: values(SHAPES[name]) for name in FLOATS})
        elif kind == "zero":
            deltas.append({name: np.zeros(SHAPES[name]) for name in FLOATS})
        else:
            j = draw(st.integers(0, i - 1))
            factor = {"same": 1.0, "parallel": 2.0, "opposite": -1.0}[kind]
            deltas.append({name: factor * v for name, v in deltas[j].items()})
    clients = [f"c{i}" for i in range(n)]
    num_examples = {c: draw(st.integers(0, 50)) if draw(st.booleans()) else 10 for c in clients}
    weights: dict[str, dict[str, F64]] = {}
    for c, d in zip(clients, deltas, strict=True):
        # float32 as stored; a round without a stored base still has the common offset
        w = {name: (base[name] + d[name]).astype(np.float32).astype(np.float64) for name in FLOATS}
        w[COUNTER] = np.array(float(rng.integers(0, 1000)))
        weights[c] = w
    base32 = {name: v.astype(np.float32).astype(np.float64) for name, v in base.items()}
    base32[COUNTER] = np.array(float(rng.integers(0, 1000)))

    store = ObjectStore("props", blobs=MemoryBlobStore())
    store.put_job_spec(JobSpec("j"))
    names = list(SHAPES)

    def update(tensors: dict[str, F64], examples: int) -> Update:
        order = draw(st.permutations(names))  # each file stores its tensors in its own order
        out: dict[str, Any] = {}
        for name in order:
            dtype = np.int64 if name == COUNTER else np.float32
            out[name] = np.asarray(tensors[name]).astype(dtype).reshape(SHAPES[name])
        return Update(out, num_examples=examples)

    if with_base:
        store.put_initial("j", update(base32, 0))
    written = draw(st.permutations(clients))
    entries = [store.put_update("j", 0, c, update(weights[c], num_examples[c])) for c in written]
    store.commit_round("j", 0, entries)
    data = load_round(store, "j", 0, ArtifactStats())
    assert data.clients == sorted(clients)
    return Round(
        sorted(clients),
        weights,
        base32 if with_base else None,
        num_examples,
        data,
    )


def run(name: str, data: RoundData, **params: Any) -> WorkloadResult:
    w = get(name)
    result: WorkloadResult = w.run(data, w.validate(params))
    return result


def tensors_of(r: Round, vector: npt.NDArray[Any]) -> dict[str, F64]:
    """A model vector of the round split by the specs the node loaded (names, shapes)."""
    out: dict[str, F64] = {}
    pos = 0
    for spec in r.data.specs:
        size = math.prod(spec.shape)
        out[spec.name] = np.asarray(vector[pos : pos + size], dtype=np.float64).reshape(spec.shape)
        pos += size
    assert pos == len(vector)
    return out


def model_deviation(r: Round, vector: npt.NDArray[Any] | None, expect: dict[str, F64]) -> float:
    """Largest deviation of a returned model from the expected tensors: float tensors relative
    to the largest magnitude written, the integer counter within rounding (≤ 0.5)."""
    assert vector is not None
    got = tensors_of(r, vector)
    assert set(got) == set(expect)
    mag = max(
        [float(np.abs(w[n]).max()) for w in r.weights.values() for n in FLOATS]
        + ([float(np.abs(r.base[n]).max()) for n in FLOATS] if r.base is not None else [])
        + [1e-12]
    )
    dev = 0.0
    for name in FLOATS:
        dev = max(dev, float(np.abs(got[name] - expect[name]).max()) / mag)
    counter = abs(float(got[COUNTER]) - float(expect[COUNTER]))
    assert counter <= 0.5 + 1e-3, (got[COUNTER], expect[COUNTER])
    return dev


def weighted_mean(r: Round, members: list[str], weights: F64) -> dict[str, F64]:
    """Σ w_i W_i / Σ w_i over every tensor of the members' models."""
    w = weights / weights.sum()
    return {
        name: sum(
            (wi * r.weights[c][name] for c, wi in zip(members, w, strict=True)), np.zeros(1)
        ).reshape(SHAPES[name])
        for name in SHAPES
    }


def example_weights(r: Round, members: list[str]) -> F64:
    w = np.array([r.num_examples[c] for c in members], dtype=np.float64)
    return w if w.sum() > 0 else np.ones(len(members))


def cosines(x: F64, y: F64) -> F64:
    """cos(x_i, y) per row, 0 where either norm is 0."""
    nx, ny = np.linalg.norm(x, axis=1), float(np.linalg.norm(y))
    denom = nx * ny
    return np.where(denom > 0, x @ y / np.where(denom > 0, denom, 1.0), 0.0)


def ranking(clients: list[str], scores: F64, descending: bool) -> list[str] | None:
    """Clients by score, ties (neighbours within ``TIE`` of the largest |score|, chained)
    by client id; ``None`` when a gap is too close to the threshold to tell tie from order."""
    s = -scores if descending else scores.copy()
    tol = TIE * float(np.abs(s).max()) if len(s) else 0.0
    order = sorted(range(len(clients)), key=lambda i: (s[i], clients[i]))
    groups: list[list[int]] = []
    for i in order:
        gap = s[i] - s[groups[-1][-1]] if groups else np.inf
        if tol / UNDECIDED < gap <= tol * UNDECIDED:
            return None
        if gap <= tol:
            groups[-1].append(i)
        else:
            groups.append([i])
    return [clients[i] for g in groups for i in sorted(g, key=lambda i: clients[i])]


# --------------------------------------------------------------------------- fedavg


@PROPS
@given(r=rounds(), weighted=st.booleans())
def test_fedavg_is_the_example_weighted_mean(r: Round, weighted: bool) -> None:
    out = run("fedavg", r.data, weighted=weighted)
    w = example_weights(r, r.clients) if weighted else np.ones(r.n)
    share = w / w.sum()
    got = np.array([out.result["weights"][c] for c in r.clients])
    dev = float(np.abs(got - share).max())
    assert dev <= 1e-12
    # w = Σ_k (n_k / n) w_k over the full state dict
    mdev = model_deviation(r, out.model_vector(), weighted_mean(r, r.clients, w))
    assert mdev <= 1e-6
    LOG.record("fedavg", max(dev, mdev))


# --------------------------------------------------------------------------- cosine selection


def cos_to_mean_ref(r: Round, use_delta: bool, include_buffers: bool) -> F64:
    x = r.stack(r.columns(include_buffers), delta=use_delta)
    return cosines(x, x.mean(axis=0))


@PROPS
@given(
    r=rounds(),
    k=st.integers(1, 7),
    use_delta=st.booleans(),
    include_buffers=st.booleans(),
)
def test_cosine_select_ranks_by_cosine_to_the_mean(
    r: Round, k: int, use_delta: bool, include_buffers: bool
) -> None:
    assume(k <= r.n)
    out = run("cosine_select", r.data, k=k, use_delta=use_delta, include_buffers=include_buffers)
    ref = cos_to_mean_ref(r, use_delta, include_buffers)
    got = np.array([out.result["scores"][c] for c in r.clients])
    dev = float(np.abs(got - ref).max())
    assert dev <= COSINE_TOL, (got, ref)
    LOG.record("cosine_select", dev)
    ranked = ranking(r.clients, ref, descending=True)
    if LOG.checked("cosine_select", ranked is not None):
        assert ranked is not None
        assert out.result["selected"] == ranked[:k], (ref, got)


@PROPS
@given(
    r=rounds(),
    k=st.integers(1, 7),
    threshold=st.one_of(st.none(), st.sampled_from([-0.5, 0.0, 0.5, 0.99])),
    use_delta=st.booleans(),
    include_buffers=st.booleans(),
)
def test_malicious_cosine_flags_the_least_similar(
    r: Round, k: int, threshold: float | None, use_delta: bool, include_buffers: bool
) -> None:
    assume(k <= r.n)
    out = run(
        "malicious_cosine",
        r.data,
        k=k,
        threshold=threshold,
        use_delta=use_delta,
        include_buffers=include_buffers,
    )
    ref = cos_to_mean_ref(r, use_delta, include_buffers)
    got = np.array([out.result["scores"][c] for c in r.clients])
    dev = float(np.abs(got - ref).max())
    assert dev <= COSINE_TOL, (got, ref)
    LOG.record("malicious_cosine", dev)
    ranked = ranking(r.clients, ref, descending=False)
    if not LOG.checked("malicious_cosine", ranked is not None):
        return
    assert ranked is not None
    if threshold is None:
        assert out.result["flagged"] == ranked[:k], (ref, got)
    elif np.all(np.abs(ref - threshold) > 1e-6):
        below = {c for c, s in zip(r.clients, ref, strict=True) if s < threshold}
        assert out.result["flagged"] == [c for c in ranked if c in below]


# --------------------------------------------------------------------------- krum, multi-krum


def sq_distances(x: F64) -> F64:
    out: F64 = ((x[:, None, :] - x[None, :, :]) ** 2).sum(axis=-1)
    return out


def krum_ref(x: F64, f: int) -> F64:
    """s(i) = Σ of the n − f − 2 smallest ‖x_i − x_j‖² over j ≠ i."""
    n = len(x)
    d2 = sq_distances(x)
    return np.array([np.sort(np.delete(d2[i], i))[: n - f - 2].sum() for i in range(n)])


def distance_scale(x: F64) -> float:
    """The largest squared distance from the mean: the float32 GEMM's error is relative to it."""
    return float(((x - x.mean(axis=0)) ** 2).sum(axis=1).max())


def krum_case(r: Round, f: int, include_buffers: bool) -> tuple[F64, float]:
    x = r.stack(r.columns(include_buffers), delta=False)
    return krum_ref(x, f), distance_scale(x)


def scores_deviation(got: F64, ref: F64, scale: float) -> float:
    """Largest |got − ref| / (|ref| + 1e-2·scale): 1e-4 relative, with an absolute floor for
    scores that vanish (identical updates)."""
    return float((np.abs(got - ref) / (np.abs(ref) + 1e-2 * scale + 1e-300)).max())


@PROPS
@given(r=rounds(), f=st.integers(0, 3), include_buffers=st.booleans())
def test_krum_selects_the_least_score(r: Round, f: int, include_buffers: bool) -> None:
    if r.n <= 2 * f + 2:
        with pytest.raises(InvalidParamsError):
            run("krum", r.data, f=f, include_buffers=include_buffers)
        return
    out = run("krum", r.data, f=f, include_buffers=include_buffers)
    ref, scale = krum_case(r, f, include_buffers)
    got = np.array([out.result["scores"][c] for c in r.clients])
    dev = scores_deviation(got, ref, scale)
    assert dev <= 1e-4, (got, ref)
    LOG.record("krum (scores)", dev)
    ranked = ranking(r.clients, ref, descending=False)
    if LOG.checked("krum", ranked is not None):
        assert ranked is not None
        assert out.result["selected"] == ranked[:1]
        best = r.clients.index(ranked[0])
        mdev = model_deviation(r, out.model_vector(), r.weights[r.clients[best]])
        assert mdev <= 1e-6
        LOG.record("krum (model)", mdev)


@PROPS
@given(
    r=rounds(min_clients=3),
    f=st.integers(0, 2),
    m=st.one_of(st.none(), st.integers(1, 7)),
    include_buffers=st.booleans(),
)
def test_multi_krum_averages_the_m_best(
    r: Round, f: int, m: int | None, include_buffers: bool
) -> None:
    assume(r.n > 2 * f + 2 and (m is None or m <= r.n))
    out = run("multi_krum", r.data, f=f, m=m, include_buffers=include_buffers)
    ref, scale = krum_case(r, f, include_buffers)
    got = np.array([out.result["scores"][c] for c in r.clients])
    dev = scores_deviation(got, ref, scale)
    assert dev <= 1e-4
    LOG.record("multi_krum (scores)", dev)
    ranked = ranking(r.clients, ref, descending=False)
    if not LOG.checked("multi_krum", ranked is not None):
        return
    assert ranked is not None
    chosen = ranked[: r.n - f if m is None else m]
    assert out.result["selected"] == chosen
    w = example_weights(r, chosen)
    share = np.array([out.result["weights"][c] for c in chosen])
    wdev = float(np.abs(share - w / w.sum()).max())
    assert wdev <= 1e-12
    mdev = model_deviation(r, out.model_vector(), weighted_mean(r, chosen, w))
    assert mdev <= 1e-6
    LOG.record("multi_krum (model)", max(wdev, mdev))


# --------------------------------------------------------------------------- trimmed mean


@PROPS
@given(r=rounds(), beta=st.sampled_from([0.0, 0.1, 0.2, 0.25, 0.34, 0.49]))
def test_trimmed_mean_is_the_coordinatewise_trimmed_mean(r: Round, beta: float) -> None:
    out = run("trimmed_mean", r.data, beta=beta)
    cut = math.floor(beta * r.n)
    assert out.result["cut"] == cut and out.result["kept"] == r.n - 2 * cut
    expect = {}
    for name in SHAPES:
        values = np.sort(np.stack([r.weights[c][name] for c in r.clients]), axis=0)
        expect[name] = values[cut : r.n - cut].mean(axis=0)  # trmean_β per coordinate
    dev = model_deviation(r, out.model_vector(), expect)
    assert dev <= 1e-6
    LOG.record("trimmed_mean", dev)


# --------------------------------------------------------------------------- kmeans


def inertia_of(x: F64, labels: list[int]) -> float:
    lab = np.asarray(labels)
    return float(sum(((x[lab == c] - x[lab == c].mean(axis=0)) ** 2).sum() for c in np.unique(lab)))


def well_separated(x: F64, labels: npt.NDArray[np.int64], k: int) -> bool:
    """All k clusters used (fewer distinct rows than k leave the optimum degenerate) and every
    within-cluster distance well below every between-cluster distance."""
    d = np.sqrt(sq_distances(x))
    same = labels[:, None] == labels[None, :]
    if same.all() or (~same).all() or len(set(labels.tolist())) < k:
        return False
    return bool(d[same].max() * 2.0 < d[~same].min())


def same_partition(a: list[int], b: list[int]) -> bool:
    return {frozenset(np.flatnonzero(np.asarray(a) == v)) for v in set(a)} == {
        frozenset(np.flatnonzero(np.asarray(b) == v)) for v in set(b)
    }


@PROPS
@given(
    r=rounds(),
    k=st.integers(2, 4),
    seed=st.integers(0, 3),
    use_delta=st.booleans(),
    include_buffers=st.booleans(),
)
def test_kmeans_matches_scikit_learn_on_the_float64_rows(
    r: Round, k: int, seed: int, use_delta: bool, include_buffers: bool
) -> None:
    params = {"k": k, "seed": seed, "use_delta": use_delta, "include_buffers": include_buffers}
    if r.n < 2 or k > r.n:
        with pytest.raises(InvalidParamsError):
            run("kmeans", r.data, **params)
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fewer distinct points than clusters
        out = run("kmeans", r.data, **params)
    x = r.stack(r.columns(include_buffers), delta=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fewer distinct points than clusters
        ref = KMeans(n_clusters=k, n_init=10, random_state=seed).fit(x)
    labels = [out.result["labels"][c] for c in r.clients]
    scale = max(distance_scale(x), 1e-300)
    # the reported inertia is that of the reported labels, and as low as scikit-learn's
    own = abs(out.result["inertia"] - inertia_of(x, labels)) / (
        inertia_of(x, labels) + 1e-6 * scale
    )
    gap = (out.result["inertia"] - ref.inertia_) / (ref.inertia_ + 1e-6 * scale)
    assert own <= 1e-4, (out.result["inertia"], inertia_of(x, labels))
    assert gap <= 1e-4, (out.result["inertia"], ref.inertia_)
    LOG.record("kmeans (inertia)", max(own, abs(gap)))
    if LOG.checked("kmeans (well separated)", well_separated(x, ref.labels_, k)):
        assert same_partition(labels, ref.labels_.tolist())


# --------------------------------------------------------------------------- CFL


def pairwise_cosines(x: F64) -> F64:
    norms = np.linalg.norm(x, axis=1)
    denom = np.outer(norms, norms)
    return np.where(denom > 0, x @ x.T / np.where(denom > 0, denom, 1.0), 0.0)


@PROPS
@given(
    r=rounds(),
    eps_1=st.sampled_from([0.0, 0.4, 10.0]),
    eps_2=st.sampled_from([0.0, 1.6, 1e9]),
    use_delta=st.booleans(),
    include_buffers=st.booleans(),
)
def test_cfl_split_is_the_authors_rule(
    r: Round, eps_1: float, eps_2: float, use_delta: bool, include_buffers: bool
) -> None:
    params = {"eps_1": eps_1, "eps_2": eps_2, "use_delta": use_delta}
    params["include_buffers"] = include_buffers
    if r.n < 2:
        with pytest.raises(InvalidParamsError):
            run("cfl_split", r.data, **params)
        return
    out = run("cfl_split", r.data, **params).result
    x = r.stack(r.columns(include_buffers), delta=use_delta)
    alpha = np.clip(pairwise_cosines(x), -1.0, 1.0)
    labels = np.array([out["labels"][c] for c in r.clients])
    assert set(labels.tolist()) == {0, 1}
    # the authors' code: complete linkage on −α (here 1 − α, the same merges), cut in two
    dissimilarity = 1.0 - alpha
    np.fill_diagonal(dissimilarity, 0.0)
    condensed = squareform(dissimilarity, checks=False)
    ref = fcluster(linkage(condensed, method="complete"), t=2, criterion="maxclust")
    near_ties = np.diff(np.sort(condensed))
    if LOG.checked("cfl_split (no near ties)", len(condensed) < 2 or near_ties.min() > 1e-6):
        assert same_partition(labels.tolist(), ref.tolist())
    # α_max^cross of the returned partition, and the criterion on example-weighted norms
    cross = alpha[np.ix_(labels == 0, labels == 1)]
    w = example_weights(r, r.clients)
    mean_norm = float(np.linalg.norm((w / w.sum()) @ x))
    max_norm = float(np.linalg.norm(x, axis=1).max())
    mag = max(float(np.linalg.norm(x, axis=1).max()), 1e-12)
    # mean_norm is read from the float32 Gram as sqrt(wᵀ·G·w) (as it must be on a sharded
    # round, where no node holds the mean), so its square is what is accurate to the Gram's
    # precision, relative to the largest norm squared: where the clients' mean nearly cancels,
    # the norm itself has a larger relative error (4.8e-6 of the largest norm was seen)
    devs = [
        abs(out["alpha_max"] - float(cross.max())),
        abs(out["mean_norm"] ** 2 - mean_norm**2) / mag**2,
        abs(out["max_norm"] - max_norm) / mag,
    ]
    assert max(devs) <= 1e-6, devs
    LOG.record("cfl_split", max(devs))
    if abs(mean_norm**2 - eps_1**2) > 1e-6 * mag**2 and abs(max_norm - eps_2) > 1e-6 * mag:
        assert out["split"] == (mean_norm < eps_1 and max_norm > eps_2)


# --------------------------------------------------------------------------- personalize


class NoAccuracy:
    """Stands in for the validation scorer: similarity-based personalization needs no model."""

    def __init__(self, data: RoundData) -> None:
        pass

    def accuracy(self, weights: Any) -> float:
        return 0.0

    def client_accuracy(self, row: int) -> float:
        return 0.0

    def aggregate_accuracy(self, coefficients: Any, weights: Any) -> float:
        return 0.0


@PROPS
@given(
    r=rounds(min_clients=1),
    which=st.integers(0, 6),
    peers=st.integers(0, 6),
    use_delta=st.booleans(),
    include_buffers=st.booleans(),
)
def test_personalize_by_similarity_averages_the_closest_peers(
    r: Round, which: int, peers: int, use_delta: bool, include_buffers: bool
) -> None:
    assume(which < r.n and peers <= r.n - 1)
    client = r.clients[which]
    with mock.patch("flstore_core.workloads.personalize.ValidationScorer", NoAccuracy):
        out = run(
            "personalize",
            r.data,
            client=client,
            peers=peers,
            use_delta=use_delta,
            include_buffers=include_buffers,
        )
    x = r.stack(r.columns(include_buffers), delta=use_delta)
    cos = cosines(x, x[which])  # cos(Δ_c, Δ_j)
    others = [c for c in r.clients if c != client]
    ref = cos[[r.clients.index(c) for c in others]]
    got = np.array([out.result["scores"][c] for c in others])
    dev = float(np.abs(got - ref).max()) if others else 0.0
    assert dev <= 1e-6
    ranked = ranking(others, ref, descending=True) if others else []
    if not LOG.checked("personalize", ranked is not None):
        LOG.record("personalize", dev)
        return
    assert ranked is not None
    chosen = ranked[:peers]
    assert out.result["peers"] == chosen, (ref, out.result["scores"])
    members = [client, *chosen]
    w = example_weights(r, members)
    mdev = model_deviation(r, out.model_vector(), weighted_mean(r, members, w))
    assert mdev <= 1e-6
    LOG.record("personalize", max(dev, mdev))


# --------------------------------------------------------------------------- FLTrust


@PROPS
@given(
    r=rounds(),
    which=st.integers(0, 6),
    global_lr=st.sampled_from([1.0, 0.5]),
    include_buffers=st.booleans(),
)
def test_fltrust_with_a_server_entry_is_the_papers_rule(
    r: Round, which: int, global_lr: float, include_buffers: bool
) -> None:
    assume(which < r.n)
    server = r.clients[which]
    params = {"server_client": server, "global_lr": global_lr, "include_buffers": include_buffers}
    if r.base is None or r.n == 1:
        with pytest.raises(InvalidParamsError):
            run("fltrust", r.data, **params)
        return
    out = run("fltrust", r.data, **params)
    base = r.base
    cols = r.columns(include_buffers)
    g = r.stack(cols, delta=True)
    g0 = g[which]
    rows = [i for i in range(r.n) if i != which]
    clients = [r.clients[i] for i in rows]
    trust = np.maximum(cosines(g[rows], g0), 0.0)  # TS_i = ReLU(cos(g_i, g_0))
    got = np.array([out.result["scores"][c] for c in clients])
    dev = float(np.abs(got - trust).max())
    assert dev <= 1e-6, (got, trust)
    clear = bool(np.all((trust == 0) | (trust > 1e-6)))
    if LOG.checked("fltrust", clear):
        assert out.result["flagged"] == [c for c, t in zip(clients, trust, strict=True) if t <= 0]
    norm0 = float(np.linalg.norm(g0))
    assert abs(out.result["server_norm"] - norm0) <= 1e-6 * max(norm0, 1e-12)
    model = out.model_vector()
    if trust.sum() <= 0:
        expect = {name: base[name] for name in SHAPES}
    else:
        # ĝ_i = g_i ‖g_0‖/‖g_i‖, g = Σ TS_i ĝ_i / Σ TS_i; other columns Σ TS_i d_i / Σ TS_i
        norms = np.linalg.norm(g[rows], axis=1)
        coef = np.where(norms > 0, trust * norm0 / np.where(norms > 0, norms, 1.0), 0.0)
        coef = coef / trust.sum()
        share = trust / trust.sum()
        expect = {}
        for name in SHAPES:
            d = np.stack([r.weights[c][name] - base[name] for c in clients])
            c_ = coef if name in cols else share
            expect[name] = base[name] + global_lr * np.tensordot(c_, d, axes=1)
    mdev = model_deviation(r, model, expect)
    # near-zero trust decided by float32 noise changes the aggregate: only clear cases
    if clear:
        assert mdev <= 1e-6
    LOG.record("fltrust", max(dev, mdev if clear else 0.0))
