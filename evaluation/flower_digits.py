"""The demo job as a real Flower app: ``digits_cnn`` on scikit-learn's digits, fed to FLStore.

The same federated job as :mod:`evaluation.digits_job` (same data split, same local training,
same label-flipping attack), written the way a Flower user writes one:

- :data:`client_app` — a Flower ``ClientApp`` whose ``train`` handler loads the global model
  from the message, trains ``local-epochs`` epochs of SGD on its partition and replies with
  ``ArrayRecord(model.state_dict())`` and a ``MetricRecord`` of ``num-examples``, ``loss``
  (over all samples of the last epoch), ``loss_sq_mean`` and ``duration_s``. Its partition
  comes from ``context.node_config`` (``partition-id``, ``num-partitions``, as
  ``flower-supernode --node-config`` sets them); a node configured with ``attack="label-flip"``
  flips every label ``y → 9 − y`` (Tolpegin et al., ESORICS 2020) and otherwise trains like the
  others. The split (``seed``, ``dirichlet-alpha``) comes from ``context.run_config``.
- :func:`build_server_app` — a ``ServerApp`` running ``with_flstore(FedAvg(...))`` for ``rounds``
  rounds over every node, evaluating the global model on the held-out digits after each round.
- :func:`run_flower_job` — declares the job in FLStore, runs both apps on
  :func:`~flstore_core.integrations.flower.run_in_process` (Flower's in-memory grid and
  simulation runtime workers, threads in place of Ray) and summarises the run.

FLStore client ids are the Flower node ids (``str(node_id)``), or ``client-00``… (the
partition) with ``name_clients=True``, which makes the ClientApp report a ``client-id``.

The hyper-parameters are :func:`digits_job.simulate`'s (SGD with lr 0.01, momentum 0.9, batches
of 10, 5 local epochs, Dirichlet α = 1). With them the label-flipping client is the one
``malicious_cosine`` flags and has the worst Krum score from round 1 on (checked on 6 clients ×
3 rounds, seeds 0–7); in round 0 every model is still near its random start and it does not
stand out reliably. 10 clients × 5 rounds take about 10 s on 2 cores.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import numpy.typing as npt

from evaluation import digits_job
from flstore_core import models
from flstore_core.data.codec import Update
from flstore_core.data.manifest import JobSpec
from flstore_core.errors import ValidationError
from flstore_core.ids import validate_job
from flstore_core.integrations.flower import (
    CLIENT_ID_KEY,
    FLStoreSink,
    InitialModelSink,
    SelectWith,
    StoreSink,
    run_in_process,
    with_flstore,
)

if TYPE_CHECKING:
    from flwr.app import Context, Message
    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp

    from flstore_core.sdk.client import FLStoreClient
    from flstore_core.storage.object_store import ObjectStore

MODEL = digits_job.MODEL
LABEL_FLIP = "label-flip"
F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]


@dataclass(frozen=True)
class TrainingSettings:
    """The job's hyper-parameters (the defaults of :func:`evaluation.digits_job.simulate`)."""

    local_epochs: int = 5
    lr: float = 0.01
    momentum: float = 0.9
    batch_size: int = 10
    alpha: float = 1.0
    seed: int = 0


@dataclass
class FlowerRunSummary:
    """What :func:`run_flower_job` ran and how the global model did."""

    job: str
    clients: list[str]
    """FLStore client ids, in partition order."""
    malicious: list[str]
    """FLStore client ids of the label-flipping clients."""
    rounds: int
    accuracy: list[float] = field(default_factory=list)
    """Held-out accuracy of the global model after each round (FLStore round order)."""
    initial_accuracy: float = 0.0
    participants: list[list[str]] = field(default_factory=list)
    """Client ids whose updates were stored, per round."""
    node_ids: dict[str, int] = field(default_factory=dict)
    """FLStore client id → Flower node id."""
    num_examples: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    engine: str = "flwr in-process (InMemoryGrid + simulation runtime fleet, thread backend)"


@functools.cache
def federated_split(
    seed: int, partitions: int, alpha: float
) -> tuple[F32, I64, F32, I64, list[I64]]:
    """``(x_train, y_train, x_val, y_val, shares)``: the split of :func:`digits_job.simulate`.

    Every node computes the whole split (a simulation's shortcut for "each node has its own
    data"), so it is cached: the ClientApp calls of a process share one read-only copy.
    """
    x_tr, y_tr, x_val, y_val = digits_job.load_split(seed)
    shares = digits_job.dirichlet_split(y_tr, partitions, alpha, np.random.default_rng(seed))
    arrays: list[npt.NDArray[Any]] = [x_tr, y_tr, x_val, y_val, *shares]
    for array in arrays:
        array.setflags(write=False)
    return x_tr, y_tr, x_val, y_val, shares


def client_name(partition: int, partitions: int) -> str:
    """The readable id of a partition: ``client-00``, … (as :func:`digits_job.client_ids`)."""
    return digits_job.client_ids(partitions)[partition]


# ---------------------------------------------------------------------- the ClientApp


