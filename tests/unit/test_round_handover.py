"""The background writer rounds are handed to: bounded, in order, errors at the end."""

from __future__ import annotations

import logging
import threading
import time

import pytest

from flstore_core.sdk.handover import RoundHandover, RoundsNotStoredError


def test_submit_returns_at_once_and_blocks_only_while_max_in_flight_rounds_are_in_flight() -> None:
    release = threading.Event()
    handover = RoundHandover(2)
    t0 = time.perf_counter()
    handover.submit(0, release.wait)
    handover.submit(1, release.wait)
    assert time.perf_counter() - t0 < 0.5  # two rounds in flight: no wait
    assert handover.in_flight == 2

    third_queued = threading.Event()

    def hand_over_third() -> None:
        handover.submit(2, lambda: None)
        third_queued.set()

    threading.Thread(target=hand_over_third).start()
    assert not third_queued.wait(0.3)  # back-pressure: the third waits for a free slot
    release.set()
    assert third_queued.wait(5)
    handover.close()
    assert handover.in_flight == 0 and handover.blocked_s >= 0.25


def test_rounds_run_one_after_another_in_the_order_they_were_handed_over() -> None:
    order: list[int] = []
    running = threading.Semaphore(1)

    def store(round_: int, seconds: float) -> None:
        assert running.acquire(blocking=False), "two rounds written at once"
        time.sleep(seconds)
        order.append(round_)
        running.release()

    with RoundHandover(3) as handover:
        for round_, seconds in enumerate([0.05, 0.0, 0.03, 0.0, 0.01, 0.0]):
            handover.submit(round_, lambda r=round_, s=seconds: store(r, s))
    assert order == [0, 1, 2, 3, 4, 5]


def test_a_failed_round_is_logged_at_once_the_next_rounds_still_run_and_close_raises(
    caplog: pytest.LogCaptureFixture,
) -> None:
    stored: list[int] = []

    def store(round_: int) -> None:
        if round_ == 1:
            raise OSError("connection reset")
        stored.append(round_)

    handover = RoundHandover(2, what="job 'j'")
    with caplog.at_level(logging.ERROR, logger="flstore_core.sdk.handover"):
        for round_ in range(4):
            handover.submit(round_, lambda r=round_: store(r))
        assert handover.wait()[0].round == 1
    assert "round 1 of job 'j' was not stored" in caplog.text
    assert stored == [0, 2, 3]
    with pytest.raises(RoundsNotStoredError, match=r"round 1: OSError: connection reset") as err:
        handover.close()
    assert [f.round for f in err.value.failures] == [1]
    assert isinstance(err.value.__cause__, OSError)
    handover.flush()  # reported once


def test_max_in_flight_zero_runs_the_round_in_the_callers_thread_and_raises_there() -> None:
    handover = RoundHandover(0)
    caller = threading.get_ident()
    assert handover.submit(0, threading.get_ident).result() == caller
    with pytest.raises(ZeroDivisionError):
        handover.submit(1, lambda: 1 / 0)
    handover.close()


def test_leaving_a_block_on_its_own_error_waits_for_the_rounds_without_masking_it() -> None:
    stored: list[int] = []
    with pytest.raises(KeyError), RoundHandover(2) as handover:
        handover.submit(0, lambda: (time.sleep(0.1), stored.append(0)))
        handover.submit(1, lambda: 1 / 0)
        raise KeyError("the run failed")
    assert stored == [0]
