"""What each job asks, learned from its requests: the input of the job-following policy
(:class:`~flstore_core.cache.job_policy.JobFollowingEviction`, ARCHITECTURE §3).

A cache node sees, for each request it answers, the job, the workload's class, the round it
read (round class), whether it read that round's *rows* (not only its Gram, artifacts or a
memoised answer) and whether it is a *model* workload (one that evaluates models: inference,
per-client accuracies, contribution, debugging); the router sees the same less the rows.
:class:`JobMix` keeps these uses (:class:`Use`) for the latest ``window_rounds`` rounds of each
job and answers the questions the policy and prefetch ask:

* :meth:`JobMix.known` — whether enough of the job was seen (``min_requests`` uses in the
  window) to follow it; until then every decision is the static tiers' (a node that just
  started follows nobody);
* :meth:`JobMix.asks_models`, :meth:`JobMix.asks_clients` — whether any model or client-class
  request came in the window (a job that never asks one gets no model artifacts built and its
  model shard kept last, or its histories first out);
* :meth:`JobMix.pending` — how many more rows reads a round can expect while it is among its
  job's latest ``horizon`` rounds: the reads the job's earlier rounds got over that span (their
  mean, over the rounds that left it inside the window and that this observer held), less the
  reads this round already got. A round whose aggregation ran has none left;
* :meth:`JobMix.revisits` — rows reads on rounds past the horizon per round, spread over the
  job's past-horizon rounds: the chance that keeping one old round's rows pays off (0 for a
  job that never revisits its history).

Every figure is per observer: a node counts the requests it answered on the shards it held, so
its means are over the rounds it held (a replica that gets half a round's reads expects half).
"""

from __future__ import annotations

import functools
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


