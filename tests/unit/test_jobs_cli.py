"""Declaring jobs (Python API and `flstore job create`) and the CLI's offline commands."""

from __future__ import annotations

import json

import numpy as np
import pytest
import safetensors.numpy
from typer.testing import CliRunner

from flstore_core.cli import app
from flstore_core.data.codec import parse_precision
from flstore_core.errors import ValidationError
from flstore_core.routing.auth import TokenTable
from flstore_core.sdk.jobs import create_job
from flstore_core.storage.object_store import ObjectStore

runner = CliRunner()


def _validation_file(tmp_path, shape=(5, 1, 8, 8)) -> str:  # type: ignore[no-untyped-def]
    path = tmp_path / "val.safetensors"
    x = np.random.default_rng(0).random(shape).astype(np.float32)
    y = np.arange(shape[0], dtype=np.int64) % 10
    path.write_bytes(safetensors.numpy.save({"x": x, "y": y}))
    return str(path)


def test_create_job_declares_model_precision_and_validation(store: ObjectStore, tmp_path) -> None:  # type: ignore[no-untyped-def]
    spec = create_job(
        store, "j", model="digits_cnn", precision="bf16", validation=_validation_file(tmp_path)
    )
    assert (spec.model, spec.precision) == ("digits_cnn", "bfloat16")
    x, y = store.view().get_validation_set("j")
    assert x.shape == (5, 1, 8, 8) and list(y) == [0, 1, 2, 3, 4]


def test_bad_declarations_write_nothing(store: ObjectStore, tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValidationError, match="unknown model"):
        create_job(store, "j", model="gpt-9")
    with pytest.raises(ValidationError, match="takes"):
        create_job(
            store, "j", model="digits_cnn", validation=_validation_file(tmp_path, (5, 3, 32, 32))
        )
    with pytest.raises(ValidationError, match="precision"):
        create_job(store, "j", precision="int4")
    assert not store.job_exists("j")


def test_precision_aliases() -> None:
    assert parse_precision("BF16") == "bfloat16" and parse_precision("fp16") == "float16"


def test_cli_job_create_uses_the_configured_store(
    store: ObjectStore, s3_server, tmp_path, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("FLSTORE_S3_ENDPOINT", s3_server.url)
    monkeypatch.setenv("FLSTORE_BUCKET", store.bucket)
    res = runner.invoke(
        app,
        [
            "job",
            "create",
            "cli-job",
            "--model",
            "digits_cnn",
            "--validation",
            _validation_file(tmp_path),
        ],
    )
    assert res.exit_code == 0, res.output
    assert store.get_job_spec("cli-job").model == "digits_cnn"
    bad = runner.invoke(app, ["job", "create", "Bad_Id"])
    assert bad.exit_code == 1 and "invalid job id" in bad.output


def test_token_new_prints_a_hash_entry_that_authenticates() -> None:
    res = runner.invoke(app, ["token", "new", "--job", "demo"])
    assert res.exit_code == 0
    token = res.output.split("keep it secret): ")[1].split()[0]
    entry = json.loads(res.output.strip().splitlines()[-1])
    grant = TokenTable(entry).authenticate(f"Bearer {token}")
    assert grant.allows("demo") and not grant.allows("other")


def test_help_lists_the_commands() -> None:
    res = runner.invoke(app, ["--help"])
    for command in ("demo", "local", "run", "rounds", "workloads", "stats", "job", "token"):
        assert command in res.output


def test_cli_ingest_stores_and_commits_a_dropped_round(
    store: ObjectStore, s3_server, tmp_path, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    from flstore_core.sdk.round_writer import RoundWriter
    from tests.conftest import small_update

    monkeypatch.setenv("FLSTORE_S3_ENDPOINT", s3_server.url)
    monkeypatch.setenv("FLSTORE_BUCKET", store.bucket)
    monkeypatch.chdir(tmp_path)
    RoundWriter(tmp_path / "drop", "cli-ingest").write_round(
        0, {f"c{i}": small_update(i) for i in range(3)}
    )
    res = runner.invoke(app, ["ingest", str(tmp_path / "drop"), "--job", "cli-ingest", "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(
        res.stdout[res.stdout.index("\n{") + 1 :] if not res.stdout.startswith("{") else res.stdout
    )
    assert summary["updates_written"] == 3
    assert store.get_manifest("cli-ingest", 0).clients == ["c0", "c1", "c2"]
