"""The local gateway answers as API Gateway's HTTP API in front of the router (ARCHITECTURE §4, §6).

Everything goes over HTTP to a real :class:`LocalStack` (one cache node): routes and methods,
HEAD, the Lambda authorizer (payload 2.0, simple responses, identity-source caching) and API
Gateway's own 401/403 bodies, the router's 403 for a job a valid token is not granted, bodies
that are not UTF-8, not JSON or too large — and 1,000 random requests, none answered with a 5xx
or a body that is not JSON.
"""

from __future__ import annotations

import http.client
import json
import socket
import socketserver
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flstore_core.routing.request_body import MAX_BODY_BYTES
from lambdas.local_runtime.gateway import (
    MAX_PAYLOAD,
    ROUTES,
    AuthorizerCache,
    LocalGateway,
    match_route,
)
from lambdas.local_runtime.stack import LocalStack, StackConfig
from tests.conftest import small_update

OTHER = "fls_granted-other-only"
UNAUTHORIZED = {"message": "Unauthorized"}
FORBIDDEN = {"message": "Forbidden"}


@pytest.fixture(scope="module")
def stack(s3_server: Any) -> Iterator[LocalStack]:
    config = StackConfig(
        nodes=1,
        replication=1,
        memory_mb=1024,
        bucket="gateway-tests",
        s3_endpoint=s3_server.url,
        tokens={OTHER: ["other"]},
    )
    with LocalStack(config) as st_:
        assert st_.store is not None
        for i in range(3):
            st_.store.put_update("demo", 0, f"c{i}", small_update(i))
        st_.store.commit_round("demo", 0)
        yield st_


