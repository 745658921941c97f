"""`flstore local up` / `run` / `local down` as a user runs them, in a scratch directory."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from flstore_core.storage.object_store import ObjectStore
from tests.conftest import small_update

FLSTORE = [sys.executable, "-m", "flstore_core.cli"]


def test_local_up_run_and_down(tmp_path: Path) -> None:
    up = subprocess.Popen(
        [*FLSTORE, "local", "up", "--nodes", "2", "--memory-mb", "1024"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    state_file = tmp_path / ".flstore" / "local.json"
    try:
        deadline = time.monotonic() + 60
        while not state_file.exists():
            assert up.poll() is None, up.stdout.read() if up.stdout else ""
            assert time.monotonic() < deadline, "local stack did not come up"
            time.sleep(0.1)
        state = json.loads(state_file.read_text())
        assert {"gateway_url", "lambda_endpoint", "s3_endpoint", "bucket", "token"} <= set(state)
        store = ObjectStore(state["bucket"], endpoint_url=state["s3_endpoint"])
        for i in range(4):
            store.put_update("demo", 0, f"c{i}", small_update(i))
        store.commit_round("demo", 0)
        out = subprocess.run(
            [
                *FLSTORE,
                "run",
                "cosine_select",
                "--job",
                "demo",
                "--round",
                "0",
                "--param",
                "k=3",
                "--json",
            ],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, out.stderr
        answer = json.loads(out.stdout)
        assert len(answer["result"]["selected"]) == 3 and answer["meta"]["latency_ms"] > 0
        table = subprocess.run(
            [*FLSTORE, "rounds", "--job", "demo"], cwd=tmp_path, capture_output=True, text=True
        )
        assert table.returncode == 0 and "4" in table.stdout
        down = subprocess.run(
            [*FLSTORE, "local", "down"], cwd=tmp_path, capture_output=True, text=True
        )
        assert down.returncode == 0
        up.wait(timeout=30)
        assert not state_file.exists()
    finally:
        if up.poll() is None:
            up.kill()
