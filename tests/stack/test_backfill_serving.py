"""A backfill on a warm local stack is served right after it ends.

Ingestion (with its prefetch) warms every owner; ``incentive`` with ``metric=contribution``
then has nothing to pay, as ingestion writes no ``contribution`` summary. The backfill writes
them and re-warms the owners; the very next request through the HTTP gateway must answer from
the backfilled manifests — checked against the manifests read straight from S3, not against a
hard-coded payout.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from flstore_core.data.manifest import CONTRIBUTION
from flstore_core.data.rawfile import write_raw_update
from flstore_core.storage.object_store import ObjectStore
from lambdas.local_runtime.s3_server import LocalS3
from lambdas.local_runtime.stack import LocalStack, StackConfig
from pipelines.backfill import run_backfill
from pipelines.ingest import run_ingest
from tests.conftest import small_update

JOB = "served"
ROUNDS = 3
CLIENTS = [f"c{i}" for i in range(4)]


@pytest.fixture(scope="module")
def stack(s3_server: LocalS3) -> Iterator[LocalStack]:
    config = StackConfig(
        nodes=3, replication=2, memory_mb=1024, bucket="backfill-serving", s3_endpoint=s3_server.url
    )
    with LocalStack(config) as st:
        yield st


def incentive(stack: LocalStack) -> dict[str, Any]:
    """``incentive`` with ``metric=contribution`` over every client, through the gateway."""
    url = urlsplit(stack.gateway_url)
    assert url.hostname is not None
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=120)
    body = json.dumps({"params": {"metric": CONTRIBUTION}})
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {stack.token}"}
    conn.request("POST", f"/v1/jobs/{JOB}/workloads/incentive", body=body, headers=headers)
    resp = conn.getresponse()
    payload = json.loads(resp.read())
    conn.close()
    assert resp.status == 200, payload
    result = payload["result"]
    assert isinstance(result, dict)
    return result


def test_a_backfill_on_a_warm_stack_changes_the_next_answer(
    stack: LocalStack, tmp_path: Path
) -> None:
    assert stack.router is not None
    for r in range(ROUNDS):
        (tmp_path / f"r{r}").mkdir()
        for i, client in enumerate(CLIENTS):
            # one direction per round at growing scales: the larger updates lengthen the
            # round mean, so their leave-one-out contributions are positive
            update = small_update(r, scale=1.0 + 0.5 * i, job=JOB, round=r, client=client)
            write_raw_update(update, str(tmp_path / f"r{r}" / f"{client}.safetensors"))
    endpoint, bucket = stack.s3_endpoint, stack.config.bucket
    ingested = run_ingest(
        str(tmp_path), job=JOB, s3_endpoint=endpoint, bucket=bucket, prefetch=stack.router
    )
    assert ingested.prefetch["loaded"] > 0

    before = incentive(stack)  # warm: every node has read the manifests without contributions
    assert before["sources"] == [] and not any(before["values"].values())

    summary = run_backfill(JOB, "0:3", s3_endpoint=endpoint, bucket=bucket, prefetch=stack.router)
    assert summary.manifests_written == ROUNDS

    after = incentive(stack)  # right after the backfill: no eviction, no waiting
    # what S3 holds now, read by a store that caches nothing
    fresh = ObjectStore(stack.config.bucket, endpoint_url=stack.s3_endpoint)
    scores = {
        r: {c: e.summary[CONTRIBUTION] for c, e in fresh.get_manifest(JOB, r).updates.items()}
        for r in range(ROUNDS)
    }
    fresh.close()
    assert after["sources"] == [CONTRIBUTION]
    assert sum(after["values"].values()) > 0
    # each round pays its budget in proportion to the positive part of the backfilled scores
    # (the workload's definition), so the payouts are those scores up to one factor per round
    for r, row in scores.items():
        paid = after["rounds"][str(r)]
        positive = {c: v for c, v in row.items() if v > 0}
        assert positive, f"round {r} has no positive contribution to pay"
        assert {c for c, v in paid.items() if v > 0} == set(positive)
        scale = sum(paid.values()) / sum(positive.values())
        for c, v in positive.items():
            assert paid[c] == pytest.approx(scale * v, rel=1e-9)
