"""FedDebug: localize faulty clients by differential testing of neuron activations.

Reference: Gill, Anwar and Gulzar, "FedDebug: Systematic Debugging for Federated Learning
Applications", ICSE 2023 (§ "Faulty client localization"; the authors' artifact,
``fault-localization/utils/faulty_client_localization``). No test data is needed:

1. ``num_inputs`` random inputs of the model's input shape are generated (uniform in [0, 1),
   the range of the job's inputs; seeded by ``seed``).
2. Every client model runs on every input; the output of every ``Conv2d`` and ``Linear`` layer
   (forward hooks, the last ``Linear``'s logits included) is passed through ReLU, min-max
   scaled to [0, 1] per layer and input (as the artifact does), and a neuron is *active* when
   its scaled value exceeds ``threshold``.
3. For each input, among the leave-one-out subsets ``N ∖ {i}`` of the clients still in play,
   the subset with the most *commonly active* neurons — neurons active in every client of the
   subset, ``|∩_{j ∈ N∖{i}} A_j|`` — is taken as the benign clients and the left-out ``i`` as
   faulty. For ``num_faulty > 1`` the found client is removed and the search repeated on the
   rest, ``num_faulty`` times per input (the artifact's sequential localization).
4. Each input votes for the clients it localized; the ``num_faulty`` clients with the most
   votes are flagged (ties broken by client id).

The votes are memoised on the round (:meth:`RoundView.memo`, keyed by the model and every
knob): an identical request is answered from memory. The activations themselves are not kept
(``n × num_inputs × neurons`` bits: 61 MB as booleans for ResNet-18 × 10 clients × 10 inputs).

The artifact first drops neurons active in *all* clients before counting; that subtracts the
same number from every subset's count and does not change which subset wins.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from flstore_core import models
from flstore_core.cache.round_view import RoundView, as_array
from flstore_core.errors import InvalidParamsError
from flstore_core.workloads import Param, Workload, WorkloadResult, register
from flstore_core.workloads.cosine_select import rank_by_score
from flstore_core.workloads.deadline import check
from flstore_core.workloads.estimates import (
    FORWARD_S_PER_NEURON,
    LOCALIZE_S_PER_NEURON,
    Estimate,
    RoundShape,
)

if TYPE_CHECKING:
    import torch
    from torch import nn

Bool = npt.NDArray[np.bool_]
VOTES_MEMO = "feddebug_votes"  # RoundView.memo name of a localization's votes
# float32 copies of one client's activations alive at once in neuron_activations: the layers'
# outputs kept by the hooks, then ReLU, min-max scaling and its temporaries; and bytes per
# client of the boolean activations (the list of each client's, then np.stack's copy). With
# these, inputs × neurons × (4 × FLOAT_COPIES + 2 × clients) bounded the peak RSS measured on
# the digits CNN: 233 MB for 30 clients × 1,000 inputs (estimate 252), 256 MB for 5 × 3,000
# (estimate 283), 104 MB for 10 × 1,000 (estimate 126)
FLOAT_COPIES = 5
BOOL_COPIES = 2


def neuron_activations(model: nn.Module, inputs: torch.Tensor, threshold: float) -> Bool:
    """``(num_inputs, neurons)``: which neurons of every Conv2d/Linear layer are active.

    Active means ``scale(ReLU(out)) > threshold`` with ``scale`` the min-max scaling of one
    layer's output for one input (a constant output scales to 0: nothing active).
    """
    import torch
    from torch import nn

    outputs: list[torch.Tensor] = []

    def keep(_: nn.Module, __: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        outputs.append(out.detach())

    layers = [m for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    hooks = [layer.register_forward_hook(keep) for layer in layers]
    try:
        model.eval()
        with torch.no_grad():
            model(inputs)
    finally:
        for hook in hooks:
            hook.remove()
    active = []
    for out in outputs:
        a = torch.relu(out).flatten(1)
        lo = a.min(dim=1, keepdim=True).values
        span = a.max(dim=1, keepdim=True).values - lo
        scaled = torch.where(span > 0, (a - lo) / torch.where(span > 0, span, 1.0), 0.0)
        active.append((scaled > threshold).numpy())
    return np.concatenate(active, axis=1)


def localize(active: Bool, num_faulty: int = 1) -> tuple[list[list[int]], npt.NDArray[np.int64]]:
    """FedDebug's localization on ``active`` of shape ``(clients, inputs, neurons)``.

    Returns the clients localized on each input (in the order found) and the votes per
    client (on how many inputs it was localized).
    """
    n, num_inputs, _ = active.shape
    per_input: list[list[int]] = []
    votes = np.zeros(n, dtype=np.int64)
    for t in range(num_inputs):
        check(f"localizing on input {t} of {num_inputs}")
        acts = active[:, t, :]
        remaining = list(range(n))
        found: list[int] = []
        for _ in range(num_faulty):
            on = acts[remaining].sum(axis=0)  # in how many remaining clients each neuron is on
            # |∩_{j ∈ R∖{i}} A_j| = #neurons on in every remaining client except possibly i
            common = [int(np.sum(on - acts[i] == len(remaining) - 1)) for i in remaining]
            faulty = remaining[int(np.argmax(common))]  # first best subset in client order
            found.append(faulty)
            remaining.remove(faulty)
        per_input.append(found)
        votes[found] += 1
    return per_input, votes


def random_inputs(shape: tuple[int, ...], num_inputs: int, seed: int) -> torch.Tensor:
    """``num_inputs`` inputs uniform in [0, 1), deterministic in ``seed``."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    return torch.rand((num_inputs, *shape), generator=generator)


