"""The local API Gateway: HTTP requests in, the Lambda authorizer, then the router, out again.

It does what API Gateway's HTTP API does in front of the router on AWS (ARCHITECTURE §4, §6):

* **Routes.** :data:`ROUTES` is the route table ``infra/flstore_infra/api.py`` deploys (the
  infrastructure imports no runtime code, so ``tests/infra`` checks the two agree). A request
  matching no route goes to the router as the ``$default`` route, unauthenticated; the router
  answers the contract's 404 ``{"error": …}`` for any unmatched route or method, whatever the
  method token. ``HEAD`` is answered as ``GET`` without the body (RFC 9110 §9.3.2): same status
  and headers, ``Content-Length`` included.
* **The Lambda authorizer** (payload format 2.0, simple responses) runs before the router on
  every route but the unauthenticated ones. Its identity source is the ``Authorization`` header
  (:data:`IDENTITY_SOURCES`): when missing or empty, API Gateway answers 401
  ``{"message":"Unauthorized"}`` without calling the authorizer; ``isAuthorized: false`` is 403
  ``{"message":"Forbidden"}``; otherwise its ``context`` reaches the router as
  ``requestContext.authorizer.lambda``. Decisions are cached per identity-source values for
  :data:`AUTHORIZER_CACHE_TTL_S` seconds (``authorizerResultTtlInSeconds``; "for HTTP APIs,
  identity sources are also used as the cache key when caching is enabled", API Gateway V2
  API reference, ``Authorizer.identitySource``). An authorizer that fails or answers something
  other than a simple response is API Gateway's 500 ``{"message":"Internal Server Error"}`` —
  a fault of the deployment, never of what a client sent.
* **Events.** The router gets the event API Gateway builds for a Lambda proxy integration
  (payload 2.0: ``rawPath``, lower-cased ``headers``, ``requestContext.http``, ``routeKey``,
  ``pathParameters``, ``body`` with ``isBase64Encoded`` for bodies that are not UTF-8) and its
  answer (``statusCode``, ``headers``, ``body``) is turned back into an HTTP response.
* **Every answer is JSON.** Bodies past :data:`MAX_PAYLOAD` (API Gateway's 10 MB) are 413; a
  malformed ``Content-Length`` or chunked body is 400; what ``http.server`` itself refuses (a
  bad request line, oversized headers) is answered as a JSON 4xx instead of its HTML page.
"""

from __future__ import annotations

import base64
import functools
import json
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace
from typing import Any
from urllib.parse import SplitResult, urlsplit

from lambdas.local_runtime.network import NetworkModel, Nic, invoke_delay_s

Handler = Callable[[dict[str, Any], Any], dict[str, Any]]
MAX_PAYLOAD = 10 * 1024 * 1024  # API Gateway HTTP API payload limit
READ_TIMEOUT_S = 30.0  # a client announcing more body than it sends is dropped after this
AUTHORIZER_CACHE_TTL_S = 300  # authorizerResultTtlInSeconds in infra/flstore_infra/api.py
IDENTITY_SOURCES = ("$request.header.Authorization",)  # the same as infra's
JSON_HEADERS = {"Content-Type": "application/json"}
UNAUTHORIZED = b'{"message":"Unauthorized"}'
FORBIDDEN = b'{"message":"Forbidden"}'
INTERNAL = b'{"message":"Internal Server Error"}'
# connections the kernel queues until a thread accepts them (listen(2)'s backlog, capped by
# net.core.somaxconn). socketserver's default is 5: a burst of more new connections than that
# (16 chaos clients, one connection per request) overflows the accept queue, Linux drops the
# SYN or the handshake's ACK, and the client's TCP retransmits after 1 s — the ~1,050 ms p99
# of the chaos benchmark — or, when the retransmits run out, sees the connection reset.
LISTEN_BACKLOG = 1024
# an answer's status line, headers and body are buffered and leave in one write (http.server
# flushes after each request): unbuffered, they were two, so the client woke for the headers,
# then again for the body — a wake-up and a context switch more per request on a busy host.
# Answers larger than this are written through as they come.
WRITE_BUFFER_BYTES = 64 * 1024


