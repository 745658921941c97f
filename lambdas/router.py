"""AWS Lambda handler of the router: the HTTP API (payload 2.0) of ARCHITECTURE §4.

Routes are declared with aws-lambda-powertools' ``APIGatewayHttpResolver``; every route is a
one-line call into :class:`flstore_core.routing.router.Router`, which holds all the logic. Typed
errors become ``{"error": {"code", "message"}}`` with their status; anything unexpected is
logged and answered as a 500 without internals.

The routes' annotations (the models of ``flstore_core.routing.openapi``) are what the OpenAPI
3.1 document served at ``GET /v1/openapi.json`` (Swagger UI at ``GET /v1/docs``) is generated
from, so it lists exactly the routes served. Validation is on
(``enable_validation=True``): an answer of the GET routes that does not match its model is a
bug caught here, and a request Powertools refuses is the contract's 400 ``{"error": …}``, not its
default 422. The workload route does not let Powertools read its body: the router authenticates
before it parses (a 401/403 comes before a 400, ARCHITECTURE §4) and refuses a body that is not
UTF-8 or JSON with its own 400, so the body model there documents and the router decides.
"""

from __future__ import annotations

import base64
import binascii
import json
import traceback
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

from aws_lambda_powertools import Logger
from aws_lambda_powertools.event_handler import APIGatewayHttpResolver, Response, content_types
from aws_lambda_powertools.event_handler.openapi.exceptions import RequestValidationError
from aws_lambda_powertools.event_handler.openapi.models import (
    HTTPBearer,
    Server,
)
from aws_lambda_powertools.event_handler.openapi.params import Body, Query
from aws_lambda_powertools.event_handler.openapi.params import Path as PathParam

from flstore_core import config
from flstore_core.errors import FLStoreError, NotFoundError, PayloadTooLargeError, ValidationError
from flstore_core.ids import MAX_ROUND
from flstore_core.routing.commit_warming import CommitWarmer, is_s3_event
from flstore_core.routing.invoker import one_line
from flstore_core.routing.openapi import (
    JOB_PATTERN,
    ErrorResponse,
    GatewayMessage,
    Health,
    RoundsAnswer,
    RunAnswer,
    WorkloadsAnswer,
    run_request_model,
    workload_names,
    workload_params_models,
    workload_request_models,
)
from flstore_core.routing.paging import MAX_LIMIT
from flstore_core.routing.request_body import MAX_BODY_BYTES
from flstore_core.routing.router import Router
from flstore_core.routing.update_staging import UpdateStager

logger = Logger(service="flstore-router")


def _json(status: int, body: dict[str, Any]) -> Response[str]:
    return Response(
        status_code=status, content_type=content_types.APPLICATION_JSON, body=json.dumps(body)
    )


TITLE = "FLStore API"
API_VERSION = "1"
OPENAPI_PATH = "/v1/openapi.json"
DOCS_PATH = "/v1/docs"
RunRequest = run_request_model()


def _error(description: str, *, gateway: bool = False) -> dict[str, Any]:
    """A documented error answer: the contract's body, or also API Gateway's own."""
    model: Any = ErrorResponse | GatewayMessage if gateway else ErrorResponse
    return {"description": description, "content": {"application/json": {"model": model}}}


# Every authenticated route: the authorizer's 401/403 and the router's own, and its 503s.
_AUTHENTICATED: dict[int, Any] = {
    401: _error(
        "no bearer token: API Gateway's {'message': 'Unauthorized'} (the router answers "
        "{'error': …} when invoked without the gateway)",
        gateway=True,
    ),
    403: _error(
        "API Gateway's {'message': 'Forbidden'} for a token the authorizer refuses, the "
        "router's {'error': …} for a token not granted this job",
        gateway=True,
    ),
    503: _error("no cache node could answer in time; retry (the error says when)"),
}
_JOB: dict[int, Any] = {
    400: _error("an invalid job id, body or param (code says which)"),
    404: _error("an unknown job, round, client or workload"),
}
_RUN: dict[int, Any] = {413: _error("a request body past 256 KiB, or an answer too large")}
_SECURITY: list[dict[str, list[str]]] = [{"bearer": []}]
DESCRIPTION = (
    "Serverless storage and compute for the non-training workloads of federated learning "
    "(ARCHITECTURE §4). Every route but health and this documentation takes a bearer token. "
    'Errors have one of two shapes: the router\'s {"error": {"code", "message"}} '
    '(400, 401, 403, 404, 413, 503) and API Gateway\'s own {"message": ...} (401 without a '
    "token, 403 when the authorizer refuses it). Generated from the router's routes "
    "(lambdas/router.py) and the workload registry: it cannot drift from what is served."
)


