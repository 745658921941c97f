"""The answer's cost as the API documents it: ``meta.cost_breakdown`` in the OpenAPI document and
its model, ``meta.cost_usd`` its sum."""

from __future__ import annotations

import pytest
from pydantic import ValidationError as ModelError

from flstore_core.routing.openapi import RunAnswer
from lambdas.router import app, openapi_document

BREAKDOWN = {"nodes": 2.2e-6, "router": 6.4e-7, "api_gateway": 1e-6, "s3": 2.4e-6}


def test_the_document_lists_the_four_parts_of_an_answers_cost() -> None:
    schemas = openapi_document(app)["components"]["schemas"]
    meta = schemas["RunMeta"]
    assert {"cost_usd", "cost_breakdown"} <= set(meta["required"])
    ref = meta["properties"]["cost_breakdown"]["$ref"].rsplit("/", 1)[1]
    assert set(schemas[ref]["properties"]) == {"nodes", "router", "api_gateway", "s3"}
    assert set(schemas[ref]["required"]) == {"nodes", "router", "api_gateway", "s3"}


def test_an_answer_without_its_cost_breakdown_does_not_match_the_model() -> None:
    meta = {
        "nodes": ["flstore-cache-0"],
        "cache": "hit",
        "latency_ms": 12.5,
        "cost_usd": sum(BREAKDOWN.values()),
        "cost_breakdown": BREAKDOWN,
        "node_timing_ms": {},
        "s3_gets": 6,
        "s3_puts": 0,
    }
    answer = {"job": "j", "workload": "fedavg", "round": 0, "result": {}, "meta": meta}
    assert RunAnswer.model_validate(answer).meta.cost_breakdown.router == 6.4e-7
    del meta["cost_breakdown"]
    with pytest.raises(ModelError):
        RunAnswer.model_validate(answer)
