"""flower-app's ClientApp: train the global model on this node's partition of the digits."""

from __future__ import annotations

import time

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from flower_app.task import load_data, load_model, load_split, test, train

app = ClientApp()


def _is_malicious(context: Context) -> bool:
    """The last ``malicious-clients`` partitions attack (label flipping)."""
    partition_id = int(context.node_config["partition-id"])
    num_partitions = int(context.node_config["num-partitions"])
    return partition_id >= num_partitions - int(context.run_config["malicious-clients"])


@app.train()
def train_handler(msg: Message, context: Context) -> Message:
    """Train the received model for ``local-epochs`` epochs and send it back."""
    cfg = context.run_config
    partition_id = int(context.node_config["partition-id"])
    num_partitions = int(context.node_config["num-partitions"])
    seed = int(cfg["seed"])
    x, y = load_data(
        partition_id,
        num_partitions,
        alpha=float(cfg["dirichlet-alpha"]),
        seed=seed,
        flip_labels=_is_malicious(context),
    )
    server_round = int(msg.content["config"]["server-round"])
    model = load_model()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    start = time.perf_counter()
    train_loss = train(
        model,
        x,
        y,
        epochs=int(cfg["local-epochs"]),
        lr=float(cfg["lr"]),
        momentum=float(cfg["momentum"]),
        batch_size=int(cfg["batch-size"]),
        seed=seed * 1_000_003 + server_round * 1009 + partition_id,
    )
    metrics = MetricRecord(
        {
            "train_loss": train_loss,
            "train_time": time.perf_counter() - start,
            "num-examples": len(y),
            "partition-id": partition_id,
        }
    )
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate_handler(msg: Message, context: Context) -> Message:
    """Evaluate the received model on the held-out digits."""
    _, _, x_test, y_test = load_split(int(context.run_config["seed"]))
    model = load_model()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    loss, accuracy = test(model, x_test, y_test)
    metrics = MetricRecord({"eval_loss": loss, "eval_acc": accuracy, "num-examples": len(y_test)})
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)
