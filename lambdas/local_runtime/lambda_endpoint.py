"""A local AWS Lambda endpoint that speaks the Invoke API, so boto3 works against it unchanged.

Why: FLStore's handlers must run the same locally and on AWS, and its behaviour depends on
Lambda's execution model, not only on request/response: cache nodes keep data in the memory
of a *warm* instance, a cold start costs an import, idle instances are reclaimed, a function
has a concurrency limit, and the cost model bills duration and memory. This module gives one
machine that model with no cloud account:

* ``POST /2015-03-31/functions/{name}/invocations`` with ``X-Amz-Invocation-Type``
  ``RequestResponse`` (200), ``Event`` (202, run in the background) or ``DryRun`` (204).
* One OS process per function instance (:mod:`lambdas.local_runtime.worker`); an instance
  serves one invocation at a time and keeps its module state between invocations.
* A new instance (a cold start) only when no warm one is idle, up to the function's reserved
  concurrency; beyond that, HTTP 429 ``TooManyRequestsException``. The most recently used
  idle instance is preferred, so a function with concurrency 1 keeps one warm instance.
* An idle instance is reclaimed after ``idle_timeout_s``; an invocation that runs past
  ``timeout_s``, whose RSS exceeds ``memory_mb``, or whose process dies, kills the instance
  and answers the way Lambda does (``X-Amz-Function-Error: Unhandled`` and an error body).
* A Lambda-style ``REPORT`` log line per invocation, and the billed duration and peak memory
  in ``X-Flstore-Billed-Duration-Ms`` / ``X-Flstore-Max-Memory-Mb`` (on AWS FLStore reads
  them from ``LogType=Tail``, which is supported here too).

Errors are sent the way botocore's ``rest-json`` parser reads them: the error code in the
``x-amzn-ErrorType`` header and the message under ``Message``/``message`` in the JSON body,
so boto3 raises its modelled exception classes (``ResourceNotFoundException``, ...).

Workers get the endpoint's environment plus the function's ``environment`` and the
``AWS_LAMBDA_*`` variables; only JSON crosses the pipe to them, never pickles.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from multiprocessing.connection import Connection
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, NamedTuple, Self
from urllib.parse import parse_qs, unquote, urlsplit

import psutil

log = logging.getLogger(__name__)

#: Lambda's limit for a synchronous request and response payload (6 MB).
SYNC_PAYLOAD_LIMIT = 6 * 1024 * 1024
#: Lambda's limit for an asynchronous (``Event``) request payload (1 MB since late 2025).
ASYNC_PAYLOAD_LIMIT = 1024 * 1024
#: How often an invocation's RSS is sampled and its deadline checked, in seconds.
POLL_INTERVAL_S = 0.05
#: Longest a cold start may spend importing the handler. Lambda allows 10 s; local imports of
#: heavy libraries (torch) on a loaded laptop can be slower, and failing them helps nobody.
INIT_TIMEOUT_S = 60.0
#: How much log text ``LogType=Tail`` returns, as on Lambda.
LOG_TAIL_BYTES = 4096

_PROJECT_ROOT = Path(__file__).resolve().parents[2]
_MB = 1024 * 1024


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
    state: Literal["starting", "idle", "busy"]
    invocations: int
    started_at: float  # wall-clock seconds since the epoch


@dataclass(frozen=True)
class InvocationResult:
    """What one synchronous invocation produced, before it is turned into HTTP."""

    payload: bytes
    function_error: str | None
    request_id: str
    duration_ms: float
    billed_duration_ms: int
    max_memory_mb: int
    init_duration_ms: float | None
    log_text: str


class InvokeApiError(Exception):
    """An Invoke API error response: HTTP status, botocore error code and JSON body."""

    def __init__(self, status: int, error_type: str, body: dict[str, Any]) -> None:
        super().__init__(body.get("Message") or body.get("message") or error_type)
        self.status = status
        self.error_type = error_type
        self.body = body

    @classmethod
    def not_found(cls, arn: str) -> InvokeApiError:
        """The function does not exist (404 ``ResourceNotFoundException``)."""
        return cls(
            404,
            "ResourceNotFoundException",
            {"Type": "User", "Message": f"Function not found: {arn}"},
        )

    @classmethod
    def throttled(cls) -> InvokeApiError:
        """Reserved concurrency exhausted (429 ``TooManyRequestsException``)."""
        body = {
            "Reason": "ReservedFunctionConcurrentInvocationLimitExceeded",
            "Type": "User",
            "message": "Rate Exceeded.",
        }
        return cls(429, "TooManyRequestsException", body)

    @classmethod
    def too_large(cls, limit: int) -> InvokeApiError:
        """Request payload over the limit (413 ``RequestTooLargeException``)."""
        message = f"Request must be smaller than {limit} bytes for the InvokeFunction operation"
        return cls(413, "RequestTooLargeException", {"Type": "User", "message": message})

    @classmethod
    def invalid_parameter(cls, message: str) -> InvokeApiError:
        """A malformed request parameter (400 ``InvalidParameterValueException``)."""
        return cls(400, "InvalidParameterValueException", {"Type": "User", "message": message})

    @classmethod
    def invalid_content(cls, message: str) -> InvokeApiError:
        """A payload that is not JSON (400 ``InvalidRequestContentException``)."""
        return cls(400, "InvalidRequestContentException", {"Type": "User", "message": message})


def function_name_from(identifier: str) -> str:
    """The bare function name from a name, ``name:qualifier``, partial ARN or full ARN.

    >>> function_name_from("arn:aws:lambda:us-east-1:123456789012:function:cache:$LATEST")
    'cache'
    >>> function_name_from("123456789012:function:cache")
    'cache'
    >>> function_name_from("cache:prod")
    'cache'
    """
    parts = identifier.split(":")
    if parts[0] == "arn" and len(parts) >= 7:
        return parts[6]
    if len(parts) >= 3 and parts[1] == "function":
        return parts[2]
    return parts[0]


class _Instance:
    """One worker process and its bookkeeping; the owning pool's lock guards the fields."""

    def __init__(self) -> None:
        self.state: Literal["starting", "idle", "busy"] = "starting"
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
        return self.process.pid if self.process is not None else None

    def alive(self) -> bool:
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


