"""A wrapped Flower strategy hands each round over and goes on; the run's end waits for it.

Replies are real ``flwr.app.Message`` objects (the helpers of ``tests/stack/test_flower.py``);
the store is the moto S3 of the test session.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np
import pytest

flwr = pytest.importorskip("flwr")

from flwr.app import Array, ArrayRecord, Message  # noqa: E402
from flwr.serverapp.strategy import FedAvg  # noqa: E402

from flstore_core.data.codec import Update  # noqa: E402
from flstore_core.errors import NotFoundError, UnavailableError, ValidationError  # noqa: E402
from flstore_core.integrations.flower import StoreSink, flstore_sink, with_flstore  # noqa: E402
from flstore_core.integrations.flower import replies as replies_module  # noqa: E402
from flstore_core.sdk.handover import RoundsNotStoredError  # noqa: E402
from flstore_core.storage.object_store import ObjectStore  # noqa: E402
from tests.stack.test_flower import FakeGrid, round_replies, train_reply  # noqa: E402


class SlowSink:
    """Records each round when its ``put_round`` ends; holds until ``release`` is set."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.stored: list[int] = []

    def put_round(
        self, job: str, round: int, updates: dict[str, Update], global_model: Update | None
    ) -> None:
        self.release.wait(10)
        self.stored.append(round)


class FailingStore:
    """The store, except that round ``fail_round`` fails after ``after`` of its updates are
    stored (a writer killed mid-round)."""

    def __init__(self, store: ObjectStore, fail_round: int, after: int) -> None:
        self._store = store
        self.fail_round, self.after = fail_round, after
        self.puts = 0
        self.stored: list[tuple[int, str]] = []
        self._lock = threading.Lock()

    def put_update(self, job: str, round_: int, client: str, update: Update, **kw: Any) -> Any:
        if round_ == self.fail_round:
            with self._lock:
                self.puts += 1
                if self.puts > self.after:
                    raise UnavailableError("the writer died")
        entry = self._store.put_update(job, round_, client, update, **kw)
        with self._lock:
            self.stored.append((round_, client))
        return entry

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


def test_aggregate_train_returns_before_the_sink_has_stored_the_round() -> None:
    sink = SlowSink()
    wrapped = with_flstore(FedAvg(), sink=sink, job="slow")
    t0 = time.perf_counter()
    wrapped.aggregate_train(1, round_replies(3))
    wrapped.aggregate_train(2, round_replies(3, seed=1))
    assert time.perf_counter() - t0 < 2 and sink.stored == []
    sink.release.set()
    wrapped.flstore.flush()
    assert sink.stored == [0, 1]  # in round order
    assert wrapped.flstore.rounds_stored[1] == ["1000", "1001", "1002"]


def test_the_arrays_handed_over_are_not_the_callers() -> None:
    sink = SlowSink()
    weights = np.ones(4, np.float32)
    reply = train_reply(7, {"w": weights}, 3)
    wrapped = with_flstore(FedAvg(), sink=sink, job="own", max_in_flight=1)
    kept: dict[int, tuple[dict[str, Update], Update | None]] = {}
    sink.put_round = lambda job, r, updates, g: kept.setdefault(r, (updates, g))  # type: ignore[method-assign]
    wrapped.aggregate_train(1, [reply])
    weights[:] = 5.0  # the caller's array, and the reply's record, change afterwards
    reply.content["arrays"]["w"] = Array(np.full(4, 9.0, np.float32))
    wrapped.flstore.flush()
    updates, global_model = kept[0]
    np.testing.assert_array_equal(updates["7"].tensors["w"], np.ones(4, np.float32))
    assert global_model is not None
    np.testing.assert_array_equal(global_model.tensors["w"], np.ones(4, np.float32))


def test_a_writer_failing_mid_round_leaves_whole_rounds_and_the_error_names_the_round(
    store: ObjectStore,
) -> None:
    failing = FailingStore(store, fail_round=1, after=2)
    wrapped = with_flstore(FedAvg(), sink=StoreSink(failing, max_workers=1), job="crash")  # type: ignore[arg-type]
    for server_round in (1, 2, 3):
        wrapped.aggregate_train(server_round, round_replies(5, seed=server_round))

    with pytest.raises(RoundsNotStoredError, match="round 1: UnavailableError: the writer died"):
        wrapped.flstore.flush()
    assert store.list_rounds("crash") == [0, 2]  # round 1 is absent, not half there
    with pytest.raises(NotFoundError):
        store.get_manifest("crash", 1)
    for r in (0, 2):
        assert len(store.get_manifest("crash", r).clients) == 5
    # two of round 1's updates reached S3, but no reader sees them without the manifest
    assert sum(r == 1 for r, _ in failing.stored) == 2


