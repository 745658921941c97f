"""`flstore push` and `flstore example`: per-client checkpoints into a committed round without
writing Python; validation files in every format; the CLI's human and --json output."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch
from rich.console import Console
from typer.testing import CliRunner

from flstore_core import models
from flstore_core.cli import app, identity_hint
from flstore_core.cli.stats import print_stats
from flstore_core.storage.object_store import ObjectStore

runner = CliRunner()


@pytest.fixture
def env(
    store: ObjectStore, s3_server: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> ObjectStore:
    """The CLI pointed at the test bucket, in an empty directory (no local stack)."""
    monkeypatch.setenv("FLSTORE_S3_ENDPOINT", s3_server.url)
    monkeypatch.setenv("FLSTORE_BUCKET", store.bucket)
    monkeypatch.chdir(tmp_path)
    return store


def _state(seed: int) -> dict[str, torch.Tensor]:
    return models.build("digits_cnn", seed=seed).state_dict()


def _declare(job: str = "j") -> None:
    res = runner.invoke(app, ["job", "create", job, "--model", "digits_cnn"])
    assert res.exit_code == 0, res.output


def _push(folder: Path, *args: str) -> Any:
    return runner.invoke(
        app, ["push", str(folder), "--job", "j", "--round", "0", "--no-prefetch", *args]
    )


def test_push_commits_torch_checkpoints_with_one_example_each(
    env: ObjectStore, tmp_path: Path
) -> None:
    _declare()
    folder = tmp_path / "r0"
    folder.mkdir()
    for i in range(3):
        torch.save(_state(i), folder / f"client-{i}.pt")
    res = _push(folder)
    assert res.exit_code == 0, res.output
    manifest = env.get_manifest("j", 0)
    assert manifest.clients == ["client-0", "client-1", "client-2"]
    assert {e.num_examples for e in manifest.updates.values()} == {1}
    row = env.read_round("j", 0)
    want = np.concatenate([v.numpy().ravel() for v in _state(1).values()]).astype(np.float32)
    assert np.allclose(np.sort(row.matrix[1]), np.sort(want))


def test_push_reads_every_format_and_keeps_safetensors_metadata(
    env: ObjectStore, tmp_path: Path
) -> None:
    _declare()
    folder = tmp_path / "r0"
    folder.mkdir()
    torch.save({"state_dict": _state(0)}, folder / "a.pth")
    safetensors.torch.save_file(
        _state(1), str(folder / "b.safetensors"), metadata={"num_examples": "7"}
    )
    arrays = {k: v.numpy() for k, v in _state(2).items()}
    (folder / "c.safetensors").write_bytes(safetensors.numpy.save(arrays))
    np.savez(folder / "d.npz", **arrays)
    (folder / "notes.txt").write_text("not a checkpoint")
    res = _push(folder, "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["clients"] == ["a", "b", "c", "d"]
    updates = env.get_manifest("j", 0).updates
    assert updates["b"].num_examples == 7 and updates["a"].num_examples == 1


@pytest.mark.parametrize("kind", ["csv", "json"])
def test_push_takes_examples_and_metrics_from_a_sidecar(
    env: ObjectStore, tmp_path: Path, kind: str
) -> None:
    _declare()
    folder = tmp_path / "r0"
    folder.mkdir()
    for c in ("x", "y"):
        torch.save(_state(0), folder / f"{c}.pt")
    meta = tmp_path / f"meta.{kind}"
    if kind == "csv":
        meta.write_text("client,num_examples,loss\nx,40,0.5\ny,60,0.25\n")
    else:
        meta.write_text(
            json.dumps(
                {
                    "x": {"num_examples": 40, "metrics": {"loss": 0.5}},
                    "y": {"num_examples": 60, "loss": 0.25},
                }
            )
        )
    res = _push(folder, "--meta", str(meta), "--metric", "epochs=2")
    assert res.exit_code == 0, res.output
    updates = env.get_manifest("j", 0).updates
    assert (updates["x"].num_examples, updates["y"].num_examples) == (40, 60)
    assert updates["y"].metrics == {"loss": 0.25, "epochs": 2.0}


def test_a_file_name_that_is_no_client_id_is_named_and_a_map_fixes_it(
    env: ObjectStore, tmp_path: Path
) -> None:
    _declare()
    folder = tmp_path / "r0"
    folder.mkdir()
    torch.save(_state(0), folder / "client 1.pt")
    res = _push(folder)
    assert res.exit_code == 1 and "client 1.pt" in res.output and "--clients" in res.output
    names = tmp_path / "names.json"
    names.write_text(json.dumps({"client 1.pt": "alice"}))
    assert _push(folder, "--clients", str(names)).exit_code == 0
    assert env.get_manifest("j", 0).clients == ["alice"]


def test_a_file_that_does_not_fit_the_model_is_refused_and_nothing_is_written(
    env: ObjectStore, tmp_path: Path
) -> None:
    _declare()
    folder = tmp_path / "r0"
    folder.mkdir()
    torch.save(_state(0), folder / "good.pt")
    bad = dict(_state(1))
    bad["fc2.weight"] = torch.zeros(3, 64)
    torch.save(bad, folder / "wrong.pt")
    res = _push(folder)
    text = " ".join(res.output.split())
    assert res.exit_code == 1
    assert (
        "wrong.pt" in text
        and "'fc2.weight' has shape [3, 64], model digits_cnn has [10, 64]" in text
    )
    assert env.find_manifest("j", 0) is None
    assert list(env.list_keys("jobs/j/rounds/")) == []


def test_a_checkpoint_holding_objects_is_refused_without_unpickling_them(
    env: ObjectStore, tmp_path: Path
) -> None:
    _declare()
    folder = tmp_path / "r0"
    folder.mkdir()
    torch.save({"w": torch.zeros(2), "extra": Path("x")}, folder / "evil.pt")
    res = _push(folder)
    assert res.exit_code == 1 and "evil.pt" in res.output and "weights_only" in res.output


@pytest.mark.parametrize("fmt", ["npz", "safetensors", "pt"])
def test_job_create_reads_validation_in_every_format(
    env: ObjectStore, tmp_path: Path, fmt: str
) -> None:
    x = np.zeros((4, 1, 8, 8), np.float32)
    y = np.arange(4, dtype=np.int64)
    path = tmp_path / f"val.{fmt}"
    if fmt == "npz":
        np.savez(path, x=x, y=y)
    elif fmt == "safetensors":
        path.write_bytes(safetensors.numpy.save({"x": x, "y": y}))
    else:
        torch.save({"x": torch.from_numpy(x), "y": torch.from_numpy(y)}, path)
    res = runner.invoke(
        app, ["job", "create", "j", "--model", "digits_cnn", "--validation", str(path)]
    )
    assert res.exit_code == 0, res.output
    assert list(env.view().get_validation_set("j")[1]) == [0, 1, 2, 3]


def test_job_create_prints_shapes_verbatim(env: ObjectStore, tmp_path: Path) -> None:
    path = tmp_path / "val.npz"
    np.savez(path, x=np.zeros((4, 3, 8, 8), np.float32), y=np.zeros(4, np.int64))
    res = runner.invoke(
        app, ["job", "create", "j", "--model", "digits_cnn", "--validation", str(path)]
    )
    assert res.exit_code == 1
    assert "[4, 3, 8, 8]" in res.output and "[n, 1, 8, 8]" in res.output


def test_job_create_refuses_a_model_its_rounds_do_not_fit_unless_forced(
    env: ObjectStore, tmp_path: Path
) -> None:
    _declare()
    folder = tmp_path / "r0"
    folder.mkdir()
    torch.save(_state(0), folder / "a.pt")
    assert _push(folder).exit_code == 0
    res = runner.invoke(app, ["job", "create", "j", "--model", "digits_bn_cnn"])
    assert res.exit_code == 1 and "round 0" in res.output and "--force" in res.output
    assert env.get_job_spec("j").model == "digits_cnn"
    forced = runner.invoke(app, ["job", "create", "j", "--model", "digits_bn_cnn", "--force"])
    assert forced.exit_code == 0, forced.output
    assert env.view().get_job_spec("j").model == "digits_bn_cnn"
    # a validation-only change keeps the declared model
    val = tmp_path / "val.npz"
    np.savez(val, x=np.zeros((2, 1, 8, 8), np.float32), y=np.zeros(2, np.int64))
    again = runner.invoke(app, ["job", "create", "j", "--validation", str(val), "--force"])
    assert again.exit_code == 0 and env.view().get_job_spec("j").model == "digits_bn_cnn"


def test_example_writes_a_job_that_pushes_as_printed(env: ObjectStore, tmp_path: Path) -> None:
    res = runner.invoke(app, ["example", "demo-data", "--clients", "4", "--rounds", "2", "--json"])
    assert res.exit_code == 0, res.output
    written = json.loads(res.stdout)
    again = runner.invoke(app, ["example", "again", "--clients", "4", "--rounds", "2"])
    assert "flstore push" in again.output
    first = torch.load("demo-data/round-1/client-03.pt", weights_only=True)
    second = torch.load("again/round-1/client-03.pt", weights_only=True)
    assert all(torch.equal(first[k], second[k]) for k in first)
    for command in written["commands"][:-1]:
        args = command.split()[1:]
        res = runner.invoke(app, [*args, "--no-prefetch"] if args[0] == "push" else args)
        assert res.exit_code == 0, (command, res.output)
    manifest = env.get_manifest("demo", 1)
    assert manifest.clients == ["client-00", "client-01", "client-02", "client-03"]
    assert (
        manifest.updates["client-00"].num_examples > 1
        and "loss" in manifest.updates["client-00"].metrics
    )


def test_errors_print_brackets_verbatim(env: ObjectStore) -> None:
    res = runner.invoke(app, ["run", "x", "--job", "j", "--param", "[n, 1, 8, 8]"])
    assert res.exit_code == 1 and "'[n, 1, 8, 8]' must be key=value" in res.output


class _FakeClient:
    def rounds(
        self, job: str, limit: int | None = None, after: int | None = None
    ) -> list[dict[str, Any]]:
        return [{"round": 0, "clients": ["a", "b"], "bytes": 1234}]

    def workloads(self) -> list[dict[str, Any]]:
        return [{"name": "oort_select", "class": "meta", "params": {}, "description": "[x]"}]

    def run(
        self, job: str, workload: str, round: int | None = None, **params: Any
    ) -> dict[str, Any]:
        meta = {"cache": "hit", "nodes": ["n0"], "latency_ms": 1.0, "cost_usd": 1e-6}
        return {"result": {"selected": ["[a]"]}, "meta": meta}


@pytest.mark.parametrize(
    ("args", "shown"),
    [
        (["rounds", "--job", "j"], "1,234"),
        (["workloads"], "[x]"),
        (["run", "oort_select", "--job", "j"], '["[a]"]'),
    ],
)
def test_data_commands_print_json_for_scripts(
    monkeypatch: pytest.MonkeyPatch, args: list[str], shown: str
) -> None:
    monkeypatch.setattr("flstore_core.cli._client", lambda url, token: _FakeClient())
    res = runner.invoke(app, [*args, "--json"])
    assert res.exit_code == 0, res.output
    json.loads(res.stdout)
    human = runner.invoke(app, args)
    assert "None" not in human.output and shown in human.output


def test_plan_speaks_mib_and_prints_json() -> None:
    args = ["plan", "--clients", "10", "--model", "digits_cnn", "--cache-budget-mb", "64"]
    res = runner.invoke(app, args)
    shown = " ".join(res.output.split())
    assert res.exit_code == 0 and "MiB in memory (" in shown and "node budget 64.0 MiB" in shown
    figures = json.loads(runner.invoke(app, [*args, "--json"]).stdout)
    assert figures["budget_mib"] == 64.0 and figures["blocks"] >= 1


def test_stats_table_fits_80_columns_in_mib() -> None:
    node = {
        "shards": ["demo/round/12", "demo/round/13/3of15", "demo/round/13/7of15"],
        "hits": 123456,
        "misses": 98765,
        "loads": 4321,
        "evictions": 321,
        "bytes_held": 2_920_000_000,
        "budget_bytes": 2785 * 2**20,
        "s3_gets": 1234567,
    }
    out = Console(file=io.StringIO(), width=80, record=True)
    print_stats([node] * 8, "flstore-local", out)
    text = out.export_text()
    assert max(len(line) for line in text.splitlines()) <= 80 and "…" not in text
    assert "2785.0" in text and "MiB" in text and "1234567" in text


def test_a_plain_checkpoint_dead_letter_says_which_metadata_to_add() -> None:
    hint = identity_hint("raw update file: kind 'update' needs 'client' and 'round'")
    assert hint is not None
    for needed in ("job", "round", "client", "num_examples", "__metadata__", "flstore push"):
        assert needed in hint
    assert identity_hint("truncated: the file ends inside its 8-byte header") is None


def test_ingest_of_a_plain_checkpoint_prints_the_hint_beside_its_dead_letter(
    env: ObjectStore, tmp_path: Path
) -> None:
    drop = tmp_path / "drop"
    drop.mkdir()
    safetensors.torch.save_file(_state(0), str(drop / "client-0.safetensors"))
    res = runner.invoke(app, ["ingest", str(drop), "--job", "j", "--no-prefetch"])
    text = " ".join(res.output.split())
    assert res.exit_code == 2, res.output
    assert "hint:" in text and "job, round, client and num_examples" in text
    assert "flstore push DIR --job J --round R" in text


def test_rounds_of_a_job_with_none_committed_says_so_and_why(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    class NoRounds:
        def rounds(
            self, job: str, limit: int | None = None, after: int | None = None
        ) -> list[dict[str, Any]]:
            return []

    monkeypatch.setattr("flstore_core.cli._client", lambda url, token: NoRounds())
    res = runner.invoke(app, ["rounds", "--job", "demo"])
    text = " ".join(res.output.split())
    assert res.exit_code == 0
    assert "job 'demo' holds no committed round yet" in text
    assert "jobs/demo/ingest/deadletter/" in text
    as_json = runner.invoke(app, ["rounds", "--job", "demo", "--json"])
    assert json.loads(as_json.output) == []
