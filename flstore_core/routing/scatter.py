"""The router's mechanics: invoking nodes in order, scattering a round's column blocks over
their holders, and gathering the answers.

Every decision lives elsewhere (which nodes to try: :mod:`~flstore_core.routing.placement` and
:mod:`~flstore_core.routing.planner`; when to retry: the
:class:`~flstore_core.routing.failover.FailoverPolicy`); this module only carries them out.
What one request's invocations answered, tried and cost is a :class:`Scatter` the caller
creates and passes to every call made for that request — there is no per-thread state, so a
call made from a pool thread is accounted to the request that asked for it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from flstore_core.cost import Invocation
from flstore_core.errors import (
    DeadlineExceededError,
    NodeOutOfMemoryError,
    UnavailableError,
    error_from_dict,
)
from flstore_core.protocol import NodeOp
from flstore_core.routing.failover import Answered, FailoverPolicy
from flstore_core.routing.invoker import Invoker
from flstore_core.routing.placement import node_name
from flstore_core.routing.planner import RoundPlan

# the op a block holder is sent for the blocks (indices into the plan) assigned to it
BlockEvent = Callable[[list[int]], NodeOp]
# each block's item of its node's answer, and that answer
BlockAnswer = tuple[dict[str, Any], dict[str, Any]]


def checked(payload: dict[str, Any]) -> dict[str, Any]:
    """A node's answer, or the typed error it answered with, raised."""
    if "error" in payload:
        raise error_from_dict(payload, int(payload.get("status", 500)))
    return payload


@dataclass
class Scatter:
    """What one request's invocations of a sharded round answered, tried and cost."""

    answers: list[dict[str, Any]] = field(default_factory=list)
    tried: list[str] = field(default_factory=list)
    invocations: list[Invocation] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    s3_puts: int = 0

    def add_puts(self, count: int) -> None:
        """Count ``count`` more PUT-class requests the router made to S3 for the request."""
        with self.lock:
            self.s3_puts += count

    def add_tried(self, function: str) -> None:
        """Record a function tried that did not answer."""
        with self.lock:
            self.tried.append(function)

    def add(self, answered: Answered) -> dict[str, Any]:
        """Record a node's answer (raising the error it answered with) and return it."""
        payload = checked(answered.answer.payload)
        with self.lock:
            self.answers.append(payload)
            self.tried.extend(answered.tried)
            self.invocations.extend(answered.invocations)
        return payload


def _accounted(answered: Answered, scatter: Scatter | None) -> dict[str, Any]:
    return checked(answered.answer.payload) if scatter is None else scatter.add(answered)


class BlockScatter:
    """Invokes nodes for the router: in failover order, or block by block over a round's
    holders, in parallel on one pool the router's parts share.

    ``invoker`` and ``failover`` may be replaced while the router lives (benchmarks wrap the
    invoker to record what is sent); every call reads them afresh.
    """

    def __init__(
        self, invoker: Invoker, failover: FailoverPolicy, prefix: str, workers: int = 8
    ) -> None:
        self.invoker = invoker
        self.failover = failover
        self.prefix = prefix
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="router")

    def function(self, index: int) -> str:
        """The function name of node ``index``."""
        return node_name(self.prefix, index)

    def invoke_in_order(self, shard: str, order: list[int], op: NodeOp) -> Answered:
        """Invoke the nodes of ``order`` with ``op`` until one answers, as the failover policy
        decides."""
        ranked = [self.function(index) for index in order]
        event = op.to_event()
        return self.failover.invoke(
            shard, ranked, lambda function: self.invoker.invoke(function, event)
        )

    def one(
        self, shard: str, order: list[int], op: NodeOp, scatter: Scatter | None
    ) -> dict[str, Any]:
        """One node's checked answer to ``op`` for ``shard``, accounted to ``scatter``."""
        return _accounted(self.invoke_in_order(shard, order, op), scatter)

    def gather(self, one: Callable[[int], dict[str, Any]], count: int) -> list[dict[str, Any]]:
        """``one(i)`` for ``i`` in ``range(count)``, in parallel; the answers in order."""
        return list(self.pool.map(one, range(count)))

    def blocks(
        self, plan: RoundPlan, event: BlockEvent, scatter: Scatter | None
    ) -> list[BlockAnswer]:
        """Ask the block holders for every block of ``plan``: each node gets ONE invocation
        carrying all the blocks assigned to it (a cache node runs one invocation at a time: two
        concurrent ones would be throttled), blocks spread over their owners; a node that fails
        has its blocks reassigned along their orders in the next pass. Returns, in block order,
        each block's item of its node's answer and that answer."""
        count = len(plan.blocks)
        pending = list(range(count))
        failed: dict[int, set[int]] = {i: set() for i in pending}
        out: dict[int, BlockAnswer] = {}
        while pending:
            assigned = self._assign(plan, pending, failed)

            def call(job: tuple[int, list[int]]) -> tuple[int, Answered | None]:
                node, indices = job
                function = self.function(node)
                payload = event(indices).to_event()
                try:
                    answered = self.failover.invoke(
                        f"{plan.job}/round/{plan.round} blocks {indices}",
                        [function],
                        lambda f: self.invoker.invoke(f, payload),
                    )
                except (DeadlineExceededError, NodeOutOfMemoryError):
                    raise  # the blocks' work killed the node: other holders would fail the same
                except UnavailableError:
                    if scatter is not None:
                        scatter.add_tried(function)
                    return node, None
                return node, answered

            pending = []
            for node, answered in self.pool.map(call, sorted(assigned.items())):
                if answered is None:
                    for i in assigned[node]:
                        failed[i].add(node)
                    pending.extend(assigned[node])
                    continue
                payload = _accounted(answered, scatter)
                for item in payload["results"]:
                    out[int(item["index"])] = (item, payload)
            pending.sort()
        return [out[i] for i in range(count)]

    def _assign(
        self, plan: RoundPlan, pending: list[int], failed: dict[int, set[int]]
    ) -> dict[int, list[int]]:
        """This pass's node for each pending block: the least-loaded owner not yet failed (the
        first other candidate when every owner failed); 503 when a block has none left."""
        assigned: dict[int, list[int]] = {}
        for i in pending:
            block = plan.blocks[i]
            candidates = [n for n in block.order if n not in failed[i]]
            candidates = candidates[: self.failover.max_attempts]
            if not candidates:
                raise UnavailableError(
                    f"no cache node could answer for block {block.key}: tried "
                    + ", ".join(self.function(n) for n in sorted(failed[i]))
                )
            owners = [n for n in candidates if n in block.owners] or candidates[:1]
            node = min(owners, key=lambda n: (len(assigned.get(n, [])), owners.index(n)))
            assigned.setdefault(node, []).append(i)
        return assigned
