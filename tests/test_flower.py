"""The Flower integration, against flwr's own classes: strategies, messages, records, runtime.

Replies are real ``flwr.app.Message`` objects carrying ``ArrayRecord``/``MetricRecord`` content
(built with explicit metadata, as Flower does when it deserialises a reply); runs are a real
``ServerApp`` + ``ClientApp`` on Flower's in-memory grid and simulation-runtime workers.
"""

from __future__ import annotations

import subprocess
import sys
import time
from typing import Any

import numpy as np
import pytest

flwr = pytest.importorskip("flwr")

from flwr.app import (  # noqa: E402
    Array,
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MessageType,
    Metadata,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp.strategy import FedAvg, MultiKrum  # noqa: E402

from evaluation.flower_digits import run_flower_job  # noqa: E402
from flstore_core import models  # noqa: E402
from flstore_core.cache.node import CacheNode  # noqa: E402
from flstore_core.data.codec import Update  # noqa: E402
from flstore_core.errors import UnavailableError, ValidationError  # noqa: E402
from flstore_core.integrations.flower import (  # noqa: E402
    FLStoreStrategy,
    StoreSink,
    with_flstore,
)
from flstore_core.storage.object_store import ObjectStore  # noqa: E402

SERVER_NODE = 1  # flwr's SUPERLINK_NODE_ID


def train_reply(
    node: int,
    tensors: dict[str, np.ndarray],
    num_examples: int,
    *,
    config: dict[str, Any] | None = None,
    **metrics: float,
) -> Message:
    """A successful train reply from ``node``, as the ServerApp receives it."""
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(v) for k, v in tensors.items()}),
            "metrics": MetricRecord({"num-examples": num_examples, **metrics}),
        }
    )
    if config is not None:
        content["meta"] = ConfigRecord(config)
    return Message(content=content, metadata=_metadata(node))


def error_reply(node: int) -> Message:
    return Message(error=Error(code=0, reason="ClientApp crashed"), metadata=_metadata(node))


def _metadata(node: int) -> Metadata:
    return Metadata(
        run_id=7,
        message_id=f"reply-{node}",
        src_node_id=node,
        dst_node_id=SERVER_NODE,
        reply_to_message_id=f"ins-{node}",
        group_id="1",
        created_at=time.time(),
        ttl=60.0,
        message_type=MessageType.TRAIN,
    )


def round_replies(n: int = 6, seed: int = 0, outlier: bool = True) -> list[Message]:
    """``n`` replies with CNN-like tensors (state-dict order), one far off when ``outlier``."""
    rng = np.random.default_rng(seed)
    replies = []
    for i in range(n):
        scale = 25.0 if outlier and i == n - 1 else 1.0
        tensors = {
            "conv.weight": (rng.standard_normal((4, 1, 3, 3)) * scale).astype(np.float32),
            "conv.bias": rng.standard_normal(4).astype(np.float32),
            "fc.weight": rng.standard_normal((10, 16)).astype(np.float32),
            "fc.bias": rng.standard_normal(10).astype(np.float32),
        }
        replies.append(
            train_reply(
                1000 + i,
                tensors,
                20 + 5 * i,
                train_loss=0.5 + 0.1 * i,
                train_time=1.0 + i,
                loss_sq_mean=0.4 + 0.1 * i,
            )
        )
    return replies


def assert_same_aggregate(got: tuple[Any, Any], want: tuple[Any, Any]) -> None:
    (got_arrays, got_metrics), (want_arrays, want_metrics) = got, want
    assert list(got_arrays.keys()) == list(want_arrays.keys())
    for key in want_arrays:
        np.testing.assert_array_equal(got_arrays[key].numpy(), want_arrays[key].numpy())
    assert dict(got_metrics) == dict(want_metrics)


class RecordingSink:
    """A sink that keeps what it is handed (the protocol is FLStore's own, not Flower's)."""

    def __init__(self) -> None:
        self.rounds: dict[int, tuple[dict[str, Update], Update | None]] = {}
        self.initial: Update | None = None

    def put_round(
        self, job: str, round: int, updates: dict[str, Update], global_model: Update | None
    ) -> None:
        self.rounds[round] = (updates, global_model)

    def put_initial(self, job: str, update: Update) -> None:
        self.initial = update


