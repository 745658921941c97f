"""benchmarks/scale.py starts: its options parse and its help names what it measures (the
full run takes minutes: ``make bench``; ``--quick`` is a seconds-long version)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_scale_benchmark_help() -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "scale.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    for option in ("--json", "--quick", "--budget-mb", "--strong-nodes", "--repetitions"):
        assert option in out