@dataclass(frozen=True)
class Route:
    """One route of the HTTP API: ``{name}`` segments are path parameters."""

    method: str
    path: str
    authorized: bool = True

    @property
    def key(self) -> str:
        """API Gateway's route key, ``"GET /v1/jobs/{job}/rounds"``."""
        return f"{self.method} {self.path}"

    def match(self, method: str, path: str) -> dict[str, str] | None:
        """The path parameters when ``method`` and ``path`` take this route, else None.

        A parameter matches one non-empty path segment, as in API Gateway's route keys."""
        if method != self.method:
            return None
        found = _pattern(self.path).fullmatch(path)
        return None if found is None else found.groupdict()


@functools.cache  # a route's pattern, built once (every request tries the routes in turn)
def _pattern(path: str) -> re.Pattern[str]:
    parts = re.split(r"\{(\w+)\}", path)
    regex = "".join(
        f"(?P<{part}>[^/]+)" if i % 2 else re.escape(part) for i, part in enumerate(parts)
    )
    return re.compile(regex)


# ARCHITECTURE §4; the unauthenticated routes are those with authorized=False
ROUTES = (
    Route("GET", "/v1/health", authorized=False),
    Route("GET", "/v1/workloads"),
    Route("GET", "/v1/jobs/{job}/rounds"),
    Route("POST", "/v1/jobs/{job}/workloads/{name}"),
    # the OpenAPI document and its Swagger UI, readable without a token
    Route("GET", "/v1/openapi.json", authorized=False),
    Route("GET", "/v1/docs", authorized=False),
)
DEFAULT_ROUTE = "$default"


def match_route(
    method: str, path: str, routes: tuple[Route, ...] = ROUTES
) -> tuple[Route, dict[str, str]] | None:
    """The route a request takes and its path parameters; None sends it to ``$default``."""
    for route in routes:
        params = route.match("GET" if method == "HEAD" else method, path)
        if params is not None:
            return route, params
    return None


def split_target(target: str) -> SplitResult:
    """Path and query of a request target. Only an absolute URI has a host: ``//v1/health`` is
    a path (RFC 9112 §3.2), which ``urlsplit`` alone would read as host ``v1``."""
    if "://" in target.partition("?")[0]:
        return urlsplit(target)
    path, _, query = target.partition("#")[0].partition("?")
    return SplitResult("", "", path, query, "")


def build_event(
    method: str,
    target: str,
    headers: Mapping[str, str],
    body: bytes,
    source_ip: str,
    route_key: str = DEFAULT_ROUTE,
    path_parameters: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """An HTTP API payload-2.0 event for one request."""
    parts = split_target(target)
    lower = {k.lower(): v for k, v in headers.items()}
    try:
        text, is_b64 = body.decode("utf-8"), False
    except UnicodeDecodeError:
        text, is_b64 = base64.b64encode(body).decode(), True
    now = time.time()
    event: dict[str, Any] = {
        "version": "2.0",
        "routeKey": route_key,
        "rawPath": parts.path,
        "rawQueryString": parts.query,
        "headers": lower,
        "requestContext": {
            "accountId": "000000000000",
            "apiId": "local",
            "domainName": lower.get("host", "localhost"),
            "domainPrefix": "local",
            "http": {
                "method": method,
                "path": parts.path,
                "protocol": "HTTP/1.1",
                "sourceIp": source_ip,
                "userAgent": lower.get("user-agent", ""),
            },
            "requestId": uuid.uuid4().hex,
            "routeKey": route_key,
            "stage": "$default",
            "time": time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime(now)),
            "timeEpoch": int(now * 1000),
        },
        "isBase64Encoded": is_b64,
    }
    if parts.query:
        pairs = (p.partition("=") for p in parts.query.split("&"))
        event["queryStringParameters"] = {k: v for k, _, v in pairs}
    if path_parameters:
        event["pathParameters"] = dict(path_parameters)
    if body:
        event["body"] = text
    return event


