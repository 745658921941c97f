"""Is a round warm the moment it commits, and does FLStore stay out of a Flower job's way?

``commit_to_warm``: a writer configured as on AWS — a plain ``ObjectStore`` on the local stack's
``writers_s3_endpoint`` (the S3 front that notifies the router function of every manifest
written, as the bucket's notification does on AWS), no router in its process — commits
rounds of the paper's model job one after another (``--clients`` updates of
ResNet-18 for CIFAR, 11.2M parameters, a 16-image validation set; ``--quick``: the digits CNN).
How the updates land: by default (``--arrival-s 0``) the writer is the Flower sink's
``put_round`` — every update PUT at once (8 in parallel), then the global model, the ingest
summaries (1-2 s over the round's rows, in the writer) and the manifest; so with ``--staging on``
the owners stage what they can in the seconds those writes and the summaries take.
``--arrival-s S``: the updates land one by one over ``S`` seconds (update ``k`` of ``n`` at
``(k + 1)·S/n``), as clients finishing their training at different times send them, then the
same global model, summaries and manifest. For each round, from the commit (its manifest PUT's
return):

- ``warm_marker``: until the round's warm marker ``jobs/{job}/warm/{round:08d}.json`` exists
  (polled every 50 ms on S3; the router function writes it once the round's owners hold it —
  its rows, Gram and FedAvg model — before its model artifacts are built, in chunks);
- per workload (``cosine_select``, ``fedavg``, ``contribution_loo``, each polled by a thread of
  its own through the gateway with ``FLStoreClient``): until the first answer whose
  ``meta.cache`` is ``"hit"`` (every shard the node read was in its memory) came back.
  ``--poll marker`` (the default) starts the requests once the marker is seen, so no request
  loads the round before the warming does; ``--poll commit`` starts them at the commit (a
  request that comes before the warming loads the round itself: a miss).

Round 0 meets a new stack (every node and router instance starts) and is reported apart
(``cold_start_round_ms``); rounds 1..``--rounds`` are the samples, each committed once the
previous round's notification was handled. Runs:
``system: "commit_to_warm"``, ``metric: "latency_ms"``, ``workload`` (``warm_marker`` for the
marker), ``clients``, ``p50``/``p95``/``n`` (a round a sample), ``misses`` (requests answered
otherwise before the hit), ``hit_latency_ms`` and ``hit_node_timing_ms`` (the hit request's own
round trip, and the node's load/compute for it); ``summary.commit_to_warm`` adds what the
router function measured (``warm_ms``, its prefetch) and a profile of one prefetch of the last
round by the parent's router after every node was emptied (each node's ``load`` and
``artifacts`` times): what dominates the warming. The 1 s target is ``cosine_select`` and
``fedavg``'s p50. Memory: the stack's S3 keeps every round committed (``--rounds`` + 1) and the
writer holds a round's updates, so ``--clients 100`` (4.7 GB a round) needs about
(``--rounds`` + 3) × 4.7 GB besides the nodes' budgets.

``flower_round``: the same Flower job runs with a plain
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
  the store through the stack's notifying S3 front, each commit warming its round through the
  notification (the sink itself only writes and commits). The stack's S3 server runs in a
  process of its own (``--s3 process``, the default; ``--s3 embedded``: in this process, as
  ``LocalStack`` embeds it); the Lambda endpoint, the gateway and the notifying front are
  threads of this process (under ``flwr run`` they are other processes than the ServerApp's),
  so their Python work competes with the strategy's for the GIL: the figures are an upper
  bound on FLStore's cost to a round.
- **Measured**: a round's time is from the strategy sending its train messages to it sending
  the next round's (the last round: to ``start`` returning, which with FLStore waits until
  every round is stored); each pair's run time is ``start``'s wall time. Runs:
  ``system: "flower_round"``, ``metric: "latency_ms"``, ``with_flstore``, ``clients``,
  ``p50``/``p95``/``n`` over every round of every repeat, ``run_ms`` (each repeat's total);
  ``summary`` gives the median run times and FLStore's overhead on them (the target: 5%).

Both parts take ``--network aws|none|PATH`` (``StackConfig(network=...)``; the JSON's top-level
``network`` says which). ``--quick``: small arrays (100k parameters) and the digits CNN, 0.5 s of
training, 3 rounds.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.codec import RESNET18_PARAMS, resnet18_sized_update
from benchmarks.commit_timing import (
    CommitClock,
    FirstHit,
    S3Process,
    poll_until_hit,
    wait_for_marker,
)
from benchmarks.paper_data import MODEL_JOB
from benchmarks.report import add_network_flag, machine, network_json, parser, summarize
from flstore_core.routing.commit_warming import read_marker

SERVER_NODE = 1  # Flower's SuperLink node id, the sender of a ServerApp's messages
QUICK_PARAMS = 100_000
OVERHEAD_TARGET = 0.05
#: the workloads timed from a commit, with a user's request for each
WARM_WORKLOADS: dict[str, dict[str, Any]] = {
    "cosine_select": {"k": 3},
    "fedavg": {},
    "contribution_loo": {},
}
#: cosine_select and fedavg answered from memory within this long of the commit (p50)
WARM_TARGET_MS = 1000.0
WARM_TIMEOUT_S = 600.0


@contextlib.contextmanager
def local_stack(args: Any, *, replication: int, workdir: str | None = None) -> Iterator[Any]:
    """The local stack both parts run on: ``--nodes``, ``--network``, and its S3 in a process
    of its own (``--s3 process``) or embedded in this one."""
    from lambdas.local_runtime.stack import LocalStack, StackConfig

    with contextlib.ExitStack() as stack:
        s3 = stack.enter_context(S3Process()) if args.s3 == "process" else None
        config = StackConfig(
            nodes=args.nodes,
            replication=replication,
            network=args.network,
            s3_endpoint=s3,
            stage_updates=args.staging == "on",
        )
        yield stack.enter_context(LocalStack(config, workdir=workdir))


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
    from lambdas.local_runtime.stack import STATE_FILE

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
    tails: list[dict[str, float]] = []
    with contextlib.ExitStack() as scope:
        workdir = scope.enter_context(tempfile.TemporaryDirectory())
        # one owner a round: the local stack's warming shares the strategy's two cores
        scope.enter_context(local_stack(args, replication=1, workdir=workdir))
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
                    # the last round's storing is the run's tail: when each of its steps ended
                    tails.append(dict(sink.last_round))
                tail = {k: round(v, 2) for k, v in tails[-1].items()} if with_store else {}
                print(
                    f"repeat {repeat} with_flstore={with_store}: run {total / 1000:.1f} s, "
                    f"rounds {[round(r / 1000, 2) for r in rounds]} s"
                    + (f", last round's storing {tail}" if tail else ""),
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
            **({"backpressure_ms": blocked_ms, "last_round_s": tails} if with_store else {}),
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


def warm_sample(
    stack: Any,
    ask: Callable[[str, int], dict[str, Any]],
    commit: Callable[[int], float],
    round_: int,
    poll: str,
) -> tuple[dict[str, float], dict[str, Any], dict[str, FirstHit]]:
    """One sample: commit ``round_`` (``commit`` returns when its manifest PUT returned), then
    each measure's time from the commit in ms, the warm marker, and each workload's first hit.
    Returns once the round's notification was handled, so samples do not overlap."""
    t_commit = commit(round_)
    seen = threading.Event()

    def marker() -> tuple[float, dict[str, Any]]:
        try:
            return wait_for_marker(stack.store, MODEL_JOB, round_, WARM_TIMEOUT_S)
        finally:
            seen.set()  # the pollers never wait past a marker that failed

    def first_hit(name: str) -> FirstHit:
        if poll == "marker":
            seen.wait(WARM_TIMEOUT_S)
        return poll_until_hit(lambda: ask(name, round_), WARM_TIMEOUT_S)

    with ThreadPoolExecutor(1 + len(WARM_WORKLOADS)) as pool:
        marker_future = pool.submit(marker)
        futures = {name: pool.submit(first_hit, name) for name in WARM_WORKLOADS}
        marker_at, marker_body = marker_future.result()
        hits = {name: future.result() for name, future in futures.items()}
    stack.notifications.wait_idle(WARM_TIMEOUT_S)
    # the marker as the warming left it: with when the model artifacts were built
    marker_body = read_marker(stack.store, MODEL_JOB, round_) or marker_body
    elapsed = {"warm_marker": (marker_at - t_commit) * 1000.0}
    elapsed.update({name: (hit.at - t_commit) * 1000.0 for name, hit in hits.items()})
    return elapsed, marker_body, hits


