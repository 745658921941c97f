"""``rounds`` restricts every workload that spans rounds to exactly those rounds (the meta class
as the client class), checked against the workload run on the rows of those rounds alone; and a
request naming a round the job has not committed is a 404 naming it, whatever the class."""

from __future__ import annotations

import json
from typing import Any, cast

import pytest

from flstore_core.cache.shards import ClientHistory, JobMeta, rows_of
from flstore_core.errors import NotFoundError
from flstore_core.routing.router import Router
from flstore_core.storage.object_store import ObjectStore
from flstore_core.workloads.oort_select import oort_select
from flstore_core.workloads.reputation import reputation_series
from tests.conftest import small_update
from tests.fakes import AUTH, InProcessNodes, make_router

JOB = "rp"
ROUNDS = 3
CLIENTS = [f"c{i}" for i in range(6)]


def _job(store: ObjectStore) -> None:
    """Three rounds whose losses, durations and cosines differ from round to round; client c5
    takes part in round 2 only."""
    for r in range(ROUNDS):
        members = CLIENTS if r == 2 else CLIENTS[:-1]
        entries = []
        for i, c in enumerate(members):
            update = small_update(10 * r + i)
            # the client with the highest loss moves from round to round
            update.metrics = {"loss": 0.2 + ((i + 2 * r) % len(members)), "duration_s": 1.0 + i}
            entries.append(store.put_update(JOB, r, c, update))
        summaries = {
            c: {"cos_to_mean": 0.9 - 0.25 * ((i + r) % 4), "contribution": float((i * r) % 3)}
            for i, c in enumerate(members)
        }
        store.commit_round(JOB, r, entries, summaries=summaries)


@pytest.fixture
def router(store: ObjectStore) -> Router:
    _job(store)
    return make_router(store, InProcessNodes(store, 2), nodes=2, replication=1)


def _ask(router: Router, workload: str, body: dict[str, Any]) -> dict[str, Any]:
    answer = router.run(AUTH, JOB, workload, json.dumps(body))
    return cast(dict[str, Any], answer["result"])


OORT: dict[str, Any] = {"k": 3, "epsilon": 0.0, "seed": 3}


def test_oort_select_over_one_round_is_oort_on_that_round_alone(
    router: Router, store: ObjectStore
) -> None:
    spec = store.get_job_spec(JOB)
    answers = []
    for r in range(ROUNDS):
        alone = JobMeta(spec, {r: rows_of(store.get_manifest(JOB, r))})
        want = json.loads(json.dumps(oort_select(alone, **OORT).result))
        got = _ask(router, "oort_select", {"rounds": [r], "params": OORT})
        assert got == want, r
        answers.append(got)
    # the rounds' losses differ, so do the selections over them, and each differs from all
    everything = _ask(router, "oort_select", {"params": OORT})
    assert len({json.dumps(a["scores"], sort_keys=True) for a in answers}) == ROUNDS
    assert everything not in answers[:-1]
    # the answer over two rounds is the workload's over those two rounds' rows
    both = JobMeta(spec, {r: rows_of(store.get_manifest(JOB, r)) for r in (0, 2)})
    want = json.loads(json.dumps(oort_select(both, **OORT).result))
    assert _ask(router, "oort_select", {"rounds": [2, 0], "params": OORT}) == want


def test_client_workloads_span_exactly_the_rounds_asked(router: Router, store: ObjectStore) -> None:
    rows = {r: rows_of(store.get_manifest(JOB, r)) for r in range(ROUNDS)}
    for asked in ([1], [0, 2]):
        got = _ask(router, "reputation", {"rounds": asked, "params": {"decay": 0.5}})
        for c in CLIENTS:
            history = ClientHistory(JOB, c, [rows[r][c] for r in asked if c in rows[r]])
            want = reputation_series(history, 0.5)["series"]
            assert got["series"].get(c, []) == want, (asked, c)
        paid = _ask(router, "incentive", {"rounds": asked})
        everything = _ask(router, "incentive", {})
        assert sorted(paid["rounds"], key=int) == [str(r) for r in asked]
        for r in asked:  # each round pays what it pays in the answer over every round
            assert paid["rounds"][str(r)] == everything["rounds"][str(r)]
        # a client of the job absent from the rounds asked is paid nothing over them
        absent = set(CLIENTS) - {c for r in asked for c in rows[r]}
        assert set(paid["values"]) == set(CLIENTS)
        assert all(paid["values"][c] == 0.0 for c in absent)


@pytest.mark.parametrize(
    ("workload", "body"),
    [
        ("oort_select", {"rounds": [5]}),
        ("incentive", {"rounds": [5]}),
        ("reputation", {"rounds": [0, 5, 7]}),
        ("reputation", {"rounds": [7, 5], "params": {"clients": ["c0"]}}),
    ],
)
def test_a_round_not_committed_is_a_404_naming_it(
    router: Router, workload: str, body: dict[str, Any]
) -> None:
    with pytest.raises(NotFoundError) as raised:
        router.run(AUTH, JOB, workload, json.dumps(body))
    missing = sorted(r for r in body["rounds"] if r >= ROUNDS)
    message = str(raised.value)
    assert ", ".join(map(str, missing)) in message
    assert "0" not in message.split(JOB, 1)[1].split(":")[0]  # only the missing are named


def test_a_round_committed_after_the_listing_is_answered(
    router: Router, store: ObjectStore
) -> None:
    _ask(router, "reputation", {"rounds": [0]})  # lists the job's rounds, cached a while
    entries = [store.put_update(JOB, ROUNDS, c, small_update(i)) for i, c in enumerate(CLIENTS)]
    store.commit_round(JOB, ROUNDS, entries)
    # the router lists again for a round its listing lacks, and the node holding the meta
    # shard reads it again for a round the shard lacks: the new round is answered over
    got = _ask(router, "incentive", {"rounds": [ROUNDS]})
    assert list(got["rounds"]) == [str(ROUNDS)]
    assert sorted(got["values"]) == CLIENTS