def client_votes(
    data: RoundView, num_inputs: int, threshold: float, num_faulty: int, seed: int
) -> tuple[npt.NDArray[np.int64], int]:
    """Votes per client (row order) and neurons per model and input, memoised on the round.

    The votes depend on the round, the model and the knobs only (the inputs are generated from
    the seed): kept on the round (memo ``feddebug_votes``), an identical request runs no model;
    prefetch computes them for the default knobs (:mod:`flstore_core.workloads.artifacts`).
    """
    name = data.context.model_name()

    def localized() -> tuple[npt.NDArray[np.int64], int]:
        inputs = random_inputs(models.INPUT_SHAPES[name], num_inputs, seed)
        model = models.build(name)
        per_client = []
        for i in range(data.n):
            check(f"running client model {i} of {data.n} on {num_inputs} inputs")
            weights = as_array(data.client_weights(i))
            loaded = models.load_vector(model, weights, data.specs)
            per_client.append(neuron_activations(loaded, inputs, threshold))
        active = np.stack(per_client)
        _, votes = localize(active, num_faulty)
        return votes, int(active.shape[2])

    key = f"{name}/{num_inputs}/{threshold!r}/{num_faulty}/{seed}"
    value: tuple[npt.NDArray[np.int64], int] = data.memo(VOTES_MEMO, key, localized)
    return value


def feddebug(
    data: RoundView,
    num_inputs: int = 10,
    threshold: float = 0.003,
    num_faulty: int = 1,
    seed: int = 0,
) -> WorkloadResult:
    """Localize the round's ``num_faulty`` faulty clients by neuron-activation differencing.

    Parameters
    ----------
    data : RoundView
        The round; the job must declare its model (no validation set is needed).
    num_inputs : int, default 10
        Random inputs to test on (the artifact's default).
    threshold : float, default 0.003
        Activation threshold on the min-max scaled outputs (the artifact's default).
    num_faulty : int, default 1
        Faulty clients to localize; at most n − 2.
    seed : int, default 0
        Seed of the random inputs.

    Returns
    -------
    WorkloadResult
        ``flagged`` (the localized clients, most votes first), ``votes`` (client -> inputs on
        which it was localized), ``num_inputs``, ``neurons`` (per model and input).
    """
    # n − num_faulty ≥ 2 clients must remain to compare, and num_faulty ≥ 1: n ≥ 3
    if data.n < 3:
        raise InvalidParamsError(
            f"feddebug compares leave-one-out subsets and needs a round of at least 3 clients "
            f"(one faulty, 2 left to compare): the round has {data.n}; use a round with more "
            f"clients"
        )
    if num_faulty > data.n - 2:
        raise InvalidParamsError(
            f"feddebug compares leave-one-out subsets and needs at least 2 clients left after "
            f"removing the faulty ones: the round has {data.n} clients, use num_faulty <= "
            f"{data.n - 2}"
        )
    votes, neurons = client_votes(data, num_inputs, threshold, num_faulty, seed)
    order = rank_by_score(data.clients, votes.astype(np.float64))
    return WorkloadResult(
        {
            "flagged": order[:num_faulty],
            "votes": {c: int(v) for c, v in zip(data.clients, votes, strict=True)},
            "num_inputs": num_inputs,
            "neurons": neurons,
        }
    )


def estimate(params: Mapping[str, Any], shape: RoundShape) -> Estimate:
    """Memory and time of a localization on a round of ``shape``: every client model runs on
    every input and the boolean activations of all clients are held at once (see
    :data:`FLOAT_COPIES`); the localization compares every remaining client on every input."""
    inputs, faulty, n = int(params["num_inputs"]), int(params["num_faulty"]), shape.clients
    neurons = models.NEURONS.get(shape.model or "") or shape.neurons(
        models.INPUT_SHAPES.get(shape.model or "")
    )
    nbytes = inputs * neurons * (4 * FLOAT_COPIES + BOOL_COPIES * n)
    seconds = inputs * n * neurons * (FORWARD_S_PER_NEURON + faulty * n * LOCALIZE_S_PER_NEURON)
    return Estimate(nbytes, seconds)


WORKLOAD = register(
    Workload(
        name="feddebug",
        cls="round",
        per_client=True,
        description=(
            "Faulty-client localization by differential testing: on random inputs, the "
            "leave-one-out subset with the most commonly active neurons marks the left-out "
            "client faulty; majority vote over inputs."
        ),
        reference="Gill et al. ICSE'23 (FedDebug)",
        run=lambda data, params: feddebug(data, **params),
        estimate=estimate,
        params={
            "num_inputs": Param("int", 10, "random inputs", minimum=1, maximum=10_000),
            "threshold": Param(
                "float",
                0.003,
                "activation threshold on min-max scaled outputs",
                minimum=0.0,
                maximum=1.0,
            ),
            "num_faulty": Param("int", 1, "faulty clients to localize", minimum=1),
            "seed": Param("int", 0, "seed of the random inputs", minimum=0),
        },
    )
)
