"""Shared fixtures: one moto S3 server per test session, a fresh bucket per test.

Tests live by kind: ``tests/unit/`` runs in this process (a moto server on a thread at most),
``tests/stack/`` starts processes (a local stack, Lambda instances, Redis, ``flwr run``, a
benchmark). Every test under ``tests/stack/`` carries the ``stack`` marker, so ``make test-fast``
(``pytest -m "not stack"``) is the inner loop and ``make test`` runs everything."""

from __future__ import annotations

import itertools
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from flstore_core.cache.round_data import RoundData
from flstore_core.data.codec import TensorSpec, Update
from flstore_core.storage.object_store import ObjectStore
from lambdas.local_runtime.s3_server import LocalS3

_buckets = itertools.count()
REPO = Path(__file__).resolve().parents[1]


def run_quick_benchmark(name: str, out: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    """Run ``benchmarks/{name}.py --quick --repetitions 1 --json out`` from the repository root
    and return the finished process (its output captured as text; the caller checks it)."""
    return subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / f"{name}.py"),
            "--quick",
            "--repetitions",
            "1",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        check=False,
    )


# Unit modules that take seconds a test, not milliseconds: they train digits models, run the
# Pulumi program or build Lambda zips, or read rounds sharded over many in-process nodes (each
# a measured >= 2 s a test on a quiet 2-core host). Marked ``slow``: ``make test`` runs them,
# ``make test-fast`` leaves them out with the stack, property and fuzz tests.
SLOW_MODULES = frozenset(
    {
        "test_workloads_model",
        "test_model_evaluations",
        "test_tensor_order",
        "test_batchnorm_job",
        "test_sharded_clients",
        "test_cli_push",
        "test_infra",
        "test_packaging",
        "test_router_artifact",
        "test_trimmed_kernel",
        "test_ingest_trust",
        "test_spec_versions",
        "test_local_s3_persist",
        "test_prefetch_artifacts",
        "test_fltrust_lean",
        "test_rounds_param",
        "test_request_bounds",
    }
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark tests by kind from what they are: ``stack`` for every test under ``tests/stack/``,
    ``property`` for hypothesis tests, ``fuzz`` for the fuzzing modules (``*fuzz*``, the
    schemathesis run), ``slow`` for :data:`SLOW_MODULES`."""
    stack_dir = Path(__file__).resolve().parent / "stack"
    for item in items:
        path = Path(str(item.path)).resolve()
        if stack_dir in path.parents:
            item.add_marker(pytest.mark.stack)
        if getattr(getattr(item, "obj", None), "is_hypothesis_test", False):
            item.add_marker(pytest.mark.property)
        if "fuzz" in path.stem or "schemathesis" in path.stem:
            item.add_marker(pytest.mark.fuzz)
        if path.stem in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[LocalS3]:
    with LocalS3() as server:
        yield server


@pytest.fixture
def store(s3_server: LocalS3) -> Iterator[ObjectStore]:
    st = ObjectStore(f"test-{next(_buckets)}", endpoint_url=s3_server.url)
    st.ensure_bucket()
    yield st
    st.close()


def small_update(seed: int = 0, *, scale: float = 1.0, **meta: object) -> Update:
    """A tiny CNN-shaped update with mixed dtypes, deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    tensors = {
        "conv.weight": (rng.standard_normal((4, 1, 3, 3)) * scale).astype(np.float32),
        "conv.bias": (rng.standard_normal(4) * scale).astype(np.float32),
        "bn.num_batches_tracked": np.array(seed, dtype=np.int64),
        "fc.weight": (rng.standard_normal((10, 16)) * scale).astype(np.float32),
        "fc.bias": (rng.standard_normal(10) * scale).astype(np.float32),
    }
    return Update(tensors, num_examples=10 + seed, metrics={"loss": 0.5 + seed}, **meta)  # type: ignore[arg-type]


def make_round(
    weights: npt.ArrayLike,
    *,
    base: npt.ArrayLike | None = None,
    num_examples: Sequence[int] | None = None,
) -> RoundData:
    """A model-less RoundData over the rows of ``weights`` (copied: the base is subtracted)."""
    x = np.array(weights, dtype=np.float32)
    n, d = x.shape
    return RoundData(
        "j",
        0,
        [f"c{i}" for i in range(n)],
        x,
        (TensorSpec("w", "F32", (d,)),),
        np.asarray(num_examples if num_examples is not None else [10] * n, dtype=np.int64),
        [{} for _ in range(n)],
        base=None if base is None else np.asarray(base, dtype=np.float32),
    )
