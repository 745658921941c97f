"""A small, deterministic federated-learning job on scikit-learn digits, written through the store.

Used by ``flstore demo`` and by the tests of the model-based workloads: it trains, with torch,
``digits_cnn`` (:mod:`flstore_core.models`) with FedAvg (McMahan et al., AISTATS 2017) over
clients that hold a non-IID share of ``sklearn.datasets.load_digits`` (bundled with
scikit-learn, nothing is downloaded), one or more of which poison their data by label flipping.

- **Data**: the 1,797 8×8 digits, scaled to [0, 1] and shaped ``(n, 1, 8, 8)``; a stratified
  20% is held out as the job's server-side validation set, the rest is dealt to the clients.
- **Non-IID split** (Hsu, Qi and Brown, "Measuring the Effects of Non-Identical Data
  Distribution for Federated Visual Classification", 2019): every client draws its label
  distribution ``q ~ Dir(α·1)`` (default α = 1: three to five classes make up most of a
  client's data, several are missing) and receives the same number of examples (143 with 10
  clients), sampled by ``q`` without replacement.
- **Training**: ``local_epochs`` (5) epochs of SGD (lr 0.01, momentum 0.9, batches of 10);
  the global model reaches about 90% validation accuracy after 5 rounds of 10 clients.
- **Rounds**: each client starts from the current global model, trains on its data and
  reports its full weights (as Flower does), its
  ``num_examples`` and metrics ``loss`` (mean cross-entropy over all its samples in the last
  local epoch — Oort's statistical utility needs all samples, not the last batch),
  ``loss_sq_mean`` (mean squared per-sample loss, Oort's ``Σ loss² / |B|``) and ``duration_s``
  (measured); the server commits the round and stores the example-weighted FedAvg.
- **Attack**: a malicious client flips every label ``y → 9 − y`` (the label-flipping attack of
  Tolpegin et al., ESORICS 2020, with all source classes flipped) and otherwise trains like
  the others — same data volume, same optimiser, no boosting of its update. Its model is
  near-useless on the validation set (under 10%), while its update is an ordinary one in
  size at first and grows (to about twice a benign norm) as the global model learns what it
  contradicts. In round 0 every model is still near its initialisation and nothing tells it
  apart reliably; from round 2 on (checked on seeds 0–3) the validation-based workloads
  (``accuracy_select``, ``contribution_loo``/``_shapley``, ``fltrust``), Krum and the
  cosine to the round mean single it out, and ``feddebug`` does from round 3.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from flstore_core import models
from flstore_core.data.codec import TensorSpec, Update
from flstore_core.data.manifest import JobSpec
from flstore_core.data.rows import flatten

if TYPE_CHECKING:
    from torch import nn

    from flstore_core.storage.object_store import ObjectStore

MODEL = "digits_cnn"
F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]


@dataclass
class DigitsJob:
    """What :func:`simulate` wrote: the job, its clients, who attacked, how the model did."""

    job: str
    clients: list[str]
    malicious: list[str]
    rounds: int
    accuracy: list[float] = field(default_factory=list)
    """Validation accuracy of the global (FedAvg) model after each round."""
    initial_accuracy: float = 0.0
    num_examples: dict[str, int] = field(default_factory=dict)
    label_counts: dict[str, list[int]] = field(default_factory=dict)
    seconds: float = 0.0


def client_ids(clients: int) -> list[str]:
    """``client-00``, ``client-01``, …"""
    width = max(2, len(str(clients - 1)))
    return [f"client-{i:0{width}d}" for i in range(clients)]


def load_split(seed: int = 0, validation_share: float = 0.2) -> tuple[F32, I64, F32, I64]:
    """Digits as ``(x_train, y_train, x_val, y_val)``; x float32 (n, 1, 8, 8) in [0, 1]."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None, :, :]
    y = digits.target.astype(np.int64)
    x_tr, x_val, y_tr, y_val = train_test_split(
        x, y, test_size=validation_share, random_state=seed, stratify=y
    )
    return x_tr, y_tr, x_val, y_val


def dirichlet_split(
    labels: I64,
    clients: int,
    alpha: float,
    rng: np.random.Generator,
    per_client: int | None = None,
    classes: int = 10,
) -> list[I64]:
    """Equal-sized non-IID shares: client k's labels follow ``q_k ~ Dir(α·1)`` (Hsu et al. 2019).

    Examples (indices into ``labels``) are drawn without replacement, ``per_client`` each
    (default: all of them dealt evenly); when a class runs out, the client's remaining draws
    follow ``q_k`` renormalised over the classes still available.
    """
    pools = [list(rng.permutation(np.flatnonzero(labels == c))) for c in range(classes)]
    per_client = per_client or len(labels) // clients
    shares: list[I64] = []
    for _ in range(clients):
        q = rng.dirichlet(np.full(classes, alpha))
        picked: list[int] = []
        while len(picked) < per_client:
            left = np.array([len(p) for p in pools], dtype=np.float64)
            p = q * (left > 0)
            if p.sum() <= 0:  # q puts no mass on what is left: take what is left uniformly
                p = left
            c = int(rng.choice(classes, p=p / p.sum()))
            picked.append(int(pools[c].pop()))
        shares.append(np.sort(np.asarray(picked, dtype=np.int64)))
    return shares


