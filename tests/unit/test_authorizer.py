"""The API Gateway Lambda authorizer decides like API Gateway needs it to (payload 2.0, simple).

Plain authorizer event dicts, as API Gateway's HTTP API sends them; no gateway, no network.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from flstore_core.routing.auth import TokenTable
from lambdas import authorizer
from lambdas.authorizer import decide, handler

ADMIN = "fls_admin-token"
DEMO_ONLY = "fls_demo-only"
OTHER_ONLY = "fls_other-only"
TOKENS = TokenTable.with_tokens({ADMIN: ["*"], DEMO_ONLY: ["demo"], OTHER_ONLY: ["other"]})

REFUSED = {"isAuthorized": False, "context": {}}


def authorizer_event(
    method: str = "POST",
    path: str = "/v1/jobs/demo/workloads/fedavg",
    headers: dict[str, str] | None = None,
) -> dict[str, Any]:
    """An HTTP API authorizer event (payload 2.0) for one request, as API Gateway builds it."""
    segments = path.strip("/").split("/")
    route = path
    path_parameters: dict[str, str] | None = None
    if segments[:2] == ["v1", "jobs"] and len(segments) >= 3:
        path_parameters = {"job": segments[2]}
        route = "/v1/jobs/{job}/" + "/".join(segments[3:])
        if len(segments) == 5:
            path_parameters["name"] = segments[4]
            route = "/v1/jobs/{job}/workloads/{name}"
    event: dict[str, Any] = {
        "version": "2.0",
        "type": "REQUEST",
        "routeArn": f"arn:aws:execute-api:us-east-1:123456789012:api/$default/{method}{path}",
        "identitySource": [v for k, v in (headers or {}).items() if k.lower() == "authorization"],
        "routeKey": f"{method} {route}",
        "rawPath": path,
        "rawQueryString": "",
        "headers": headers if headers is not None else {},
        "requestContext": {
            "accountId": "123456789012",
            "apiId": "api",
            "http": {"method": method, "path": path, "protocol": "HTTP/1.1"},
            "requestId": "req",
            "routeKey": f"{method} {route}",
            "stage": "$default",
        },
    }
    if path_parameters is not None:
        event["pathParameters"] = path_parameters
    return event


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def test_missing_authorization_header_is_refused() -> None:
    assert decide(TOKENS, authorizer_event(headers={})) == REFUSED


def test_event_without_headers_is_refused() -> None:
    event = authorizer_event()
    del event["headers"]
    assert decide(TOKENS, event) == REFUSED


@pytest.mark.parametrize(
    "header", ["", ADMIN, f"Token {ADMIN}", "Bearer", "Bearer    ", f"Basic {ADMIN}"]
)
def test_malformed_authorization_header_is_refused(header: str) -> None:
    assert decide(TOKENS, authorizer_event(headers={"authorization": header})) == REFUSED


def test_unknown_token_is_refused() -> None:
    assert decide(TOKENS, authorizer_event(headers=bearer("fls_nope"))) == REFUSED


def test_token_granted_every_job_is_authorized_for_any_job() -> None:
    for job in ("demo", "other", "anything"):
        event = authorizer_event(path=f"/v1/jobs/{job}/workloads/fedavg", headers=bearer(ADMIN))
        assert decide(TOKENS, event) == {"isAuthorized": True, "context": {"jobs": "*"}}


def test_token_granted_the_job_is_authorized_on_its_routes() -> None:
    for method, path in [
        ("POST", "/v1/jobs/demo/workloads/fedavg"),
        ("GET", "/v1/jobs/demo/rounds"),
    ]:
        event = authorizer_event(method, path, headers=bearer(DEMO_ONLY))
        assert decide(TOKENS, event) == {"isAuthorized": True, "context": {"jobs": "demo"}}


def test_token_not_granted_the_job_is_authorized_for_the_router_to_refuse() -> None:
    # ARCHITECTURE §4: a valid token not granted the job gets the router's 403 {"error": ...},
    # so the authorizer lets it through with its grants in the context
    for method, path in [
        ("POST", "/v1/jobs/demo/workloads/fedavg"),
        ("GET", "/v1/jobs/demo/rounds"),
    ]:
        event = authorizer_event(method, path, headers=bearer(OTHER_ONLY))
        assert decide(TOKENS, event) == {"isAuthorized": True, "context": {"jobs": "other"}}


def test_decision_depends_on_the_token_alone() -> None:
    # what lets API Gateway cache it by the Authorization header alone
    for token in (ADMIN, DEMO_ONLY, OTHER_ONLY, "fls_nope"):
        answers = {
            str(decide(TOKENS, authorizer_event(method, path, headers=bearer(token))))
            for method, path in [
                ("POST", "/v1/jobs/demo/workloads/fedavg"),
                ("GET", "/v1/jobs/other/rounds"),
                ("GET", "/v1/workloads"),
            ]
        }
        assert len(answers) == 1, token


@pytest.mark.parametrize("headers", [None, [], "authorization", {"authorization": 7}])
def test_malformed_event_headers_are_refused(headers: Any) -> None:
    event = authorizer_event()
    event["headers"] = headers
    assert decide(TOKENS, event) == REFUSED


def test_routes_without_a_job_need_only_a_known_token() -> None:
    event = authorizer_event("GET", "/v1/workloads", headers=bearer(OTHER_ONLY))
    assert "pathParameters" not in event
    assert decide(TOKENS, event) == {"isAuthorized": True, "context": {"jobs": "other"}}
    assert decide(TOKENS, authorizer_event("GET", "/v1/workloads", headers={})) == REFUSED


@pytest.mark.parametrize(
    "name", ["authorization", "Authorization", "AUTHORIZATION", "aUtHoRiZaTiOn"]
)
def test_header_name_is_case_insensitive(name: str) -> None:
    event = authorizer_event(headers={name: f"Bearer {DEMO_ONLY}"})
    assert decide(TOKENS, event)["isAuthorized"] is True


def test_bearer_scheme_is_case_insensitive() -> None:
    event = authorizer_event(headers={"authorization": f"bearer {DEMO_ONLY}"})
    assert decide(TOKENS, event)["isAuthorized"] is True


def test_handler_decides_with_the_module_token_table(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(authorizer, "TOKENS", TOKENS)
    granted = handler(authorizer_event(headers=bearer(DEMO_ONLY)), None)
    assert granted == {"isAuthorized": True, "context": {"jobs": "demo"}}
    assert handler(authorizer_event(headers=bearer("fls_nope")), None) == REFUSED
    assert handler(authorizer_event(headers={}), None) == REFUSED


def _security_section(title: str) -> str:
    text = (Path(__file__).resolve().parents[2] / "docs" / "security.md").read_text()
    return text.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_security_doc_names_exactly_the_unauthenticated_routes() -> None:
    from lambdas.local_runtime.gateway import ROUTES

    section = _security_section("Authentication and authorization")
    (line,) = [ln for ln in section.splitlines() if ln.startswith("- Unauthenticated routes:")]
    named = set(re.findall(r"`((?:GET|POST) /v1/[^`]*)`", line))
    assert named == {r.key for r in ROUTES if not r.authorized}


def test_security_doc_says_the_router_checks_the_job_not_the_authorizer() -> None:
    # the authorizer's answer is cached by the Authorization header alone (identity sources of
    # an HTTP API cannot name the path), so it must not depend on the job in the path
    section = _security_section("Authentication and authorization")
    assert "checks the token and the job" not in section
    assert "authenticates only" in section and "router checks the job" in section
