"""Flower integration: one line turns a Flower strategy into one that feeds FLStore.

A Flower user changes the line that builds the strategy of their ``ServerApp``::

    strategy = with_flstore(FedAvg(...), sink=StoreSink(store), job="digits")

and runs it as before (``strategy.start(grid=grid, ...)``). The result is the same strategy
(an instance of a subclass of its class, so ``isinstance(strategy, FedAvg)`` still holds) that,
after each ``aggregate_train``, hands FLStore every reply's update and the aggregate:

- **Updates**: each reply's ``ArrayRecord`` becomes an :class:`~flstore_core.data.codec.Update`
  whose tensor names are the record's keys in order (the state-dict names when the ClientApp
  sent ``ArrayRecord(model.state_dict())``; pass ``tensor_names`` when it sent a plain list of
  arrays, whose keys are ``"0"``, ``"1"``, …). The reply's ``MetricRecord`` gives
  ``num_examples`` (the strategy's ``weighted_by_key``, ``num-examples`` by default) and the
  metrics; Flower's usual names are mapped to FLStore's (``train_loss`` → ``loss``,
  ``train_time`` → ``duration_s``, …, see :data:`METRIC_NAMES`), others are kept as sent.
- **Client ids** are the replying node ids (``str(node_id)``), unless the ClientApp reports its
  own id under ``client-id`` (:data:`CLIENT_ID_KEY`) in a ``ConfigRecord`` of its reply (a
  string) or in its ``MetricRecord`` (an integer; MetricRecords only hold numbers).
- **Rounds**: Flower's rounds start at 1, FLStore's at 0: FLStore round = ``server_round - 1``.
- **Global model**: the aggregated ``ArrayRecord`` (with the aggregated metrics) is stored as
  the round's global model — the base the next round's deltas are taken from. The arrays the
  first ``configure_train`` sends are the job's initial model (the base of round 0), stored when
  the sink accepts one (:class:`InitialModelSink`).

What the wrapped strategy returns is returned unchanged: FLStore observes, it never steers the
aggregate. Optionally (``select_with="oort_select"`` or ``"cosine_select"`` and an
:class:`~flstore_core.sdk.client.FLStoreClient`), ``configure_train`` asks FLStore which clients to
train, falling back to the strategy's own sampling when FLStore cannot answer.

The sink is the one boundary between Flower and storage: :class:`StoreSink` writes through an
:class:`~flstore_core.storage.object_store.ObjectStore`; a sink that writes raw update files and
runs the Beam ingestion plugs in the same way. Anything with ``put_round`` is a sink.

:func:`run_in_process` runs a ``ServerApp`` and a ``ClientApp`` in one process, on Flower's own
in-memory grid and link state and the simulation runtime's fleet workers, with a thread pool in
place of Ray (Flower's simulation backend) — see its docstring for why.

flwr is imported only inside functions, so this module (and the sinks) import without it.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeVar, cast, runtime_checkable

import numpy as np
import numpy.typing as npt

from flstore_core.data.codec import Update
from flstore_core.errors import FLStoreError, ValidationError
from flstore_core.ids import validate_client, validate_job
from flstore_core.sdk.round_writer import RoundWriter

if TYPE_CHECKING:
    from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import Strategy

    # the mixin is typed as a Strategy; at run time it is a plain class placed before the
    # wrapped strategy's class in the MRO of a class created by `with_flstore`
    from flwr.serverapp.strategy import Strategy as _MixinBase

    from flstore_core.sdk.client import FLStoreClient
    from flstore_core.storage.object_store import ObjectStore
else:
    _MixinBase = object

log = logging.getLogger(__name__)

S = TypeVar("S", bound="Strategy")
SelectWith = Literal["oort_select", "cosine_select"]
SELECT_WORKLOADS: tuple[str, ...] = ("oort_select", "cosine_select")

CLIENT_ID_KEY = "client-id"
"""Key under which a ClientApp may report its FLStore client id (ConfigRecord str or int)."""

METRIC_NAMES: dict[str, str] = {
    "loss": "loss",
    "train_loss": "loss",
    "train-loss": "loss",
    "loss_sq_mean": "loss_sq_mean",
    "loss-sq-mean": "loss_sq_mean",
    "duration_s": "duration_s",
    "duration": "duration_s",
    "train_time": "duration_s",
    "train-time": "duration_s",
    "train_duration": "duration_s",
    "train-duration": "duration_s",
}
"""Flower metric names → FLStore's (Oort reads ``loss``, ``loss_sq_mean`` and ``duration_s``)."""


