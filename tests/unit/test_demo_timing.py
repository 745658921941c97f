"""The demo's timing (evaluation/demo_timing.py): flstore-first samples are never memo lookups,
flstore-repeat ones are, and the baselines are timed in the same passes."""

from __future__ import annotations

import time
from typing import Any

import pytest

from evaluation import demo_timing
from evaluation.demo_timing import FIRST, REPEAT, FirstRequestMemoised, FlstoreRequest, measure
from flstore_core.errors import NotFoundError

COMPUTE_S = 0.02  # the fake node's work for an answer it has not memoised


class FakeNode:
    """A node that memoises its answer: computing takes COMPUTE_S, a memo lookup nothing, and
    its answers say which they were (as a marker the test reads back)."""

    def __init__(self, reset_drops_memo: bool = True) -> None:
        self.memo: dict[str, Any] | None = None
        self.reused_count = 0
        self.resets = 0
        self.drops = reset_drops_memo
        self.answers: list[tuple[str, bool]] = []  # (phase, from memo) per request

    def call(self) -> dict[str, Any]:
        if self.memo is not None:
            self.reused_count += 1
            self.answers.append(("request", True))
            return {**self.memo, "meta": {"cost_usd": 1e-7, "memo": True}}
        time.sleep(COMPUTE_S)
        self.memo = {"result": {"selected": ["a", "b"]}}
        self.answers.append(("request", False))
        return {**self.memo, "meta": {"cost_usd": 2e-7, "memo": False}}

    def reset(self) -> None:
        self.resets += 1
        if self.drops:
            self.memo = None

    def reused(self) -> int:
        return self.reused_count

    def request(self) -> FlstoreRequest:
        return FlstoreRequest(self.call, self.reset, self.reused)


def baseline(result: dict[str, Any]) -> Any:
    calls: list[float] = []

    def call() -> dict[str, Any]:
        calls.append(time.perf_counter())
        return {"result": result, "meta": {"cost_usd": 3e-7}}

    call.calls = calls  # type: ignore[attr-defined]
    return call


def test_first_samples_compute_and_repeats_are_memo_lookups(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(demo_timing, "EXTRA_S", 0.0)  # exactly the asked repetitions
    node = FakeNode()
    agg = baseline({"selected": ["a", "b"]})
    row = measure("cosine_select", "round", node.request(), {"objstore-agg": agg}, 4, str)
    assert row["repetitions"] == 4 and node.resets == 4
    # each pass: a computed first, a memoised repeat
    assert [m for _, m in node.answers] == [False, True] * 4
    assert row["memo_hits"] == {FIRST: 0, REPEAT: 4}
    first, repeat = row["systems"][FIRST], row["systems"][REPEAT]
    assert first["p50_ms"] >= COMPUTE_S * 1000  # the compute is timed, not a lookup
    assert repeat["p50_ms"] < COMPUTE_S * 1000 / 2
    assert first["cost_usd"] == pytest.approx(2e-7) and repeat["cost_usd"] == pytest.approx(1e-7)
    assert len(agg.calls) == 4 and "disagree" not in row
    assert row["result"] == {"selected": ["a", "b"]} and row["found"] == str(row["result"])


def test_a_reset_that_keeps_the_memo_stops_the_measurement() -> None:
    # what the demo did before: one untimed request, then every timed one a lookup
    node = FakeNode(reset_drops_memo=False)
    node.call()
    with pytest.raises(FirstRequestMemoised, match="cosine_select"):
        measure("cosine_select", "round", node.request(), {}, 3, str)


def test_passes_are_interleaved_and_extended_while_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(demo_timing, "EXTRA_S", 10.0)
    monkeypatch.setattr(demo_timing, "MAX_REPETITIONS", 6)
    order: list[str] = []
    node = FakeNode()

    def first() -> dict[str, Any]:
        order.append("flstore")
        return node.call()

    def agg() -> dict[str, Any]:
        order.append("agg")
        return {"result": {"selected": ["a", "b"]}, "meta": {"cost_usd": 0.0}}

    request = FlstoreRequest(first, node.reset, node.reused)
    row = measure("cosine_select", "round", request, {"cache-agg": agg}, 2, str)
    assert row["repetitions"] == 6
    assert order == ["flstore", "flstore", "agg"] * 6


def test_a_baseline_that_answers_otherwise_is_listed() -> None:
    node = FakeNode()
    wrong = baseline({"selected": ["c"]})
    row = measure("cosine_select", "round", node.request(), {"objstore-agg": wrong}, 1, str)
    assert row["disagree"] == ["objstore-agg"]


def test_an_error_of_the_first_request_is_the_rows_error() -> None:
    def refused() -> dict[str, Any]:
        raise NotFoundError("no such round")

    request = FlstoreRequest(refused, lambda: None, lambda: 0)
    row = measure("krum", "round", request, {}, 3, str)
    assert row["error"].startswith("404") and not row["systems"]


def test_flstore_demo_passes_its_network_model_to_run_demo(monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    import evaluation.demo
    from flstore_core.cli import app

    seen: dict[str, Any] = {}
    monkeypatch.setattr(evaluation.demo, "run_demo", lambda **kw: seen.update(kw))
    result = CliRunner().invoke(app, ["demo", "--rounds", "2", "--network", "aws"])
    assert result.exit_code == 0, result.output
    assert seen["network"] == "aws" and seen["rounds"] == 2
    CliRunner().invoke(app, ["demo"])
    assert seen["network"] is None  # off unless asked
