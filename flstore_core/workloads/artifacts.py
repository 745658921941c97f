"""Per-round model artifacts: computed when a round is prefetched, shared by its replicas.

Reference: ARCHITECTURE §3 (per-round model artifacts computed once and shared like the Gram).
The model-based workloads memoise what they evaluate on the round
(:meth:`~flstore_core.cache.round_view.RoundView.memo`, :mod:`flstore_core.workloads.evaluation`);
memoising within requests helps a repeated request only. Prefetch computes, once per round,
what their default params need, by the workloads' own memoised functions — so a request answers
the same with or without them, only sooner:

==========================  ==============================================  ===================
task                        value (memo)                                    read by
==========================  ==============================================  ===================
``client`` i (n of them)    accuracy of client i's model (client_accuracy,  accuracy_select,
                            model_accuracy)                                 personalize, Shapley
``subset_all``              ``U(N)``: the FedAvg aggregate's accuracy       contribution_loo,
                            (subset_accuracy, model_accuracy)               personalize, Shapley
``subset_without`` i        ``U(N ∖ {i})`` (subset_accuracy)                contribution_loo,
                                                                            Shapley
``subset_empty``            ``U(∅)``: the base model's accuracy             Shapley
``fltrust``                 ``g_i·g_0``, ``‖g_0‖²`` of the default ``g_0``  fltrust
                            (server_update)
``feddebug``                the default localization's votes                feddebug
                            (feddebug_votes)
==========================  ==============================================  ===================

They exist only when the job declares a model (feddebug) and has a validation set (the rest);
fltrust's only when the round's base is stored. A round held by R nodes (its replicas) has its
tasks split into R shares of about equal cost (:func:`assign`, the same on every node): each
replica computes its share at ``load`` and answers the values it holds (:func:`export`), and
the router hands every replica the others' values (:func:`adopt`). The values are scores and a
few dots — hundreds of bytes. A replica that has not received them (a failed exchange, a round
loaded by a request) computes them when asked: every value is a deterministic function of the
round's content, the model and the validation set, computed by the same code wherever it runs.

A task that fails is logged and reported, and left to the request that needs it: prefetch never
fails for an artifact.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from flstore_core.cache.round_view import RoundView
from flstore_core.errors import FLStoreError, ValidationError

log = logging.getLogger(__name__)

# forward + backward of one training step cost about three forward passes
TRAIN_PASSES = 3.0


@dataclass(frozen=True)
class Task:
    """One unit of prefetch work on a round: ``kind`` (with ``row`` for per-client kinds) and
    its estimated cost, in evaluations of one model on the validation set."""

    kind: str
    row: int | None = None
    cost: float = 1.0

    @property
    def name(self) -> str:
        return self.kind if self.row is None else f"{self.kind}:{self.row}"


def _defaults(workload: str) -> dict[str, Any]:
    from flstore_core.workloads import get

    return get(workload).validate({})


def _validation_size(data: RoundView) -> int | None:
    """Images in the job's validation set, ``None`` when the job has none."""
    try:
        _, y = data.context.validation()
    except FLStoreError:
        return None
    return len(y)


def round_tasks(data: RoundView) -> list[Task]:
    """What the model-based workloads' default params need of ``data``, in a fixed order."""
    try:
        data.context.model_name()
    except FLStoreError:
        return []  # no model declared: no model-based workload runs on this job
    n = data.n
    tasks: list[Task] = []
    size = _validation_size(data)
    if size is not None:
        tasks += [Task("client", i) for i in range(n)]
        tasks.append(Task("subset_all"))
        tasks += [Task("subset_without", i) for i in range(n)] if n > 1 else []
        tasks.append(Task("subset_empty"))
        if data.is_delta:
            ft = _defaults("fltrust")
            tasks.append(Task("fltrust", cost=TRAIN_PASSES * ft["server_epochs"]))
    if n >= 3:  # feddebug refuses smaller rounds
        fd = _defaults("feddebug")
        # n models on num_inputs random inputs, against one model on the validation set
        tasks.append(Task("feddebug", cost=max(0.2, n * fd["num_inputs"] / max(size or 256, 1))))
    return tasks


