"""Cache nodes in process, and one way to build a router over them, for the router's tests.

:class:`InProcessNodes` stands where a :class:`~flstore_core.routing.invoker.NodeInvoker`
stands: ``{prefix}-cache-{i}`` is ``nodes[i]``, a real :class:`CacheNode` on a view of the
test's store, and events and answers pass through JSON as over ``lambda.invoke``. The hooks the
tests need: a scripted ``reply`` instead of the real nodes, nodes that are ``down``, ops that
are ``failing``, every invocation recorded, and one thread per node for tests whose float bits
depend on the calling thread.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from flstore_core.cache.node import CacheNode
from flstore_core.cache.round_data import RoundData
from flstore_core.routing.auth import TokenTable
from flstore_core.routing.failover import FailoverPolicy
from flstore_core.routing.invoker import NodeAnswer, NodeFailure
from flstore_core.routing.placement import round_shard
from flstore_core.routing.router import Router, RouterConfig
from flstore_core.storage.object_store import ObjectStore

# a scripted node: the payload it answers ``(function, event)`` with, or a NodeFailure raised
Reply = Callable[[str, dict[str, Any]], dict[str, Any]]

TOKEN = "fls_router-tests"
AUTH = f"Bearer {TOKEN}"


def _through_json(value: Any) -> Any:
    return json.loads(json.dumps(value))


class InProcessNodes:
    """Cache nodes as an invoker (module docstring).

    Parameters
    ----------
    store : ObjectStore, optional
        The store the nodes read (each on its own view); none with a scripted ``reply``.
    count : int
        How many nodes.
    budget : int
        Each node's cache budget in bytes.
    reply : Reply, optional
        Answer every invocation with ``reply(function, event)`` instead of a real node.
    threads : bool
        Run each node's invocations on one thread of its own, as a node process runs its
        handler on its main thread (torch's float bits differ between threads).
    billed_ms, memory_mb : float, int
        What every invocation is billed.
    """

    def __init__(
        self,
        store: ObjectStore | None = None,
        count: int = 0,
        *,
        budget: int = 10**8,
        reply: Reply | None = None,
        threads: bool = False,
        billed_ms: float = 5.0,
        memory_mb: int = 512,
    ) -> None:
        self.nodes = [
            CacheNode(store.view(), budget_bytes=budget, node_index=i)
            for i in range(count if store is not None else 0)
        ]
        self.threads = [ThreadPoolExecutor(1) for _ in self.nodes] if threads else []
        self.reply = reply
        self.billed_ms = billed_ms
        self.memory_mb = memory_mb
        self.down: set[int] = set()  # nodes that fail like a dead one
        # ops (or "artifacts:compute", "artifacts:rounds") that fail like a dead node
        self.failing: set[str] = set()
        self.calls: list[tuple[str, dict[str, Any]]] = []  # (function, event), in order

    def invoke(self, function: str, event: Mapping[str, Any]) -> NodeAnswer:
        """What ``lambda.invoke`` of ``function`` with ``event`` would answer."""
        self.calls.append((function, dict(event)))
        index = int(function.rsplit("-", 1)[1])
        step = f"{event.get('op')}:{'compute' if 'compute' in event else 'rounds'}"
        if index in self.down or event.get("op") in self.failing or step in self.failing:
            raise NodeFailure(f"{function}: Unhandled")
        if self.reply is not None:
            payload = self.reply(function, dict(event))
        else:
            payload = self.handle(index, event)
        return NodeAnswer(function, payload, self.billed_ms, self.memory_mb)

    def handle(self, index: int, event: Mapping[str, Any]) -> dict[str, Any]:
        """``event`` through JSON to node ``index`` (on its thread); its answer through JSON."""
        node = self.nodes[index]
        if self.threads:
            answer = self.threads[index].submit(node.handle, _through_json(event)).result()
        else:
            answer = node.handle(_through_json(event))
        out: dict[str, Any] = _through_json(answer)
        return out

    @property
    def functions(self) -> list[str]:
        """The functions invoked, in order."""
        return [function for function, _ in self.calls]

    @property
    def indexed(self) -> list[tuple[int, dict[str, Any]]]:
        """``(node index, event)`` of every invocation, in order."""
        return [(int(f.rsplit("-", 1)[1]), event) for f, event in self.calls]

    @property
    def ops(self) -> list[tuple[int, str]]:
        """``(node index, op)`` of every invocation, in order."""
        return [(index, str(event.get("op"))) for index, event in self.indexed]

    def round(self, index: int, job: str, round_: int) -> RoundData:
        """The round node ``index`` holds whole."""
        held = self.nodes[index].cache.get(round_shard(job, round_))
        assert isinstance(held, RoundData)
        return held


def make_router(
    store: ObjectStore,
    invoker: InProcessNodes,
    /,
    *,
    tokens: Mapping[str, list[str]] | None = None,
    sleep: Callable[[float], None] = lambda _s: None,
    **config: Any,
) -> Router:
    """A router over ``store`` and the nodes of ``invoker``; ``config`` are
    :class:`RouterConfig` fields (``prefix`` defaults to ``"fl"``). Its failover policy follows
    the config and records its sleeps with ``sleep`` instead of sleeping; ``tokens`` default to
    one granted every job."""
    settings = RouterConfig(**{"prefix": "fl", **config})
    policy = FailoverPolicy(
        max_attempts=settings.max_attempts,
        throttle_passes=settings.throttle_passes,
        sleep=sleep,
    )
    return Router(
        store,
        invoker,
        TokenTable.with_tokens(dict(tokens) if tokens is not None else {TOKEN: ["*"]}),
        settings,
        failover=policy,
    )
