"""One local Lambda instance: a process that imports a handler once and serves invocations.

Why a separate process per instance: FLStore's cache nodes keep model updates in module-level
state between invocations, exactly as they would in a warm AWS Lambda sandbox. A process of
its own gives each instance that persistent memory, an RSS the endpoint can measure and bill,
and something the endpoint can SIGKILL on a timeout or memory overrun without harming its
neighbours.

The endpoint starts this module as ``python -m lambdas.local_runtime.worker --fd N`` with the
function's environment already set (``_HANDLER`` names the handler, as on Lambda) and the
worker's end of a socket pair at file descriptor ``N``. The protocol is JSON only; nothing
received is ever unpickled:

1. On start the worker imports the handler module (the cold-start *init* phase) and sends
   ``{"type": "ready"}`` or ``{"type": "init_error", "errorType": ..., ...}``.
2. Each request is one message ``<header JSON>\\n<event JSON>``; the header carries the
   invocation context (request id, deadline, ARN). The reply is
   ``<header JSON>\\n<payload JSON>`` where the header says ``"ok": true`` or carries the
   error fields, plus the invocation's captured stdout/stderr under ``"log"``.
3. End of file on the socket (the endpoint closed it or died) ends the process.

Exceptions that derive from ``Exception`` are reported like the Lambda Python runtime does;
``SystemExit`` and friends end the process, which the endpoint reports as
``Runtime.ExitError``.
"""

from __future__ import annotations

import argparse
import importlib
import io
import json
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any, TextIO

#: How much of an invocation's stdout/stderr is sent back for ``LogType=Tail`` (bytes).
LOG_TAIL_BYTES = 4096

Handler = Callable[[Any, "LambdaContext"], Any]


