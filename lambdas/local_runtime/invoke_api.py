"""The HTTP side of the local Lambda endpoint: the Invoke API, as boto3's ``lambda`` speaks it.

Why: boto3 must work against the local endpoint unchanged, so requests and answers follow
Lambda's wire format:

* ``POST /2015-03-31/functions/{name}/invocations`` with ``X-Amz-Invocation-Type``
  ``RequestResponse`` (200), ``Event`` (202, run in the background) or ``DryRun`` (204).
  ``{name}`` may be a name, ``name:qualifier``, a partial or a full ARN.
* A function error answers 200 with ``X-Amz-Function-Error`` and the error payload; the billed
  duration and peak memory go out in ``X-Flstore-Billed-Duration-Ms`` /
  ``X-Flstore-Max-Memory-Mb``, and ``X-Amz-Log-Type: Tail`` returns the log tail.
* Errors of the service itself are :class:`InvokeApiError` responses, and every other method
  or path is an ``UnknownOperationException``.

What an invocation does is not decided here: the server hands requests to an
:class:`InvokeBackend` (:class:`lambdas.local_runtime.lambda_endpoint.LocalLambda`).
"""

from __future__ import annotations

import json
import logging
import socket
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol
from urllib.parse import parse_qs, unquote, urlsplit

from lambdas.local_runtime.gateway import LISTEN_BACKLOG, WRITE_BUFFER_BYTES
from lambdas.local_runtime.instance_pool import FunctionSpec
from lambdas.local_runtime.invocation_outcome import SYNC_PAYLOAD_LIMIT, InvocationResult
from lambdas.local_runtime.invoke_errors import InvokeApiError

log = logging.getLogger(__name__)

#: Lambda's limit for an asynchronous (``Event``) request payload (1 MB since late 2025).
ASYNC_PAYLOAD_LIMIT = 1024 * 1024


class InvokeBackend(Protocol):
    """What the HTTP server needs from the Lambda service behind it."""

    def function_spec(self, name: str) -> FunctionSpec:
        """The configuration of a deployed function; :class:`InvokeApiError` (404) if none."""
        ...

    def invoke(self, name: str, payload: bytes = b"") -> InvocationResult:
        """Run one synchronous invocation."""
        ...

    def invoke_event(self, name: str, payload: bytes = b"") -> None:
        """Queue an asynchronous invocation and return at once."""
        ...


def function_name_from(identifier: str) -> str:
    """The bare function name from a name, ``name:qualifier``, partial ARN or full ARN.

    >>> function_name_from("arn:aws:lambda:us-east-1:123456789012:function:cache:$LATEST")
    'cache'
    >>> function_name_from("123456789012:function:cache")
    'cache'
    >>> function_name_from("cache:prod")
    'cache'
    """
    parts = identifier.split(":")
    if parts[0] == "arn" and len(parts) >= 7:
        return parts[6]
    if len(parts) >= 3 and parts[1] == "function":
        return parts[2]
    return parts[0]


class InvokeApiServer(ThreadingHTTPServer):
    """A threaded HTTP server answering the Invoke API from ``backend``."""

    daemon_threads = True
    # the router's invocations come from many threads at once: socketserver's backlog of 5
    # overflows under a burst and the kernel drops connections (see gateway.LISTEN_BACKLOG)
    request_queue_size = LISTEN_BACKLOG

    def __init__(self, address: tuple[str, int], backend: InvokeBackend) -> None:
        super().__init__(address, _InvokeRequestHandler)
        self.backend = backend


class HeaderLookup(Protocol):
    """The request headers as both transports hold them: a case-insensitive ``get``."""

    def get(self, name: str, /) -> Any:
        """The value of header ``name`` (any case), else None."""
        ...


#: An Invoke API answer: HTTP status, headers and body.
InvokeAnswer = tuple[int, dict[str, str], bytes]


def answer_invoke(
    backend: InvokeBackend, method: str, target: str, headers: HeaderLookup, body: bytes
) -> InvokeAnswer:
    """The Invoke API's answer to one request, whatever carried it.

    The HTTP server (:class:`InvokeApiServer`) and the in-process transport
    (:mod:`lambdas.local_runtime.in_process`) both answer through this, so a request gets the
    same status, headers and body either way. Errors of the service are answered as
    :class:`InvokeApiError` responses, and a bug here as a 500 ``ServiceException`` (boto3 must
    get an answer it can parse, never a dropped connection it would retry blindly).
    """
    try:
        if method != "POST":
            raise _unknown_operation(method, target)
        return _dispatch(backend, _function_name(method, target), headers, body)
    except InvokeApiError as exc:
        return _error_answer(exc, str(uuid.uuid4()))
    except Exception as exc:
        log.exception("local Lambda endpoint failed on %s", target)
        error = InvokeApiError(500, "ServiceException", {"Type": "Service", "Message": str(exc)})
        return _error_answer(error, str(uuid.uuid4()))


