"""The body of a workload request (ARCHITECTURE §4), parsed the same way by the router and the
aggregator baselines so both refuse the same requests with the same errors."""

from __future__ import annotations

import json
from typing import Any

from flstore_core.data.codec.metadata import MAX_JSON_DEPTH, loads_bounded
from flstore_core.errors import PayloadTooLargeError, ValidationError

MAX_BODY_BYTES = 256 * 1024
BODY_FIELDS = ("round", "rounds", "params")
__all__ = ["BODY_FIELDS", "MAX_BODY_BYTES", "MAX_JSON_DEPTH", "parse_body"]


def parse_body(body: bytes | str | None) -> dict[str, Any]:
    """The JSON object of a request body; 413 past the limit, 400 when malformed or nested
    more than ``MAX_JSON_DEPTH`` levels deep (counted before parsing: ``json.loads`` recurses
    once per level and raised RecursionError, a 500, on ~1,000 brackets)."""
    if body is None or body == "" or body == b"":
        return {}
    raw = body.encode() if isinstance(body, str) else body
    if len(raw) > MAX_BODY_BYTES:
        raise PayloadTooLargeError(
            f"request body of {len(raw)} bytes exceeds the limit of {MAX_BODY_BYTES}"
        )
    try:
        # the encodings json.loads reads bytes in (UTF-8, with or without a BOM, UTF-16, -32)
        text = raw.decode(json.detect_encoding(raw), "surrogatepass")
    except UnicodeDecodeError as exc:
        raise ValidationError(f"request body is not valid JSON: {exc}") from exc
    try:
        obj = loads_bounded(text.removeprefix("\ufeff"), "request body")
    except ValueError as exc:  # its message names the request body and the reason
        raise ValidationError(str(exc)) from exc
    if not isinstance(obj, dict):
        raise ValidationError("request body must be a JSON object")
    unknown = sorted(set(obj) - set(BODY_FIELDS))
    if unknown:
        raise ValidationError(
            f"unknown field {unknown[0]!r} in the body: use {', '.join(BODY_FIELDS)}"
        )
    return obj