Outcome = Literal["message", "timeout", "oom", "exit"]


class _FunctionPool:
    """The instances and counters of one function."""

    def __init__(self, spec: FunctionSpec) -> None:
        self.spec = spec
        self.lock = threading.Lock()
        self.instances: list[_Instance] = []
        self.counters = {"invocations": 0, "cold_starts": 0, "errors": 0, "throttles": 0}

    def acquire(self) -> tuple[_Instance, bool]:
        """Take the most recently used idle instance, else reserve a new one (a cold start).

        Raises :class:`InvokeApiError` (429) when every allowed instance is busy.
        """
        dead: list[_Instance] = []
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
                inst = _Instance()
                self.instances.append(inst)
                self.counters["invocations"] += 1
                self.counters["cold_starts"] += 1
                return inst, True
        finally:
            for inst in dead:
                inst.kill()

    def release(self, inst: _Instance) -> None:
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

    def discard(self, inst: _Instance) -> None:
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
        with self.lock:
            self.counters[key] += n


def _error_payload(error_type: str, message: str, request_id: str) -> bytes:
    body = {
        "errorMessage": message,
        "errorType": error_type,
        "requestId": request_id,
        "stackTrace": [],
    }
    return json.dumps(body).encode()


def _exit_reason(returncode: int | None) -> str:
    """Lambda's wording for how the runtime process ended."""
    if returncode is None:
        return "Runtime exited without providing a reason"
    if returncode < 0:
        try:
            name = signal.strsignal(-returncode) or f"signal {-returncode}"
        except ValueError:
            name = f"signal {-returncode}"
        return f"Runtime exited with error: signal: {name.lower()}"
    return f"Runtime exited with error: exit status {returncode}"


