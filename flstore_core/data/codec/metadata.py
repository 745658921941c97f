"""The values an update's metadata may carry: ``num_examples`` and ``metrics``, checked where an
update is written (the SDK), read from untrusted bytes (ingestion, the codec) and read back from
a round manifest, so a value that would break every later computation on a round never gets in.

Each check raises ``ValueError`` with the reason; the caller turns it into its own typed error
(a bad request when writing, a corrupt update when reading a file, a corrupt manifest).
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import numpy as np

# the integers a JSON number carries exactly (I-JSON) and a float64 sum of a round's counts
# keeps exact; 10**30 examples made fedavg and cosine_select raise OverflowError on the round
MAX_NUM_EXAMPLES = 2**53 - 1
# nesting of a metadata JSON value: json.loads recurses once per level and raised
# RecursionError on 100 000 brackets; the check below counts them without recursing
MAX_JSON_DEPTH = 64

_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_OPEN = np.frombuffer(b"[{", np.uint8)
_DEPTH_CHUNK = 1 << 20  # brackets walked at once: 8 MiB of running depths


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def checked_num_examples(value: object) -> int:
    """``value`` as an int if it is an integer from 0 to ``MAX_NUM_EXAMPLES`` (0: not reported;
    global and initial models carry none), else ``ValueError``."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int | np.integer)
        or not 0 <= value <= MAX_NUM_EXAMPLES
    ):
        raise ValueError(
            f"num_examples must be an integer from 0 to {MAX_NUM_EXAMPLES}, got {_show(value)}"
        )
    return int(value)


def parse_num_examples(text: str) -> int:
    """``num_examples`` from its decimal string in a file's metadata."""
    if not text.isascii() or not text.isdigit() or len(text) > len(str(MAX_NUM_EXAMPLES)):
        raise ValueError(f"num_examples must be a decimal integer, got {_show(text)}")
    return checked_num_examples(int(text))


def _finite_number(value: object) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int past the largest double
        return False


def checked_metrics(value: object, *, labels: bool = False) -> dict[str, Any]:
    """``value`` if it is a flat JSON object whose every metric is a finite number (or a flat
    list of them, as Flower's ``MetricRecord`` carries), else ``ValueError``.

    ``labels`` also lets a metric be a string: a model's metadata names what made it (a stored
    model result's ``workload``); a client's metrics are numbers that workloads compute with.
    """
    if not isinstance(value, dict):
        raise ValueError(f"metrics must be a JSON object, got {_show(value)}")
    for name, metric in value.items():
        if not isinstance(name, str):
            raise ValueError(f"metric names must be strings, got {_show(name)}")
        if _finite_number(metric) or (labels and isinstance(metric, str)):
            continue
        if isinstance(metric, list) and all(_finite_number(x) for x in metric):
            continue
        raise ValueError(f"metric {name!r} must be a finite number, got {_show(metric)}")
    return value


def json_depth(text: str) -> int:
    """How deeply the arrays and objects of the JSON ``text`` nest, without parsing it: the
    brackets outside string literals are counted (an unterminated string's brackets count too,
    which only overstates the depth of text that is not JSON anyway)."""
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", text)).encode("ascii")
    depth = deepest = 0
    for at in range(0, len(brackets), _DEPTH_CHUNK):
        chunk = np.frombuffer(brackets, np.uint8, min(_DEPTH_CHUNK, len(brackets) - at), at)
        walk = depth + np.cumsum(np.where(np.isin(chunk, _OPEN), 1, -1), dtype=np.int64)
        deepest, depth = max(deepest, int(walk.max())), int(walk[-1])
    return deepest


def loads_bounded(text: str, what: str) -> Any:
    """``json.loads(text)`` once its nesting is known to be at most ``MAX_JSON_DEPTH``; any
    failure is a ``ValueError`` naming ``what``."""
    depth = json_depth(text)
    if depth > MAX_JSON_DEPTH:
        raise ValueError(f"{what} nests {depth} levels deep, more than {MAX_JSON_DEPTH}")
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:  # ValueError: also an int past the digit limit
        raise ValueError(f"{what} is not JSON: {exc}") from exc
