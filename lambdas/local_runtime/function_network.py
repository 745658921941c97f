"""The local stack's functions on the modelled network: an interface each, their S3 hop, their
invocations.

On AWS every function instance has a network interface of its own, which carries its S3
traffic and the payloads of the invocations it serves. :class:`FunctionNetwork` keeps one
:class:`~lambdas.local_runtime.network.Nic` per function name for the stack's life, puts a
:class:`~lambdas.local_runtime.fault_proxy.FaultProxy` paced by that interface between each
function and S3 (:meth:`FunctionNetwork.s3_endpoint`), and :class:`PacedInvokes` makes every
invocation through the Invoke API — over HTTP, the invoke channel or in process, all of which
answer through one backend — wait the invoke's round trip and its payloads. The delays are
added after the local work is done, so the instance is free during them, as it is on AWS while
the answer travels.
"""

from __future__ import annotations

import threading
import time

from lambdas.local_runtime.fault_proxy import FaultProxy
from lambdas.local_runtime.instance_pool import FunctionSpec
from lambdas.local_runtime.invocation_outcome import InvocationResult
from lambdas.local_runtime.invoke_api import InvokeBackend
from lambdas.local_runtime.invoke_errors import InvokeApiError
from lambdas.local_runtime.network import NetworkModel, Nic, invoke_delay_s


class FunctionNetwork:
    """Every function's interface and S3 hop under ``model``, one of each per function name."""

    def __init__(self, model: NetworkModel) -> None:
        self.model = model
        self._nics: dict[str, Nic] = {}
        self._proxies: dict[str, FaultProxy] = {}
        self._lock = threading.Lock()

    def nic(self, name: str) -> Nic:
        """Function ``name``'s interface: made at first use, kept for the stack's life."""
        with self._lock:
            nic = self._nics.get(name)
            if nic is None:
                nic = self._nics[name] = self.model.lambda_nic
            return nic

    def invoke_delay_s(self, name: str, payload_bytes: int) -> float:
        """An invocation of ``name`` moving ``payload_bytes`` (request and answer): the round
        trip plus the bytes through the function's interface."""
        return invoke_delay_s(self.model, self.nic(name), payload_bytes)

    def s3_endpoint(self, name: str, upstream: str) -> str:
        """The S3 endpoint function ``name`` is given: a proxy to ``upstream`` that paces every
        answer as S3 would for a client behind the function's interface (started at first use).

        A function of several instances (the router function) shares one proxy and one
        interface, where AWS gives each instance its own: a fair approximation while its
        instances' S3 traffic is small beside the nodes' (manifests, not rounds)."""
        link = self.model.s3_link(self.nic(name))
        with self._lock:
            proxy = self._proxies.get(name)
            if proxy is None:
                proxy = self._proxies[name] = FaultProxy(upstream, link=link).start()
            return proxy.url

    def proxy(self, name: str) -> FaultProxy | None:
        """Function ``name``'s S3 proxy (its ``counts()``), None if it has none."""
        with self._lock:
            return self._proxies.get(name)

    def stop(self) -> None:
        """Stop every S3 proxy."""
        with self._lock:
            proxies, self._proxies = list(self._proxies.values()), {}
        for proxy in proxies:
            proxy.stop()


class PacedInvokes:
    """``backend`` as a client of the Invoke API meets it on AWS: every invocation — answered,
    throttled or queued as an event — waits the invoke's round trip on top of the local one,
    and its payloads through the called function's interface.

    Parameters
    ----------
    backend : InvokeBackend
        The local Lambda service.
    network : FunctionNetwork
        The functions' interfaces.
    """

    def __init__(self, backend: InvokeBackend, network: FunctionNetwork) -> None:
        self.backend = backend
        self.network = network

    def function_spec(self, name: str) -> FunctionSpec:
        """The configuration of a deployed function (unpaced: no invocation)."""
        return self.backend.function_spec(name)

    def invoke(self, name: str, payload: bytes = b"") -> InvocationResult:
        """One synchronous invocation, then its modelled round trip and payloads."""
        try:
            result = self.backend.invoke(name, payload)
        except InvokeApiError:  # a throttle or an unknown function is a round trip too
            self._wait(name, len(payload))
            raise
        self._wait(name, len(payload) + len(result.payload))
        return result

    def invoke_event(self, name: str, payload: bytes = b"") -> None:
        """Queue an asynchronous invocation; the caller waits the round trip to Lambda's queue."""
        self.backend.invoke_event(name, payload)
        self._wait(name, len(payload))

    def _wait(self, name: str, payload_bytes: int) -> None:
        time.sleep(self.network.invoke_delay_s(name, payload_bytes))
