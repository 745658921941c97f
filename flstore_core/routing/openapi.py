"""The pydantic models the HTTP API's OpenAPI 3.1 document is generated from.

``lambdas/router.py`` annotates each route with these models (request body, answer, error
answers), so the document Powertools generates from the resolver's routes cannot drift from the
routes served. The workloads' param schemas are generated from the registry's :class:`Param`
definitions (:func:`flstore_core.workloads.catalogue` names them): a new workload or param
appears in the document without editing it.

The models document; they do not decide. The router's own checks (``flstore_core.ids``,
``request_body.parse_body``, ``Workload.validate``) stay the source of truth and answer with the
contract's ``{"error": {"code", "message"}}`` (ARCHITECTURE §4); where JSON Schema cannot say as
much (a float must be finite, an array holds at most ``MAX_ARRAY_ITEMS`` values in all) the
models are more permissive than the router.

Two error shapes reach a client: the contract's ``{"error": …}`` from the router (400, 401,
403, 404, 413, 503), and API Gateway's own ``{"message": …}`` (401 without a token, 403 when the
Lambda authorizer refuses it, 404/413/429 it answers itself).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, RootModel, create_model

from flstore_core.ids import MAX_ROUND
from flstore_core.workloads import INT_MAX, INT_MIN, Param, Workload, catalogue, get

JOB_PATTERN = "^[a-z0-9][a-z0-9-]{0,62}$"

_TYPES: dict[str, Any] = {"int": int, "float": float, "bool": bool, "str": str, "array": list[Any]}


class _Open(BaseModel):
    """An answer that may gain fields: clients must ignore what they do not know."""

    model_config = ConfigDict(extra="allow")


class _Closed(BaseModel):
    """A request object: the router refuses unknown fields with a 400."""

    model_config = ConfigDict(extra="forbid")


class ErrorBody(BaseModel):
    """What went wrong: the ``error`` member of :class:`ErrorResponse`."""

    code: str = Field(description="machine-readable error code, e.g. invalid_params, not_found")
    message: str = Field(description="what went wrong and what to change")
    request_id: str | None = Field(
        default=None,
        description="5xx only: the request's id, under which the router logged the details",
    )


class ErrorResponse(BaseModel):
    """The contract's error body (ARCHITECTURE §4), answered by the router. Not titled
    ``Error``: a client generated from the document would name its class as its own field."""

    error: ErrorBody


# the names this module gave the error models before: still importable
ErrorDetail = ErrorBody
ErrorAnswer = ErrorResponse


class GatewayMessage(BaseModel):
    """API Gateway's own error body: 401 without a token, 403 when the authorizer refuses it."""

    message: str = Field(examples=["Unauthorized", "Forbidden"])


class Health(_Open):
    status: Literal["ok"]


class ParamSpec(_Open):
    """One workload param as ``GET /v1/workloads`` lists it (``Param.to_json``)."""

    type: Literal["int", "float", "bool", "str", "array"]
    default: Any = None
    description: str | None = None
    minimum: float | None = None
    maximum: float | None = None
    exclusive_maximum: float | None = None
    choices: list[str] | None = None


class WorkloadEntry(_Open):
    name: str
    class_: Literal["round", "client", "model", "meta"] = Field(alias="class")
    params: dict[str, ParamSpec]
    description: str
    reference: str


class WorkloadsAnswer(_Open):
    workloads: list[WorkloadEntry]


class RoundEntry(_Open):
    round: Annotated[int, Field(ge=0, le=MAX_ROUND)]
    clients: list[str] = Field(description="the client ids of the round")
    bytes: Annotated[int, Field(ge=0)]


class RoundsAnswer(_Open):
    job: str
    rounds: list[RoundEntry] = Field(description="a page of the committed rounds, ascending")
    next: Annotated[int, Field(ge=0, le=MAX_ROUND)] | None = Field(
        description="the last round of this page when more remain (pass it as 'after' for the "
        "next page), else null"
    )


class CostBreakdown(_Open):
    """What one answer cost on AWS, in USD, by what was billed."""

    nodes: float = Field(description="the cache-node invocations (duration and request fees)")
    router: float = Field(description="the router function's own invocation")
    api_gateway: float = Field(description="the HTTP API request (per started 512 KB of body)")
    s3: float = Field(description="the S3 GETs of cold misses and PUTs of results written")


