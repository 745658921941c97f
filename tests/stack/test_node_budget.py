"""A cache node's budget is the memory its runtime leaves (ARCHITECTURE §3).

The node derives its budget from its function's memory, the local stack hands the *same* figure
to its nodes and to the router, ``flstore local up --cache-budget-mb`` sets it explicitly, and a
node serving only round-class math (cosine_select, fedavg, krum, trimmed_mean) never imports
torch or scikit-learn — on a job *with* a declared BatchNorm model, whose parameter/buffer split
comes from ``job.json``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import types
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
from typer.testing import CliRunner

from flstore_core import config, models
from flstore_core.cache import budget
from flstore_core.cache.node import CacheNode, default_budget
from flstore_core.cli import app
from flstore_core.data.codec import Update
from flstore_core.errors import ValidationError
from flstore_core.sdk.jobs import create_job
from flstore_core.storage.memory import MemoryBlobStore
from flstore_core.storage.object_store import ObjectStore
from lambdas.local_runtime import stack as stack_module
from lambdas.local_runtime.s3_server import LocalS3
from lambdas.local_runtime.stack import LocalStack, StackConfig

MiB = 2**20
ROOT = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------- the node's own budget


@pytest.mark.parametrize("memory_mb", [512, 3008, 10240])
def test_a_nodes_budget_is_its_memory_less_the_torch_runtime_and_working_memory(
    monkeypatch: pytest.MonkeyPatch, memory_mb: int
) -> None:
    monkeypatch.delenv(config.CACHE_BUDGET_BYTES.name, raising=False)
    monkeypatch.setenv(config.LAMBDA_MEMORY_MB.name, str(memory_mb))
    runtime, working = budget.RUNTIME_MB["torch"], budget.WORKING_MB
    assert default_budget() == (memory_mb - runtime - working) * MiB
    # data + runtime + one request's working memory is exactly the function's memory
    assert default_budget() // MiB + runtime + working == memory_mb


def test_an_explicit_budget_wins_over_the_functions_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(config.LAMBDA_MEMORY_MB.name, "512")
    monkeypatch.setenv(config.CACHE_BUDGET_BYTES.name, str(7 * MiB))
    assert default_budget() == 7 * MiB
    node = CacheNode(ObjectStore(blobs=MemoryBlobStore()))
    assert node.stats()["budget_bytes"] == 7 * MiB


def test_a_function_too_small_for_its_runtime_keeps_the_floor(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(config.CACHE_BUDGET_BYTES.name, raising=False)
    monkeypatch.setenv(config.LAMBDA_MEMORY_MB.name, "256")  # < 288 MB of torch runtime
    assert default_budget() == budget.MIN_BUDGET_MB * MiB


def test_the_runtime_figures_grow_with_the_libraries_imported() -> None:
    # scikit-learn brings scipy; torch is the largest (the benchmark measured 67/160/274 MB)
    base, sklearn, torch = (budget.RUNTIME_MB[k] for k in ("base", "sklearn", "torch"))
    assert 0 < base < sklearn < torch
    assert all(mb % 16 == 0 for mb in budget.RUNTIME_MB.values())


# ---------------------------------------------------------------------- the local stack


def test_a_stack_without_a_budget_gives_its_nodes_what_their_memory_leaves(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(config.CACHE_BUDGET_BYTES.name, raising=False)
    cfg = StackConfig(memory_mb=512)
    expected = (512 - budget.RUNTIME_MB["torch"] - budget.WORKING_MB) * MiB
    assert cfg.node_budget == expected == budget.stack_budget(512)


def test_a_stack_keeps_an_explicit_budget() -> None:
    assert StackConfig(memory_mb=512, budget_bytes=24 * MiB).node_budget == 24 * MiB


@pytest.mark.parametrize("budget_bytes", [0, -1, 512 * MiB, 600 * MiB])
def test_a_budget_that_is_not_positive_or_not_below_the_memory_is_refused(
    budget_bytes: int,
) -> None:
    with pytest.raises(ValidationError, match="does not fit a node of 512 MB"):
        StackConfig(memory_mb=512, budget_bytes=budget_bytes)


def test_the_stack_gives_its_nodes_and_its_router_the_same_budget(s3_server: LocalS3) -> None:
    cfg = StackConfig(
        nodes=2,
        replication=1,
        memory_mb=512,
        budget_bytes=24 * MiB,
        bucket="budget-stack",
        s3_endpoint=s3_server.url,
    )
    with LocalStack(cfg) as stack:
        assert stack.router is not None
        assert stack.router.config.cache_budget_bytes == 24 * MiB
        for i in range(2):
            assert stack.router.node_op(i, {"op": "stats"})["budget_bytes"] == 24 * MiB


# ---------------------------------------------------------------------- flstore local up


class RecordingStack:
    """Stands in for LocalStack: records its config and starts nothing."""

    configs: ClassVar[list[StackConfig]] = []

    def __init__(self, cfg: StackConfig, workdir: Any = None) -> None:
        RecordingStack.configs.append(cfg)
        self.gateway_url = self.lambda_endpoint = self.s3_endpoint = self.token = "-"
        self.data_dir = cfg.data_dir

    def restored_jobs(self) -> list[str]:
        return []

    def __enter__(self) -> RecordingStack:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> list[StackConfig]:
    import flstore_core.cli.local as cli_local

    def interrupt(_: float) -> None:
        raise KeyboardInterrupt

    RecordingStack.configs = []
    monkeypatch.setattr(stack_module, "LocalStack", RecordingStack)
    monkeypatch.setattr(cli_local, "time", types.SimpleNamespace(sleep=interrupt))
    monkeypatch.setattr(signal, "signal", lambda *a: None)  # keep pytest's SIGTERM handler
    return RecordingStack.configs


def test_local_up_passes_the_cache_budget_to_the_stack(recorded: list[StackConfig]) -> None:
    result = CliRunner().invoke(
        app, ["local", "up", "--memory-mb", "512", "--cache-budget-mb", "40"]
    )
    assert result.exit_code == 0, result.output
    assert [(c.memory_mb, c.budget_bytes) for c in recorded] == [(512, 40 * MiB)]


def test_local_up_without_a_budget_leaves_it_to_the_memory(recorded: list[StackConfig]) -> None:
    result = CliRunner().invoke(app, ["local", "up", "--memory-mb", "1024"])
    assert result.exit_code == 0, result.output
    assert [(c.memory_mb, c.budget_bytes) for c in recorded] == [(1024, None)]


@pytest.mark.parametrize("mb", ["512", "600"])
def test_local_up_refuses_a_budget_not_below_the_memory(
    recorded: list[StackConfig], mb: str
) -> None:
    result = CliRunner().invoke(app, ["local", "up", "--memory-mb", "512", "--cache-budget-mb", mb])
    assert result.exit_code == 2
    assert "--cache-budget-mb" in result.output and "does not fit" in result.output
    assert recorded == []


def test_local_up_refuses_a_budget_that_is_not_positive(recorded: list[StackConfig]) -> None:
    result = CliRunner().invoke(app, ["local", "up", "--cache-budget-mb", "0"])
    assert result.exit_code == 2 and "--cache-budget-mb" in result.output
    assert recorded == []


# ---------------------------------------------------------------------- no torch on round nodes

# a cold node process: the deployed handler module, four round-class requests, then what it
# imported and the parameter split it used
NODE_PROCESS = """
import json, sys
import lambdas.cache_node as cn
answers = {}
for workload, params in [
    ("cosine_select", {"k": 2}), ("fedavg", {}), ("krum", {"f": 1}), ("trimmed_mean", {"beta": 0.2})
]:
    answer = cn.NODE.handle(
        {"op": "run", "workload": workload, "job": "bn", "round": 0, "params": params}
    )
    answers[workload] = answer.get("result", answer)
