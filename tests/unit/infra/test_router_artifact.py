"""The router and the authorizer run with only what their zip ships (the deployment bug of a
numpy-free zip whose ``import lambdas.router`` needed numpy and zstandard).

A subprocess blocks every installed top-level module the zip does not ship
(``sys.modules[name] = None``, so ``import`` raises and optional imports fall back): the import
names come from the locked wheels the zip is built from (``wheels.import_names``), plus the
packages and the python3.12 runtime's boto3 and its dependencies
(``packaging.RUNTIME_DISTRIBUTIONS``, mapped to import names by ``importlib.metadata``).
There it imports both handlers, builds the router's resolver app and its OpenAPI document, and
serves one sharded ``cosine_select`` through ``Router``, whose node invocations are relayed as
JSON to real cache nodes in this process (scikit-learn and torch are the nodes' business). The
answer is compared with the same workload run by one node on the whole round.
"""

from __future__ import annotations

import base64
import importlib.metadata
import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from flstore_core.cache.node import CacheNode
from flstore_core.cache.results import run_round_workload
from flstore_core.cache.round_data import ArtifactStats
from flstore_core.cache.round_loading import load_round
from flstore_core.data.blocks import footprint
from flstore_core.data.codec import Update
from flstore_core.data.manifest import JobSpec
from flstore_core.storage.memory import MemoryBlobStore
from flstore_core.storage.object_store import ObjectStore
from flstore_core.workloads import get

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO / "infra"))

from flstore_infra import packaging  # noqa: E402
from flstore_infra.wheels import WheelSet, import_names, locked_wheels, normalize  # noqa: E402

JOB = "art"
TOKEN = "fls_artifact-tests"
PREFIX = "fl"
NODES = 4
N_CLIENTS = 6
SHAPES = {"conv.weight": (8, 4, 3, 3), "fc.weight": (10, 300), "fc.bias": (10,)}
N_PARAMS = sum(math.prod(s) for s in SHAPES.values())
BUDGET = footprint(N_CLIENTS, N_PARAMS) // 3  # three nodes' worth: planned in column blocks
PROTOCOL = "@@flstore-relay "


@pytest.fixture(scope="module")
def locked() -> WheelSet:
    return locked_wheels(
        packaging.ZIP_DEPENDENCIES,
        REPO / packaging.LOCK,
        architecture="x86_64",
        cache_dir=packaging.default_cache_dir() / "wheels",
    )


def blocked_modules(locked: WheelSet) -> set[str]:
    """Every installed top-level module that neither the zip nor the runtime provides."""
    installed = importlib.metadata.packages_distributions()
    shipped = set(packaging.PACKAGES).union(*(import_names(w) for w in locked.wheels))
    runtime = {normalize(d) for d in packaging.RUNTIME_DISTRIBUTIONS}
    provided = {m for m, dists in installed.items() if {normalize(d) for d in dists} & runtime}
    return {
        name
        for name in installed
        if name not in shipped | provided
        and name not in sys.stdlib_module_names
        and not name.startswith("__editable__")
    }


def write_job(store: ObjectStore) -> None:
    rng = np.random.default_rng(5)
    store.put_job_spec(JobSpec(job=JOB))
    base = {n: rng.normal(0, 0.1, s).astype(np.float32) for n, s in SHAPES.items()}
    store.put_initial(JOB, Update(base))
    entries = []
    for k in range(N_CLIENTS):
        sign = np.float32(-1.0 if k >= 4 else 1.0)
        tensors = {
            n: (v + sign * rng.normal(0.05, 0.02, v.shape).astype(np.float32)).astype(np.float32)
            for n, v in base.items()
        }
        entries.append(store.put_update(JOB, 0, f"c{k}", Update(tensors, num_examples=10 + k)))
    store.commit_round(JOB, 0, entries)


