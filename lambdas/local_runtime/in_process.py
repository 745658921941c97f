"""boto3's ``lambda.invoke`` to a local Lambda endpoint in the same process, without the socket.

Why: the local stack's own router (``LocalStack.router``, its admin calls) runs in the local Lambda
endpoint's process, so every invocation it makes went boto3 -> urllib3 -> TCP loopback -> the
endpoint's HTTP server thread (``http.server``'s header parsing) -> the instance's worker and back,
the answer parsed again by ``http.client``. On a warm, tiny request (a node working 0.03-0.2 ms)
that round trip was a third of the request's latency (``benchmarks/request_floor.py``). Everything
but the socket is kept: the router still calls ``client.invoke`` (ARCHITECTURE §3), botocore still
validates, serializes, resolves the endpoint, signs and parses the answer, and the answer is the one
the HTTP server would have written (:func:`~lambdas.local_runtime.invoke_api.answer_invoke` makes
both), so status codes, function errors, throttling and the log tail reach the router's invoker
exactly as over HTTP.

Requests answered in process are not signed (``choose-signer`` answers ``UNSIGNED``): SigV4
(canonical request, SHA-256 of the payload, HMAC chain) was ~0.1 ms of the ~0.35 ms botocore
spent per invocation, and the local endpoint never checked a signature, over HTTP either. A
client that reaches AWS never gets this transport, so it signs as always.

How: botocore emits ``before-send`` with the prepared request just before it would send it over
HTTP, and sends nothing when a handler answers with a response (what ``botocore.stub.Stubber``
does); :func:`serve_in_process` registers such a handler on one client. Only requests to the
endpoint's own URL are answered in process: any other (AWS's endpoint, a proxy in front of the
endpoint) goes over the network as before. The endpoint's HTTP server keeps serving every other
client (the CLI, other processes, tests).
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import urlsplit

from botocore import UNSIGNED
from botocore.awsrequest import AWSPreparedRequest, AWSResponse

from lambdas.local_runtime.invoke_api import InvokeBackend, answer_invoke

if TYPE_CHECKING:
    from mypy_boto3_lambda import LambdaClient

#: The botocore event answered: every Lambda operation the client sends.
EVENT = "before-send.lambda"
#: The botocore event choosing how a request is signed.
SIGNER_EVENT = "choose-signer.lambda"


class ResponseBody(io.BytesIO):
    """An answer's body, as botocore reads a urllib3 response: ``read`` and ``stream``."""

    def stream(self, amt: int = 2**16, decode_content: bool | None = None) -> Iterator[bytes]:
        while chunk := self.read(amt):
            yield chunk


class InProcessTransport:
    """The ``before-send`` handler answering a client's requests to ``url`` from ``backend``.

    Parameters
    ----------
    backend : InvokeBackend
        The local Lambda service (:class:`~lambdas.local_runtime.lambda_endpoint.LocalLambda`).
    url : str
        The endpoint URL the client was made with; requests to another host go over HTTP.
    """

    def __init__(self, backend: InvokeBackend, url: str) -> None:
        self.backend = backend
        origin = urlsplit(url)
        self._origin = (origin.scheme, origin.netloc)
        self.answered = 0  # requests answered in process (tests and benchmarks read it)

    def __call__(self, request: AWSPreparedRequest, **kwargs: Any) -> AWSResponse | None:
        url = urlsplit(request.url)
        if (url.scheme, url.netloc) != self._origin:
            return None
        target = url.path + (f"?{url.query}" if url.query else "")
        status, headers, body = answer_invoke(
            self.backend, request.method, target, _Headers(request.headers), request_body(request)
        )
        headers = {**headers, "Content-Length": str(len(body))}
        self.answered += 1
        # AWSResponse takes any mapping (it copies it into a HeadersDict); the stubs say
        # HTTPHeaders, which only the urllib3 path builds
        return AWSResponse(request.url, status, headers, ResponseBody(body))  # type: ignore[arg-type]


class _Headers:
    """A prepared request's headers as the Invoke API reads them: any case, values as text
    (botocore holds some as bytes, the way they go on the wire)."""

    def __init__(self, headers: Any) -> None:
        self._headers = headers  # botocore's HeadersDict: case-insensitive

    def get(self, name: str, /) -> str | None:
        value = self._headers.get(name)
        return value.decode("latin-1") if isinstance(value, bytes) else value


def request_body(request: AWSPreparedRequest) -> bytes:
    """The request body botocore prepared: bytes, text, a file-like object or nothing."""
    body: Any = request.body
    if body is None:
        return b""
    if isinstance(body, bytes | bytearray):
        return bytes(body)
    if isinstance(body, str):
        return body.encode()
    data = body.read()
    if hasattr(body, "seek"):
        body.seek(0)  # botocore rewinds a body it resends; leave it as found
    return data if isinstance(data, bytes) else str(data).encode()


def _unsigned(**kwargs: Any) -> Any:
    return UNSIGNED


def skip_signing(client: LambdaClient) -> None:
    """Send ``client``'s requests unsigned: for a client of the local endpoint in another
    process, which never checks a signature (SigV4 was ~0.1 ms of every invocation)."""
    client.meta.events.register(SIGNER_EVENT, cast("Callable[..., None]", _unsigned))


def serve_in_process(
    client: LambdaClient, backend: InvokeBackend, *, sign: bool = False
) -> InProcessTransport:
    """Answer ``client``'s requests to its own endpoint URL from ``backend``, in this process.

    Every request of ``client`` goes to that URL, so none is signed unless ``sign``: nothing
    checks a signature on this path. Returns the registered handler (its ``answered`` counts
    the requests it answered).
    """
    transport = InProcessTransport(backend, str(client.meta.endpoint_url))
    # the stubs type handlers as returning None: these handlers' answers are what counts
    events = client.meta.events
    events.register(EVENT, cast("Callable[..., None]", transport))
    if not sign:
        skip_signing(client)
    return transport
