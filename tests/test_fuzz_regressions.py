"""Regressions of what schemathesis found against the live stack (tests/test_schemathesis_live.py).

- An int param past 64 bits (JSON has no limit: ``{"seed": 18446744073709551616}``) reached
  torch inside ``feddebug`` (``Overflow when unpacking long long``): the node's invocation
  failed on every replica and the router answered 503 for the client's own input. Int params
  now hold the integers JSON carries exactly (I-JSON, ±(2**53 - 1)), the document says so, and
  a float param given an integer past the largest double is "not finite" instead of an
  ``OverflowError``.
- ``oort_select``'s ``seed`` had no lower bound (numpy refuses a negative seed).
- The document let the run body be JSON ``null``, which the router refuses with a 400: it
  documents an optional body that is an object when sent.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from evaluation.digits_job import simulate
from flstore_core.cache.node import CacheNode
from flstore_core.errors import InvalidParamsError
from flstore_core.storage.object_store import ObjectStore
from flstore_core.workloads import INT_MAX, INT_MIN, catalogue, get
from lambdas.router import app, openapi_document

PARAMS = [(w["name"], name, p) for w in catalogue() for name, p in get(w["name"]).params.items()]
INTS = [(w, name) for w, name, p in PARAMS if p.type == "int"]
FLOATS = [(w, name) for w, name, p in PARAMS if p.type == "float"]


@pytest.mark.parametrize(("workload", "param"), INTS)
def test_an_int_param_past_2_53_is_a_400(workload: str, param: str) -> None:
    for value in (INT_MAX + 1, INT_MIN - 1, 2**64, -(2**64), 10**400):
        with pytest.raises(InvalidParamsError, match="must be an integer from"):
            get(workload).validate({param: value})


@pytest.mark.parametrize(("workload", "param"), FLOATS)
def test_a_float_param_given_an_int_past_the_largest_double_is_a_400(
    workload: str, param: str
) -> None:
    with pytest.raises(InvalidParamsError, match="must be finite"):
        get(workload).validate({param: 10**400})


def test_oort_refuses_a_negative_seed() -> None:
    with pytest.raises(InvalidParamsError, match="seed"):
        get("oort_select").validate({"seed": -1})
    assert get("oort_select").validate({"seed": INT_MAX})["seed"] == INT_MAX


@pytest.fixture(scope="module")
def digits(s3_server: Any) -> Iterator[ObjectStore]:
    store = ObjectStore("fuzz-regressions", endpoint_url=s3_server.url)
    store.ensure_bucket()
    simulate(store, job="tiny", clients=3, rounds=1, malicious=(), local_epochs=1)
    yield store
    store.close()


SEEDED = sorted(w for w, name in INTS if name == "seed" and get(w).cls == "round")


@pytest.mark.parametrize("workload", SEEDED)
def test_a_seeded_workload_runs_with_the_largest_seed_and_refuses_a_larger_one(
    digits: ObjectStore, workload: str
) -> None:
    assert {"feddebug", "fltrust", "contribution_shapley"} <= set(SEEDED)
    node = CacheNode(digits, budget_bytes=10**8)
    event = {"op": "run", "workload": workload, "job": "tiny", "round": 0}
    largest = int(min(get(workload).params["seed"].maximum or INT_MAX, INT_MAX))
    answer = node.handle({**event, "params": {"seed": largest}})
    assert "error" not in answer, answer
    for seed in (largest + 1, 2**64):  # 2**64 crashed feddebug's torch.Generator: a 503
        answer = node.handle({**event, "params": {"seed": seed}})
        assert answer["status"] == 400 and answer["error"]["code"] == "invalid_params", answer


def test_the_document_bounds_every_int_param_and_takes_no_null_body() -> None:
    document = openapi_document(app)
    schemas = document["components"]["schemas"]
    for ref in document["components"]["x-workload-params"].values():
        for prop in schemas[ref["$ref"].rsplit("/", 1)[1]].get("properties", {}).values():
            for kind in [prop, *prop.get("anyOf", [])]:
                if kind.get("type") == "integer":
                    assert kind["minimum"] >= INT_MIN and kind["maximum"] <= INT_MAX, prop
    run = document["paths"]["/v1/jobs/{job}/workloads/{name}"]["post"]["requestBody"]
    assert run["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/RunRequest"
    }
    assert not run.get("required", False)  # no body: the workload's defaults
