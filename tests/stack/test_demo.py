"""A reduced `flstore demo`: examples/flower-app run with `flwr run` feeding FLStore, then the
catalogue over HTTP."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
from pathlib import Path
from typing import Any

import pytest

from evaluation.demo import run_demo

Report = tuple[dict[str, Any], Path, str]

# the module's fixture runs the whole demo: the Flower run (about 2 min), the untimed warm-up on
# round 0, and a re-warm of the timed shards before every flstore-first sample (0.5-2.5 s each)
pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Report:
    out = tmp_path_factory.mktemp("demo-out")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
        rep = run_demo(clients=8, rounds=4, repetitions=1, out=str(out))
    return rep, out, printed.getvalue()


def test_every_round_of_the_flower_run_is_committed(report: Report) -> None:
    rep, _, _ = report
    assert rep["flower"]["committed_rounds"] == [0, 1, 2, 3]
    assert rep["flower"]["accuracy"][-1] > 0.6


def test_the_malicious_client_is_flagged(report: Report) -> None:
    rep, _, _ = report
    (bad,) = rep["flower"]["malicious"]
    assert rep["flower"]["names"][bad] == "client-07"  # the last of 8 partitions attacks
    results = {n: w["result"] for n, w in rep["workloads"].items() if "result" in w}
    assert results["malicious_cosine"]["flagged"] == [bad]
    krum = results["krum"]["scores"]
    assert max(krum, key=krum.get) == bad
    assert results["feddebug"]["flagged"] == [bad]


def test_every_workload_answered_on_every_system(report: Report) -> None:
    rep, out, _ = report
    for name, row in rep["workloads"].items():
        assert "error" not in row, (name, row)
        assert {"flstore-first", "flstore-repeat", "objstore-agg"} <= set(row["systems"]), name
        assert "disagree" not in row, (name, row.get("disagree"))
    saved = json.loads((out / "report.json").read_text())
    assert set(saved["workloads"]) == set(rep["workloads"])
    assert (out / "latency.png").stat().st_size > 1000
    assert (out / "flower" / "flwr-run.log").exists()


def test_the_superlink_it_started_is_stopped(report: Report) -> None:
    rep, _, _ = report
    with pytest.raises(ProcessLookupError):
        os.kill(rep["flower"]["superlink_pid"], 0)


def test_the_output_has_no_warning_or_debug_lines(report: Report) -> None:
    _, _, printed = report
    assert "Flower run:" in printed
    assert not [line for line in printed.splitlines() if re.search(r"\b(WARNING|DEBUG)\b", line)]


def test_first_requests_are_computed_and_repeats_memoised(report: Report) -> None:
    rep, out, printed = report
    for name, row in rep["workloads"].items():
        # every flstore-first sample came after the round was re-warmed and found no memo entry
        # (the nodes' count of reused answers did not move); every repeat was a memo lookup
        assert row["memo_hits"] == {"flstore-first": 0, "flstore-repeat": row["repetitions"]}, name
    saved = json.loads((out / "report.json").read_text())
    assert set(saved["columns"]) == {"flstore-first", "flstore-repeat", "objstore-agg", "cache-agg"}
    assert "flstore-first: FLStore, the first request" in printed
