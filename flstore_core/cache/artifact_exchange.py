"""A node's ``artifacts`` op: its share of held rounds' model artifacts, and adopting others'.

After a prefetch's ``load``, the router asks each owner of a round for a share ``(share,
shares)`` of the round's model artifacts (:mod:`flstore_core.workloads.artifacts`) —
:func:`compute_artifacts` — and then hands each owner what the others computed —
:func:`adopt_artifacts` — so either replica answers from memory. A round not held here, or
held with other content (a late client), is skipped; an artifact that fails is reported and
left to the request, never raised.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from flstore_core import config
from flstore_core.cache.round_data import RoundData
from flstore_core.cache.sharded import content_digest
from flstore_core.errors import FLStoreError, ValidationError
from flstore_core.protocol import ArtifactsOp
from flstore_core.routing.placement import ShardKey
from flstore_core.workloads import artifacts

if TYPE_CHECKING:
    from flstore_core.cache.node import CacheNode

# seconds a prefetch spends on a round's model artifacts (FLSTORE_ARTIFACTS_BUDGET_S)
ARTIFACTS_BUDGET_S = float(config.ARTIFACTS_BUDGET_S.get_int())


def exchange(node: CacheNode, op: ArtifactsOp) -> dict[str, Any]:
    """The answer to an ``artifacts`` op: ``computed`` for its ``compute`` shares, and what
    was ``adopted`` and ``skipped`` of its ``rounds``."""
    answer: dict[str, Any] = {"node": node.node_index}
    if op.compute is not None:
        answer["computed"] = compute_artifacts(node, op.compute, op.budget_s)
    if op.rounds is not None:
        answer.update(adopt_artifacts(node, op.rounds))
    return answer


def whole_round(text: str) -> ShardKey:
    """The key of a whole round's shard (model artifacts are kept for whole rounds only)."""
    try:
        key = ShardKey.parse(text)
    except (ValueError, FLStoreError) as exc:
        raise ValidationError(f"bad shard key {text!r}: {exc}") from exc
    if key.cls != "round" or key.is_block:
        raise ValidationError(f"model artifacts are kept for whole rounds, not {text!r}")
    return key


def compute_artifacts(
    node: CacheNode, shares: Mapping[str, tuple[int, ...]], budget_s: float | None = None
) -> dict[str, Any]:
    """This node's share ``(share, shares[, start])`` of the model artifacts of each named
    round it holds (from its ``start``-th task: the earlier ones an earlier chunk did), and
    every value it then holds: round -> its ``content``, ``entries``, the ``tasks`` done,
    ``errors``, ``deferred``, ``ms``. ``budget_s`` bounds the invocation (every round's tasks
    together; :data:`ARTIFACTS_BUDGET_S` when ``None``)."""
    out: dict[str, Any] = {}
    deadline = time.perf_counter() + (ARTIFACTS_BUDGET_S if budget_s is None else budget_s)
    for text, (share, count, *start) in shares.items():
        held = node.cache.get(whole_round(text))
        if isinstance(held, RoundData) and held.has_rows:
            left = max(0.0, deadline - time.perf_counter())
            # a chunk (a budget given) does at least one task, however little is left
            first = 0 if budget_s is None else 1
            out[text] = round_artifacts(held, share, count, left, start[0] if start else 0, first)
        else:  # model artifacts evaluate models of the rows: a rowless round has none
            out[text] = {"skipped": "round not held" if held is None else "rows not held"}
    return out


def round_artifacts(
    data: RoundData, share: int, shares: int, budget_s: float, start: int = 0, at_least: int = 0
) -> dict[str, Any]:
    """This node's share of the round's model artifacts (from its ``start``-th task, the first
    ``at_least`` whatever the budget), and every value it then holds (never raises: an
    artifact that fails is reported and left to the request)."""
    done = artifacts.compute(data, share, shares, budget_s, start, at_least)
    try:
        entries = artifacts.export(data)
    except Exception as exc:  # pragma: no cover - export of values this code computed
        done["errors"]["export"] = str(exc)
        entries = []
    return {"content": content_digest(data.sha256), "entries": entries, **done}


def adopt_artifacts(node: CacheNode, rounds: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Keep model artifacts another replica computed for rounds this node holds (the
    router's exchange after a prefetch); a round not held here, or held with other content
    (a late client), is skipped."""
    adopted: dict[str, int] = {}
    skipped: dict[str, str] = {}
    for text, item in rounds.items():
        held = node.cache.get(whole_round(text))
        if not isinstance(held, RoundData):
            skipped[text] = "round not held"
        elif content_digest(held.sha256) != item.get("content"):
            skipped[text] = "round held with other content"
        else:
            adopted[text] = artifacts.adopt(held, item.get("entries"))
    return {"adopted": adopted, "skipped": skipped, "node": node.node_index}
