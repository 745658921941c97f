"""``RoundWriter.submit_round``: the round is encoded at once, written and ingested later."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from flstore_core.data.codec import Update
from flstore_core.data.rawfile import read_raw_update
from flstore_core.sdk.handover import RoundsNotStoredError
from flstore_core.sdk.round_writer import RoundDrop, RoundWriter


def updates(value: float) -> dict[str, Update]:
    return {c: Update({"w": np.full(4, value, np.float32)}, num_examples=3) for c in ("a", "b")}


def test_submit_round_returns_before_ingestion_and_rounds_are_ingested_in_order(
    tmp_path: Path,
) -> None:
    release = threading.Event()
    ingested: list[int | None] = []

    def ingest(drop: RoundDrop) -> int:
        release.wait(10)
        ingested.append(drop.round)
        return len(drop.files)

    writer = RoundWriter(tmp_path, "job", on_round=ingest, max_in_flight=2)
    t0 = time.perf_counter()
    first = writer.submit_round(0, updates(1.0))
    writer.submit_round(1, updates(2.0))
    assert time.perf_counter() - t0 < 2 and ingested == []

    blocked = threading.Event()
    threading.Thread(target=lambda: (writer.submit_round(2, updates(3.0)), blocked.set())).start()
    assert not blocked.wait(0.3)  # two rounds in flight: the third waits
    release.set()
    assert blocked.wait(5)
    writer.close()
    assert ingested == [0, 1, 2]
    assert first.result().ingested == 2


def test_the_callers_arrays_are_free_once_submit_round_returns(tmp_path: Path) -> None:
    release = threading.Event()
    with RoundWriter(tmp_path, "job", on_round=lambda d: release.wait(10)) as writer:
        mine = updates(1.0)
        drop = writer.submit_round(0, mine)
        mine["a"].tensors["w"][:] = 7.0  # the caller reuses its buffer
        release.set()
    written = read_raw_update(next(f for f in drop.result().files if f.endswith("a.safetensors")))
    np.testing.assert_array_equal(written.tensors["w"], np.full(4, 1.0, np.float32))


def test_a_round_whose_ingestion_fails_is_raised_at_close_with_its_number(tmp_path: Path) -> None:
    def ingest(drop: RoundDrop) -> None:
        if drop.round == 1:
            raise RuntimeError("the pipeline failed")

    writer = RoundWriter(tmp_path, "job", on_round=ingest)
    for r in range(3):
        writer.submit_round(r, updates(float(r)))
    with pytest.raises(RoundsNotStoredError, match="round 1: RuntimeError: the pipeline failed"):
        writer.close()
    assert (tmp_path / "job" / "00000002" / "updates" / "b.safetensors").exists()
