"""The instances of each local Lambda function: worker processes, warm reuse and their limits.

Why: FLStore's cache nodes keep data in the memory of a *warm* instance, so the local endpoint
must keep Lambda's execution model, not only its request/response:

* One OS process per function instance (:mod:`lambdas.local_runtime.worker`); an instance
  serves one invocation at a time and keeps its module state between invocations.
* A new instance (a cold start) only when no warm one is idle, up to the function's reserved
  concurrency; beyond that the invocation is throttled. The most recently used idle instance is
  preferred, so a function with concurrency 1 keeps one warm instance.
* An idle instance is reclaimed after ``idle_timeout_s``; while an instance works, its deadline,
  its RSS against ``memory_mb`` and its liveness are watched.

Workers get the endpoint's environment plus the function's ``environment`` and the
``AWS_LAMBDA_*`` variables; only JSON crosses the pipe to them, never pickles.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Literal, NamedTuple

import psutil

from lambdas.local_runtime.invoke_errors import InvokeApiError

log = logging.getLogger(__name__)

#: How often an invocation's RSS is sampled and its deadline checked, in seconds.
POLL_INTERVAL_S = 0.05
#: Longest a cold start may spend importing the handler. Lambda allows 10 s; local imports of
#: heavy libraries (torch) on a loaded laptop can be slower, and failing them helps nobody.
INIT_TIMEOUT_S = 60.0
#: Bytes in a megabyte, as Lambda counts memory sizes.
MB = 1024 * 1024

_PROJECT_ROOT = Path(__file__).resolve().parents[2]

InstanceState = Literal["starting", "idle", "busy"]
#: How waiting on a worker ended: it sent a message, ran out of time or memory, or died.
Outcome = Literal["message", "timeout", "oom", "exit"]


@dataclass(frozen=True)
class FunctionSpec:
    """One deployable function, as in a Lambda function configuration.

    Parameters
    ----------
    name : str
        Function name, the ``{name}`` in the Invoke path.
    handler : str
        ``"package.module.function"``; the module is imported once per instance.
    environment : dict[str, str], default ``{}``
        Extra environment variables for the instance processes.
    memory_mb : int, default 1024
        Memory size; an instance whose RSS exceeds it is killed (``Runtime.OutOfMemory``).
    timeout_s : float, default 30
        Longest an invocation may run before its instance is killed (``Sandbox.Timedout``).
    reserved_concurrency : int, default 10
        Most instances alive at once; further concurrent invocations are throttled (429).
    idle_timeout_s : float, default 300
        An instance idle this long is reclaimed; the next invocation is a cold start.
    """

    name: str
    handler: str
    environment: dict[str, str] = field(default_factory=dict)
    memory_mb: int = 1024
    timeout_s: float = 30
    reserved_concurrency: int = 10
    idle_timeout_s: float = 300


class InstanceInfo(NamedTuple):
    """A snapshot of one instance, for tests and benchmarks."""

    pid: int | None
    state: InstanceState
    invocations: int
    started_at: float  # wall-clock seconds since the epoch


@dataclass(frozen=True)
class WorkerLaunch:
    """How the endpoint starts worker processes, whatever the function.

    Parameters
    ----------
    cwd : Path
        Working directory of the workers (``LAMBDA_TASK_ROOT``), also on their ``sys.path``.
    sys_path : tuple[str, ...]
        Directories put first on the workers' ``sys.path`` to find handler modules.
    region : str
        ``AWS_REGION`` of the workers unless a function's environment sets it.
    """

    cwd: Path
    sys_path: tuple[str, ...]
    region: str

    def environment(self, spec: FunctionSpec) -> dict[str, str]:
        """The worker's environment: ours, the function's, then Lambda's own variables."""
        env = dict(os.environ)
        env.update(spec.environment)
        path = [*self.sys_path, str(self.cwd), str(_PROJECT_ROOT)]
        if env.get("PYTHONPATH"):
            path.append(env["PYTHONPATH"])
        day = datetime.now(UTC).strftime("%Y/%m/%d")
        major, minor = sys.version_info[:2]
        env.update(
            {
                "PYTHONPATH": os.pathsep.join(path),
                "PYTHONUNBUFFERED": "1",
                "_HANDLER": spec.handler,
                "LAMBDA_TASK_ROOT": str(self.cwd),
                "AWS_LAMBDA_FUNCTION_NAME": spec.name,
                "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": str(spec.memory_mb),
                "AWS_LAMBDA_FUNCTION_VERSION": "$LATEST",
                "AWS_LAMBDA_LOG_GROUP_NAME": f"/aws/lambda/{spec.name}",
                "AWS_LAMBDA_LOG_STREAM_NAME": f"{day}/[$LATEST]{uuid.uuid4().hex}",
                "AWS_LAMBDA_INITIALIZATION_TYPE": "on-demand",
                "AWS_EXECUTION_ENV": f"AWS_Lambda_python{major}.{minor}",
            }
        )
        env.setdefault("AWS_REGION", self.region)
        env.setdefault("AWS_DEFAULT_REGION", env["AWS_REGION"])
        return env


