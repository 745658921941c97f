"""Does FLStore stay out of a Flower job's way? A Flower job's round time with and without it.

``flower_round`` (this module's first part; the time from a commit to the first request answered
from memory, ``commit_to_warm``, is a part to come): the same Flower job runs with a plain
``FedAvg`` and with ``with_flstore(FedAvg(...), sink=flstore_sink(...))``, alternately, in one
run (``--repeats`` pairs), on the same arrays:

- **The job**: ``--clients`` (10) clients, each replying with ResNet-18-sized arrays
  (:data:`~benchmarks.codec.RESNET18_PARAMS`, 11.7M float32 parameters, different per client),
  ``--rounds`` (5) rounds of Flower's own loop: the strategy's ``start`` calls
  ``configure_train``, the Grid, ``aggregate_train`` and the evaluation steps as a ServerApp's
  ``main`` does under ``flwr run``. The Grid is simulated in this process: its
  ``send_and_receive`` sleeps ``--train-s`` seconds (the clients' training, 20 s by default, so
  that a round takes at least 20 s without FLStore) and answers with the clients' replies,
  real ``flwr.app.Message`` objects. No ClientApp or SuperLink runs, so the figures hold the
  strategy's side only (what FLStore can add to a round), not Flower's transport.
- **The store**: a local stack (``LocalStack(StackConfig(...))``), and the sink the Flower app
  gets from ``flstore_sink(run_config)`` when it finds the stack's ``.flstore/local.json``:
  the store through the stack's S3 endpoint and its cache nodes warmed after each commit.
  The stack's S3 server and Lambda endpoint run in this process (under ``flwr run`` they are
  other processes than the ServerApp's), so their Python work competes with the strategy's
  for the GIL: the figures are an upper bound on FLStore's cost to a round.
- **Measured**: a round's time is from the strategy sending its train messages to it sending
  the next round's (the last round: to ``start`` returning, which with FLStore waits until
  every round is stored); each pair's run time is ``start``'s wall time. Runs:
  ``system: "flower_round"``, ``metric: "latency_ms"``, ``with_flstore``, ``clients``,
  ``p50``/``p95``/``n`` over every round of every repeat, ``run_ms`` (each repeat's total);
  ``summary`` gives the median run times and FLStore's overhead on them (the target: 5%).

``--quick``: small arrays (100k parameters), 0.5 s of training, 3 rounds.
"""

from __future__ import annotations

import itertools
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.codec import RESNET18_PARAMS, resnet18_sized_update
from benchmarks.report import machine, parser, summarize

SERVER_NODE = 1  # Flower's SuperLink node id, the sender of a ServerApp's messages
QUICK_PARAMS = 100_000
OVERHEAD_TARGET = 0.05


def client_arrays(clients: int, params: int) -> list[dict[str, np.ndarray]]:
    """Each client's arrays: ResNet-18-sized ones, or ``params`` float32 in two tensors."""
    if params == RESNET18_PARAMS:
        return [resnet18_sized_update(seed=c).tensors for c in range(clients)]
    rng = np.random.default_rng(0)
    return [
        {
            "conv.weight": (rng.standard_normal(params - 10) * 0.05).astype(np.float32),
            "fc.bias": rng.standard_normal(10).astype(np.float32),
        }
        for _ in range(clients)
    ]


def train_replies(arrays: list[dict[str, np.ndarray]]) -> list[Any]:
    """The clients' train replies as a ServerApp receives them (node ids 1000, 1001, …)."""
    from flwr.app import Array, ArrayRecord, Message, MessageType, Metadata, MetricRecord
    from flwr.app import RecordDict as Content

    replies = []
    for i, tensors in enumerate(arrays):
        node = 1000 + i
        metadata = Metadata(
            run_id=1,
            message_id=f"reply-{node}",
            src_node_id=node,
            dst_node_id=SERVER_NODE,
            reply_to_message_id=f"ins-{node}",
            group_id="1",
            created_at=time.time(),
            ttl=3600.0,
            message_type=MessageType.TRAIN,
        )
        content = Content(
            {
                "arrays": ArrayRecord({k: Array(v) for k, v in tensors.items()}),
                "metrics": MetricRecord({"num-examples": 500, "train_loss": 0.7}),
            }
        )
        # a reply as Flower deserialises it: explicit metadata (not in Message's typed overloads)
        replies.append(Message(content=content, metadata=metadata))  # type: ignore[call-overload]
    return replies


class SimulatedGrid:
    """A Flower Grid whose clients train for ``train_s`` seconds and reply with ``replies``;
    it notes when each round's train messages were sent."""

    def __init__(self, replies: list[Any], train_s: float) -> None:
        self.replies = replies
        self.train_s = train_s
        self.sent_at: list[float] = []

    def get_node_ids(self) -> list[int]:
        return [r.metadata.src_node_id for r in self.replies]

    def send_and_receive(self, messages: Iterable[Any], timeout: float | None = None) -> list[Any]:
        if not list(messages):  # evaluation is off (fraction_evaluate=0)
            return []
        self.sent_at.append(time.perf_counter())
        time.sleep(self.train_s)
        return list(self.replies)