# ---------------------------------------------------------------------- sinks


@runtime_checkable
class FLStoreSink(Protocol):
    """Where a wrapped strategy hands each round: the boundary between Flower and storage.

    ``put_round`` receives the round's client updates (client id → update, each with
    ``num_examples`` and metrics) and the aggregated model, or ``None`` when the strategy
    produced none; it returns once the round is stored (committed, or handed to ingestion).
    """

    def put_round(
        self,
        job: str,
        round: int,
        updates: dict[str, Update],
        global_model: Update | None,
    ) -> None: ...


@runtime_checkable
class InitialModelSink(Protocol):
    """A sink that also stores the job's initial model (the base of round 0's deltas)."""

    def put_initial(self, job: str, update: Update) -> None: ...


class RoundWriterSink:
    """A sink that drops each round as raw update files for ingestion (ARCHITECTURE §2).

    It wraps a :class:`~flstore_core.sdk.round_writer.RoundWriter`; give the writer an ``on_round``
    callback (``pipelines.ingest.ingest_on_drop(...)``) to run the Beam ingestion pipeline on
    every round as it ends — storing, summarising, committing and prefetching it — or leave it
    out and ingest the drop folder later with ``flstore ingest``.
    """

    def __init__(self, writer: RoundWriter) -> None:
        self.writer = writer

    def put_initial(self, job: str, update: Update) -> None:
        self._check(job)
        self.writer.write_initial(update)

    def put_round(
        self,
        job: str,
        round: int,
        updates: dict[str, Update],
        global_model: Update | None,
    ) -> None:
        self._check(job)
        self.writer.write_round(round, updates, global_model=global_model)

    def _check(self, job: str) -> None:
        if job != self.writer.job:
            raise ValidationError(f"this sink writes job {self.writer.job!r}, not {job!r}")


class StoreSink:
    """A sink that writes straight to FLStore's object store.

    Per round: every update (in parallel), then the global model, then the manifest — so a
    reader that sees the round committed also finds its global model, the base of the next.
    """

    def __init__(self, store: ObjectStore, *, max_workers: int = 8) -> None:
        self.store = store
        self.max_workers = max_workers

    def put_initial(self, job: str, update: Update) -> None:
        self.store.put_initial(job, update)

    def put_round(
        self,
        job: str,
        round: int,
        updates: dict[str, Update],
        global_model: Update | None,
    ) -> None:
        if not updates:
            raise ValidationError(f"round {round} of job {job!r} has no updates to store")
        with ThreadPoolExecutor(min(self.max_workers, len(updates))) as pool:
            entries = list(
                pool.map(lambda item: self.store.put_update(job, round, *item), updates.items())
            )
        if global_model is not None:
            self.store.put_global(job, round, global_model)
        self.store.commit_round(job, round, entries)

    def __repr__(self) -> str:
        return f"StoreSink(bucket={self.store.bucket!r})"


# ---------------------------------------------------------------------- replies → updates


def arrays_to_tensors(
    record: ArrayRecord, tensor_names: Sequence[str] | None = None
) -> dict[str, npt.NDArray[Any]]:
    """An ``ArrayRecord`` as an ordered ``name -> ndarray`` mapping (keys or ``tensor_names``)."""
    arrays = [np.asarray(array.numpy()) for array in record.values()]
    names = list(record.keys()) if tensor_names is None else list(tensor_names)
    if len(names) != len(arrays):
        raise ValidationError(
            f"tensor_names has {len(names)} names but the ArrayRecord holds {len(arrays)} "
            "arrays: give one name per array, in order"
        )
    return dict(zip(names, arrays, strict=True))


