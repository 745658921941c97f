"""The Python client speaks the HTTP API of ARCHITECTURE §4 and raises the typed errors."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from flstore_core.errors import (
    AuthenticationError,
    FLStoreError,
    ForbiddenError,
    InvalidIdError,
    InvalidParamsError,
    NotFoundError,
    PayloadTooLargeError,
    UnavailableError,
    ValidationError,
)
from flstore_core.sdk.client import FLStoreClient, result_model

TOKEN = "dev-token-123"

# Jobs whose workload runs answer with a canned error: (status, code).
ERRORS = {
    "e401": (401, "unauthorized"),
    "e403": (403, "forbidden"),
    "e404": (404, "not_found"),
    "e400": (400, "invalid_request"),
    "e400p": (400, "invalid_params"),
    "e400id": (400, "invalid_id"),
    "e413": (413, "payload_too_large"),
    "e503": (503, "unavailable"),
}


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: Any
    client_port: int


@dataclass
class FakeAPI:
    url: str
    seen: list[Seen] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    drop_after_next: bool = False


def _handler(api: FakeAPI) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as API Gateway and the local gateway
        disable_nagle_algorithm = True  # headers and body are separate writes

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _answer(self, status: int, body: object, raw: bytes | None = None) -> None:
            data = raw if raw is not None else json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            with api.lock:
                drop, api.drop_after_next = api.drop_after_next, False
            if drop:  # close the idle keep-alive connection without telling the client
                self.close_connection = True

        def _record(self) -> Any:
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length)) if length else None
            with api.lock:
                api.seen.append(
                    Seen(self.command, self.path, dict(self.headers), body, self.client_address[1])
                )
            return body

        def do_GET(self) -> None:
            self._record()
            parts = self.path.split("/")
            if self.path == "/v1/health":
                self._answer(200, {"status": "ok"})
            elif self.path == "/v1/workloads":
                self._answer(200, {"workloads": [{"name": "fedavg", "class": "round"}]})
            elif len(parts) == 5 and parts[:3] == ["", "v1", "jobs"] and parts[4] == "rounds":
                rounds = [{"round": 0, "clients": ["c0", "c1"], "bytes": 1234}]
                self._answer(200, {"job": parts[3], "rounds": rounds})
            else:
                self._answer(404, {"error": {"code": "not_found", "message": "no route"}})

        def do_POST(self) -> None:
            body = self._record()
            parts = self.path.split("/")
            job, workload = parts[3], parts[5]
            if job in ERRORS:
                status, code = ERRORS[job]
                self._answer(status, {"error": {"code": code, "message": f"canned {code}"}})
            elif job == "gw401":  # API Gateway's own answer when its authorizer denies
                self._answer(401, {"message": "Unauthorized"})
            elif job == "gw502":
                self._answer(502, None, raw=b"<html>Bad Gateway</html>")
            elif job == "notjson":
                self._answer(200, None, raw=b"not json")
            else:
                result = {"selected": ["c1"], "echo": body}
                if workload == "fedavg":
                    result["model_key"] = (
                        f"jobs/{job}/results/fedavg/00000000/model.safetensors.zst"
                    )
                self._answer(
                    200,
                    {
                        "job": job,
                        "workload": workload,
                        "round": body.get("round"),
                        "result": result,
                        "meta": {"nodes": ["flstore-cache-0"], "cache": "hit", "latency_ms": 1.0},
                    },
                )

    return Handler


@pytest.fixture(scope="module")
def api_server() -> Iterator[FakeAPI]:
    fake = FakeAPI(url="")
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(fake))
    server.daemon_threads = True
    fake.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield fake
    server.shutdown()
    server.server_close()


@pytest.fixture
def api(api_server: FakeAPI) -> FakeAPI:
    with api_server.lock:
        api_server.seen.clear()
        api_server.drop_after_next = False
    return api_server


@pytest.fixture
def client(api: FakeAPI) -> Iterator[FLStoreClient]:
    with FLStoreClient(api.url, token=TOKEN, timeout=5) as c:
        yield c


def test_health_answers_without_a_token(client: FLStoreClient, api: FakeAPI) -> None:
    assert client.health() == {"status": "ok"}
    assert "Authorization" not in api.seen[-1].headers


def test_requests_carry_the_bearer_token(client: FLStoreClient, api: FakeAPI) -> None:
    client.workloads()
    assert api.seen[-1].headers["Authorization"] == f"Bearer {TOKEN}"


def test_workloads_returns_the_catalogue(client: FLStoreClient, api: FakeAPI) -> None:
    assert client.workloads() == [{"name": "fedavg", "class": "round"}]
    assert (api.seen[-1].method, api.seen[-1].path) == ("GET", "/v1/workloads")


def test_rounds_returns_the_visible_rounds(client: FLStoreClient, api: FakeAPI) -> None:
    assert client.rounds("demo") == [{"round": 0, "clients": ["c0", "c1"], "bytes": 1234}]
    assert api.seen[-1].path == "/v1/jobs/demo/rounds"


def test_run_posts_round_and_params(client: FLStoreClient, api: FakeAPI) -> None:
    answer = client.run("demo", "cosine_select", round=3, k=2, use_delta=False)
    seen = api.seen[-1]
    assert (seen.method, seen.path) == ("POST", "/v1/jobs/demo/workloads/cosine_select")
    assert seen.body == {"round": 3, "params": {"k": 2, "use_delta": False}}
    assert seen.headers["Content-Type"] == "application/json"
    assert answer["job"] == "demo" and answer["workload"] == "cosine_select"
    assert answer["round"] == 3
    assert answer["result"]["selected"] == ["c1"]
    assert answer["meta"]["cache"] == "hit"


def test_run_posts_a_list_of_rounds(client: FLStoreClient, api: FakeAPI) -> None:
    client.run("demo", "reputation", rounds=[0, 1, 2], decay=0.9)
    assert api.seen[-1].body == {"rounds": [0, 1, 2], "params": {"decay": 0.9}}


def test_run_without_rounds_sends_only_params(client: FLStoreClient, api: FakeAPI) -> None:
    client.run("demo", "oort_select")
    assert api.seen[-1].body == {"params": {}}


def test_result_model_returns_the_model_key(client: FLStoreClient) -> None:
    key = result_model(client.run("demo", "fedavg", round=0))
    assert key == "jobs/demo/results/fedavg/00000000/model.safetensors.zst"
    assert result_model(client.run("demo", "cosine_select", round=0)) is None
    assert result_model({}) is None


@pytest.mark.parametrize("job", ["Demo", "../x", "", "a/b"])
def test_bad_job_ids_are_rejected_before_sending(
    client: FLStoreClient, api: FakeAPI, job: str
) -> None:
    with pytest.raises(InvalidIdError):
        client.run(job, "fedavg", round=0)
    with pytest.raises(InvalidIdError):
        client.rounds(job)
    assert api.seen == []


def test_bad_rounds_and_workload_names_are_rejected_before_sending(
    client: FLStoreClient, api: FakeAPI
) -> None:
    with pytest.raises(InvalidIdError):
        client.run("demo", "fedavg", round=-1)
    with pytest.raises(ValidationError):
        client.run("demo", "fedavg", round=0, rounds=[0])
    with pytest.raises(ValidationError):
        client.run("demo", "../v1/health", round=0)
    assert api.seen == []


@pytest.mark.parametrize(
    ("job", "error"),
    [
        ("e401", AuthenticationError),
        ("e403", ForbiddenError),
        ("e404", NotFoundError),
        ("e400", ValidationError),
        ("e400p", InvalidParamsError),
        ("e400id", InvalidIdError),
        ("e413", PayloadTooLargeError),
        ("e503", UnavailableError),
        ("gw401", AuthenticationError),
        ("gw502", UnavailableError),
    ],
)
def test_error_answers_raise_the_typed_error(
    client: FLStoreClient, job: str, error: type[FLStoreError]
) -> None:
    with pytest.raises(error) as raised:
        client.run(job, "fedavg", round=0)
    assert type(raised.value) is error
    if job in ERRORS:
        assert raised.value.message == f"canned {ERRORS[job][1]}"


def test_a_2xx_answer_that_is_not_json_is_an_error(client: FLStoreClient) -> None:
    with pytest.raises(FLStoreError, match="without a JSON object"):
        client.run("notjson", "fedavg", round=0)


def test_refused_connection_raises_unavailable_with_the_url() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    with pytest.raises(UnavailableError, match=url):
        FLStoreClient(url, timeout=2).health()


def test_one_connection_is_reused_across_requests(client: FLStoreClient, api: FakeAPI) -> None:
    for _ in range(5):
        client.health()
    assert len({seen.client_port for seen in api.seen}) == 1


def test_a_keep_alive_connection_closed_by_the_server_is_reopened(
    client: FLStoreClient, api: FakeAPI
) -> None:
    client.health()
    api.drop_after_next = True
    client.health()  # the server closes this connection after answering
    assert client.run("demo", "fedavg", round=0)["job"] == "demo"
    assert len({seen.client_port for seen in api.seen}) == 2


def test_from_local_reads_the_local_stack_file(tmp_path: Path, api: FakeAPI) -> None:
    config = tmp_path / ".flstore" / "local.json"
    config.parent.mkdir()
    config.write_text(json.dumps({"gateway_url": api.url, "token": TOKEN, "bucket": "b"}))
    with FLStoreClient.from_local(config) as client:
        assert client.base_url == api.url and client.token == TOKEN
        client.workloads()
    assert api.seen[-1].headers["Authorization"] == f"Bearer {TOKEN}"


def test_from_local_without_the_file_says_to_start_the_stack(tmp_path: Path) -> None:
    with pytest.raises(UnavailableError, match="run `flstore local up` first"):
        FLStoreClient.from_local(tmp_path / ".flstore" / "local.json")


def test_eight_threads_share_one_client(client: FLStoreClient, api: FakeAPI) -> None:
    def work(i: int) -> list[tuple[int, int]]:
        answers = [client.run("demo", "cosine_select", round=i, k=j) for j in range(10)]
        return [(a["round"], a["result"]["echo"]["params"]["k"]) for a in answers]

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(work, range(8)))
    assert answers == [[(i, j) for j in range(10)] for i in range(8)]
    assert len(api.seen) == 80
    assert len({seen.client_port for seen in api.seen}) <= 8  # one connection per thread


def test_the_base_url_path_prefixes_every_route(api: FakeAPI) -> None:
    with (
        FLStoreClient(api.url + "/prod/", token=TOKEN, timeout=5) as staged,
        pytest.raises(NotFoundError),
    ):
        staged.health()
    assert api.seen[-1].path == "/prod/v1/health"


@pytest.mark.parametrize("token", ["", "two words", "line\nbreak"])
def test_malformed_tokens_are_rejected(token: str) -> None:
    with pytest.raises(ValidationError, match="invalid token"):
        FLStoreClient("http://127.0.0.1:1", token=token)
