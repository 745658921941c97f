"""Property tests: the model-based round workloads against float64 torch references written here.

(the model-based part; the model-less workloads are in
``test_workload_properties.py``). Random rounds (hypothesis) of the registry's
``digits_bn_cnn`` (1×8×8 inputs, 10 classes, BatchNorm running statistics and an integer
``num_batches_tracked``) hold 1–4 clients whose weights are small random perturbations of one
fresh model (some clients identical: exact ties), with and without a stored base, example counts
including 0, each file with its tensors in its own order. The job is declared with
``create_job(model=..., validation=(x, y))`` on an in-memory object store, the round committed,
loaded with :func:`load_round` and run through :func:`run_round_workload`, as a cache node does.
The validation set is 30 random inputs labelled by the base model, a drawn fraction relabelled
at random, so accuracies spread over the clients.

The references never call the workloads' helpers: every model is evaluated by a float64 copy of
the architecture holding float64 copies of the float32 values written (aggregates
``Σ n_j w_j / Σ n_j`` computed here in float64), ``U(∅)`` is the stored base or the documented
fresh seed-0 model, leave-one-out is ``U(N) − U(N∖{i})`` and Shapley values average marginal
contributions over all ``n!`` orderings (GTG-Shapley: whole cycles, efficiency within ``eps``,
exact for one or two clients). FedDebug's reference writes the model's forward out
(``torch.nn.functional`` in float64) to take every Conv2d/Linear output, and counts
``|∩_{j ∈ R∖{i}} A_j|`` with explicit intersections (activations within ``FEDDEBUG_TOL`` of
the threshold are undecided: an input with one is left out of the exact vote count). The
workloads evaluate in float32: a prediction whose two largest float64 logits are within
``MARGIN`` (relative) could fall either side, so each accuracy is checked to lie in the interval
those undecided predictions allow, and rankings are asserted (exactly, ties by client id) only
on examples without undecided predictions (counted). The largest deviation from the float64
value is kept in ``LOG`` (a ``tests.deviation_log.DeviationLog``) and printed at the end
(``pytest -s``).
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from flstore_core import models
from flstore_core.cache.results import run_round_workload
from flstore_core.cache.round_data import ArtifactStats, RoundData
from flstore_core.cache.round_loading import load_round
from flstore_core.data.codec import Update, decode_update
from flstore_core.errors import InvalidParamsError
from flstore_core.sdk.jobs import create_job
from flstore_core.storage.memory import MemoryBlobStore
from flstore_core.storage.object_store import ObjectStore
from flstore_core.workloads import get
from tests.deviation_log import DeviationLog

torch = pytest.importorskip("torch")

F64 = npt.NDArray[np.float64]
MODEL = "digits_bn_cnn"
VALIDATION = 30
# a prediction is undecided when its two largest float64 logits are within MARGIN·(1 + max|logit|):
# ~20x the float32 error of these logits (≲ 1e-6)
MARGIN = 2e-5

LOG = DeviationLog("the float64 torch reference", "rankings")

PROPS = settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


@pytest.fixture(scope="module", autouse=True)
def report() -> Iterator[None]:
    yield
    print("\n" + "\n".join(LOG.lines()))


# --------------------------------------------------------------------------- the reference


@functools.lru_cache(maxsize=1)
def reference_model() -> Any:
    """One float64 copy of the architecture, built once per module."""
    return models.build(MODEL).double().eval()


@functools.lru_cache(maxsize=4)
def fresh_state(seed: int) -> dict[str, F64]:
    """State of a fresh model built with ``seed`` (float32 values, held as float64)."""
    state = models.state_arrays(models.build(MODEL, seed=seed))
    return {k: v.astype(np.float64) for k, v in state.items()}


@dataclass
class Verdict:
    """Float64 predictions of one model on the validation set, and which are decided."""

    correct: npt.NDArray[np.bool_]
    decided: npt.NDArray[np.bool_]

    @property
    def accuracy(self) -> float:
        return float(self.correct.mean())

    @property
    def all_decided(self) -> bool:
        return bool(self.decided.all())

    def admits(self, got: float) -> bool:
        """Whether ``got`` is an accuracy the undecided predictions allow."""
        lo = float((self.correct & self.decided).mean())
        hi = float((self.correct | ~self.decided).mean())
        return lo - 1e-12 <= got <= hi + 1e-12


def evaluate(state: dict[str, F64], x: F64, y: npt.NDArray[np.int64]) -> Verdict:
    """Evaluate ``state`` with the float64 model (eval mode: BatchNorm uses running stats)."""
    model = reference_model()
    tensors = {
        k: torch.from_numpy(
            np.asarray(np.rint(v), np.int64) if k.endswith("num_batches_tracked") else v
        )
        for k, v in state.items()
    }
    model.load_state_dict(tensors)
    with torch.no_grad():
        logits = model(torch.from_numpy(x)).numpy()
    top = np.sort(logits, axis=1)
    margin = top[:, -1] - top[:, -2]
    decided = margin > MARGIN * (1.0 + np.abs(logits).max(axis=1))
    return Verdict(logits.argmax(axis=1) == y, decided)


# --------------------------------------------------------------------------- random rounds


@dataclass(repr=False)
class Round:
    clients: list[str]
    weights: dict[str, dict[str, F64]]  # client -> tensor -> float64 copy of what was written
    num_examples: dict[str, int]
    base: dict[str, F64] | None
    x: F64
    y: npt.NDArray[np.int64]
    store: ObjectStore
    data: RoundData
    cache: dict[frozenset[str], Verdict] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.clients)

    def __repr__(self) -> str:
        examples = [self.num_examples[c] for c in self.clients]
        return f"Round(n={self.n}, num_examples={examples}, base={self.base is not None})"

    def aggregate(self, members: frozenset[str]) -> dict[str, F64]:
        """Σ n_j w_j / Σ n_j over the members (plain mean when their counts are all 0, and
        when the whole round's are); U(∅) is the base, else the fresh seed-0 model."""
        if not members:
            return self.base if self.base is not None else fresh_state(0)
        everyone = sum(self.num_examples.values()) > 0
        ms = sorted(members)
        n = np.array([float(self.num_examples[c]) if everyone else 1.0 for c in ms])
        if n.sum() <= 0:
            n = np.ones(len(ms))
        n = n / n.sum()
        return {
            k: sum(w * self.weights[c][k] for c, w in zip(ms, n, strict=True))
            for k in self.weights[ms[0]]
        }

    def utility(self, members: frozenset[str]) -> Verdict:
        if members not in self.cache:
            self.cache[members] = evaluate(self.aggregate(members), self.x, self.y)
        return self.cache[members]


@st.composite
def rounds(draw: st.DrawFn, min_clients: int = 1, max_clients: int = 4) -> Round:
    n = draw(st.integers(min_clients, max_clients))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    base = fresh_state(draw(st.integers(0, 3)))
    scale = draw(st.sampled_from([0.05, 0.2, 0.6]))
    with_base = draw(st.booleans())

    def perturbed() -> dict[str, F64]:
        out: dict[str, F64] = {}
        for k, v in base.items():
            noise = rng.standard_normal(v.shape)
            if k.endswith("num_batches_tracked"):
                out[k] = np.array(float(rng.integers(0, 1000)))
            elif k.endswith("running_var"):  # stays positive
                out[k] = v * np.exp(scale * noise)
            else:
                out[k] = v + scale * max(float(v.std()), 0.1) * noise
        return {k: v.astype(np.float32).astype(np.float64) for k, v in out.items()}

    clients = [f"c{i}" for i in range(n)]
    weights: dict[str, dict[str, F64]] = {}
    for i, c in enumerate(clients):
        same = i > 0 and draw(st.integers(0, 3)) == 0  # an identical model: exact ties
        weights[c] = dict(weights[clients[draw(st.integers(0, i - 1))]]) if same else perturbed()
    num_examples = {c: draw(st.integers(0, 50)) if draw(st.booleans()) else 10 for c in clients}

    x = rng.uniform(0.0, 1.0, (VALIDATION, 1, 8, 8)).astype(np.float32).astype(np.float64)
    model = reference_model()
    evaluate(base, x, np.zeros(VALIDATION, np.int64))  # loads the base into the model
    with torch.no_grad():
        y = model(torch.from_numpy(x)).numpy().argmax(axis=1).astype(np.int64)
    relabel = rng.uniform(size=VALIDATION) < draw(st.sampled_from([0.0, 0.3, 0.7]))
    y[relabel] = rng.integers(0, 10, size=int(relabel.sum()))

    store = ObjectStore("model-props", blobs=MemoryBlobStore())
    create_job(store, "j", model=MODEL, validation=(x.astype(np.float32), y))

    def update(state: dict[str, F64], examples: int) -> Update:
        order = draw(st.permutations(list(state)))
        return Update(
            {
                k: state[k].astype(np.int64 if k.endswith("num_batches_tracked") else np.float32)
                for k in order
            },
            num_examples=examples,
        )

    if with_base:
        store.put_initial("j", update(base, 0))
    entries = [store.put_update("j", 0, c, update(weights[c], num_examples[c])) for c in clients]
    store.commit_round("j", 0, entries)
    data = load_round(store, "j", 0, ArtifactStats())
    assert data.clients == clients
    return Round(clients, weights, num_examples, base if with_base else None, x, y, store, data)


def run(r: Round, name: str, **params: Any) -> dict[str, Any]:
    workload = get(name)
    return run_round_workload(r.store, workload, r.data, workload.validate(params))


def by_score(clients: list[str], scores: dict[str, float]) -> list[str]:
    """Descending score, ties by client id."""
    return sorted(clients, key=lambda c: (-scores[c], c))


# --------------------------------------------------------------------------- accuracy_select


@PROPS
@given(r=rounds(), k=st.integers(1, 4))
def test_accuracy_select_is_each_client_models_validation_accuracy(r: Round, k: int) -> None:
    assume(k <= r.n)
    out = run(r, "accuracy_select", k=k)
    verdicts = {c: r.utility(frozenset([c])) for c in r.clients}
    dev = 0.0
    for c in r.clients:
        got = out["scores"][c]
        assert verdicts[c].admits(got), (c, got, verdicts[c].accuracy)
        dev = max(dev, abs(got - verdicts[c].accuracy))
    assert out["validation_size"] == VALIDATION
    if LOG.checked("accuracy_select", all(v.all_decided for v in verdicts.values())):
        ref = {c: v.accuracy for c, v in verdicts.items()}
        assert out["selected"] == by_score(r.clients, ref)[:k], ref
    LOG.record("accuracy_select", dev)


# --------------------------------------------------------------------------- contribution_loo


@PROPS
@given(r=rounds())
def test_contribution_loo_is_u_all_minus_u_without(r: Round) -> None:
    out = run(r, "contribution_loo")
    everyone = frozenset(r.clients)
    total = r.utility(everyone)
    without = {c: r.utility(everyone - {c}) for c in r.clients}
    assert total.admits(out["utility_all"])
    dev = abs(out["utility_all"] - total.accuracy)
    ref_values: dict[str, float] = {}
    for c in r.clients:
        assert without[c].admits(out["utility_without"][c]), c
        ref_values[c] = total.accuracy - without[c].accuracy  # v_i = U(N) − U(N∖{i})
        dev = max(dev, abs(out["values"][c] - ref_values[c]))
        assert out["values"][c] == out["utility_all"] - out["utility_without"][c]
    assert out["evaluations"] == r.n + 1
    decided = total.all_decided and all(v.all_decided for v in without.values())
    if LOG.checked("contribution_loo", decided):
        assert dev == 0.0
        assert out["selected"] == by_score(r.clients, ref_values), ref_values
    LOG.record("contribution_loo", dev)


# --------------------------------------------------------------------------- Shapley (exact)


def shapley_by_permutations(r: Round) -> tuple[dict[str, float], bool]:
    """Average marginal contribution U(P ∪ {i}) − U(P) over all n! orderings (the definition);
    and whether every U(S) evaluated was free of undecided predictions."""
    values = dict.fromkeys(r.clients, 0.0)
    for order in itertools.permutations(r.clients):
        members: frozenset[str] = frozenset()
        for c in order:
            before = r.utility(members).accuracy
            members = members | {c}
            values[c] += r.utility(members).accuracy - before
    decided = all(v.all_decided for v in r.cache.values())
    return {c: v / math.factorial(r.n) for c, v in values.items()}, decided


@PROPS
@given(r=rounds())
def test_exact_shapley_is_the_average_marginal_contribution(r: Round) -> None:
    out = run(r, "contribution_shapley", method="exact")
    ref, decided = shapley_by_permutations(r)
    assert out["method"] == "exact" and out["evaluations"] == 2**r.n
    assert r.utility(frozenset(r.clients)).admits(out["utility_all"])
    assert r.utility(frozenset()).admits(out["utility_empty"])
    assert out["empty_model"] == ("base" if r.base is not None else "fresh model (seed 0)")
    dev = max(abs(out["values"][c] - ref[c]) for c in r.clients)
    # efficiency: Σ φ_i = U(N) − U(∅)
    assert sum(out["values"].values()) == pytest.approx(
        out["utility_all"] - out["utility_empty"], abs=1e-12
    )
    if LOG.checked("contribution_shapley", decided):
        assert dev <= 1e-12, (out["values"], ref)
        # φ_i is a multiple of 1/(|V| · n!) (weights s!(n−s−1)!/n!, accuracies k/|V|): ordered
        # on that grid, equal values (symmetric clients) tie exactly and go by client id
        grid = VALIDATION * math.factorial(r.n)
        exact = {c: float(round(v * grid)) for c, v in ref.items()}
        assert out["selected"] == by_score(r.clients, exact), (out["values"], ref)
    LOG.record("contribution_shapley", dev)


# --------------------------------------------------------------------------- Shapley (GTG)


@PROPS
@given(r=rounds(), eps=st.sampled_from([0.0, 0.001]), cycles=st.integers(1, 40))
def test_gtg_shapley_keeps_efficiency_and_is_exact_for_two_clients(
    r: Round, eps: float, cycles: int
) -> None:
    """GTG-Shapley on real rounds (its guarantees on arbitrary games are property-tested in
    ``test_gtg_shapley_properties.py``): whole cycles, U(N) and U(∅) as the float64 reference
    admits, Σφ within eps of U(N) − U(∅), and the exact values (all n! orderings, float64)
    for one or two clients without within-round truncation."""
    out = run(
        r,
        "contribution_shapley",
        method="gtg",
        eps=eps,
        min_permutations=cycles * r.n,
        max_permutations=cycles * r.n,
    )
    ref, decided = shapley_by_permutations(r)
    assert out["method"] == "gtg" and out["permutations"] == cycles * r.n
    assert not out["round_truncated"] and out["evaluations"] <= 2**r.n
    assert r.utility(frozenset(r.clients)).admits(out["utility_all"])
    assert r.utility(frozenset()).admits(out["utility_empty"])
    gain = out["utility_all"] - out["utility_empty"]
    assert abs(sum(out["values"].values()) - gain) < eps + 1e-12
    if r.n <= 2 and eps == 0.0 and LOG.checked("contribution_shapley gtg", decided):
        dev = max(abs(out["values"][c] - ref[c]) for c in r.clients)
        assert dev <= 1e-12, (out["values"], ref)
        LOG.record("contribution_shapley gtg", dev)


# --------------------------------------------------------------------------- personalize


@PROPS
@given(r=rounds(), which=st.integers(0, 3), peers=st.integers(0, 3))
def test_personalize_by_accuracy_averages_the_most_accurate_peers(
    r: Round, which: int, peers: int
) -> None:
    assume(which < r.n and peers <= r.n - 1)
    client = r.clients[which]
    out = run(r, "personalize", client=client, peers=peers, by="accuracy")
    others = [c for c in r.clients if c != client]
    verdicts = {c: r.utility(frozenset([c])) for c in others}
    dev = 0.0
    for c in others:
        assert verdicts[c].admits(out["scores"][c]), c
        dev = max(dev, abs(out["scores"][c] - verdicts[c].accuracy))
    assert r.utility(frozenset([client])).admits(out["client_accuracy"])
    assert r.utility(frozenset(r.clients)).admits(out["global_accuracy"])
    decided = all(v.all_decided for v in verdicts.values())
    if not LOG.checked("personalize", decided):
        LOG.record("personalize", dev)
        return
    chosen = by_score(others, {c: v.accuracy for c, v in verdicts.items()})[:peers]
    assert out["peers"] == chosen
    members = frozenset([client, *chosen])
    assert r.utility(members).admits(out["accuracy"])
    # the stored model: Σ_{j ∈ {c} ∪ P} n_j w_j / Σ n_j (plain mean when the counts are all 0)
    n = np.array([float(r.num_examples[c]) for c in sorted(members)])
    n = n if n.sum() > 0 else np.ones(len(members))
    expect = {
        k: sum(w * r.weights[c][k] for c, w in zip(sorted(members), n / n.sum(), strict=True))
        for k in r.weights[client]
    }
    stored = decode_update(r.store.get_object(out["model_key"])).tensors
    assert set(stored) == set(expect)
    mag = max(float(np.abs(w[k]).max()) for w in r.weights.values() for k in w if "num_b" not in k)
    mdev = 0.0
    for k, v in expect.items():
        got = np.asarray(stored[k], dtype=np.float64)
        if k.endswith("num_batches_tracked"):
            assert abs(float(got) - float(v)) <= 0.5 + 1e-9  # averaged, then rounded
        else:
            mdev = max(mdev, float(np.abs(got - v).max()) / mag)
    assert mdev <= 1e-6
    LOG.record("personalize", max(dev, mdev))


# --------------------------------------------------------------------------- FedDebug


def layer_outputs(state: dict[str, F64], x: Any) -> list[F64]:
    """Float64 outputs of digits_bn_cnn's Conv2d and Linear layers, its forward written out:
    conv1 → BN → ReLU → conv2 → BN → ReLU → max-pool 2 → fc (BatchNorm in eval mode, ε 1e-5)."""
    f = torch.nn.functional
    t = {k: torch.from_numpy(v) for k, v in state.items() if not k.endswith("num_batches_tracked")}

    def bn(h: Any, p: str) -> Any:
        return f.batch_norm(
            h, t[f"{p}.running_mean"], t[f"{p}.running_var"], t[f"{p}.weight"], t[f"{p}.bias"]
        )

    c1 = f.conv2d(x, t["conv1.weight"], padding=1)
    c2 = f.conv2d(torch.relu(bn(c1, "bn1")), t["conv2.weight"], padding=1)
    h = f.max_pool2d(torch.relu(bn(c2, "bn2")), 2)
    fc = f.linear(h.flatten(1), t["fc.weight"], t["fc.bias"])
    return [o.flatten(1).numpy() for o in (c1, c2, fc)]


# a scaled activation within FEDDEBUG_TOL of the threshold could fall either side in float32
FEDDEBUG_TOL = 1e-5


def activations(state: dict[str, F64], x: Any, threshold: float) -> tuple[Any, Any]:
    """``(active, decided)``, each ``(inputs, neurons)``: ReLU, min-max per layer and input,
    ``> threshold``; decided unless within FEDDEBUG_TOL of it (or a layer's span ≈ 0)."""
    active, decided = [], []
    for out in layer_outputs(state, x):
        a = np.maximum(out, 0.0)
        lo = a.min(axis=1, keepdims=True)
        span = a.max(axis=1, keepdims=True) - lo
        scaled = np.where(span > 0, (a - lo) / np.where(span > 0, span, 1.0), 0.0)
        active.append(scaled > threshold)
        ok = np.abs(scaled - threshold) > FEDDEBUG_TOL
        decided.append(
            ok & ((span > 1e-5 * (1.0 + np.abs(out).max(axis=1, keepdims=True))) | (span == 0))
        )
    return np.concatenate(active, axis=1), np.concatenate(decided, axis=1)


@PROPS
@given(
    r=rounds(min_clients=3),
    num_inputs=st.integers(1, 4),
    threshold=st.sampled_from([0.003, 0.1, 0.5]),
    num_faulty=st.integers(1, 2),
    seed=st.integers(0, 5),
)
def test_feddebug_localizes_by_the_largest_common_activation(
    r: Round, num_inputs: int, threshold: float, num_faulty: int, seed: int
) -> None:
    params = {"num_inputs": num_inputs, "threshold": threshold, "num_faulty": num_faulty}
    params["seed"] = seed
    if r.n < 3 or num_faulty > r.n - 2:
        with pytest.raises(InvalidParamsError):
            run(r, "feddebug", **params)
        return
    out = run(r, "feddebug", **params)
    # the documented inputs: uniform in [0, 1) from a torch generator seeded with ``seed``
    x = torch.rand((num_inputs, 1, 8, 8), generator=torch.Generator().manual_seed(seed)).double()
    acts = [activations(r.weights[c], x, threshold) for c in r.clients]
    votes = np.zeros(r.n, dtype=np.int64)
    undecided_inputs = 0
    for t in range(num_inputs):
        if not all(d[t].all() for _, d in acts):
            undecided_inputs += 1
            continue
        remaining = list(range(r.n))
        for _ in range(num_faulty):
            # |∩_{j ∈ R∖{i}} A_j| for each remaining i; the first largest (client order) is faulty
            common = [
                int(np.logical_and.reduce([acts[j][0][t] for j in remaining if j != i]).sum())
                for i in remaining
            ]
            faulty = remaining[common.index(max(common))]
            votes[faulty] += 1
            remaining.remove(faulty)
    got = np.array([out["votes"][c] for c in r.clients])
    assert out["num_inputs"] == num_inputs and got.sum() == num_inputs * num_faulty
    # inputs with an undecided activation add num_faulty votes somewhere, never remove one
    assert np.all(got >= votes) and (got - votes).sum() == undecided_inputs * num_faulty
    if LOG.checked("feddebug", undecided_inputs == 0):
        assert list(got) == list(votes)
        expect = by_score(r.clients, {c: float(v) for c, v in zip(r.clients, votes, strict=True)})
        assert out["flagged"] == expect[:num_faulty]
    LOG.record("feddebug", float(np.abs(got - votes).max()) if undecided_inputs == 0 else 0.0)
