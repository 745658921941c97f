"""``models.one_torch_thread`` sets the calling thread's torch thread count, whatever other
threads hold it: torch's count (OpenMP's) is per thread, and a pass that should run on one
thread (fltrust's ``g_0``, whose bits depend on the count) ran on two when another thread had
entered first."""

from __future__ import annotations

import threading

import torch

from flstore_core import models


def run_pass() -> None:
    """A parallel pass, so that the thread has its own torch thread count."""
    x = torch.randn(256, 256)
    (x @ x).sum()


def test_a_thread_entering_while_another_holds_it_runs_on_one_thread() -> None:
    seen: dict[str, int] = {}
    # a thread's first parallel pass takes the count last set by any thread: the second thread
    # runs its pass (and has its own count) before the first one enters
    second_ready = threading.Event()
    first_in = threading.Event()
    second_done = threading.Event()

    def first() -> None:
        run_pass()
        seen["first_before"] = torch.get_num_threads()
        second_ready.wait(30)
        with models.one_torch_thread():
            seen["first"] = torch.get_num_threads()
            first_in.set()
            second_done.wait(30)
        seen["first_after"] = torch.get_num_threads()

    def second() -> None:
        torch.set_num_threads(2)
        run_pass()
        seen["second_before"] = torch.get_num_threads()
        second_ready.set()
        first_in.wait(30)
        with models.one_torch_thread():
            seen["second"] = torch.get_num_threads()
            with models.one_torch_thread():  # reentrant
                seen["nested"] = torch.get_num_threads()
            seen["second_still"] = torch.get_num_threads()
        seen["second_after"] = torch.get_num_threads()
        second_done.set()

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert seen["first"] == seen["second"] == seen["nested"] == seen["second_still"] == 1
    assert seen["second_before"] == seen["second_after"] == 2  # each gets its own count back
    assert seen["first_after"] == seen["first_before"]
