"""An ingestion worker's process reuses the memory of one update's large buffers for the next
(``pipelines.memory_reuse``): measured as page faults in a fresh interpreter, where the
allocator setting cannot leak into the other tests."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

PROBE = """
import json, resource, sys
from pipelines.memory_reuse import keep_freed_memory
tuned = keep_freed_memory() if sys.argv[1] == "keep" else False
parts = [bytes(720_000) for _ in range(56)]  # a ResNet-18 update's frames, about
faults = []
for _ in range(4):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    joined = b"".join(parts)
    del joined
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"tuned": tuned, "faults": faults[1:]}))
"""


def _faults(mode: str) -> tuple[bool, list[int]]:
    """Whether the allocator was set, and the page faults of each join after the first."""
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True, cwd="."
    )
    result = json.loads(out.stdout)
    return bool(result["tuned"]), [int(f) for f in result["faults"]]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_a_worker_reuses_freed_memory_instead_of_faulting_it_in_again() -> None:
    _, plain = _faults("plain")
    tuned, kept = _faults("keep")
    if not tuned:
        pytest.skip("not glibc")
    # 40 MB a join: ~10,000 faults of 4 KiB pages each time when it is handed back
    assert min(plain) > 5_000
    assert max(kept) < 100