print(json.dumps({
    "answers": answers,
    "modules": sorted(m for m in ("torch", "sklearn", "scipy") if m in sys.modules),
}))
"""


def test_round_math_on_a_model_job_imports_neither_torch_nor_scikit_learn(
    s3_server: LocalS3,
) -> None:
    store = ObjectStore("no-torch-node", endpoint_url=s3_server.url)
    store.ensure_bucket()
    create_job(store, "bn", model="digits_bn_cnn")  # torch here, at job create: not on the node
    parameters = store.get_job_spec("bn").parameters
    assert parameters is not None and "bn1.running_mean" not in parameters
    base = models.state_arrays(models.build("digits_bn_cnn", seed=0))
    store.put_initial("bn", Update(dict(base)))
    rng = np.random.default_rng(0)
    updates, entries = [], []
    for i in range(5):
        t = {
            n: (a + 0.01 * rng.standard_normal(a.shape)).astype(a.dtype) if n in parameters else a
            for n, a in base.items()
        }
        t["bn1.running_var"] = t["bn1.running_var"] * (1000.0 * (i + 1))  # buffers: ignored
        updates.append(t)
        entries.append(store.put_update("bn", 0, f"c{i}", Update(t, num_examples=10 + i)))
    store.commit_round("bn", 0, entries)

    env = dict(
        os.environ,
        **{
            config.S3_ENDPOINT.name: s3_server.url,
            config.BUCKET.name: "no-torch-node",
            config.CACHE_BUDGET_BYTES.name: str(64 * MiB),
        },
    )
    out = subprocess.run(
        [sys.executable, "-c", NODE_PROCESS], env=env, cwd=ROOT, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["modules"] == []
    for answer in got["answers"].values():
        assert "error" not in answer, answer
    # the scores were taken over the recorded parameters: cosine to the mean of the deltas on
    # the trainable tensors only (float64 reference), so the ×1000 running variances don't count
    deltas = np.stack(
        [
            np.concatenate([(u[n] - base[n]).astype(np.float64).ravel() for n in parameters])
            for u in updates
        ]
    )
    mean = deltas.mean(axis=0)
    cos = deltas @ mean / (np.linalg.norm(deltas, axis=1) * np.linalg.norm(mean))
    scores = got["answers"]["cosine_select"]["scores"]
    np.testing.assert_allclose([scores[f"c{i}"] for i in range(5)], cos, rtol=1e-4)
