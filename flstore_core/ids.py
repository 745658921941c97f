"""Validation of job, client and round ids (ARCHITECTURE §2).

Ids become parts of S3 keys and function payloads, so they are checked before any I/O: a job is
``^[a-z0-9][a-z0-9-]{0,62}$``, a client ``^[A-Za-z0-9_.-]{1,128}$`` other than ``.`` and ``..``,
and a round an integer ``>= 0`` (``bool`` is not an integer here).
"""

from __future__ import annotations

import re

from flstore_core.errors import InvalidIdError

JOB_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
CLIENT_RE = re.compile(r"[A-Za-z0-9_.-]{1,128}")
MAX_ROUND = 99_999_999  # rounds are zero-padded to 8 digits in keys


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def validate_job(job: object) -> str:
    """Return ``job`` if it is a valid job id, else raise :class:`InvalidIdError`."""
    if not isinstance(job, str) or not JOB_RE.fullmatch(job):
        raise InvalidIdError(
            f"invalid job id {_show(job)}: use 1-63 characters of lowercase a-z, 0-9 and '-', "
            "starting with a letter or digit"
        )
    return job


def validate_client(client: object) -> str:
    """Return ``client`` if it is a valid client id, else raise :class:`InvalidIdError`."""
    if not isinstance(client, str) or not CLIENT_RE.fullmatch(client) or client in {".", ".."}:
        raise InvalidIdError(
            f"invalid client id {_show(client)}: use 1-128 characters of A-Z, a-z, 0-9, '_', "
            "'.' and '-' (not '.' or '..')"
        )
    return client


def validate_round(round_: object) -> int:
    """Return ``round_`` as an int if it is a valid round number, else raise."""
    if isinstance(round_, bool) or not isinstance(round_, int) or not 0 <= round_ <= MAX_ROUND:
        raise InvalidIdError(
            f"invalid round {_show(round_)}: use an integer between 0 and {MAX_ROUND}"
        )
    return round_


def parse_round(text: str) -> int:
    """Parse a round given as text (a path or query parameter) and validate it."""
    if not text.isascii() or not text.isdigit() or len(text) > 8:
        raise InvalidIdError(f"invalid round {_show(text)}: use a non-negative integer")
    return validate_round(int(text))
