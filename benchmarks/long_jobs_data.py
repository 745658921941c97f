"""The long-job benchmark's data: a job of many summary-sized rounds, written fast.

Each round is what :class:`benchmarks.paper_data.SummaryJob` commits — ``clients`` updates of one
1,024-float tensor stepping from the previous global model, ``num_examples``, ``loss`` and
``duration_s`` metrics, the ingest summaries (``norm``, ``cos_to_mean``, ``update_norm``)
computed as the Flower sink computes them — but only its **manifest** is written: every update
is encoded (:func:`~flstore_core.data.codec.encode_update`: its manifest entry's sha256, sizes
and norm are the real ones), the round's summaries come from
:func:`~flstore_core.workloads.summaries.matrix_scores` on the same rows, and the manifest is
the :class:`~flstore_core.data.manifest.RoundManifest` a commit writes, put with one PUT per
round (many in parallel). The update objects themselves are not stored: 200,000 PUTs to the
local S3 take ~40 minutes on this machine, and the workloads measured (``reputation``,
``incentive``, ``oort_select``: classes ``client`` and ``meta``) read manifests only. A round
workload on this job would answer 404 for the missing objects.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from benchmarks.paper_data import SUMMARY_WIDTH, client_ids
from flstore_core.data import layout
from flstore_core.data.codec import Update, encode_update
from flstore_core.data.columns import job_columns
from flstore_core.data.manifest import RoundManifest, UpdateEntry
from flstore_core.sdk.jobs import create_job
from flstore_core.storage.commit import entry_of, with_summaries
from flstore_core.storage.object_store import ObjectStore
from flstore_core.workloads.summaries import INGEST_SUMMARIES, matrix_scores

WIDTH = SUMMARY_WIDTH  # the summary job's one tensor


class LongJob:
    """Rounds of ``clients`` summary-sized updates of ``job``, made in order (each round steps
    from the previous one's global model, as the summary job's do)."""

    def __init__(self, store: ObjectStore, job: str, clients: int, seed: int = 1) -> None:
        self.store = store
        self.job = job
        self.spec = create_job(store, job)
        self.clients = client_ids(clients)
        self.rng = np.random.default_rng(seed)
        self.weights = self.rng.standard_normal(WIDTH).astype(np.float32)
        self.speed = self.rng.uniform(0.5, 2.0, clients)  # each client's pace

    def manifest(self, round_: int) -> RoundManifest:
        """Round ``round_``'s manifest (and the global model moves on)."""
        rng = self.rng
        step = rng.standard_normal(WIDTH).astype(np.float32) * np.float32(0.01)
        noise = rng.standard_normal((len(self.clients), WIDTH)).astype(np.float32)
        sign = np.where(np.arange(len(self.clients)) % 10 == 9, -1.0, 1.0).astype(np.float32)
        rows = self.weights + sign[:, None] * step + noise * np.float32(0.005)
        entries: dict[str, UpdateEntry] = {}
        for k, client in enumerate(self.clients):
            update = Update(
                {"w": rows[k]},
                num_examples=50 + (k * 7) % 90,
                metrics={
                    "loss": float(2.0 * math.exp(-round_ / 20) * (1 + 0.3 * rng.random())),
                    "duration_s": float(10.0 * self.speed[k] * (1 + 0.1 * rng.random())),
                },
            )
            update.job, update.round, update.client = self.job, round_, client
            encoded = encode_update(update, self.spec.precision)
            entries[client] = entry_of(client, layout.update_key(self.job, round_, client), encoded)
            specs = encoded.specs
        columns = job_columns(specs, self.spec)
        scores = matrix_scores(self.clients, rows.copy(), self.weights.copy(), columns)
        self.weights = (self.weights + step).astype(np.float32)
        updates = with_summaries(entries, scores.summaries(INGEST_SUMMARIES))
        return RoundManifest(self.job, round_, self.spec.precision, tuple(specs), updates)

    def write(self, rounds: int, log: Callable[[str], None] = print, workers: int = 16) -> int:
        """Commit rounds ``0 … rounds − 1``; returns the manifests' bytes."""
        total = 0

        def put(manifest: RoundManifest) -> int:
            body = manifest.to_json()
            self.store.put_object(
                layout.manifest_key(self.job, manifest.round), body, "application/json"
            )
            return len(body)

        with ThreadPoolExecutor(workers) as pool:
            batch: list[RoundManifest] = []
            for r in range(rounds):
                batch.append(self.manifest(r))
                if len(batch) == 64 or r == rounds - 1:
                    total += sum(pool.map(put, batch))
                    batch = []
                    if (r + 1) % 500 == 0 or r == rounds - 1:
                        log(f"  {self.job}: {r + 1} rounds committed ({total / 1e6:.1f} MB)")
        return total
