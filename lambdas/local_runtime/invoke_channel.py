"""boto3's ``lambda.invoke`` from another local process to the local endpoint, without HTTP.

Why: the local router runs in instances of its own (:mod:`lambdas.local_runtime.
router_function`), other processes than the endpoint's, so the in-process transport
(:mod:`lambdas.local_runtime.in_process`) cannot answer their invocations of the nodes. Over the
endpoint's HTTP server they cost ~1.1 ms more per warm, tiny request than in process
(``benchmarks/request_floor.py --socket``: urllib3's pool, ``http.server``'s header parsing and
a thread per connection, ``http.client``'s answer parsing). This channel keeps botocore whole
(the router still calls ``client.invoke``: validation, serialization, answer parsing) and
carries the prepared request over a Unix socket as two length-prefixed frames, answered by
:func:`~lambdas.local_runtime.invoke_api.answer_invoke`, which the HTTP server also answers
through: status codes, function errors, throttles and the log tail are the same either way.

Frames (``multiprocessing.connection``'s, length-prefixed): the request is
``<JSON {"method", "target", "headers"}>\\n<body>``, the answer ``<JSON {"status",
"headers"}>\\n<body>``. One connection carries one request at a time; a client keeps a
connection per concurrent request (the router scatters on threads).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import socket
import tempfile
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import urlsplit

from botocore.awsrequest import AWSPreparedRequest, AWSResponse
from botocore.exceptions import EndpointConnectionError

from lambdas.local_runtime.in_process import EVENT, ResponseBody, request_body, skip_signing
from lambdas.local_runtime.invoke_api import InvokeBackend, answer_invoke

if TYPE_CHECKING:
    from mypy_boto3_lambda import LambdaClient

log = logging.getLogger(__name__)


def _frame(header: dict[str, Any], body: bytes) -> bytes:
    return json.dumps(header, separators=(",", ":")).encode() + b"\n" + body


def _unframe(message: bytes) -> tuple[dict[str, Any], bytes]:
    head, _, body = message.partition(b"\n")
    header: dict[str, Any] = json.loads(head)
    return header, body


class InvokeChannel:
    """The endpoint's side: a Unix socket answering Invoke requests from ``backend``.

    Parameters
    ----------
    backend : InvokeBackend
        The local Lambda service (:class:`~lambdas.local_runtime.lambda_endpoint.LocalLambda`).
    """

    def __init__(self, backend: InvokeBackend) -> None:
        self.backend = backend
        self._dir = tempfile.mkdtemp(prefix="flstore-invoke-")
        self.path = os.path.join(self._dir, "invoke.sock")
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._stopping = threading.Event()

    def start(self) -> InvokeChannel:
        """Listen, and serve each connection on a thread of its own."""
        self._listener.bind(self.path)
        self._listener.listen(1024)
        threading.Thread(target=self._accept, name="invoke-channel", daemon=True).start()
        return self

    def stop(self) -> None:
        """Stop accepting; open connections end when their clients close them."""
        self._stopping.set()
        self._listener.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)
            os.rmdir(self._dir)

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            conn = Connection(sock.detach())
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: Connection) -> None:
        with conn:
            while True:
                try:
                    header, body = _unframe(conn.recv_bytes())
                except (EOFError, OSError):
                    return
                status, headers, answer = answer_invoke(
                    self.backend, header["method"], header["target"], _Headers(header), body
                )
                try:
                    conn.send_bytes(_frame({"status": status, "headers": headers}, answer))
                except OSError:
                    return


class _Headers:
    """A framed request's headers as the Invoke API reads them: any case."""

    def __init__(self, header: dict[str, Any]) -> None:
        self._headers = {k.lower(): v for k, v in header["headers"].items()}

    def get(self, name: str, /) -> str | None:
        value = self._headers.get(name.lower())
        return None if value is None else str(value)


class ChannelTransport:
    """The client's side: a ``before-send`` handler sending requests to ``url`` over the
    channel at ``path``; requests to another host go over HTTP as before."""

    def __init__(self, path: str, url: str) -> None:
        self.path = path
        origin = urlsplit(url)
        self._origin = (origin.scheme, origin.netloc)
        self._idle: queue.SimpleQueue[Connection] = queue.SimpleQueue()
        self.answered = 0  # requests answered over the channel (tests read it)

    def __call__(self, request: AWSPreparedRequest, **kwargs: Any) -> AWSResponse | None:
        url = urlsplit(request.url)
        if (url.scheme, url.netloc) != self._origin:
            return None
        headers = {
            k: v.decode("latin-1") if isinstance(v, bytes) else v
            for k, v in request.headers.items()
        }
        target = url.path + (f"?{url.query}" if url.query else "")
        message = _frame(
            {"method": request.method, "target": target, "headers": headers},
            request_body(request),
        )
        try:
            conn = self._connection()
        except OSError as exc:
            raise EndpointConnectionError(endpoint_url=request.url, error=exc) from exc
        try:
            conn.send_bytes(message)
            header, body = _unframe(conn.recv_bytes())
        except BaseException as exc:
            conn.close()  # mid-request: its answer might still come, so it is not reused
            if isinstance(exc, EOFError | OSError):  # the endpoint went away: as over HTTP
                raise EndpointConnectionError(endpoint_url=request.url, error=exc) from exc
            raise
        self._idle.put(conn)
        self.answered += 1
        answer = {**header["headers"], "Content-Length": str(len(body))}
        # AWSResponse takes any mapping (see lambdas.local_runtime.in_process)
        return AWSResponse(request.url, header["status"], answer, ResponseBody(body))  # type: ignore[arg-type]

    def _connection(self) -> Connection:
        try:
            return self._idle.get_nowait()
        except queue.Empty:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(self.path)
            except OSError:
                sock.close()
                raise
            return Connection(sock.detach())


def serve_over_channel(client: LambdaClient, path: str) -> ChannelTransport:
    """Send ``client``'s requests to its own endpoint URL over the channel at ``path``,
    unsigned (the endpoint checks no signature). Returns the registered handler."""
    transport = ChannelTransport(path, str(client.meta.endpoint_url))
    # the stubs type handlers as returning None: these handlers' answers are what counts
    client.meta.events.register(EVENT, cast("Callable[..., None]", transport))
    skip_signing(client)
    return transport