class LambdaContext:
    """The ``context`` argument of a handler, with the attributes of the AWS Python runtime.

    As in ``awslambdaric``, the identity fields come from the ``AWS_LAMBDA_*`` environment
    variables, so ``memory_limit_in_mb`` is a string.
    """

    def __init__(self, aws_request_id: str, invoked_function_arn: str, deadline_ms: int) -> None:
        self.aws_request_id = aws_request_id
        self.invoked_function_arn = invoked_function_arn
        self.function_name = os.environ.get("AWS_LAMBDA_FUNCTION_NAME", "")
        self.function_version = os.environ.get("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST")
        self.memory_limit_in_mb = os.environ.get("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "")
        self.log_group_name = os.environ.get("AWS_LAMBDA_LOG_GROUP_NAME", "")
        self.log_stream_name = os.environ.get("AWS_LAMBDA_LOG_STREAM_NAME", "")
        self.identity: Any = None
        self.client_context: Any = None
        self.tenant_id: str | None = None
        self._deadline_ms = deadline_ms

    def get_remaining_time_in_millis(self) -> int:
        """Milliseconds left before the endpoint kills this invocation (never negative)."""
        return max(0, self._deadline_ms - int(time.time() * 1000))


class _TeeStream(io.TextIOBase):
    """Writes to the real stream and keeps the tail of what was written, for ``LogType=Tail``."""

    def __init__(self, target: TextIO) -> None:
        super().__init__()
        self._target = target
        self._chunks: list[str] = []
        self._size = 0

    def write(self, text: str) -> int:
        self._target.write(text)
        self._chunks.append(text)
        self._size += len(text)
        # Keep the buffer bounded: once it is well past the tail size, fold it to the tail.
        if self._size > 4 * LOG_TAIL_BYTES:
            joined = "".join(self._chunks)[-LOG_TAIL_BYTES:]
            self._chunks, self._size = [joined], len(joined)
        return len(text)

    def flush(self) -> None:
        self._target.flush()

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        # Code that hands sys.stdout to a subprocess or faulthandler needs the real descriptor.
        return self._target.fileno()

    def isatty(self) -> bool:
        return self._target.isatty()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return self._target.encoding

    def captured(self) -> str:
        """The last ``LOG_TAIL_BYTES`` characters written."""
        return "".join(self._chunks)[-LOG_TAIL_BYTES:]


def load_handler(spec: str) -> Handler:
    """Import ``package.module.function`` and return the function.

    Raises :class:`InitError` with the Lambda runtime's error type when the name is malformed,
    the module does not import, or the function is missing.
    """
    module_name, _, function_name = spec.rpartition(".")
    if not module_name or not function_name:
        raise InitError(
            "Runtime.MalformedHandlerName",
            f"Bad handler '{spec}': not enough values to unpack (expected 2, got 1)",
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise InitError(
            "Runtime.ImportModuleError", f"Unable to import module '{module_name}': {exc}"
        ) from exc
    except Exception as exc:  # the module's own top-level code raised
        raise InitError(type(exc).__name__, str(exc), _stack_trace(exc)) from exc
    handler = getattr(module, function_name, None)
    if not callable(handler):
        raise InitError(
            "Runtime.HandlerNotFound",
            f"Handler '{function_name}' missing on module '{module_name}'",
        )
    return handler  # type: ignore[no-any-return]


class InitError(Exception):
    """The handler could not be loaded; carries the Lambda error type and message."""

    def __init__(self, error_type: str, message: str, stack: list[str] | None = None) -> None:
        super().__init__(message)
        self.error_type = error_type
        self.message = message
        self.stack = stack or []


def _stack_trace(exc: BaseException) -> list[str]:
    """The traceback lines below the worker's own frame, formatted like the Lambda runtime."""
    tb = exc.__traceback__
    # The first frame is this module calling the handler/import; Lambda hides its runtime too.
    if tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return traceback.format_list(traceback.extract_tb(tb))


def _message(header: dict[str, Any], payload: bytes = b"") -> bytes:
    return json.dumps(header, separators=(",", ":")).encode() + b"\n" + payload


def _invoke(handler: Handler, header: dict[str, Any], body: bytes) -> bytes:
    """Run one invocation and return the reply message."""
    request_id = str(header["request_id"])
    context = LambdaContext(request_id, str(header["arn"]), int(header["deadline_ms"]))
    out, err = sys.stdout, sys.stderr
    tee_out, tee_err = _TeeStream(out), _TeeStream(err)
    sys.stdout, sys.stderr = tee_out, tee_err
    try:
        event = json.loads(body) if body.strip() else {}
        try:
            result = handler(event, context)
        except Exception as exc:
            reply = {
                "ok": False,
                "errorMessage": str(exc),
                "errorType": type(exc).__name__,
                "requestId": request_id,
                "stackTrace": _stack_trace(exc),
            }
            traceback.print_exc()
            return _message(reply | {"log": tee_out.captured() + tee_err.captured()})
        try:
            payload = json.dumps(result).encode()
        except (TypeError, ValueError) as exc:
            reply = {
                "ok": False,
                "errorMessage": f"Unable to marshal response: {exc}",
                "errorType": "Runtime.MarshalError",
                "requestId": request_id,
                "stackTrace": [],
            }
            return _message(reply | {"log": tee_out.captured() + tee_err.captured()})
        return _message({"ok": True, "log": tee_out.captured() + tee_err.captured()}, payload)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        sys.stdout, sys.stderr = out, err


def serve(conn: Connection, handler_spec: str) -> int:
    """Load the handler, report readiness, then answer invocations until end of file."""
    try:
        handler = load_handler(handler_spec)
    except InitError as exc:
        conn.send_bytes(
            _message(
                {
                    "type": "init_error",
                    "errorMessage": exc.message,
                    "errorType": exc.error_type,
                    "stackTrace": exc.stack,
                }
            )
        )
        return 1
    conn.send_bytes(_message({"type": "ready"}))
    while True:
        try:
            raw = conn.recv_bytes()
        except (EOFError, OSError):
            return 0
        head, _, body = raw.partition(b"\n")
        reply = _invoke(handler, json.loads(head), body)
        try:
            conn.send_bytes(reply)
        except OSError:  # the endpoint went away mid-invocation
            return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m lambdas.local_runtime.worker``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--fd", type=int, required=True, help="file descriptor of the socket")
    args = parser.parse_args(argv)
    # The endpoint owns this process's lifetime (it kills it, or end of file on the socket ends
    # it); a Ctrl-C in the terminal of the local stack should not spray tracebacks from here.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    conn = Connection(args.fd)
    try:
        return serve(conn, os.environ.get("_HANDLER", ""))
    finally:
        conn.close()


if __name__ == "__main__":
    sys.exit(main())
