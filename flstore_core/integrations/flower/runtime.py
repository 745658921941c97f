"""A Flower runtime in one process: a ``ServerApp`` and its ``ClientApp`` nodes, without Ray.

:func:`run_in_process` runs a ``ServerApp`` and a ``ClientApp`` in one process, on Flower's own
in-memory grid and link state and the simulation runtime's fleet workers, with a thread pool in
place of Ray (Flower's simulation backend) — see its docstring for why.

flwr is imported only inside functions, so this module imports without it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from flstore_core.errors import ValidationError

if TYPE_CHECKING:
    from flwr.app import Message
    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp

__all__ = ["InProcessRun", "run_in_process"]


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