def assign(tasks: list[Task], shares: int) -> list[list[Task]]:
    """``tasks`` split into ``shares`` lists of about equal cost (longest first, each to the
    least loaded share, ties to the lowest share and the earliest task): the same on every
    node, so replicas told "share k of R" compute disjoint parts."""
    out: list[list[Task]] = [[] for _ in range(shares)]
    load = [0.0] * shares
    order = sorted(range(len(tasks)), key=lambda i: (-tasks[i].cost, i))
    for i in order:
        k = min(range(shares), key=lambda s: (load[s], s))
        out[k].append(tasks[i])
        load[k] += tasks[i].cost
    for part in out:  # each share runs in the tasks' own order
        part.sort(key=tasks.index)
    return out


class _Runner:
    """Runs tasks on one round with one model instance for every evaluation (a
    :class:`~flstore_core.workloads.contribution_loo.SubsetUtility` and its scorer, built on
    first use)."""

    def __init__(self, data: RoundView) -> None:
        self.data = data
        self._utility: Any = None

    @property
    def utility(self) -> Any:
        if self._utility is None:
            from flstore_core.workloads.contribution_loo import SubsetUtility

            self._utility = SubsetUtility(self.data)  # weighted, as the workloads' default
        return self._utility

    def run(self, task: Task) -> None:
        """Compute one task's values into the round's memo (the workloads' own functions)."""
        from flstore_core.workloads.feddebug import client_votes
        from flstore_core.workloads.fltrust import server_trust

        data = self.data
        everyone = set(range(data.n))
        if task.kind == "client":
            assert task.row is not None
            self.utility.scorer.client_accuracy(task.row)
        elif task.kind == "subset_all":
            self.utility(everyone)
        elif task.kind == "subset_without":
            assert task.row is not None
            self.utility(everyone - {task.row})
        elif task.kind == "subset_empty":
            self.utility(set())
        elif task.kind == "fltrust":
            ft = _defaults("fltrust")
            server_trust(
                data,
                ft["server_epochs"],
                ft["lr"],
                ft["batch_size"],
                ft["seed"],
                ft["include_buffers"],
            )
        elif task.kind == "feddebug":
            fd = _defaults("feddebug")
            client_votes(data, fd["num_inputs"], fd["threshold"], fd["num_faulty"], fd["seed"])
        else:
            raise ValueError(f"unknown artifact task {task.kind!r}")


def compute(
    data: RoundView,
    share: int = 0,
    shares: int = 1,
    budget_s: float | None = None,
    start: int = 0,
    at_least: int = 0,
) -> dict[str, Any]:
    """Compute share ``share`` of ``shares`` of the round's tasks (every task when alone),
    from its ``start``-th task on (a chunk after the ``start`` tasks an earlier one did), the
    first ``at_least`` whatever the budget (a chunk always makes progress).

    No task starts once ``budget_s`` seconds have passed (a prefetch must end well within the
    node's timeout): those are ``deferred`` to the requests that need them.

    Returns what was done: ``tasks`` (names), ``errors`` (task -> message; a failed task is
    left to the request that needs it), ``deferred`` (names), ``ms`` (wall time).
    """
    t0 = time.perf_counter()
    errors: dict[str, str] = {}
    done: list[str] = []
    deferred: list[str] = []
    try:
        mine = assign(round_tasks(data), shares)[share][start:] if 0 <= share < shares else []
    except Exception as exc:  # what the round's tasks are could not even be decided
        log.warning("artifacts of %s/%s: %s", data.job, data.round, exc)
        return {"tasks": [], "errors": {"plan": str(exc)}, "deferred": [], "ms": 0.0}
    runner = _Runner(data)
    for task in mine:
        over = budget_s is not None and time.perf_counter() - t0 >= budget_s
        if over and len(done) + len(errors) >= at_least:
            deferred.append(task.name)
            continue
        try:
            runner.run(task)
            done.append(task.name)
        except Exception as exc:  # an artifact never fails the prefetch
            log.warning("artifact %s of %s/%s failed: %s", task.name, data.job, data.round, exc)
            errors[task.name] = str(exc)
    ms = round((time.perf_counter() - t0) * 1000, 3)
    return {"tasks": done, "errors": errors, "deferred": deferred, "ms": ms}


