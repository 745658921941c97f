"""A round committed on the local stack by a writer that holds no router becomes warm.

The writer is a plain :class:`ObjectStore` on the S3 endpoint the stack gives writers
(``.flstore/local.json``); the stack's notifying front sends the router function the S3 event
of the manifest write, and the router function has the round's owners load it. Node stats show
the round held; the warm marker and ``flstore stats`` show when it became warm; a direct
prefetch after it (the Flower sink's and Beam's own warming) loads nothing again.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from rich.console import Console

from flstore_core.cli.stats import print_warm_times
from flstore_core.data.manifest import JobSpec
from flstore_core.routing.commit_warming import read_marker, warm_times
from flstore_core.routing.invoker import NodeThrottled
from flstore_core.routing.placement import place_shard, round_shard
from flstore_core.storage.object_store import ObjectStore
from lambdas.local_runtime.stack import STATE_FILE, LocalStack, StackConfig
from tests.conftest import small_update

JOB = "warmjob"
NODES, REPLICATION = 3, 2


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    workdir = tmp_path_factory.mktemp("commit-warming")
    config = StackConfig(nodes=NODES, replication=REPLICATION, memory_mb=512)
    with LocalStack(config, workdir=workdir) as st:
        yield st


def node_loads(stack: LocalStack) -> list[tuple[list[str], int]]:
    """``(shards held, loads)`` of every node."""
    assert stack.router is not None
    out = []
    for i in range(NODES):
        # the warming goes on after its marker (the job's meta and model shards), and a node
        # serves one invocation at a time: a stats call meanwhile is throttled, so wait for it
        deadline = time.monotonic() + 60
        while True:
            try:
                stats = stack.router.node_op(i, {"op": "stats"})
                break
            except NodeThrottled:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        out.append((stats["shards"], stats["loads"]))
    return out


def wait_for_marker(store: ObjectStore, round_: int, timeout_s: float) -> dict | None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        marker = read_marker(store, JOB, round_)
        if marker is not None:
            return marker
        time.sleep(0.05)
    return None


def test_a_round_a_plain_writer_commits_is_warmed_by_the_notification(
    stack: LocalStack, tmp_path: Path
) -> None:
    state = json.loads((stack.workdir / STATE_FILE).read_text())  # type: ignore[operator]
    writer = ObjectStore(state["bucket"], endpoint_url=state["s3_endpoint"])
    writer.put_job_spec(JobSpec(job=JOB))
    entries = [writer.put_update(JOB, 0, f"c{i}", small_update(i)) for i in range(4)]
    writer.commit_round(JOB, 0, entries)

    # no writer-side warming here: the notification alone warms it (its speed is measured by
    # benchmarks/commit_to_warm.py, not asserted on a shared host)
    marker = wait_for_marker(writer, 0, timeout_s=60)
    assert marker is not None, stack.notifications.counts() if stack.notifications else None
    # the marker comes at the owners' load; the warming goes on (artifacts, the job's shards)
    assert stack.notifications is not None and stack.notifications.wait_idle(60)
    owners = place_shard(round_shard(JOB, 0), NODES, REPLICATION)
    held = node_loads(stack)
    for index in owners:
        assert f"{JOB}/round/0" in held[index][0], held
    # what `flstore stats` shows: when the round was committed and became warm
    (times,) = warm_times(writer, [JOB])
    assert times["round"] == 0 and times["commit_to_warm_ms"] > 0
    out = Console(file=io.StringIO(), width=80, record=True)
    print_warm_times(warm_times(writer), out)
    text = out.export_text()
    assert any(line.split()[:2] == [JOB, "0"] for line in text.splitlines()), text

    # the writer's own warming after the notification's (Flower sink, Beam) loads nothing again
    assert stack.router is not None
    answers = stack.router.prefetch([round_shard(JOB, 0)])
    assert all(not a.get("loaded") for a in answers.values()), answers
    assert [loads for _, loads in node_loads(stack)] == [loads for _, loads in held]


def test_the_stacks_own_store_and_functions_reach_s3_directly(stack: LocalStack) -> None:
    """Only writers get the notifying front: the cache nodes and the baselines' readers
    (stack.s3_endpoint) do not pay its hop."""
    assert stack.notifications is not None
    assert stack.writers_s3_endpoint == stack.notifications.url != stack.s3_endpoint
    assert stack.function_s3_endpoint(stack.node_function(0)) == stack.s3_endpoint