def request(
    stack: LocalStack,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """Status, lower-cased headers and raw body of one request on a fresh connection."""
    url = urlsplit(stack.gateway_url)
    assert url.hostname is not None
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def raw(stack: LocalStack, data: bytes) -> tuple[int, bytes]:
    """Send bytes as they are; the status and body of the answer."""
    url = urlsplit(stack.gateway_url)
    with socket.create_connection((url.hostname, url.port), timeout=30) as sock:
        sock.sendall(data)
        resp = http.client.HTTPResponse(sock)
        resp.begin()
        return resp.status, resp.read()


# --- routes and methods --------------------------------------------------------------------


@pytest.mark.parametrize(
    "method", ["PATCH", "OPTIONS", "TRACE", "CONNECT", "DELETE", "PUT", "FOO", "M-SEARCH"]
)
@pytest.mark.parametrize("path", ["/v1/health", "/v1/workloads", "/nowhere", "/v1/jobs/demo"])
def test_unmatched_method_or_route_is_a_json_404(stack: LocalStack, method: str, path: str) -> None:
    status, headers, body = request(stack, method, path, headers=bearer(stack.token))
    assert status == 404
    assert headers["content-type"] == "application/json"
    assert json.loads(body)["error"]["code"] == "not_found"


def test_unmatched_route_needs_no_token_to_be_a_404(stack: LocalStack) -> None:
    calls = stack.gateway.authorizer_calls  # type: ignore[union-attr]
    status, _, body = request(stack, "GET", "/v2/anything")
    assert (status, json.loads(body)["error"]["code"]) == (404, "not_found")
    assert stack.gateway.authorizer_calls == calls  # type: ignore[union-attr]


@pytest.mark.parametrize("path", ["/v1/health", "/v1/workloads", "/v1/jobs/demo/rounds"])
def test_head_answers_gets_headers_without_a_body(stack: LocalStack, path: str) -> None:
    get_status, get_headers, get_body = request(stack, "GET", path, headers=bearer(stack.token))
    status, headers, body = request(stack, "HEAD", path, headers=bearer(stack.token))
    assert (status, body) == (get_status, b"")
    assert get_status == 200 and get_body
    assert headers["content-length"] == get_headers["content-length"] == str(len(get_body))
    assert headers["content-type"] == get_headers["content-type"]


def test_head_of_a_guarded_route_without_a_token_is_401_without_a_body(stack: LocalStack) -> None:
    status, headers, body = request(stack, "HEAD", "/v1/workloads")
    assert (status, body) == (401, b"")
    assert headers["content-length"] == str(len(json.dumps(UNAUTHORIZED, separators=(",", ":"))))


def test_every_route_of_the_table_reaches_the_router(stack: LocalStack) -> None:
    concrete = {"{job}": "demo", "{name}": "cosine_select"}
    for route in ROUTES:
        path = route.path
        for k, v in concrete.items():
            path = path.replace(k, v)
        body = json.dumps({"round": 0}).encode() if route.method == "POST" else None
        status, _, answer = request(stack, route.method, path, body, bearer(stack.token))
        assert status == 200, (route.key, answer)


def test_route_matching_takes_one_segment_per_parameter() -> None:
    assert match_route("GET", "/v1/jobs/demo/rounds") == (ROUTES[2], {"job": "demo"})
    assert match_route("HEAD", "/v1/jobs/demo/rounds") == (ROUTES[2], {"job": "demo"})
    taken = match_route("POST", "/v1/jobs/demo/workloads/krum")
    assert taken == (ROUTES[3], {"job": "demo", "name": "krum"})
    for method, path in [
        ("GET", "/v1/jobs/a/b/rounds"),
        ("GET", "/v1/jobs//rounds"),
        ("POST", "/v1/jobs/demo/rounds"),
        ("GET", "/v1/health/"),
        ("GET", "/v1/healthz"),
    ]:
        assert match_route(method, path) is None, (method, path)


# --- the authorizer -------------------------------------------------------------------------


@pytest.mark.parametrize("headers", [{}, {"Authorization": ""}, {"Authorization": "   "}])
def test_missing_identity_source_is_401_without_calling_the_authorizer(
    stack: LocalStack, headers: dict[str, str]
) -> None:
    calls = stack.gateway.authorizer_calls  # type: ignore[union-attr]
    status, _, body = request(stack, "GET", "/v1/workloads", headers=headers)
    assert (status, json.loads(body)) == (401, UNAUTHORIZED)
    assert stack.gateway.authorizer_calls == calls  # type: ignore[union-attr]


@pytest.mark.parametrize("header", ["Bearer fls_unknown", "Basic abc", "fls_x", "Bearer"])
def test_refused_token_is_api_gateways_403(stack: LocalStack, header: str) -> None:
    for path in ("/v1/workloads", "/v1/jobs/demo/rounds"):
        status, _, body = request(stack, "GET", path, headers={"Authorization": header})
        assert (status, json.loads(body)) == (403, FORBIDDEN)


def test_health_is_served_without_the_authorizer(stack: LocalStack) -> None:
    calls = stack.gateway.authorizer_calls  # type: ignore[union-attr]
    for headers in ({}, {"Authorization": "Bearer fls_unknown"}):
        status, _, body = request(stack, "GET", "/v1/health", headers=headers)
        assert (status, json.loads(body)) == (200, {"status": "ok"})
    assert stack.gateway.authorizer_calls == calls  # type: ignore[union-attr]


def test_valid_token_not_granted_the_job_gets_the_routers_403(stack: LocalStack) -> None:
    for method, path, body in [
        ("GET", "/v1/jobs/demo/rounds", None),
        ("POST", "/v1/jobs/demo/workloads/cosine_select", b'{"round": 0}'),
    ]:
        status, _, answer = request(stack, method, path, body, bearer(OTHER))
        assert status == 403
        assert json.loads(answer)["error"]["code"] == "forbidden"
    status, _, answer = request(stack, "GET", "/v1/workloads", headers=bearer(OTHER))
    assert status == 200


def test_authorizer_gets_a_payload_2_event_and_its_context_reaches_the_router(
    stack: LocalStack,
) -> None:
    gateway = stack.gateway
    assert gateway is not None and gateway.authorizer is not None
    seen: dict[str, dict[str, Any]] = {}
    authorizer, router = gateway.authorizer, gateway.handler

    def spy_authorizer(event: dict[str, Any], ctx: Any) -> dict[str, Any]:
        seen["authorizer"] = event
        return authorizer(event, ctx)

    def spy_router(event: dict[str, Any], ctx: Any) -> dict[str, Any]:
        seen["router"] = event
        return router(event, ctx)

    header = f"bearer {OTHER}"  # a header value seen for the first time: not cached
    gateway.authorizer, gateway.handler = spy_authorizer, spy_router
    try:
        status, _, _ = request(
            stack, "GET", "/v1/jobs/other/rounds", headers={"Authorization": header}
        )
    finally:
        gateway.authorizer, gateway.handler = authorizer, router
    assert status == 404  # the router ran: job "other" has no rounds
    event = seen["authorizer"]
    assert event["version"] == "2.0" and event["type"] == "REQUEST"
    assert event["routeKey"] == "GET /v1/jobs/{job}/rounds"
    assert event["pathParameters"] == {"job": "other"}
    assert event["identitySource"] == [header]
    assert event["routeArn"].endswith("/$default/GET/v1/jobs/other/rounds")
    assert event["headers"]["authorization"] == header
    assert "body" not in event
    routed = seen["router"]
    assert routed["routeKey"] == "GET /v1/jobs/{job}/rounds"
    assert routed["requestContext"]["authorizer"] == {"lambda": {"jobs": "other"}}


def test_authorizer_answers_are_cached_by_the_identity_source(stack: LocalStack) -> None:
    gateway = stack.gateway
    assert gateway is not None
    header = {"Authorization": "Bearer fls_cached-unknown"}
    request(stack, "GET", "/v1/workloads", headers=header)
    calls = gateway.authorizer_calls
    for path in ("/v1/workloads", "/v1/jobs/demo/rounds", "/v1/jobs/x/workloads/krum"):
        method = "POST" if "workloads/" in path else "GET"
        status, _, body = request(stack, method, path, headers=header)
        assert (status, json.loads(body)) == (403, FORBIDDEN)
    assert gateway.authorizer_calls == calls
    request(stack, "GET", "/v1/workloads", headers={"Authorization": "Bearer fls_other-one"})
    assert gateway.authorizer_calls == calls + 1


def test_cached_answers_expire_after_the_ttl() -> None:
    cache = AuthorizerCache(ttl_s=0.05)
    cache.put(("Bearer x",), {"isAuthorized": True})
    assert cache.get(("Bearer x",)) == {"isAuthorized": True}
    time.sleep(0.06)
    assert cache.get(("Bearer x",)) is None
    off = AuthorizerCache(ttl_s=0)
    off.put(("Bearer x",), {"isAuthorized": True})
    assert off.get(("Bearer x",)) is None


@pytest.mark.parametrize(
    "answer", [None, {}, {"isAuthorized": "yes"}, RuntimeError("authorizer crashed")]
)
def test_a_broken_authorizer_is_api_gateways_500(answer: Any) -> None:
    def authorizer(event: dict[str, Any], ctx: Any) -> Any:
        if isinstance(answer, Exception):
            raise answer
        return answer

    def router(event: dict[str, Any], ctx: Any) -> dict[str, Any]:
        raise AssertionError("the router must not run")

    with LocalGateway(router, authorizer=authorizer) as gw:
        status, _, body = gw.answer("GET", "/v1/workloads", [("Authorization", "x")], b"", "")
    assert (status, json.loads(body)) == (500, {"message": "Internal Server Error"})


# --- bodies ---------------------------------------------------------------------------------

RUN = "/v1/jobs/demo/workloads/cosine_select"


@pytest.mark.parametrize(
    "body", [b"\xff\xfe\x00{", b'{"round": 0, "params": "\xe9"}', b"\x80" * 1000]
)
def test_body_that_is_not_utf8_is_a_400(stack: LocalStack, body: bytes) -> None:
    status, _, answer = request(stack, "POST", RUN, body, bearer(stack.token))
    assert status == 400
    assert json.loads(answer)["error"]["code"] == "invalid_request"


@pytest.mark.parametrize("body", [b"not json", b"{", b"[1, 2]", b"null", b'"round"'])
def test_body_that_is_not_a_json_object_is_a_400(stack: LocalStack, body: bytes) -> None:
    status, _, answer = request(stack, "POST", RUN, body, bearer(stack.token))
    assert status == 400
    assert json.loads(answer)["error"]["code"] == "invalid_request"


def test_body_past_the_routers_limit_is_a_413(stack: LocalStack) -> None:
    body = json.dumps({"round": 0, "params": {"pad": "x" * MAX_BODY_BYTES}}).encode()
    status, _, answer = request(stack, "POST", RUN, body, bearer(stack.token))
    assert (status, json.loads(answer)["error"]["code"]) == (413, "payload_too_large")


def test_declared_length_past_api_gateways_limit_is_a_413_before_any_body(
    stack: LocalStack,
) -> None:
    head = (
        f"POST {RUN} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {stack.token}\r\n"
        f"Content-Length: {MAX_PAYLOAD + 1}\r\n\r\n"
    )
    status, body = raw(stack, head.encode())
    assert (status, json.loads(body)["error"]["code"]) == (413, "payload_too_large")


@pytest.mark.parametrize("length", ["abc", "-1", "1e3", "99999999999999999999999"])
def test_malformed_content_length_is_a_400(stack: LocalStack, length: str) -> None:
    head = f"POST {RUN} HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n\r\n{{}}"
    status, body = raw(stack, head.encode())
    assert status in (400, 413)
    assert "error" in json.loads(body)


def test_chunked_body_is_read_and_a_malformed_one_is_a_400(stack: LocalStack) -> None:
    auth = f"Authorization: Bearer {stack.token}\r\n"
    head = f"POST {RUN} HTTP/1.1\r\nHost: x\r\n{auth}Transfer-Encoding: chunked\r\n\r\n"
    good = head + '5\r\n{"rou\r\n8\r\nnd": 0}\r\n0\r\n\r\n'
    status, body = raw(stack, good.encode())
    assert status == 200, body
    assert json.loads(body)["workload"] == "cosine_select"
    status, body = raw(stack, (head + "zz\r\n{}\r\n0\r\n\r\n").encode())
    assert (status, json.loads(body)["error"]["code"]) == (400, "invalid_request")


@pytest.mark.parametrize(
    "data",
    [
        b"GARBAGE\r\n\r\n",
        b"GET /v1/health HTTP/9.9\r\n\r\n",
        b"GET /v1/health HTTP/1.1\r\n" + b"X: y\r\n" * 120 + b"\r\n",
        b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\n\r\n",
    ],
)
def test_requests_http_server_refuses_get_json_4xx(stack: LocalStack, data: bytes) -> None:
    status, body = raw(stack, data)
    assert 400 <= status < 500
    assert "error" in json.loads(body)


# --- 1,000 random requests ------------------------------------------------------------------

TOKEN_CHARS = "!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
PATH_CHARS = "".join(chr(c) for c in range(33, 127) if chr(c) not in "#")
VALID_PATHS = [
    "/v1/health",
    "/v1/workloads",
    "/v1/jobs/demo/rounds",
    "/v1/jobs/demo/workloads/cosine_select",
    "/v1/jobs/demo/workloads/nope",
    "/v1/jobs/Bad..Id/rounds",
    "/v1/jobs/%2e%2e/rounds",
    "/v1/jobs/demo/workloads/fedavg?x=1&&y",
    "/v1/openapi.json",
    "/v1/docs",
    "/",
    "*",
    "//v1/health",
]
STATS: Counter[str] = Counter()
NOT_SIZE = frozenset(set(range(256)) - set(b"0123456789abcdefABCDEF \t\r\n;"))


@st.composite
def random_requests(draw: st.DrawFn) -> tuple[str, str, dict[str, str], bytes | None]:
    served = st.sampled_from(["GET", "GET", "POST", "POST", "HEAD"])
    others = st.sampled_from(["PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"])
    method = draw(st.one_of(served, served, others, st.text(TOKEN_CHARS, min_size=1, max_size=12)))
    path = draw(
        st.one_of(
            st.sampled_from(VALID_PATHS),
            st.sampled_from(VALID_PATHS),
            st.builds(lambda p: "/" + p, st.text(PATH_CHARS, max_size=60)),
            st.builds(
                lambda job, name: f"/v1/jobs/{job}/workloads/{name}",
                st.text(PATH_CHARS.replace("/", ""), min_size=1, max_size=20),
                st.text(PATH_CHARS.replace("/", ""), min_size=1, max_size=20),
            ),
        )
    )
    header_text = st.text(st.characters(min_codepoint=32, max_codepoint=255), max_size=40)
    headers = draw(
        st.dictionaries(
            st.text(TOKEN_CHARS, min_size=1, max_size=16).filter(
                lambda k: (
                    k.lower()
                    not in {
                        "content-length",
                        "transfer-encoding",
                        "authorization",
                        "host",
                        "expect",
                    }
                )
            ),
            header_text,
            max_size=5,
        )
    )
    token = draw(st.sampled_from(["valid", "other", "none", "junk"]))
    if token == "junk":
        headers["Authorization"] = draw(header_text)
    elif token != "none":
        headers["Authorization"] = "Bearer valid" if token == "valid" else f"Bearer {OTHER}"
    body = draw(
        st.one_of(
            st.none(),
            st.binary(max_size=300),
            st.builds(
                lambda v: json.dumps(v).encode(),
                st.dictionaries(
                    st.text(max_size=8), st.integers() | st.text(max_size=8) | st.none(), max_size=4
                ),
            ),
            st.builds(
                lambda r, p: json.dumps({"round": r, "params": p}).encode(),
                st.integers(-3, 3) | st.text(max_size=3),
                st.dictionaries(st.text(max_size=8), st.integers(-5, 5) | st.floats(), max_size=3),
            ),
        )
    )
    framing = draw(st.sampled_from(["plain"] * 8 + ["huge", "junk", "chunked-junk"]))
    if framing == "huge":
        headers["Content-Length"] = str(draw(st.integers(MAX_PAYLOAD + 1, 2**63)))
        body = None
    elif framing == "junk":
        headers["Content-Length"] = draw(st.sampled_from(["-1", "x", "1.5", "", " "]))
        body = None
    elif framing == "chunked-junk":
        # a complete but malformed chunked body: a size line that is not hex (an incomplete
        # one would rightly keep the gateway waiting for the rest)
        headers["Transfer-Encoding"] = "chunked"
        size = draw(st.binary(min_size=1, max_size=20).filter(lambda b: not NOT_SIZE.isdisjoint(b)))
        body = size.replace(b"\n", b"").replace(b";", b"") + b"\r\n0\r\n\r\n"
    return method, path, headers, body


@settings(
    max_examples=1000,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(req=random_requests())
def test_random_requests_get_no_5xx_and_only_json(
    stack: LocalStack, req: tuple[str, str, dict[str, str], bytes | None]
) -> None:
    method, path, headers, body = req
    if headers.get("Authorization") == "Bearer valid":
        headers["Authorization"] = f"Bearer {stack.token}"
    url = urlsplit(stack.gateway_url)
    assert url.hostname is not None
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=15)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        for k, v in headers.items():
            conn.putheader(k, v.encode("latin-1"))
        if body is not None and "Content-Length" not in headers:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        resp = conn.getresponse()
        data = resp.read()
    finally:
        conn.close()
    STATS["requests"] += 1
    STATS[str(resp.status)] += 1
    assert resp.status < 500, (method, path, headers, body, data)
    if method == "HEAD":
        assert data == b""
    elif resp.status == 200 and urlsplit(path).path == "/v1/docs":
        assert resp.getheader("Content-Type", "").startswith("text/html")  # Swagger UI
    elif data:
        try:
            json.loads(data)
        except ValueError:
            STATS["not_json"] += 1
            raise


def test_random_request_figures(capsys: pytest.CaptureFixture[str]) -> None:
    """Prints the figures of the random-request run above (run with -s to see them)."""
    with capsys.disabled():
        print("\nrandom requests:", dict(sorted(STATS.items())))


def test_concurrent_requests_never_swap_their_arguments(stack: LocalStack) -> None:
    """Each request is resolved by a resolver of its own: 8 threads sending requests for two
    jobs and three routes at once each get the answer to their own request (the resolver keeps
    the request it resolves on itself, so sharing one across threads mixed them up)."""
    import threading

    assert stack.store is not None
    for i in range(2):
        stack.store.put_update("solo", 0, f"s{i}", small_update(50 + i))
    stack.store.commit_round("solo", 0)
    auth = bearer(stack.token)
    wrong: list[str] = []

    def worker(k: int) -> None:
        for j in range(25):
            job = ("demo", "solo")[(k + j) % 2]
            if j % 3 == 0:
                status, _, body = request(stack, "GET", f"/v1/jobs/{job}/rounds", headers=auth)
                ok = status == 200 and json.loads(body)["job"] == job
            else:
                name = ("cosine_select", "fedavg")[j % 2]
                payload = json.dumps({"round": 0, "params": {"k": 1} if j % 2 == 0 else {}})
                status, _, body = request(
                    stack, "POST", f"/v1/jobs/{job}/workloads/{name}", payload.encode(), auth
                )
                answer = json.loads(body)
                ok = status == 200 and (answer["job"], answer["workload"]) == (job, name)
            if not ok:
                wrong.append(f"{job}: {status} {body[:200]!r}")

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wrong == []


def test_each_request_is_one_invocation_of_a_router_instance(stack: LocalStack) -> None:
    """Powertools keeps the event it resolves in a class attribute, one per process: the local
    gateway resolves no request in its own process but hands each to an instance of the router
    function, a process of its own serving one request at a time, as on Lambda."""
    import os
    import threading

    assert stack.lam is not None and stack.router_function is not None
    name = stack.router_function.name
    before = stack.lam.stats()[name]["invocations"]
    statuses: list[int] = []

    def call() -> None:
        for _ in range(5):
            statuses.append(request(stack, "GET", "/v1/health")[0])

    threads = [threading.Thread(target=call) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert statuses == [200] * 20
    assert stack.lam.stats()[name]["invocations"] == before + 20
    instances = stack.lam.instances(name)
    assert instances and all(i.pid not in (None, os.getpid()) for i in instances)


@pytest.mark.parametrize(
    "server",
    ["gateway", "lambda endpoint", "fault proxy"],
)
def test_a_burst_of_new_connections_is_queued_not_dropped(server: str) -> None:
    """64 clients connecting at once while no thread accepts yet are all let in: the kernel's
    accept queue holds them (socketserver's default backlog of 5 let 6 in, and Linux dropped the
    others' handshakes — a client then waits for its 1 s SYN retransmit, the chaos benchmark's
    ~1,050 ms p99, or sees its connection reset)."""
    from lambdas.local_runtime.fault_proxy import FaultProxy
    from lambdas.local_runtime.invoke_api import InvokeApiServer

    listener: socketserver.TCPServer
    if server == "gateway":
        listener = LocalGateway(lambda event, ctx: {"statusCode": 200})._server
    elif server == "lambda endpoint":
        listener = InvokeApiServer(("127.0.0.1", 0), backend=None)  # type: ignore[arg-type]
    else:
        listener = FaultProxy("http://127.0.0.1:9")._server
    host, port = listener.server_address[:2]
    sockets: list[socket.socket] = []
    refused = 0
    try:
        for _ in range(64):  # nothing serves the listener: only the accept queue holds them
            s = socket.socket()
            s.settimeout(0.5)
            try:
                s.connect((str(host), int(port)))
                s.send(b"x")  # a connection the kernel dropped is reset by this (or the next)
            except OSError:
                refused += 1
            sockets.append(s)
        time.sleep(0.2)
        for s in sockets:
            try:
                s.send(b"y")
            except OSError:
                refused += 1
    finally:
        for s in sockets:
            s.close()
        listener.server_close()
    assert refused == 0
