"""AWS Lambda handler of the router: the HTTP API (payload 2.0) of ARCHITECTURE §4.

Routes are declared with aws-lambda-powertools' ``APIGatewayHttpResolver``; every route is a
one-line call into :class:`flstore_core.routing.router.Router`, which holds all the logic. Typed
errors become ``{"error": {"code", "message"}}`` with their status; anything unexpected is
logged and answered as a 500 without internals.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable
from typing import Any

from aws_lambda_powertools import Logger
from aws_lambda_powertools.event_handler import APIGatewayHttpResolver, Response, content_types

from flstore_core.errors import FLStoreError, NotFoundError, PayloadTooLargeError, ValidationError
from flstore_core.routing.request_body import MAX_BODY_BYTES
from flstore_core.routing.router import Router

logger = Logger(service="flstore-router")


def _json(status: int, body: dict[str, Any]) -> Response[str]:
    return Response(
        status_code=status, content_type=content_types.APPLICATION_JSON, body=json.dumps(body)
    )


def build_app(router: Callable[[], Router]) -> APIGatewayHttpResolver:
    """The resolver with every route, bound to a router factory (called once, lazily)."""
    app = APIGatewayHttpResolver()
    holder: list[Router] = []

    def r() -> Router:
        if not holder:
            holder.append(router())
        return holder[0]

    def auth() -> str | None:
        return app.current_event.headers.get("authorization")

    def body() -> bytes | str:
        # the raw bytes, not Powertools' decoded_body: a body that is not UTF-8 arrives
        # base64-encoded and is the client's 400 (parse_body), not a UnicodeDecodeError
        event = app.current_event
        raw = event.body or ""
        if not event.is_base64_encoded:
            return raw
        try:
            return base64.b64decode(raw, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ValidationError("request body is not valid base64") from exc

    @app.get("/v1/health")
    def health() -> dict[str, Any]:
        return r().health()

    @app.get("/v1/workloads")
    def workloads() -> dict[str, Any]:
        return r().workloads(auth())

    @app.get("/v1/jobs/<job>/rounds")
    def rounds(job: str) -> dict[str, Any]:
        return r().rounds(auth(), job)

    @app.post("/v1/jobs/<job>/workloads/<name>")
    def run(job: str, name: str) -> dict[str, Any]:
        return r().run(auth(), job, name, body())

    @app.exception_handler(FLStoreError)  # type: ignore[untyped-decorator]
    def flstore_error(exc: FLStoreError) -> Response[str]:
        return _json(exc.status, exc.to_dict())

    @app.not_found
    def not_found(exc: Exception) -> Response[str]:
        event = app.current_event
        message = f"no route {event.http_method} {event.path}"
        return _json(404, NotFoundError(message).to_dict())

    @app.exception_handler(Exception)  # type: ignore[untyped-decorator]
    def unexpected(exc: Exception) -> Response[str]:
        logger.exception("unexpected error")
        return _json(500, {"error": {"code": "internal", "message": "internal error"}})

    return app


app = build_app(Router.from_env)


def handle(app_: APIGatewayHttpResolver, event: dict[str, Any], context: Any) -> dict[str, Any]:
    """Resolve one event, refusing oversized bodies before they are decoded."""
    body = event.get("body") or ""
    if len(body) > MAX_BODY_BYTES * 4 // 3 + 4:
        exc = PayloadTooLargeError(f"request body exceeds the limit of {MAX_BODY_BYTES} bytes")
        return {
            "statusCode": exc.status,
            "headers": {"Content-Type": "application/json"},
            "body": json.dumps(exc.to_dict()),
            "isBase64Encoded": False,
        }
    if event.get("requestContext", {}).get("http", {}).get("method") == "HEAD":
        # HEAD is GET without the content (RFC 9110 §9.3.2); the gateway drops the body
        http = {**event["requestContext"]["http"], "method": "GET"}
        event = {**event, "requestContext": {**event["requestContext"], "http": http}}
    return app_.resolve(event, context)


@logger.inject_lambda_context(log_event=False)
def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    """API Gateway HTTP API (payload 2.0) entry point."""
    return handle(app, event, context)