def prefetch_profile(stack: Any, round_: int) -> dict[str, Any]:
    """One prefetch of ``round_`` by the parent's router after every node was emptied — the
    work a commit's warming does, node by node: each node's ``load`` timing and ``artifacts``
    report, and the prefetch's wall time."""
    from flstore_core.protocol import EvictOp
    from flstore_core.routing.placement import round_shard

    for index in range(stack.config.nodes):
        stack.router.node_op(index, EvictOp(all=True))
    t0 = time.perf_counter()
    answers = stack.router.prefetch([round_shard(MODEL_JOB, round_)])
    wall_ms = (time.perf_counter() - t0) * 1000.0
    keep = ("timing_ms", "artifacts", "shared", "billed_ms", "invocations")
    nodes = {
        function: {k: v for k, v in answer.items() if k in keep}
        for function, answer in answers.items()
        if isinstance(answer, dict)
    }
    return {"round": round_, "wall_ms": round(wall_ms, 1), "nodes": nodes}


def commit_to_warm(args: Any) -> dict[str, Any]:
    """The ``commit_to_warm`` runs and their summary (see the module docstring)."""
    from benchmarks.paper_data import FULL, QUICK, ModelJob
    from flstore_core.sdk.client import FLStoreClient

    setting = dataclasses.replace(QUICK if args.quick else FULL, clients=args.clients)
    samples: dict[str, list[float]] = {"warm_marker": [], **{w: [] for w in WARM_WORKLOADS}}
    markers: list[dict[str, Any]] = []
    hits: dict[str, list[FirstHit]] = {w: [] for w in WARM_WORKLOADS}
    writer_ms: list[float] = []
    handover_ms: list[float] = []
    with local_stack(args, replication=args.replication) as stack:
        writer = CommitClock(stack.config.bucket, endpoint_url=stack.writers_s3_endpoint)
        job = ModelJob(writer, setting)
        client = FLStoreClient(stack.gateway_url, stack.token, timeout=WARM_TIMEOUT_S)

        def commit(round_: int) -> float:
            job.write_round(round_, args.arrival_s)
            return writer.committed_at[(MODEL_JOB, round_)]

        def ask(name: str, round_: int) -> dict[str, Any]:
            meta: dict[str, Any] = client.run(
                MODEL_JOB, name, round=round_, **WARM_WORKLOADS[name]
            )["meta"]
            return meta

        # round 0 meets a new stack: every node and router instance starts (imports, torch);
        # it is reported apart, and rounds 1..--rounds are the samples
        cold, _, _ = warm_sample(stack, ask, commit, 0, args.poll)
        print(f"round 0 (cold start): ms from commit {_rounded(cold)}", file=sys.stderr)
        for round_ in range(1, args.rounds + 1):
            elapsed, marker, first = warm_sample(stack, ask, commit, round_, args.poll)
            for name, ms in elapsed.items():
                samples[name].append(ms)
            # the writer's own time, hand-over to commit: a faster writer commits sooner and
            # leaves less of the round's staging done by then
            stored_ms = (writer.committed_at[(MODEL_JOB, round_)] - job.handed_at[round_]) * 1e3
            writer_ms.append(stored_ms)
            handover_ms.append(stored_ms + elapsed["warm_marker"])
            markers.append(marker)
            for name, hit in first.items():
                hits[name].append(hit)
            print(
                f"round {round_}: ms from commit {_rounded(elapsed)}; hand-over to commit "
                f"{writer_ms[-1]:.0f} ms, to the marker {handover_ms[-1]:.0f} ms",
                file=sys.stderr,
            )
        profile = prefetch_profile(stack, args.rounds)
    report = warm_report(args, setting, samples, markers, hits, profile)
    report["summary"]["commit_to_warm"]["handover_to_commit_ms"] = summarize(writer_ms)
    report["summary"]["commit_to_warm"]["handover_to_marker_ms"] = summarize(handover_ms)
    report["summary"]["commit_to_warm"]["cold_start_round_ms"] = _rounded(cold)
    return report


