"""The model, the data and the training loop of flower-app.

- **Model**: ``digits_cnn`` from FLStore's model registry (a small CNN for 1×8×8 digits), the
  architecture FLStore's model-based workloads rebuild from the stored updates.
- **Data**: scikit-learn's bundled digits (nothing is downloaded), scaled to [0, 1]; a
  stratified 20% is held out for the ServerApp's evaluation, the rest is partitioned non-IID:
  each partition draws its label distribution from Dir(α·1) (Hsu, Qi and Brown, 2019) and
  receives an equal number of examples sampled by it.
- **Attack**: a malicious partition flips every label ``y → 9 − y`` (Tolpegin et al., ESORICS
  2020) and otherwise trains like the others.
"""

from __future__ import annotations

import functools

import numpy as np
import numpy.typing as npt
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

from flstore_core import models

MODEL = "digits_cnn"
F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]


def load_model(seed: int | None = None) -> nn.Module:
    """A fresh digits CNN (the same initial weights for the same ``seed``)."""
    return models.build(MODEL, seed=seed)


@functools.cache
def load_split(seed: int) -> tuple[F32, I64, F32, I64]:
    """``(x_train, y_train, x_test, y_test)``: x float32 ``(n, 1, 8, 8)``, y int64."""
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None, :, :]
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.2, random_state=seed, stratify=y
    )
    return x_train, y_train, x_test, y_test


@functools.cache
def partitions(num_partitions: int, alpha: float, seed: int) -> list[I64]:
    """Equal-sized non-IID partitions of the training set (indices), Dirichlet over labels."""
    _, y, _, _ = load_split(seed)
    rng = np.random.default_rng(seed)
    pools = [list(rng.permutation(np.flatnonzero(y == c))) for c in range(10)]
    size = len(y) // num_partitions
    out: list[I64] = []
    for _ in range(num_partitions):
        q = rng.dirichlet(np.full(10, alpha))
        picked: list[int] = []
        while len(picked) < size:
            left = np.array([len(p) for p in pools], dtype=np.float64)
            p = q * (left > 0)
            if p.sum() <= 0:  # this partition's classes ran out: take what is left
                p = left
            picked.append(int(pools[int(rng.choice(10, p=p / p.sum()))].pop()))
        out.append(np.sort(np.asarray(picked, dtype=np.int64)))
    return out


def load_data(
    partition_id: int, num_partitions: int, *, alpha: float, seed: int, flip_labels: bool
) -> tuple[F32, I64]:
    """This partition's training examples (labels flipped for a malicious partition)."""
    x, y, _, _ = load_split(seed)
    share = partitions(num_partitions, alpha, seed)[partition_id]
    labels = 9 - y[share] if flip_labels else y[share]
    return x[share], labels


def train(
    model: nn.Module,
    x: F32,
    y: I64,
    *,
    epochs: int,
    lr: float,
    momentum: float,
    batch_size: int,
    seed: int,
) -> float:
    """Mini-batch SGD; the mean training loss over the last epoch."""
    rng = np.random.default_rng(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    criterion = nn.CrossEntropyLoss()
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    model.train()
    total = 0.0
    for _ in range(epochs):
        total = 0.0
        order = torch.from_numpy(rng.permutation(len(y)))
        for start in range(0, len(y), batch_size):
            batch = order[start : start + batch_size]
            loss = criterion(model(xt[batch]), yt[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(batch)
    return total / max(len(y), 1)


def test(model: nn.Module, x: F32, y: I64) -> tuple[float, float]:
    """``(loss, accuracy)`` of ``model`` on ``(x, y)``."""
    model.eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(x))
        loss = float(nn.functional.cross_entropy(logits, torch.from_numpy(y)))
        accuracy = float((logits.argmax(dim=1).numpy() == y).mean())
    return loss, accuracy
