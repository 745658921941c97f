"""The body of a workload request (ARCHITECTURE §4), parsed the same way by the router and the
aggregator baselines so both refuse the same requests with the same errors."""

from __future__ import annotations

import json
from typing import Any

from flstore_core.errors import PayloadTooLargeError, ValidationError

MAX_BODY_BYTES = 256 * 1024
BODY_FIELDS = ("round", "rounds", "params")


def parse_body(body: bytes | str | None) -> dict[str, Any]:
    """The JSON object of a request body; 413 past the limit, 400 when malformed."""
    if body is None or body == "" or body == b"":
        return {}
    raw = body.encode() if isinstance(body, str) else body
    if len(raw) > MAX_BODY_BYTES:
        raise PayloadTooLargeError(
            f"request body of {len(raw)} bytes exceeds the limit of {MAX_BODY_BYTES}"
        )
    try:
        obj = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ValidationError(f"request body is not valid JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise ValidationError("request body must be a JSON object")
    unknown = sorted(set(obj) - set(BODY_FIELDS))
    if unknown:
        raise ValidationError(
            f"unknown field {unknown[0]!r} in the body: use {', '.join(BODY_FIELDS)}"
        )
    return obj
