"""Rounds wider than one node's cache budget, ingested on a stack of small nodes (shared by the
sharded-stack and packed-stack tests): ten clients of a conv, a BatchNorm counter and a wide
fully connected layer, two of them pulling the other way, and their float64 references."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from flstore_core.client import FLStoreClient
from flstore_core.data.codec import Update
from flstore_core.data.rawfile import write_raw_update
from lambdas.local_runtime.s3_server import LocalS3
from lambdas.local_runtime.stack import LocalStack, StackConfig
from pipelines.ingest import run_ingest

MiB = 1024 * 1024
FLOATS = ("conv.weight", "fc.weight")


@dataclass(frozen=True)
class WideRound:
    """Round 0 of ``job``: ``clients`` updates whose fc layer is ``fc_width`` wide."""

    job: str
    fc_width: int
    seed: int
    bucket: str
    nodes: int = 8
    clients: int = 10
    budget: int = 8 * MiB

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {
            "conv.weight": (64, 32, 3, 3),
            "bn.num_batches_tracked": (),
            "fc.weight": (10, self.fc_width),
        }

    def client_state(self, k: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(self.seed + k)
        out: dict[str, np.ndarray] = {}
        for name, shape in self.shapes.items():
            if name == "bn.num_batches_tracked":
                out[name] = np.array(50 + k, np.int64)
            else:
                centre = 1.0 if k < 8 else -1.0  # two clients pull the other way
                out[name] = rng.normal(centre * 0.01, 0.05, size=shape).astype(np.float32)
        return out

    def rows(self, floats_only: bool) -> np.ndarray:
        """Every client's row in float64: the float parameters (what similarities read) or the
        whole state in stored order."""
        names = [n for n in self.shapes if not floats_only or n in FLOATS]
        return np.stack(
            [
                np.concatenate(
                    [np.asarray(self.client_state(k)[n], np.float64).reshape(-1) for n in names]
                )
                for k in range(self.clients)
            ]
        )

    def post(self, stack: LocalStack, name: str, params: dict[str, Any]) -> dict[str, Any]:
        """The workload on round 0 through the gateway, as a user calls it (the SDK client)."""
        client = FLStoreClient(stack.gateway_url, stack.token)
        answer: dict[str, Any] = client.run(self.job, name, round=0, **params)
        return answer


@contextmanager
def ingested_stack(wide: WideRound, s3_server: LocalS3, drop: Path) -> Iterator[LocalStack]:
    """A stack of ``wide.nodes`` nodes of 512 MB under ``wide.budget`` each, with the round
    ingested by the Beam pipeline, which prefetches its blocks onto their owners."""
    config = StackConfig(
        nodes=wide.nodes,
        replication=2,
        memory_mb=512,
        budget_bytes=wide.budget,
        bucket=wide.bucket,
        s3_endpoint=s3_server.url,
    )
    for k in range(wide.clients):
        update = Update(
            wide.client_state(k), num_examples=20 + 3 * k, job=wide.job, round=0, client=f"c{k}"
        )
        write_raw_update(update, str(drop / f"c{k}.safetensors"))
    with LocalStack(config) as st:
        run_ingest(
            str(drop),
            job=wide.job,
            s3_endpoint=st.s3_endpoint,
            bucket=config.bucket,
            prefetch=st.router,
        )
        yield st
