"""The request trace the cache policies are replayed on (``benchmarks/cache_policies.py``).

Grounded in the paper's setting, with these defaults (:class:`TraceSetting`): 8 concurrent
jobs, each of 10 of 250 clients a round, half of them digits-CNN sized (38,282 parameters) and
half ResNet-18 sized (11,173,962), a round every 60 s per job, 50 rounds per job. Per job and
round, after the round is committed (and prefetched):

* 4 round-class requests on the latest round: ``cosine_select`` (scheduling) and
  ``malicious_cosine`` (filtering), which the round's Gram answers, and ``fedavg`` and ``krum``
  (aggregation), which need its rows;
* 2 meta requests (``oort_select``) on the job's meta shard;
* 1 ``inference`` on the latest global model (the model shard);
* every 5th round, 1 client-class request over the whole history (``incentive`` or
  ``reputation``, alternately), which the node answers from the meta shard;
* every 10th round, 1 ``contribution_loo`` or ``feddebug`` (alternately) on a uniformly chosen
  older round, which needs that round's rows;
* 2 of the 8 jobs never ask a model workload: they send neither the inference nor the
  contribution/debugging request.

Sizes are the real ones (nothing is scaled down: the replay moves no data): a request's
``need`` bytes are those of the representation it needs (a round's rows ``n × d × 4``, its Gram,
norms and summaries ``n² × 8 + n × 72``, the meta shard's ``512 + 256 × clients × rounds``, the
model shard's ``1024 + 2 × 4d``), ``entry`` the bytes the node's cache entry holds for it
(a round whole: :func:`flstore_core.data.blocks.footprint`), and for a round ``rowless`` the
bytes it keeps once it gave up its rows (its Gram pieces with and without BatchNorm buffers —
both models have them — and distances: :func:`flstore_core.cache.round_data.rowless_footprint`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from flstore_core.cache.round_data import rowless_footprint
from flstore_core.data.blocks import footprint
from flstore_core.routing.placement import meta_shard, model_shard, round_shard

DIGITS_CNN_PARAMS = 38_282  # models.build("digits_cnn") parameters
RESNET18_PARAMS = 11_173_962  # models.build("resnet18_cifar") parameters
GRAM_WORKLOADS = ("cosine_select", "malicious_cosine")
ROWS_WORKLOADS = ("fedavg", "krum")
CLIENT_WORKLOADS = ("incentive", "reputation")
REVISIT_WORKLOADS = ("contribution_loo", "feddebug")
# the trace's workloads that evaluate models (a job that asks none needs no model shard)
MODEL_WORKLOADS = ("inference", *REVISIT_WORKLOADS)


@dataclass(frozen=True)
class TraceSetting:
    """Every knob of the trace (recorded in the benchmark's JSON)."""

    jobs: int = 8
    rounds: int = 50
    clients_per_round: int = 10
    population: int = 250
    round_interval_s: float = 60.0
    jobs_without_models: int = 2
    small_params: int = DIGITS_CNN_PARAMS
    large_params: int = RESNET18_PARAMS
    client_every: int = 5
    revisit_every: int = 10
    window_rounds: int = 10
    seed: int = 0


@dataclass(frozen=True)
class Part:
    """One shard a request reads: its key, the bytes it needs of it, the entry's bytes, the
    bytes and GETs a load of the entry reads from S3, and a round's entry without its rows
    (0 for other shards: they have none to give up)."""

    key: str
    need: int
    entry: int
    s3_bytes: int
    gets: int
    rowless: int = 0


@dataclass(frozen=True)
class Request:
    """One line of the trace."""

    t: float
    job: str
    round: int  # the job's latest round when the request is sent
    workload: str
    cls: str  # round, meta, client, model (the workload's class)
    rounds: list[int]
    needs: str  # rows, gram, meta, model
    parts: list[Part] = field(default_factory=list)
    prefetch: bool = False  # ingestion's load after a commit, not a user's request

    @property
    def need_bytes(self) -> int:
        return sum(p.need for p in self.parts)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Request:
        parts = [Part(**p) for p in obj.get("parts", [])]
        return cls(**{**obj, "parts": parts})


def gram_bytes(n: int) -> int:
    """The Gram (float64), the norms and the per-client summaries of a round of ``n``."""
    return n * n * 8 + n * 72


def round_part(job: str, round_: int, n: int, d: int, needs: str) -> Part:
    rows = n * d * 4
    need = rows if needs == "rows" else gram_bytes(n)
    # a load reads every client's update and the manifest
    return Part(
        str(round_shard(job, round_)), need, footprint(n, d), rows, n + 1, rowless_footprint(n)
    )


def meta_part(job: str, n: int, committed: int) -> Part:
    size = 512 + 256 * n * committed  # JobMeta.nbytes
    return Part(str(meta_shard(job)), size, size, size, 1)


def model_part(job: str, d: int) -> Part:
    size = 1024 + 2 * 4 * d  # GlobalModels.nbytes: the vector and the built module
    return Part(str(model_shard(job)), size, size, 4 * d, 1)


def job_requests(setting: TraceSetting, j: int, rng: np.random.Generator) -> Iterator[Request]:
    """Job ``j``'s requests, in time order: each round's prefetch, then its requests 1 s
    apart."""
    s = setting
    job = f"job-{j}"
    d = s.small_params if j % 2 == 0 else s.large_params
    n = s.clients_per_round
    models_asked = j >= s.jobs_without_models
    offset = j * s.round_interval_s / s.jobs
    for r in range(s.rounds):
        t = r * s.round_interval_s + offset
        meta, model = meta_part(job, n, r + 1), model_part(job, d)
        parts = [round_part(job, r, n, d, "rows"), meta, model]
        yield Request(t, job, r, "prefetch", "prefetch", [r], "prefetch", parts, prefetch=True)
        asks: list[tuple[str, str, str, list[Part], list[int]]] = []
        for name in GRAM_WORKLOADS:
            asks.append((name, "round", "gram", [round_part(job, r, n, d, "gram")], [r]))
        for name in ROWS_WORKLOADS:
            asks.append((name, "round", "rows", [round_part(job, r, n, d, "rows")], [r]))
        asks += [("oort_select", "meta", "meta", [meta], [r])] * 2
        if models_asked:
            asks.append(("inference", "model", "model", [model], [r]))
        if (r + 1) % s.client_every == 0:
            name = CLIENT_WORKLOADS[((r + 1) // s.client_every) % 2]
            asks.append((name, "client", "meta", [meta], list(range(r + 1))))
        if models_asked and (r + 1) % s.revisit_every == 0 and r > 0:
            old = int(rng.integers(0, r))
            name = REVISIT_WORKLOADS[((r + 1) // s.revisit_every) % 2]
            asks.append((name, "round", "rows", [round_part(job, old, n, d, "rows")], [old]))
        for i, (name, cls, needs, p, rounds) in enumerate(asks):
            yield Request(t + 1 + i, job, r, name, cls, rounds, needs, p)


def generate(setting: TraceSetting | None = None) -> list[Request]:
    """The whole trace, every job's requests merged in time order."""
    s = setting or TraceSetting()
    rng = np.random.default_rng(s.seed)
    out = [req for j in range(s.jobs) for req in job_requests(s, j, rng)]
    return sorted(out, key=lambda q: (q.t, q.job))


def working_set(requests: Iterable[Request], window_rounds: int) -> int:
    """The largest sum, over windows of ``window_rounds`` consecutive rounds, of the entry
    bytes of every shard the users' requests of those rounds read (all jobs together)."""
    by_round: dict[int, dict[str, int]] = {}
    for q in requests:
        if q.prefetch:
            continue
        held = by_round.setdefault(q.round, {})
        for p in q.parts:
            held[p.key] = max(held.get(p.key, 0), p.entry)
    best = 0
    last = max(by_round, default=-1)
    for start in range(max(last - window_rounds + 2, 1)):
        window: dict[str, int] = {}
        for r in range(start, start + window_rounds):
            for key, size in by_round.get(r, {}).items():
                window[key] = max(window.get(key, 0), size)
        best = max(best, sum(window.values()))
    return best


def write_trace(requests: Iterable[Request], path: str | Path) -> None:
    """One JSON object a line."""
    with open(path, "w", encoding="utf-8") as fh:
        for q in requests:
            fh.write(json.dumps(q.to_json()) + "\n")


def read_trace(path: str | Path) -> list[Request]:
    """The requests of a file :func:`write_trace` wrote."""
    with open(path, encoding="utf-8") as fh:
        return [Request.from_json(json.loads(line)) for line in fh if line.strip()]
