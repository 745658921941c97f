"""trimmed_mean's comparator-network kernel against the definition: sort every column
(``np.sort``, float64 sums), cut ``c`` values from each end, average the rest (Yin et al. 2018,
Definition 2). Random finite matrices with ties and outliers many orders of magnitude larger
than the kept values, every ``n`` from 1 to 40 and several cuts; chunking, threads and a row
subset change nothing."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest

from flstore_core.workloads.trimmed_mean import trimmed_mean_rows


def reference(x: npt.NDArray[np.float32], cut: int) -> npt.NDArray[np.float64]:
    n = x.shape[0]
    kept = np.sort(x.astype(np.float64), axis=0)[cut : n - cut]
    out: npt.NDArray[np.float64] = kept.sum(axis=0) / (n - cut * 2)
    return out


def assert_trimmed(got: npt.NDArray[np.float32], x: npt.NDArray[np.float32], cut: int) -> None:
    """Within 1e-6 of the reference, plus float64 rounding of the kept values' magnitudes (a
    mean of kept values that cancel has no relative precision to speak of)."""
    n = x.shape[0]
    want = reference(x, cut)
    scale = np.abs(np.sort(x, axis=0)[cut : n - cut]).max(axis=0).astype(np.float64)
    err = np.abs(got.astype(np.float64) - want)
    assert np.all(err <= 1e-6 * np.abs(want) + 1e-12 * scale), float(err.max())


def tied_matrix(rng: np.random.Generator, n: int, d: int) -> npt.NDArray[np.float32]:
    """Small integers (many ties), some scaled to 1e30 or 1e-3: outliers the cut must remove
    without costing the kept values digits."""
    values = rng.integers(-3, 4, size=(n, d)).astype(np.float32)
    scale = rng.choice(np.array([1.0, 1.0, 1e30, 1e-3], np.float32), size=(n, d))
    out: npt.NDArray[np.float32] = values * scale
    return out


@pytest.mark.parametrize("n", range(1, 41))
def test_the_kernel_equals_sorting_every_column(n: int) -> None:
    rng = np.random.default_rng(n)
    cuts = sorted({0, 1, 2, n // 4, (n - 1) // 2} & set(range((n + 1) // 2)))
    for cut in cuts:
        for x in (tied_matrix(rng, n, 97), rng.standard_normal((n, 97)).astype(np.float32)):
            assert_trimmed(trimmed_mean_rows(x, cut, chunk_elements=n * 16), x, cut)


@pytest.mark.parametrize(("n", "cut"), [(10, 1), (10, 2), (10, 3), (10, 4), (7, 3), (33, 5)])
def test_the_network_leaves_the_kept_ranks_on_the_middle_wires(n: int, cut: int) -> None:
    """By the 0-1 principle a comparator network sorts every input if it sorts every 0-1 input;
    here: every 0-1 column leaves exactly the middle ranks' values on the middle wires (random
    0-1 columns for n > 16, all of them otherwise)."""
    rng = np.random.default_rng(0)
    if n <= 16:
        cols = ((np.arange(2**n)[None, :] >> np.arange(n)[:, None]) & 1).astype(np.float32)
    else:
        cols = rng.integers(0, 2, size=(n, 4096)).astype(np.float32)
    got = trimmed_mean_rows(cols, cut)
    np.testing.assert_array_equal(got, reference(cols, cut).astype(np.float32))


def test_chunks_threads_and_a_row_subset_change_nothing() -> None:
    rng = np.random.default_rng(3)
    x = tied_matrix(rng, 12, 5003)
    whole = trimmed_mean_rows(x, 3, chunk_elements=10**9)
    for chunk in (1, 12 * 7, 12 * 1000):
        for threads in (1, 2, 3):
            got = trimmed_mean_rows(x, 3, chunk_elements=chunk, threads=threads)
            np.testing.assert_array_equal(got, whole)
    rows = [11, 0, 4, 7, 2, 9, 5]
    subset = trimmed_mean_rows(x, 2, rows=rows, threads=2)
    np.testing.assert_array_equal(subset, trimmed_mean_rows(np.ascontiguousarray(x[rows]), 2))
    assert_trimmed(subset, x[rows], 2)


def test_a_cut_too_large_for_the_rows_is_refused() -> None:
    x = np.zeros((4, 3), np.float32)
    with pytest.raises(ValueError, match="cannot cut 2"):
        trimmed_mean_rows(x, 2)
    with pytest.raises(ValueError, match="cannot cut 1"):
        trimmed_mean_rows(x, 1, rows=[0, 1])
