"""paper.py's loopback figures beside the modelled ones: ``p50_local`` per run."""

from __future__ import annotations

from typing import Any

import pytest

from benchmarks.paper import Measurements, print_network, with_local
from benchmarks.paper_accounting import Sample


def sample(ms: float) -> Sample:
    return Sample(ms, ms / 2, 1, 0, 1e-6, None, {})


def run(p50: float | None) -> dict[str, Any]:
    return {"workload": "fedavg", "system": "cache-agg", "p50": p50}


def test_without_a_model_the_run_was_local() -> None:
    assert with_local(run(12.0), None)["p50_local"] == 12.0


def test_with_a_model_p50_local_is_the_loopback_pass_median() -> None:
    local = Measurements()
    local.samples[("fedavg", "cache-agg")] = [sample(3.0), sample(5.0), sample(100.0)]
    out = with_local(run(40.0), local)
    assert out["p50"] == 40.0 and out["p50_local"] == 5.0
    assert out["samples_local_ms"] == [3.0, 5.0, 100.0]
    assert "error_local" not in out


def test_a_loopback_failure_is_kept_not_hidden() -> None:
    local = Measurements()
    local.errors[("fedavg", "cache-agg")] = "500 boom"
    out = with_local(run(40.0), local)
    assert out["p50_local"] is None and out["error_local"] == "500 boom"


def test_the_printout_shows_both(capsys: pytest.CaptureFixture[str]) -> None:
    runs = [
        {"workload": "fedavg", "system": s, "p50": 30.0 + i, "p50_local": 2.0 + i}
        for i, s in enumerate(("flstore-warm", "objstore-agg", "cache-agg"))
    ]
    print_network({"network": {"name": "aws"}, "runs": runs})
    out = capsys.readouterr().out
    assert "aws network model" in out and "30.0 (local 2.0)" in out and "32.0 (local 4.0)" in out
    print_network({"network": {"name": "none"}, "runs": runs})
    assert capsys.readouterr().out == ""
