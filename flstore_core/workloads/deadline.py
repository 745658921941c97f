"""The deadline of the workload a node is running, checked cooperatively in its long loops.

A node gives one ``run`` request at most ``FLSTORE_REQUEST_DEADLINE_S`` seconds (API Gateway
gives up on the caller after 29 s; work past that is paid for and thrown away). The code that
runs a workload enters :func:`running_until`; the loops whose length a caller's params set
(Shapley permutations and utility evaluations, FedDebug's clients and inputs) call
:func:`check`, which raises :class:`~flstore_core.errors.DeadlineExceededError` once the time is
up. Nothing is interrupted from outside: the workload stops at its next check, between two units
of work, and the node answers the 503 and stays up.

The deadline is held in a :class:`contextvars.ContextVar`, not passed to every workload: the
workload functions are pure functions of their data and params (their signature is the
catalogue's), and a context variable is per thread, so two nodes running in one test process
never see each other's deadline.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from flstore_core.errors import DeadlineExceededError

# (monotonic time the work must stop at, the seconds it was given)
_DEADLINE: ContextVar[tuple[float, float] | None] = ContextVar("workload_deadline", default=None)


@contextmanager
def running_until(seconds: float) -> Iterator[None]:
    """Run the block with a deadline ``seconds`` from now (nested: the earlier one holds)."""
    now = time.monotonic()
    outer = _DEADLINE.get()
    mine = (now + seconds, seconds)
    token = _DEADLINE.set(mine if outer is None or mine[0] < outer[0] else outer)
    try:
        yield
    finally:
        _DEADLINE.reset(token)


def check(what: str) -> None:
    """Raise :class:`DeadlineExceededError` if the running workload is past its deadline;
    ``what`` names the loop, for the message."""
    current = _DEADLINE.get()
    if current is not None and time.monotonic() > current[0]:
        raise DeadlineExceededError(
            f"the workload was stopped after {current[1]:g} s, the request deadline, while "
            f"{what}: ask for less work (fewer inputs, permutations or evaluations)"
        )
