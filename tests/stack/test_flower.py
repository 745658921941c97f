"""The Flower integration, against flwr's own classes: strategies, messages, records, sinks.

Replies are real ``flwr.app.Message`` objects carrying ``ArrayRecord``/``MetricRecord`` content
(built with explicit metadata, as Flower does when it deserialises a reply). Whole runs
(``flwr run`` on Flower's simulation engine) are in ``test_flower_run.py`` and ``test_demo.py``;
here, the example app users copy (``examples/flower-app``) is checked for what it promises.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import time
import tomllib
from pathlib import Path
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

from evaluation import digits_job  # noqa: E402
from flstore_core.cache.node import CacheNode  # noqa: E402
from flstore_core.data.codec import Update  # noqa: E402
from flstore_core.data.manifest import COS_TO_MEAN, UPDATE_NORM  # noqa: E402
from flstore_core.errors import ConflictError, UnavailableError, ValidationError  # noqa: E402
from flstore_core.integrations.flower import (  # noqa: E402
    FLStoreStrategy,
    StoreSink,
    flstore_sink,
    with_flstore,
)
from flstore_core.routing.placement import ShardKey  # noqa: E402
from flstore_core.routing.router import Router  # noqa: E402
from flstore_core.sdk.handover import RoundsNotStoredError  # noqa: E402
from flstore_core.storage.object_store import ObjectStore  # noqa: E402
from lambdas.local_runtime.s3_server import LocalS3  # noqa: E402

SERVER_NODE = 1  # flwr's SUPERLINK_NODE_ID
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "flower-app"


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


def round_replies(
    n: int = 6, seed: int = 0, outlier: bool = True, buffers: bool = False
) -> list[Message]:
    """``n`` replies with CNN-like tensors (state-dict order), one far off when ``outlier``;
    with BatchNorm running statistics and its integer counter when ``buffers`` (the other
    tensors do not depend on ``buffers``)."""
    rng = np.random.default_rng(seed)
    extra = np.random.default_rng(seed + 100)
    replies = []
    for i in range(n):
        scale = 25.0 if outlier and i == n - 1 else 1.0
        tensors = {
            "conv.weight": (rng.standard_normal((4, 1, 3, 3)) * scale).astype(np.float32),
            "conv.bias": rng.standard_normal(4).astype(np.float32),
        }
        if buffers:
            tensors["bn.running_mean"] = (30.0 + extra.standard_normal(4)).astype(np.float32)
            tensors["bn.running_var"] = (80.0 + extra.random(4)).astype(np.float32)
            tensors["bn.num_batches_tracked"] = np.array(500 * (seed + 1) + i, dtype=np.int64)
        tensors["fc.weight"] = rng.standard_normal((10, 16)).astype(np.float32)
        tensors["fc.bias"] = rng.standard_normal(10).astype(np.float32)
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
    wrapped.flstore.flush()

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
    wrapped.flstore.flush()

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
    wrapped = with_flstore(FedAvg(), sink=sink, job="ids")
    wrapped.aggregate_train(1, replies)
    wrapped.flstore.flush()

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
    wrapped.flstore.flush()

    assert list(sink.rounds[0][0]["5"].tensors) == ["fc.weight", "fc.bias"]


def test_a_failing_sink_stops_the_run_unless_told_to_log() -> None:
    class BrokenSink:
        def put_round(self, *args: Any) -> None:
            raise UnavailableError("S3 is down")

    replies = round_replies(3, outlier=False)
    wrapped = with_flstore(FedAvg(), sink=BrokenSink(), job="x")
    assert_same_aggregate(wrapped.aggregate_train(1, replies), FedAvg().aggregate_train(1, replies))
    with pytest.raises(RoundsNotStoredError, match="round 0: UnavailableError: S3 is down"):
        wrapped.flstore.flush()
    inline = with_flstore(FedAvg(), sink=BrokenSink(), job="x", max_in_flight=0)
    with pytest.raises(UnavailableError):
        inline.aggregate_train(1, replies)
    logged = with_flstore(FedAvg(), sink=BrokenSink(), job="x", on_sink_error="log")
    assert_same_aggregate(logged.aggregate_train(1, replies), FedAvg().aggregate_train(1, replies))
    logged.flstore.flush()  # logs, does not raise


def test_the_integration_imports_without_flwr() -> None:
    code = (
        "import sys; sys.modules['flwr'] = None\n"
        "import flstore_core.integrations.flower, evaluation.demo\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_every_name_of_the_package_all_is_importable_from_the_package() -> None:
    import flstore_core.integrations.flower as flower

    missing = [name for name in flower.__all__ if not hasattr(flower, name)]
    assert missing == []
    # the names users, the README and evaluation/ import from the package
    assert {"with_flstore", "StoreSink", "RoundWriterSink", "flstore_sink"} <= set(flower.__all__)


# ---------------------------------------------------------------------- FLStore selection


@pytest.fixture
def serverapp_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """The identity Flower gives a ServerApp's process, which the strategies' messages carry
    (a non-public Flower class: in a real run Flower sets it; this test calls the strategy
    directly)."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 7), ("_task_id", 1), ("_node_id", SERVER_NODE)):
        monkeypatch.setattr(TaskIdentity, name, value)