def _ok(description: str, content: dict[str, Any] | None = None) -> dict[int, Any]:
    """The documented 200; without ``content`` its schema is the route's return annotation."""
    return {200: {"description": description, **({"content": content} if content else {})}}


def _job_param(description: str) -> Any:
    # the pattern is documented, not enforced here: flstore_core.ids answers the contract's 400
    return PathParam(description=description, json_schema_extra={"pattern": JOB_PATTERN})


# each app's router, for the events that are not HTTP requests (S3 notifications: handle)
_ROUTERS: weakref.WeakKeyDictionary[APIGatewayHttpResolver, Callable[[], Router]] = (
    weakref.WeakKeyDictionary()
)


def build_app(router: Callable[[], Router]) -> APIGatewayHttpResolver:
    """The resolver with every route, bound to a router factory (called once, lazily)."""
    app = APIGatewayHttpResolver(enable_validation=True)
    holder: list[Router] = []

    def r() -> Router:
        if not holder:
            holder.append(router())
        return holder[0]

    _ROUTERS[app] = r
    _api_routes(app, r)
    _document_routes(app)
    _error_handlers(app)
    return app


def _authorization(app: APIGatewayHttpResolver) -> str | None:
    """The request's ``Authorization`` header."""
    return app.current_event.headers.get("authorization")


def _raw_body(app: APIGatewayHttpResolver) -> bytes | str:
    """The request's body: the raw bytes, not Powertools' decoded_body, since a body that is
    not UTF-8 arrives base64-encoded and is the client's 400 (parse_body), not a
    UnicodeDecodeError."""
    event = app.current_event
    raw = event.body or ""
    if not event.is_base64_encoded:
        return raw
    try:
        return base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValidationError("request body is not valid base64") from exc


def _api_routes(app: APIGatewayHttpResolver, r: Callable[[], Router]) -> None:
    """The routes of the API (ARCHITECTURE §4), each a call into the router."""

    @app.get(
        "/v1/health",
        summary="Liveness of the router",
        tags=["service"],
        responses=_ok("the router is up"),
    )
    def health() -> Health:
        return Health.model_validate(r().health())

    @app.get(
        "/v1/workloads",
        summary="The workload catalogue: names, classes, params with types, defaults, bounds",
        tags=["workloads"],
        responses={**_ok("every registered workload"), **_AUTHENTICATED},
        security=_SECURITY,
    )
    def workloads() -> WorkloadsAnswer:
        return WorkloadsAnswer.model_validate(r().workloads(_authorization(app)))

    @app.get(
        "/v1/jobs/<job>/rounds",
        summary="The committed rounds of a job",
        tags=["jobs"],
        responses={**_ok("the job's committed rounds"), **_JOB, **_AUTHENTICATED},
        security=_SECURITY,
    )
    def rounds(
        job: Annotated[str, _job_param("the job id")],
        limit: Annotated[
            int | None, Query(ge=1, le=MAX_LIMIT, description="rounds per page (default 1000)")
        ] = None,
        after: Annotated[
            int | None, Query(ge=0, le=MAX_ROUND, description="list the rounds after this one")
        ] = None,
    ) -> RoundsAnswer:
        authorization = _authorization(app)
        return RoundsAnswer.model_validate(r().rounds(authorization, job, limit, after))

    @app.post(
        "/v1/jobs/<job>/workloads/<name>",
        summary="Run a workload on a job's rounds",
        description=(
            "The body is the request of the workload named in the path: components "
            "<Workload>Request (its round fields and its params, <Workload>Params), listed by "
            "name under components.x-workload-requests (and the params under "
            "components.x-workload-params). No body runs the workload's defaults (a round-"
            "class workload needs its 'round')."
        ),
        tags=["workloads"],
        responses={**_ok("the workload's answer"), **_JOB, **_RUN, **_AUTHENTICATED},
        security=_SECURITY,
        # the router reads the body itself, after authenticating (see the module docstring)
        enable_validation=False,
    )
    def run(
        job: Annotated[str, _job_param("the job id")],
        name: Annotated[
            str,
            PathParam(
                description="the workload (GET /v1/workloads)",
                json_schema_extra={"enum": workload_names()},
            ),
        ],
        # optional, but an object when sent: parse_body refuses a JSON null (so no "| None")
        request: Annotated[RunRequest, Body(embed=False)] = None,  # type: ignore[valid-type]
    ) -> RunAnswer:
        authorization, raw = _authorization(app), _raw_body(app)
        return r().run(authorization, job, name, raw)  # type: ignore[return-value]