def _dispatch(
    backend: InvokeBackend, name: str, headers: HeaderLookup, body: bytes
) -> InvokeAnswer:
    given = headers.get("X-Amz-Invocation-Type")
    invocation_type = "RequestResponse" if given is None else str(given)
    if invocation_type not in ("RequestResponse", "Event", "DryRun"):
        raise InvokeApiError.invalid_parameter(
            f"1 validation error detected: Value '{invocation_type}' at 'invocationType' "
            "failed to satisfy constraint: Member must satisfy enum value set: "
            "[Event, RequestResponse, DryRun]"
        )
    limit = ASYNC_PAYLOAD_LIMIT if invocation_type == "Event" else SYNC_PAYLOAD_LIMIT
    if len(body) > limit:
        raise InvokeApiError.too_large(limit)
    if body.strip():
        try:
            json.loads(body)
        except ValueError as exc:
            raise InvokeApiError.invalid_content(
                f"Could not parse request body into json: {exc}"
            ) from exc
    if invocation_type == "DryRun":
        backend.function_spec(name)
        return 204, {"x-amzn-RequestId": str(uuid.uuid4())}, b""
    if invocation_type == "Event":
        backend.invoke_event(name, body)
        return 202, {"x-amzn-RequestId": str(uuid.uuid4())}, b""
    result = backend.invoke(name, body)
    out = {
        "x-amzn-RequestId": result.request_id,
        "Content-Type": "application/json",
        "X-Amz-Executed-Version": "$LATEST",
        "X-Flstore-Billed-Duration-Ms": str(result.billed_duration_ms),
        "X-Flstore-Max-Memory-Mb": str(result.max_memory_mb),
    }
    if result.function_error:
        out["X-Amz-Function-Error"] = result.function_error
    if headers.get("X-Amz-Log-Type") == "Tail":
        out["X-Amz-Log-Result"] = result.log_tail()
    return 200, out, result.payload


def _function_name(method: str, target: str) -> str:
    parts = urlsplit(target)
    segments = parts.path.strip("/").split("/")
    if (
        len(segments) != 4
        or segments[0] != "2015-03-31"
        or segments[1] != "functions"
        or segments[3] != "invocations"
    ):
        raise _unknown_operation(method, target)
    qualifier = parse_qs(parts.query).get("Qualifier", ["$LATEST"])[0]
    del qualifier  # one version per function locally; every qualifier is $LATEST
    return function_name_from(unquote(segments[2]))


def _unknown_operation(method: str, target: str) -> InvokeApiError:
    return InvokeApiError(
        404, "UnknownOperationException", {"Type": "User", "Message": f"{method} {target}"}
    )


def _error_answer(exc: InvokeApiError, request_id: str) -> InvokeAnswer:
    headers = {
        "x-amzn-RequestId": request_id,
        "x-amzn-ErrorType": exc.error_type,
        "Content-Type": "application/json",
    }
    return exc.status, headers, json.dumps(exc.body).encode()


class _InvokeRequestHandler(BaseHTTPRequestHandler):
    """Reads Invoke requests off HTTP and writes the answers of :func:`answer_invoke`."""

    protocol_version = "HTTP/1.1"  # keep-alive, as botocore's connection pool expects
    server_version = "FLStoreLocalLambda/1.0"
    wbufsize = WRITE_BUFFER_BYTES  # status line, headers and body in one write

    @property
    def backend(self) -> InvokeBackend:
        assert isinstance(self.server, InvokeApiServer)
        return self.server.backend

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s - %s", self.address_string(), format % args)

    def setup(self) -> None:
        super().setup()
        # header and body go out as two writes: without NODELAY, Nagle plus the client's
        # delayed ACK add ~40 ms to every keep-alive invocation
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def do_POST(self) -> None:
        try:
            body = self._read_body()
        except (ValueError, OSError) as exc:  # a malformed length or chunk: still an answer
            error = InvokeApiError(
                400, "InvalidRequestContentException", {"Type": "User", "message": str(exc)}
            )
            self.close_connection = True
            self._send(*_error_answer(error, str(uuid.uuid4())))
            return
        self._send(*answer_invoke(self.backend, self.command, self.path, self.headers, body))

    do_GET = do_PUT = do_DELETE = do_POST

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            return b"".join(self._read_chunks())
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _read_chunks(self) -> Iterator[bytes]:
        while True:
            size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while self.rfile.readline().strip():  # trailers
                    pass
                return
            yield self.rfile.read(size)
            self.rfile.readline()

    def _send(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body:
            self.wfile.write(body)