# ---------------------------------------------------------------------- sharing the values


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValidationError(f"an artifact value must be a number, got {value!r}")
    return float(value)


def _integer(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValidationError(f"an artifact value must be an integer, got {value!r}")
    return value


def _accuracy_decode(value: Any) -> float:
    out = _number(value)
    if not 0.0 <= out <= 1.0:
        raise ValidationError(f"an accuracy must be in [0, 1], got {value!r}")
    return out


def _server_encode(value: tuple[Any, float]) -> dict[str, Any]:
    dots, sq = value
    return {"dots": [float(d) for d in dots], "sq": float(sq)}


def _server_decode(value: Any) -> tuple[Any, float]:
    if not isinstance(value, dict) or not isinstance(value.get("dots"), list):
        raise ValidationError("a server_update artifact needs 'dots' (a list) and 'sq'")
    dots = np.array([_number(d) for d in value["dots"]], dtype=np.float64)
    return dots, _number(value.get("sq"))


def _votes_encode(value: tuple[Any, int]) -> dict[str, Any]:
    votes, neurons = value
    return {"votes": [int(v) for v in votes], "neurons": int(neurons)}


def _votes_decode(value: Any) -> tuple[Any, int]:
    if not isinstance(value, dict) or not isinstance(value.get("votes"), list):
        raise ValidationError("a feddebug_votes artifact needs 'votes' (a list) and 'neurons'")
    votes = np.array([_integer(v) for v in value["votes"]], dtype=np.int64)
    return votes, _integer(value.get("neurons"))


# memo name -> (to JSON, from JSON)
CODECS: dict[str, tuple[Callable[[Any], Any], Callable[[Any], Any]]] = {
    "client_accuracy": (float, _accuracy_decode),
    "model_accuracy": (float, _accuracy_decode),
    "subset_accuracy": (float, _accuracy_decode),
    "server_update": (_server_encode, _server_decode),
    "feddebug_votes": (_votes_encode, _votes_decode),
}
PER_CLIENT = {"server_update", "feddebug_votes"}  # values holding one number per client


def export(data: RoundView) -> list[list[Any]]:
    """Every shareable memoised value of the round as JSON: ``[name, key, value]``."""
    return [[n, k, CODECS[n][0](v)] for n, k, v in data.memo_items(CODECS)]


def adopt(data: RoundView, entries: Any) -> int:
    """Keep the values another replica computed (:func:`export`'s form); returns how many were
    new here. Malformed entries are a :class:`ValidationError` and none is kept."""
    if not isinstance(entries, list):
        raise ValidationError("artifact entries must be a list of [name, key, value]")
    decoded: list[tuple[str, str, Any]] = []
    for entry in entries:
        if (
            not isinstance(entry, list)
            or len(entry) != 3
            or entry[0] not in CODECS
            or not isinstance(entry[1], str)
        ):
            raise ValidationError(
                f"an artifact entry must be [name, key, value] with name one of "
                f"{', '.join(CODECS)}; got {str(entry)[:200]}"
            )
        name, key, raw = entry
        value = CODECS[name][1](raw)
        if name in PER_CLIENT and len(value[0]) != data.n:
            raise ValidationError(
                f"artifact {name} holds {len(value[0])} values for a round of {data.n} clients"
            )
        decoded.append((name, key, value))
    return sum(data.memo_put(name, key, value) for name, key, value in decoded)