def reported_client_id(content: Any) -> str | None:
    """The ``client-id`` a ClientApp put in a ConfigRecord (str) or MetricRecord (int), if any."""
    for record in content.config_records.values():
        if CLIENT_ID_KEY in record:
            return str(record[CLIENT_ID_KEY])
    for record in content.metric_records.values():
        value = record.get(CLIENT_ID_KEY)
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)
    return None


def update_from_reply(
    reply: Message,
    *,
    weighted_by_key: str = "num-examples",
    arrayrecord_key: str | None = None,
    tensor_names: Sequence[str] | None = None,
) -> tuple[str, Update]:
    """``(client id, update)`` of one successful train reply (see the module docstring)."""
    content = reply.content
    records = content.array_records
    if not records:
        raise ValidationError(
            f"the reply of node {reply.metadata.src_node_id} carries no ArrayRecord"
        )
    if arrayrecord_key is not None and arrayrecord_key in records:
        record = records[arrayrecord_key]
    else:
        record = next(iter(records.values()))
    metrics: dict[str, Any] = {}
    for metric_record in content.metric_records.values():
        for key, value in metric_record.items():
            if key != CLIENT_ID_KEY:
                metrics[METRIC_NAMES.get(key, key)] = value
    num_examples = metrics.pop(weighted_by_key, 0)
    client = reported_client_id(content) or str(reply.metadata.src_node_id)
    validate_client(client)
    return client, Update(
        arrays_to_tensors(record, tensor_names),
        num_examples=int(num_examples),
        metrics=metrics,
    )


def updates_from_replies(
    replies: Iterable[Message],
    *,
    weighted_by_key: str = "num-examples",
    arrayrecord_key: str | None = None,
    tensor_names: Sequence[str] | None = None,
) -> tuple[dict[str, Update], dict[str, int]]:
    """The updates of a round's successful replies and the node each client id came from."""
    updates: dict[str, Update] = {}
    nodes: dict[str, int] = {}
    for reply in replies:
        if reply.has_error():
            continue
        client, update = update_from_reply(
            reply,
            weighted_by_key=weighted_by_key,
            arrayrecord_key=arrayrecord_key,
            tensor_names=tensor_names,
        )
        node = int(reply.metadata.src_node_id)
        if client in updates:
            raise ValidationError(
                f"nodes {nodes[client]} and {node} both report client id {client!r}: "
                "client ids must be unique within a round"
            )
        updates[client], nodes[client] = update, node
    return updates, nodes


# ---------------------------------------------------------------------- the wrapper


@dataclass
class FLStoreSettings:
    """What a wrapped strategy knows of FLStore (kept under the strategy's ``_flstore``)."""

    sink: FLStoreSink
    job: str
    select_with: SelectWith | None = None
    client: FLStoreClient | None = None
    select_k: int | None = None
    tensor_names: Sequence[str] | None = None
    on_sink_error: Literal["raise", "log"] = "raise"
    initial_stored: bool = False
    node_of_client: dict[str, int] = field(default_factory=dict)
    client_of_node: dict[int, str] = field(default_factory=dict)
    rounds_stored: dict[int, list[str]] = field(default_factory=dict)
    """FLStore round → the client ids handed to the sink, for the rounds it accepted."""


