"""The novel benchmark's data and requests: a round of ``clients`` updates of one model
stepping from its initial state, a meta job of many tiny rounds, and for each workload a
stream of params no request has used before (``benchmarks/novel.py`` runs them)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import numpy as np

BIG = "novel-round"
META = "novel-meta"
BUCKET = "novel"
ROUND = 0


def client_ids(n: int) -> list[str]:
    return [f"client-{k:02d}" for k in range(n)]


def initial_state(model: str) -> dict[str, np.ndarray]:
    from flstore_core import models

    net = models.build(model, seed=0)
    return {k: v.detach().cpu().numpy().copy() for k, v in net.state_dict().items()}


def client_state(base: dict[str, np.ndarray], k: int, direction: dict[str, np.ndarray]) -> Any:
    """The base plus a shared step and the client's own noise; every tenth client steps the
    other way. BatchNorm statistics stay valid (variances positive), counters advance by one."""
    from flstore_core.data.codec import Update

    rng = np.random.default_rng(1000 + k)
    sign = -3.0 if k % 10 == 9 else 1.0
    out: dict[str, np.ndarray] = {}
    for name, w in base.items():
        if not np.issubdtype(w.dtype, np.floating):
            out[name] = w + 1
        elif name.endswith("running_var"):
            out[name] = (w * (1.0 + 0.05 * np.abs(rng.standard_normal(w.shape)))).astype(w.dtype)
        else:
            noise = rng.standard_normal(w.shape, dtype=np.float32)
            out[name] = (w + 0.01 * (sign * direction[name] + noise)).astype(w.dtype)
    return Update(
        out,
        num_examples=100 + 37 * (k % 11),
        metrics={"loss": round(0.5 + 0.01 * k, 4), "duration_s": round(20.0 + 3.0 * k, 2)},
    )


def write_model_job(store: Any, job: str, model: str, clients: int, validation: int) -> float:
    """The model job: spec, validation set, initial model (the base), one committed round and
    its global model. Returns the time it took (ms)."""
    from flstore_core import models
    from flstore_core.data.codec import Update
    from flstore_core.sdk.jobs import create_job

    t0 = time.perf_counter()
    rng = np.random.default_rng(7)
    shape = models.INPUT_SHAPES[model]
    x = rng.standard_normal((validation, *shape), dtype=np.float32)
    y = rng.integers(0, models.NUM_CLASSES[model], validation).astype(np.int64)
    create_job(store, job, model=model, validation=(x, y))
    base = initial_state(model)
    store.put_initial(job, Update(dict(base)))
    direction = {
        n: np.random.default_rng(5).standard_normal(w.shape, dtype=np.float32)
        for n, w in base.items()
        if np.issubdtype(w.dtype, np.floating)
    }
    entries = []
    for k, client in enumerate(client_ids(clients)):
        entries.append(store.put_update(job, ROUND, client, client_state(base, k, direction)))
    store.commit_round(job, ROUND, entries)
    store.put_global(job, ROUND, Update(dict(base)))
    return (time.perf_counter() - t0) * 1000


def write_meta_job(store: Any, job: str, rounds: int, clients: int) -> tuple[float, list[str]]:
    """A job of a small model for the meta and client workloads: ``rounds`` rounds, each with
    a random half of ``clients`` clients, loss and duration metrics. Returns the time it took
    (ms) and the clients that took part."""
    from flstore_core.data.codec import Update

    t0 = time.perf_counter()
    rng = np.random.default_rng(11)
    ids = [f"c{k:03d}" for k in range(clients)]
    took_part: set[str] = set()
    base = rng.standard_normal(256).astype(np.float32)
    store.put_initial(job, Update({"w": base}))
    for r in range(rounds):
        chosen = sorted(rng.choice(clients, size=max(3, clients // 2), replace=False))
        entries = []
        for k in chosen:
            w = base + 0.05 * rng.standard_normal(256).astype(np.float32)
            update = Update(
                {"w": w.astype(np.float32)},
                num_examples=int(50 + k),
                metrics={
                    "loss": float(round(1.0 / (1 + r) + 0.01 * k, 4)),
                    "duration_s": float(round(5.0 + (k % 7), 2)),
                },
            )
            entries.append(store.put_update(job, r, ids[k], update))
            took_part.add(ids[k])
        store.commit_round(job, r, entries)
        base = base + 0.01
        store.put_global(job, r, Update({"w": base.astype(np.float32)}))
    return (time.perf_counter() - t0) * 1000, sorted(took_part)


# ---------------------------------------------------------------------- new params


def novel_params(name: str, clients: list[str], repetitions: int) -> Iterator[dict[str, Any]]:
    """Params for repetition 0, 1, … of a workload, each set used by no earlier repetition (a
    workload whose params cannot vary yields the same, see :data:`HOW_NEW`)."""
    n = len(clients)
    pairs = [(a, b) for a in range(n) for b in range(a + 1, n)]
    for i in range(repetitions):
        if name == "fedavg":
            a, b = pairs[(3 * i) % len(pairs)]
            subset = [c for j, c in enumerate(clients) if j not in (a, b)]
            yield {"clients": subset, "weighted": i % 2 == 0}
        elif name == "trimmed_mean":
            beta = round(0.12 + 0.071 * (i % 5) + 0.0007 * i, 4)
            if i % 2:
                yield {"beta": beta, "clients": [c for j, c in enumerate(clients) if j != i % n]}
            else:
                yield {"beta": beta}
        elif name == "krum":
            f_max = (n - 3) // 2
            combos = [(f, b) for b in (False, True) for f in range(f_max, -1, -1)]
            f, buffers = combos[i % len(combos)]
            yield {"f": f, "include_buffers": buffers}
        elif name == "multi_krum":
            kept = None if i % 2 == 0 else [c for j, c in enumerate(clients) if j != i % n]
            m_n = n if kept is None else n - 1
            f = 1 + i % max(1, (m_n - 3) // 2)
            m = max(1, m_n - f - 1 - (i // 2) % 3)
            params: dict[str, Any] = {"f": f, "m": m}
            if kept is not None:
                params["clients"] = kept
            yield params
        elif name == "cosine_select":
            yield {"k": 2 + i % (n - 2), "use_delta": (i // (n - 2)) % 2 == 0}
        elif name == "accuracy_select":
            yield {"k": [2, 4, 5, 6, 7, 1, 8, 9, 3, 10][i % 10]}
        elif name == "malicious_cosine":
            yield {"threshold": round(-0.2 + 0.0731 * i, 4)}
        elif name == "kmeans":
            yield {"k": 2 + i % min(3, n - 1), "seed": 100 + i}
        elif name == "cfl_split":
            yield {"eps_1": round(0.4 + 0.013 * (i + 1), 4), "eps_2": round(1.6 + 0.017 * i, 4)}
        elif name == "fltrust":
            yield {"seed": 1 + i, "lr": round(0.04 + 0.003 * i, 4)}
        elif name == "personalize":
            yield {
                "client": clients[(3 * i + 1) % n],
                "peers": 2 + i % 3,
                "by": "similarity" if i % 2 == 0 else "accuracy",
            }
        elif name == "contribution_loo":
            if i == 2:
                return  # its only param has two values: two requests, both new
            yield {"weighted": i % 2 == 0}
        elif name == "contribution_shapley":
            yield {"method": "gtg", "seed": 1 + i, "min_permutations": 2, "max_permutations": 2}
        elif name == "feddebug":
            yield {"seed": 1 + i, "num_inputs": 8}
        elif name == "oort_select":
            yield {"k": 3 + i % 4, "seed": 1 + i}
        elif name == "incentive":
            yield {"budget": round(100.0 + 7.5 * (i + 1), 2)}
        elif name == "reputation":
            yield {"decay": round(0.8 - 0.013 * (i + 1), 4)}
        elif name == "inference":
            yield {"seed": i}  # replaced by a batch of inputs (see Bench.params_for)
        else:
            raise SystemExit(f"no novel params for workload {name!r}: add it to novel_params")
