"""flower-app's ServerApp: FedAvg over every node, every round handed to FLStore."""

from __future__ import annotations

import warnings

from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from flower_app.task import load_model, load_split, test
from flstore_core.integrations.flower import flstore_sink, with_flstore

# Ray's driver (the simulation process this ServerApp runs in) warns, as it starts the
# ClientApp actors, that it will stop overriding the accelerator env vars when num_gpus=0:
# this app trains on CPU, so the change does not concern it
warnings.filterwarnings("ignore", category=FutureWarning, module=r"ray\._private\.worker")

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run ``num-server-rounds`` rounds of FedAvg, evaluating on the held-out digits."""
    cfg = context.run_config
    seed = int(cfg["seed"])
    model = load_model(seed)
    _, _, x_test, y_test = load_split(seed)

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model.load_state_dict(arrays.to_torch_state_dict())
        loss, accuracy = test(model, x_test, y_test)
        return MetricRecord({"loss": loss, "accuracy": accuracy})

    # the one FLStore line: every round's updates and aggregate (and the initial model) land
    # in FLStore; the settings come from the run config and the environment, and the job
    # declares the run config's model with this held-out set as its validation set
    strategy = with_flstore(
        FedAvg(fraction_train=1.0, fraction_evaluate=float(cfg["fraction-evaluate"])),
        sink=flstore_sink(cfg, validation=(x_test, y_test)),
        job=str(cfg["flstore-job"]),
    )
    strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(model.state_dict()),
        num_rounds=int(cfg["num-server-rounds"]),
        evaluate_fn=evaluate,
    )
