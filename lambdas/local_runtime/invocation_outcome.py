"""What one local Lambda invocation produced, worded the way Lambda words it.

Why: callers of the local endpoint read the same signals they read on AWS. A handler that
raised, timed out, ran out of memory or whose process died answers with Lambda's error payload
(``errorType`` ``Sandbox.Timedout``, ``Runtime.OutOfMemory``, ``Runtime.ExitError``, ...) and
``X-Amz-Function-Error: Unhandled``; every invocation logs Lambda's ``START``/``END``/``REPORT``
lines, whose billed duration and peak memory FLStore's cost model reads back from the
``LogType=Tail`` log tail.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import signal
from dataclasses import dataclass
from typing import NamedTuple

from lambdas.local_runtime.instance_pool import (
    INIT_TIMEOUT_S,
    MB,
    FunctionInstance,
    FunctionSpec,
    Outcome,
)

log = logging.getLogger(__name__)

#: Lambda's limit for a synchronous request and response payload (6 MB).
SYNC_PAYLOAD_LIMIT = 6 * 1024 * 1024
#: How much log text ``LogType=Tail`` returns, as on Lambda.
LOG_TAIL_BYTES = 4096


@dataclass(frozen=True)
class InvocationResult:
    """What one synchronous invocation produced, before it is turned into HTTP."""

    payload: bytes
    function_error: str | None
    request_id: str
    duration_ms: float
    billed_duration_ms: int
    max_memory_mb: int
    init_duration_ms: float | None
    log_text: str

    def log_tail(self) -> str:
        """The last :data:`LOG_TAIL_BYTES` of the log, base64-encoded, as ``LogType=Tail``."""
        return base64.b64encode(self.log_text.encode()[-LOG_TAIL_BYTES:]).decode()


class RunOutcome(NamedTuple):
    """An invocation's answer, and whether its instance may serve another one."""

    payload: bytes
    function_error: str | None
    handler_log: str
    keep_instance: bool


def error_payload(error_type: str, message: str, request_id: str) -> bytes:
    """A Lambda runtime error payload (``errorMessage``, ``errorType``, ...) as JSON bytes."""
    body = {
        "errorMessage": message,
        "errorType": error_type,
        "requestId": request_id,
        "stackTrace": [],
    }
    return json.dumps(body).encode()


def exit_reason(returncode: int | None) -> str:
    """Lambda's wording for how the runtime process ended."""
    if returncode is None:
        return "Runtime exited without providing a reason"
    if returncode < 0:
        try:
            name = signal.strsignal(-returncode) or f"signal {-returncode}"
        except ValueError:
            name = f"signal {-returncode}"
        return f"Runtime exited with error: signal: {name.lower()}"
    return f"Runtime exited with error: exit status {returncode}"


def _exit_error(inst: FunctionInstance, request_id: str) -> bytes:
    """Reap a dead worker and word its end as ``Runtime.ExitError``."""
    inst.kill()
    code = inst.process.returncode if inst.process is not None else None
    text = f"RequestId: {request_id} Error: {exit_reason(code)}"
    return error_payload("Runtime.ExitError", text, request_id)


def init_failure(
    inst: FunctionInstance, outcome: Outcome, message: bytes | None, request_id: str
) -> bytes | None:
    """The error payload when a cold start did not reach ``ready``, else None."""
    if outcome == "timeout":
        return error_payload(
            "Sandbox.Timedout", f"Init timed out after {INIT_TIMEOUT_S:.2f} seconds", request_id
        )
    if outcome == "oom":
        return error_payload(
            "Runtime.OutOfMemory", "Runtime exited with error: signal: killed", request_id
        )
    if outcome == "exit" or message is None:
        return _exit_error(inst, request_id)
    head = json.loads(message.partition(b"\n")[0])
    if head.get("type") == "ready":
        return None
    body = {
        "errorMessage": head.get("errorMessage", ""),
        "errorType": head.get("errorType", "Runtime.Unknown"),
        "requestId": request_id,
        "stackTrace": head.get("stackTrace", []),
    }
    return json.dumps(body).encode()


def run_outcome(
    inst: FunctionInstance,
    outcome: Outcome,
    message: bytes | None,
    request_id: str,
    spec: FunctionSpec,
) -> RunOutcome:
    """Turn how waiting on an invocation ended into its answer, log and the instance's fate."""
    if outcome == "timeout":
        text = f"Task timed out after {spec.timeout_s:.2f} seconds"
        return RunOutcome(
            error_payload("Sandbox.Timedout", text, request_id), "Unhandled", "", False
        )
    if outcome == "oom":
        text = "Runtime exited with error: signal: killed"
        return RunOutcome(
            error_payload("Runtime.OutOfMemory", text, request_id), "Unhandled", "", False
        )
    if outcome == "exit" or message is None:
        return RunOutcome(_exit_error(inst, request_id), "Unhandled", "", False)
    raw_head, _, payload = message.partition(b"\n")
    head = json.loads(raw_head)
    log_text = str(head.get("log", ""))
    if not head.get("ok"):
        error = {k: head[k] for k in ("errorMessage", "errorType", "requestId", "stackTrace")}
        return RunOutcome(json.dumps(error).encode(), "Unhandled", log_text, True)
    if len(payload) > SYNC_PAYLOAD_LIMIT:
        text = (
            "Response payload size exceeded maximum allowed payload size "
            f"({SYNC_PAYLOAD_LIMIT} bytes)."
        )
        body = error_payload("Function.ResponseSizeTooLarge", text, request_id)
        return RunOutcome(body, "Unhandled", log_text, True)
    return RunOutcome(payload, None, log_text, True)


def finish_invocation(
    spec: FunctionSpec,
    request_id: str,
    payload: bytes,
    function_error: str | None,
    duration_ms: float,
    init_ms: float | None,
    peak_rss: int,
    handler_log: str = "",
) -> InvocationResult:
    """Log the START/END/REPORT lines and build the result."""
    # Since August 2025 Lambda bills the init phase of on-demand functions as well.
    billed = max(1, math.ceil(duration_ms + (init_ms or 0.0)))
    max_mb = min(spec.memory_mb, math.ceil(peak_rss / MB)) if peak_rss else 0
    report = (
        f"REPORT RequestId: {request_id}\tDuration: {duration_ms:.2f} ms\t"
        f"Billed Duration: {billed} ms\tMemory Size: {spec.memory_mb} MB\t"
        f"Max Memory Used: {max_mb} MB"
    )
    if init_ms is not None:
        report += f"\tInit Duration: {init_ms:.2f} ms"
    if function_error is not None:
        try:
            error_type = json.loads(payload).get("errorType", "")
        except (ValueError, AttributeError):
            error_type = ""
        report += f"\tStatus: error\tError Type: {error_type}"
    log.info("[%s] %s", spec.name, report)
    log_text = (
        f"START RequestId: {request_id} Version: $LATEST\n{handler_log}"
        f"END RequestId: {request_id}\n{report}\n"
    )
    return InvocationResult(
        payload=payload,
        function_error=function_error,
        request_id=request_id,
        duration_ms=duration_ms,
        billed_duration_ms=billed,
        max_memory_mb=max_mb,
        init_duration_ms=init_ms,
        log_text=log_text,
    )
