"""What a workload's params imply before it runs: the memory and the time of one piece of its
plan (ARCHITECTURE §3, every request's work is bounded before it starts).

A workload whose cost its caller's params can grow without bound (FedDebug's ``num_inputs``,
Shapley's permutations) declares ``estimate(params, shape) -> Estimate``; the router computes
it for the piece of the plan one node runs (a round workload that evaluates client models runs
whole on one node) and refuses the request with a 400 ``over_limit`` when it exceeds a node's
memory or the API's deadline. The others are bounded by the data the planner already sized and
take :func:`cheap`.

The per-unit costs are conservative figures measured on the development machine (2 shared
x86-64 cores, Python 3.11, torch 2.x CPU, one torch thread as a node runs): an estimate should
err towards refusing a request that would have finished, never towards starting one that kills
a node.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from flstore_core.data.codec import TensorSpec

# one utility evaluation (aggregate a subset, load it into the model, score the validation set):
# the digits CNN on the digits job's 360 validation examples took 47 ms (30 clients, 200
# evaluations); ResNet-18 on CIFAR's takes ~1.5 s (contribution_loo's measured figure); a model
# not listed is charged as the largest
EVALUATION_S = {"digits_cnn": 0.05, "digits_bn_cnn": 0.05, "resnet18_cifar": 1.5}
# FedDebug's forward pass: seconds per neuron of one client model per input — 0.23 ms per input
# for the digits CNN's 3,146 neurons with 30 clients held (7.3e-8), doubled
FORWARD_S_PER_NEURON = 1.5e-7
# FedDebug's localization: seconds per neuron per (remaining client)² per faulty client and
# input — 1.2 ms per input for 30 clients × 3,146 neurons (4.2e-10), doubled and rounded up
LOCALIZE_S_PER_NEURON = 1e-9


@dataclass(frozen=True)
class Estimate:
    """Bytes of working memory and seconds one piece of a workload's plan needs."""

    bytes: int
    seconds: float


@dataclass(frozen=True)
class RoundShape:
    """What the router knows of a round before any node is invoked: its clients, its tensors
    (from the manifest) and the job's model (from the job spec, ``None`` when undeclared)."""

    clients: int
    tensors: Sequence[TensorSpec]
    model: str | None = None

    @property
    def params(self) -> int:
        """Values per client update."""
        return sum(math.prod(t.shape) for t in self.tensors)

    def neurons(self, input_shape: Sequence[int] | None) -> int:
        """An upper bound of the outputs of the model's Conv2d and Linear layers for one input
        (FedDebug's neurons): a Linear layer's out-features; a Conv2d's out-channels times the
        input's height × width (a stride or a pooling only shrinks it)."""
        spatial = math.prod(input_shape[1:]) if input_shape and len(input_shape) > 1 else 1
        total = 0
        for t in self.tensors:
            if not t.name.endswith("weight"):
                continue
            if len(t.shape) == 4:
                total += t.shape[0] * spatial
            elif len(t.shape) == 2:
                total += t.shape[0]
        return total

    def evaluation_s(self) -> float:
        """Seconds one model evaluation on the validation set costs (:data:`EVALUATION_S`)."""
        return EVALUATION_S.get(self.model or "", max(EVALUATION_S.values()))


def cheap(_params: Mapping[str, Any], _shape: RoundShape) -> Estimate:
    """The estimate of a workload bounded by the round the planner sized: nothing beyond it."""
    return Estimate(0, 0.0)