def deal_shares(
    labels: I64, clients: list[str], iid: set[str], alpha: float, rng: np.random.Generator
) -> list[I64]:
    """Equal shares of ``labels``' indices: uniform samples for ``iid``, Dirichlet for the rest.

    With ``iid`` empty this is exactly :func:`dirichlet_split` over all clients.
    """
    if not iid:
        return dirichlet_split(labels, len(clients), alpha, rng)
    per_client = len(labels) // len(clients)
    free = np.ones(len(labels), dtype=bool)
    out: dict[str, I64] = {}
    for client in clients:
        if client in iid:
            picked = rng.choice(np.flatnonzero(free), per_client, replace=False)
            free[picked] = False
            out[client] = np.sort(picked).astype(np.int64)
    rest = np.flatnonzero(free)
    others = [c for c in clients if c not in iid]
    for client, share in zip(
        others, dirichlet_split(labels[rest], len(others), alpha, rng, per_client), strict=True
    ):
        out[client] = rest[share]
    return [out[c] for c in clients]


def train_local(
    model: nn.Module,
    x: F32,
    y: I64,
    *,
    epochs: int,
    lr: float,
    momentum: float,
    batch_size: int,
    seed: int,
) -> tuple[float, float]:
    """Mini-batch SGD on ``(x, y)``; ``(mean loss, mean squared loss)`` over the last epoch."""
    import torch

    rng = np.random.default_rng(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    loss_fn = torch.nn.CrossEntropyLoss(reduction="none")
    xt = torch.from_numpy(np.ascontiguousarray(x))
    yt = torch.from_numpy(np.ascontiguousarray(y))
    model.train()
    total = total_sq = 0.0
    for _ in range(epochs):
        total = total_sq = 0.0
        order = torch.from_numpy(rng.permutation(len(y)))
        for start in range(0, len(y), batch_size):
            idx = order[start : start + batch_size]
            per_sample = loss_fn(model(xt[idx]), yt[idx])
            opt.zero_grad()
            per_sample.mean().backward()
            opt.step()
            total += float(per_sample.detach().sum())
            total_sq += float((per_sample.detach() ** 2).sum())
    n = max(len(y), 1)
    return total / n, total_sq / n


@dataclass(frozen=True)
class _Clients:
    """The clients of a job, their shares of the training data, and who flips labels."""

    ids: list[str]
    shares: list[I64]
    x: F32
    y: I64
    malicious: set[str]


@dataclass(frozen=True)
class _Training:
    """Local SGD's knobs, the same for every client and round."""

    local_epochs: int
    lr: float
    momentum: float
    batch_size: int
    seed: int


def _job_spec(job: str, training: _Training, *, alpha: float, attacker_iid: bool) -> JobSpec:
    """The job's spec: its model and every knob that made its data and training."""
    return JobSpec(
        job,
        model=MODEL,
        hyperparameters={
            "lr": training.lr,
            "momentum": training.momentum,
            "batch_size": training.batch_size,
            "local_epochs": training.local_epochs,
            "dirichlet_alpha": alpha,
            "attacker_iid": attacker_iid,
            "seed": training.seed,
        },
        description="federated digits_cnn on scikit-learn digits (evaluation.digits_job)",
    )


def _train_clients(
    store: ObjectStore,
    job: str,
    r: int,
    clients: _Clients,
    global_vec: F32,
    specs: list[TensorSpec],
    training: _Training,
) -> list[F32]:
    """Round ``r``: every client trains from the global model and its update is stored, then
    the round is committed; returns the clients' flat weights in client order."""
    entries = []
    vectors = []
    for k, (client, share) in enumerate(zip(clients.ids, clients.shares, strict=True)):
        local = models.load_vector(models.build(MODEL), global_vec, specs)
        y = clients.y[share]
        if client in clients.malicious:
            y = 9 - y  # label flipping: every class mapped to its mirror
        t0 = time.perf_counter()
        loss, loss_sq = train_local(
            local,
            clients.x[share],
            y,
            epochs=training.local_epochs,
            lr=training.lr,
            momentum=training.momentum,
            batch_size=training.batch_size,
            seed=training.seed * 1_000_003 + r * 1009 + k,
        )
        duration = time.perf_counter() - t0
        state = models.state_arrays(local)
        vectors.append(flatten(state))
        entries.append(
            store.put_update(
                job,
                r,
                client,
                Update(
                    state,
                    num_examples=len(share),
                    metrics={"loss": loss, "loss_sq_mean": loss_sq, "duration_s": duration},
                ),
            )
        )
    store.commit_round(job, r, entries)
    return vectors


def _fedavg(shares: list[I64], vectors: list[F32]) -> F32:
    """The example-weighted mean of the clients' flat weights, in float32."""
    weights = np.array([len(s) for s in shares], dtype=np.float64)
    # FedAvg: w = Σ_k (n_k / n) w_k
    mean: F32 = ((weights / weights.sum()).astype(np.float32) @ np.stack(vectors)).astype(
        np.float32
    )
    return mean


def _train_job(
    store: ObjectStore,
    job: str,
    ids: list[str],
    malicious: set[str],
    rounds: int,
    training: _Training,
    *,
    alpha: float,
    attacker_iid: bool,
    progress: Callable[[int, float], None] | None,
) -> DigitsJob:
    """:func:`simulate`'s work: the job's spec, validation set and initial model, then its
    rounds, each a round of client training and its FedAvg global model."""
    x_tr, y_tr, x_val, y_val = load_split(training.seed)
    rng = np.random.default_rng(training.seed)
    shares = deal_shares(y_tr, ids, malicious if attacker_iid else set(), alpha, rng)
    store.put_job_spec(_job_spec(job, training, alpha=alpha, attacker_iid=attacker_iid))
    store.put_validation_set(job, x_val, y_val)
    model = models.build(MODEL, seed=training.seed)
    specs = models.state_specs(model)
    global_state = models.state_arrays(model)
    store.put_initial(job, Update(dict(global_state)))
    out = DigitsJob(
        job,
        ids,
        [c for c in ids if c in malicious],
        rounds,
        initial_accuracy=models.accuracy(model, x_val, y_val),
        num_examples={c: len(s) for c, s in zip(ids, shares, strict=True)},
        label_counts={
            c: np.bincount(y_tr[s], minlength=10).tolist() for c, s in zip(ids, shares, strict=True)
        },
    )
    global_vec = flatten(global_state)
    clients_data = _Clients(ids, shares, x_tr, y_tr, set(out.malicious))
    for r in range(rounds):
        vectors = _train_clients(store, job, r, clients_data, global_vec, specs, training)
        global_vec = _fedavg(shares, vectors)
        global_model = models.load_vector(models.build(MODEL), global_vec, specs)
        store.put_global(job, r, Update(models.state_arrays(global_model)))
        acc = models.accuracy(global_model, x_val, y_val)
        out.accuracy.append(acc)
        if progress is not None:
            progress(r, acc)
    return out


def simulate(
    store: ObjectStore,
    job: str = "digits",
    clients: int = 10,
    rounds: int = 5,
    malicious: Sequence[str] = ("client-09",),
    local_epochs: int = 5,
    seed: int = 0,
    progress: Callable[[int, float], None] | None = None,
    *,
    lr: float = 0.01,
    momentum: float = 0.9,
    batch_size: int = 10,
    alpha: float = 1.0,
    attacker_iid: bool = False,
) -> DigitsJob:
    """Train and store a federated digits job; deterministic given ``seed``.

    Parameters
    ----------
    store : ObjectStore
        Where the job is written (job spec, validation set, initial model, every round's
        updates and manifest, every round's global model).
    job : str, default "digits"
        Job id.
    clients : int, default 10
        Number of clients, named ``client-00`` … (every client takes part in every round).
    rounds : int, default 5
        Number of FedAvg rounds.
    malicious : sequence of str, default ("client-09",)
        Clients that flip their labels ``y → 9 − y``; each must be one of the clients.
    local_epochs : int, default 5
        Local SGD epochs per round.
    seed : int, default 0
        Seeds the split, the initial model and every client's training.
    progress : callable, optional
        Called as ``progress(round, global_accuracy)`` after each round.
    lr, momentum, batch_size, alpha : float, float, int, float
        SGD learning rate and momentum, mini-batch size, Dirichlet concentration.
    attacker_iid : bool, default False
        Give the malicious clients a uniform (IID) sample instead of a Dirichlet share. It
        makes the attack *harder* to see in update space: flipping all ten classes yields an
        update that dominates the round mean (cosine-to-mean then fails) and its harm to the
        aggregate is spread thin (leave-one-out becomes noisy).

    Returns
    -------
    DigitsJob
        The clients, the malicious ids and the global model's accuracy after each round.
    """
    import torch

    t_start = time.perf_counter()
    ids = client_ids(clients)
    unknown = sorted(set(malicious) - set(ids))
    if unknown:
        raise ValueError(f"malicious client {unknown[0]!r} is not one of {ids[0]}…{ids[-1]}")
    threads = torch.get_num_threads()
    # tiny model: a second thread only adds overhead (10 clients x 5 rounds: 12.5 s on one
    # thread, 16.5 s and twice the CPU on two, 7 Dec 2026), and OpenMP's spinning threads
    # slow it many-fold on a host whose cores are busy
    torch.set_num_threads(1)
    training = _Training(local_epochs, lr, momentum, batch_size, seed)
    try:
        out = _train_job(
            store,
            job,
            ids,
            set(malicious),
            rounds,
            training,
            alpha=alpha,
            attacker_iid=attacker_iid,
            progress=progress,
        )
    finally:
        torch.set_num_threads(threads)
    out.seconds = time.perf_counter() - t_start
    return out
