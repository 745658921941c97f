"""A local AWS Lambda endpoint that speaks the Invoke API, so boto3 works against it unchanged.

Why: FLStore's handlers must run the same locally and on AWS, and its behaviour depends on
Lambda's execution model, not only on request/response: cache nodes keep data in the memory
of a *warm* instance, a cold start costs an import, idle instances are reclaimed, a function
has a concurrency limit, and the cost model bills duration and memory. :class:`LocalLambda`
gives one machine that model with no cloud account, by composing three parts:

* :mod:`lambdas.local_runtime.instance_pool`: one OS process per function instance, warm
  reuse, cold starts, idle reclaim, the concurrency limit and the deadline/memory watch.
* :mod:`lambdas.local_runtime.invocation_outcome`: what an invocation produced, in Lambda's
  words (error payloads, ``X-Amz-Function-Error``, the ``REPORT`` line and the log tail).
* :mod:`lambdas.local_runtime.invoke_api`: the HTTP server speaking the Invoke API
  (``POST /2015-03-31/functions/{name}/invocations``), whose errors are
  :class:`~lambdas.local_runtime.invoke_errors.InvokeApiError` responses.

An invocation that runs past ``timeout_s``, whose RSS exceeds ``memory_mb``, or whose process
dies, kills the instance and answers the way Lambda does (``X-Amz-Function-Error: Unhandled``
and an error body). This module keeps every name it exported before the split, so
``from lambdas.local_runtime.lambda_endpoint import FunctionSpec, LocalLambda`` still works.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

from lambdas.local_runtime.function_network import FunctionNetwork, PacedInvokes
from lambdas.local_runtime.instance_pool import (
    INIT_TIMEOUT_S,
    POLL_INTERVAL_S,
    FunctionInstance,
    FunctionPool,
    FunctionSpec,
    InstanceInfo,
    Outcome,
    WorkerLaunch,
)
from lambdas.local_runtime.invocation_outcome import (
    LOG_TAIL_BYTES,
    SYNC_PAYLOAD_LIMIT,
    InvocationResult,
    finish_invocation,
    init_failure,
    run_outcome,
)
from lambdas.local_runtime.invoke_api import (
    ASYNC_PAYLOAD_LIMIT,
    InvokeApiServer,
    InvokeBackend,
    function_name_from,
)
from lambdas.local_runtime.invoke_errors import InvokeApiError

__all__ = [
    "ASYNC_PAYLOAD_LIMIT",
    "INIT_TIMEOUT_S",
    "LOG_TAIL_BYTES",
    "POLL_INTERVAL_S",
    "SYNC_PAYLOAD_LIMIT",
    "FunctionSpec",
    "InstanceInfo",
    "InvocationResult",
    "InvokeApiError",
    "LocalLambda",
    "function_name_from",
]

log = logging.getLogger(__name__)


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
    network : FunctionNetwork | None, default None
        With one, every invocation through the Invoke API (:attr:`invoke_api`: HTTP, the
        invoke channel, in process) waits its modelled network round trip and payloads
        (:class:`~lambdas.local_runtime.function_network.PacedInvokes`); :meth:`invoke` itself
        is never paced (the local gateway's integration paces its own hop).

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
        network: FunctionNetwork | None = None,
    ) -> None:
        self._host = host
        self._port = port
        self._launch = WorkerLaunch(
            cwd=Path(cwd).resolve() if cwd is not None else Path.cwd(),
            sys_path=tuple(str(Path(p).resolve()) for p in sys_path),
            region=region,
        )
        self._region = region
        self._account_id = account_id
        self._pools: dict[str, FunctionPool] = {}
        self._pools_lock = threading.Lock()
        self._server: InvokeApiServer | None = None
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()
        #: what every Invoke API client reaches: this service, paced by the network model
        self.invoke_api: InvokeBackend = self if network is None else PacedInvokes(self, network)
        for spec in functions:
            self.add_function(spec)

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> Self:
        """Start serving in a background thread, and the idle-instance reaper."""
        if self._server is not None:
            return self
        self._stopping.clear()
        server = InvokeApiServer((self._host, self._port), self.invoke_api)
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
            self._pools[spec.name] = FunctionPool(spec)
        if old is not None:
            old.retire()

    def function_arn(self, name: str) -> str:
        """The ARN handlers see as ``invoked_function_arn``."""
        return f"arn:aws:lambda:{self._region}:{self._account_id}:function:{name}"

    def instances(self, name: str) -> list[InstanceInfo]:
        """The live instances of a function."""
        return self._pool(name).instance_infos()

    def function_spec(self, name: str) -> FunctionSpec:
        """The configuration of a deployed function; :class:`InvokeApiError` (404) if none."""
        return self._pool(name).spec

    def kill_instances(self, name: str) -> None:
        """SIGKILL every instance of a function, as if its node died."""
        self._pool(name).kill_all()

    def stats(self) -> dict[str, dict[str, int]]:
        """Per-function counters: ``invocations``, ``cold_starts``, ``errors``, ``throttles``."""
        return {pool.spec.name: pool.counter_values() for pool in self._all_pools()}

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
                pool.spawn(inst, self._launch)
                outcome, message, peak = inst.await_message(t0 + INIT_TIMEOUT_S, spec.memory_mb)
                init_ms = (time.perf_counter() - t0) * 1000
                failure = init_failure(inst, outcome, message, request_id)
                if failure is not None:
                    pool.discard(inst)
                    pool.count("errors")
                    return finish_invocation(
                        spec, request_id, failure, "Unhandled", 0.0, init_ms, peak
                    )
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
        body, function_error, handler_log, keep = run_outcome(
            inst, outcome, message, request_id, spec
        )
        if keep:
            pool.release(inst)
        else:
            pool.discard(inst)
        if function_error is not None:
            pool.count("errors")
        return finish_invocation(
            spec, request_id, body, function_error, duration_ms, init_ms, peak, handler_log
        )

    def _run(
        self, inst: FunctionInstance, spec: FunctionSpec, request_id: str, payload: bytes
    ) -> tuple[Outcome, bytes | None, int, float]:
        """Send one event to a ready instance under the function's timeout and memory limits."""
        start = time.perf_counter()
        header = {
            "request_id": request_id,
            "arn": self.function_arn(spec.name),
            "deadline_ms": int(time.time() * 1000 + spec.timeout_s * 1000),
        }
        return inst.run_event(header, payload, start, spec.timeout_s, spec.memory_mb)

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

    def _pool(self, name: str) -> FunctionPool:
        with self._pools_lock:
            pool = self._pools.get(name)
        if pool is None:
            raise InvokeApiError.not_found(self.function_arn(name))
        return pool

    def _all_pools(self) -> list[FunctionPool]:
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