class LocalLambda:
    """A local Lambda service: an HTTP Invoke API endpoint over per-instance worker processes.

    Parameters
    ----------
    functions : Iterable[FunctionSpec]
        The functions deployed at start; more can be added with :meth:`add_function`.
    host : str, default ``"127.0.0.1"``
        Address to listen on.
    port : int, default 0
        Port to listen on; 0 picks a free one (see :attr:`url`).
    cwd : str | Path | None, default None
        Working directory of the worker processes (``LAMBDA_TASK_ROOT``); the current
        directory when None. It is also on the workers' ``sys.path``.
    sys_path : Sequence[str | Path], default ``()``
        Extra directories put first on the workers' ``sys.path`` to find handler modules.
    region : str, default ``"us-east-1"``
        ``AWS_REGION`` of the workers unless a function's environment sets it.
    account_id : str, default ``"123456789012"``
        Account in the ARNs handed to handlers.

    Examples
    --------
    >>> with LocalLambda([FunctionSpec("echo", "mymod.handler")]) as lam:  # doctest: +SKIP
    ...     boto3.client("lambda", endpoint_url=lam.url, ...).invoke(FunctionName="echo")
    """

    def __init__(
        self,
        functions: Iterable[FunctionSpec] = (),
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        cwd: str | Path | None = None,
        sys_path: Sequence[str | Path] = (),
        region: str = "us-east-1",
        account_id: str = "123456789012",
    ) -> None:
        self._host = host
        self._port = port
        self._cwd = Path(cwd).resolve() if cwd is not None else Path.cwd()
        self._sys_path = [str(Path(p).resolve()) for p in sys_path]
        self._region = region
        self._account_id = account_id
        self._pools: dict[str, _FunctionPool] = {}
        self._pools_lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()
        for spec in functions:
            self.add_function(spec)

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> Self:
        """Start serving in a background thread, and the idle-instance reaper."""
        if self._server is not None:
            return self
        self._stopping.clear()
        server = ThreadingHTTPServer((self._host, self._port), _InvokeRequestHandler)
        server.daemon_threads = True
        server.local_lambda = self  # type: ignore[attr-defined]
        self._server = server
        self._threads = [
            threading.Thread(target=server.serve_forever, name="local-lambda-http", daemon=True),
            threading.Thread(target=self._reap_forever, name="local-lambda-reaper", daemon=True),
        ]
        for thread in self._threads:
            thread.start()
        log.info("local Lambda endpoint listening on %s", self.url)
        return self

    def stop(self) -> None:
        """Stop serving and kill every instance."""
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        for thread in self._threads:
            thread.join(timeout=5)
        self._threads = []
        for pool in self._all_pools():
            pool.kill_all()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """Base URL for ``boto3.client("lambda", endpoint_url=...)``."""
        if self._server is None:
            raise RuntimeError("LocalLambda is not started; call start() first")
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    # -- functions and introspection --------------------------------------------------------

    def add_function(self, spec: FunctionSpec) -> None:
        """Deploy a function, or replace its configuration.

        Replacing retires the old instances: idle ones are killed, running invocations finish
        on the old configuration and their instances are then dropped.
        """
        if spec.reserved_concurrency < 1:
            raise ValueError(f"{spec.name}: reserved_concurrency must be >= 1")
        with self._pools_lock:
            old = self._pools.get(spec.name)
            self._pools[spec.name] = _FunctionPool(spec)
        if old is not None:
            old.retire()

    def function_arn(self, name: str) -> str:
        """The ARN handlers see as ``invoked_function_arn``."""
        return f"arn:aws:lambda:{self._region}:{self._account_id}:function:{name}"

    def instances(self, name: str) -> list[InstanceInfo]:
        """The live instances of a function."""
        pool = self._pool(name)
        with pool.lock:
            return [
                InstanceInfo(i.pid, i.state, i.invocations, i.started_at) for i in pool.instances
            ]

    def function_spec(self, name: str) -> FunctionSpec:
        """The configuration of a deployed function; :class:`InvokeApiError` (404) if none."""
        return self._pool(name).spec

    def kill_instances(self, name: str) -> None:
        """SIGKILL every instance of a function, as if its node died."""
        self._pool(name).kill_all()

    def stats(self) -> dict[str, dict[str, int]]:
        """Per-function counters: ``invocations``, ``cold_starts``, ``errors``, ``throttles``."""
        out = {}
        for pool in self._all_pools():
            with pool.lock:
                out[pool.spec.name] = dict(pool.counters)
        return out

    # -- invocation -------------------------------------------------------------------------

    def invoke(self, name: str, payload: bytes = b"") -> InvocationResult:
        """Run one synchronous invocation; the HTTP layer and tests call this.

        ``payload`` is the event as JSON bytes (empty means ``{}``). Raises
        :class:`InvokeApiError` when the function is unknown or throttled; everything that
        goes wrong inside the function is reported in the result, as Lambda does.
        """
        pool = self._pool(name)
        spec = pool.spec
        inst, cold = pool.acquire()
        request_id = str(uuid.uuid4())
        init_ms: float | None = None
        try:
            if cold:
                t0 = time.perf_counter()
                self._spawn(pool, inst)
                outcome, message, peak = self._await(inst, t0 + INIT_TIMEOUT_S, spec.memory_mb)
                init_ms = (time.perf_counter() - t0) * 1000
                failure = self._init_failure(inst, outcome, message, request_id)
                if failure is not None:
                    pool.discard(inst)
                    pool.count("errors")
                    return self._finish(spec, request_id, failure, "Unhandled", 0.0, init_ms, peak)
                with pool.lock:
                    inst.state = "busy"
            else:
                peak = 0
            outcome, message, run_peak, duration_ms = self._run(inst, spec, request_id, payload)
            peak = max(peak, run_peak)
        except BaseException:
            pool.discard(inst)
            raise
        with pool.lock:
            inst.invocations += 1
        body, function_error, handler_log, keep = self._run_outcome(
            inst, outcome, message, request_id, spec
        )
        if keep:
            pool.release(inst)
        else:
            pool.discard(inst)
        if function_error is not None:
            pool.count("errors")
        return self._finish(
            spec, request_id, body, function_error, duration_ms, init_ms, peak, handler_log
        )

    def _run(
        self, inst: _Instance, spec: FunctionSpec, request_id: str, payload: bytes
    ) -> tuple[Outcome, bytes | None, int, float]:
        """Send one event to a ready instance and wait for its reply under the limits.

        Returns the outcome, the reply, the peak RSS and the duration in milliseconds.
        """
        assert inst.conn is not None
        start = time.perf_counter()
        header = {
            "request_id": request_id,
            "arn": self.function_arn(spec.name),
            "deadline_ms": int(time.time() * 1000 + spec.timeout_s * 1000),
        }
        try:
            inst.conn.send_bytes(json.dumps(header).encode() + b"\n" + payload)
        except OSError:
            return "exit", None, 0, (time.perf_counter() - start) * 1000
        outcome, message, peak = self._await(inst, start + spec.timeout_s, spec.memory_mb)
        if outcome == "timeout":
            return outcome, message, peak, spec.timeout_s * 1000
        return outcome, message, peak, (time.perf_counter() - start) * 1000

    def _spawn(self, pool: _FunctionPool, inst: _Instance) -> None:
        """Start the worker process of a new instance."""
        spec = pool.spec
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
                cwd=self._cwd,
                env=self._environment(spec),
                pass_fds=(child_sock.fileno(),),
            )
        except BaseException:
            parent_sock.close()
            raise
        finally:
            child_sock.close()
        with pool.lock:
            inst.process = process
            inst.conn = Connection(parent_sock.detach())
            inst.started_at = time.time()
            with contextlib.suppress(psutil.Error):
                inst.ps = psutil.Process(process.pid)
            killed = inst.killed
        if killed:  # kill_instances() ran while we were starting
            with contextlib.suppress(ProcessLookupError):
                process.kill()

    def _environment(self, spec: FunctionSpec) -> dict[str, str]:
        """The worker's environment: ours, the function's, then Lambda's own variables."""
        env = dict(os.environ)
        env.update(spec.environment)
        path = [*self._sys_path, str(self._cwd), str(_PROJECT_ROOT)]
        if env.get("PYTHONPATH"):
            path.append(env["PYTHONPATH"])
        day = datetime.now(UTC).strftime("%Y/%m/%d")
        major, minor = sys.version_info[:2]
        env.update(
            {
                "PYTHONPATH": os.pathsep.join(path),
                "PYTHONUNBUFFERED": "1",
                "_HANDLER": spec.handler,
                "LAMBDA_TASK_ROOT": str(self._cwd),
                "AWS_LAMBDA_FUNCTION_NAME": spec.name,
                "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": str(spec.memory_mb),
                "AWS_LAMBDA_FUNCTION_VERSION": "$LATEST",
                "AWS_LAMBDA_LOG_GROUP_NAME": f"/aws/lambda/{spec.name}",
                "AWS_LAMBDA_LOG_STREAM_NAME": f"{day}/[$LATEST]{uuid.uuid4().hex}",
                "AWS_LAMBDA_INITIALIZATION_TYPE": "on-demand",
                "AWS_EXECUTION_ENV": f"AWS_Lambda_python{major}.{minor}",
            }
        )
        env.setdefault("AWS_REGION", self._region)
        env.setdefault("AWS_DEFAULT_REGION", env["AWS_REGION"])
        return env

    @staticmethod
    def _await(
        inst: _Instance, deadline: float, memory_mb: int
    ) -> tuple[Outcome, bytes | None, int]:
        """Wait for the worker's next message while watching its deadline, RSS and liveness.

        Returns the outcome, the message (for ``"message"``) and the peak RSS in bytes.
        """
        assert inst.conn is not None
        limit = memory_mb * _MB
        peak = 0
        while True:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                return "timeout", None, peak
            try:
                ready = inst.conn.poll(min(POLL_INTERVAL_S, remaining))
                message = inst.conn.recv_bytes() if ready else None
            except (EOFError, OSError):
                return "exit", None, peak
            rss = inst.rss_bytes()
            peak = max(peak, rss)
            # Checked after a reply too: memory still held at the end was over the limit while
            # the handler ran, and Lambda's cgroup would have killed the sandbox then.
            if rss > limit:
                return "oom", None, peak
            if message is not None:
                return "message", message, peak

    @staticmethod
    def _init_failure(
        inst: _Instance, outcome: Outcome, message: bytes | None, request_id: str
    ) -> bytes | None:
        """The error payload when a cold start did not reach ``ready``, else None."""
        if outcome == "timeout":
            return _error_payload(
                "Sandbox.Timedout", f"Init timed out after {INIT_TIMEOUT_S:.2f} seconds", request_id
            )
        if outcome == "oom":
            return _error_payload(
                "Runtime.OutOfMemory", "Runtime exited with error: signal: killed", request_id
            )
        if outcome == "exit" or message is None:
            inst.kill()
            code = inst.process.returncode if inst.process is not None else None
            return _error_payload(
                "Runtime.ExitError",
                f"RequestId: {request_id} Error: {_exit_reason(code)}",
                request_id,
            )
        head = json.loads(message.partition(b"\n")[0])
        if head.get("type") == "ready":
            return None
        body = {
            "errorMessage": head.get("errorMessage", ""),
            "errorType": head.get("errorType", "Runtime.Unknown"),
            "requestId": request_id,
            "stackTrace": head.get("stackTrace", []),
        }
        return json.dumps(body).encode()

    @staticmethod
    def _run_outcome(
        inst: _Instance,
        outcome: Outcome,
        message: bytes | None,
        request_id: str,
        spec: FunctionSpec,
    ) -> tuple[bytes, str | None, str, bool]:
        """Turn an invocation's outcome into (payload, function error, log, keep instance)."""
        if outcome == "timeout":
            text = f"Task timed out after {spec.timeout_s:.2f} seconds"
            return _error_payload("Sandbox.Timedout", text, request_id), "Unhandled", "", False
        if outcome == "oom":
            text = "Runtime exited with error: signal: killed"
            return _error_payload("Runtime.OutOfMemory", text, request_id), "Unhandled", "", False
        if outcome == "exit" or message is None:
            inst.kill()
            code = inst.process.returncode if inst.process is not None else None
            text = f"RequestId: {request_id} Error: {_exit_reason(code)}"
            return _error_payload("Runtime.ExitError", text, request_id), "Unhandled", "", False
        raw_head, _, payload = message.partition(b"\n")
        head = json.loads(raw_head)
        log_text = str(head.get("log", ""))
        if not head.get("ok"):
            error = {k: head[k] for k in ("errorMessage", "errorType", "requestId", "stackTrace")}
            return json.dumps(error).encode(), "Unhandled", log_text, True
        if len(payload) > SYNC_PAYLOAD_LIMIT:
            text = (
                "Response payload size exceeded maximum allowed payload size "
                f"({SYNC_PAYLOAD_LIMIT} bytes)."
            )
            body = _error_payload("Function.ResponseSizeTooLarge", text, request_id)
            return body, "Unhandled", log_text, True
        return payload, None, log_text, True

    @staticmethod
    def _finish(
        spec: FunctionSpec,
        request_id: str,
        payload: bytes,
        function_error: str | None,
        duration_ms: float,
        init_ms: float | None,
        peak_rss: int,
        handler_log: str = "",
    ) -> InvocationResult:
        """Log the START/END/REPORT lines and build the result."""
        # Since August 2025 Lambda bills the init phase of on-demand functions as well.
        billed = max(1, math.ceil(duration_ms + (init_ms or 0.0)))
        max_mb = min(spec.memory_mb, math.ceil(peak_rss / _MB)) if peak_rss else 0
        report = (
            f"REPORT RequestId: {request_id}\tDuration: {duration_ms:.2f} ms\t"
            f"Billed Duration: {billed} ms\tMemory Size: {spec.memory_mb} MB\t"
            f"Max Memory Used: {max_mb} MB"
        )
        if init_ms is not None:
            report += f"\tInit Duration: {init_ms:.2f} ms"
        if function_error is not None:
            try:
                error_type = json.loads(payload).get("errorType", "")
            except (ValueError, AttributeError):
                error_type = ""
            report += f"\tStatus: error\tError Type: {error_type}"
        log.info("[%s] %s", spec.name, report)
        log_text = (
            f"START RequestId: {request_id} Version: $LATEST\n{handler_log}"
            f"END RequestId: {request_id}\n{report}\n"
        )
        return InvocationResult(
            payload=payload,
            function_error=function_error,
            request_id=request_id,
            duration_ms=duration_ms,
            billed_duration_ms=billed,
            max_memory_mb=max_mb,
            init_duration_ms=init_ms,
            log_text=log_text,
        )

    def invoke_event(self, name: str, payload: bytes = b"") -> None:
        """Queue an asynchronous (``Event``) invocation and return at once.

        Like Lambda's internal queue, a throttled event waits for a free instance instead of
        failing; unlike Lambda, a failed event is not retried (FLStore's events are not
        idempotent).
        """
        self.function_spec(name)  # unknown functions fail now, as on Lambda

        def run() -> None:
            delay = 0.01
            while not self._stopping.is_set():
                try:
                    result = self.invoke(name, payload)
                except InvokeApiError as exc:
                    if exc.status != 429:
                        log.warning("event for %s dropped: %s", name, exc)
                        return
                    self._stopping.wait(delay)
                    delay = min(delay * 2, 0.5)
                    continue
                if result.function_error:
                    log.warning("event for %s failed: %s", name, result.payload[:500])
                return

        threading.Thread(target=run, name=f"local-lambda-event-{name}", daemon=True).start()

    # -- internals --------------------------------------------------------------------------

    def _pool(self, name: str) -> _FunctionPool:
        with self._pools_lock:
            pool = self._pools.get(name)
        if pool is None:
            raise InvokeApiError.not_found(self.function_arn(name))
        return pool

    def _all_pools(self) -> list[_FunctionPool]:
        with self._pools_lock:
            return list(self._pools.values())

    def _reap_forever(self) -> None:
        """Reclaim idle instances; checks a few times per shortest idle timeout."""
        while not self._stopping.is_set():
            pools = self._all_pools()
            for pool in pools:
                pool.reap_idle(time.monotonic())
            shortest = min((p.spec.idle_timeout_s for p in pools), default=1.0)
            self._stopping.wait(min(1.0, max(0.05, shortest / 4)))


