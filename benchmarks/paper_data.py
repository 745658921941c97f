"""The paper benchmark's data: its settings, the two jobs it writes (a model job of client
updates stepping from a base, a summary job of many tiny rounds) and the request a user sends
for each workload (``benchmarks/paper.py`` runs them)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from flstore_core import models
from flstore_core.data.codec import Update
from flstore_core.integrations.flower.sinks import StoreSink
from flstore_core.sdk.jobs import create_job
from flstore_core.storage.object_store import ObjectStore

MODEL_JOB = "paper-model"
SUMMARY_JOB = "paper-summaries"
SUMMARY_WIDTH = 1024  # the summary job's tiny model: one tensor of this many floats
INFERENCE_IMAGES = 8


@dataclass(frozen=True)
class Setting:
    """Everything that sizes a run (recorded in the JSON)."""

    model: str = "resnet18_cifar"
    clients: int = 10
    validation: int = 16
    shapley_permutations: int = 10
    summary_rounds: int = 50
    summary_clients: int = 100
    repetitions: int = 2
    nodes: int = 2
    replication: int = 2  # the deployment's default (infra settings, FLSTORE_REPLICATION)
    memory_mb: int = 3008
    keep_warm_minutes: int = 5
    rounds_per_minute: float = 1.0
    accounting_rounds: int = 2  # new rounds ingested at the end to time a round's prefetch


FULL = Setting()
QUICK = Setting(
    model="digits_cnn",
    clients=10,
    validation=64,
    shapley_permutations=10,
    summary_rounds=6,
    summary_clients=12,
    repetitions=2,
    memory_mb=2048,
    accounting_rounds=1,
)


def workload_params(name: str, setting: Setting, clients: list[str]) -> dict[str, Any]:
    """The request a user sends for each workload (the defaults where a user has no reason to
    change them)."""
    rng = np.random.default_rng(7)
    shape = models.INPUT_SHAPES[setting.model]
    images = np.round(rng.standard_normal((INFERENCE_IMAGES, *shape)), 3)
    table: dict[str, dict[str, Any]] = {
        "accuracy_select": {"k": 3},
        "cfl_split": {},
        "contribution_loo": {},
        "contribution_shapley": {
            "min_permutations": setting.shapley_permutations,
            "max_permutations": setting.shapley_permutations,
        },
        "cosine_select": {"k": 3},
        "fedavg": {},
        "feddebug": {"num_faulty": 1},
        "fltrust": {},
        "incentive": {"budget": 100.0},
        "inference": {
            "inputs": images.tolist(),
            "labels": rng.integers(0, 10, INFERENCE_IMAGES).tolist(),
        },
        "kmeans": {"k": 2},
        "krum": {"f": 1},
        "malicious_cosine": {"k": 1},
        "multi_krum": {"f": 1},
        "oort_select": {"k": 10},
        "personalize": {"client": clients[0]},
        "reputation": {"decay": 0.8},
        "trimmed_mean": {"beta": 0.1},
    }
    return table.get(name, {})


def client_ids(n: int) -> list[str]:
    width = max(2, len(str(n - 1)))
    return [f"client-{i:0{width}d}" for i in range(n)]


class ModelJob:
    """The model job: spec and validation set, base, and rounds of ``clients`` updates, each
    committed as ingestion commits it (:class:`StoreSink`: updates, the round's global model,
    the manifest with the ingest summaries)."""

    def __init__(self, store: ObjectStore, setting: Setting) -> None:
        self.store = store
        self.setting = setting
        self.clients = client_ids(setting.clients)
        rng = np.random.default_rng(0)
        shape = models.INPUT_SHAPES[setting.model]
        x = rng.standard_normal((setting.validation, *shape), dtype=np.float32)
        y = rng.integers(0, models.NUM_CLASSES[setting.model], setting.validation)
        spec = create_job(store, MODEL_JOB, model=setting.model, validation=(x, y))
        self.params = set(spec.parameters or ())
        self.model = models.state_arrays(models.build(setting.model, seed=0))
        self.sink = StoreSink(store)
        # round -> when its updates were handed to the writing (perf_counter), as a Flower
        # strategy hands a round to its sink
        self.handed_at: dict[int, float] = {}
        self.sink.put_initial(MODEL_JOB, Update(dict(self.model)))

    def write_round(self, round_: int, arrival_s: float = 0.0) -> int:
        """Commit ``round_``: every client steps from the current model along a shared direction
        (1e-3 of a unit normal a weight) plus noise of its own (5e-4), the last client three
        times the other way; buffers (BatchNorm statistics, counters) stay the model's. Returns
        the round's stored bytes. ``arrival_s`` > 0: the updates land one by one over that
        many seconds (:meth:`_land_spread`) rather than all at once as ``StoreSink`` writes
        them."""
        rng = np.random.default_rng(100 + round_)
        direction = {
            n: rng.standard_normal(w.shape, dtype=np.float32) * np.float32(1e-3)
            for n, w in self.model.items()
            if n in self.params
        }
        updates: dict[str, Update] = {}
        for k, client in enumerate(self.clients):
            own = np.random.default_rng(10_000 * (round_ + 1) + k)
            sign = np.float32(-3.0 if k == len(self.clients) - 1 else 1.0)
            tensors: dict[str, np.ndarray] = {}
            for name, w in self.model.items():
                if name not in self.params:
                    tensors[name] = w.copy()
                    continue
                noise = own.standard_normal(w.shape, dtype=np.float32) * np.float32(5e-4)
                tensors[name] = (w + sign * direction[name] + noise).astype(np.float32)
            updates[client] = Update(
                tensors,
                num_examples=100 + 37 * (k % 11),
                metrics={"loss": 1.5 + 0.05 * k, "duration_s": 20.0 + k},
            )
        weights = np.array([u.num_examples for u in updates.values()], dtype=np.float64)
        weights /= weights.sum()
        new_model: dict[str, np.ndarray] = {}
        for name, w in self.model.items():
            if name not in self.params:
                new_model[name] = w.copy()
                continue
            acc = np.zeros_like(w)
            for wt, u in zip(weights, updates.values(), strict=True):
                acc += np.float32(wt) * u.tensors[name]
            new_model[name] = acc
        self.handed_at[round_] = time.perf_counter()
        if arrival_s > 0:
            self._land_spread(round_, updates, Update(dict(new_model)), arrival_s)
        else:
            self.sink.put_round(MODEL_JOB, round_, updates, Update(dict(new_model)))
        self.model = new_model
        return sum(
            e.stored_bytes for e in self.store.get_manifest(MODEL_JOB, round_).updates.values()
        )

    def _land_spread(
        self, round_: int, updates: dict[str, Update], model: Update, arrival_s: float
    ) -> None:
        """``StoreSink.put_round``'s writes with the updates spread as clients that finish
        training at different times send them: update ``k`` of ``n`` PUT at ``(k + 1) ·
        arrival_s / n`` seconds (or once the one before returned, if later), then the global
        model, the ingest summaries and the manifest, as the sink writes them."""
        t0 = time.perf_counter()
        entries = []
        for k, (client, update) in enumerate(updates.items()):
            time.sleep(max(0.0, t0 + arrival_s * (k + 1) / len(updates) - time.perf_counter()))
            entries.append(self.store.put_update(MODEL_JOB, round_, client, update))
        self.store.put_global(MODEL_JOB, round_, model)
        summaries = self.sink.summaries(MODEL_JOB, round_, updates)
        self.store.commit_round(MODEL_JOB, round_, entries, summaries=summaries)


class SummaryJob:
    """The summary job: rounds of ``summary_clients`` tiny updates (one 1,024-float tensor) with
    loss and duration metrics, each committed with its ingest summaries and a global model."""

    def __init__(self, store: ObjectStore, setting: Setting) -> None:
        create_job(store, SUMMARY_JOB)
        self.clients = client_ids(setting.summary_clients)
        self.rng = np.random.default_rng(1)
        self.weights = self.rng.standard_normal(SUMMARY_WIDTH).astype(np.float32)
        self.sink = StoreSink(store, max_workers=16)
        self.sink.put_initial(SUMMARY_JOB, Update({"w": self.weights.copy()}))
        self.speed = self.rng.uniform(0.5, 2.0, len(self.clients))  # each client's pace

    def write_round(self, round_: int) -> None:
        rng = self.rng
        step = rng.standard_normal(SUMMARY_WIDTH).astype(np.float32) * np.float32(0.01)
        updates = {}
        for k, c in enumerate(self.clients):
            sign = np.float32(-1.0 if k % 10 == 9 else 1.0)
            noise = rng.standard_normal(SUMMARY_WIDTH).astype(np.float32) * np.float32(0.005)
            updates[c] = Update(
                {"w": (self.weights + sign * step + noise).astype(np.float32)},
                num_examples=50 + (k * 7) % 90,
                metrics={
                    "loss": float(2.0 * math.exp(-round_ / 20) * (1 + 0.3 * rng.random())),
                    "duration_s": float(10.0 * self.speed[k] * (1 + 0.1 * rng.random())),
                },
            )
        self.weights = (self.weights + step).astype(np.float32)
        self.sink.put_round(SUMMARY_JOB, round_, updates, Update({"w": self.weights.copy()}))
