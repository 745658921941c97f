"""The scale benchmark's round: ``LAYERS`` weight/bias pairs of float32 adding up to the
asked parameter count, a base model and one step of it per client (every tenth stepping the
other way), ingested as one committed round."""

from __future__ import annotations

import time

import numpy as np

from flstore_core.data.codec import TensorSpec, Update
from flstore_core.storage.object_store import ObjectStore

ROUND = 0
LAYERS = 4
BIAS = 250


def layer_sizes(n_params: int) -> dict[str, int]:
    """``LAYERS`` weight/bias pairs adding up to ``n_params`` (tensor boundaries to cut at)."""
    bias = min(BIAS, max(1, n_params // (8 * LAYERS)))
    weight = (n_params - LAYERS * bias) // LAYERS
    sizes: dict[str, int] = {}
    for i in range(LAYERS):
        sizes[f"layer{i}.weight"] = weight
        sizes[f"layer{i}.bias"] = bias
    sizes["layer0.weight"] += n_params - sum(sizes.values())
    return sizes


def specs_of(n_params: int) -> list[TensorSpec]:
    return [TensorSpec(name, "F32", (n,)) for name, n in layer_sizes(n_params).items()]


def base_model(n_params: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(10_000)
    return {
        name: (rng.standard_normal(n) * 0.05).astype(np.float32)
        for name, n in layer_sizes(n_params).items()
    }


def client_update(base: dict[str, np.ndarray], k: int) -> Update:
    """The base plus a client step; every tenth client steps the other way (what krum and the
    trimmed mean are for)."""
    rng = np.random.default_rng(k)
    sign = -1.0 if k % 10 == 9 else 1.0
    tensors = {
        name: (w + sign * (0.01 + 0.01 * rng.standard_normal(w.size))).astype(np.float32)
        for name, w in base.items()
    }
    return Update(tensors, num_examples=100 + 37 * (k % 11), metrics={"loss": 0.5 + 0.001 * k})


def write_round(store: ObjectStore, job: str, clients: int, n_params: int) -> float:
    """Ingest one committed round (and the job's base model); returns the time it took (ms)."""
    t0 = time.perf_counter()
    base = base_model(n_params)
    store.put_initial(job, Update(dict(base)))
    entries = [
        store.put_update(job, ROUND, f"client-{k:03d}", client_update(base, k))
        for k in range(clients)
    ]
    store.commit_round(job, ROUND, entries)
    return (time.perf_counter() - t0) * 1000