def test_start_returns_only_once_every_round_is_stored_and_raises_a_round_that_was_not(
    store: ObjectStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 7), ("_task_id", 1), ("_node_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)

    class Grid(FakeGrid):
        def send_and_receive(self, messages: Any, timeout: float | None = None) -> list[Message]:
            messages = list(messages)
            return [r for r in round_replies(3) if messages][: len(messages)]

    failing = FailingStore(store, fail_round=1, after=0)
    wrapped = with_flstore(
        FedAvg(fraction_evaluate=0.0, min_available_nodes=3),
        sink=StoreSink(failing),  # type: ignore[arg-type]
        job="ends",
    )
    initial = ArrayRecord(
        {k: Array(v.numpy()) for k, v in round_replies(1)[0].content["arrays"].items()}
    )
    with pytest.raises(RoundsNotStoredError, match="round 1"):
        wrapped.start(grid=Grid([1000, 1001, 1002]), initial_arrays=initial, num_rounds=3)
    assert store.list_rounds("ends") == [0, 2]


def test_the_run_config_sets_how_many_rounds_may_be_in_flight(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FLSTORE_S3_ENDPOINT", "http://127.0.0.1:9")
    sink = flstore_sink({"flstore-max-in-flight": 3})
    assert with_flstore(FedAvg(), sink=sink, job="j").flstore.handover.max_in_flight == 3
    inline = flstore_sink({"flstore-max-in-flight": 0})
    assert with_flstore(FedAvg(), sink=inline, job="j").flstore.handover.max_in_flight == 0
    default = with_flstore(FedAvg(), sink=flstore_sink({}), job="j")
    assert default.flstore.handover.max_in_flight == 2
    with pytest.raises(ValidationError, match="flstore-max-in-flight"):
        flstore_sink({"flstore-max-in-flight": "-1"})


class KeepsArrays(FedAvg):  # type: ignore[misc]
    """A strategy whose own aggregation reads no array (FedAvg's does, in the loop either way)."""

    def aggregate_train(self, server_round: int, replies: Any) -> tuple[None, None]:
        return None, None


def test_the_training_loop_does_not_decode_the_arrays_of_a_round(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sink = SlowSink()
    sink.release.set()
    wrapped = with_flstore(KeepsArrays(), sink=sink, job="lazy", max_in_flight=1)
    decoded_on: list[threading.Thread] = []
    values = replies_module.array_values

    def recorded(array: Array) -> Any:
        decoded_on.append(threading.current_thread())
        return values(array)

    monkeypatch.setattr(replies_module, "array_values", recorded)
    wrapped.aggregate_train(1, round_replies(3))
    wrapped.flstore.flush()
    assert sink.stored == [0] and wrapped.flstore.rounds_stored[0] == ["1000", "1001", "1002"]
    assert decoded_on, "the round's arrays were never decoded"
    assert threading.main_thread() not in decoded_on  # the loop's thread decoded none


def test_a_rounds_summaries_are_computed_while_its_updates_are_written(
    store: ObjectStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    started = threading.Event()

    class WaitsForSummaries:
        """The store, except that each update's PUT waits until the summaries have begun."""

        def put_update(self, *args: Any, **kw: Any) -> Any:
            assert started.wait(10), "the summaries waited for the updates' PUTs"
            return store.put_update(*args, **kw)

        def __getattr__(self, name: str) -> Any:
            return getattr(store, name)

    sink = StoreSink(WaitsForSummaries())  # type: ignore[arg-type]
    summaries = sink.summaries

    def begin(*args: Any) -> Any:
        started.set()
        return summaries(*args)

    monkeypatch.setattr(sink, "summaries", begin)
    updates = {f"c{i}": Update({"w": np.full(4, i, np.float32)}, num_examples=2) for i in range(3)}
    sink.put_round("overlap", 0, updates, None)
    manifest = store.get_manifest("overlap", 0)
    assert sorted(manifest.clients) == ["c0", "c1", "c2"]
    assert set(manifest.updates["c1"].summary) >= {"update_norm", "cos_to_mean"}


@pytest.mark.parametrize(
    "value",
    [
        np.arange(12, dtype=np.float32).reshape(3, 4),
        np.asfortranarray(np.arange(12, dtype=np.float64).reshape(3, 4)),
        np.array(7, dtype=np.int64),
        np.zeros((0, 5), np.float16),
        np.arange(6, dtype=">i4"),
    ],
    ids=["f32", "fortran-f64", "scalar-i64", "empty-f16", "big-endian-i32"],
)
def test_an_arrays_values_are_a_read_only_view_equal_to_numpys_own(value: np.ndarray) -> None:
    array = Array(value)
    got = replies_module.array_values(array)
    want = array.numpy()
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_array_equal(got, want)
    assert not got.flags.writeable  # a view of the Array's bytes, not a copy


def test_an_array_whose_bytes_are_not_plain_npy_is_left_to_numpy() -> None:
    truncated = Array(np.arange(4, dtype=np.float32))
    truncated.data = truncated.data[:-4]
    with pytest.raises(ValueError):
        replies_module.array_values(truncated)


def test_the_next_rounds_base_is_the_model_the_sink_stored_and_its_summaries_are_the_same(
    store: ObjectStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(5)

    def model() -> Update:
        return Update({"w": rng.standard_normal(64).astype(np.float32), "n": np.arange(3)})

    def round_of(n: int) -> dict[str, Update]:
        return {f"c{i}": Update(model().tensors, num_examples=i + 1) for i in range(n)}

    sink = StoreSink(store)
    sink.put_initial("kept", model())
    aggregated = model()
    sink.put_round("kept", 0, round_of(4), aggregated)
    aggregated.tensors["w"][:] = 0.0  # the caller trains on in place: the kept base is a copy
    updates = round_of(4)
    read_back = StoreSink(store).summaries("kept", 1, updates)  # a new sink reads the base
    monkeypatch.setattr(store, "get_base", lambda *a: pytest.fail("the base was read back"))
    assert sink.summaries("kept", 1, updates) == read_back
    sink.put_round("kept", 1, updates, model())
    stored = store.get_manifest("kept", 1).updates
    assert {c: {k: stored[c].summary[k] for k in read_back[c]} for c in stored} == read_back
