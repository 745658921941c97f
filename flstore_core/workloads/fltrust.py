"""FLTrust: aggregate the round by trust in a server update computed on a clean root dataset.

Reference: Cao, Fang, Liu and Gong, "FLTrust: Byzantine-robust Federated Learning via Trust
Bootstrapping", NDSS 2021 (Algorithm 2). With ``g_0`` the server's update and ``g_i`` the
clients' updates (deltas ``w_i − base``):

    TS_i  = ReLU(cos(g_i, g_0))                      trust score
    ĝ_i   = g_i · ‖g_0‖ / ‖g_i‖                      magnitude normalised to the server's
    g     = Σ_i TS_i · ĝ_i / Σ_i TS_i                aggregate
    w     = base + α · g                             new global model (α = ``global_lr``)

``g_0`` is obtained as the paper does — the round's base model trained on the root dataset (the
job's validation set) for ``server_epochs`` epochs of mini-batch SGD with ``lr`` — or, when
``server_client`` names an entry of the round, that stored update is ``g_0`` (and that entry is
left out of the aggregation). Dot products and norms come from the round's shared Gram
artifact when ``g_0`` is a round entry; a computed ``g_0`` costs one pass over the matrix.
The paper writes updates as gradients and the step as ``w − α·g``; with updates stored as model
differences the sign flips, the rule is the same.

Trust, norms and the norm scaling are over the model's parameters, as in the paper: the float
trainable parameters (``include_buffers`` adds BatchNorm running statistics), integer tensors
never (:mod:`flstore_core.data.columns`). The returned model is complete: tensors outside those
columns (running statistics by default, ``num_batches_tracked``) take the trust-weighted mean
of the clients' deltas, ``base + α Σ_i TS_i d_i / Σ_i TS_i`` — averaged like weights, without the
parameters' norm scaling — and integer tensors are rounded to the nearest integer.

Training ``g_0`` dominates a request (~8 s for ResNet-18 on 256 images); what trust needs of it
(``g_i·g_0`` and ``‖g_0‖²``) is memoised on the round by the training knobs, the model and the
root dataset's digest, so a request that changes only ``global_lr`` or repeats trains nothing.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from flstore_core import models
from flstore_core.cache.round_data import RoundData, register_columnwise
from flstore_core.cache.round_view import RoundView
from flstore_core.data.codec import slices_of
from flstore_core.data.rows import flat_parts
from flstore_core.errors import InvalidParamsError, NotFoundError
from flstore_core.workloads import INCLUDE_BUFFERS, Param, Workload, WorkloadResult, register
from flstore_core.workloads.evaluation import validation_digest

if TYPE_CHECKING:
    from torch import nn

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
SERVER_MEMO = "server_update"  # RoundView.memo name of what trust needs of a trained g_0


def complement(runs: Sequence[tuple[int, int]], width: int) -> list[tuple[int, int]]:
    """The column ranges of ``[0, width)`` outside the sorted, disjoint ``runs``."""
    out: list[tuple[int, int]] = []
    pos = 0
    for a, b in runs:
        if a > pos:
            out.append((pos, a))
        pos = b
    if pos < width:
        out.append((pos, width))
    return out


def fltrust_weights(dots: F64, sq_norms: F64, server_sq_norm: float) -> tuple[F64, F64]:
    """Trust scores and per-client coefficients ``c_i`` with ``g = Σ c_i g_i``.

    ``dots[i] = g_i·g_0``, ``sq_norms[i] = ‖g_i‖²``. ``c_i = TS_i ‖g_0‖ / (‖g_i‖ Σ_j TS_j)``;
    all zero when no client is trusted.
    """
    norms = np.sqrt(np.maximum(sq_norms, 0.0))
    server_norm = float(np.sqrt(max(server_sq_norm, 0.0)))
    denom = norms * server_norm
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = np.where(denom > 0, dots / np.where(denom > 0, denom, 1.0), 0.0)
    trust = np.maximum(np.clip(cos, -1.0, 1.0), 0.0)  # TS_i = ReLU(cos(g_i, g_0))
    total = float(trust.sum())
    if total <= 0:
        return trust, np.zeros_like(trust)
    with np.errstate(invalid="ignore", divide="ignore"):
        # ĝ_i = g_i ‖g_0‖/‖g_i‖ ; g = Σ TS_i ĝ_i / Σ TS_i
        coef = np.where(norms > 0, trust * server_norm / np.where(norms > 0, norms, 1.0), 0.0)
    return trust, coef / total


def server_update(
    data: RoundView, epochs: int, lr: float, batch_size: int, seed: int
) -> tuple[F32, int]:
    """``g_0 = w − base``: the base model trained on the job's validation set (root dataset),
    and the number of examples it trained on."""
    assert data.base is not None
    # g_0's vector is given its memory (first touch: page faults, 40-110 ms for 45 MB on a VM
    # that hands freed memory back to its host) on another core while this one trains
    g0 = np.empty(data.base.shape, np.float32)
    toucher = threading.Thread(target=g0.fill, args=(0.0,), name="fltrust-g0-touch")
    toucher.start()
    try:
        trained, examples = train_base(data, epochs, lr, batch_size, seed)
    finally:
        toucher.join()
    # w − base tensor by tensor into that vector: the trained weights are never flattened into a
    # vector of their own (flat_parts' float32 of each tensor, then the same float32 subtraction)
    for part, (a, b) in zip(flat_parts(trained, data.specs), slices_of(data.specs), strict=True):
        np.subtract(part, data.base[a:b], out=g0[a:b])
    return g0, examples


def train_base(
    data: RoundView, epochs: int, lr: float, batch_size: int, seed: int
) -> tuple[dict[str, npt.NDArray[np.generic]], int]:
    """The round's base model trained on the job's validation set: its state tensors (views of
    the model's own memory, which they keep alive) and the number of examples."""
    import torch

    assert data.base is not None
    x, y = data.context.validation()
    model: nn.Module = models.load_vector(
        models.blank(data.context.model_name()), data.base, data.specs
    )
    rng = np.random.default_rng(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    loss_fn = torch.nn.CrossEntropyLoss()
    xt, yt = torch.tensor(x), torch.tensor(y)  # copies: the cached arrays are read-only
    model.train()
    # training splits its gradient reductions over torch's threads: g_0's last bits depended
    # on the thread count and even on which thread of the process trained (a node's prefetch
    # and a request differed); on one thread they are the same on any host and thread
    with models.one_torch_thread():
        for _ in range(epochs):
            order = torch.from_numpy(rng.permutation(len(y)))
            for start in range(0, len(y), batch_size):
                idx = order[start : start + batch_size]
                opt.zero_grad()
                loss_fn(model(xt[idx]), yt[idx]).backward()
                opt.step()
    state = model.state_dict()
    return {s.name: state[s.name].detach().numpy() for s in data.specs}, len(y)


def server_trust(
    data: RoundView, epochs: int, lr: float, batch_size: int, seed: int, include_buffers: bool
) -> tuple[F64, float]:
    """What trust needs of the trained ``g_0``: ``g_i·g_0`` for every client and ``‖g_0‖²``.

    ``g_0`` depends on the round's base, the model, the root dataset and the training knobs:
    these n dots and a norm are kept on the round (memo ``server_update``), not the 4 B/param
    ``g_0``; prefetch computes them for the default knobs
    (:mod:`flstore_core.workloads.artifacts`).
    """

    def trained() -> tuple[F64, float]:
        g0, _ = server_update(data, epochs, lr, batch_size, seed)
        return data.dots_with(g0, include_buffers), data.sq_norm_of(g0, include_buffers)

    model_name = data.context.model_name()  # 400s in this order: model, then validation
    x, y = data.context.validation()
    key = (
        f"{model_name}/{validation_digest(x, y)}/{epochs}/{lr!r}/"
        f"{batch_size}/{seed}/{include_buffers}"
    )
    value: tuple[F64, float] = data.memo(SERVER_MEMO, key, trained)
    return value


def fltrust(
    data: RoundView,
    server_client: str | None = None,
    server_epochs: int = 1,
    lr: float = 0.05,
    batch_size: int = 10,
    seed: int = 0,
    global_lr: float = 1.0,
    include_buffers: bool = False,
) -> WorkloadResult:
    """FLTrust aggregate of the round's deltas against a server update ``g_0``.

    Parameters
    ----------
    data : RoundView
        The round; its base model must be stored (updates are deltas ``w_i − base``).
    server_client : str, optional
        A round entry holding the server's update; by default ``g_0`` is computed by training
        the base model on the job's validation set (the job must declare a model and have one).
    server_epochs, lr, batch_size, seed
        Training of ``g_0`` on the root dataset: epochs of mini-batch SGD, learning rate, batch
        size, seed of the shuffling.
    global_lr : float, default 1.0
        ``α`` in ``w = base + α g``.
    include_buffers : bool, default False
        Trust and norm scaling also over BatchNorm running statistics.

    Returns
    -------
    WorkloadResult
        ``scores`` (client -> trust score in [0, 1]), ``flagged`` (clients of trust 0),
        ``weights`` (client -> share of the aggregate, ``TS_i / Σ TS``), ``server_norm``,
        ``server_update`` (``"root_dataset"`` or the entry used) and, when no client is
        trusted, a ``note``; the model is ``base + α g``.
    """
    if not data.is_delta:
        raise InvalidParamsError(
            f"fltrust works on updates relative to the round's base model, and job "
            f"{data.job!r} stores none for round {data.round}: store the initial model "
            "(kind 'initial') and the global model after every round (kind 'global')"
        )
    rows, dots, sq_norms, server_sq, source = _trust_inputs(
        data, server_client, server_epochs, lr, batch_size, seed, include_buffers
    )
    trust, coef = fltrust_weights(dots, sq_norms, server_sq)
    result = _trust_report([data.clients[i] for i in rows], trust, server_sq, source)
    if trust.sum() <= 0:
        result["note"] = "no client update has positive cosine with g_0: the base is unchanged"
        return WorkloadResult(result, model=data.to_weights(data.columnwise("zeros")))
    full = np.zeros(data.n)
    full[rows] = coef
    share = np.zeros(data.n)
    share[rows] = trust / trust.sum()
    # w = base + α g
    model = data.columnwise(
        "fltrust",
        coef=full.tolist(),
        share=share.tolist(),
        include_buffers=include_buffers,
        factor=global_lr,
        add_base=True,
    )
    return WorkloadResult(result, model=model)


def _trust_inputs(
    data: RoundView,
    server_client: str | None,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    include_buffers: bool,
) -> tuple[list[int], F64, F64, float, str]:
    """What trust is computed from: the rows aggregated, ``g_i·g_0`` and ``‖g_i‖²`` for each,
    ``‖g_0‖²``, and where ``g_0`` came from (a round entry, read from the shared Gram, or the
    base trained on the root dataset)."""
    rows = list(range(data.n))
    if server_client is not None:
        if server_client not in data.clients:
            raise NotFoundError(
                f"server_client {server_client!r} is not in round {data.round} of job {data.job!r}"
            )
        s = data.clients.index(server_client)
        rows.remove(s)
        gram = data.gram(True, include_buffers)
        dots, sq_norms, server_sq = gram[rows, s], np.diag(gram)[rows], float(gram[s, s])
        source = server_client
    else:
        dots, server_sq = server_trust(data, epochs, lr, batch_size, seed, include_buffers)
        sq_norms = data.sq_norms(True, include_buffers)
        source = "root_dataset"
    if not rows:
        raise InvalidParamsError("fltrust needs at least one client besides server_client")
    return rows, dots, sq_norms, server_sq, source


def _trust_report(
    clients: list[str], trust: F64, server_sq: float, source: str
) -> dict[str, object]:
    """The result's fields: trust per client, the flagged ones, the aggregate's shares."""
    return {
        "scores": {c: float(t) for c, t in zip(clients, trust, strict=True)},
        "flagged": [c for c, t in zip(clients, trust, strict=True) if t <= 0],
        "weights": {
            c: float(t / trust.sum()) if trust.sum() > 0 else 0.0
            for c, t in zip(clients, trust, strict=True)
        },
        "server_norm": float(np.sqrt(max(server_sq, 0.0))),
        "server_update": source,
    }


def fltrust_step(
    data: RoundData,
    coef: list[float],
    share: list[float],
    include_buffers: bool,
    factor: float,
    add_base: bool = False,
) -> npt.NDArray[np.float32]:
    """``α g``, column by column: the aggregate ``g`` of the deltas is ``Σ coef_i d_i`` over the
    columns trust is measured on and the trust-weighted mean ``Σ TS_i d_i / Σ TS_i``
    (``share``) over the others (buffers). With ``add_base``, the model ``base + α g`` (what
    :meth:`~RoundData.to_weights` makes of ``α g``), in the same array."""
    aggregate = (np.asarray(coef).astype(np.float32) @ data.matrix).astype(np.float32, copy=False)
    weights = np.asarray(share).astype(np.float32)
    for a, b in complement(data.columns.runs(include_buffers), int(data.matrix.shape[1])):
        aggregate[a:b] = weights @ data.matrix[:, a:b]
    # in place, each the float32 operation a new array would get: no second 4 B/param array
    aggregate *= np.float32(factor)
    if add_base and data.base is not None:
        aggregate += data.base
    return aggregate


register_columnwise("fltrust", fltrust_step)


WORKLOAD = register(
    Workload(
        name="fltrust",
        cls="round",
        # g_0 trained on the validation set from the base model; a round entry is just a row
        per_client=lambda params: params.get("server_client") is None,
        description=(
            "FLTrust: trust ReLU(cos(g_i, g_0)) against a server update from the job's "
            "validation set (or a round entry), norm-scaled trust-weighted aggregate; model_key."
        ),
        reference="Cao et al. NDSS'21 (FLTrust)",
        run=lambda data, params: fltrust(data, **params),
        params={
            "server_client": Param(
                "str", None, "round entry to use as the server update g_0", nullable=True
            ),
            "server_epochs": Param("int", 1, "epochs of server training", minimum=1, maximum=100),
            # past ~3.4e38 torch cannot hold the step in float32; past 10 SGD only diverges
            "lr": Param("float", 0.05, "server learning rate", minimum=0.0, maximum=10.0),
            "batch_size": Param("int", 10, "server mini-batch size", minimum=1),
            "seed": Param("int", 0, "seed of the server's shuffling", minimum=0),
            # past 10 the aggregate leaves the clients' scale (past ~3.4e38 float32 itself)
            "global_lr": Param(
                "float", 1.0, "alpha in w = base + alpha g", minimum=0.0, maximum=10.0
            ),
            "include_buffers": INCLUDE_BUFFERS,
        },
    )
)