def _rounded(elapsed: dict[str, float]) -> dict[str, float]:
    return {name: round(ms, 1) for name, ms in elapsed.items()}


def warm_report(
    args: Any,
    setting: Any,
    samples: dict[str, list[float]],
    markers: list[dict[str, Any]],
    hits: dict[str, list[FirstHit]],
    profile: dict[str, Any],
) -> dict[str, Any]:
    """The part's runs (one per measure) and its summary."""
    common = {
        "system": "commit_to_warm",
        "metric": "latency_ms",
        "clients": args.clients,
        "model": setting.model,
        "nodes": args.nodes,
        "replication": args.replication,
        "poll": args.poll,
        "staging": args.staging,
        "arrival_s": args.arrival_s,
    }
    runs = [{**common, "workload": "warm_marker", **summarize(samples["warm_marker"])}]
    for name, firsts in hits.items():
        runs.append(
            {
                **common,
                "workload": name,
                **summarize(samples[name]),
                "misses": [h.misses for h in firsts],
                "hit_latency_ms": [round(h.latency_ms, 1) for h in firsts],
                "hit_node_timing_ms": [h.meta.get("node_timing_ms", {}) for h in firsts],
            }
        )
    p50 = {run["workload"]: run["p50"] for run in runs}
    summary = {
        "p50_ms": p50,
        "target_ms": WARM_TARGET_MS,
        "target_met": all(p50[w] <= WARM_TARGET_MS for w in ("cosine_select", "fedavg")),
        # what the router function measured: its prefetch, and commit -> marker by its clock
        "router_warm_ms": [m.get("warm_ms") for m in markers],
        "router_commit_to_warm_ms": [_marker_span_ms(m) for m in markers],
        "router_commit_to_artifacts_ms": [_marker_span_ms(m, "artifacts_at") for m in markers],
        "artifacts_chunks": [m.get("artifacts_chunks") for m in markers],
        # each owner's load of the round at its commit, step by step (ms; "staged": rows)
        "owners_ms": [m.get("owners_ms") for m in markers],
        "profile": profile,
    }
    return {"runs": runs, "summary": {"commit_to_warm": summary}}


