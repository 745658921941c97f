"""Every trust-boundary finding replayed against one live local stack (two nodes, the gateway,
moto S3): hostile raw files through the ingestion pipeline and hostile requests through the
gateway. Each is refused — a dead letter with its code, or a 4xx with its code — while the valid
files of the same ingest run commit, and afterwards every answer recorded before the attack is
byte-identical (cached and recomputed), the stored initial and global models are unchanged and
every node answers ``stats``.
"""

from __future__ import annotations

import hashlib
import http.client
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pytest

from evaluation.digits_job import simulate
from flstore_core.data import layout
from flstore_core.data.codec import Update
from flstore_core.data.rawfile import write_raw_update
from flstore_core.protocol import EvictOp, StatsOp
from lambdas.local_runtime.s3_server import LocalS3
from lambdas.local_runtime.stack import LocalStack, StackConfig
from pipelines.ingest import IngestSummary, run_ingest
from tests.unit.test_ingest_trust import raw_file, with_metadata

NODES = 2
JOB = "digits30"
ROUNDS = 2
CLIENTS = 30
# explicit rounds everywhere: the good files of the attack run commit a new latest round
ANSWERS: dict[str, list[dict[str, Any]]] = {
    "fedavg": [{"round": r} for r in range(ROUNDS)],
    "cosine_select": [{"round": r, "params": {"k": 5}} for r in range(ROUNDS)],
    "inference": [{"params": {"round": r}} for r in range(ROUNDS)],
    "accuracy_select": [{"round": r, "params": {"k": 5}} for r in range(ROUNDS)],
}


def post(stack: LocalStack, name: str, body: bytes) -> tuple[int, dict[str, Any]]:
    """POST ``body`` (raw bytes, so a hostile nesting needs no encoder) to a workload."""
    url = urlsplit(stack.gateway_url)
    assert url.hostname is not None
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=120)
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {stack.token}"}
    conn.request("POST", f"/v1/jobs/{JOB}/workloads/{name}", body=body, headers=headers)
    resp = conn.getresponse()
    payload = json.loads(resp.read() or b"{}")
    conn.close()
    return resp.status, payload


def answers(stack: LocalStack) -> dict[str, bytes]:
    """The ``result`` of every recorded request as canonical JSON bytes, and the sha256 of each
    model fedavg wrote."""
    assert stack.store is not None
    out: dict[str, bytes] = {}
    for name, bodies in ANSWERS.items():
        for body in bodies:
            status, answer = post(stack, name, json.dumps(body).encode())
            assert status == 200, (name, body, answer)
            key = f"{name} {json.dumps(body, sort_keys=True)}"
            out[key] = json.dumps(answer["result"], sort_keys=True).encode()
            if name == "fedavg":
                model = stack.store.get_object(answer["result"]["model_key"])
                out[f"{key} model"] = hashlib.sha256(model).hexdigest().encode()
    return out


def models(stack: LocalStack) -> dict[str, str]:
    """The sha256 of the stored initial model and of every round's global model."""
    assert stack.store is not None
    keys = [layout.initial_key(JOB)] + [layout.global_key(JOB, r) for r in range(ROUNDS)]
    return {k: hashlib.sha256(stack.store.get_object(k)).hexdigest() for k in keys}


def nodes_up(stack: LocalStack) -> None:
    assert stack.router is not None
    for index in range(NODES):
        stats = stack.router.node_op(index, StatsOp())
        assert "error" not in stats, (index, stats)


@pytest.fixture(scope="module")
def stack(s3_server: LocalS3) -> Iterator[LocalStack]:
    config = StackConfig(
        nodes=NODES,
        replication=2,
        memory_mb=2048,
        bucket="trust-replay-tests",
        s3_endpoint=s3_server.url,
    )
    with LocalStack(config) as st:
        assert st.store is not None
        simulate(st.store, job=JOB, clients=CLIENTS, rounds=ROUNDS, malicious=(), local_epochs=1)
        yield st


@pytest.fixture(scope="module")
def before(stack: LocalStack) -> tuple[dict[str, bytes], dict[str, str]]:
    """What the stack answered and stored before any attack."""
    return answers(stack), models(stack)


def shifted(update: Update, **meta: Any) -> Update:
    """``update``'s tensors moved by 1 (other weights, same shapes) with new metadata."""
    tensors = {
        k: (v + 1).astype(v.dtype) if np.asarray(v).dtype.kind == "f" else v
        for k, v in update.tensors.items()
    }
    return Update(tensors, **meta)


