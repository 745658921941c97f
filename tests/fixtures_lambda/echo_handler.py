"""Tiny Lambda handlers for the local endpoint's tests.

Each one exercises one part of the execution model: ``echo`` shows warm module state (a
counter that survives between invocations of one instance), ``boom`` an unhandled exception,
``sleep`` a long invocation, ``hog`` memory use, ``big`` a large response, ``describe`` the
context and environment a handler sees.
"""

from __future__ import annotations

import os
import time
from typing import Any

CALLS = 0  # module state: survives between invocations of one warm instance
_HELD: list[Any] = []  # memory ``hog`` keeps, so the instance is over its limit at the end


def echo(event: Any, context: Any) -> dict[str, Any]:
    """Return the event, this instance's call count and its pid."""
    global CALLS
    CALLS += 1
    print(f"echo call {CALLS}")
    return {"event": event, "calls": CALLS, "pid": os.getpid()}


def boom(event: Any, context: Any) -> None:
    """Raise the message in ``event["message"]``."""
    raise ValueError(event.get("message", "boom"))


def sleep(event: Any, context: Any) -> dict[str, Any]:
    """Sleep ``event["s"]`` seconds, then return the pid."""
    time.sleep(float(event["s"]))
    return {"slept": event["s"], "pid": os.getpid()}


def hog(event: Any, context: Any) -> dict[str, Any]:
    """Allocate and touch ``event["mb"]`` MB, and hold on to it."""
    import numpy as np

    block = np.ones(int(event["mb"]) * 1024 * 1024, dtype=np.uint8)
    _HELD.append(block)
    return {"mb": event["mb"], "pid": os.getpid()}


def big(event: Any, context: Any) -> str:
    """Return a string of ``event["bytes"]`` characters."""
    return "x" * int(event["bytes"])


def describe(event: Any, context: Any) -> dict[str, Any]:
    """Return what the handler can see of its context and environment."""
    return {
        "function_name": context.function_name,
        "memory_limit_in_mb": context.memory_limit_in_mb,
        "invoked_function_arn": context.invoked_function_arn,
        "aws_request_id": context.aws_request_id,
        "function_version": context.function_version,
        "log_group_name": context.log_group_name,
        "remaining_ms": context.get_remaining_time_in_millis(),
        "env": {k: os.environ.get(k) for k in event.get("env", [])},
    }
