"""API Gateway HTTP API Lambda authorizer (simple responses, payload 2.0).

It shares :class:`flstore_core.routing.auth.TokenTable` with the router: a request is authorized
when its bearer token is known and, for ``/v1/jobs/{job}/…`` routes, granted that job. The router
checks again (defence in depth, and the local gateway calls the router directly).
"""

from __future__ import annotations

from typing import Any

from flstore_core.errors import FLStoreError
from flstore_core.routing.auth import TokenTable

TOKENS = TokenTable.from_env()


def decide(tokens: TokenTable, event: dict[str, Any]) -> dict[str, Any]:
    """The simple-response decision for one authorizer event."""
    headers = {k.lower(): v for k, v in (event.get("headers") or {}).items()}
    job = (event.get("pathParameters") or {}).get("job")
    try:
        header = headers.get("authorization")
        grant = tokens.authorize(header, job) if job else tokens.authenticate(header)
    except FLStoreError:
        return {"isAuthorized": False, "context": {}}
    return {"isAuthorized": True, "context": {"jobs": ",".join(sorted(grant.jobs))}}


def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    """Lambda entry point."""
    return decide(TOKENS, event)
