"""FedAvg: the example-weighted average of a round's client models.

Reference: McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized
Data", AISTATS 2017 — ``w = Σ_k (n_k / n) w_k`` with ``n_k`` the client's examples.

Buffers: every tensor of the state dict is averaged this way, not only the trainable
parameters — BatchNorm's running statistics get the same example-weighted mean, and integer
tensors (``num_batches_tracked``) the weighted mean rounded to the nearest integer (``np.rint``,
halves to even) in their own dtype. The result is a complete state dict, as Flower's FedAvg
returns (``aggregate_arrayrecords`` averages every array with the same weights) and as a
PyTorch user loads with ``load_state_dict``; Flower leaves an averaged counter as a float,
which ``load_state_dict`` would truncate (10.75 → 10), hence the rounding. Which tensors the
*similarity* workloads read is another matter: :mod:`flstore_core.data.columns`.
"""

from __future__ import annotations

import numpy as np

from flstore_core.cache.round_view import RoundView, Vector
from flstore_core.workloads import Param, Workload, WorkloadResult, register
from flstore_core.workloads.subset import CLIENTS_PARAM, client_rows


def fedavg(
    data: RoundView, weighted: bool = True, clients: list[str] | None = None
) -> WorkloadResult:
    """Average the round's models, weighted by ``num_examples`` unless ``weighted`` is false.

    Every tensor is averaged, buffers included; integer tensors are rounded to the nearest
    integer (module docstring). ``clients`` restricts the average to those clients (a subset
    of the round, :mod:`flstore_core.workloads.subset`): the others get weight 0.
    """
    rows = client_rows(data, clients)
    mask = np.ones(data.n, bool)
    if rows is not None:
        mask = np.zeros(data.n, bool)
        mask[rows] = True
    examples = np.where(mask, data.num_examples, 0)
    weights = examples.astype(np.float64) if weighted else mask.astype(np.float64)
    if weights.sum() <= 0:  # every client reported 0 examples: fall back to the plain mean
        weights = mask.astype(np.float64)

    # averaging deltas and adding the base equals averaging the models: Σ w_i (b + d_i) / Σ w_i
    def model() -> Vector:
        return data.to_weights(data.weighted_mean(weights))

    members = [c for c, m in zip(data.clients, mask, strict=True) if m]
    share = dict(zip(data.clients, weights / weights.sum(), strict=True))
    return WorkloadResult(
        {
            "clients": members,
            "weights": {c: float(share[c]) for c in members},
            "total_examples": int(examples.sum()),
        },
        model=model,
    )


WORKLOAD = register(
    Workload(
        name="fedavg",
        cls="round",
        description="Example-weighted average of the round's client models; returns model_key.",
        reference="McMahan et al. 2017",
        run=lambda data, params: fedavg(data, **params),
        params={
            "weighted": Param("bool", True, "weight clients by num_examples"),
            "clients": CLIENTS_PARAM,
        },
    )
)
