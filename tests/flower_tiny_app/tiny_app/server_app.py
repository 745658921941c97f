"""FedAvg over every node; FLStore stores each round and picks round 2's clients (cosine)."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from flstore_core.client import FLStoreClient
from flstore_core.integrations.flower import flstore_sink, with_flstore

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    strategy = with_flstore(
        FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_available_nodes=3),
        sink=flstore_sink(cfg),
        job=str(cfg["flstore-job"]),
        select_with="cosine_select",
        client=FLStoreClient.from_local(),
        select_k=int(cfg["select-k"]),
    )
    strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord({"w": Array(np.zeros(64, dtype=np.float32))}),
        num_rounds=int(cfg["num-server-rounds"]),
    )
