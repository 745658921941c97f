"""``flwr run`` of a Flower app whose ServerApp wraps its strategy with ``with_flstore``.

A tiny app (``tests/flower_tiny_app``: numpy only, 3 supernodes, 2 rounds) runs on Flower's
simulation engine, on a SuperLink started in a directory holding the local stack's
``.flstore/local.json`` and stopped by its pid afterwards; the app finds the stack there and
asks FLStore (``select_with="cosine_select"``) which clients train round 2.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from evaluation.flower_run import FlowerRun, LocalSuperLink, copy_app
from flstore_core.data.manifest import COS_TO_MEAN, UPDATE_NORM
from flstore_core.routing.commit_warming import read_marker
from flstore_core.sdk.client import FLStoreClient
from lambdas.local_runtime.stack import LocalStack, StackConfig

APP = Path(__file__).resolve().parents[1] / "flower_tiny_app"
JOB = "tiny"


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="module")
def ran(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalStack, FlowerRun, int]]:
    workdir = tmp_path_factory.mktemp("flwr-run")
    with LocalStack(StackConfig(nodes=2, replication=1, memory_mb=512), workdir=workdir) as stack:
        superlink = LocalSuperLink(workdir, workdir / "logs")
        with superlink:
            pid = superlink.pid
            assert pid is not None
            run = superlink.run(
                copy_app(APP, workdir),
                federation_config={"num-supernodes": 3, "client-resources-num-cpus": 1},
                timeout=240,
            )
        yield stack, run, pid


def test_the_run_completes_without_errors(ran: tuple[LocalStack, FlowerRun, int]) -> None:
    _, run, _ = ran
    assert run.completed, (run.status, run.errors, run.log)
    assert run.errors == []


def test_every_round_and_the_initial_model_land_in_flstore(
    ran: tuple[LocalStack, FlowerRun, int],
) -> None:
    stack, _, _ = ran
    store = stack.store
    assert store is not None
    assert store.list_rounds(JOB) == [0, 1]
    assert store.list_global_rounds(JOB) == [0, 1]
    np.testing.assert_array_equal(store.get_initial(JOB).tensors["w"], np.zeros(64, np.float32))
    first = store.get_manifest(JOB, 0)
    assert len(first.clients) == 3
    for entry in first.updates.values():  # the ingest summaries, as the Beam ingestion writes
        assert {COS_TO_MEAN, UPDATE_NORM} <= set(entry.summary)


def test_flstore_chose_the_clients_of_the_second_round(
    ran: tuple[LocalStack, FlowerRun, int],
) -> None:
    stack, _, _ = ran
    assert stack.store is not None
    api = FLStoreClient(stack.gateway_url, stack.token)
    chosen: dict[str, Any] = api.run(JOB, "cosine_select", round=0, k=2)
    assert sorted(stack.store.get_manifest(JOB, 1).clients) == sorted(chosen["result"]["selected"])


def test_the_commit_notification_warmed_the_last_round_on_its_cache_nodes(
    ran: tuple[LocalStack, FlowerRun, int],
) -> None:
    stack, _, _ = ran
    assert stack.store is not None
    # the sink writes and commits; the stack's S3 front notifies the router function of the
    # manifest's write, which warms the round asynchronously and then writes its marker
    deadline = time.monotonic() + 60
    while read_marker(stack.store, JOB, 1) is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert read_marker(stack.store, JOB, 1) is not None
    api = FLStoreClient(stack.gateway_url, stack.token)
    answer: dict[str, Any] = api.run(JOB, "malicious_cosine", round=1, k=1)
    assert answer["meta"]["cache"] == "hit"


def test_the_superlink_is_stopped_by_its_pid(ran: tuple[LocalStack, FlowerRun, int]) -> None:
    _, _, pid = ran
    assert not alive(pid)
