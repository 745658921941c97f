"""Failover and back-off: which cache nodes the router tries for a shard, and how long it waits.

The router ranks the nodes for a shard (replicas first, see :mod:`flstore_core.routing.placement`)
and hands the ranking to a :class:`FailoverPolicy`, which owns the mechanics:

* it tries at most ``max_attempts`` nodes, best first, in passes;
* a node that fails (function error, timeout, unreachable) is passed over for the next one;
* a node that is throttled is busy, not broken: a warm node that is busy now is still the
  cheapest place to run, so when a pass meets a throttled node and no node answered, the policy
  sleeps ``min(backoff_base_s * 2**pass, backoff_cap_s)`` and makes another pass, at most
  ``throttle_passes`` passes in all;
* when no node answered it raises :class:`~flstore_core.errors.UnavailableError` (503) naming
  the shard and the last failures.

A node's own answer, including a caller error it returns as a payload, ends the search: the
policy only sees failures raised as :class:`~flstore_core.routing.invoker.NodeFailure`. So does
an invocation that ran out of memory or time
(:class:`~flstore_core.routing.invoker.RequestKilledNode`): the request killed that instance
and would kill the next node's the same way (FedDebug on 10,000 inputs took two nodes down), so
it is a 503 at once (``out_of_memory`` or
``deadline_exceeded``) and the other nodes stay up. Any other failure is tried on the next node.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from flstore_core.cost import Invocation
from flstore_core.errors import DeadlineExceededError, NodeOutOfMemoryError, UnavailableError
from flstore_core.routing.invoker import NodeAnswer, NodeFailure, NodeThrottled, RequestKilledNode

FAILURES_REPORTED = 3  # how many of the last failures the 503 message quotes


def _killed(shard: str, exc: RequestKilledNode) -> UnavailableError:
    """The 503 of a request that ran a node out of memory or time: not tried elsewhere."""
    if exc.kind == "out_of_memory":
        return NodeOutOfMemoryError(
            f"the request for shard {shard} ran a cache node out of memory ({exc}); it was not "
            "retried on another node: ask for less work"
        )
    return DeadlineExceededError(
        f"the request for shard {shard} ran past a cache node's time limit ({exc}); it was not "
        "retried on another node: ask for less work"
    )


class Answered(NamedTuple):
    """The answer of the node that answered, every function tried (in order, repeats included)
    and the billed invocations."""

    answer: NodeAnswer
    tried: list[str]
    invocations: list[Invocation]


@dataclass(frozen=True)
class FailoverPolicy:
    """Try the ranked nodes in order, pass over failed ones, back off and retry busy ones.

    Parameters
    ----------
    max_attempts : int, default 4
        Nodes tried per pass, taken from the front of the ranking.
    throttle_passes : int, default 40
        Passes over those nodes at most, while some node answers "throttled".
    backoff_base_s : float, default 0.05
        The sleep after the first throttled pass; it doubles with every pass.
    backoff_cap_s : float, default 1.0
        The longest sleep between two passes.
    sleep : Callable[[float], None], default time.sleep
        How to wait; tests pass a recorder instead of sleeping.
    """

    max_attempts: int = 4
    throttle_passes: int = 40
    backoff_base_s: float = 0.05
    backoff_cap_s: float = 1.0
    sleep: Callable[[float], None] = field(default=time.sleep, compare=False, repr=False)

    def candidates(self, ranked: Sequence[str]) -> list[str]:
        """The functions worth trying, best first: the front of the ranking."""
        return list(ranked[: self.max_attempts])

    def backoff_s(self, pass_: int) -> float:
        """The sleep after throttled pass number ``pass_`` (0-based)."""
        return min(self.backoff_base_s * 2.0**pass_, self.backoff_cap_s)

    def invoke(
        self, shard: str, ranked: Sequence[str], call: Callable[[str], NodeAnswer]
    ) -> Answered:
        """Call the ranked functions until one answers; :class:`UnavailableError` if none does.

        ``call`` invokes one function and raises :class:`NodeFailure` (or
        :class:`NodeThrottled`) when it does not answer; ``shard`` names what is asked for in
        the error.
        """
        tried: list[str] = []
        failures: list[str] = []
        candidates = self.candidates(ranked)
        for pass_ in range(self.throttle_passes):
            busy = False
            for function in candidates:
                tried.append(function)
                try:
                    answer = call(function)
                except NodeThrottled as exc:
                    failures.append(str(exc))
                    busy = True
                    continue
                except RequestKilledNode as exc:
                    raise _killed(shard, exc) from exc
                except NodeFailure as exc:
                    failures.append(str(exc))
                    continue
                invocation = Invocation(function, answer.billed_ms, answer.memory_mb)
                return Answered(answer, tried, [invocation])
            if not busy:
                break
            self.sleep(self.backoff_s(pass_))
        raise UnavailableError(
            f"no cache node could answer for shard {shard}: "
            + "; ".join(failures[-FAILURES_REPORTED:])
        )
