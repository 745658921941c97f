"""The benchmarks' ``--network aws|none|PATH`` flag and the JSON's ``network`` object."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from benchmarks.report import add_network_flag, network_json, parser
from lambdas.local_runtime.network import NetworkModel


def flags() -> argparse.ArgumentParser:
    p = parser("test")
    add_network_flag(p)
    return p


def test_off_by_default_and_none_is_off() -> None:
    assert flags().parse_args([]).network is None
    assert flags().parse_args(["--network", "none"]).network is None
    assert network_json(None) == {"name": "none"}


def test_aws_is_the_published_table_with_its_sources() -> None:
    model = flags().parse_args(["--network", "aws"]).network
    assert model == NetworkModel()
    out = network_json(model)
    assert out["name"] == "aws"
    hops = {row["field"]: row for row in out["hops"]}
    assert hops["s3_get_ms"]["value"] == 27.0 and "Skyrise" in hops["s3_get_ms"]["source"]


def test_a_file_overrides_fields(tmp_path: Path) -> None:
    path = tmp_path / "net.json"
    path.write_text(json.dumps({"vpc_round_trip_ms": 50, "elasticache_get_ms": 30}))
    model = flags().parse_args(["--network", str(path)]).network
    assert isinstance(model, NetworkModel)
    assert (model.vpc_round_trip_ms, model.elasticache_get_ms, model.name) == (50, 30, "custom")
    assert model.s3_get_ms == NetworkModel().s3_get_ms


@pytest.mark.parametrize("content", ['{"warp_ms": 1}', '{"s3_get_ms": -1}', "[1]", None])
def test_bad_models_are_usage_errors(
    tmp_path: Path, content: str | None, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "net.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(SystemExit) as exc:
        flags().parse_args(["--network", str(path)])
    assert exc.value.code == 2
    assert "--network" in capsys.readouterr().err


@pytest.mark.parametrize("script", ["paper", "warm_vs_cold", "novel"])
def test_each_benchmark_takes_the_flag(script: str) -> None:
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [sys.executable, str(root / "benchmarks" / f"{script}.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=root,
    )
    assert out.returncode == 0, out.stderr
    assert "--network aws|none|PATH" in out.stdout
