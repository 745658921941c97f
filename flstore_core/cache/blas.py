"""One BLAS thread for the shared artifacts, so that their bits do not depend on the host.

OpenBLAS splits a GEMV's reduction (and, from ~40 rows, a SYRK's) over its threads, so the
float32 sums behind a Gram matrix, a weighted mean or ``x·v`` come out in other bits with
another thread count (measured with threadpoolctl on OpenBLAS 0.3.31: ``x @ b`` on 10 x 300k
differs between 1 and 2 threads, ``x @ x.T`` on 40 x 100k between every count from 1 to 4). The
thread count is the host's core count or ``OMP_NUM_THREADS``, so two replicas on different
hosts, a node restarted with another environment, or a test computing in-process would answer
the same request with other bits (identical answers everywhere). Results are
byte-identical when every such reduction runs on one thread: within :func:`one_blas_thread`.

Cost (2 cores, measured): the Gram GEMM of 10 x 11.7M float32 69 → 71 ms (memory-bound), of
100 x 250k 19 → 32 ms; GEMVs are memory-bound and no slower. The limit is process-wide, so
concurrent users share one section: the first to enter sets one thread, the last to leave
restores the previous count; BLAS calls of other threads meanwhile also run on one thread
(never wrong, at most slower).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

_lock = threading.Lock()
_users = 0
_limit: Any = None  # threadpoolctl's _ThreadpoolLimiter while someone is inside
_controller: Any = None


@contextmanager
def one_blas_thread() -> Iterator[None]:
    """Run the block on one BLAS thread (reentrant, thread-safe)."""
    global _users, _limit, _controller
    with _lock:
        if _users == 0:
            if _controller is None:
                from threadpoolctl import ThreadpoolController

                _controller = ThreadpoolController()
            _limit = _controller.limit(limits=1, user_api="blas")
        _users += 1
    try:
        yield
    finally:
        with _lock:
            _users -= 1
            if _users == 0 and _limit is not None:
                _limit.restore_original_limits()
                _limit = None
