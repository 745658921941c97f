"""Schemathesis against the live local stack.

The OpenAPI document is loaded from the running stack's ``GET /v1/openapi.json`` (through the
local gateway, which runs the real authorizer before the router), and every operation in it is
fuzzed with schemathesis' hypothesis strategies (``operation.as_strategy``), in positive and
negative mode, ``CASES`` generated cases per operation, identity and mode (hypothesis
``max_examples``; ``derandomize`` makes every run send the same requests). Every answer must pass
schemathesis' checks: no 5xx, a status the document lists for the operation, the content type
and headers it lists, a body valid against its schema. (Schemathesis' own pytest loader,
``schemathesis.pytest.from_fixture``, fails on pytest 9.2 — it sets ``Function._nodeid`` —
hence one pytest test per operation, identity and mode here.)

The job the requests reach is small but real (``evaluation.digits_job``: 5 clients, 2 rounds of
one local epoch of ``digits_cnn``, a validation set), so every workload — round, client, model
(accuracy, Shapley, FLTrust, FedDebug, inference) and meta class — runs on cache nodes: most
cases of the two operations with a ``job`` are steered to that job, with the body fitted to the
workload (``_steer``); the rest stay as schemathesis generated them. The tiny model keeps even
the model-evaluating workloads to milliseconds, which bounds the run (about 3,600 requests in
3-4 minutes on a loaded 2-core machine).

Three identities: the stack's token (granted every job), a token granted another job only (the
router's 403 ``{"error": …}``), and the ``Authorization`` header schemathesis generates from the
document's bearer scheme (random tokens; missing in negative mode): API Gateway's own 401/403
``{"message": …}``.
"""

from __future__ import annotations

import collections
import json
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import hypothesis.strategies as st
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from evaluation.digits_job import simulate
from flstore_core.workloads import catalogue, get
from lambdas.local_runtime.stack import LocalStack, StackConfig
from lambdas.router import app, openapi_document

JOB = "fuzzjob"
ROUNDS = (0, 1)
CLIENTS = [f"client-{i:02d}" for i in range(5)]  # 5: Krum's default f=1 needs n > 4
WORKLOADS = {w["name"] for w in catalogue()}
OTHER = "fls_fuzz-other-job-only"
CASES = 200  # generated cases per operation, identity and mode (hypothesis max_examples)
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
]
OPERATIONS = sorted(
    f"{method.upper()} {path}"
    for path, ops in openapi_document(app)["paths"].items()
    for method in ops
)

# cases answered and their statuses, by (identity, mode, operation); checked by the last test
SENT: collections.Counter[tuple[str, str, str]] = collections.Counter()
STATUSES: dict[tuple[str, str, str], collections.Counter[int]] = collections.defaultdict(
    collections.Counter
)
ELAPSED: dict[tuple[str, str, str], float] = {}
RAN: set[str] = set()  # workloads that answered 200


@pytest.fixture(scope="module")
def stack(s3_server: Any) -> Iterator[LocalStack]:
    config = StackConfig(
        nodes=2,
        replication=1,
        memory_mb=1024,
        bucket="schemathesis-live",
        s3_endpoint=s3_server.url,
        tokens={OTHER: ["other"]},
    )
    with LocalStack(config) as st_:
        assert st_.store is not None
        simulate(
            st_.store,
            job=JOB,
            clients=len(CLIENTS),
            rounds=len(ROUNDS),
            malicious=(),
            local_epochs=1,
        )
        yield st_


def _steer(case: schemathesis.Case, how: int) -> schemathesis.Case:
    """``case`` as drawn (0); sent to the live job (1); sent to the live job with its body
    fitted to the workload (2): a round-class workload gets one of the job's rounds, the other
    classes a list of them, and the params keep only the names the workload has (with whatever
    values were generated); or (3) as 2 with the workload's defaults for params (and a client of
    the job where a client is needed), a request that must succeed. The case is changed in
    place: it is this example's own."""
    if how == 0:
        return case
    case.path_parameters = {**case.path_parameters, "job": JOB}
    name = case.path_parameters.get("name")
    if how >= 2 and isinstance(name, str) and name in WORKLOADS and isinstance(case.body, dict):
        workload = get(name)
        body = {k: v for k, v in case.body.items() if k not in ("round", "rounds")}
        if workload.cls == "round":
            body["round"] = ROUNDS[len(str(case.body)) % len(ROUNDS)]
        else:
            body["rounds"] = list(ROUNDS[: 1 + len(str(case.body)) % len(ROUNDS)])
        if how == 3:
            body["params"] = {"client": CLIENTS[0]} if "client" in workload.params else {}
        elif isinstance(body.get("params"), dict):
            body["params"] = {k: v for k, v in body["params"].items() if k in workload.params}
        case.body = body
    return case