def authorizer_event(event: Mapping[str, Any], identity: list[str]) -> dict[str, Any]:
    """The REQUEST authorizer event (payload 2.0) API Gateway sends for a proxy event: the same
    request without its body, with ``type``, ``routeArn`` and the ``identitySource`` values."""
    http = event["requestContext"]["http"]
    context = event["requestContext"]
    arn = (
        f"arn:aws:execute-api:us-east-1:{context['accountId']}:{context['apiId']}/"
        f"{context['stage']}/{http['method']}{event['rawPath']}"
    )
    out = {k: v for k, v in event.items() if k not in {"body", "isBase64Encoded"}}
    out.update(type="REQUEST", routeArn=arn, identitySource=list(identity))
    return out


class AuthorizerCache:
    """API Gateway's cache of authorizer answers: keyed by the identity-source values, kept
    ``ttl_s`` seconds (0 disables it)."""

    def __init__(self, ttl_s: float = AUTHORIZER_CACHE_TTL_S) -> None:
        self.ttl_s = ttl_s
        self._answers: dict[tuple[str, ...], tuple[float, dict[str, Any]]] = {}
        self._lock = threading.Lock()

    def get(self, key: tuple[str, ...]) -> dict[str, Any] | None:
        with self._lock:
            hit = self._answers.get(key)
            if hit is None or hit[0] <= time.monotonic():
                self._answers.pop(key, None)
                return None
            return hit[1]

    def put(self, key: tuple[str, ...], answer: dict[str, Any]) -> None:
        if self.ttl_s > 0:
            with self._lock:
                self._answers[key] = (time.monotonic() + self.ttl_s, answer)


def _context(name: str) -> Any:
    return SimpleNamespace(
        function_name=name,
        function_version="$LATEST",
        invoked_function_arn=f"arn:aws:lambda:us-east-1:000000000000:function:{name}",
        memory_limit_in_mb=512,
        aws_request_id=uuid.uuid4().hex,
        log_group_name=f"/aws/lambda/{name}",
        log_stream_name="local",
        get_remaining_time_in_millis=lambda: 30_000,
    )


class _Refusal(Exception):
    """A request the gateway answers itself, before any function runs."""

    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(status)
        self.status = status
        self.body = body


def _error(status: int, code: str, message: str) -> _Refusal:
    return _Refusal(status, json.dumps({"error": {"code": code, "message": message}}).encode())


def _too_large(size: str) -> _Refusal:
    return _error(
        413, "payload_too_large", f"request body of {size} exceeds the limit of {MAX_PAYLOAD} bytes"
    )


class GatewayServer(ThreadingHTTPServer):
    """The gateway's threaded HTTP server: a thread per connection, a deep accept queue."""

    daemon_threads = True
    request_queue_size = LISTEN_BACKLOG

    def __init__(self, address: tuple[str, int], gateway: LocalGateway) -> None:
        super().__init__(address, GatewayRequestHandler)
        self.gateway = gateway


