"""fltrust's request path without needless 4 B/param arrays, bit for bit what it computed before.

``g_0`` is subtracted from the trained state tensor by tensor into one vector (no flattened copy
of the trained weights), and the model ``base + α g`` is built in the aggregate's own array (no
copy to float32 of a float32 GEMV, no ``vector + base`` array). The references here compute
what the workload computed before those changes: the trained state flattened
(``flat_parts`` + ``concatenate``) minus the base, and ``to_weights`` of the step. A BatchNorm
model (``digits_bn_cnn``) so that integer counters (``num_batches_tracked``) and running
statistics are among the tensors.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from flstore_core import models
from flstore_core.cache.results import run_round_workload
from flstore_core.cache.round_data import ArtifactStats, RoundData
from flstore_core.cache.round_loading import load_round
from flstore_core.data.codec import Update, decode_update
from flstore_core.data.rows import flat_parts
from flstore_core.sdk.jobs import create_job
from flstore_core.storage.memory import MemoryBlobStore
from flstore_core.storage.object_store import ObjectStore
from flstore_core.workloads import get
from flstore_core.workloads.fltrust import fltrust_step, server_update

MODEL = "digits_bn_cnn"
JOB = "lean"


def state(model: torch.nn.Module) -> dict[str, Any]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def lean() -> tuple[ObjectStore, RoundData]:
    """A round of 6 clients (each the base plus its own noise, counters advanced) with a base
    and a validation set of 23 images (batches of 10 leave a short last one)."""
    store = ObjectStore(blobs=MemoryBlobStore())
    rng = np.random.default_rng(3)
    x = rng.standard_normal((23, *models.INPUT_SHAPES[MODEL])).astype(np.float32)
    y = rng.integers(0, 10, len(x)).astype(np.int64)
    create_job(store, JOB, model=MODEL, validation=(x, y))
    base = state(models.build(MODEL, seed=1))
    store.put_initial(JOB, Update(dict(base)))
    entries = []
    for k in range(6):
        client = {}
        for n, w in base.items():
            moved = w + 5 if w.dtype.kind == "i" else w + 0.05 * rng.standard_normal(w.shape)
            client[n] = moved.astype(w.dtype)
        for n, w in client.items():
            if n.endswith("running_var"):
                client[n] = np.abs(w) + np.float32(0.1)
        entries.append(store.put_update(JOB, 0, f"c{k}", Update(client, num_examples=10 + k)))
    store.commit_round(JOB, 0, entries)
    return store, load_round(store, JOB, 0, ArtifactStats())


def reference_g0(data: RoundData, epochs: int, lr: float, batch: int, seed: int) -> Any:
    """The trained state flattened into its own vector, minus the base (the former code)."""
    assert data.base is not None
    x, y = data.context.validation()
    model = models.load_vector(models.build(MODEL), data.base, data.specs)
    rng = np.random.default_rng(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    loss = torch.nn.CrossEntropyLoss()
    xt, yt = torch.tensor(x), torch.tensor(y)
    model.train()
    with models.one_torch_thread():
        for _ in range(epochs):
            order = torch.from_numpy(rng.permutation(len(y)))
            for start in range(0, len(y), batch):
                idx = order[start : start + batch]
                opt.zero_grad()
                loss(model(xt[idx]), yt[idx]).backward()
                opt.step()
    trained = np.concatenate(flat_parts(state(model), data.specs))
    return trained - data.base


@pytest.mark.parametrize(("epochs", "lr", "batch", "seed"), [(1, 0.05, 10, 0), (2, 0.31, 4, 9)])
def test_g0_is_the_trained_state_minus_the_base_bit_for_bit(
    lean: tuple[ObjectStore, RoundData], epochs: int, lr: float, batch: int, seed: int
) -> None:
    _, data = lean
    g0, n = server_update(data, epochs, lr, batch, seed)
    ref = reference_g0(data, epochs, lr, batch, seed)
    assert n == 23 and g0.dtype == np.float32
    assert g0.tobytes() == ref.tobytes()
    # the counters moved by one per step, in their float32 slots
    counters = [i for i, s in enumerate(data.specs) if s.name.endswith("num_batches_tracked")]
    assert counters
    steps = epochs * -(-23 // batch)
    offsets = np.cumsum([0] + [s.numel for s in data.specs])
    assert all(g0[offsets[i]] == steps for i in counters)


@pytest.mark.parametrize("include_buffers", [False, True])
@pytest.mark.parametrize("factor", [1.0, 0.37, 7.5])
def test_the_model_is_to_weights_of_the_step_bit_for_bit(
    lean: tuple[ObjectStore, RoundData], include_buffers: bool, factor: float
) -> None:
    _, data = lean
    rng = np.random.default_rng(int(factor * 100) + include_buffers)
    coef = rng.random(data.n).tolist()
    share = rng.random(data.n).tolist()
    step = fltrust_step(data, coef, share, include_buffers, factor)
    ref = data.to_weights(step.copy())
    got = fltrust_step(data, coef, share, include_buffers, factor, add_base=True)
    assert got.tobytes() == ref.tobytes()
    assert not np.array_equal(got, step)  # the base was added
    no_base = RoundData(
        data.job,
        data.round,
        data.clients,
        data.matrix,
        data.specs,
        data.num_examples,
        data.metrics,
        stats=ArtifactStats(),
    )
    alone = fltrust_step(no_base, coef, share, include_buffers, factor, add_base=True)
    assert alone.tobytes() == step.tobytes()  # no base, nothing added


def test_the_stored_model_is_base_plus_alpha_g_from_the_reported_trust(
    lean: tuple[ObjectStore, RoundData],
) -> None:
    """End to end on the node's code path: the stored model is ``base + α Σ c_i d_i`` with
    ``c_i = TS_i ‖g_0‖ / (‖g_i‖ Σ TS)`` from the answer's scores and norm (float64 reference),
    buffers the trust-weighted mean of the deltas, counters rounded."""
    store, data = lean
    workload = get("fltrust")
    result = run_round_workload(store, workload, data, workload.validate({"global_lr": 0.8}))
    tensors = decode_update(store.get_object(result["model_key"])).tensors
    assert data.base is not None
    d = data.matrix.astype(np.float64)
    trust = np.array([result["scores"][c] for c in data.clients])
    assert trust.sum() > 0
    norms = np.sqrt(np.diag(data.gram(True)))
    coef = trust * result["server_norm"] / norms / trust.sum()
    params = np.zeros(d.shape[1], bool)
    for a, b in data.columns.runs(False):
        params[a:b] = True
    expected = data.base + 0.8 * np.where(params, coef @ d, (trust / trust.sum()) @ d)
    offsets = np.cumsum([0] + [s.numel for s in data.specs])
    for i, spec in enumerate(data.specs):
        got = np.asarray(tensors[spec.name], dtype=np.float64).ravel()
        want = expected[offsets[i] : offsets[i + 1]]
        if spec.name.endswith("num_batches_tracked"):
            assert np.array_equal(got, np.rint(want))
        else:
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