def _locked(method: F) -> F:
    """Run ``method`` under the mix's lock: a router records requests from many threads while
    a prefetch asks about the same jobs."""

    @functools.wraps(method)
    def wrapper(self: JobMix, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            return method(self, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


@dataclass(frozen=True)
class Use:
    """One request, as the cache saw it.

    ``round`` is the round a round-class request read (``None`` for the other classes);
    ``rows`` whether it read that round's rows; ``model`` whether the workload evaluates
    models."""

    job: str
    cls: str
    round: int | None = None
    rows: bool = False
    model: bool = False


@dataclass
class _Job:
    """One job's uses over its latest rounds."""

    latest: int = -1
    uses: deque[tuple[int, Use]] = field(default_factory=deque)  # (latest round then, use)
    early_reads: dict[int, int] = field(default_factory=dict)  # round -> rows reads in horizon
    held: set[int] = field(default_factory=set)  # rounds held here in the window


@dataclass
class JobMix:
    """The uses of each job over its latest ``window_rounds`` rounds (module docstring).

    Parameters
    ----------
    window_rounds : int, default 20
        How many of the job's latest rounds the mix remembers.
    horizon : int, default 2
        A round is *early* while it is among its job's latest ``horizon`` rounds; rows reads
        past it are revisits.
    min_requests : int, default 8
        Uses in the window before a job is followed (:meth:`known`).
    """

    window_rounds: int = 20
    horizon: int = 2
    min_requests: int = 8
    jobs: dict[str, _Job] = field(default_factory=dict, repr=False)
    _lock: threading.RLock = field(default_factory=threading.RLock, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.window_rounds < self.horizon or self.horizon < 1:
            raise ValueError("a mix needs 1 <= horizon <= window_rounds")

    def _job(self, job: str) -> _Job:
        return self.jobs.setdefault(job, _Job())

    @_locked
    def note_round(self, job: str, round_: int) -> None:
        """Round ``round_`` of ``job`` is held here (loaded, prefetched or read): the job's
        latest round is at least this one."""
        state = self._job(job)
        if round_ > state.latest:
            state.latest = round_
            self._prune(state)
        if round_ > state.latest - self.window_rounds:
            state.held.add(round_)

    @_locked
    def observe(self, use: Use) -> None:
        """One more request."""
        state = self._job(use.job)
        if use.round is not None:
            self.note_round(use.job, use.round)
            if use.rows and state.latest - use.round < self.horizon:
                state.early_reads[use.round] = state.early_reads.get(use.round, 0) + 1
        state.uses.append((state.latest, use))

    def _prune(self, state: _Job) -> None:
        """Forget what is older than the window."""
        oldest = state.latest - self.window_rounds + 1
        while state.uses and state.uses[0][0] < oldest:
            state.uses.popleft()
        state.early_reads = {r: n for r, n in state.early_reads.items() if r >= oldest}
        state.held = {r for r in state.held if r >= oldest}

    # ------------------------------------------------------------------ questions

    @_locked
    def latest(self, job: str) -> int | None:
        """The job's latest round seen, or ``None``."""
        state = self.jobs.get(job)
        return None if state is None or state.latest < 0 else state.latest

    @_locked
    def known(self, job: str) -> bool:
        """Whether ``min_requests`` of the job's requests were seen in the window."""
        state = self.jobs.get(job)
        return state is not None and len(state.uses) >= self.min_requests

    @_locked
    def asks_models(self, job: str) -> bool:
        """Whether the job asked a model workload in the window (``True`` while not known)."""
        if not self.known(job):
            return True
        return any(use.model for _, use in self.jobs[job].uses)

    @_locked
    def asks_clients(self, job: str) -> bool:
        """Whether the job asked a client-class workload in the window (``False`` while not
        known: the static tiers put histories first out)."""
        if not self.known(job):
            return False
        return any(use.cls == "client" for _, use in self.jobs[job].uses)

    @_locked
    def expected_reads(self, job: str) -> float | None:
        """The mean rows reads a held round of the job got while early, over the held rounds
        that left the horizon inside the window; ``None`` when there is none yet."""
        state = self.jobs.get(job)
        if state is None:
            return None
        done = [r for r in state.held if state.latest - r >= self.horizon]
        if not done:
            return None
        return sum(state.early_reads.get(r, 0) for r in done) / len(done)

    @_locked
    def early_reads_of(self, job: str, round_: int) -> int:
        """Rows reads round ``round_`` got while early."""
        state = self.jobs.get(job)
        return 0 if state is None else state.early_reads.get(round_, 0)

    @_locked
    def pending(self, job: str, round_: int) -> float | None:
        """The rows reads round ``round_`` can still expect while early (0 past the horizon);
        ``None`` when the job's past rounds do not say yet."""
        state = self.jobs.get(job)
        if state is None or state.latest - round_ >= self.horizon:
            return 0.0 if state is not None else None
        expected = self.expected_reads(job)
        if expected is None:
            return None
        return max(0.0, expected - self.early_reads_of(job, round_))

    @_locked
    def revisits(self, job: str) -> float:
        """The chance, per round, that one given past-horizon round of the job has its rows
        read: the window's rows reads on past-horizon rounds, per round of the window, spread
        evenly over the job's past-horizon rounds (0 for a job that never revisits)."""
        state = self.jobs.get(job)
        if state is None or not state.uses:
            return 0.0
        late = sum(
            1
            for latest, use in state.uses
            if use.rows and use.round is not None and latest - use.round >= self.horizon
        )
        span = state.latest - state.uses[0][0] + 1
        old = max(1, state.latest + 1 - self.horizon)
        return late / span / old

    @_locked
    def summary(self) -> dict[str, dict[str, object]]:
        """What is followed of each known job (a node's ``stats``: ``followed``)."""
        return {
            job: {
                "requests": len(self.jobs[job].uses),
                "asks_models": self.asks_models(job),
                "asks_clients": self.asks_clients(job),
                "expected_reads": self.expected_reads(job),
                "revisits": self.revisits(job),
            }
            for job in sorted(self.jobs)
            if self.known(job)
        }
