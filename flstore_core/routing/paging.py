"""Pages of a job's rounds: ``GET /v1/jobs/{job}/rounds?limit=&after=`` (ARCHITECTURE §4).

A job of thousands of rounds is listed a page at a time: the rounds after ``after`` (a round
number, exclusive), ascending, at most ``limit`` of them. ``next`` is the last round of the page
when more remain, else ``None``: a client passes it back as ``after`` to read the next page. The
cursor is a round number, not an offset, so a round committed between two pages is neither
skipped nor listed twice.
"""

from __future__ import annotations

import bisect
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from flstore_core.data.manifest import RoundManifest
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


@dataclass(frozen=True)
class Listed:
    """What a page says of one round, and the version of the manifest it was read from."""

    version: str
    clients: tuple[str, ...]
    bytes: int


class RoundListing:
    """Each listed round's clients and stored bytes, kept by the router with its manifest's
    version instead of the parsed manifest: a job of 2,000 rounds × 100 clients listed whole
    held ~2,000 manifests (~1.2 KB a client), most of a 512 MB router; its listing is ~1 KB a
    round here (client ids interned, rounds of the same clients sharing one tuple)."""

    def __init__(self) -> None:
        self._held: dict[tuple[str, int], Listed] = {}
        self._tuples: dict[tuple[str, ...], tuple[str, ...]] = {}
        self._lock = threading.Lock()

    def rows(
        self,
        job: str,
        rounds: Sequence[int],
        versions: dict[int, str],
        fetch: Callable[[int], RoundManifest],
        mapper: Callable[[Callable[[int], RoundManifest], list[int]], Iterable[RoundManifest]],
    ) -> list[dict[str, Any]]:
        """The page's ``{"round", "clients", "bytes"}``: held ones whose version the listing
        ``versions`` confirms, the others read with ``fetch`` (over ``mapper``, in parallel)."""
        with self._lock:
            held = {r: self._held.get((job, r)) for r in rounds}
        stale = [
            r for r, h in held.items() if h is None or not h.version or h.version != versions.get(r)
        ]
        for r, manifest in zip(stale, mapper(fetch, stale), strict=True):
            ids = tuple(manifest.clients)
            with self._lock:
                shared = self._tuples.setdefault(ids, tuple(sys.intern(c) for c in ids))
                held[r] = self._held[(job, r)] = Listed(
                    versions.get(r, ""), shared, manifest.stored_bytes
                )
        return [
            {"round": r, "clients": list(h.clients), "bytes": h.bytes} for r, h in _present(held)
        ]


def _present(held: dict[int, Listed | None]) -> Iterator[tuple[int, Listed]]:
    for r, h in held.items():
        assert h is not None
        yield r, h
