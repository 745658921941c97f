"""API Gateway HTTP API Lambda authorizer (simple responses, payload 2.0).

It shares :class:`flstore_core.routing.auth.TokenTable` with the router and answers one
question: is the bearer token one we issued? A known token is authorized on every route, with
the jobs it is granted in the ``context`` (the router sees it as
``requestContext.authorizer.lambda``); whether it is granted the job in the path is the
router's to say, so that a valid token not granted a job gets the contract's 403
``{"error": …}`` (ARCHITECTURE §4) rather than API Gateway's bare ``{"message": "Forbidden"}``,
which is kept for tokens the authorizer refuses. The decision depends on the token alone, so API
Gateway caches it by the ``Authorization`` header alone (``infra/flstore_infra/api.py``).
"""

from __future__ import annotations

from typing import Any

from flstore_core.errors import FLStoreError
from flstore_core.routing.auth import TokenTable

TOKENS = TokenTable.from_env()


def decide(tokens: TokenTable, event: dict[str, Any]) -> dict[str, Any]:
    """The simple-response decision for one authorizer event."""
    headers = event.get("headers")
    if not isinstance(headers, dict):
        headers = {}
    header = next(
        (v for k, v in headers.items() if str(k).lower() == "authorization" and isinstance(v, str)),
        None,
    )
    try:
        grant = tokens.authenticate(header)
    except (FLStoreError, UnicodeError):  # a header no token hashes from
        return {"isAuthorized": False, "context": {}}
    return {"isAuthorized": True, "context": {"jobs": ",".join(sorted(grant.jobs))}}


def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    """Lambda entry point."""
    return decide(TOKENS, event)