class FLStoreStrategy(_MixinBase):
    """The mixin :func:`with_flstore` puts in front of a strategy's class.

    It overrides ``configure_train`` (initial model, optional FLStore selection) and
    ``aggregate_train`` (hand the round to the sink); everything else is the wrapped class's.
    ``isinstance(strategy, FLStoreStrategy)`` tells a wrapped strategy.
    """

    _flstore: FLStoreSettings

    @property
    def flstore(self) -> FLStoreSettings:
        """The FLStore settings and bookkeeping of this strategy."""
        return self._flstore

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        settings = self._flstore
        if server_round == 1 and not settings.initial_stored:
            self._flstore_put_initial(arrays)
        base = cast("Strategy", super())
        messages = list(base.configure_train(server_round, arrays, config, grid))
        if settings.select_with and settings.client is not None and server_round > 1 and messages:
            messages = self._flstore_select(server_round, messages, grid)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)  # read twice: by the strategy, then by FLStore
        base = cast("Strategy", super())
        result = base.aggregate_train(server_round, replies)
        self._flstore_put_round(server_round, replies, result[0], result[1])
        return result

    # -- FLStore side ------------------------------------------------------------------

    def _flstore_sink_call(self, what: str, call: Callable[[], None]) -> bool:
        """Run ``call``; on failure raise or log, as ``on_sink_error`` says."""
        try:
            call()
            return True
        except Exception as exc:
            if self._flstore.on_sink_error == "raise":
                raise
            log.warning("FLStore: could not store %s of job %r: %s", what, self._flstore.job, exc)
            return False

    def _flstore_put_initial(self, arrays: ArrayRecord) -> None:
        settings = self._flstore
        settings.initial_stored = True
        sink = settings.sink
        if not isinstance(sink, InitialModelSink):
            return
        update = Update(arrays_to_tensors(arrays, settings.tensor_names), kind="initial")
        self._flstore_sink_call("the initial model", lambda: sink.put_initial(settings.job, update))

    def _flstore_put_round(
        self,
        server_round: int,
        replies: list[Message],
        arrays: ArrayRecord | None,
        metrics: MetricRecord | None,
    ) -> None:
        settings = self._flstore
        round_ = server_round - 1

        def put() -> None:
            updates, nodes = updates_from_replies(
                replies,
                weighted_by_key=str(getattr(self, "weighted_by_key", "num-examples")),
                arrayrecord_key=getattr(self, "arrayrecord_key", None),
                tensor_names=settings.tensor_names,
            )
            if not updates:
                log.warning(
                    "FLStore: round %d of job %r had no successful reply", round_, settings.job
                )
                return
            for client, node in nodes.items():
                settings.node_of_client[client] = node
                settings.client_of_node[node] = client
            global_model = None
            if arrays is not None:
                sent = next(iter(updates.values())).tensors
                global_model = Update(
                    {
                        name: _dtype_like(array, sent.get(name))
                        for name, array in arrays_to_tensors(arrays, settings.tensor_names).items()
                    },
                    num_examples=sum(u.num_examples for u in updates.values()),
                    metrics={
                        METRIC_NAMES.get(k, k): v
                        for k, v in (metrics or {}).items()
                        if k != CLIENT_ID_KEY
                    },
                    kind="global",
                )
            settings.sink.put_round(settings.job, round_, updates, global_model)
            settings.rounds_stored[round_] = list(updates)

        self._flstore_sink_call(f"round {round_}", put)

    def _flstore_select(
        self, server_round: int, messages: list[Message], grid: Grid
    ) -> list[Message]:
        """Re-address the strategy's train messages to the clients FLStore selects."""
        settings = self._flstore
        if settings.client is None:
            return messages
        k = min(settings.select_k or len(messages), len(messages))
        node_of = {settings.client_of_node.get(n, str(n)): int(n) for n in grid.get_node_ids()}
        try:
            if settings.select_with == "oort_select":
                answer = settings.client.run(
                    settings.job,
                    "oort_select",
                    k=min(k, len(node_of)),
                    candidates=sorted(node_of),
                    round=server_round - 1,
                    seed=server_round,
                )
            else:
                previous = server_round - 2  # the last round FLStore has (FLStore numbering)
                seen = settings.rounds_stored.get(previous)
                if not seen:
                    return messages
                answer = settings.client.run(
                    settings.job, "cosine_select", round=previous, k=min(k, len(seen))
                )
        except (FLStoreError, OSError) as exc:
            log.warning(
                "FLStore: %s failed (%s); keeping the strategy's own sampling",
                settings.select_with,
                exc,
            )
            return messages
        chosen: list[int] = []
        for client in answer.get("result", {}).get("selected", []):
            node = node_of.get(client)
            if node is not None and node not in chosen:
                chosen.append(node)
        # fewer picks than k (e.g. cosine_select saw fewer clients): top up with the strategy's
        for message in messages:
            if len(chosen) >= k:
                break
            if message.metadata.dst_node_id not in chosen:
                chosen.append(message.metadata.dst_node_id)
        return _address(messages, chosen[:k])


