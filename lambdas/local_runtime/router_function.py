"""The router as a function of the local Lambda endpoint: one request per instance, as on AWS.

Why: Powertools keeps the event it resolves in a *class* attribute (``BaseRouter.current_event``,
set by ``resolve``), shared by every resolver of a process. On Lambda an instance serves one
request at a time, so that is harmless; a router resolving requests on the local gateway's
threads in one process could match one request's path and read another's body (the chaos run's
answers for the wrong round, before a lock guarded it). So the local stack deploys the router
the way it deploys the cache nodes: a function of
:class:`~lambdas.local_runtime.lambda_endpoint.LocalLambda`, one OS process per instance
(:mod:`lambdas.local_runtime.router_instance`), its warm state (manifest and view caches) kept
between requests, and the local gateway invokes it the way API Gateway's Lambda proxy
integration does (:class:`RouterFunction`).
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any

from lambdas.local_runtime.gateway import build_event
from lambdas.local_runtime.instance_pool import FunctionSpec
from lambdas.local_runtime.invoke_errors import InvokeApiError
from lambdas.local_runtime.lambda_endpoint import LocalLambda

#: The handler the router's instances run.
HANDLER = "lambdas.local_runtime.router_instance.handler"
#: How long a request waits before asking again for an instance of a function whose old
#: instances are still draining after a reconfiguration (the only throttle left).
THROTTLE_RETRY_S = 0.005


def function_name(prefix: str) -> str:
    """The router function's name, beside ``{prefix}-cache-{i}``."""
    return f"{prefix}-router"


class RouterFunction:
    """The local gateway's integration: each request is one invocation of the router function.

    As API Gateway's Lambda proxy integration, it sends the payload-2.0 event and takes the
    function's answer (``statusCode``, ``headers``, ``body``); a function error raises, which
    the gateway answers as API Gateway does (500). A request waits for an instance while
    ``concurrency`` are busy, where API Gateway would pass on Lambda's throttle: the local
    stack serves a burst late rather than refuse it.

    Parameters
    ----------
    endpoint : LocalLambda
        The local Lambda endpoint the router function is deployed on.
    name : str
        The router function's name.
    concurrency : int
        Its reserved concurrency: most requests served at once.
    """

    def __init__(self, endpoint: LocalLambda, name: str, concurrency: int) -> None:
        self.endpoint = endpoint
        self.name = name
        self._slots = threading.BoundedSemaphore(concurrency)

    def __call__(self, event: dict[str, Any], context: Any) -> dict[str, Any]:
        payload = json.dumps(event).encode()
        with self._slots:
            while True:
                try:
                    result = self.endpoint.invoke(self.name, payload)
                    break
                except InvokeApiError as exc:  # retired instances still draining
                    if exc.status != 429:
                        raise
                    time.sleep(THROTTLE_RETRY_S)
        if result.function_error:
            raise RuntimeError(f"{self.name} failed: {result.payload[:500]!r}")
        answer = json.loads(result.payload)
        if not isinstance(answer, dict):
            raise RuntimeError(f"{self.name} answered {type(answer).__name__}, not an object")
        return answer


def deploy(endpoint: LocalLambda, spec: FunctionSpec) -> RouterFunction:
    """Deploy the router function ``spec`` (its handler :data:`HANDLER`) on ``endpoint``, warm
    one instance, and return the gateway's integration with it."""
    endpoint.add_function(spec)
    function = RouterFunction(endpoint, spec.name, spec.reserved_concurrency)
    # the first request should not pay the router's cold start (its imports, its clients)
    health = build_event("GET", "/v1/health", {}, b"", "127.0.0.1", route_key="GET /v1/health")
    warm = function(health, None)
    if warm.get("statusCode") != 200:
        raise RuntimeError(f"{spec.name} did not start: {warm}")
    return function
