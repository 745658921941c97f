"""The failover and back-off policy on its own: ranked functions in, one answer or a 503 out."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from flstore_core.cost import Invocation
from flstore_core.errors import UnavailableError
from flstore_core.routing.failover import FailoverPolicy
from flstore_core.routing.invoker import NodeAnswer, NodeFailure, NodeThrottled

RANKED = ["n2", "n0", "n3", "n1", "n4"]

Outcome = dict[str, object] | NodeFailure


class ScriptedCalls:
    """Answers each function's calls from a script (last entry repeats); records the order."""

    def __init__(self, script: dict[str, list[Outcome]]) -> None:
        self.script = script
        self.calls: list[str] = []

    def __call__(self, function: str) -> NodeAnswer:
        self.calls.append(function)
        outcomes = self.script.get(function, [NodeFailure(f"{function}: Unhandled")])
        outcome = outcomes.pop(0) if len(outcomes) > 1 else outcomes[0]
        if isinstance(outcome, NodeFailure):
            raise outcome
        return NodeAnswer(function, dict(outcome), billed_ms=7.0, memory_mb=512)


def recorder() -> tuple[list[float], Callable[[float], None]]:
    sleeps: list[float] = []
    return sleeps, sleeps.append


def test_the_defaults_are_the_routers_historic_knobs() -> None:
    policy = FailoverPolicy()
    assert (policy.max_attempts, policy.throttle_passes) == (4, 40)
    assert (policy.backoff_base_s, policy.backoff_cap_s) == (0.05, 1.0)


def test_the_first_node_that_answers_is_the_answer() -> None:
    call = ScriptedCalls({"n2": [{"result": 1}]})
    answered = FailoverPolicy().invoke("j/round/0", RANKED, call)
    assert answered.answer.payload == {"result": 1}
    assert answered.tried == ["n2"] and call.calls == ["n2"]
    assert answered.invocations == [Invocation("n2", 7.0, 512)]


def test_a_failed_node_is_passed_over_for_the_next_in_rank_order() -> None:
    call = ScriptedCalls({"n3": [{"result": 3}]})
    sleeps, sleep = recorder()
    answered = FailoverPolicy(sleep=sleep).invoke("j/round/0", RANKED, call)
    assert answered.answer.function == "n3"
    assert answered.tried == ["n2", "n0", "n3"]
    # only the node that answered is billed; failures are not waited for
    assert answered.invocations == [Invocation("n3", 7.0, 512)] and sleeps == []


def test_at_most_max_attempts_nodes_are_tried_then_503() -> None:
    call = ScriptedCalls({"n4": [{"result": 4}]})  # fifth in rank: never reached
    policy = FailoverPolicy(max_attempts=4)
    with pytest.raises(UnavailableError) as err:
        policy.invoke("j/round/0", RANKED, call)
    assert call.calls == RANKED[:4]
    assert err.value.status == 503


def test_the_503_names_the_shard_and_the_last_three_failures() -> None:
    with pytest.raises(UnavailableError) as err:
        FailoverPolicy().invoke("j/round/7", RANKED, ScriptedCalls({}))
    assert err.value.message == (
        "no cache node could answer for shard j/round/7: "
        "n0: Unhandled; n3: Unhandled; n1: Unhandled"
    )


def test_a_throttled_pass_backs_off_and_tries_again() -> None:
    call = ScriptedCalls({"n2": [NodeThrottled("n2: throttled"), {"result": 2}]})
    sleeps, sleep = recorder()
    answered = FailoverPolicy(max_attempts=2, sleep=sleep).invoke("j/round/0", RANKED, call)
    assert answered.tried == ["n2", "n0", "n2"] and answered.answer.function == "n2"
    assert sleeps == [0.05]


def test_the_back_off_doubles_up_to_its_cap() -> None:
    policy = FailoverPolicy(backoff_base_s=0.05, backoff_cap_s=1.0)
    assert [policy.backoff_s(p) for p in range(7)] == [0.05, 0.1, 0.2, 0.4, 0.8, 1.0, 1.0]


def test_throttled_on_every_pass_gives_up_after_throttle_passes() -> None:
    call = ScriptedCalls({f: [NodeThrottled(f"{f}: throttled")] for f in RANKED})
    sleeps, sleep = recorder()
    policy = FailoverPolicy(max_attempts=2, throttle_passes=3, backoff_base_s=0.5, sleep=sleep)
    with pytest.raises(UnavailableError, match="n2: throttled; n0: throttled"):
        policy.invoke("j/round/0", RANKED, call)
    assert call.calls == ["n2", "n0"] * 3
    assert sleeps == [0.5, 1.0, 1.0]


def test_no_second_pass_when_nothing_was_throttled() -> None:
    sleeps, sleep = recorder()
    with pytest.raises(UnavailableError):
        FailoverPolicy(max_attempts=2, sleep=sleep).invoke("s", RANKED, ScriptedCalls({}))
    assert sleeps == []


def test_a_payload_that_carries_an_error_is_an_answer_not_a_failure() -> None:
    # the node returned a caller error on purpose: the router reports it, nobody retries it
    error = {"error": {"code": "not_found", "message": "no round 9"}, "status": 404}
    call = ScriptedCalls({"n2": [error]})
    answered = FailoverPolicy().invoke("j/round/9", RANKED, call)
    assert answered.answer.payload == error and call.calls == ["n2"]


def test_candidates_are_the_front_of_the_ranking() -> None:
    assert FailoverPolicy(max_attempts=2).candidates(RANKED) == ["n2", "n0"]
    assert FailoverPolicy(max_attempts=9).candidates(RANKED) == RANKED