class FakeGrid:
    """What a strategy's ``configure_train`` asks of the Grid: the connected node ids."""

    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)


@pytest.mark.usefixtures("serverapp_process")
def test_flstore_selection_readdresses_the_next_round_and_falls_back_on_error(
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
    grid = FakeGrid([1000 + i for i in range(5)])
    wrapped = with_flstore(
        FedAvg(fraction_train=1.0),
        sink=StoreSink(store),
        job="select",
        select_with="cosine_select",
        client=api,  # type: ignore[arg-type]
        select_k=3,
    )
    arrays = round_replies(1)[0].content["arrays"]
    targets = []
    for server_round in (1, 2, 3):
        messages = list(wrapped.configure_train(server_round, arrays, ConfigRecord(), grid))
        targets.append(sorted(m.metadata.dst_node_id for m in messages))
        nodes = targets[-1]
        replies = [
            r for r in round_replies(5, seed=server_round) if r.metadata.src_node_id in nodes
        ]
        wrapped.aggregate_train(server_round, replies)
    wrapped.flstore.flush()

    assert api.calls == [0, 1]  # asked before Flower rounds 2 and 3, about the round before
    assert targets[1] == grid.nodes  # the failed call left FedAvg's own sampling
    assert targets[2] == sorted(int(c) for c in api.picked) and len(api.picked) == 3
    assert store.list_rounds("select") == [0, 1, 2]
    assert sorted(store.get_manifest("select", 2).clients) == api.picked
    assert list(store.get_initial("select").tensors) == list(arrays.keys())


# ---------------------------------------------------------------------- StoreSink


class RecordingPrefetcher:
    def __init__(self, fail: bool = False) -> None:
        self.calls: list[list[ShardKey]] = []
        self.fail = fail

    def prefetch(self, shards: list[ShardKey]) -> dict[str, Any]:
        self.calls.append(shards)
        if self.fail:
            raise OSError("the Lambda endpoint is down")
        return {
            "flstore-cache-0": {"loaded": [str(s) for s in shards], "already": [], "failed": {}}
        }


def test_the_store_sink_writes_the_ingest_summaries_as_the_cache_node_scores_them(
    store: ObjectStore,
) -> None:
    sink = StoreSink(store)
    wrapped = with_flstore(FedAvg(), sink=sink, job="sums")
    wrapped.aggregate_train(1, round_replies(6))  # round 0: no base, summaries of the weights
    wrapped.aggregate_train(2, round_replies(6, seed=1))  # round 1: deltas from global/0
    wrapped.flstore.flush()

    node = CacheNode(store, budget_bytes=10**9)
    for r in (0, 1):
        manifest = store.get_manifest("sums", r)
        scores = node.handle(
            {"op": "run", "workload": "cosine_select", "job": "sums", "round": r, "params": {}}
        )["result"]["scores"]
        for client, entry in manifest.updates.items():
            assert UPDATE_NORM in entry.summary
            assert entry.summary[COS_TO_MEAN] == pytest.approx(scores[client], abs=1e-5)


def test_the_store_sinks_summaries_ignore_batchnorm_counters_and_running_stats(
    store: ObjectStore,
) -> None:
    node = CacheNode(store, budget_bytes=10**9)
    for job, buffers in (("plain", False), ("bn", True)):
        wrapped = with_flstore(FedAvg(), sink=StoreSink(store), job=job)
        wrapped.aggregate_train(1, round_replies(6, buffers=buffers))  # no base: weights
        wrapped.aggregate_train(2, round_replies(6, seed=1, buffers=buffers))  # deltas
        wrapped.flstore.flush()
    assert "bn.num_batches_tracked" in {t.name for t in store.get_manifest("bn", 0).tensors}
    for r in (0, 1):
        plain, bn = store.get_manifest("plain", r), store.get_manifest("bn", r)
        scores = node.handle(
            {"op": "run", "workload": "cosine_select", "job": "bn", "round": r, "params": {}}
        )["result"]["scores"]
        for client, entry in bn.updates.items():
            assert entry.summary[COS_TO_MEAN] == pytest.approx(scores[client], abs=1e-6)
            for name in (COS_TO_MEAN, UPDATE_NORM):
                assert entry.summary[name] == pytest.approx(
                    plain.updates[client].summary[name], rel=1e-5, abs=1e-6
                )


def test_the_store_sink_warms_the_round_then_the_meta_and_model_shards(
    store: ObjectStore,
) -> None:
    prefetcher = RecordingPrefetcher()
    wrapped = with_flstore(FedAvg(), sink=StoreSink(store, prefetch=prefetcher), job="warm")
    wrapped.aggregate_train(4, round_replies(3, outlier=False))
    wrapped.flstore.flush()

    round_shards, others = prefetcher.calls
    assert [str(s) for s in round_shards] == [str(ShardKey("warm", "round", "3"))]
    # client workloads are answered from the meta shard: no client shard is warmed
    assert [str(s) for s in others] == ["warm/meta/meta", "warm/model/global"]


def test_a_new_run_under_a_job_that_holds_rounds_is_refused_before_training(
    store: ObjectStore,
) -> None:
    first = with_flstore(FedAvg(), sink=StoreSink(store), job="again")
    first.aggregate_train(1, round_replies(3))
    first.flstore.flush()
    rerun = with_flstore(FedAvg(), sink=StoreSink(store), job="again")
    arrays = round_replies(1)[0].content["arrays"]

    with pytest.raises(ConflictError, match="flstore-job='again-2'"):
        rerun.configure_train(1, arrays, ConfigRecord(), FakeGrid([1000]))
    assert sorted(store.get_manifest("again", 0).clients) == ["1000", "1001", "1002"]


def test_a_failed_warm_up_leaves_the_round_stored(store: ObjectStore) -> None:
    sink = StoreSink(store, prefetch=RecordingPrefetcher(fail=True))
    wrapped = with_flstore(FedAvg(), sink=sink, job="cold")
    wrapped.aggregate_train(1, round_replies(3))
    wrapped.flstore.flush()

    assert store.list_rounds("cold") == [0]


# ---------------------------------------------------------------------- flstore_sink


def local_state(path: Path, s3: LocalS3, bucket: str) -> Path:
    state = {
        "gateway_url": "http://127.0.0.1:9",
        "lambda_endpoint": "http://127.0.0.1:9",
        "s3_endpoint": s3.url,
        "bucket": bucket,
        "token": "t",
        "prefix": "demo",
        "nodes": 3,
        "replication": 2,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(state))
    return path


def test_the_local_stack_state_file_gives_the_store_and_the_nodes_to_warm(
    tmp_path: Path, s3_server: LocalS3, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("FLSTORE_S3_ENDPOINT", raising=False)
    monkeypatch.chdir(tmp_path)
    local_state(tmp_path / ".flstore" / "local.json", s3_server, "stack-bucket")

    sink = flstore_sink({"flstore-job": "j"})

    assert sink.store.bucket == "stack-bucket"
    assert isinstance(sink.prefetch, Router)
    config = sink.prefetch.config
    assert (config.prefix, config.nodes, config.replication) == ("demo", 3, 2)


def test_a_stack_that_notifies_commits_leaves_warming_to_the_notification(
    tmp_path: Path, s3_server: LocalS3, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("FLSTORE_S3_ENDPOINT", raising=False)
    monkeypatch.chdir(tmp_path)
    path = local_state(tmp_path / ".flstore" / "local.json", s3_server, "stack-bucket")
    path.write_text(json.dumps({**json.loads(path.read_text()), "commit_notifications": True}))

    sink = flstore_sink({"flstore-job": "j"})

    assert sink.store.bucket == "stack-bucket" and sink.prefetch is None


def test_the_run_config_names_another_state_file_or_a_bucket(
    tmp_path: Path, s3_server: LocalS3, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("FLSTORE_S3_ENDPOINT", raising=False)
    monkeypatch.chdir(tmp_path)
    state = local_state(tmp_path / "elsewhere.json", s3_server, "named")

    assert flstore_sink({"flstore-local-state": str(state)}).store.bucket == "named"
    by_bucket = flstore_sink({"flstore-local-state": str(state), "flstore-bucket": "mine"})
    assert by_bucket.store.bucket == "mine" and by_bucket.prefetch is None


def test_the_environment_wins_over_a_local_stack_and_is_the_default(
    tmp_path: Path, s3_server: LocalS3, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FLSTORE_BUCKET", "from-env")
    monkeypatch.delenv("FLSTORE_S3_ENDPOINT", raising=False)
    assert flstore_sink({}).store.bucket == "from-env"  # no state file: the environment

    local_state(tmp_path / ".flstore" / "local.json", s3_server, "stack-bucket")
    monkeypatch.setenv("FLSTORE_S3_ENDPOINT", s3_server.url)
    sink = flstore_sink({})
    assert sink.store.bucket == "from-env" and sink.prefetch is None


def test_an_unreadable_state_file_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("FLSTORE_S3_ENDPOINT", raising=False)
    state = tmp_path / "local.json"
    state.write_text("{not json")
    with pytest.raises(ValidationError, match="flstore local up"):
        flstore_sink({"flstore-local-state": str(state)})


def model_arrays() -> ArrayRecord:
    from flstore_core import models

    return ArrayRecord(models.build("digits_cnn", seed=0).state_dict())


@pytest.mark.usefixtures("serverapp_process")
def test_the_run_configs_model_is_declared_before_the_first_round(
    store: ObjectStore, s3_server: LocalS3, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLSTORE_S3_ENDPOINT", s3_server.url)
    _, _, x_val, y_val = digits_job.load_split(0)
    run_config = {"flstore-bucket": store.bucket, "flstore-model": "digits_cnn"}
    sink = flstore_sink(run_config, validation=(x_val, y_val))
    strategy = with_flstore(FedAvg(), sink=sink, job="declared")

    strategy.configure_train(1, model_arrays(), ConfigRecord(), FakeGrid([1000, 1001]))

    spec = store.get_job_spec("declared")
    assert spec.model == "digits_cnn" and spec.parameters and spec.state_names
    np.testing.assert_array_equal(store.get_validation_set("declared")[1], y_val)


@pytest.mark.usefixtures("serverapp_process")
def test_a_job_that_declares_the_model_keeps_its_spec(store: ObjectStore) -> None:
    from flstore_core.data.manifest import JobSpec

    store.put_job_spec(JobSpec("kept", model="digits_cnn", hyperparameters={"lr": 0.5}))
    sink = StoreSink(store, model="digits_cnn")
    with_flstore(FedAvg(), sink=sink, job="kept").configure_train(
        1, model_arrays(), ConfigRecord(), FakeGrid([1000, 1001])
    )
    assert store.get_job_spec("kept").hyperparameters == {"lr": 0.5}


def test_without_a_model_key_the_job_keeps_what_it_declares(
    store: ObjectStore, s3_server: LocalS3, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLSTORE_S3_ENDPOINT", s3_server.url)
    assert StoreSink(store).model is None
    assert flstore_sink({"flstore-bucket": store.bucket, "flstore-model": ""}).model is None


# ---------------------------------------------------------------------- examples/flower-app


def test_the_example_is_a_flower_app_declaring_flstore_as_a_dependency() -> None:
    pyproject = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())
    flwr_app = pyproject["tool"]["flwr"]["app"]
    assert set(flwr_app["components"]) == {"serverapp", "clientapp"}
    for ref in flwr_app["components"].values():
        module = ref.split(":")[0].replace(".", "/") + ".py"
        assert (EXAMPLE / module).exists(), ref
    assert flwr_app["config"]["flstore-job"] == "flower-app"
    federations = pyproject["tool"]["flwr"]["federations"]
    assert federations[federations["default"]]["options"]["num-supernodes"] == 10
    dependencies = pyproject["project"]["dependencies"]
    assert "flstore" in dependencies and "torch==2.13.0" in dependencies


def test_the_example_imports_only_flower_torch_sklearn_numpy_and_flstore_core() -> None:
    allowed = {"flwr", "torch", "sklearn", "numpy", "flstore_core", "flower_app", "__future__"}
    allowed |= {"functools", "time", "warnings"}
    for path in (EXAMPLE / "flower_app").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else []
            )
            for name in names:
                assert name.split(".")[0] in allowed, (path.name, name)


def test_the_examples_only_flstore_line_is_with_flstore() -> None:
    source = (EXAMPLE / "flower_app" / "server_app.py").read_text()
    code = [line for line in source.splitlines() if not line.lstrip().startswith(("#", '"""'))]
    uses = [line for line in code if "flstore" in line.lower()]
    assert uses == [
        "from flstore_core.integrations.flower import flstore_sink, with_flstore",
        "    strategy = with_flstore(",
        "        sink=flstore_sink(cfg, validation=(x_test, y_test)),",
        '        job=str(cfg["flstore-job"]),',
    ]
    assert "flstore" not in (EXAMPLE / "flower_app" / "client_app.py").read_text().lower()


def test_the_example_evaluates_on_the_validation_set_the_demo_declares(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.syspath_prepend(str(EXAMPLE))
    from flower_app import task

    _, _, x_test, y_test = task.load_split(0)
    _, _, x_val, y_val = digits_job.load_split(0)
    np.testing.assert_array_equal(x_test, x_val)
    np.testing.assert_array_equal(y_test, y_val)
    shares = task.partitions(10, 1.0, 0)
    assert len({len(s) for s in shares}) == 1  # equal sizes
    assert len(set(np.concatenate(shares).tolist())) == sum(len(s) for s in shares)  # disjoint