class FunctionInstance:
    """One worker process and its bookkeeping; the owning pool's lock guards the fields."""

    def __init__(self) -> None:
        self.state: InstanceState = "starting"
        self.process: subprocess.Popen[bytes] | None = None
        self.conn: Connection | None = None
        self.ps: psutil.Process | None = None
        self.invocations = 0
        self.started_at = time.time()
        self.last_used = time.monotonic()
        self.killed = False  # kill_instances() hit it while starting or busy
        self.retired = False  # its configuration was replaced; drop it when it is released

    @property
    def pid(self) -> int | None:
        """The worker's process id; None before it is spawned."""
        return self.process.pid if self.process is not None else None

    def alive(self) -> bool:
        """Whether the worker process is still running."""
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL the process and reap it; safe to call more than once."""
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=5)
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def rss_bytes(self) -> int:
        """Resident memory of the worker process; 0 once it is gone."""
        if self.ps is None:
            return 0
        # Only the worker itself: scanning for children every poll costs a /proc walk, and
        # handlers that fork are not part of FLStore.
        try:
            return int(self.ps.memory_info().rss)
        except psutil.Error:
            return 0

    def await_message(self, deadline: float, memory_mb: int) -> tuple[Outcome, bytes | None, int]:
        """Wait for the worker's next message while watching its deadline, RSS and liveness.

        ``deadline`` is on the :func:`time.perf_counter` clock. Returns the outcome, the message
        (for ``"message"``) and the peak RSS in bytes.
        """
        assert self.conn is not None
        limit = memory_mb * MB
        peak = 0
        while True:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                return "timeout", None, peak
            try:
                ready = self.conn.poll(min(POLL_INTERVAL_S, remaining))
                message = self.conn.recv_bytes() if ready else None
            except (EOFError, OSError):
                return "exit", None, peak
            rss = self.rss_bytes()
            peak = max(peak, rss)
            # Checked after a reply too: memory still held at the end was over the limit while
            # the handler ran, and Lambda's cgroup would have killed the sandbox then.
            if rss > limit:
                return "oom", None, peak
            if message is not None:
                return "message", message, peak

    def run_event(
        self,
        header: dict[str, Any],
        payload: bytes,
        start: float,
        timeout_s: float,
        memory_mb: int,
    ) -> tuple[Outcome, bytes | None, int, float]:
        """Send one event to this ready instance and wait for its reply under the limits.

        The message is ``<header JSON>\\n<event JSON>`` (:mod:`lambdas.local_runtime.worker`);
        ``start`` is when the invocation began on the :func:`time.perf_counter` clock. Returns
        the outcome, the reply, the peak RSS and the duration in milliseconds.
        """
        assert self.conn is not None
        try:
            self.conn.send_bytes(json.dumps(header).encode() + b"\n" + payload)
        except OSError:
            return "exit", None, 0, (time.perf_counter() - start) * 1000
        outcome, message, peak = self.await_message(start + timeout_s, memory_mb)
        if outcome == "timeout":
            return outcome, message, peak, timeout_s * 1000
        return outcome, message, peak, (time.perf_counter() - start) * 1000


class FunctionPool:
    """The instances and counters of one function."""

    def __init__(self, spec: FunctionSpec) -> None:
        self.spec = spec
        self.lock = threading.Lock()
        self.instances: list[FunctionInstance] = []
        self.counters = {"invocations": 0, "cold_starts": 0, "errors": 0, "throttles": 0}

    def acquire(self) -> tuple[FunctionInstance, bool]:
        """Take the most recently used idle instance, else reserve a new one (a cold start).

        Returns the instance and whether it is a cold start (then :meth:`spawn` it). Raises
        :class:`InvokeApiError` (429) when every allowed instance is busy.
        """
        dead: list[FunctionInstance] = []
        try:
            with self.lock:
                idle = [i for i in self.instances if i.state == "idle"]
                for inst in sorted(idle, key=lambda i: i.last_used, reverse=True):
                    if not inst.alive():  # died while idle (killed from outside)
                        self.instances.remove(inst)
                        dead.append(inst)
                        continue
                    inst.state = "busy"
                    self.counters["invocations"] += 1
                    return inst, False
                if len(self.instances) >= self.spec.reserved_concurrency:
                    self.counters["throttles"] += 1
                    raise InvokeApiError.throttled()
                inst = FunctionInstance()
                self.instances.append(inst)
                self.counters["invocations"] += 1
                self.counters["cold_starts"] += 1
                return inst, True
        finally:
            for inst in dead:
                inst.kill()

    def spawn(self, inst: FunctionInstance, launch: WorkerLaunch) -> None:
        """Start the worker process of a new instance reserved by :meth:`acquire`."""
        parent_sock, child_sock = socket.socketpair()
        try:
            process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "lambdas.local_runtime.worker",
                    "--fd",
                    f"{child_sock.fileno()}",
                ],
                cwd=launch.cwd,
                env=launch.environment(self.spec),
                pass_fds=(child_sock.fileno(),),
            )
        except BaseException:
            parent_sock.close()
            raise
        finally:
            child_sock.close()
        with self.lock:
            inst.process = process
            inst.conn = Connection(parent_sock.detach())
            inst.started_at = time.time()
            with contextlib.suppress(psutil.Error):
                inst.ps = psutil.Process(process.pid)
            killed = inst.killed
        if killed:  # kill_instances() ran while we were starting
            with contextlib.suppress(ProcessLookupError):
                process.kill()

    def release(self, inst: FunctionInstance) -> None:
        """Return an instance to the warm pool after a completed invocation."""
        with self.lock:
            if inst.killed or inst.retired or inst not in self.instances:
                drop = True
            else:
                inst.state = "idle"
                inst.last_used = time.monotonic()
                drop = False
        if drop:
            self.discard(inst)

    def discard(self, inst: FunctionInstance) -> None:
        """Remove an instance from the pool and kill its process."""
        with self.lock:
            if inst in self.instances:
                self.instances.remove(inst)
        inst.kill()

    def reap_idle(self, now: float) -> None:
        """Kill instances idle longer than the function's idle timeout, or already dead."""
        with self.lock:
            stale = [
                i
                for i in self.instances
                if i.state == "idle"
                and (now - i.last_used > self.spec.idle_timeout_s or not i.alive())
            ]
            for inst in stale:
                self.instances.remove(inst)
        for inst in stale:
            log.debug("reclaiming idle instance pid=%s of %s", inst.pid, self.spec.name)
            inst.kill()

    def retire(self) -> None:
        """Kill idle instances now and drop busy ones when their invocation ends."""
        with self.lock:
            idle = [i for i in self.instances if i.state == "idle"]
            for inst in self.instances:
                inst.retired = True
            for inst in idle:
                self.instances.remove(inst)
        for inst in idle:
            inst.kill()

    def kill_all(self) -> None:
        """SIGKILL every instance; busy ones are dropped when their invocation notices."""
        with self.lock:
            victims = list(self.instances)
            idle = [i for i in victims if i.state == "idle"]
            for inst in victims:
                inst.killed = True
            for inst in idle:
                self.instances.remove(inst)
        for inst in victims:
            # Popen.kill() skips a process already reaped, so a recycled pid is never hit.
            if inst.process is not None:
                with contextlib.suppress(ProcessLookupError):
                    inst.process.kill()
        for inst in idle:
            inst.kill()

    def count(self, key: str, n: int = 1) -> None:
        """Add ``n`` to one of the function's counters (``errors``, ...)."""
        with self.lock:
            self.counters[key] += n

    def instance_infos(self) -> list[InstanceInfo]:
        """A snapshot of the live instances."""
        with self.lock:
            return [
                InstanceInfo(i.pid, i.state, i.invocations, i.started_at) for i in self.instances
            ]

    def counter_values(self) -> dict[str, int]:
        """A snapshot of the counters: ``invocations``, ``cold_starts``, ``errors``, ..."""
        with self.lock:
            return dict(self.counters)
