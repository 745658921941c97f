"""Handing rounds over to a background writer, so that storing a round never holds training.

A training loop that stores each round as it ends waits for the store: measured on the local
stack, a ResNet-18 × 10 round held a Flower strategy 6.0–6.5 s to write, summarise and commit,
and 14.6–15.9 s when it also warmed the cache nodes. :class:`RoundHandover` takes that work off
the loop:

- **Returns at once**: :meth:`RoundHandover.submit` queues the round's work (a callable) and
  returns a future; one background thread runs the rounds one after another, in the order they
  were handed over (round ``r`` commits before ``r + 1``; the round's own writes stay parallel).
- **Bounded**: at most ``max_in_flight`` rounds are queued or being written; ``submit`` blocks
  while that many are (back-pressure), so memory holds at most that many rounds' arrays.
- **Durable before the end**: :meth:`RoundHandover.flush` (and :meth:`close`) wait for every
  round handed over. The thread is a ``concurrent.futures`` worker, which the interpreter joins
  before it exits, so rounds already handed over are still written when a program forgets to
  flush.
- **Errors**: a round that fails is logged at once, with its number, and the next rounds are
  still written (each round is whole on its own: its manifest is written last, so a failed or
  interrupted round is absent, never half there); ``flush``/``close`` then raise
  :class:`RoundsNotStoredError` naming every round that was not stored.

The caller must not change the arrays of a round it handed over: hand over arrays nothing else
writes to (the Flower integration hands arrays it decoded itself), or copies.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

from flstore_core.errors import FLStoreError

__all__ = ["DEFAULT_MAX_IN_FLIGHT", "RoundFailure", "RoundHandover", "RoundsNotStoredError"]

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_MAX_IN_FLIGHT = 2
"""One round being written while the next is handed over: the loop never waits on a store
that keeps up with it, and at most two rounds' arrays are held."""


@dataclass(frozen=True)
class RoundFailure:
    """A round the background writer could not store, and why."""

    round: int
    error: BaseException

    def __str__(self) -> str:
        return f"round {self.round}: {type(self.error).__name__}: {self.error}"


class RoundsNotStoredError(FLStoreError):
    """Some rounds handed over were not stored; ``failures`` says which and why (the first
    failure is also the exception's ``__cause__``)."""

    def __init__(self, what: str, failures: list[RoundFailure]) -> None:
        self.failures = failures
        listed = "; ".join(str(f) for f in failures)
        super().__init__(f"{len(failures)} round(s) of {what} were not stored: {listed}")


class RoundHandover:
    """Runs each round's storing work in the background, in order, at most ``max_in_flight``
    rounds at a time.

    Parameters
    ----------
    max_in_flight : int, default 2
        Rounds queued or being written before :meth:`submit` blocks. 0: no background at all,
        ``submit`` runs the work itself and raises its error (the behaviour before hand-over).
    what : str, default "a job"
        What the rounds belong to, for log lines and errors (``job 'mnist'``).
    """

    def __init__(self, max_in_flight: int = DEFAULT_MAX_IN_FLIGHT, *, what: str = "a job") -> None:
        if max_in_flight < 0:
            raise ValueError(f"max_in_flight={max_in_flight}: use 0 (no background) or more")
        self.max_in_flight = max_in_flight
        self.what = what
        self.blocked_s = 0.0
        """Seconds ``submit`` spent waiting for a free slot (back-pressure), in total."""
        self._slots = threading.BoundedSemaphore(max(1, max_in_flight))
        self._failures: list[RoundFailure] = []
        self._failures_lock = threading.Lock()
        self._pending: list[Future[object]] = []
        self._executor: ThreadPoolExecutor | None = None

    def submit(self, round_: int, work: Callable[[], T]) -> Future[T]:
        """Hand round ``round_``'s work over; returns once it is queued (at once, unless
        ``max_in_flight`` rounds are in flight). The future holds the work's result or error."""
        if self.max_in_flight == 0:
            done: Future[T] = Future()
            done.set_result(work())
            return done
        t0 = time.perf_counter()
        self._slots.acquire()
        self.blocked_s += time.perf_counter() - t0
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="flstore-rounds")
        try:
            future = self._executor.submit(self._run, round_, work)
        except BaseException:
            self._slots.release()
            raise
        future.add_done_callback(lambda _: self._slots.release())
        self._pending = [f for f in self._pending if not f.done()]
        self._pending.append(future)  # type: ignore[arg-type]
        return future

    def _run(self, round_: int, work: Callable[[], T]) -> T:
        try:
            return work()
        except BaseException as exc:
            log.error("FLStore: round %d of %s was not stored: %r", round_, self.what, exc)
            with self._failures_lock:
                self._failures.append(RoundFailure(round_, exc))
            raise

    @property
    def in_flight(self) -> int:
        """Rounds handed over and not yet stored (or failed)."""
        return sum(not f.done() for f in self._pending)

    def wait(self) -> list[RoundFailure]:
        """Wait for every round handed over; the failures so far, without raising."""
        for future in list(self._pending):
            future.exception()  # waits; the failure is already recorded by _run
        self._pending = []
        with self._failures_lock:
            return list(self._failures)

    def flush(self) -> None:
        """Wait for every round handed over; raise :class:`RoundsNotStoredError` if any was
        not stored (each failure is raised once: a later flush reports only newer ones)."""
        failures = self.wait()
        if not failures:
            return
        with self._failures_lock:
            self._failures = []
        raise RoundsNotStoredError(self.what, failures) from failures[0].error

    def close(self) -> None:
        """:meth:`flush`, then stop the background thread (a later ``submit`` starts another)."""
        try:
            self.flush()
        finally:
            self._stop()

    def _stop(self) -> None:
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True)

    def __enter__(self) -> RoundHandover:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        if exc_type is None:
            self.close()
            return
        # the block's own error wins: the rounds handed over still land, failures were logged
        self.wait()
        self._stop()