def _marker_span_ms(marker: dict[str, Any], until: str = "warmed_at") -> float | None:
    """A marker's ``committed_at`` to ``until`` (``warmed_at``, or ``artifacts_at``: the
    router function's clock), in ms."""
    try:
        start, end = (
            datetime.fromisoformat(str(marker[k]).replace("Z", "+00:00"))
            for k in ("committed_at", until)
        )
    except (KeyError, ValueError):
        return None
    return round((end - start).total_seconds() * 1000.0, 1)


PARTS: dict[str, Callable[[Any], dict[str, Any]]] = {
    "commit_to_warm": commit_to_warm,
    "flower_round": flower_round,
}
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
    p.add_argument(
        "--replication",
        type=int,
        default=2,
        help="owners of a round in commit_to_warm (the deployment's default; flower_round: 1)",
    )
    p.add_argument(
        "--poll",
        choices=("marker", "commit"),
        default="marker",
        help="commit_to_warm: send the workloads' requests once the warm marker is seen, or "
        "from the commit on",
    )
    p.add_argument(
        "--staging",
        choices=("on", "off"),
        default="on",
        help="updates staged on their round's owners as they land (on), or the round loaded "
        "at the commit only (off: manifests notified only)",
    )
    p.add_argument(
        "--arrival-s",
        type=float,
        default=0.0,
        help="commit_to_warm: the writer PUTs a round's updates one by one over this many "
        "seconds, then commits (0, the default: all at once, as the Flower sink writes them)",
    )
    p.add_argument(
        "--s3",
        choices=("process", "embedded"),
        default="process",
        help="the stack's S3 in a process of its own, or in this one",
    )
    add_network_flag(p)
    p.add_argument("--quick", action="store_true", help="small arrays, 0.5 s rounds, 3 rounds")
    args = p.parse_args(argv)
    if args.quick:
        args.params, args.train_s, args.rounds = QUICK_PARAMS, 0.5, 3
    report: dict[str, Any] = {
        "benchmark": "commit_to_warm",
        "machine": machine(),
        "network": network_json(args.network),
        "s3": args.s3,
        "runs": [],
        "summary": {},
    }
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
