"""A cache node's ``stats`` reports its process's peak resident set (the scale benchmark's
``peak_rss_mb``), checked against psutil's view of the same process."""

from __future__ import annotations

import sys

import numpy as np
import psutil
import pytest

from flstore_core.cache.node import CacheNode
from flstore_core.storage.memory import MemoryBlobStore
from flstore_core.storage.object_store import ObjectStore

MiB = 1024 * 1024


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM is Linux's")
def test_peak_rss_is_the_processes_high_water_mark() -> None:
    node = CacheNode(ObjectStore(blobs=MemoryBlobStore()), budget_bytes=MiB)
    before = node.stats()["peak_rss_mb"]
    assert isinstance(before, float)
    # the high-water mark is never below what the process holds now
    assert before >= psutil.Process().memory_info().rss / MiB - 1.0
    held = np.ones(96 * MiB, np.uint8)  # 96 MB touched, so resident
    now = psutil.Process().memory_info().rss / MiB
    after = node.stats()["peak_rss_mb"]
    assert after >= now - 1.0 and after >= before
    assert after >= held.nbytes / MiB  # the array alone is resident
    del held
    # a peak does not fall when memory is freed (within the kernel's per-thread RSS counter
    # slack: resident counts are batched per thread, and VmHWM reads them)
    assert node.stats()["peak_rss_mb"] >= after - 1.0