# ---------------------------------------------------------------------- the wrapper


@pytest.mark.parametrize(
    "make",
    [
        lambda: FedAvg(),
        lambda: MultiKrum(num_malicious_nodes=1, num_nodes_to_select=3),
    ],
    ids=["FedAvg", "MultiKrum"],
)
def test_wrapped_aggregate_equals_unwrapped_on_the_same_replies(
    store: ObjectStore, make: Any
) -> None:
    replies = [*round_replies(), error_reply(2000)]
    wrapped = with_flstore(make(), sink=StoreSink(store), job="agg")

    got = wrapped.aggregate_train(3, replies)
    want = make().aggregate_train(3, replies)

    assert_same_aggregate(got, want)
    assert store.list_rounds("agg") == [2]  # Flower round 3 is FLStore round 2


def test_wrapped_strategy_is_still_its_class_with_its_settings() -> None:
    original = MultiKrum(fraction_train=0.5, num_malicious_nodes=2)
    wrapped = with_flstore(original, sink=RecordingSink(), job="kind")

    assert isinstance(wrapped, MultiKrum) and isinstance(wrapped, FLStoreStrategy)
    assert (wrapped.fraction_train, wrapped.num_malicious_nodes) == (0.5, 2)
    assert not isinstance(original, FLStoreStrategy)  # the given strategy is left alone
    with pytest.raises(ValidationError, match="already"):
        with_flstore(wrapped, sink=RecordingSink(), job="kind")


def test_every_successful_reply_is_stored_with_its_node_names_and_metrics(
    store: ObjectStore,
) -> None:
    replies = [*round_replies(4, outlier=False), error_reply(2000)]
    wrapped = with_flstore(FedAvg(), sink=StoreSink(store), job="names")

    arrays, _ = wrapped.aggregate_train(1, replies)

    manifest = store.get_manifest("names", 0)
    assert sorted(manifest.clients) == ["1000", "1001", "1002", "1003"]
    update = store.get_update("names", 0, "1002")
    assert list(update.tensors) == ["conv.weight", "conv.bias", "fc.weight", "fc.bias"]
    assert update.num_examples == 30
    assert update.metrics == pytest.approx({"loss": 0.7, "duration_s": 3.0, "loss_sq_mean": 0.6})
    sent = replies[2].content["arrays"]
    np.testing.assert_array_equal(update.tensors["fc.weight"], sent["fc.weight"].numpy())
    stored_global = store.get_global("names", 0)
    for key in arrays:
        np.testing.assert_array_equal(stored_global.tensors[key], arrays[key].numpy())


def test_a_client_id_reported_by_the_clientapp_replaces_the_node_id() -> None:
    sink = RecordingSink()
    w = np.ones(3, np.float32)
    replies = [
        train_reply(11, {"w": w}, 5, config={"client-id": "alice"}, loss=1.0),
        train_reply(12, {"w": w}, 5, config={"client-id": "bob"}, loss=1.0),
    ]
    with_flstore(FedAvg(), sink=sink, job="ids").aggregate_train(1, replies)

    updates, global_model = sink.rounds[0]
    assert sorted(updates) == ["alice", "bob"]
    assert global_model is not None and global_model.num_examples == 10


def test_tensor_names_name_the_arrays_of_a_list_arrayrecord() -> None:
    sink = RecordingSink()
    record = ArrayRecord([np.zeros(2, np.float32), np.ones(3, np.float32)])  # keys "0", "1"
    reply = Message(
        content=RecordDict({"arrays": record, "metrics": MetricRecord({"num-examples": 4})}),
        metadata=_metadata(5),
    )
    wrapped = with_flstore(FedAvg(), sink=sink, job="lists", tensor_names=["fc.weight", "fc.bias"])
    wrapped.aggregate_train(1, [reply])

    assert list(sink.rounds[0][0]["5"].tensors) == ["fc.weight", "fc.bias"]


def test_a_failing_sink_stops_the_run_unless_told_to_log() -> None:
    class BrokenSink:
        def put_round(self, *args: Any) -> None:
            raise UnavailableError("S3 is down")

    replies = round_replies(3, outlier=False)
    with pytest.raises(UnavailableError):
        with_flstore(FedAvg(), sink=BrokenSink(), job="x").aggregate_train(1, replies)
    logged = with_flstore(FedAvg(), sink=BrokenSink(), job="x", on_sink_error="log")
    assert_same_aggregate(logged.aggregate_train(1, replies), FedAvg().aggregate_train(1, replies))