def _train(msg: Message, context: Context) -> Message:
    """Train the received global model on this node's partition and reply with it."""
    from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

    run_cfg, node_cfg = context.run_config, context.node_config
    partition, partitions = int(node_cfg["partition-id"]), int(node_cfg["num-partitions"])
    defaults = TrainingSettings()
    seed = int(run_cfg.get("seed", defaults.seed))
    x_tr, y_tr, _, _, shares = federated_split(
        seed, partitions, float(run_cfg.get("dirichlet-alpha", defaults.alpha))
    )
    share = shares[partition]
    x, y = x_tr[share], y_tr[share]
    if node_cfg.get("attack") == LABEL_FLIP:
        y = 9 - y  # label flipping: every class mapped to its mirror
    config = cast(ConfigRecord, msg.content["config"])
    server_round = int(cast(int, config["server-round"]))
    model = models.build(MODEL)
    model.load_state_dict(cast(ArrayRecord, msg.content["arrays"]).to_torch_state_dict())
    t0 = time.perf_counter()
    loss, loss_sq = digits_job.train_local(
        model,
        x,
        y,
        epochs=int(cast(int, config.get("local-epochs", defaults.local_epochs))),
        lr=float(cast(float, config.get("lr", defaults.lr))),
        momentum=float(cast(float, config.get("momentum", defaults.momentum))),
        batch_size=int(cast(int, config.get("batch-size", defaults.batch_size))),
        seed=seed * 1_000_003 + (server_round - 1) * 1009 + partition,
    )
    reply = RecordDict(
        {
            "arrays": ArrayRecord(model.state_dict()),
            "metrics": MetricRecord(
                {
                    "num-examples": len(y),
                    "loss": loss,
                    "loss_sq_mean": loss_sq,
                    "duration_s": time.perf_counter() - t0,
                }
            ),
        }
    )
    if run_cfg.get("report-client-id"):
        reply["flstore"] = ConfigRecord({CLIENT_ID_KEY: client_name(partition, partitions)})
    return Message(content=reply, reply_to=msg)


@functools.cache
def _client_app() -> ClientApp:
    from flwr.clientapp import ClientApp

    app = ClientApp()
    app.train()(_train)
    return app


def __getattr__(name: str) -> Any:
    # `client_app` is built on first access so that importing this module needs no flwr
    if name == "client_app":
        return _client_app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---------------------------------------------------------------------- the ServerApp


def build_server_app(
    sink: FLStoreSink,
    *,
    job: str,
    rounds: int,
    clients: int,
    settings: TrainingSettings = TrainingSettings(),
    on_evaluate: Callable[[int, float], None] | None = None,
    select_with: SelectWith | None = None,
    client: FLStoreClient | None = None,
    select_k: int | None = None,
) -> ServerApp:
    """A ``ServerApp`` training ``digits_cnn`` with FedAvg over ``clients`` nodes, fed to FLStore.

    ``on_evaluate(server_round, accuracy)`` is called with the held-out accuracy of the initial
    model (``server_round`` 0) and of the global model after each round.
    """
    from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg

    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        _, _, x_val, y_val = digits_job.load_split(settings.seed)
        model = models.build(MODEL, seed=settings.seed)

        def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
            model.load_state_dict(arrays.to_torch_state_dict())
            acc = models.accuracy(model, x_val, y_val)
            if on_evaluate is not None:
                on_evaluate(server_round, acc)
            return MetricRecord({"accuracy": acc})

        strategy = with_flstore(
            FedAvg(
                fraction_train=1.0,
                fraction_evaluate=0.0,  # the server evaluates on held-out digits instead
                min_train_nodes=clients,
                min_available_nodes=clients,
            ),
            sink=sink,
            job=job,
            select_with=select_with,
            client=client,
            select_k=select_k,
        )
        strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(model.state_dict()),
            num_rounds=rounds,
            timeout=600,
            train_config=ConfigRecord(
                {
                    "local-epochs": settings.local_epochs,
                    "lr": settings.lr,
                    "momentum": settings.momentum,
                    "batch-size": settings.batch_size,
                }
            ),
            evaluate_fn=evaluate,
        )

    return app


# ---------------------------------------------------------------------- running the job


class _RecordingSink:
    """Forwards to the user's sink and remembers who took part in each round."""

    def __init__(self, inner: FLStoreSink) -> None:
        self.inner = inner
        self.participants: dict[int, list[str]] = {}
        self.num_examples: dict[str, int] = {}

    def put_initial(self, job: str, update: Update) -> None:
        if isinstance(self.inner, InitialModelSink):
            self.inner.put_initial(job, update)

    def put_round(
        self, job: str, round: int, updates: dict[str, Update], global_model: Update | None
    ) -> None:
        self.inner.put_round(job, round, updates, global_model)
        self.participants[round] = sorted(updates)
        self.num_examples.update({c: u.num_examples for c, u in updates.items()})


