"""The README's runnable blocks run as written: every fenced block with the info string
``bash runnable`` is run by bash in a fresh, empty directory with the virtualenv's ``bin`` first
on ``PATH``, and exits 0."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BLOCK = re.compile(r"^```bash runnable\n(.*?)^```", re.MULTILINE | re.DOTALL)


def runnable_blocks() -> list[str]:
    """The text of every ``bash runnable`` block of README.md, in order."""
    return BLOCK.findall((ROOT / "README.md").read_text())


def test_the_readme_has_a_runnable_block() -> None:
    assert runnable_blocks(), "README.md lost its ```bash runnable block"


@pytest.mark.parametrize("index", range(len(runnable_blocks())))
def test_a_runnable_readme_block_exits_0(index: int, tmp_path: Path) -> None:
    script = runnable_blocks()[index]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    for name in ("FLSTORE_S3_ENDPOINT", "FLSTORE_BUCKET", "FLSTORE_URL", "FLSTORE_TOKEN"):
        env.pop(name, None)  # the block finds its own local stack, as a newcomer's shell would
    # its own session, so that a stack the block leaves behind on failure can be stopped
    proc = subprocess.Popen(
        ["bash", "-c", script],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=600)
    finally:
        subprocess.run(
            [str(Path(sys.executable).parent / "flstore"), "local", "down"],
            cwd=tmp_path,
            env=env,
            timeout=60,
            check=False,
        )
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
    assert proc.returncode == 0, output[-4000:]
