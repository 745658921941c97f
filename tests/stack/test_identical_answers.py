"""Identical answers everywhere: the same request gives byte-identical
``json.dumps(result, sort_keys=True)`` whatever the BLAS thread count of the process that
computed it, and from every node, cold or warm.

OpenBLAS splits a GEMV's (and, from ~40 rows, a SYRK's) reduction over its threads, so the
float32 sums of a Gram matrix or a weighted mean depend on how many threads ran them (measured:
``x @ b`` on 10 x 300k differs between 1 and 2 threads; ``x @ x.T`` on 40 x 100k between every
count); a node on a host with other cores, or started with another ``OMP_NUM_THREADS``, would
answer other bits. Reference: the same computation at one thread.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

from flstore_core.cache.round_data import ArtifactStats, RoundData
from flstore_core.data.codec import TensorSpec
from flstore_core.workloads import get

WORKLOADS = ("cosine_select", "krum", "fedavg", "trimmed_mean", "multi_krum")


def round_data(n: int, cols: int, with_base: bool, seed: int = 0) -> RoundData:
    rng = np.random.default_rng(seed)
    base = rng.standard_normal(cols).astype(np.float32) if with_base else None
    matrix = (rng.standard_normal((n, cols)) * 0.01).astype(np.float32)
    specs = [TensorSpec("w", "F32", (cols - 10,)), TensorSpec("b", "F32", (10,))]
    return RoundData(
        "j",
        0,
        [f"c{i:02d}" for i in range(n)],
        matrix,
        specs,
        np.arange(1, n + 1, dtype=np.float64),
        [{} for _ in range(n)],
        base=base,
        stats=ArtifactStats(),
    )


def answers(n: int, cols: int, with_base: bool) -> dict[str, Any]:
    """Every workload's result JSON, each artifact's bytes, on a fresh round."""
    data = round_data(n, cols, with_base)
    out: dict[str, Any] = {}
    for name in WORKLOADS:
        workload = get(name)
        result = workload.run(data, workload.validate({})).result
        out[name] = json.dumps(result, sort_keys=True, default=str)
    vector = np.linspace(-1, 1, data.matrix.shape[1], dtype=np.float32)
    out["gram"] = data.gram(True).tobytes() + data.gram(False).tobytes()
    out["distances"] = data.distances().tobytes()
    out["dots_with"] = data.dots_with(vector).tobytes()
    out["sq_norm_of"] = repr(data.sq_norm_of(vector))
    out["weighted_mean"] = data.weighted_mean(np.arange(1.0, n + 1)).tobytes()
    return out


@pytest.mark.parametrize(("n", "cols", "with_base"), [(10, 300_000, True), (44, 60_000, False)])
def test_answers_do_not_depend_on_blas_threads(n: int, cols: int, with_base: bool) -> None:
    with threadpool_limits(1, user_api="blas"):
        reference = answers(n, cols, with_base)
    for threads in (2, 3):
        with threadpool_limits(threads, user_api="blas"):
            got = answers(n, cols, with_base)
        differing = [k for k in reference if got[k] != reference[k]]
        assert differing == [], f"{threads} BLAS threads change {differing}"


def test_every_node_cold_or_warm_answers_the_same_bytes(s3_server: Any) -> None:
    """The same request run on each node of a local stack — cold (evicted), warm, and cold again
    after its instance is killed — gives the same ``json.dumps(result, sort_keys=True)``."""
    from lambdas.local_runtime.stack import LocalStack, StackConfig
    from tests.conftest import small_update

    config = StackConfig(
        nodes=2, replication=2, memory_mb=1024, bucket="identical", s3_endpoint=s3_server.url
    )
    with LocalStack(config) as stack:
        assert stack.store is not None and stack.router is not None and stack.lam is not None
        stack.store.put_initial("same", small_update(99))
        for i in range(6):
            stack.store.put_update("same", 0, f"c{i}", small_update(i))
        stack.store.commit_round("same", 0)
        seen: dict[str, set[str]] = {name: set() for name in ("cosine_select", "krum")}
        for node in range(2):
            for step in ("cold", "warm", "killed"):
                if step == "cold":
                    stack.router.node_op(node, {"op": "evict", "all": True})
                if step == "killed":
                    stack.lam.kill_instances(stack.node_function(node))
                for name in seen:
                    event = {"op": "run", "workload": name, "job": "same", "round": 0}
                    answer = stack.router.node_op(node, {**event, "params": {}})
                    seen[name].add(json.dumps(answer["result"], sort_keys=True))
        assert {name: len(results) for name, results in seen.items()} == dict.fromkeys(seen, 1)