class GatewayRequestHandler(BaseHTTPRequestHandler):
    """Reads one HTTP request off a connection and writes the gateway's answer to it.

    Every method token reaches :meth:`LocalGateway.answer` (:meth:`handle_one_request` takes
    the place of ``http.server``'s ``do_FOO`` dispatch, which answers 501 in HTML for a method
    without one), and what ``http.server`` refuses itself is answered in JSON
    (:meth:`send_error`).
    """

    protocol_version = "HTTP/1.1"
    wbufsize = WRITE_BUFFER_BYTES

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def setup(self) -> None:
        super().setup()
        # answers go out as header + body writes: without NODELAY, Nagle and the
        # client's delayed ACK add ~40 ms to every keep-alive request
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    @property
    def gateway(self) -> LocalGateway:
        """The gateway this request is answered by."""
        assert isinstance(self.server, GatewayServer)
        return self.server.gateway

    def handle_one_request(self) -> None:
        # http.server's own, but for its do_FOO dispatch: every method token is served
        try:
            self.raw_requestline = self.rfile.readline(65537)
            if len(self.raw_requestline) > 65536:
                self.requestline = self.request_version = self.command = ""
                self.send_error(HTTPStatus.REQUEST_URI_TOO_LONG)
                return
            if not self.raw_requestline:
                self.close_connection = True
                return
            if not self.parse_request():
                return  # parse_request answered (send_error)
            self._serve()
            self.wfile.flush()
        except TimeoutError as exc:
            self.log_error("Request timed out: %r", exc)
            self.close_connection = True

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        # what http.server refuses itself (request line, header sizes, version): the
        # client's fault, answered in JSON
        self.close_connection = True
        reason = message or self.responses.get(code, ("bad request",))[0]
        status = code if 400 <= code < 500 else 400
        self._reply(status, JSON_HEADERS, _error(status, "invalid_request", reason).body)

    def _serve(self) -> None:
        try:
            body = self._body()
            status, headers, data = self.gateway.answer(
                self.command,
                self.path,
                self.headers.items(),
                body,
                self.client_address[0],
            )
        except _Refusal as refusal:
            self.close_connection = True
            status, headers, data = refusal.status, JSON_HEADERS, refusal.body
        self.gateway.wait_own_hop()
        self._reply(status, headers, data)

    def _body(self) -> bytes:
        chunked = "chunked" in (self.headers.get("Transfer-Encoding") or "").lower()
        declared = self.headers.get("Content-Length")
        if not chunked and declared is None:
            return b""
        self.connection.settimeout(READ_TIMEOUT_S)
        try:
            if chunked:
                return self._chunks()
            if re.fullmatch(r"\s*[0-9]{1,18}\s*", declared or "") is None:
                raise _error(400, "invalid_request", "Content-Length is not a number")
            length = int(declared or "0")
            if length > MAX_PAYLOAD:
                raise _too_large(f"{length} bytes")
            data = self.rfile.read(length)
            if len(data) < length:
                raise _error(400, "invalid_request", "request body shorter than declared")
            return data
        except (TimeoutError, OSError) as exc:
            raise _error(400, "invalid_request", "request body not received") from exc
        finally:
            self.connection.settimeout(None)

    def _chunks(self) -> bytes:
        # RFC 9112 §7.1: size line in hex (extensions after ';'), data, CRLF; 0 ends
        out = bytearray()
        while True:
            line = self.rfile.readline(1024).split(b";")[0].strip()
            try:
                size = int(line, 16)
            except ValueError:
                raise _error(400, "invalid_request", "malformed chunked body") from None
            if size < 0:
                raise _error(400, "invalid_request", "malformed chunked body")
            if size == 0:
                while self.rfile.readline(1024).strip():  # trailer fields
                    pass
                return bytes(out)
            if len(out) + size > MAX_PAYLOAD:
                raise _too_large("more than that")
            chunk = self.rfile.read(size)
            if len(chunk) < size:
                raise _error(400, "invalid_request", "chunked body cut short")
            out += chunk
            self.rfile.readline(1024)

    def _reply(self, status: int, headers: Mapping[str, str], data: bytes) -> None:
        if self.request_version == "HTTP/0.9":  # answered with a status line anyway
            self.request_version = "HTTP/1.0"
            self.close_connection = True
        self.send_response(status)
        for k, v in headers.items():
            if k.lower() not in {"content-length", "connection", "transfer-encoding"}:
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":  # RFC 9110 §9.3.2: GET's headers, no content
            self.wfile.write(data)