def test_the_integration_imports_without_flwr() -> None:
    code = (
        "import sys; sys.modules['flwr'] = None\n"
        "import flstore_core.integrations.flower, evaluation.flower_digits\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_every_name_of_the_package_all_is_importable_from_the_package() -> None:
    import flstore_core.integrations.flower as flower

    missing = [name for name in flower.__all__ if not hasattr(flower, name)]
    assert missing == []
    # the names users, the README and evaluation/ import from the package
    assert {"with_flstore", "StoreSink", "RoundWriterSink", "run_in_process"} <= set(flower.__all__)


# ---------------------------------------------------------------------- real Flower runs


def test_every_round_of_a_flower_run_is_committed_with_every_participating_node(
    store: ObjectStore,
) -> None:
    summary = run_flower_job(StoreSink(store), job="fl-run", clients=4, rounds=2, malicious=1)

    node_clients = sorted(str(node) for node in summary.node_ids.values())
    assert sorted(summary.clients) == node_clients
    assert store.list_rounds("fl-run") == [0, 1]
    for r in range(2):
        assert sorted(store.get_manifest("fl-run", r).clients) == node_clients
        assert summary.participants[r] == node_clients
    assert store.list_global_rounds("fl-run") == [0, 1]
    assert store.get_job_spec("fl-run").model == "digits_cnn"
    x_val, y_val = store.get_validation_set("fl-run")
    assert x_val.shape[1:] == (1, 8, 8) and len(x_val) == len(y_val)
    initial = store.get_initial("fl-run").tensors
    expected = models.state_arrays(models.build("digits_cnn", seed=0))
    assert list(initial) == list(expected)
    assert all(np.array_equal(initial[k], v) for k, v in expected.items())
    assert len(summary.accuracy) == 2 and summary.malicious == [summary.clients[-1]]


def test_the_label_flipping_client_is_flagged_by_cosine_and_krum(store: ObjectStore) -> None:
    # 6 clients, 3 rounds (seeds 0-7 checked): in round 0 every model is still close to its
    # initialisation and the attacker does not stand out reliably; from round 1 on it does
    summary = run_flower_job(StoreSink(store), job="fl-attack", clients=6, rounds=3)
    (attacker,) = summary.malicious
    node = CacheNode(store, budget_bytes=10**9)

    for r in (1, 2):
        cosine = node.handle(
            {
                "op": "run",
                "workload": "malicious_cosine",
                "job": "fl-attack",
                "round": r,
                "params": {"k": 1},
            }
        )
        krum = node.handle(
            {"op": "run", "workload": "krum", "job": "fl-attack", "round": r, "params": {"f": 1}}
        )
        assert cosine["result"]["flagged"] == [attacker], f"round {r}"
        scores = krum["result"]["scores"]
        assert max(scores, key=scores.get) == attacker, f"round {r}"  # worst Krum score
        assert krum["result"]["selected"] != [attacker]


def test_flstore_selection_picks_the_next_round_and_falls_back_on_error(
    store: ObjectStore,
) -> None:
    class StubAPI:
        """Answers cosine_select from the store; fails the first time, as a down API would."""

        def __init__(self) -> None:
            self.calls: list[int] = []
            self.picked: list[str] = []

        def run(self, job: str, workload: str, round: int, k: int, **_: Any) -> dict[str, Any]:
            self.calls.append(round)
            if len(self.calls) == 1:
                raise UnavailableError("FLStore API unreachable")
            self.picked = sorted(store.get_manifest(job, round).clients)[-k:]
            return {"result": {"selected": self.picked}}

    api = StubAPI()
    summary = run_flower_job(
        StoreSink(store),
        job="fl-select",
        clients=5,
        rounds=3,
        select_with="cosine_select",
        client=api,  # type: ignore[arg-type]
        select_k=3,
    )

    assert api.calls == [0, 1]  # asked before Flower rounds 2 and 3, about the round before
    assert len(summary.participants[1]) == 5  # the failed call left FedAvg's own sampling
    assert summary.participants[2] == api.picked and len(api.picked) == 3