# Runs under the blocks: the handlers, the app, one sharded request through relayed nodes.
CHILD = textwrap.dedent(
    """
    import base64, json, sys, threading

    config = json.loads(sys.argv[1])
    for name in config["blocked"]:
        sys.modules[name] = None

    import lambdas.authorizer
    import lambdas.router
    from flstore_core.routing.auth import TokenTable
    from flstore_core.routing.invoker import NodeAnswer
    from flstore_core.routing.router import Router, RouterConfig
    from flstore_core.storage.memory import MemoryBlobStore
    from flstore_core.storage.object_store import ObjectStore

    PROTOCOL = config["protocol"]
    lock = threading.Lock()

    class Relay:
        def invoke(self, function, event):
            with lock:
                print(PROTOCOL + json.dumps({"function": function, "event": event}), flush=True)
                payload = json.loads(sys.stdin.readline())
            return NodeAnswer(function, payload, 5.0, 512)

    blobs = MemoryBlobStore()
    for key, body in config["blobs"]:
        blobs.put(key, base64.b64decode(body))
    store = ObjectStore("mem", blobs=blobs)
    router = Router(
        store,
        Relay(),
        TokenTable.with_tokens({config["token"]: ["*"]}),
        RouterConfig(
            prefix=config["prefix"],
            nodes=config["nodes"],
            replication=2,
            cache_budget_bytes=config["budget"],
        ),
    )
    app = lambdas.router.build_app(lambda: router)
    paths = sorted(lambdas.router.openapi_document(app)["paths"])
    plan = router.plan_round(config["job"], 0)
    answer = router.run(
        "Bearer " + config["token"], config["job"], "cosine_select",
        json.dumps({"round": 0, "params": {"k": 3}}),
    )
    leaked = sorted(m for m in config["watch"] if sys.modules.get(m) is not None)
    done = {"paths": paths, "blocks": len(plan.blocks), "sharded": plan.sharded,
            "result": answer["result"], "leaked": leaked}
    print(PROTOCOL + json.dumps({"done": done}), flush=True)
    """
)


def run_child(store: ObjectStore, blocked: set[str]) -> tuple[dict[str, Any], list[str]]:
    """The child's final answer and the ops the nodes were sent."""
    infos = sorted(store.blobs.list(""), key=lambda info: (info.modified, info.key))
    dump = [[i.key, base64.b64encode(bytes(store.blobs.get(i.key) or b"")).decode()] for i in infos]
    config = {
        "blocked": sorted(blocked),
        "protocol": PROTOCOL,
        "blobs": dump,
        "token": TOKEN,
        "prefix": PREFIX,
        "nodes": NODES,
        "budget": BUDGET,
        "job": JOB,
        "watch": ["numpy", "zstandard", "sklearn", "scipy", "torch"],
    }
    nodes = [CacheNode(store.view(), budget_bytes=BUDGET, node_index=i) for i in range(NODES)]
    ops: list[str] = []
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, json.dumps(config)],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert child.stdin is not None and child.stdout is not None and child.stderr is not None
    try:
        for line in child.stdout:
            if not line.startswith(PROTOCOL):
                continue  # the router's own logs
            message = json.loads(line[len(PROTOCOL) :])
            if "done" in message:
                return message["done"], ops
            index = int(message["function"].rsplit("-", 1)[1])
            ops.append(message["event"]["op"])
            answer = nodes[index].handle(json.loads(json.dumps(message["event"])))
            child.stdin.write(json.dumps(answer) + "\n")
            child.stdin.flush()
        child.wait(timeout=60)
        raise AssertionError(f"the child ended without an answer:\n{child.stderr.read()[-4000:]}")
    finally:
        child.kill()
        child.wait()


def test_the_blocks_are_what_the_zip_does_not_ship(locked: WheelSet) -> None:
    blocked = blocked_modules(locked)
    assert {"sklearn", "scipy", "torch", "moto", "pytest", "pipelines", "evaluation"} <= blocked
    assert not {"numpy", "zstandard", "threadpoolctl", "pydantic", "cachetools"} & blocked
    assert not {"boto3", "botocore", "flstore_core", "lambdas"} & blocked


def test_router_and_authorizer_import_and_serve_a_sharded_round_with_the_zips_modules(
    locked: WheelSet,
) -> None:
    store = ObjectStore("mem", blobs=MemoryBlobStore())
    write_job(store)
    done, ops = run_child(store, blocked_modules(locked))
    assert done["leaked"] == ["numpy", "zstandard"]  # what the zip carries; never sklearn
    assert "/v1/health" in done["paths"]
    assert done["sharded"] and done["blocks"] >= 3
    assert ops and set(ops) <= {"partial"}, ops  # the nodes sent blocks' pieces only
    # the same selection as one node on the whole round
    data = load_round(store, JOB, 0, ArtifactStats())
    workload = get("cosine_select")
    want = run_round_workload(store, workload, data, workload.validate({"k": 3}))
    assert done["result"]["selected"] == want["selected"]
    assert set(done["result"]["scores"]) == set(want["scores"])
    for client, expected in want["scores"].items():
        assert math.isclose(done["result"]["scores"][client], expected, rel_tol=1e-6, abs_tol=1e-9)