def _dtype_like(array: npt.NDArray[Any], like: npt.NDArray[Any] | None) -> npt.NDArray[Any]:
    """``array`` in the dtype the clients sent (averaging turns integer counters into floats)."""
    if like is None or array.dtype == like.dtype:
        return array
    if np.issubdtype(like.dtype, np.integer):
        return np.asarray(np.rint(array), dtype=like.dtype)
    return array.astype(like.dtype)


def _address(messages: list[Message], nodes: list[int]) -> list[Message]:
    """Messages for ``nodes``: the strategy's own where it had one, else copies of the first."""
    from flwr.app import Message

    by_node = {m.metadata.dst_node_id: m for m in messages}
    template = messages[0]
    return [
        by_node.get(node)
        or Message(
            content=template.content,
            dst_node_id=node,
            message_type=template.metadata.message_type,
            group_id=template.metadata.group_id or None,
            ttl=template.metadata.ttl,
        )
        for node in nodes
    ]


@functools.cache
def _wrapped_class(base: type) -> type:
    return type(
        f"FLStore{base.__name__}",
        (FLStoreStrategy, base),
        {
            "__module__": __name__,
            "__doc__": f"{base.__name__} that hands every round to FLStore (see with_flstore).",
        },
    )


def with_flstore(
    strategy: S,
    *,
    sink: FLStoreSink,
    job: str,
    select_with: SelectWith | None = None,
    client: FLStoreClient | None = None,
    select_k: int | None = None,
    tensor_names: Sequence[str] | None = None,
    on_sink_error: Literal["raise", "log"] = "raise",
) -> S:
    """The Flower ``strategy``, handing every round to FLStore through ``sink``.

    Parameters
    ----------
    strategy : flwr.serverapp.strategy.Strategy
        Any Message-API strategy (``FedAvg``, ``MultiKrum``, ``FedProx``, a subclass of yours…).
        It is copied (shallowly) into an instance of a subclass of its class, so the result is
        still a ``FedAvg`` (or whatever it was) with the same settings; use the result.
    sink : FLStoreSink
        Receives each round (:class:`StoreSink` writes to an object store).
    job : str
        The FLStore job id the rounds belong to.
    select_with : {"oort_select", "cosine_select"} or None, default None
        From round 2 on, ask FLStore (through ``client``) which clients to train: Oort over all
        connected nodes, or the clients of the previous round most similar to its mean. The
        strategy still builds the messages; they are re-addressed to the selection. On any
        FLStore error the strategy's own sampling stands.
    client : FLStoreClient or None, default None
        The HTTP API client used by ``select_with``.
    select_k : int or None, default None
        How many clients to select (default: as many as the strategy sampled).
    tensor_names : sequence of str or None, default None
        Names for the arrays of every ArrayRecord, in order, when the ClientApp does not send a
        state dict (e.g. ``list(model.state_dict())``).
    on_sink_error : {"raise", "log"}, default "raise"
        Whether a failure to store a round (the sink's, or a reply FLStore cannot read) stops
        the run or is logged while training goes on. Committed updates are immutable: rerun
        a job under a fresh job id.

    Returns
    -------
    Strategy
        The wrapped strategy; ``aggregate_train`` returns exactly what the original does.
    """
    validate_job(job)
    if not isinstance(sink, FLStoreSink):
        raise ValidationError(f"sink {sink!r} has no put_round(job, round, updates, global_model)")
    if isinstance(strategy, FLStoreStrategy):
        raise ValidationError("this strategy already hands its rounds to FLStore")
    if select_with is not None and select_with not in SELECT_WORKLOADS:
        raise ValidationError(
            f"select_with={select_with!r}: use one of {', '.join(SELECT_WORKLOADS)} or None"
        )
    if select_with is not None and client is None:
        raise ValidationError(f"select_with={select_with!r} needs client=FLStoreClient(...)")
    if select_k is not None and select_k < 1:
        raise ValidationError(f"select_k={select_k}: select at least one client")
    cls = _wrapped_class(type(strategy))
    # a new instance with the strategy's attributes (a shallow copy): __init__ is not re-run
    wrapped: FLStoreStrategy = object.__new__(cls)
    wrapped.__dict__.update(vars(strategy))
    wrapped._flstore = FLStoreSettings(
        sink=sink,
        job=job,
        select_with=select_with,
        client=client,
        select_k=select_k,
        tensor_names=list(tensor_names) if tensor_names is not None else None,
        on_sink_error=on_sink_error,
    )
    return cast(S, wrapped)


