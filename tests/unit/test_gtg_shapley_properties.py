"""Property tests: GTG-Shapley's guarantees against exact Shapley values computed here.

(the approximate mode of ``contribution_shapley``; its run on real
rounds through the workload is in ``test_model_workload_properties.py``). Random games
(hypothesis) over 1–6 players on an accuracy-like grid — arbitrary tables with ties, additive
games, saturating ones, with null players and symmetric twins planted — are given to
:func:`gtg_shapley` with random knobs. The reference is the definition, written here in float64:
the average marginal contribution over all ``n!`` orderings.

What GTG-Shapley (Liu et al. 2022, Algorithm 1; the module's docstring) guarantees, and is
checked here:

* **between-round truncation**: all values 0, no permutation sampled, exactly when
  ``|U(N) − U(∅)| < round_threshold``;
* **whole guided cycles**: the permutations come in whole cycles of ``n`` (every client leads
  once per cycle, as in the authors' code, which tests convergence and its cap between cycles):
  at least one cycle, at most ``max_permutations`` beyond the first;
* **efficiency within eps**: a permutation's marginals sum to ``v_last − U(∅)``, and ``v_last``
  is ``U(N)`` or a prefix truncated within ``eps`` of it, so ``|Σφ − (U(N) − U(∅))| < eps``
  (exact up to rounding with ``eps = 0``); an individual value is not bounded by ``eps`` — the
  truncated marginals can cancel — so only the sum is asserted under truncation;
* **null player**: a client whose joining never changes ``U`` gets exactly 0;
* **exact for additive games and for n ≤ 2** (``eps = 0``): every permutation's marginals are
  the Shapley values of an additive game, and a cycle of two players is both orderings;
* **consistency**: with ``eps = 0`` a cycle's average marginal of client ``i`` is an unbiased
  estimate of ``φ_i`` (one permutation per leader, the rest uniform: stratified sampling over
  the first position), bounded by the least and largest marginal ``[a_i, b_i]``; over ``C``
  independent cycles Hoeffding's inequality gives ``|φ̂_i − φ_i| ≤ (b_i − a_i)·√(ln(2n/δ)/2C)``
  but with probability ``δ = 1e-9`` (``C`` fixed by ``min_permutations = max_permutations``).

There is no deterministic bound on an individual value for ``n ≥ 3`` (a Monte-Carlo estimate;
the convergence test compares running estimates with each other, not with φ): symmetric
clients get equal values in expectation only, which the consistency bound covers. The largest
deviations are kept in ``LOG`` and printed at the end (``pytest -s``).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flstore_core.workloads.contribution_shapley import gtg_shapley
from tests.deviation_log import DeviationLog

F64 = npt.NDArray[np.float64]
HOEFFDING_DELTA = 1e-9
ROUNDING = 1e-12  # running means of marginals on a grid of 1/1000: rounding stays far below

LOG = DeviationLog("exact Shapley values (all n! orderings)", "examples")

PROPS = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@pytest.fixture(scope="module", autouse=True)
def report() -> Iterator[None]:
    yield
    print("\n" + "\n".join(LOG.lines()))


@dataclass(repr=False)
class Game:
    """A utility table over the subsets of ``n`` players (bit ``i`` of a mask: player ``i``)."""

    n: int
    table: F64
    kind: str
    nulls: frozenset[int]
    twins: tuple[int, int] | None

    def __repr__(self) -> str:
        return (
            f"Game(n={self.n}, kind={self.kind}, nulls={sorted(self.nulls)}, "
            f"twins={self.twins}, table={self.table.tolist()})"
        )

    def utility(self, calls: list[int] | None = None) -> Callable[[frozenset[int]], float]:
        def u(members: frozenset[int]) -> float:
            mask = sum(1 << i for i in members)
            if calls is not None:
                calls.append(mask)
            return float(self.table[mask])

        return u

    def marginals(self, i: int) -> F64:
        """``U(S ∪ {i}) − U(S)`` for every ``S`` without ``i``."""
        masks = [m for m in range(1 << self.n) if not m >> i & 1]
        return np.array([self.table[m | 1 << i] - self.table[m] for m in masks])


@st.composite
def games(draw: st.DrawFn, max_players: int = 6) -> Game:
    n = draw(st.integers(1, max_players))
    levels = draw(st.sampled_from([10, 30, 1000]))  # accuracies on a validation set of |V|
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    kind = draw(st.sampled_from(["table", "additive", "saturating"]))
    masks = np.arange(1 << n)
    bits = (masks[:, None] >> np.arange(n)[None, :]) & 1
    if kind == "table":  # anything, ties included
        table = rng.integers(0, levels + 1, 1 << n) / levels
    elif kind == "additive":  # U(S) = u0 + Σ_{i∈S} a_i, some a_i negative
        a = rng.integers(-levels // 5, levels // 5 + 1, n) / levels
        table = rng.integers(0, levels + 1) / levels + bits @ a
    else:  # accuracy saturating in the members' strengths, one harmful member maybe
        strength = rng.uniform(-0.5, 1.5, n)
        table = np.round(levels * (0.1 + 0.8 * (1 - np.exp(-np.abs(bits @ strength))))) / levels
    nulls = frozenset(i for i in range(n) if n > 1 and draw(st.integers(0, 4)) == 0)
    if nulls:  # U(S) = U(S ∖ nulls): joining never changes U
        keep = sum(1 << i for i in range(n) if i not in nulls)
        table = table[masks & keep]
    twins = None
    free = [i for i in range(n) if i not in nulls]
    if len(free) >= 2 and draw(st.booleans()):  # U invariant under swapping the twins
        i, j = sorted(draw(st.permutations(free))[:2])
        if kind == "additive":  # equal weights keep the game additive
            table = table - (masks >> j & 1) * (table[1 << j] - table[1 << i])  # a_j := a_i
        else:
            swapped = masks & ~(1 << i | 1 << j) | (masks >> i & 1) << j | (masks >> j & 1) << i
            table = table[np.minimum(masks, swapped)]
        twins = (i, j)
    return Game(n, np.asarray(table, np.float64), kind, nulls, twins)


def shapley_by_orderings(game: Game) -> F64:
    """The definition: ``U(P ∪ {i}) − U(P)`` averaged over all ``n!`` orderings."""
    values = np.zeros(game.n)
    for order in itertools.permutations(range(game.n)):
        mask = 0
        for i in order:
            values[i] += game.table[mask | 1 << i] - game.table[mask]
            mask |= 1 << i
    return values / math.factorial(game.n)


knobs = st.fixed_dictionaries(
    {
        "eps": st.sampled_from([0.0, 0.001, 0.05]),
        "tolerance": st.sampled_from([0.05, 0.001]),
        "min_permutations": st.integers(1, 40),
        "max_permutations": st.integers(1, 120),
        "round_threshold": st.sampled_from([0.0, 0.0, 0.01, 0.2]),
        "seed": st.integers(0, 2**16),
    }
)


@PROPS
@given(game=games(), knob=knobs)
def test_gtg_keeps_its_documented_guarantees(game: Game, knob: dict[str, float]) -> None:
    calls: list[int] = []
    est = gtg_shapley(game.n, game.utility(calls), **knob)  # type: ignore[arg-type]
    exact = shapley_by_orderings(game)
    u_empty, u_all = float(game.table[0]), float(game.table[-1])
    assert (est.utility_empty, est.utility_all) == (u_empty, u_all)
    assert len(set(calls)) == len(calls) == est.evaluations <= 2**game.n  # memoised
    gain = u_all - u_empty
    # between-round truncation: all 0 exactly when |U(N) − U(∅)| < round_threshold
    assert est.round_truncated == (abs(gain) < knob["round_threshold"])
    if est.round_truncated:
        assert not est.values.any() and est.permutations == 0 and est.evaluations <= 2
        LOG.checked("round truncated")
        return
    # whole guided cycles: at least one, at most max_permutations beyond the first
    n = game.n
    assert est.permutations % n == 0 and n <= est.permutations <= max(n, knob["max_permutations"])
    # efficiency within eps (exact up to rounding without within-round truncation)
    eff = abs(float(est.values.sum()) - gain)
    assert eff < knob["eps"] + ROUNDING, (est.values, gain)
    LOG.record(f"efficiency, eps={knob['eps']}", eff)
    # null players: exactly 0
    for i in game.nulls:
        assert est.values[i] == 0.0
    if knob["eps"] == 0.0 and (n <= 2 or game.kind == "additive"):
        # exact: both orderings of two players per cycle; an additive game's marginals
        dev = float(np.max(np.abs(est.values - exact)))
        assert dev <= ROUNDING, (est.values, exact)
        LOG.record("exact (n <= 2 or additive)", dev)
        if game.twins is not None:
            i, j = game.twins
            assert abs(est.values[i] - est.values[j]) <= ROUNDING
    elif n == 1:  # one permutation per cycle: U(N) − U(∅), or 0 when truncated within eps
        assert est.values[0] == (gain if abs(gain) >= knob["eps"] else 0.0)
    LOG.checked("gtg guarantees")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    game=games(),
    cycles=st.sampled_from([50, 200]),
    seed=st.integers(0, 2**16),
)
def test_gtg_without_truncation_is_within_hoeffding_of_exact(
    game: Game, cycles: int, seed: int
) -> None:
    n = game.n
    permutations = cycles * n  # min = max: C fixed in advance, so Hoeffding applies as is
    est = gtg_shapley(
        n,
        game.utility(),
        eps=0.0,
        min_permutations=permutations,
        max_permutations=permutations,
        seed=seed,
    )
    assert est.permutations == permutations
    exact = shapley_by_orderings(game)
    for i in range(n):
        m = game.marginals(i)
        width = float(m.max() - m.min())
        bound = width * math.sqrt(math.log(2 * n / HOEFFDING_DELTA) / (2 * cycles))
        dev = abs(float(est.values[i]) - float(exact[i]))
        assert dev <= bound + ROUNDING, (i, est.values, exact, bound)
        if width > ROUNDING:
            LOG.record(f"|gtg - exact| / (b - a), C={cycles}", dev / width)
    LOG.checked("hoeffding")


def test_gtg_samples_whole_cycles_even_when_capped_below_one() -> None:
    """``max_permutations`` below ``n`` still lets every client lead once (one cycle), and a
    cap that ends mid-cycle ends at the cycle before: two players, 31 permutations at most,
    no convergence (tolerance 0) -> 30, which are both orderings 15 times: exact values."""
    leaders: list[int] = []

    def utility(members: frozenset[int]) -> float:
        if len(members) == 1:
            leaders.extend(members)
        return float(len(members) ** 2)

    est = gtg_shapley(5, utility, eps=0.0, min_permutations=1, max_permutations=3)
    assert est.permutations == 5 and sorted(set(leaders)) == [0, 1, 2, 3, 4]
    table = {0: 0.0, 1: 0.3, 2: 0.9, 3: 0.5}  # φ_0 = (0.3 + 0.5 − 0.9) / 2, φ_1 = 0.55
    two = gtg_shapley(
        2,
        lambda s: table[sum(1 << i for i in s)],
        eps=0.0,
        tolerance=0.0,
        min_permutations=30,
        max_permutations=31,
    )
    assert two.permutations == 30
    assert two.values == pytest.approx([-0.05, 0.55], abs=ROUNDING)
