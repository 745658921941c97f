"""Each node replies with the model plus a node-specific step (no training: tests run it)."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    partition = int(context.node_config["partition-id"])
    weights = msg.content["arrays"]["w"].numpy()
    step = np.random.default_rng(partition).standard_normal(weights.shape).astype(np.float32)
    reply = RecordDict(
        {
            "arrays": ArrayRecord({"w": Array(weights + step)}),
            "metrics": MetricRecord({"num-examples": 10 + partition, "train_loss": 1.0}),
        }
    )
    return Message(content=reply, reply_to=msg)
