"""A cache node's budget: the memory left for data once its runtime is loaded (ARCHITECTURE §3).

A node's function has ``memory_mb`` of memory. Before it holds any data its Python runtime
takes some of it — more with scikit-learn imported (k-means, CFL) and most with torch
(model-based workloads) — and a request needs working memory beyond the shards it reads. The
budget is what remains: ``memory − runtime − working``. Model results being written are charged
to the round they come from (:data:`flstore_core.data.blocks.EXTRA_ROWS`), not here.

The router plans column blocks with the same figure as the nodes hold data under
(:func:`stack_budget`), so a block it sends a node always fits. ``FLSTORE_CACHE_BUDGET_BYTES``
overrides it on both sides (tests use a small explicit budget).
"""

from __future__ import annotations

from flstore_core import config

MiB = 1024 * 1024
# peak resident memory of a cold node process (lambdas.cache_node imported, then its
# workloads run on a tiny round) by the heaviest library they import, the p95 of 5 rounded up
# to 16 MB: `python benchmarks/node_runtime.py --json bench-out/node_runtime.json` on Python
# 3.11, numpy 2.4, scikit-learn 1.9, torch 2.13+cpu (x86-64 Linux) measured 67 MB for
# cosine_select/fedavg/krum/trimmed_mean (64 MB for the import alone), 160 MB for kmeans,
# 277 MB for accuracy_select
RUNTIME_MB = {"base": 80, "sklearn": 176, "torch": 288}
# working memory of one request beyond its shards: decode buffers, a trimmed-mean sort chunk,
# JSON in and out. The same benchmark's `working` case — trimmed_mean on a cold 40 x 2M
# float32 round (305 MB) — peaks 56 MB above the import and the bytes the cache then holds
WORKING_MB = 64
# the floor of a budget (a function too small for its runtime still holds something)
MIN_BUDGET_MB = 16


def cache_budget(memory_mb: int, runtime: str = "torch") -> int:
    """Bytes a node of ``memory_mb`` can hold once the ``runtime`` its workloads import
    (``base``, ``sklearn`` or ``torch``) is loaded."""
    free = memory_mb - RUNTIME_MB[runtime] - WORKING_MB
    return max(free, MIN_BUDGET_MB) * MiB


def stack_budget(memory_mb: int | None = None) -> int:
    """The budget every node of a stack holds data under: ``FLSTORE_CACHE_BUDGET_BYTES`` if
    set, else :func:`cache_budget` of the node memory (``memory_mb``, else
    ``FLSTORE_CACHE_MEMORY_MB``)."""
    if config.CACHE_BUDGET_BYTES.get():
        return config.CACHE_BUDGET_BYTES.get_int()
    return cache_budget(memory_mb if memory_mb is not None else config.CACHE_MEMORY_MB.get_int())