class LocalGateway:
    """A threaded HTTP server in front of ``handler`` (the router) and ``authorizer``.

    ``authorizer`` None serves every route unauthenticated (the router still checks tokens).
    With a ``network`` model, every request waits API Gateway's own hop (``api_gateway_ms``),
    each call of the authorizer a Lambda invoke's round trip, and each call of ``handler`` an
    invoke's round trip plus the request and answer through ``router_nic`` (the router
    function's interface; a fresh one if not given) — on top of the local path, after the
    local work, so the router's instance is free while the answer travels.
    """

    def __init__(
        self,
        handler: Handler,
        host: str = "127.0.0.1",
        port: int = 0,
        name: str = "router",
        authorizer: Handler | None = None,
        routes: tuple[Route, ...] = ROUTES,
        authorizer_ttl_s: float = AUTHORIZER_CACHE_TTL_S,
        network: NetworkModel | None = None,
        router_nic: Nic | None = None,
    ) -> None:
        self.handler = handler
        self.network = network
        if router_nic is None and network is not None:
            router_nic = network.lambda_nic
        self.router_nic = router_nic
        self.name = name
        self.authorizer = authorizer
        self.routes = routes
        self.cache = AuthorizerCache(authorizer_ttl_s)
        self.authorizer_calls = 0
        self._server = GatewayServer((host, port), self)
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ one request

    def answer(
        self,
        method: str,
        target: str,
        headers: Any,
        body: bytes,
        source_ip: str,
    ) -> tuple[int, dict[str, str], bytes]:
        """Status, headers and body of the answer to one request (route, authorizer, router)."""
        joined: dict[str, str] = {}
        for k, v in headers:  # repeated headers reach the function comma-joined, as on AWS
            k = k.lower()
            joined[k] = f"{joined[k]},{v}" if k in joined else v
        path = split_target(target).path
        taken = match_route(method, path, self.routes)
        route, params = taken if taken is not None else (None, {})
        event = build_event(
            method,
            target,
            joined,
            body,
            source_ip,
            route_key=route.key if route is not None else DEFAULT_ROUTE,
            path_parameters=params,
        )
        if route is not None and route.authorized and self.authorizer is not None:
            refused = self._authorize(event, joined.get("authorization", ""))
            if refused is not None:
                return refused
        try:
            answer = self.handler(event, _context(self.name))
            raw = answer.get("body") or ""
            data = base64.b64decode(raw) if answer.get("isBase64Encoded") else raw.encode()
            status, out = int(answer.get("statusCode", 200)), dict(answer.get("headers") or {})
        except Exception:  # the integration failed: API Gateway answers 500
            status, out, data = 500, JSON_HEADERS, INTERNAL
        if self.network is not None and self.router_nic is not None:
            time.sleep(invoke_delay_s(self.network, self.router_nic, len(body) + len(data)))
        return status, out, data

    def wait_own_hop(self) -> None:
        """API Gateway's own latency under the network model (none without one)."""
        if self.network is not None:
            time.sleep(self.network.api_gateway_ms / 1e3)

    def _authorize(
        self, event: dict[str, Any], identity: str
    ) -> tuple[int, dict[str, str], bytes] | None:
        """None when the authorizer lets the request through (its context put in the event),
        else API Gateway's own answer."""
        if not identity.strip():  # identity source missing: 401, the authorizer is not called
            return 401, JSON_HEADERS, UNAUTHORIZED
        key = (identity,)
        decision = self.cache.get(key)
        if decision is None:
            assert self.authorizer is not None
            self.authorizer_calls += 1
            if self.network is not None:  # API Gateway invokes the authorizer function
                time.sleep(self.network.lambda_invoke_ms / 1e3)
            try:
                decision = self.authorizer(
                    authorizer_event(event, [identity]), _context(f"{self.name}-authorizer")
                )
            except Exception:
                return 500, JSON_HEADERS, INTERNAL
            if not isinstance(decision, dict) or not isinstance(decision.get("isAuthorized"), bool):
                return 500, JSON_HEADERS, INTERNAL
            self.cache.put(key, decision)
        if not decision["isAuthorized"]:
            return 403, JSON_HEADERS, FORBIDDEN
        event["requestContext"]["authorizer"] = {"lambda": dict(decision.get("context") or {})}
        return None

    # ------------------------------------------------------------------ lifecycle

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> LocalGateway:
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> LocalGateway:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