def run_job(
    strategy: Any, replies: list[Any], initial: Any, rounds: int, train_s: float
) -> tuple[list[float], float]:
    """One Flower job: its rounds' times and its total time, in milliseconds."""
    grid = SimulatedGrid(replies, train_s)
    t0 = time.perf_counter()
    strategy.start(grid=grid, initial_arrays=initial, num_rounds=rounds)
    end = time.perf_counter()
    marks = [*grid.sent_at, end]
    return [(b - a) * 1000.0 for a, b in itertools.pairwise(marks)], (end - t0) * 1000


def flower_round(args: Any) -> dict[str, Any]:
    """The ``flower_round`` runs and their summary (see the module docstring)."""
    from flwr.app import Array, ArrayRecord
    from flwr.serverapp.strategy import FedAvg
    from flwr.supercore.task_identity import TaskIdentity

    from flstore_core.integrations.flower import flstore_sink, with_flstore
    from lambdas.local_runtime.stack import STATE_FILE, LocalStack, StackConfig

    # what Flower sets in a ServerApp's process; the strategy's messages carry it
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, SERVER_NODE
    logging.getLogger("flwr").setLevel(logging.WARNING)
    arrays = client_arrays(args.clients, args.params)
    replies = train_replies(arrays)
    initial = ArrayRecord({k: Array(np.zeros_like(v)) for k, v in arrays[0].items()})
    del arrays

    def fedavg() -> Any:
        return FedAvg(fraction_evaluate=0.0, min_available_nodes=args.clients)

    samples: dict[bool, list[float]] = {False: [], True: []}
    totals: dict[bool, list[float]] = {False: [], True: []}
    blocked_ms: list[float] = []
    with tempfile.TemporaryDirectory() as workdir:
        config = StackConfig(nodes=args.nodes, replication=1)
        with LocalStack(config, workdir=workdir):
            state = {"flstore-local-state": str(Path(workdir) / STATE_FILE)}
            for repeat in range(args.repeats):
                for with_store in (False, True):
                    strategy = fedavg()
                    if with_store:
                        sink = flstore_sink(state)
                        strategy = with_flstore(strategy, sink=sink, job=f"flower-round-{repeat}")
                    rounds, total = run_job(strategy, replies, initial, args.rounds, args.train_s)
                    samples[with_store] += rounds
                    totals[with_store].append(total)
                    if with_store:
                        blocked_ms.append(strategy.flstore.handover.blocked_s * 1000.0)
                    print(
                        f"repeat {repeat} with_flstore={with_store}: run {total / 1000:.1f} s, "
                        f"rounds {[round(r / 1000, 2) for r in rounds]} s",
                        file=sys.stderr,
                    )
    runs = [
        {
            "system": "flower_round",
            "metric": "latency_ms",
            "with_flstore": with_store,
            "clients": args.clients,
            "params": args.params,
            "train_s": args.train_s,
            "rounds": args.rounds,
            **summarize(samples[with_store]),
            "run_ms": totals[with_store],
            **({"backpressure_ms": blocked_ms} if with_store else {}),
        }
        for with_store in (False, True)
    ]
    without, with_ = (statistics.median(totals[w]) for w in (False, True))
    summary = {
        "run_ms_without": without,
        "run_ms_with": with_,
        "overhead": with_ / without - 1.0,
        "target": OVERHEAD_TARGET,
    }
    return {"runs": runs, "summary": {"flower_round": summary}}


PARTS: dict[str, Callable[[Any], dict[str, Any]]] = {"flower_round": flower_round}
"""Each part returns ``{"runs": [...], "summary": {part: {...}}}``; the report merges them."""


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = parser(__doc__.split("\n\n")[0] if __doc__ else "")
    p.add_argument("--part", choices=sorted(PARTS), action="append", help="default: all")
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--params", type=int, default=RESNET18_PARAMS)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--train-s", type=float, default=20.0, help="simulated training per round")
    p.add_argument("--repeats", type=int, default=1, help="pairs of runs, with and without")
    p.add_argument("--nodes", type=int, default=2, help="cache nodes of the local stack")
    p.add_argument("--quick", action="store_true", help="small arrays, 0.5 s rounds, 3 rounds")
    args = p.parse_args(argv)
    if args.quick:
        args.params, args.train_s, args.rounds = QUICK_PARAMS, 0.5, 3
    report: dict[str, Any] = {"benchmark": "commit_to_warm", "machine": machine(), "runs": []}
    report["summary"] = {}
    for name in args.part or sorted(PARTS):
        part = PARTS[name](args)
        report["runs"] += part["runs"]
        report["summary"].update(part["summary"])
    if args.json:
        import json

        Path(args.json).write_text(json.dumps(report, indent=2))
    print(report["summary"])
    return report


if __name__ == "__main__":
    main()
