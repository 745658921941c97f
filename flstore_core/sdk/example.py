"""A small ready job on disk, for a first run of ``flstore push`` (``flstore example DIR``).

scikit-learn's bundled 8×8 digits, dealt to ten clients; each round every client trains a copy
of the round's global ``digits_cnn`` for a few full-batch SGD steps on its share and saves its
state dict with ``torch.save``, and the next global model is their FedAvg. ``client-09`` trains
on shuffled labels, so the selection and robustness workloads have someone to find. Seeded: the
same arguments write the same tensors. The layout::

    DIR/validation.npz                 x [n, 1, 8, 8] float32, y [n] int64
    DIR/round-R/client-NN.pt           one torch.save state dict per client
    DIR/round-R/meta.csv               client, num_examples, loss
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from flstore_core import models

MODEL = "digits_cnn"
STEPS = 8  # full-batch SGD steps per client and round: ~1 s for the whole example
LEARNING_RATE = 0.5


@dataclass(frozen=True)
class ExampleJob:
    """What :func:`write_example` wrote."""

    directory: Path
    model: str
    validation: Path
    rounds: tuple[Path, ...]
    clients: tuple[str, ...]


def write_example(
    directory: str | Path, *, clients: int = 10, rounds: int = 3, seed: int = 0
) -> ExampleJob:
    """Write the example job to ``directory`` (created if missing) and say what it wrote."""
    import torch
    from sklearn.datasets import load_digits

    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None, :, :]
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(y))
    cut = len(y) // 5
    validation = folder / "validation.npz"
    np.savez(validation, x=x[order[:cut]], y=y[order[:cut]])
    shares = np.array_split(order[cut:], clients)
    ids = tuple(f"client-{i:02d}" for i in range(clients))
    torch.manual_seed(seed)
    global_model = models.build(MODEL, seed=seed)
    written = []
    for round_ in range(rounds):
        out = folder / f"round-{round_}"
        out.mkdir(exist_ok=True)
        states, rows = [], []
        for i, (client, share) in enumerate(zip(ids, shares, strict=True)):
            labels = (
                y[share] if i < clients - 1 else np.random.default_rng(round_).permutation(y[share])
            )
            state, loss = _train(global_model, x[share], labels)
            torch.save(state, out / f"{client}.pt")
            states.append(state)
            rows.append((client, len(share), f"{loss:.4f}"))
        with (out / "meta.csv").open("w", newline="") as fh:
            csv.writer(fh).writerows([("client", "num_examples", "loss"), *rows])
        global_model.load_state_dict(_fedavg(states, [len(s) for s in shares]))
        written.append(out)
    return ExampleJob(folder, MODEL, validation, tuple(written), ids)


def _train(start: Any, x: np.ndarray, y: np.ndarray) -> tuple[dict[str, Any], float]:
    """A copy of ``start`` after :data:`STEPS` full-batch SGD steps: its state dict, last loss."""
    import copy

    import torch

    model = copy.deepcopy(start)
    optimiser = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
    inputs, labels = torch.from_numpy(x), torch.from_numpy(y)
    loss = torch.tensor(0.0)
    for _ in range(STEPS):
        optimiser.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(inputs), labels)
        loss.backward()  # type: ignore[no-untyped-call]
        optimiser.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, float(loss.detach())


def _fedavg(states: list[dict[str, Any]], weights: list[int]) -> dict[str, Any]:
    """The example-weighted mean of the clients' state dicts."""
    total = float(sum(weights))
    return {
        name: sum(s[name] * (w / total) for s, w in zip(states, weights, strict=True))
        for name in states[0]
    }