class RunMeta(_Open):
    nodes: list[Any] = Field(description="the cache nodes tried, in order")
    cache: str = Field(description="hit, miss, or partial when several nodes answered")
    latency_ms: float
    cost_usd: float = Field(description="the sum of cost_breakdown, USD")
    cost_breakdown: CostBreakdown
    node_timing_ms: dict[str, Any]
    s3_gets: int
    s3_puts: int


class RunAnswer(_Open):
    job: str
    workload: str
    round: int | None
    result: dict[str, Any] = Field(
        description="the workload's result; a model result is stored and named by model_key"
    )
    meta: RunMeta


def _param_field(param: Param) -> tuple[Any, Any]:
    """The pydantic field of one registry param: its JSON type, default and bounds."""
    kind: Any = _TYPES[param.type]
    if param.choices:
        kind = Literal[param.choices]
    if param.nullable:
        kind = kind | None
    minimum, maximum = param.minimum, param.maximum
    if param.type == "int":  # Param.coerce refuses integers past 2**53 - 1
        minimum = INT_MIN if minimum is None else max(minimum, INT_MIN)
        maximum = INT_MAX if maximum is None else min(maximum, INT_MAX)
    return kind, Field(
        default=param.default,
        description=param.description or None,
        ge=minimum,
        le=maximum,
        lt=param.exclusive_maximum,
    )


def _model_name(workload: str) -> str:
    return "".join(part.capitalize() for part in workload.split("_")) + "Params"


def workload_params_models() -> dict[str, type[BaseModel]]:
    """One closed model per workload of the registry, named ``<Workload>Params``."""
    models: dict[str, type[BaseModel]] = {}
    for entry in catalogue():
        workload = get(entry["name"])
        fields = {name: _param_field(p) for name, p in workload.params.items()}
        models[workload.name] = create_model(  # type: ignore[call-overload]
            _model_name(workload.name),
            __config__=ConfigDict(
                extra="forbid", title=_model_name(workload.name), json_schema_extra=None
            ),
            __doc__=f"Params of {workload.name} ({workload.cls} class): {workload.description}",
            **fields,
        )
    return models


_ROUND = Annotated[int, Field(ge=0, le=MAX_ROUND)]


def _request_fields(workload: Workload, params: type[BaseModel]) -> dict[str, Any]:
    """The body fields of a request for ``workload``: a round class needs ``round``; the
    others span rounds, take ``rounds`` and no round (a JSON null is let through, as the
    router lets it)."""
    rounds = (
        list[_ROUND] | None,
        Field(default=None, description="the committed rounds to compute over (default: all)"),
    )
    fields: dict[str, Any] = {
        "params": (
            params | None,
            Field(default=None, description="the workload's params; defaults fill the rest"),
        )
    }
    if workload.cls == "round":
        fields["round"] = (_ROUND, Field(description="the committed round to run on"))
        fields["rounds"] = (
            list[_ROUND] | None,
            Field(default=None, description="not used; each must be a committed round"),
        )
    else:
        fields["round"] = (None, Field(default=None, description="not taken: send 'rounds'"))
        fields["rounds"] = rounds
    return fields


def workload_request_models() -> dict[str, type[BaseModel]]:
    """One closed body model per workload, named ``<Workload>Request``: its class's round
    fields and the workload's own params model (:func:`workload_params_models`)."""
    requests: dict[str, type[BaseModel]] = {}
    for name, params in workload_params_models().items():
        workload = get(name)
        title = _model_name(name).removesuffix("Params") + "Request"
        requests[name] = create_model(
            title,
            __base__=_Closed,
            __doc__=f"A request for {name} ({workload.cls} class).",
            **_request_fields(workload, params),
        )
    return requests


def run_request_model() -> type[BaseModel]:
    """The body of ``POST /v1/jobs/{job}/workloads/{name}``: the request model of the workload
    in the path. JSON Schema cannot tie a body to a path parameter (and the body has no field
    naming its workload to discriminate on), so the document lists every workload's request
    with ``anyOf``: a generated client has one typed class per workload, its params typed."""
    models = tuple(workload_request_models().values())
    union: Any = models[0]
    for model in models[1:]:
        union = union | model
    root: type[BaseModel] = create_model(
        "RunRequest",
        __base__=RootModel[union],
        __doc__=(
            "A workload request: the <Workload>Request of the workload named in the path "
            "(components.x-workload-requests names them)."
        ),
    )
    return root


def workload_names() -> list[str]:
    """Every registered workload name, sorted (the ``name`` path parameter's values)."""
    return [entry["name"] for entry in catalogue()]
