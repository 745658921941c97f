"""`flstore local up` / `run` / `local down` as a user runs them, in a scratch directory."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from flstore_core.storage.object_store import ObjectStore
from tests.conftest import small_update

FLSTORE = [sys.executable, "-m", "flstore_core.cli"]


def local_up(cwd: Path) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    """`flstore local up` in ``cwd``, once its state file is written; the process and state."""
    up = subprocess.Popen(
        [*FLSTORE, "local", "up", "--nodes", "2", "--memory-mb", "1024"],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    state_file = cwd / ".flstore" / "local.json"
    deadline = time.monotonic() + 60
    while not state_file.exists():
        if up.poll() is not None or time.monotonic() > deadline:
            up.kill()
            raise AssertionError(f"local stack did not come up: {up.communicate()[0]}")
        time.sleep(0.1)
    return up, json.loads(state_file.read_text())


def local_down(cwd: Path, up: subprocess.Popen[str]) -> str:
    """`flstore local down` in ``cwd``; what `local up` printed."""
    down = subprocess.run([*FLSTORE, "local", "down"], cwd=cwd, capture_output=True, text=True)
    assert down.returncode == 0, down.stderr
    out, _ = up.communicate(timeout=60)
    assert not (cwd / ".flstore" / "local.json").exists()
    return out


def cosine_select(cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            *FLSTORE,
            "run",
            "cosine_select",
            *("--job", "demo", "--round", "0", "--param", "k=3"),
            "--json",
        ],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def write_round(state: dict[str, Any]) -> None:
    store = ObjectStore(state["bucket"], endpoint_url=state["s3_endpoint"])
    for i in range(4):
        store.put_update("demo", 0, f"c{i}", small_update(i))
    store.commit_round("demo", 0)
    store.close()


def test_local_up_run_and_down(tmp_path: Path) -> None:
    up, state = local_up(tmp_path)
    try:
        assert {"gateway_url", "lambda_endpoint", "s3_endpoint", "bucket", "token"} <= set(state)
        write_round(state)
        out = cosine_select(tmp_path)
        assert out.returncode == 0, out.stderr
        answer = json.loads(out.stdout)
        assert len(answer["result"]["selected"]) == 3 and answer["meta"]["latency_ms"] > 0
        table = subprocess.run(
            [*FLSTORE, "rounds", "--job", "demo"], cwd=tmp_path, capture_output=True, text=True
        )
        assert table.returncode == 0 and "4" in table.stdout
        printed = local_down(tmp_path, up)
        assert "data      .flstore/data (no jobs restored)" in printed
    finally:
        if up.poll() is None:
            up.kill()


def test_local_up_restores_what_local_down_saved(tmp_path: Path) -> None:
    """A job written before `local down` answers after the next `local up`."""
    up, state = local_up(tmp_path)
    try:
        write_round(state)
        local_down(tmp_path, up)
        assert (tmp_path / ".flstore" / "data" / "index.json").exists()
        up, _ = local_up(tmp_path)
        out = cosine_select(tmp_path)
        assert out.returncode == 0, out.stderr
        assert len(json.loads(out.stdout)["result"]["selected"]) == 3
        printed = local_down(tmp_path, up)
        assert "(restored 1 job: demo)" in printed
    finally:
        if up.poll() is None:
            up.kill()