def _steer_to_the_job(schema: schemathesis.BaseSchema) -> None:
    """Three quarters of the cases of an operation with a ``job`` go to the live job (most of
    those with the body fitted to the workload, see ``_steer``), so that valid requests reach
    real workloads; the others keep what schemathesis generated."""

    @schema.hook
    def flatmap_case(context: Any, case: schemathesis.Case) -> Any:
        if not isinstance(case.path_parameters, dict) or "job" not in case.path_parameters:
            return st.just(case)
        # hypothesis draws the first choice most: a generated request that reaches a workload
        return st.sampled_from((2, 3, 1, 0)).map(lambda how: _steer(case, how))


@pytest.fixture(scope="module")
def live_schema(stack: LocalStack) -> schemathesis.BaseSchema:
    schema = schemathesis.openapi.from_url(f"{stack.gateway_url}/v1/openapi.json", timeout=60)
    served = sorted(
        f"{m.upper()} {p}" for p, ops in schema.raw_schema["paths"].items() for m in ops
    )
    assert served == OPERATIONS  # the document of this code is the one the stack serves
    _steer_to_the_job(schema)
    return schema


FUZZ = settings(
    max_examples=CASES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)
MODES = (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
# who calls: the stack's token (granted every job), a token granted another job only, or the
# Authorization header schemathesis generates from the document's bearer scheme (missing,
# empty, random tokens, in negative mode any header): API Gateway's 401/403 {"message": …}
IDENTITIES = ("token", "other", "generated")


def _headers(stack: LocalStack, identity: str) -> dict[str, str]:
    token = {"token": stack.token, "other": OTHER}.get(identity)
    return {"Authorization": f"Bearer {token}"} if token else {}


# operations with nothing to generate (no parameter, body or security scheme) have no
# negative case: they are called in positive mode only
FIXED = {"GET /v1/health", "GET /v1/openapi.json", "GET /v1/docs"}
RUNS = [
    (label, identity, mode)
    for label in OPERATIONS
    for identity in IDENTITIES
    for mode in MODES
    if mode == GenerationMode.POSITIVE or label not in FIXED
]


@pytest.mark.timeout(900)
@pytest.mark.parametrize(("label", "identity", "mode"), RUNS, ids=lambda v: str(v))
def test_every_operation_answers_as_documented(
    live_schema: schemathesis.BaseSchema,
    stack: LocalStack,
    label: str,
    identity: str,
    mode: GenerationMode,
) -> None:
    method, path = label.split(" ", 1)
    operation = live_schema[path][method]
    headers = _headers(stack, identity)
    key = (identity, str(mode), label)
    started = time.perf_counter()

    @FUZZ
    @given(case=operation.as_strategy(mode))
    def fuzz(case: schemathesis.Case) -> None:
        response = case.call_and_validate(headers=headers, checks=CHECKS, timeout=120)
        SENT[key] += 1
        STATUSES[key][response.status_code] += 1
        if response.status_code == 200 and "name" in (case.path_parameters or {}):
            RAN.add(case.path_parameters["name"])

    fuzz()
    ELAPSED[key] = time.perf_counter() - started


@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_each_workload_answers_its_default_request_as_documented(
    live_schema: schemathesis.BaseSchema, stack: LocalStack, name: str
) -> None:
    """Every workload, sent the request a user sends first (its defaults, one of the job's
    rounds, a client of the job where it needs one), answers 200 as the document says: the
    fuzzing above reaches workloads by chance draws, this does not."""
    operation = live_schema["/v1/jobs/{job}/workloads/{name}"]["POST"]
    workload = get(name)
    body: dict[str, Any] = (
        {"round": ROUNDS[-1]} if workload.cls == "round" else {"rounds": list(ROUNDS)}
    )
    body["params"] = {"client": CLIENTS[0]} if "client" in workload.params else {}
    case = operation.Case(
        path_parameters={"job": JOB, "name": name}, body=body, media_type="application/json"
    )
    response = case.call_and_validate(headers=_headers(stack, "token"), checks=CHECKS, timeout=120)
    assert response.status_code == 200, response.text
    RAN.add(name)


def test_every_operation_got_its_cases_and_real_workloads_ran() -> None:
    """Runs after the fuzzing (pytest keeps the module's order): each operation with anything
    to generate got ``CASES`` cases per identity and mode; every workload answered 200 under
    the checks (drawn by the fuzzing or sent its default request above); the generated headers
    met both of API Gateway's refusals."""
    if not SENT:
        pytest.fail("no fuzzing ran before this test: run the module whole")
    summary = {" ".join(k): [SENT[k], dict(STATUSES[k]), round(ELAPSED[k], 1)] for k in SENT}
    print(json.dumps(summary, indent=1), f"{sum(SENT.values())} cases", sorted(RAN))
    for label, identity, mode in RUNS:
        least = 1 if label in FIXED else CASES
        assert SENT[(identity, str(mode), label)] >= least, (identity, mode, label)
    assert RAN >= WORKLOADS, sorted(WORKLOADS - RAN)
    for label in ("GET /v1/workloads", "GET /v1/jobs/{job}/rounds"):
        refused = sum((STATUSES[("generated", str(mode), label)] for mode in MODES), Counter())
        assert refused[401] > 0 and refused[403] > 0 and refused[200] == 0, (label, refused)
