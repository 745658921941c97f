"""The rounds route pages (ARCHITECTURE §4): ``limit`` and ``after`` in, ``next`` out; the SDK's
pages and iterator, and ``flstore rounds`` listing every page."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from moto import mock_aws
from typer.testing import CliRunner

from flstore_core.data.codec import Update
from flstore_core.data.manifest import JobSpec
from flstore_core.errors import ValidationError
from flstore_core.routing import paging
from flstore_core.routing.paging import MAX_LIMIT, Page, page_of
from flstore_core.sdk.client import FLStoreClient
from flstore_core.storage.object_store import ObjectStore
from lambdas.router import app as documented_app
from lambdas.router import build_app, handle, openapi_document
from tests.fakes import InProcessNodes, make_router
from tests.unit.test_router_handler import TOKEN, LambdaContext, http_event

JOB = "paged"
ROUNDS = [0, 1, 2, 5, 9]  # committed, with gaps


def test_pages_follow_the_cursor_and_end_with_no_next() -> None:
    assert page_of(ROUNDS) == Page(tuple(ROUNDS), None)
    assert page_of(ROUNDS, 2) == Page((0, 1), 1)
    assert page_of(ROUNDS, 2, 1) == Page((2, 5), 5)
    assert page_of(ROUNDS, 2, 5) == Page((9,), None)
    assert page_of(ROUNDS, 2, 3) == Page((5, 9), None)  # after a round the job does not have
    assert page_of(ROUNDS, 5) == Page(tuple(ROUNDS), None)  # exactly full: no empty next page
    assert page_of(ROUNDS, None, 9) == Page((), None)
    assert page_of([], 3) == Page((), None)
    assert page_of(ROUNDS, "2", "1") == Page((2, 5), 5)  # query-string text


@pytest.mark.parametrize(
    ("limit", "after"),
    [
        *[(0, None), (MAX_LIMIT + 1, None), (-1, None), ("x", None), (True, None), (1.5, None)],
        *[(None, -1), (None, "two"), (None, 10**9), (None, False)],
    ],
)
def test_bad_limits_and_cursors_are_400(limit: object, after: object) -> None:
    with pytest.raises(ValidationError) as err:
        page_of(ROUNDS, limit, after)
    assert err.value.status == 400


@pytest.fixture(scope="module")
def store() -> Iterator[ObjectStore]:
    """moto's S3 with job ``paged`` of rounds :data:`ROUNDS`, two clients each."""
    with mock_aws():
        st = ObjectStore("rounds-paging-tests")
        st.ensure_bucket()
        st.put_job_spec(JobSpec(job=JOB))
        for r in ROUNDS:
            for c in ("c0", "c1"):
                st.put_update(JOB, r, c, Update({"w": np.full(4, r, np.float32)}, num_examples=1))
            st.commit_round(JOB, r)
        yield st
        st.close()


def route_caller(store: ObjectStore) -> Any:
    """``GET path?query`` through the Powertools app, as API Gateway calls the router."""
    router = make_router(store, InProcessNodes(reply=lambda f, e: {}), tokens={TOKEN: ["*"]})
    app = build_app(lambda: router)

    def call(path: str, **query: str) -> tuple[int, dict[str, Any]]:
        event = http_event("GET", path)
        if query:
            event["rawQueryString"] = "&".join(f"{k}={v}" for k, v in query.items())
            event["queryStringParameters"] = dict(query)
        answer = handle(app, event, LambdaContext())
        return int(answer["statusCode"]), json.loads(answer["body"])

    return call


def test_the_route_answers_pages_and_next(store: ObjectStore) -> None:
    call = route_caller(store)
    path = f"/v1/jobs/{JOB}/rounds"
    status, body = call(path)
    assert status == 200, body
    assert [r["round"] for r in body["rounds"]] == ROUNDS and body["next"] is None
    assert body["rounds"][0]["clients"] == ["c0", "c1"] and body["rounds"][0]["bytes"] > 0
    seen, after, pages = [], None, 0
    while True:
        query = {"limit": "2"} | ({} if after is None else {"after": str(after)})
        status, body = call(path, **query)
        assert status == 200, body
        assert body["job"] == JOB and len(body["rounds"]) <= 2
        seen += [r["round"] for r in body["rounds"]]
        pages += 1
        after = body["next"]
        if after is None:
            break
        assert after == body["rounds"][-1]["round"]
    assert seen == ROUNDS and pages == 3


@pytest.mark.parametrize(
    "query",
    [{"limit": "0"}, {"limit": "1001"}, {"limit": "two"}, {"after": "-1"}, {"after": "x"}],
)
def test_the_route_refuses_bad_values_with_a_json_400(
    store: ObjectStore, query: dict[str, str]
) -> None:
    status, body = route_caller(store)(f"/v1/jobs/{JOB}/rounds", **query)
    assert status == 400, body
    assert set(body) == {"error"} and body["error"]["code"] == "invalid_request"
    assert next(iter(query)) in body["error"]["message"]


