"""Bearer-token authentication and per-job authorization for the HTTP API.

Tokens are never stored: the table maps the sha256 of each token to the jobs it is granted
(``"*"`` for all). A presented token is hashed and compared against every entry with
:func:`hmac.compare_digest`, so the time taken does not depend on which entry matched or how
much of it did. The router and the API Gateway authorizer share this code.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from flstore_core import config
from flstore_core.errors import AuthenticationError, ForbiddenError, ValidationError
from flstore_core.ids import validate_job


def hash_token(token: str) -> str:
    """The sha256 hex digest under which a token is stored."""
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    """A fresh random bearer token (256 bits)."""
    return "fls_" + secrets.token_urlsafe(32)


@dataclass(frozen=True)
class Grant:
    """The jobs a token may use."""

    jobs: frozenset[str]

    def allows(self, job: str) -> bool:
        return "*" in self.jobs or job in self.jobs


class TokenTable:
    """sha256(token) → granted jobs."""

    def __init__(self, hashed: Mapping[str, Iterable[str]]) -> None:
        self._entries: list[tuple[bytes, Grant]] = []
        for digest, jobs in hashed.items():
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                raise ValidationError("token table keys must be sha256 hex digests of tokens")
            granted = frozenset(j if j == "*" else validate_job(j) for j in jobs)
            self._entries.append((digest.encode(), Grant(granted)))

    @classmethod
    def from_env(cls) -> TokenTable:
        """The table in ``FLSTORE_TOKENS`` (a JSON object), empty when unset."""
        raw = config.TOKENS.get() or ""
        return cls(json.loads(raw) if raw else {})

    @classmethod
    def with_tokens(cls, tokens: Mapping[str, Iterable[str]]) -> TokenTable:
        """Build a table from plain tokens (local stacks and tests)."""
        return cls({hash_token(t): jobs for t, jobs in tokens.items()})

    def authenticate(self, authorization: str | None) -> Grant:
        """The grant of an ``Authorization: Bearer …`` header; 401 when missing or unknown."""
        if not authorization:
            raise AuthenticationError("missing Authorization header: send 'Bearer <token>'")
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthenticationError("Authorization must be 'Bearer <token>'")
        presented = hash_token(token.strip()).encode()
        found: Grant | None = None
        for digest, grant in self._entries:  # no early exit: constant time in the match
            if hmac.compare_digest(digest, presented):
                found = grant
        if found is None:
            raise AuthenticationError("unknown token")
        return found

    def authorize(self, authorization: str | None, job: str) -> Grant:
        """Authenticate, then require the job to be granted (403 otherwise)."""
        grant = self.authenticate(authorization)
        if not grant.allows(job):
            raise ForbiddenError(f"this token is not granted job {job!r}")
        return grant