def _document_routes(app: APIGatewayHttpResolver) -> None:
    """The API's own documentation: the OpenAPI document and Swagger UI over it."""
    document: list[str] = []

    @app.get(
        OPENAPI_PATH,
        summary="This document (OpenAPI 3.1)",
        tags=["service"],
        responses=_ok("the document", {"application/json": {"schema": {"type": "object"}}}),
    )
    def openapi() -> Response[str]:
        if not document:
            document.append(json.dumps(openapi_document(app), separators=(",", ":")))
        return Response(200, content_types.APPLICATION_JSON, document[0])

    @app.get(
        DOCS_PATH,
        summary="Swagger UI of this document",
        tags=["service"],
        responses=_ok("an HTML page", {"text/html": {"schema": {"type": "string"}}}),
    )
    def docs() -> Response[str]:
        return Response(200, "text/html; charset=utf-8", swagger_html())


def _error_handlers(app: APIGatewayHttpResolver) -> None:
    """Typed errors as ``{"error": {"code", "message"}}`` with their status; the rest a 500."""

    @app.exception_handler(RequestValidationError)  # type: ignore[untyped-decorator]
    def invalid(exc: RequestValidationError) -> Response[str]:
        # the contract's 400, not Powertools' default 422
        errors = exc.errors()
        where = ".".join(str(p) for p in errors[0].get("loc", ())) if errors else "request"
        what = errors[0].get("msg", "invalid") if errors else "invalid"
        return _json(400, ValidationError(f"invalid {where}: {what}").to_dict())

    @app.exception_handler(FLStoreError)  # type: ignore[untyped-decorator]
    def flstore_error(exc: FLStoreError) -> Response[str]:
        if exc.status < 500:
            return _json(exc.status, exc.to_dict())
        return _server_error(app, exc.status, exc.code, exc.message, exc)

    @app.not_found
    def not_found(exc: Exception) -> Response[str]:
        event = app.current_event
        message = f"no route {event.http_method} {event.path}"
        return _json(404, NotFoundError(message).to_dict())

    @app.exception_handler(Exception)  # type: ignore[untyped-decorator]
    def unexpected(exc: Exception) -> Response[str]:
        message = "internal error: report it with the request id"
        return _server_error(app, 500, "internal", message, exc)


def _server_error(
    app: APIGatewayHttpResolver, status: int, code: str, message: str, exc: BaseException
) -> Response[str]:
    """A 5xx: the code, the message and the request id for the caller; what happened to the
    log as ONE line of at most ``LOG_DETAIL_CHARS`` (a RecursionError's traceback was ~345 KB
    per 1 KB request), the innermost frame named instead of the traceback."""
    context = app.lambda_context
    request_id = str(getattr(context, "aws_request_id", "") or "unknown")
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" at {frames[-1].filename}:{frames[-1].lineno}" if frames else ""
    detail = f"{status} {code} request {request_id}: {type(exc).__name__}: {exc}{where}"
    logger.error(one_line(detail))
    return _json(status, {"error": {"code": code, "message": message, "request_id": request_id}})


