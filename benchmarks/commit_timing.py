"""What ``benchmarks/commit_to_warm.py``'s ``commit_to_warm`` part times a commit with: a
writer's store that notes when each manifest PUT returned, a poller of the round's warm marker,
a poller of a workload until an answer comes from memory, and the stack's S3 in a process of
its own."""

from __future__ import annotations

import multiprocessing
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from flstore_core.data.manifest import RoundManifest
from flstore_core.routing.commit_warming import read_marker
from flstore_core.storage.object_store import ObjectStore

#: how often the marker and the workloads are polled: the figures' resolution
POLL_S = 0.05


class CommitClock(ObjectStore):
    """A writer's plain store (no router) that notes when each round's commit returned, i.e.
    when its manifest PUT was answered (``commit_round`` writes the manifest last)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.committed_at: dict[tuple[str, int], float] = {}

    def commit_round(self, job: str, round_: int, *args: Any, **kwargs: Any) -> RoundManifest:
        manifest = super().commit_round(job, round_, *args, **kwargs)
        self.committed_at[(job, round_)] = time.perf_counter()
        return manifest


def wait_for_marker(
    store: ObjectStore, job: str, round_: int, timeout_s: float, poll_s: float = POLL_S
) -> tuple[float, dict[str, Any]]:
    """Poll the round's warm marker until it exists: when it was seen (``perf_counter``) and
    the marker; :class:`TimeoutError` past ``timeout_s``."""
    deadline = time.perf_counter() + timeout_s
    while True:
        marker = read_marker(store, job, round_)
        now = time.perf_counter()
        if marker is not None:
            return now, marker
        if now > deadline:
            raise TimeoutError(f"no warm marker for round {round_} of {job!r} in {timeout_s} s")
        time.sleep(poll_s)


@dataclass
class FirstHit:
    """How a workload's polling ended: when the first answer from memory came back
    (``perf_counter``), the requests answered otherwise before it, and that answer's meta."""

    at: float
    misses: int
    meta: dict[str, Any] = field(default_factory=dict)
    latency_ms: float = 0.0  # the hit request's own round trip, as the client saw it


def poll_until_hit(
    ask: Callable[[], dict[str, Any]], timeout_s: float, poll_s: float = POLL_S
) -> FirstHit:
    """Send ``ask()`` (one request; its answer's ``meta``) until ``meta["cache"] == "hit"``
    (every shard read was held by the node: the answer came from memory). A request answered
    ``miss`` or ``partial`` counts as a miss; :class:`TimeoutError` past ``timeout_s``."""
    deadline = time.perf_counter() + timeout_s
    misses = 0
    while True:
        t0 = time.perf_counter()
        meta = ask()
        now = time.perf_counter()
        if meta.get("cache") == "hit":
            return FirstHit(now, misses, meta, (now - t0) * 1000.0)
        misses += 1
        if now > deadline:
            raise TimeoutError(f"no answer from memory in {timeout_s} s ({misses} misses)")
        time.sleep(poll_s)


def _serve_s3(port: int) -> None:
    """A child process's whole life: an S3 server until it is terminated."""
    from lambdas.local_runtime.s3_server import LocalS3

    LocalS3(port=port).start()
    while True:
        time.sleep(3600)


class S3Process:
    """The stack's S3 (moto, as ``LocalStack`` embeds it) in a process of its own, so that its
    request handling does not share the benchmark's interpreter: ``with S3Process() as url``."""

    def __init__(self, start_timeout_s: float = 60.0) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = int(sock.getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self.start_timeout_s = start_timeout_s
        # spawn: a fork would copy the benchmark's threads and arrays into the server
        self.proc = multiprocessing.get_context("spawn").Process(
            target=_serve_s3, args=(self.port,), daemon=True
        )

    def __enter__(self) -> str:
        self.proc.start()
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self.url
            except OSError:
                if not self.proc.is_alive():
                    break
                time.sleep(0.2)
        self.__exit__()
        raise RuntimeError(f"the S3 server on port {self.port} did not start")

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        self.proc.join(timeout=30)
