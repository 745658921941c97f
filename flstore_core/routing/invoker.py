"""How the router reaches a cache node: one ``lambda.invoke`` and what the node was billed.

A node either answers with a JSON object (:class:`NodeAnswer`, which may carry a caller error the
node returned on purpose) or fails (:class:`NodeFailure`): a function error, a timeout, an
unreachable endpoint, or throttling (:class:`NodeThrottled`, kept apart because a busy warm node
is worth waiting for while a failed one is not). What to do about a failure is the failover
policy's decision (:mod:`flstore_core.routing.failover`), not the invoker's.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from botocore.exceptions import BotoCoreError, ClientError

if TYPE_CHECKING:
    from mypy_boto3_lambda import LambdaClient

_BILLED = re.compile(r"Billed Duration: (\d+(?:\.\d+)?) ms")
_MEMORY = re.compile(r"Memory Size: (\d+) MB")
_THROTTLING_CODES = frozenset({"TooManyRequestsException", "ThrottlingException"})
# how Lambda words an invocation that ran out of memory or time, in the error payload's
# errorType (and the local runtime, lambdas/local_runtime/invocation_outcome.py, the same) or
# in the log tail when the runtime had no time to write a payload
_OUT_OF_MEMORY = ("Runtime.OutOfMemory",)
_TIMED_OUT = ("Sandbox.Timedout", "Task timed out after")
# a node's error as logged: one line, at most this many characters (a RecursionError's
# traceback was ~345 KB per request)
LOG_DETAIL_CHARS = 2048

log = logging.getLogger(__name__)


class NodeFailure(Exception):
    """A node did not answer (function error, throttled, timed out, unreachable)."""


class NodeThrottled(NodeFailure):
    """The node is busy with other invocations (``TooManyRequestsException``)."""


class RequestKilledNode(NodeFailure):
    """The invocation ran out of memory (``Runtime.OutOfMemory``) or time (``Sandbox.Timedout``)
    on the node: the request, not the node, is at fault, and another node would fail the same
    way, so the failover policy does not carry it there. ``kind`` is ``out_of_memory`` or
    ``timed_out``."""

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind


def one_line(text: str, limit: int = LOG_DETAIL_CHARS) -> str:
    """``text`` on one line (newlines escaped) cut to ``limit`` characters, for the log."""
    flat = text.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def function_error(function: str, resp: Mapping[str, Any], body: bytes) -> NodeFailure:
    """The failure of an invocation Lambda answered with a ``FunctionError``, classified from
    the error payload's ``errorType`` and the log tail; its message names the function and
    the kind of failure only (what the node's exception said goes to the log, one line)."""
    try:
        payload = json.loads(body)
    except ValueError:
        payload = None
    said = ""  # the error type and message, and the log tail
    if isinstance(payload, dict):
        said = f"{payload.get('errorType', '')} {payload.get('errorMessage', '')}"
    if resp.get("LogResult"):
        said += " " + base64.b64decode(resp["LogResult"]).decode(errors="replace")
    log.warning(
        "cache node %s failed: %s %s",
        function,
        resp.get("FunctionError"),
        one_line(body.decode(errors="replace")),
    )
    if any(t in said for t in _OUT_OF_MEMORY):
        return RequestKilledNode(f"{function}: ran out of memory", "out_of_memory")
    if any(t in said for t in _TIMED_OUT):
        return RequestKilledNode(f"{function}: timed out", "timed_out")
    return NodeFailure(f"{function}: function error")


@dataclass
class NodeAnswer:
    """The JSON object a node answered with, and what the invocation was billed."""

    function: str
    payload: dict[str, Any]
    billed_ms: float
    memory_mb: int


class Invoker(Protocol):
    """What the router needs of whatever invokes cache nodes: one synchronous invocation.

    :class:`NodeInvoker` is the boto3 one; tests pass a fake.
    """

    def invoke(self, function: str, event: Mapping[str, Any]) -> NodeAnswer:
        """Invoke ``function`` with ``event``; raise :class:`NodeFailure` if it did not answer."""
        ...


class NodeInvoker:
    """Invokes cache-node functions through boto3 and reads back what they were billed."""

    def __init__(self, client: LambdaClient, default_memory_mb: int = 3008) -> None:
        self.client = client
        self.default_memory_mb = default_memory_mb

    @property
    def endpoint_url(self) -> str:
        """The Lambda endpoint this invoker calls (AWS's regional one, or a local one)."""
        return str(self.client.meta.endpoint_url)

    def invoke(self, function: str, event: Mapping[str, Any]) -> NodeAnswer:
        """Invoke ``function`` synchronously with ``event``; raise :class:`NodeFailure` if it
        does not answer with a JSON object."""
        t0 = time.perf_counter()
        try:
            resp = self.client.invoke(
                FunctionName=function,
                InvocationType="RequestResponse",
                LogType="Tail",
                Payload=json.dumps(event).encode(),
            )
            body = resp["Payload"].read()
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in _THROTTLING_CODES:
                raise NodeThrottled(f"{function}: throttled") from exc
            log.warning("cache node %s not invoked: %s", function, one_line(str(exc)))
            raise NodeFailure(f"{function}: not invoked ({code or 'error'})") from exc
        except (BotoCoreError, OSError) as exc:
            log.warning("cache node %s unreachable: %s", function, one_line(str(exc)))
            raise NodeFailure(f"{function}: unreachable") from exc
        wall_ms = (time.perf_counter() - t0) * 1000
        if resp.get("FunctionError"):
            raise function_error(function, resp, body)
        try:
            payload = json.loads(body)
        except ValueError as exc:
            raise NodeFailure(f"{function}: answer is not JSON") from exc
        if not isinstance(payload, dict):
            raise NodeFailure(f"{function}: answer is not a JSON object")
        billed, memory = self._billing(resp, wall_ms)
        return NodeAnswer(function, payload, billed, memory)

    def _billing(self, resp: Mapping[str, Any], wall_ms: float) -> tuple[float, int]:
        # the tail of the log (LogType=Tail) carries Lambda's REPORT line: the billed duration
        # and memory are what the request costs; without it, the wall time is the best estimate
        billed, memory = wall_ms, self.default_memory_mb
        log = resp.get("LogResult")
        if log:
            text = base64.b64decode(log).decode(errors="replace")
            if m := _BILLED.search(text):
                billed = float(m.group(1))
            if m := _MEMORY.search(text):
                memory = int(m.group(1))
        return billed, memory