def test_openapi_documents_limit_after_and_next() -> None:
    doc = openapi_document(documented_app)
    params = {p["name"]: p for p in doc["paths"]["/v1/jobs/{job}/rounds"]["get"]["parameters"]}
    assert params["limit"]["in"] == "query" and not params["limit"].get("required", False)
    limit = json.dumps(params["limit"]["schema"])
    assert '"maximum": 1000' in limit and '"minimum": 1' in limit
    assert params["after"]["in"] == "query"
    answer = doc["components"]["schemas"]["RoundsAnswer"]
    assert "next" in answer["properties"] and "next" in answer.get("required", [])


class RouteClient(FLStoreClient):
    """The SDK over the Powertools app in process (its HTTP transport is tested elsewhere)."""

    def __init__(self, store: ObjectStore) -> None:
        super().__init__("http://api.example.com", TOKEN)
        self.call = route_caller(store)
        self.paths: list[str] = []

    def _request(self, method: str, route: str, body: Any = None, *, auth: bool = True) -> Any:
        self.paths.append(route)
        path, _, query = route.partition("?")
        status, answer = self.call(path, **dict(q.split("=") for q in query.split("&") if q))
        assert status == 200, answer
        return answer


def test_the_sdk_reads_one_page_or_iterates_over_every_page(store: ObjectStore) -> None:
    client = RouteClient(store)
    page = client.rounds_page(JOB, limit=2, after=1)
    assert [r["round"] for r in page["rounds"]] == [2, 5] and page["next"] == 5
    assert client.paths[-1] == f"/v1/jobs/{JOB}/rounds?limit=2&after=1"
    client.paths.clear()
    assert [r["round"] for r in client.iter_rounds(JOB, page_size=2)] == ROUNDS
    assert len(client.paths) == 3
    assert [r["round"] for r in client.rounds(JOB, limit=3, after=0)] == [1, 2, 5]
    assert [r["round"] for r in client.rounds(JOB)] == ROUNDS
    with pytest.raises(ValidationError):
        client.rounds_page(JOB, limit=0)
    with pytest.raises(ValidationError):
        client.rounds(JOB, after=-1)


def test_flstore_rounds_lists_every_page(
    store: ObjectStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flstore_core import cli

    client = RouteClient(store)
    monkeypatch.setattr(paging, "DEFAULT_LIMIT", 2)  # the server pages by two
    monkeypatch.setattr(cli, "_client", lambda url, token: client)
    out = CliRunner().invoke(cli.app, ["rounds", "--job", JOB, "--json"])
    assert out.exit_code == 0, out.output
    assert [r["round"] for r in json.loads(out.output)] == ROUNDS
    assert len(client.paths) == 3  # three pages of at most two


def test_flstore_rounds_lists_a_part_and_says_how_to_read_on(
    store: ObjectStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flstore_core import cli

    client = RouteClient(store)
    monkeypatch.setattr(cli, "_client", lambda url, token: client)
    out = CliRunner().invoke(cli.app, ["rounds", "--job", JOB, "--after", "0", "--limit", "2"])
    assert out.exit_code == 0, out.output
    assert f"--job {JOB} --after 2 --limit 2" in out.output
    out = CliRunner().invoke(cli.app, ["rounds", "--job", JOB, "--after", "1", "--json"])
    assert [r["round"] for r in json.loads(out.output)] == [r for r in ROUNDS if r > 1]
    last = CliRunner().invoke(cli.app, ["rounds", "--job", JOB, "--after", "2", "--limit", "9"])
    assert "more rounds follow" not in last.output


def test_the_router_keeps_a_listing_not_the_manifests(monkeypatch: pytest.MonkeyPatch) -> None:
    from flstore_core.cache import shards
    from flstore_core.storage.memory import MemoryBlobStore

    monkeypatch.setattr(shards, "MANIFEST_ROWS_KEPT", 1)
    st = ObjectStore(blobs=MemoryBlobStore())
    st.put_job_spec(JobSpec(job=JOB, late_clients={"within_s": 3600.0}))
    for r in range(4):
        st.put_update(JOB, r, "c0", Update({"w": np.full(4, r, np.float32)}, num_examples=1))
        st.commit_round(JOB, r)
    router = make_router(st, InProcessNodes(reply=lambda f, e: {}), tokens={TOKEN: ["*"]})
    first = router.rounds(f"Bearer {TOKEN}", JOB)["rounds"]
    assert [r["clients"] for r in first] == [["c0"]] * 4
    assert len(router.manifests._cache) <= 1  # the listing holds clients and bytes, not manifests
    st.put_update(JOB, 2, "c1", Update({"w": np.full(4, 2, np.float32)}, num_examples=1))
    st.commit_round(JOB, 2)  # a late client rewrites round 2's manifest
    router.manifests.list_ttl_s = 0  # the next listing is now, not ROUNDS_TTL_S later
    again = router.rounds(f"Bearer {TOKEN}", JOB)["rounds"]
    assert again[2]["clients"] == ["c0", "c1"] and again[2]["bytes"] > first[2]["bytes"]
    assert again[3] == first[3]
