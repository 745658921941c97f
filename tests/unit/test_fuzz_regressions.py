"""Regressions of what schemathesis found against the live stack
(tests/stack/test_schemathesis_live.py).

- An int param past 64 bits (JSON has no limit: ``{"seed": 18446744073709551616}``) reached
  torch inside ``feddebug`` (``Overflow when unpacking long long``): the node's invocation
  failed on every replica and the router answered 503 for the client's own input. Int params
  now hold the integers JSON carries exactly (I-JSON, ±(2**53 - 1)), the document says so, and
  a float param given an integer past the largest double is "not finite" instead of an
  ``OverflowError``.
- ``oort_select``'s ``seed`` had no lower bound (numpy refuses a negative seed), nor its
  ``round`` (``round: -1`` took ``log(0)`` on every node: a 503).
- The document let the run body be JSON ``null``, which the router refuses with a 400: it
  documents an optional body that is an object when sent.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from evaluation.digits_job import simulate
from flstore_core.cache.node import CacheNode
from flstore_core.cache.shards import ClientRound, JobMeta
from flstore_core.data.manifest import JobSpec
from flstore_core.errors import InvalidParamsError
from flstore_core.ids import MAX_ROUND
from flstore_core.storage.object_store import ObjectStore
from flstore_core.workloads import INT_MAX, INT_MIN, Param, catalogue, get
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


def test_oort_refuses_a_negative_seed_or_round() -> None:
    oort = get("oort_select")
    with pytest.raises(InvalidParamsError, match="seed"):
        oort.validate({"seed": -1})
    assert oort.validate({"seed": INT_MAX})["seed"] == INT_MAX
    # round -1 reached log(0) in the exploration term: a ValueError on every node, a 503
    with pytest.raises(InvalidParamsError, match="round"):
        oort.validate({"round": -1})
    with pytest.raises(InvalidParamsError, match="round"):
        oort.validate({"round": MAX_ROUND + 1})
    assert oort.validate({"round": 0})["round"] == 0


def test_oort_plans_round_0_after_later_rounds() -> None:
    metrics = {"loss": 1.0, "duration_s": 1.0}
    meta = JobMeta(JobSpec("j"), {r: {"c0": ClientRound(r, 10, metrics, {})} for r in (0, 1)})
    oort = get("oort_select")
    assert oort.run(meta, oort.validate({"round": 0, "k": 1})).result["selected"] == ["c0"]


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


def _edges(param: Param) -> list[Any]:
    """The values where a numeric param's handling changes: its bounds, just past them, the
    ends of the int range, 0 and ±1."""
    values: set[float] = {0, 1, -1, INT_MAX, INT_MIN, INT_MAX + 1}
    for bound in (param.minimum, param.maximum, param.exclusive_maximum):
        if bound is not None:
            values |= {bound, bound - 1, bound + 1}
    if param.type == "int":
        return sorted({int(v) for v in values})
    return sorted(values | {1e308, -1e308, 5e-324, 0.5})


NUMERIC = [(w, name, p) for w, name, p in PARAMS if p.type in ("int", "float")]


@pytest.mark.parametrize(("workload", "param"), [(w, n) for w, n, _ in NUMERIC])
def test_every_numeric_param_at_its_edges_answers_or_refuses_never_crashes(
    digits: ObjectStore, workload: str, param: str
) -> None:
    """The node runs each workload on the tiny job with each numeric param at its edges: a
    result or a client error (4xx), never an exception (which the router turns into a 503)."""
    node = CacheNode(digits, budget_bytes=10**8)
    spec = get(workload)
    base: dict[str, Any] = {"client": "client-00"} if "client" in spec.params else {}
    if "inputs" in spec.params:
        base["inputs"] = [[[[0.5] * 8] * 8]]
    event = {"op": "run", "workload": workload, "job": "tiny"}
    if spec.cls == "round":
        event["round"] = 0
    for value in _edges(spec.params[param]):
        answer = node.handle({**event, "params": {**base, param: value}})
        assert "error" not in answer or 400 <= answer["status"] < 500, (param, value, answer)


def test_fltrust_bounds_its_learning_rates() -> None:
    """lr 1e308 overflowed torch's float32 SGD step (a 503); global_lr 1e308 stored a model of
    inf and NaN."""
    fltrust = get("fltrust")
    for name in ("lr", "global_lr"):
        with pytest.raises(InvalidParamsError, match=name):
            fltrust.validate({name: 1e308})
        assert fltrust.validate({name: 10.0})[name] == 10.0