def run_flower_job(
    sink: FLStoreSink,
    job: str = "digits",
    clients: int = 10,
    rounds: int = 5,
    malicious: int = 1,
    progress: Callable[[int, float], None] | None = None,
    *,
    store: ObjectStore | None = None,
    settings: TrainingSettings = TrainingSettings(),
    name_clients: bool = False,
    workers: int = 2,
    select_with: SelectWith | None = None,
    client: FLStoreClient | None = None,
    select_k: int | None = None,
) -> FlowerRunSummary:
    """Run the digits job as a Flower ServerApp + ClientApp, every round handed to ``sink``.

    Parameters
    ----------
    sink : FLStoreSink
        Receives each round (and the initial model, if it takes one).
    job : str, default "digits"
        FLStore job id.
    clients : int, default 10
        Flower nodes (one partition each); every node trains in every round.
    rounds : int, default 5
        Flower rounds (FLStore rounds ``0 … rounds-1``).
    malicious : int, default 1
        The last ``malicious`` partitions flip their labels.
    progress : callable, optional
        ``progress(round, accuracy)`` after each round (FLStore numbering), as
        :func:`digits_job.simulate` calls it.
    store : ObjectStore, optional
        Where the job is declared (``JobSpec(job, model="digits_cnn")`` with the
        hyper-parameters) and the validation set stored — sinks only carry rounds. Defaults to
        the store of a :class:`StoreSink`; with neither, the job must be declared elsewhere.
    settings : TrainingSettings
        Hyper-parameters and seed (data split, initial model, local shuffling).
    name_clients : bool, default False
        Report ``client-00``… as client ids instead of the Flower node ids.
    workers : int, default 2
        ClientApp calls run concurrently (torch then uses one thread each).
    select_with, client, select_k
        Passed to :func:`with_flstore`: FLStore-driven client selection.

    Returns
    -------
    FlowerRunSummary
        Client ids, the malicious ids, participants and held-out accuracy per round.
    """
    import torch

    validate_job(job)
    if clients < 1 or rounds < 1:
        raise ValidationError(f"clients={clients}, rounds={rounds}: both must be at least 1")
    if not 0 <= malicious < clients:
        raise ValidationError(f"malicious={malicious}: use 0 … {clients - 1} for {clients} clients")
    t0 = time.perf_counter()
    if store is None and isinstance(sink, StoreSink):
        store = sink.store
    attackers = list(range(clients - malicious, clients))
    _, _, x_val, y_val, shares = federated_split(settings.seed, clients, settings.alpha)
    if store is not None:
        store.put_job_spec(
            JobSpec(
                job,
                model=MODEL,
                hyperparameters={
                    "lr": settings.lr,
                    "momentum": settings.momentum,
                    "batch_size": settings.batch_size,
                    "local_epochs": settings.local_epochs,
                    "dirichlet_alpha": settings.alpha,
                    "seed": settings.seed,
                    "framework": "flower",
                },
                description="Flower ServerApp/ClientApp on scikit-learn digits "
                "(evaluation.flower_digits)",
            )
        )
        store.put_validation_set(job, x_val, y_val)

    accuracy: dict[int, float] = {}

    def on_evaluate(server_round: int, acc: float) -> None:
        accuracy[server_round] = acc
        if progress is not None and server_round >= 1:
            progress(server_round - 1, acc)

    recording = _RecordingSink(sink)
    app = build_server_app(
        recording,
        job=job,
        rounds=rounds,
        clients=clients,
        settings=settings,
        on_evaluate=on_evaluate,
        select_with=select_with,
        client=client,
        select_k=select_k,
    )
    node_configs = [{"attack": LABEL_FLIP} if p in attackers else {} for p in range(clients)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1 if workers > 1 else threads)  # tiny model: threads only contend
    try:
        ran = run_in_process(
            app,
            _client_app(),
            node_configs,
            run_config={
                "seed": settings.seed,
                "dirichlet-alpha": settings.alpha,
                "report-client-id": name_clients,
            },
            workers=workers,
        )
    finally:
        torch.set_num_threads(threads)

    partition_of = {node: int(cfg["partition-id"]) for node, cfg in ran.node_configs.items()}
    ids = {
        p: client_name(p, clients) if name_clients else str(node)
        for node, p in partition_of.items()
    }
    ordered = [ids[p] for p in range(clients)]
    missing = [r for r in range(rounds) if r not in recording.participants]
    if missing:
        raise ValidationError(
            f"Flower round {missing[0] + 1} of job {job!r} produced no stored update "
            "(see the ClientApp errors logged above)"
        )
    return FlowerRunSummary(
        job=job,
        clients=ordered,
        malicious=[ids[p] for p in attackers],
        rounds=rounds,
        accuracy=[accuracy[r] for r in range(1, rounds + 1) if r in accuracy],
        initial_accuracy=accuracy.get(0, 0.0),
        participants=[recording.participants[r] for r in range(rounds)],
        node_ids={ids[p]: node for node, p in partition_of.items()},
        num_examples={ids[p]: len(shares[p]) for p in range(clients)},
        seconds=time.perf_counter() - t0,
    )
