"""Pages of a job's rounds: ``GET /v1/jobs/{job}/rounds?limit=&after=`` (ARCHITECTURE §4).

A job of thousands of rounds is listed a page at a time: the rounds after ``after`` (a round
number, exclusive), ascending, at most ``limit`` of them. ``next`` is the last round of the page
when more remain, else ``None``: a client passes it back as ``after`` to read the next page. The
cursor is a round number, not an offset, so a round committed between two pages is neither
skipped nor listed twice.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

from flstore_core.errors import ValidationError
from flstore_core.ids import MAX_ROUND

# the largest page: each listed round's manifest is read to answer (cached, in parallel), and
# 1000 rounds of 100 clients of 20-character ids are ~2.4 MB of JSON, inside Lambda's 6 MB
MAX_LIMIT = 1000
DEFAULT_LIMIT = MAX_LIMIT


@dataclass(frozen=True)
class Page:
    """The rounds of one page and the cursor of the next (``None`` on the last page)."""

    rounds: tuple[int, ...]
    next: int | None


def _integer(name: str, value: object, low: int, high: int) -> int:
    """``value`` (an int, or its decimal text from a query string) within ``[low, high]``."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValidationError(f"invalid {name} {value!r}: use an integer between {low} and {high}")
    return value


def page_of(rounds: Sequence[int], limit: object = None, after: object = None) -> Page:
    """The page of the ascending ``rounds`` after ``after``, at most ``limit`` long; 400 on a
    ``limit`` outside 1..:data:`MAX_LIMIT` or an ``after`` that is not a round number."""
    size = DEFAULT_LIMIT if limit is None else _integer("limit", limit, 1, MAX_LIMIT)
    start = (
        0 if after is None else bisect.bisect_right(rounds, _integer("after", after, 0, MAX_ROUND))
    )
    chosen = tuple(rounds[start : start + size])
    more = start + size < len(rounds)
    return Page(chosen, chosen[-1] if more and chosen else None)
