"""The OpenAPI 3.1 document: generated from the router's routes and the
workload registry, valid OpenAPI 3.1 (openapi-spec-validator), complete (every route of the
resolver, every workload and param), served unauthenticated by the local stack through the
gateway, and honest: live answers of the stack — successes and both error shapes — validate
against the document's schemas (jsonschema, Draft 2020-12, the dialect of OpenAPI 3.1).
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from typing import Annotated, Any
from urllib.parse import urlsplit

import jsonschema
import pytest
from aws_lambda_powertools.event_handler.openapi.params import Query
from openapi_spec_validator import validate

from flstore_core.workloads import catalogue, get
from lambdas.local_runtime.stack import LocalStack, StackConfig
from lambdas.router import app, build_app, openapi_document
from tests.conftest import small_update


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    return openapi_document(app)


def test_the_document_is_valid_openapi_3_1(document: dict[str, Any]) -> None:
    assert document["openapi"].startswith("3.1.")
    validate(document)  # raises on any violation of the OpenAPI 3.1 schema, or a dangling $ref


def test_every_route_of_the_resolver_is_in_the_document(document: dict[str, Any]) -> None:
    served = {
        (route.method.lower(), route.openapi_path)
        for route in app._static_routes + app._dynamic_routes
    }
    listed = {(m, p) for p, ops in document["paths"].items() for m in ops}
    assert served == listed
    assert ("get", "/v1/openapi.json") in listed and ("get", "/v1/docs") in listed
    for path, operations in document["paths"].items():
        for method, op in operations.items():
            assert "200" in op["responses"], (method, path)
            for name in (p.strip("{}") for p in path.split("/") if p.startswith("{")):
                params = {p["name"]: p for p in op.get("parameters", []) if p["in"] == "path"}
                assert params[name]["required"] is True, (path, name)


def test_every_workload_and_param_is_in_the_document(document: dict[str, Any]) -> None:
    schemas = document["components"]["schemas"]
    by_name = document["components"]["x-workload-params"]
    names = [w["name"] for w in catalogue()]
    assert sorted(by_name) == names
    run = document["paths"]["/v1/jobs/{job}/workloads/{name}"]["post"]
    (name_param,) = [p for p in run["parameters"] if p["name"] == "name"]
    assert name_param["schema"]["enum"] == names
    body = run["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    requests = document["components"]["x-workload-requests"]
    assert sorted(requests) == names
    # the body is any workload's request: one schema per workload, its params that workload's
    assert schemas[body.rsplit("/", 1)[1]]["anyOf"] == [requests[name] for name in names]
    json_type = {"int": "integer", "float": "number", "bool": "boolean", "str": "string"}
    json_type["array"] = "array"
    for name in names:
        ref = by_name[name]["$ref"]
        request = schemas[requests[name]["$ref"].rsplit("/", 1)[1]]
        assert request["additionalProperties"] is False
        assert {"$ref": ref} in request["properties"]["params"]["anyOf"]
        assert ("round" in request.get("required", [])) == (get(name).cls == "round")
        schema = schemas[ref.rsplit("/", 1)[1]]
        assert schema["additionalProperties"] is False
        workload = get(name)
        assert set(schema.get("properties", {})) == set(workload.params)
        for pname, param in workload.params.items():
            prop = schema["properties"][pname]
            kinds = [prop, *prop.get("anyOf", [])]
            types = {k["type"] for k in kinds if "type" in k}
            assert json_type[param.type] in types, (name, pname)
            assert ("null" in types) == param.nullable, (name, pname)
            (typed,) = [k for k in kinds if k.get("type") == json_type[param.type]]
            if param.minimum is not None:
                assert typed["minimum"] == param.minimum, (name, pname)
            if param.maximum is not None:
                assert typed["maximum"] == param.maximum, (name, pname)
            if param.exclusive_maximum is not None:
                assert typed["exclusiveMaximum"] == param.exclusive_maximum, (name, pname)
            if param.choices:
                assert typed["enum"] == list(param.choices), (name, pname)
            if param.default is not None:
                assert prop["default"] == param.default, (name, pname)


def test_the_document_holds_both_error_shapes(document: dict[str, Any]) -> None:
    schemas = document["components"]["schemas"]
    # not titled Error: a generated client's class would clash with its own field 'error'
    assert schemas["ErrorResponse"]["required"] == ["error"] and "Error" not in schemas
    assert schemas["ErrorResponse"]["properties"]["error"] == {
        "$ref": "#/components/schemas/ErrorBody"
    }
    assert schemas["GatewayMessage"]["required"] == ["message"]
    run = document["paths"]["/v1/jobs/{job}/workloads/{name}"]["post"]["responses"]
    assert {"200", "400", "401", "403", "404", "413", "503"} <= set(run)
    for status in ("401", "403"):
        refs = run[status]["content"]["application/json"]["schema"]["anyOf"]
        assert {r["$ref"].rsplit("/", 1)[1] for r in refs} == {"ErrorResponse", "GatewayMessage"}
    assert "422" not in json.dumps(document)
    assert "HTTPValidationError" not in schemas


def _event(path: str, query: str = "") -> dict[str, Any]:
    return {
        "version": "2.0",
        "routeKey": "$default",
        "rawPath": path,
        "rawQueryString": query,
        "queryStringParameters": dict([query.split("=")]) if query else None,
        "headers": {},
        "requestContext": {"http": {"method": "GET", "path": path}, "stage": "$default"},
        "isBase64Encoded": False,
    }


def test_a_request_powertools_refuses_is_the_contracts_400_not_422() -> None:
    probe = build_app(lambda: None)  # type: ignore[arg-type, return-value]

    @probe.get("/v1/probe")
    def probe_route(n: Annotated[int, Query()]) -> dict[str, int]:
        return {"n": n}

    answer = probe.resolve(_event("/v1/probe", "n=seven"), None)
    assert answer["statusCode"] == 400
    body = json.loads(answer["body"])
    assert set(body) == {"error"} and body["error"]["code"] == "invalid_request"
    assert "n" in body["error"]["message"]
    assert json.loads(probe.resolve(_event("/v1/probe", "n=7"), None)["body"]) == {"n": 7}


# --- the live stack -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def stack(s3_server: Any) -> Iterator[LocalStack]:
    config = StackConfig(
        nodes=1,
        replication=1,
        memory_mb=1024,
        bucket="openapi-tests",
        s3_endpoint=s3_server.url,
        tokens={"fls_other-job-only": ["other"]},
    )
    with LocalStack(config) as st_:
        assert st_.store is not None
        for i in range(4):
            st_.store.put_update("demo", 0, f"c{i}", small_update(i))
        st_.store.commit_round("demo", 0)
        yield st_


def _get(stack: LocalStack, method: str, path: str, body: Any = None, token: str | None = None):
    url = urlsplit(stack.gateway_url)
    assert url.hostname is not None
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body))
    try:
        conn.request(method, path, body=data, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.getheader("Content-Type", ""), resp.read()
    finally:
        conn.close()


def _conforms(document: dict[str, Any], path: str, method: str, status: int, body: Any) -> None:
    """``body`` validates against the schema the document gives this answer."""
    response = document["paths"][path][method]["responses"][str(status)]
    schema = response["content"]["application/json"]["schema"]
    resolver = {**schema, "components": document["components"]}
    jsonschema.Draft202012Validator(resolver).validate(body)


def test_the_stack_serves_the_document_and_the_ui_without_a_token(stack: LocalStack) -> None:
    status, content_type, raw = _get(stack, "GET", "/v1/openapi.json")
    assert status == 200 and content_type.startswith("application/json")
    served = json.loads(raw)
    assert served == json.loads(json.dumps(openapi_document(app)))
    validate(served)
    status, content_type, raw = _get(stack, "GET", "/v1/docs")
    assert status == 200 and content_type.startswith("text/html")
    assert b"SwaggerUIBundle" in raw and b"/v1/openapi.json" in raw


SAMPLE = [
    # (method, document path, request path, body, token: "job" | "other" | None, status)
    ("get", "/v1/health", "/v1/health", None, None, 200),
    ("get", "/v1/workloads", "/v1/workloads", None, "job", 200),
    ("get", "/v1/workloads", "/v1/workloads", None, None, 401),
    ("get", "/v1/workloads", "/v1/workloads", None, "nonsense", 403),
    ("get", "/v1/jobs/{job}/rounds", "/v1/jobs/demo/rounds", None, "job", 200),
    ("get", "/v1/jobs/{job}/rounds", "/v1/jobs/demo/rounds", None, "other", 403),
    ("get", "/v1/jobs/{job}/rounds", "/v1/jobs/Bad..Id/rounds", None, "job", 400),
    ("get", "/v1/jobs/{job}/rounds", "/v1/jobs/nojob/rounds", None, "job", 404),
    *[
        ("post", "/v1/jobs/{job}/workloads/{name}", f"/v1/jobs/demo/workloads/{name}", b, "job", s)
        for name, b, s in [
            ("cosine_select", {"round": 0, "params": {"k": 2}}, 200),
            ("fedavg", {"round": 0}, 200),
            ("krum", {"round": 0, "params": {"f": 0}}, 200),
            ("trimmed_mean", {"round": 0, "params": {"beta": 0.25}}, 200),
            ("cosine_select", {"round": 0, "params": {"k": "two"}}, 400),
            ("cosine_select", {"round": 0, "params": {"nope": 1}}, 400),
            ("cosine_select", {"params": {}}, 400),
            ("cosine_select", b"\xff\xfe not json", 400),
            ("cosine_select", b"null", 400),  # the document's body is an object when sent
            ("cosine_select", {"round": 7}, 404),
            ("no_such_workload", {"round": 0}, 404),
            ("cosine_select", {"round": 0, "params": {"k": "x" * 300_000}}, 413),
        ]
    ],
]


@pytest.mark.parametrize(("method", "doc_path", "path", "body", "token", "status"), SAMPLE)
def test_live_answers_conform_to_the_document(
    stack: LocalStack,
    document: dict[str, Any],
    method: str,
    doc_path: str,
    path: str,
    body: Any,
    token: str | None,
    status: int,
) -> None:
    tokens = {"job": stack.token, "other": "fls_other-job-only", "nonsense": "fls_unknown"}
    got, content_type, raw = _get(stack, method.upper(), path, body, tokens.get(token or ""))
    assert got == status, raw
    assert content_type.startswith("application/json")
    _conforms(document, doc_path, method, status, json.loads(raw))