# ---------------------------------------------------------------------- in-process runtime


@dataclass
class InProcessRun:
    """What :func:`run_in_process` ran: the node ids Flower assigned, with their node config."""

    node_configs: dict[int, dict[str, Any]]
    seconds: float = 0.0


def run_in_process(
    server_app: ServerApp,
    client_app: ClientApp,
    node_configs: Sequence[Mapping[str, Any]],
    *,
    run_config: Mapping[str, Any] | None = None,
    workers: int = 2,
    quiet: bool = True,
) -> InProcessRun:
    """Run a Flower ``ServerApp`` against ``len(node_configs)`` nodes running ``client_app``.

    Why not ``flwr run``: Flower's simulation engine needs Ray (``flwr[simulation]``), and its
    deployment engine (``flower-superlink`` + ``flower-supernode``) starts a fresh
    ``flwr-clientapp`` process for every message, each importing torch, and polls over HTTP:
    on 2 cores that took 234 s for 10 nodes × 5 rounds of an app that did no training. This
    runtime composes what ``flwr.simulation.run_simulation`` composes — the in-memory link
    state, ``InMemoryGrid`` for the ServerApp, registered nodes with their own ``Context``, the
    simulation runtime's fleet workers (``vce_api.run_api``) — and gives the workers a backend
    that runs the ClientApp in a thread pool instead of Ray actors. Messages, node ids,
    contexts and the ServerApp/ClientApp code paths are Flower's; only the executor differs.
    The composition uses modules Flower does not export (``vce_api``, the link state's run
    registry, ``DeprecatedRunInfoStore``), written against flwr 1.42: a Flower upgrade may
    need this function updated (``tests/test_flower.py`` runs it).

    Parameters
    ----------
    server_app, client_app : ServerApp, ClientApp
        The apps, as ``flwr run`` would load them.
    node_configs : sequence of mappings
        One per node: its ``context.node_config`` (as ``flower-supernode --node-config``);
        ``partition-id`` and ``num-partitions`` are added when absent.
    run_config : mapping, optional
        ``context.run_config`` of the ServerApp and of every node (as ``--run-config``).
    workers : int, default 2
        ClientApp calls run concurrently.
    quiet : bool, default True
        Show only Flower's errors (a failing ClientApp), not its per-round log.

    Returns
    -------
    InProcessRun
        The node ids Flower assigned, each with its node config.
    """
    from flwr.app import Context, RecordDict
    from flwr.common.constant import (
        HEARTBEAT_INTERVAL_INF,
        NOOP_ACCOUNT_NAME,
        NOOP_FLWR_AID,
        NUM_PARTITIONS_KEY,
        PARTITION_ID_KEY,
        RUN_ID_NUM_BYTES,
        SUPERLINK_NODE_ID,
        TASK_ID_NUM_BYTES,
    )
    from flwr.compat.client.run_info_store import DeprecatedRunInfoStore
    from flwr.proto.task_pb2 import Task
    from flwr.server.superlink.fleet.vce.metrics import VceMetrics
    from flwr.server.superlink.fleet.vce.vce_api import run_api
    from flwr.server.superlink.linkstate import LinkStateFactory
    from flwr.server.superlink.linkstate.in_memory_linkstate import RunRecord
    from flwr.server.superlink.linkstate.utils import generate_rand_int_from_bytes
    from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.supercore.run import Run
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.superlink.federation import NoOpFederationManager
    from flwr.superlink.grid import InMemoryGrid

    if not node_configs:
        raise ValidationError("run_in_process needs at least one node")
    t0 = time.perf_counter()
    config = dict(run_config or {})
    state_factory = LinkStateFactory(
        FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory()
    )
    state: Any = state_factory.state()
    run = Run.create_empty(run_id=generate_rand_int_from_bytes(RUN_ID_NUM_BYTES))
    run.primary_task_id = generate_rand_int_from_bytes(TASK_ID_NUM_BYTES)
    run.federation_id = NOOP_FEDERATION_ID
    run.override_config = dict(config)
    state.run_ids[run.run_id] = RunRecord(run=run)
    state.task_store[run.primary_task_id] = Task(task_id=run.primary_task_id, run_id=run.run_id)
    # the ServerApp's messages are stamped with this process's task identity
    TaskIdentity.task_id = 1
    TaskIdentity.run_id = run.run_id
    TaskIdentity.node_id = SUPERLINK_NODE_ID

    nodes: dict[int, dict[str, Any]] = {}
    stores: dict[int, Any] = {}
    for i, node_config in enumerate(node_configs):
        node_id = state.create_node(
            NOOP_FLWR_AID,
            NOOP_ACCOUNT_NAME,
            _random_key(),
            heartbeat_interval=HEARTBEAT_INTERVAL_INF,
        )
        state.acknowledge_node_heartbeat(node_id=node_id, heartbeat_interval=HEARTBEAT_INTERVAL_INF)
        full = {PARTITION_ID_KEY: i, NUM_PARTITIONS_KEY: len(node_configs), **dict(node_config)}
        nodes[node_id] = full
        store = DeprecatedRunInfoStore(node_id=node_id, node_config=full)
        store.register_context(run_id=run.run_id, run=run)
        # as if fused from the app's pyproject.toml; Flower refuses a run_config that changes
        info = store.run_infos[run.run_id]
        info.initial_run_config.update(config)
        info.context.run_config.update(config)
        stores[node_id] = store

    grid = InMemoryGrid(state_factory=state_factory)
    grid.set_run(run)
    server_context = Context(
        run_id=run.run_id, node_id=0, node_config={}, state=RecordDict(), run_config=dict(config)
    )
    stop = threading.Event()
    failure: list[BaseException] = []

    def serve() -> None:
        try:
            server_app(grid=grid, context=server_context)
        except BaseException as exc:  # re-raised in the caller's thread
            failure.append(exc)
        finally:
            stop.set()

    backend = _thread_backend(max(1, workers))
    with _flwr_log_level(logging.ERROR if quiet else None):
        server = threading.Thread(target=serve, name="flwr-serverapp", daemon=True)
        server.start()
        try:
            # returns once `stop` is set: by the ServerApp thread when it finishes
            run_api(
                lambda: client_app,
                lambda: backend,
                {node_id: i for i, node_id in enumerate(nodes)},
                state_factory,
                stores,
                stop,
                VceMetrics(),
            )
        except BaseException:
            stop.set()  # the daemon ServerApp thread may still wait for replies: leave it
            raise
        server.join()
    if failure:
        raise failure[0]
    return InProcessRun(node_configs=nodes, seconds=time.perf_counter() - t0)


