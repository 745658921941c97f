"""The local API Gateway: HTTP requests in, HTTP API v2.0 proxy events to the router, out again.

It builds the same event API Gateway's HTTP API builds for a Lambda proxy integration (payload
format 2.0: ``rawPath``, lower-cased ``headers``, ``requestContext.http``, ``body`` with
``isBase64Encoded``) and turns the handler's answer (``statusCode``, ``headers``, ``body``) back
into an HTTP response, so the router handler runs here exactly as on AWS.
"""

from __future__ import annotations

import base64
import json
import socket
import threading
import time
import uuid
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace
from typing import Any
from urllib.parse import urlsplit

Handler = Callable[[dict[str, Any], Any], dict[str, Any]]
MAX_PAYLOAD = 10 * 1024 * 1024  # API Gateway HTTP API payload limit


def build_event(
    method: str, target: str, headers: dict[str, str], body: bytes, source_ip: str
) -> dict[str, Any]:
    """An HTTP API payload-2.0 event for one request."""
    parts = urlsplit(target)
    lower = {k.lower(): v for k, v in headers.items()}
    try:
        text, is_b64 = body.decode("utf-8"), False
    except UnicodeDecodeError:
        text, is_b64 = base64.b64encode(body).decode(), True
    now = time.time()
    event: dict[str, Any] = {
        "version": "2.0",
        "routeKey": "$default",
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
            "routeKey": "$default",
            "stage": "$default",
            "time": time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime(now)),
            "timeEpoch": int(now * 1000),
        },
        "isBase64Encoded": is_b64,
    }
    if parts.query:
        pairs = (p.partition("=") for p in parts.query.split("&"))
        event["queryStringParameters"] = {k: v for k, _, v in pairs}
    if body:
        event["body"] = text
    return event


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


class LocalGateway:
    """A threaded HTTP server handing every request to ``handler`` as a v2.0 event."""

    def __init__(
        self, handler: Handler, host: str = "127.0.0.1", port: int = 0, name: str = "router"
    ) -> None:
        self.handler = handler
        self.name = name
        gateway = self

        class RequestHandler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def setup(self) -> None:
                super().setup()
                # answers go out as header + body writes: without NODELAY, Nagle and the
                # client's delayed ACK add ~40 ms to every keep-alive request
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                if length > MAX_PAYLOAD:
                    self._reply(
                        413,
                        {"Content-Type": "application/json"},
                        json.dumps(
                            {"error": {"code": "payload_too_large", "message": "request too large"}}
                        ).encode(),
                    )
                    self.close_connection = True
                    return
                body = self.rfile.read(length) if length else b""
                event = build_event(
                    self.command,
                    self.path,
                    dict(self.headers.items()),
                    body,
                    self.client_address[0],
                )
                try:
                    answer = gateway.handler(event, _context(gateway.name))
                except Exception:  # the integration failed: API Gateway answers 500
                    self._reply(
                        500,
                        {"Content-Type": "application/json"},
                        b'{"message":"Internal Server Error"}',
                    )
                    return
                raw = answer.get("body") or ""
                data = base64.b64decode(raw) if answer.get("isBase64Encoded") else raw.encode()
                self._reply(int(answer.get("statusCode", 200)), answer.get("headers") or {}, data)

            def _reply(self, status: int, headers: dict[str, str], data: bytes) -> None:
                self.send_response(status)
                for k, v in headers.items():
                    if k.lower() not in {"content-length", "connection"}:
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = _serve
            do_POST = _serve
            do_PUT = _serve
            do_DELETE = _serve

        self._server = ThreadingHTTPServer((host, port), RequestHandler)
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

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
