"""A fault-injecting HTTP proxy in front of the local S3 (the chaos benchmark's S3 faults), and
the S3 hop of the network model (``FaultProxy(upstream, link=...)``).

S3 misbehaves in a few documented ways that FLStore's clients must survive: a request that is
slow to answer, ``503 SlowDown`` when a prefix is over its request rate, ``500 InternalError``
("retry the request", S3 error responses reference), and a connection reset before any answer.
:class:`FaultProxy` sits between the cache nodes (their ``FLSTORE_S3_ENDPOINT`` points at it:
``StackConfig(s3_endpoint=proxy.url)``) and the moto server, forwarding every request unchanged
— method, path, query, headers (``Host`` included, so SigV4 signatures still match) and body —
and, while :attr:`FaultProxy.faults` says so, injecting each fault with its probability before
the request reaches S3. Injected errors happen *instead of* forwarding, as S3's do (a throttled
or failed PUT stored nothing); a *lost answer* is forwarded and then the connection is closed
unanswered, so the client retries a request S3 already carried out (a PUT done twice, a commit
whose answer never came: what idempotent writes are for); a *cut* answer is sent with its full
``Content-Length`` but only half its body before the connection is closed (a reset
mid-transfer), which botocore's retries do not cover: the reader must resume or fail typed
(:class:`flstore_core.storage.s3.S3Stream`).

It counts what it did (:meth:`FaultProxy.counts`), so a benchmark reports the faults its
clients survived. An ``observer`` is told of every request S3 carried out (:class:`Forwarded`):
what the stack's notifying front (:mod:`lambdas.local_runtime.s3_notifications`) turns into
S3 event notifications. boto3's retry modes (``legacy``/``standard``/``adaptive``) retry all but the
cut answer.
"""

from __future__ import annotations

import contextlib
import http.client
import random
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from urllib.parse import urlsplit

from lambdas.local_runtime.gateway import LISTEN_BACKLOG
from lambdas.local_runtime.network import S3Link

HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
}

# S3's error bodies (S3 API reference, "Error responses"): boto3 reads the Code element
SLOW_DOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)
INTERNAL_ERROR = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>InternalError</Code>'
    b"<Message>We encountered an internal error. Please try again.</Message></Error>"
)


class _ProxyServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = LISTEN_BACKLOG  # a burst of S3 requests is not a fault to inject


@dataclass(frozen=True)
class Faults:
    """Probabilities of each fault per request (they add up to at most 1), and the delay of a
    slow answer. ``Faults()`` injects nothing: the proxy is transparent."""

    slow: float = 0.0
    slow_s: tuple[float, float] = (0.5, 2.0)  # uniform delay before forwarding
    slow_down: float = 0.0  # 503 SlowDown
    internal: float = 0.0  # 500 InternalError
    drop: float = 0.0  # the connection closed without an answer, the request never forwarded
    lost_answer: float = 0.0  # forwarded (S3 did it), then the connection closed unanswered
    cut: float = 0.0  # forwarded and answered, the body cut off halfway (a reset mid-transfer)

    def __post_init__(self) -> None:
        shares = (self.slow, self.slow_down, self.internal, self.drop, self.lost_answer, self.cut)
        if any(p < 0 for p in shares) or sum(shares) > 1.0:
            raise ValueError(f"fault probabilities must be >= 0 and add up to <= 1: {shares}")

    def pick(self, rng: random.Random) -> str | None:
        """The fault for one request (a field's name) or None."""
        x = rng.random()
        for name in ("slow", "slow_down", "internal", "drop", "lost_answer", "cut"):
            p = float(getattr(self, name))
            if x < p:
                return name
            x -= p
        return None


@dataclass(frozen=True)
class Forwarded:
    """A request the proxy forwarded and S3 answered: what an ``observer`` is told."""

    method: str
    path: str  # with its query
    headers: dict[str, str]  # the request's
    status: int
    response_headers: dict[str, str]
    body: bytes  # the answer's


class FaultProxy:
    """``with FaultProxy(upstream) as proxy:`` — ``proxy.url`` forwards to ``upstream``;
    assign ``proxy.faults`` at any time to change what is injected."""

    def __init__(
        self,
        upstream: str,
        host: str = "127.0.0.1",
        seed: int = 0,
        link: S3Link | None = None,
        observer: Callable[[Forwarded], None] | None = None,
    ) -> None:
        parts = urlsplit(upstream)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"upstream must be an http:// URL, got {upstream!r}")
        self.upstream = (parts.hostname, parts.port or 80)
        self.faults = Faults()
        # with a link, every forwarded answer waits as long as S3 would make its client wait
        # on AWS (lambdas.local_runtime.network): the proxy is then the S3 hop of one client
        self.link = link
        # told of every answered request before its answer goes back (it must not block)
        self.observer = observer
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        self._server = _ProxyServer((host, 0), self._handler_class())
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def counts(self) -> dict[str, int]:
        """Requests seen (``requests``) and faults injected, by kind."""
        with self._lock:
            return dict(self._counts)

    def decide(self) -> str | None:
        with self._lock:
            self._counts["requests"] += 1
            fault = self.faults.pick(self._rng)
            if fault is not None:
                self._counts[fault] += 1
            return fault

    def answered(
        self,
        method: str,
        path: str,
        headers: dict[str, str],
        status: int,
        response_headers: list[tuple[str, str]],
        body: bytes,
    ) -> None:
        """Tell the observer, if any, of a request S3 answered."""
        if self.observer is not None:
            self.observer(Forwarded(method, path, headers, status, dict(response_headers), body))

    def start(self) -> FaultProxy:
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass  # one line per S3 request otherwise

            def _body(self) -> bytes:
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length > 0 else b""

            def _error(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _hang_up(self) -> None:
                self.close_connection = True
                with contextlib.suppress(OSError):
                    self.connection.shutdown(socket.SHUT_RDWR)

            def _forward(self) -> None:
                body = self._body()
                fault = proxy.decide()
                if fault == "drop":  # reset: the client sees a connection error, S3 saw nothing
                    self._hang_up()
                    return
                if fault == "slow_down":
                    self._error(503, SLOW_DOWN)
                    return
                if fault == "internal":
                    self._error(500, INTERNAL_ERROR)
                    return
                if fault == "slow":
                    low, high = proxy.faults.slow_s
                    time.sleep(low + (high - low) * proxy._rng.random())
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=120)
                try:
                    conn.request(self.command, self.path, body=body or None, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                    out_headers = resp.getheaders()
                    status = resp.status
                finally:
                    conn.close()
                proxy.answered(self.command, self.path, headers, status, out_headers, data)
                if proxy.link is not None:
                    proxy.link.wait(self.command, len(body) + len(data))
                if fault == "lost_answer":
                    self._hang_up()
                    return
                self.send_response(status)
                for k, v in out_headers:
                    if k.lower() not in HOP_BY_HOP and k.lower() != "content-length":
                        self.send_header(k, v)
                if self.command != "HEAD":
                    self.send_header("Content-Length", str(len(data)))
                else:
                    length = dict((k.lower(), v) for k, v in out_headers).get("content-length")
                    if length is not None:
                        self.send_header("Content-Length", length)
                self.end_headers()
                if self.command != "HEAD":
                    if fault == "cut" and len(data) > 1:  # the answer began: botocore does
                        with contextlib.suppress(OSError):  # not retry a body cut short
                            self.wfile.write(data[: len(data) // 2])
                            self.wfile.flush()
                        self._hang_up()
                        return
                    with contextlib.suppress(OSError):  # the client gave up waiting
                        self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

        return Handler
