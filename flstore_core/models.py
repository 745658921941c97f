"""The model registry: architectures defined in torch, named in ``job.json`` (ARCHITECTURE §5).

``build(name)`` returns a fresh :class:`torch.nn.Module` whose state-dict names and shapes are
what the updates of a job using that model carry, so a row of a round matrix (or any weights
vector) can be loaded back into a runnable model with :func:`load_vector`. torch is imported
lazily: nothing else in ``flstore_core`` needs it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from flstore_core.data.codec import TensorSpec, slices_of
from flstore_core.errors import InvalidParamsError, ValidationError

if TYPE_CHECKING:
    import torch
    from torch import nn

_BUILDERS: dict[str, Callable[[], nn.Module]] = {}
_STATE_NAMES: dict[str, tuple[str, ...]] = {}
INPUT_SHAPES: dict[str, tuple[int, ...]] = {
    "digits_cnn": (1, 8, 8),
    "digits_bn_cnn": (1, 8, 8),
    "resnet18_cifar": (3, 32, 32),
}
NUM_CLASSES = {"digits_cnn": 10, "digits_bn_cnn": 10, "resnet18_cifar": 10}
# outputs of every Conv2d and Linear layer for one input (FedDebug's neurons), counted by a
# forward pass (tests/unit/test_models.py keeps them true). The router's request bounds read
# them without torch; the bound from the tensors alone ignores strides and pooling, 8x too
# high for ResNet-18 (4.9M against 614,410), which refused FedDebug's default request on it
NEURONS = {"digits_cnn": 3146, "digits_bn_cnn": 1546, "resnet18_cifar": 614410}


def names() -> list[str]:
    """Registered model names."""
    return sorted(INPUT_SHAPES)


def build(name: str, seed: int | None = None) -> nn.Module:
    """A fresh model of architecture ``name`` (deterministic when ``seed`` is given)."""
    import torch

    if name not in INPUT_SHAPES:
        raise ValidationError(f"unknown model {name!r}; known models: {', '.join(names())}")
    if not _BUILDERS:
        _register_builders()
    if seed is not None:
        torch.manual_seed(seed)
    return _BUILDERS[name]()


def blank(name: str) -> nn.Module:
    """A model of architecture ``name`` with uninitialised tensors, for :func:`load_vector` to
    fill: every state-dict entry is overwritten by a load, so the random initialisation
    :func:`build` runs (~50 ms for ``resnet18_cifar``'s 11.2M parameters) would be thrown away.
    Built on the meta device (shapes only), then given real, uninitialised memory."""
    import torch

    if name not in INPUT_SHAPES:
        raise ValidationError(f"unknown model {name!r}; known models: {', '.join(names())}")
    if not _BUILDERS:
        _register_builders()
    with torch.device("meta"):
        model = _BUILDERS[name]()
    return model.to_empty(device="cpu")


def state_specs(model: nn.Module) -> list[TensorSpec]:
    """Tensor specs (names, dtypes, shapes) of a model's state dict, in order."""
    from flstore_core.data.codec import dtype_name

    return [
        TensorSpec(k, dtype_name(np.dtype(str(v.dtype).removeprefix("torch."))), tuple(v.shape))
        for k, v in model.state_dict().items()
    ]


def state_arrays(model: nn.Module) -> dict[str, npt.NDArray[Any]]:
    """The model's state dict as numpy arrays (the form of an
    :class:`~flstore_core.data.codec.Update`)."""
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def state_names(name: str) -> tuple[str, ...]:
    """The state-dict names of registry model ``name``, in state-dict order: the canonical tensor
    order of a job that declares it (ARCHITECTURE §2). Built once per process (needs torch)."""
    if name not in _STATE_NAMES:
        _STATE_NAMES[name] = tuple(build(name).state_dict())
    return _STATE_NAMES[name]


def check_names(model_names: Sequence[str], specs: Sequence[TensorSpec]) -> None:
    """Raise :class:`InvalidParamsError` naming the first tensor that is in the model
    (``model_names``, its state-dict names) but not in ``specs``, or the reverse; order aside."""
    have = {s.name for s in specs}
    names = set(model_names)
    only_model = [n for n in model_names if n not in have]
    only_specs = [s.name for s in specs if s.name not in names]
    if only_model or only_specs:
        which = (
            f"tensor {only_model[0]!r} of the model is missing from the updates"
            if only_model
            else f"tensor {only_specs[0]!r} of the updates is not in the model"
        )
        raise InvalidParamsError(
            f"the job's updates do not match its model: {which}; declare the model the clients "
            "train (flstore job create J --model NAME)"
        )


def load_vector(
    model: nn.Module, vector: npt.NDArray[Any], specs: Sequence[TensorSpec], share: bool = False
) -> nn.Module:
    """Load a flattened weights vector (a round-matrix row laid out by ``specs``) into ``model``.

    Tensors are matched by name, whatever order ``specs`` lists them in (the ``safetensors``
    library stores them sorted by name, a model's state dict in registration order); the names
    must be the model's, and the error names the first tensor that is not.

    With ``share`` the model's float tensors become views of ``vector`` (when it is writable
    float32; a read-only one is copied, as torch wants writable memory) instead of copies: no
    4 B/param copy (~60 ms for ResNet-18, far more on a busy host). Only for a model that only
    evaluates: training it would write into ``vector``.
    """
    import torch

    state = model.state_dict()
    check_names(list(state), specs)
    new_state = {}
    for spec, (a, b) in zip(specs, slices_of(specs), strict=True):
        chunk = np.asarray(vector[a:b]).reshape(spec.shape)
        target = state[spec.name]
        if tuple(target.shape) != spec.shape:
            raise InvalidParamsError(
                f"tensor {spec.name!r} has shape {list(spec.shape)} in the updates but "
                f"{list(target.shape)} in the model"
            )
        if target.dtype.is_floating_point:
            values = np.ascontiguousarray(chunk, np.float32)
            if share and not values.flags.writeable:
                values = values.copy()
            new_state[spec.name] = torch.from_numpy(values).to(target.dtype)
        else:
            new_state[spec.name] = torch.from_numpy(np.asarray(np.rint(chunk), dtype=np.int64)).to(
                target.dtype
            )
    # assign: the module takes these tensors (views of the vector) rather than copying them
    model.load_state_dict(new_state, assign=share)
    return model


# parameters × inputs under which a forward pass runs on one torch thread: splitting a pass
# over threads costs more in synchronisation than it saves on a busy host (measured on 2 shared
# cores, load average ~16: digits_cnn, 38k parameters, on its 360 validation inputs — 1.4e7 —
# 24-56 ms on one thread, 190-220 ms on two; load average ~4: resnet18_cifar, 1.1e7 parameters,
# on 16 inputs — 1.8e8 — 0.12-0.15 s on one thread, 0.32-1.47 s on two; on 64, 0.62-0.67 s
# against 1.27-1.76 s; on 256 — 2.9e9 — 3.5-3.8 s against 4.4-5.0 s). The logits were the same
# bits on one thread and two in each case. Past it (a validation set of over ~350 CIFAR images
# for ResNet-18) a pass keeps the process's thread count
SMALL_PASS = 4e9

# torch.set_num_threads sets the *calling* thread's count (OpenMP's nthreads ICV is per thread):
# a thread that has run a parallel pass keeps its own count whatever another thread sets
_threads = threading.local()


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """Run the block on one torch intra-op thread (reentrant; per thread: each thread that enters
    sets its own count to one and restores its own on leaving the outermost block).

    The count is the calling thread's, not the process's: with one count for the process, set by
    the first thread to enter, a second thread entering meanwhile kept its own two threads (two
    cache nodes in one process, the prefetch-artifacts test: one node trained fltrust's ``g_0``
    on two threads while the other evaluated a model, in about one run in six)."""
    import torch

    depth = getattr(_threads, "depth", 0)
    if depth == 0:
        _threads.saved = torch.get_num_threads()
        if _threads.saved != 1:
            torch.set_num_threads(1)
    _threads.depth = depth + 1
    try:
        yield
    finally:
        _threads.depth -= 1
        if _threads.depth == 0 and _threads.saved != 1:
            torch.set_num_threads(_threads.saved)


def predict(
    model: nn.Module, x: npt.NDArray[np.float32], batch: int = 512
) -> npt.NDArray[np.int64]:
    """Class predictions of ``model`` on ``x`` (evaluation mode; inference mode: no autograd
    bookkeeping at all, the same values as ``no_grad``); a small pass (``SMALL_PASS``) on one
    thread."""
    import torch

    model.eval()
    out = []
    work = len(x) * sum(p.numel() for p in model.parameters())
    with one_torch_thread() if work < SMALL_PASS else nullcontext(), torch.inference_mode():
        for i in range(0, len(x), batch):
            logits = model(torch.from_numpy(np.array(x[i : i + batch], dtype=np.float32)))
            out.append(logits.argmax(dim=1).numpy())
    return np.concatenate(out).astype(np.int64) if out else np.zeros(0, np.int64)


def accuracy(model: nn.Module, x: npt.NDArray[np.float32], y: npt.NDArray[np.int64]) -> float:
    """Fraction of ``x`` that ``model`` classifies as ``y``."""
    if len(y) == 0:
        return 0.0
    return float((predict(model, x) == y).mean())


def _register_builders() -> None:
    """Register every architecture's constructor (torch imported here, on first use)."""
    _register_digits()
    _register_resnet()


def _register_digits() -> None:
    """The small CNNs for scikit-learn's 8×8 digits: ``digits_cnn`` and ``digits_bn_cnn``."""
    import torch
    from torch import nn

    class DigitsCNN(nn.Module):
        """A small CNN for 1×8×8 digits (scikit-learn's ``load_digits``), 10 classes."""

        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
            self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
            self.fc1 = nn.Linear(32 * 4 * 4, 64)
            self.fc2 = nn.Linear(64, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = torch.relu(self.conv1(x))
            x = torch.max_pool2d(torch.relu(self.conv2(x)), 2)
            x = torch.relu(self.fc1(x.flatten(1)))
            return self.fc2(x)  # type: ignore[no-any-return]

    class DigitsBNCNN(nn.Module):
        """A small BatchNorm CNN for 1×8×8 digits, 10 classes: conv → BN → ReLU twice, then
        max-pool and a linear layer (3,842 parameters).

        Its state dict has what real BatchNorm jobs carry (``running_mean``, ``running_var``
        and the integer ``num_batches_tracked`` per BN layer) at a size that trains in
        milliseconds, so tests can run a BatchNorm job end to end; convolutions have no bias,
        as is usual before BatchNorm (and as in ``resnet18_cifar``).
        """

        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(1, 8, 3, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(8)
            self.conv2 = nn.Conv2d(8, 16, 3, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(16)
            self.fc = nn.Linear(16 * 4 * 4, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = torch.relu(self.bn1(self.conv1(x)))
            x = torch.max_pool2d(torch.relu(self.bn2(self.conv2(x))), 2)
            return self.fc(x.flatten(1))  # type: ignore[no-any-return]

    _BUILDERS["digits_cnn"] = DigitsCNN
    _BUILDERS["digits_bn_cnn"] = DigitsBNCNN


def _register_resnet() -> None:
    """ResNet-18 for CIFAR-sized inputs: ``resnet18_cifar``."""
    import torch
    from torch import nn

    class BasicBlock(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.shortcut = nn.Sequential()
            if stride != 1 or cin != cout:
                self.shortcut = nn.Sequential(
                    nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
                )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = torch.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            return torch.relu(out + self.shortcut(x))

    class ResNet18Cifar(nn.Module):
        """ResNet-18 for 3×32×32 inputs (3×3 stem, no max-pool), 10 classes: 11.2M params."""

        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(64)
            layers = []
            cin = 64
            for i, cout in enumerate((64, 128, 256, 512)):
                stride = 1 if i == 0 else 2
                layers.append(
                    nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1))
                )
                cin = cout
            self.layer1, self.layer2, self.layer3, self.layer4 = layers
            self.linear = nn.Linear(512, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = torch.relu(self.bn1(self.conv1(x)))
            out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
            out = torch.nn.functional.adaptive_avg_pool2d(out, 1).flatten(1)
            return self.linear(out)  # type: ignore[no-any-return]

    _BUILDERS["resnet18_cifar"] = ResNet18Cifar
