"""FedDebug's request estimate on real model shapes: the neuron counts the router reads without
torch are the ones a forward pass counts, and a default request on a ResNet-18 round is within
the request bounds (the tensors-only bound refused it as 78.6 s of work)."""

from __future__ import annotations

import pytest

from flstore_core import models
from flstore_core.config import REQUEST_DEADLINE_S
from flstore_core.data.codec import TensorSpec
from flstore_core.workloads import get
from flstore_core.workloads.estimates import RoundShape
from flstore_core.workloads.feddebug import estimate


def resnet_specs() -> list[TensorSpec]:
    return models.state_specs(models.build("resnet18_cifar"))


@pytest.mark.parametrize("name", models.names())
def test_the_neuron_table_is_what_a_forward_pass_counts(name: str) -> None:
    import torch

    from flstore_core.workloads.feddebug import neuron_activations

    model = models.build(name)
    x = torch.zeros((1, *models.INPUT_SHAPES[name]))
    assert models.NEURONS[name] == neuron_activations(model, x, 0.5).shape[1]


def test_a_default_feddebug_request_on_a_resnet18_round_fits_the_deadline() -> None:
    shape = RoundShape(10, resnet_specs(), "resnet18_cifar")
    params = get("feddebug").validate({"num_faulty": 1})
    # 10 clients x 10 inputs x 614,410 neurons: ~10 s by the calibrated per-neuron cost, where
    # the whole-workload run measured 1.6-2.4 s on the baselines
    assert estimate(params, shape).seconds < REQUEST_DEADLINE_S.default_int