class _InvokeRequestHandler(BaseHTTPRequestHandler):
    """HTTP front of :class:`LocalLambda`: parses Invoke requests and writes Lambda responses."""

    protocol_version = "HTTP/1.1"  # keep-alive, as botocore's connection pool expects
    server_version = "FLStoreLocalLambda/1.0"

    @property
    def lam(self) -> LocalLambda:
        return self.server.local_lambda  # type: ignore[attr-defined, no-any-return]

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s - %s", self.address_string(), format % args)

    def setup(self) -> None:
        super().setup()
        # header and body go out as two writes: without NODELAY, Nagle plus the client's
        # delayed ACK add ~40 ms to every keep-alive invocation
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def do_POST(self) -> None:
        request_id = str(uuid.uuid4())
        try:
            body = self._read_body()
            name = self._function_name()
            self._dispatch(name, body, request_id)
        except InvokeApiError as exc:
            self._send_error(exc, request_id)
        except Exception as exc:  # a bug here must still answer, or boto3 retries blindly
            log.exception("local Lambda endpoint failed on %s", self.path)
            error = InvokeApiError(
                500, "ServiceException", {"Type": "Service", "Message": str(exc)}
            )
            self._send_error(error, request_id)

    def do_GET(self) -> None:
        self._read_body()
        self._send_error(self._unknown_operation(), str(uuid.uuid4()))

    do_PUT = do_DELETE = do_GET

    def _dispatch(self, name: str, body: bytes, request_id: str) -> None:
        invocation_type = self.headers.get("X-Amz-Invocation-Type", "RequestResponse")
        if invocation_type not in ("RequestResponse", "Event", "DryRun"):
            raise InvokeApiError.invalid_parameter(
                f"1 validation error detected: Value '{invocation_type}' at 'invocationType' "
                "failed to satisfy constraint: Member must satisfy enum value set: "
                "[Event, RequestResponse, DryRun]"
            )
        limit = ASYNC_PAYLOAD_LIMIT if invocation_type == "Event" else SYNC_PAYLOAD_LIMIT
        if len(body) > limit:
            raise InvokeApiError.too_large(limit)
        if body.strip():
            try:
                json.loads(body)
            except ValueError as exc:
                raise InvokeApiError.invalid_content(
                    f"Could not parse request body into json: {exc}"
                ) from exc
        if invocation_type == "DryRun":
            self.lam.function_spec(name)
            self._send(204, b"", {"x-amzn-RequestId": request_id})
            return
        if invocation_type == "Event":
            self.lam.invoke_event(name, body)
            self._send(202, b"", {"x-amzn-RequestId": request_id})
            return
        result = self.lam.invoke(name, body)
        headers = {
            "x-amzn-RequestId": result.request_id,
            "Content-Type": "application/json",
            "X-Amz-Executed-Version": "$LATEST",
            "X-Flstore-Billed-Duration-Ms": str(result.billed_duration_ms),
            "X-Flstore-Max-Memory-Mb": str(result.max_memory_mb),
        }
        if result.function_error:
            headers["X-Amz-Function-Error"] = result.function_error
        if self.headers.get("X-Amz-Log-Type", "None") == "Tail":
            tail = result.log_text.encode()[-LOG_TAIL_BYTES:]
            headers["X-Amz-Log-Result"] = base64.b64encode(tail).decode()
        self._send(200, result.payload, headers)

    def _function_name(self) -> str:
        parts = urlsplit(self.path)
        segments = parts.path.strip("/").split("/")
        if (
            len(segments) != 4
            or segments[0] != "2015-03-31"
            or segments[1] != "functions"
            or segments[3] != "invocations"
        ):
            raise self._unknown_operation()
        qualifier = parse_qs(parts.query).get("Qualifier", ["$LATEST"])[0]
        del qualifier  # one version per function locally; every qualifier is $LATEST
        return function_name_from(unquote(segments[2]))

    def _unknown_operation(self) -> InvokeApiError:
        return InvokeApiError(
            404,
            "UnknownOperationException",
            {"Type": "User", "Message": f"{self.command} {self.path}"},
        )

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            return b"".join(self._read_chunks())
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _read_chunks(self) -> Iterator[bytes]:
        while True:
            size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while self.rfile.readline().strip():  # trailers
                    pass
                return
            yield self.rfile.read(size)
            self.rfile.readline()

    def _send_error(self, exc: InvokeApiError, request_id: str) -> None:
        headers = {
            "x-amzn-RequestId": request_id,
            "x-amzn-ErrorType": exc.error_type,
            "Content-Type": "application/json",
        }
        self._send(exc.status, json.dumps(exc.body).encode(), headers)

    def _send(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body:
            self.wfile.write(body)