def _random_key() -> bytes:
    import secrets

    return secrets.token_bytes(32)


@contextmanager
def _flwr_log_level(level: int | None) -> Iterator[None]:
    logger = logging.getLogger("flwr")
    before = logger.level
    if level is not None:
        logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(before)


def _thread_backend(workers: int) -> Any:
    """A simulation-runtime ``Backend`` that runs the ClientApp in the worker threads."""
    from flwr.app import Context
    from flwr.clientapp.client_app import ClientAppException, LoadClientAppError
    from flwr.server.superlink.fleet.vce.backend import Backend

    class ThreadBackend(Backend):
        """Runs a ClientApp in the calling fleet worker thread (there are ``workers`` of them)."""

        def __init__(self) -> None:
            super().__init__({})
            self.app_fn: Callable[[], ClientApp] | None = None

        def build(self, app_fn: Callable[[], ClientApp]) -> None:
            self.app_fn = app_fn

        @property
        def num_workers(self) -> int:
            return workers

        def is_worker_idle(self) -> bool:
            return True

        def terminate(self) -> None:
            self.app_fn = None

        def process_message(self, message: Message, context: Context) -> tuple[Message, Context]:
            if self.app_fn is None:
                raise RuntimeError("ThreadBackend.build() was not called")
            app = self.app_fn()
            try:
                return app(message=message, context=context), context
            except LoadClientAppError:
                raise
            except Exception as exc:  # reported to the ServerApp as an error reply, as Ray's
                raise ClientAppException(str(exc)) from exc

    return ThreadBackend()