def hostile_files(stack: LocalStack) -> dict[str, bytes]:
    """Every hostile raw file, by name, built from the job's own stored updates and models."""
    assert stack.store is not None
    real = stack.store.get_update(JOB, 0, "client-00")

    def client(round_: int, name: str, seed: float = 0.0, num_examples: int = 10) -> bytes:
        u = shifted(real, job=JOB, round=round_, client=name, num_examples=num_examples)
        u.tensors = {k: v + seed if v.dtype.kind == "f" else v for k, v in u.tensors.items()}
        return write_raw_update(u)

    initial = stack.store.get_initial(JOB)
    glob0 = stack.store.get_global(JOB, 0)
    meta = {"job": JOB, "round": str(ROUNDS), "client": "shape", "num_examples": "1"}
    return {
        "initial.safetensors": write_raw_update(shifted(initial, job=JOB, kind="initial")),
        "global0.safetensors": write_raw_update(shifted(glob0, job=JOB, round=0, kind="global")),
        "evil.safetensors": client(0, "evil", num_examples=10**9),
        "a/dup.safetensors": client(ROUNDS, "dup", 0.5),
        "b/dup.safetensors": client(ROUNDS, "dup", 0.25),
        "shape.safetensors": raw_file(meta, {"t": ("F32", [0, 2**62, 2**62], b"")}),
        "deep.safetensors": with_metadata(
            client(ROUNDS, "deep"), metrics="[" * 5_000 + "]" * 5_000
        ),
        "examples.safetensors": with_metadata(client(ROUNDS, "examples"), num_examples=str(10**30)),
    }


# the dead letter's code for every hostile file
DEAD = {
    "initial.safetensors": "conflict",
    "global0.safetensors": "conflict",
    "evil.safetensors": "conflict",
    "a/dup.safetensors": "duplicate",
    "b/dup.safetensors": "duplicate",
    "shape.safetensors": "too_large",
    "deep.safetensors": "corrupt_update",
    "examples.safetensors": "corrupt_update",
}
GOOD = [f"good-{i}" for i in range(3)]


@pytest.fixture(scope="module")
def attack(
    stack: LocalStack,
    before: tuple[dict[str, bytes], dict[str, str]],
    s3_server: LocalS3,
    tmp_path_factory: pytest.TempPathFactory,
) -> IngestSummary:
    """One ingest run of the good files of a new round beside every hostile file."""
    assert stack.store is not None
    root = tmp_path_factory.mktemp("attack")
    files = hostile_files(stack)
    for i, name in enumerate(GOOD):
        u = stack.store.get_update(JOB, 0, f"client-{i:02d}")
        u.job, u.round, u.client = JOB, ROUNDS, name
        files[f"good/{name}.safetensors"] = write_raw_update(u)
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return run_ingest(str(root), job=JOB, s3_endpoint=s3_server.url, bucket=stack.store.bucket)


def relative(summary_file: str) -> str:
    path = Path(summary_file)
    return f"{path.parent.name}/{path.name}" if path.parent.name in {"a", "b"} else path.name


def test_every_hostile_file_is_a_dead_letter_and_the_good_files_commit(
    stack: LocalStack, attack: IngestSummary
) -> None:
    assert stack.store is not None
    got = {relative(d.file): d.code for d in attack.deadletters}
    assert got == DEAD, [(relative(d.file), d.code, d.stage, d.reason) for d in attack.deadletters]
    assert len(attack.deadletters) == len(DEAD)  # what `flstore ingest` exits 1 on
    assert attack.committed == [f"{JOB}/{ROUNDS}"]
    assert stack.store.get_manifest(JOB, ROUNDS).clients == GOOD
    assert "evil" not in stack.store.get_manifest(JOB, 0).updates


NESTED = b'{"round": 0, "params": {"k": ' + b"[" * 1_000 + b"]" * 1_000 + b"}}"


@pytest.mark.parametrize(
    ("name", "body", "status", "code"),
    [
        pytest.param("cosine_select", NESTED, 400, "invalid_request", id="params-1000-deep"),
        pytest.param(
            "feddebug",
            json.dumps({"round": 0, "params": {"num_inputs": 10_000}}).encode(),
            400,
            "over_limit",
            id="feddebug-10000-inputs",
        ),
        pytest.param(
            "contribution_shapley",
            json.dumps(
                {
                    "round": 0,
                    "params": {
                        "method": "gtg",
                        "eps": 0,
                        "tolerance": 0,
                        "max_permutations": 100_000,
                    },
                }
            ).encode(),
            400,
            "over_limit",
            id="shapley-unbounded",
        ),
    ],
)
def test_every_hostile_request_is_a_4xx_with_its_code(
    stack: LocalStack, attack: IngestSummary, name: str, body: bytes, status: int, code: str
) -> None:
    got, answer = post(stack, name, body)
    assert (got, answer.get("error", {}).get("code")) == (status, code), answer
    nodes_up(stack)


def test_after_the_attack_every_answer_and_model_is_unchanged_and_every_node_is_up(
    stack: LocalStack,
    before: tuple[dict[str, bytes], dict[str, str]],
    attack: IngestSummary,
) -> None:
    assert stack.router is not None
    recorded, stored = before
    nodes_up(stack)
    assert models(stack) == stored
    assert answers(stack) == recorded  # as cached
    for index in range(NODES):
        stack.router.node_op(index, EvictOp(all=True))
    assert answers(stack) == recorded  # recomputed from S3
    nodes_up(stack)