def openapi_document(app: APIGatewayHttpResolver) -> dict[str, Any]:
    """The OpenAPI 3.1 document of ``app``'s routes, as Powertools generates it from their
    declarations, with the contract's 400 instead of Powertools' 422 and each workload's
    request and params models named under ``components.x-workload-requests`` and
    ``components.x-workload-params``."""
    from aws_lambda_powertools.event_handler.openapi.compat import model_json

    schema = app.get_openapi_schema(
        title=TITLE,
        version=API_VERSION,
        description=DESCRIPTION,
        servers=[Server(url="/")],
        security_schemes={"bearer": HTTPBearer(description="the job's bearer token")},
    )
    doc: dict[str, Any] = json.loads(model_json(schema, by_alias=True, exclude_none=True))
    for operations in doc.get("paths", {}).values():
        for operation in operations.values():
            operation.get("responses", {}).pop("422", None)
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    # Powertools' 422 bodies: this API answers its 400 {"error": …} instead
    for unused in ("HTTPValidationError", "ValidationError", "ResponseValidationError"):
        schemas.pop(unused, None)
    doc["components"]["x-workload-params"] = {
        name: {"$ref": f"#/components/schemas/{model.__name__}"}
        for name, model in workload_params_models().items()
    }
    doc["components"]["x-workload-requests"] = {
        name: {"$ref": f"#/components/schemas/{model.__name__}"}
        for name, model in workload_request_models().items()
    }
    return doc


def swagger_html() -> str:
    """Swagger UI on ``OPENAPI_PATH``, with the UI's script and style Powertools ships inlined
    (no third-party host is needed to read the API's documentation)."""
    from aws_lambda_powertools.event_handler.openapi import swagger_ui

    here = Path(swagger_ui.__file__).parent
    js = (here / "swagger-ui-bundle.min.js").read_text(encoding="utf-8")
    css = (here / "swagger-ui.min.css").read_text(encoding="utf-8")
    return SWAGGER_PAGE.format(css=css, js=js, url=OPENAPI_PATH, title=TITLE)


SWAGGER_PAGE = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{title}</title><style>{css}</style></head>
<body><div id="swagger-ui"></div><script>{js}</script>
<script>SwaggerUIBundle({{url: "{url}", dom_id: "#swagger-ui"}});</script></body></html>
"""


app = build_app(Router.from_env)


def warm_commits(router: Router, event: dict[str, Any]) -> dict[str, Any]:
    """An S3 event notification of written updates and manifests: stage each update on its
    round's owners before the commit (:mod:`flstore_core.routing.update_staging`, never
    raises), then warm each round whose manifest it names
    (:mod:`flstore_core.routing.commit_warming`); a round that could not be warmed raises, so
    Lambda's asynchronous retry delivers the event again."""
    staged = UpdateStager(router).handle(event)
    if staged["staged"] or staged["skipped"] or staged["failed"]:
        logger.info({"update_staging": staged})
    report = CommitWarmer(router.store, router, config.HOT_ROUNDS.get_int()).handle(event)
    logger.info({"commit_warming": report})
    return report


def handle(app_: APIGatewayHttpResolver, event: dict[str, Any], context: Any) -> dict[str, Any]:
    """Resolve one event, refusing oversized bodies before they are decoded; an S3 event
    notification (a round committed) warms the round instead (:func:`warm_commits`)."""
    if is_s3_event(event):
        return warm_commits(_ROUTERS[app_](), event)
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
    # Powertools keeps the event it resolves in a class attribute (BaseRouter.current_event),
    # one per process: a process resolves one request at a time, as a Lambda instance serves
    # one (the local stack runs the router as a function of its Lambda endpoint for this)
    return app_.resolve(event, context)


@logger.inject_lambda_context(log_event=False)
def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    """API Gateway HTTP API (payload 2.0) entry point, and S3's event notifications of the
    bucket's manifest writes (commit-driven warming)."""
    return handle(app, event, context)
