"""Ingestion and backfill pipelines (Beam on FnApiRunner) against moto S3, and the round writer."""

from __future__ import annotations

import hashlib
import itertools
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from flstore_core.cache.node import CacheNode
from flstore_core.data import layout
from flstore_core.data.codec import TensorSpec, Update, decompress, slices_of
from flstore_core.data.columns import job_columns, split_columns
from flstore_core.data.manifest import CONTRIBUTION, COS_TO_MEAN, UPDATE_NORM, JobSpec
from flstore_core.data.rawfile import write_raw_update
from flstore_core.routing.placement import place_shard, round_shard
from flstore_core.sdk.round_writer import RoundWriter
from flstore_core.storage.object_store import ObjectStore
from flstore_core.workloads.summaries import matrix_scores, round_scores, stream_scores
from lambdas.local_runtime.s3_server import LocalS3
from lambdas.local_runtime.stack import LocalStack, StackConfig
from pipelines.backfill import parse_rounds, run_backfill
from pipelines.ingest import IngestSummary, ingest_on_drop, run_ingest
from pipelines.records import DeadLetter
from pipelines.runtime import ProgressEvent
from pipelines.transforms import deadletter_key
from tests.conftest import small_update

_buckets = itertools.count()


@pytest.fixture
def bucket(s3_server: LocalS3) -> Iterator[ObjectStore]:
    """A fresh, versioned bucket: every PUT makes a new version, so writes can be counted."""
    st = ObjectStore(f"ingest-{next(_buckets)}", endpoint_url=s3_server.url)
    st.ensure_bucket()
    st.blobs.client.put_bucket_versioning(
        Bucket=st.bucket, VersioningConfiguration={"Status": "Enabled"}
    )
    yield st
    st.close()


def ingest(store: ObjectStore, s3_server: LocalS3, src: Any, **kwargs: Any) -> IngestSummary:
    return run_ingest(str(src), s3_endpoint=s3_server.url, bucket=store.bucket, **kwargs)


def drop(path: Path, update: Update, **meta: Any) -> Path:
    for k, v in meta.items():
        setattr(update, k, v)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_raw_update(update, str(path))
    return path


def drop_round(root: Path, job: str, round_: int, clients: int, seed: int = 0) -> dict[str, Update]:
    out = {}
    for i in range(clients):
        client = f"c{i}"
        u = small_update(seed + 10 * round_ + i)
        drop(root / f"r{round_}" / f"{client}.safetensors", u, job=job, round=round_, client=client)
        out[client] = u
    return out


def versions(store: ObjectStore, prefix: str = "jobs/") -> dict[str, int]:
    """Number of stored versions of every key under ``prefix``."""
    out: dict[str, int] = {}
    paginator = store.blobs.client.get_paginator("list_object_versions")
    for page in paginator.paginate(Bucket=store.bucket, Prefix=prefix):
        for v in page.get("Versions", []):
            out[v["Key"]] = out.get(v["Key"], 0) + 1
    return out


def flat(update: Update) -> np.ndarray:
    return np.concatenate([np.asarray(a, np.float64).reshape(-1) for a in update.tensors.values()])


def trainable(update: Update) -> np.ndarray:
    """The float trainable parameters as one float64 row, picked by hand: integer tensors and
    BatchNorm's running statistics and counters are not parameters (the summaries' columns)."""
    skip = ("running_mean", "running_var", "num_batches_tracked")
    return np.concatenate(
        [
            np.asarray(a, np.float64).reshape(-1)
            for name, a in update.tensors.items()
            if np.asarray(a).dtype.kind == "f" and not name.endswith(skip)
        ]
    )


def direct_scores(rows: list[np.ndarray], base: np.ndarray | None) -> dict[str, np.ndarray]:
    """Cosine to the mean, update norm and leave-one-out norm gain, straight from the formulas."""
    x = np.stack(rows) - (base if base is not None else 0.0)
    n = len(x)
    mean = x.mean(axis=0)
    cos = x @ mean / (np.linalg.norm(x, axis=1) * np.linalg.norm(mean))
    loo = np.array([np.linalg.norm(np.delete(x, i, axis=0).mean(axis=0)) for i in range(n)])
    return {
        COS_TO_MEAN: cos,
        UPDATE_NORM: np.linalg.norm(x, axis=1),
        CONTRIBUTION: np.linalg.norm(mean) - loo,
    }


# ---------------------------------------------------------------------- ingestion


def test_ingest_stores_checksummed_updates_models_and_manifests(
    bucket: ObjectStore, s3_server: LocalS3, tmp_path: Path
) -> None:
    sent = {r: drop_round(tmp_path, "alpha", r, 3) for r in range(2)}
    initial = small_update(100)
    drop(tmp_path / "initial.safetensors", initial, job="alpha", kind="initial")
    glob0 = small_update(101)
    drop(tmp_path / "g0.safetensors", glob0, job="alpha", round=0, kind="global")
    events: list[ProgressEvent] = []

    summary = ingest(bucket, s3_server, tmp_path, job="alpha", progress=events.append)

    assert summary.deadletters == [] and summary.files == 8
    assert (summary.updates_written, summary.models_written) == (6, 2)
    assert summary.committed == ["alpha/0", "alpha/1"] and summary.manifests_written == 2
    assert bucket.list_rounds("alpha") == [0, 1]
    for r, updates in sent.items():
        manifest = bucket.get_manifest("alpha", r)
        assert manifest.clients == ["c0", "c1", "c2"]
        matrix = bucket.read_round("alpha", r)  # every row verified against its sha256
        for client, u in updates.items():
            entry = manifest.updates[client]
            raw = decompress(bucket.get_object(entry.key))
            assert hashlib.sha256(raw).hexdigest() == entry.sha256
            assert (entry.num_examples, entry.metrics) == (u.num_examples, u.metrics)
            assert {"norm", COS_TO_MEAN, UPDATE_NORM} <= set(entry.summary)
            np.testing.assert_allclose(matrix.matrix[matrix.row_of(client)], flat(u), rtol=1e-6)
    np.testing.assert_array_equal(
        bucket.get_initial("alpha").tensors["fc.weight"], initial.tensors["fc.weight"]
    )
    np.testing.assert_array_equal(
        bucket.get_global("alpha", 0).tensors["fc.bias"], glob0.tensors["fc.bias"]
    )
    kinds = {e.kind for e in events}
    assert {"planned", "stored", "committed", "done"} <= kinds
    assert sum(e.files for e in events if e.kind == "stored") == 6


def test_summaries_are_delta_cosines_against_the_stored_base(
    bucket: ObjectStore, s3_server: LocalS3, tmp_path: Path
) -> None:
    base = small_update(50)
    drop(tmp_path / "initial.safetensors", base, job="delta", kind="initial")
    sent = drop_round(tmp_path, "delta", 0, 4)

    ingest(bucket, s3_server, tmp_path, job="delta")

    manifest = bucket.get_manifest("delta", 0)
    want = direct_scores([trainable(sent[c]) for c in manifest.clients], trainable(base))
    for name in (COS_TO_MEAN, UPDATE_NORM):
        got = [manifest.updates[c].summary[name] for c in manifest.clients]
        np.testing.assert_allclose(got, want[name], rtol=1e-5)


def test_undeclared_job_gets_the_default_spec(
    bucket: ObjectStore, s3_server: LocalS3, tmp_path: Path
) -> None:
    drop_round(tmp_path, "fresh", 0, 2)
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    assert not bucket.job_exists("fresh")

    summary = ingest(bucket, s3_server, tmp_path)  # no --job: the files name it

    spec = bucket.get_job_spec("fresh")
    assert (spec.precision, spec.model) == ("float32", None)
    # a file whose job cannot be read is dead-lettered at the bucket level
    assert summary.deadletter_keys == [deadletter_key(None, summary.run_id)]
    assert summary.deadletter_keys[0].startswith("ingest/deadletter/")


def test_precision_bf16_declares_the_job_and_stores_bfloat16(
    bucket: ObjectStore, s3_server: LocalS3, tmp_path: Path
) -> None:
    sent = drop_round(tmp_path, "half", 0, 2)

    ingest(bucket, s3_server, tmp_path, job="half", precision="bf16")

    assert bucket.get_job_spec("half").precision == "bfloat16"
    assert bucket.get_manifest("half", 0).precision == "bfloat16"
    got = bucket.get_update("half", 0, "c1").tensors["fc.weight"]
    np.testing.assert_allclose(got, sent["c1"].tensors["fc.weight"], rtol=1e-2)
    with pytest.raises(Exception, match="bfloat16"):  # a declared job keeps its precision
        ingest(bucket, s3_server, tmp_path, job="half", precision="fp16")


def test_bad_files_go_to_the_dead_letters_and_good_ones_are_ingested(
    bucket: ObjectStore, s3_server: LocalS3, tmp_path: Path
) -> None:
    drop_round(tmp_path, "dl", 0, 3)
    good = (tmp_path / "r0" / "c0.safetensors").read_bytes()
    (tmp_path / "corrupt.safetensors").write_bytes(
        b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      "
    )
    (tmp_path / "truncated.safetensors").write_bytes(good[: len(good) - 100])
    odd = small_update(7)
    odd.tensors["fc.weight"] = np.zeros((10, 17), np.float32)
    drop(tmp_path / "mismatch.safetensors", odd, job="dl", round=0, client="odd")
    raw_nan = write_raw_update(small_update(8, job="dl", round=0, client="nan"))
    # write_raw_update refuses NaN: overwrite the last tensor (fc.bias) of a valid file
    (tmp_path / "nan.safetensors").write_bytes(
        raw_nan[: -10 * 4] + np.full(10, np.nan, np.float32).tobytes()
    )
    drop(tmp_path / "other.safetensors", small_update(9), job="elsewhere", round=0, client="x")

    summary = ingest(bucket, s3_server, tmp_path, job="dl")

    assert bucket.get_manifest("dl", 0).clients == ["c0", "c1", "c2"]
    by_file = {Path(d.file).name: d for d in summary.deadletters}
    assert {n: d.code for n, d in by_file.items()} == {
        "corrupt.safetensors": "corrupt_update",
        "truncated.safetensors": "truncated",
        "mismatch.safetensors": "mismatch",
        "nan.safetensors": "nonfinite",
        "other.safetensors": "wrong_job",
    }
    assert "fc.weight" in by_file["mismatch.safetensors"].reason
    assert "'odd'" in by_file["mismatch.safetensors"].reason
    key = deadletter_key("dl", summary.run_id)
    assert summary.deadletter_keys == [key]
    lines = bucket.get_object(key).decode().splitlines()
    assert sorted(DeadLetter.from_json(json.loads(x)).file for x in lines) == sorted(
        d.file for d in summary.deadletters
    )
    assert summary.reasons()["mismatch"] == 1


def test_a_second_run_stores_nothing_and_commits_the_same_manifests(
    bucket: ObjectStore, s3_server: LocalS3, tmp_path: Path
) -> None:
    for r in range(2):
        drop_round(tmp_path, "idem", r, 3)
    drop(tmp_path / "g0.safetensors", small_update(70), job="idem", round=0, kind="global")
    first = ingest(bucket, s3_server, tmp_path, job="idem")
    before = versions(bucket)
    manifests = [bucket.get_object(layout.manifest_key("idem", r)) for r in range(2)]

    second = ingest(bucket, s3_server, tmp_path, job="idem")

    assert versions(bucket) == before  # not one PUT
    assert [bucket.get_object(layout.manifest_key("idem", r)) for r in range(2)] == manifests
    assert (first.updates_written, second.updates_written) == (6, 0)
    assert (second.updates_unchanged, second.models_unchanged) == (6, 1)
    assert second.manifests_written == 0 and second.committed == ["idem/0", "idem/1"]


def test_a_late_client_joins_its_round_and_every_summary_is_recomputed(
    bucket: ObjectStore, s3_server: LocalS3, tmp_path: Path
) -> None:
    bucket.put_job_spec(JobSpec("late", late_clients={"within_s": 600}))  # late clients allowed
    sent = drop_round(tmp_path / "first", "late", 0, 3)
    ingest(bucket, s3_server, tmp_path / "first", job="late")
    late = small_update(33)
    drop(tmp_path / "second" / "c9.safetensors", late, job="late", round=0, client="c9")

    ingest(bucket, s3_server, tmp_path / "second", job="late")

    manifest = bucket.get_manifest("late", 0)
    assert manifest.clients == ["c0", "c1", "c2", "c9"]
    rows = [trainable(sent[c]) for c in ["c0", "c1", "c2"]] + [trainable(late)]
    want = direct_scores(rows, None)[COS_TO_MEAN]
    got = [manifest.updates[c].summary[COS_TO_MEAN] for c in manifest.clients]
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_a_late_client_of_a_job_that_does_not_allow_it_is_a_dead_letter(
    bucket: ObjectStore, s3_server: LocalS3, tmp_path: Path
) -> None:
    drop_round(tmp_path / "first", "final", 0, 3)
    ingest(bucket, s3_server, tmp_path / "first", job="final")
    before = bucket.get_object(layout.manifest_key("final", 0))
    evil = small_update(33)
    evil.num_examples = 10**9  # would take nearly all of fedavg's weight
    drop(tmp_path / "second" / "evil.safetensors", evil, job="final", round=0, client="evil")

    summary = ingest(bucket, s3_server, tmp_path / "second", job="final")

    assert [Path(d.file).name for d in summary.deadletters] == ["evil.safetensors"]
    assert summary.deadletters[0].code == "conflict"
    assert "late_clients" in summary.deadletters[0].reason
    assert bucket.get_object(layout.manifest_key("final", 0)) == before
    assert bucket.stat(layout.update_key("final", 0, "evil")) is None  # nothing left behind


class WorkerKilled(BaseException):
    """A worker dying mid-bundle: not an exception of one file (those are its dead letter), so
    it ends the run as a killed process would."""


def test_a_run_killed_midway_is_completed_by_the_next_run(
    bucket: ObjectStore, s3_server: LocalS3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for r in range(2):
        drop_round(tmp_path, "crash", r, 4)
    real_put = ObjectStore.put_encoded
    calls = itertools.count()
    lock = threading.Lock()

    def dying_put(self: ObjectStore, *args: Any, **kwargs: Any) -> Any:
        with lock:
            n = next(calls)
        if n >= 3:
            raise WorkerKilled("worker killed")
        return real_put(self, *args, **kwargs)

    monkeypatch.setattr(ObjectStore, "put_encoded", dying_put)
    with pytest.raises(BaseException, match="worker killed"):
        ingest(bucket, s3_server, tmp_path, job="crash")
    assert bucket.list_rounds("crash") == []  # no visible half-round
    stored_before = [k for k in versions(bucket) if "/updates/" in k]
    assert len(stored_before) == 3
    monkeypatch.setattr(ObjectStore, "put_encoded", real_put)

    summary = ingest(bucket, s3_server, tmp_path, job="crash")

    assert bucket.list_rounds("crash") == [0, 1]
    assert (summary.updates_already_stored, summary.updates_written) == (3, 5)
    assert all(n == 1 for n in versions(bucket).values())  # nothing stored twice
    for r in range(2):
        assert bucket.read_round("crash", r).matrix.shape[0] == 4  # complete and verified


def test_round_writer_drops_a_round_to_s3_and_ingests_it_through_beams_s3_filesystem(
    bucket: ObjectStore, s3_server: LocalS3
) -> None:
    bucket.blobs.client.create_bucket(Bucket=f"{bucket.bucket}-staging")
    writer = RoundWriter(
        f"s3://{bucket.bucket}-staging/drops",
        "writer",
        s3_endpoint=s3_server.url,
        on_round=ingest_on_drop(s3_endpoint=s3_server.url, bucket=bucket.bucket),
    )
    updates = {f"k{i}": small_update(i) for i in range(3)}
    model = small_update(40)

    dropped = writer.write_round(0, updates, global_model=model)

    assert dropped.source == f"s3://{bucket.bucket}-staging/drops/writer/00000000/"
    assert len(dropped.files) == 4
    summary = dropped.ingested
    assert isinstance(summary, IngestSummary) and summary.deadletters == []
    assert bucket.get_manifest("writer", 0).clients == ["k0", "k1", "k2"]
    np.testing.assert_array_equal(
        bucket.get_global("writer", 0).tensors["fc.weight"], model.tensors["fc.weight"]
    )
    assert updates["k0"].job is None  # the caller's objects are left alone


def test_round_writer_writes_whole_files_into_a_local_directory(tmp_path: Path) -> None:
    writer = RoundWriter(tmp_path, "local")
    writer.write_initial(small_update(1))
    dropped = writer.write_round(3, {"a": small_update(2)}, global_model=small_update(3))

    names = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert names == [
        "local/00000003/global.safetensors",
        "local/00000003/updates/a.safetensors",
        "local/initial/initial.safetensors",
    ]
    assert dropped.source == str(tmp_path / "local" / "00000003") + "/"
    with pytest.raises(Exception, match="client"):
        writer.write_round(4, {"bad id": small_update(4)})
    assert not (tmp_path / "local" / "00000004").exists()  # refused before any write


# ---------------------------------------------------------------------- prefetch and backfill


@pytest.fixture(scope="module")
def stack(s3_server: LocalS3) -> Iterator[LocalStack]:
    config = StackConfig(
        nodes=3, replication=2, memory_mb=1024, bucket="ingest-stack", s3_endpoint=s3_server.url
    )
    with LocalStack(config) as st:
        yield st


def round_holders(stack: LocalStack, shard: str) -> set[int]:
    assert stack.router is not None
    return {i for i in range(3) if shard in stack.router.node_op(i, {"op": "stats"})["shards"]}


def test_prefetch_reaches_exactly_the_owning_nodes(stack: LocalStack, tmp_path: Path) -> None:
    assert stack.router is not None and stack.store is not None
    for i in range(3):
        stack.router.node_op(i, {"op": "evict", "all": True})
    drop_round(tmp_path, "warm", 0, 3)

    summary = run_ingest(
        str(tmp_path),
        job="warm",
        s3_endpoint=stack.s3_endpoint,
        bucket=stack.config.bucket,
        prefetch=stack.router,
    )

    shard = str(round_shard("warm", 0))
    owners = set(place_shard(shard, 3, 2))
    assert round_holders(stack, shard) == owners
    assert summary.prefetch["loaded"] >= len(owners)


def test_backfill_equals_a_direct_computation_and_rewarms_new_owners(
    stack: LocalStack, tmp_path: Path
) -> None:
    assert stack.router is not None and stack.store is not None
    store = stack.store
    base = small_update(60)
    drop(tmp_path / "initial.safetensors", base, job="hist", kind="initial")
    glob0 = small_update(61)
    drop(tmp_path / "g0.safetensors", glob0, job="hist", round=0, kind="global")
    sent = {r: drop_round(tmp_path, "hist", r, 4) for r in range(3)}
    run_ingest(str(tmp_path), job="hist", s3_endpoint=stack.s3_endpoint, bucket=stack.config.bucket)
    for i in range(3):
        stack.router.node_op(i, {"op": "evict", "all": True})

    summary = run_backfill(
        "hist",
        "1:3",
        s3_endpoint=stack.s3_endpoint,
        bucket=stack.config.bucket,
        prefetch=stack.router,
        nodes=2,  # the cache shrank to nodes 0 and 1
    )

    assert summary.rounds == [1, 2] and summary.rounds_backfilled == 2
    for r in (1, 2):
        manifest = store.get_manifest("hist", r)
        # round 1's base is global/0 (deltas); global/1 is absent, so round 2 uses weights
        want = direct_scores(
            [trainable(sent[r][c]) for c in manifest.clients],
            trainable(glob0) if r == 1 else None,
        )
        for name, values in want.items():
            got = [manifest.updates[c].summary[name] for c in manifest.clients]
            # contribution is a difference of norms: float32 dots bound its absolute error
            np.testing.assert_allclose(got, values, rtol=1e-5, atol=1e-5)
    assert CONTRIBUTION not in store.get_manifest("hist", 0).updates["c0"].summary
    for r in (1, 2):
        shard = str(round_shard("hist", r))
        assert round_holders(stack, shard) == set(place_shard(shard, 2, 2))


# ---------------------------------------------------------------------- scores


def test_round_scores_on_a_hand_checkable_round() -> None:
    # x1 = (1, 0), x2 = (0, 1): S = (1, 1), m = (.5, .5); cos = 1/√2; ‖m‖ = √.5, ‖m₋ᵢ‖ = 1
    s = round_scores(["a", "b"], [1.0, 1.0], [1.0, 1.0], 2.0, delta=False)
    np.testing.assert_allclose(s.cos_to_mean, [2**-0.5] * 2)
    np.testing.assert_allclose(s.update_norm, [1.0, 1.0])
    np.testing.assert_allclose(s.contribution, [0.5**0.5 - 1.0] * 2)
    alone = round_scores(["a"], [4.0], [4.0], 4.0, delta=False)
    assert (alone.cos_to_mean, alone.contribution) == ((1.0,), (2.0,))


def test_streamed_scores_equal_matrix_scores() -> None:
    rng = np.random.default_rng(3)
    rows = rng.standard_normal((5, 300_000)).astype(np.float32)
    base = rng.standard_normal(300_000).astype(np.float32)
    reference = (TensorSpec("a", "F32", (100_000,)), TensorSpec("b", "F32", (200_000,)))
    clients = [f"c{i}" for i in range(5)]

    def load(i: int) -> list[np.ndarray]:
        return [rows[i, :100_000], rows[i, 100_000:]]

    for keep in (True, False):
        got = stream_scores(clients, load, reference, base, threads=2, keep=keep)
        want = matrix_scores(clients, rows, base, split_columns(reference))
        np.testing.assert_allclose(got.cos_to_mean, want.cos_to_mean, rtol=1e-5)
        np.testing.assert_allclose(got.contribution, want.contribution, rtol=1e-4)
    direct = direct_scores(list(rows.astype(np.float64)), base.astype(np.float64))
    np.testing.assert_allclose(want.cos_to_mean, direct[COS_TO_MEAN], rtol=1e-5)


def test_summaries_read_the_jobs_trainable_parameters_only() -> None:
    # a float buffer the name rule cannot recognise ("stats.scale"), running statistics and an
    # integer counter between the parameters: the recorded parameter list decides
    reference = (
        TensorSpec("conv.weight", "F32", (3000,)),
        TensorSpec("bn.running_mean", "F32", (40,)),
        TensorSpec("bn.num_batches_tracked", "I64", ()),
        TensorSpec("stats.scale", "F32", (50,)),
        TensorSpec("fc.weight", "F32", (2000,)),
    )
    rng = np.random.default_rng(5)
    n = 4
    rows = rng.standard_normal((n, 5091)).astype(np.float32)
    rows[:, 3000:3040] += 100.0  # running statistics far from the weights
    rows[:, 3040] = [900.0, 910.0, 920.0, 930.0]  # batches seen
    base = (rows[0] + rng.standard_normal(5091).astype(np.float32)).astype(np.float32)
    clients = [f"c{i}" for i in range(n)]
    by_hand = {  # column ranges of the tensors read, written out
        "model": np.r_[0:3000, 3091:5091],
        "names": np.r_[0:3000, 3041:5091],  # no list: every float tensor not a running stat
    }
    specs = {
        "model": JobSpec("j", model="m", parameters=("conv.weight", "fc.weight")),
        "names": JobSpec("j"),
    }
    for source, cols in by_hand.items():
        columns = job_columns(reference, specs[source])
        assert columns.source == source
        for b in (base, None):
            want = direct_scores(
                list(rows[:, cols].astype(np.float64)),
                None if b is None else b[cols].astype(np.float64),
            )
            got = [matrix_scores(clients, rows, b, columns)]
            got += [
                stream_scores(
                    clients,
                    lambda i: [rows[i, x:y] for x, y in slices_of(reference)],
                    reference,
                    b,
                    keep=keep,
                    columns=columns,
                )
                for keep in (True, False)
            ]
            for scores in got:
                np.testing.assert_allclose(scores.cos_to_mean, want[COS_TO_MEAN], rtol=1e-5)
                np.testing.assert_allclose(scores.update_norm, want[UPDATE_NORM], rtol=1e-5)
                np.testing.assert_allclose(
                    scores.contribution, want[CONTRIBUTION], rtol=1e-4, atol=1e-5
                )
    in_place = rows.copy()
    matrix_scores(clients, in_place, base, job_columns(reference, None), in_place=True)
    np.testing.assert_array_equal(in_place[:, 3000:3041], rows[:, 3000:3041])  # not read


def bn_round(seed: int, clients: int, *, buffers: bool) -> tuple[Update, dict[str, Update]]:
    """A base and ``clients`` updates of a small BatchNorm CNN (state-dict order), with its
    running statistics and integer counters when ``buffers``; the parameters do not depend on
    ``buffers``."""
    rng = np.random.default_rng(seed)
    extra = np.random.default_rng(seed + 1000)

    def model(shift: dict[str, np.ndarray] | None, examples: int) -> Update:
        tensors = {
            k: (v + (shift or {}).get(k, 0.0)).astype(np.float32) for k, v in base_params.items()
        }
        if buffers:  # BatchNorm's buffers, after its weight and bias as in a state dict
            after = {
                "bn.running_mean": (50.0 + 10 * extra.standard_normal(4)).astype(np.float32),
                "bn.running_var": (200.0 + extra.random(4)).astype(np.float32),
                "bn.num_batches_tracked": np.array(1000 + extra.integers(0, 500), np.int64),
            }
            fc = tensors.pop("fc.weight")
            tensors = {**tensors, **after, "fc.weight": fc}
        return Update(tensors, num_examples=examples)

    shapes = {"conv.weight": (4, 1, 3, 3), "bn.weight": (4,), "bn.bias": (4,), "fc.weight": (10, 4)}
    base_params = {k: rng.standard_normal(v) for k, v in shapes.items()}
    common = {k: 0.05 * rng.standard_normal(v) for k, v in shapes.items()}
    updates = {}
    for i in range(clients):
        sign = -1.0 if i == clients - 1 else 1.0  # one sign-flipper
        shift = {k: sign * (common[k] + 0.03 * rng.standard_normal(v)) for k, v in shapes.items()}
        updates[f"c{i}"] = model(shift, 10 + i)
    return model(None, 0), updates


def test_cos_to_mean_is_cosine_selects_score_and_ignores_counters_and_running_stats(
    bucket: ObjectStore, s3_server: LocalS3, tmp_path: Path
) -> None:
    """Round 0 has a base (the initial model: deltas), round 1 none (weights, where a counter
    of ~1000 would swamp weights of ~1). The same parameters with and without BatchNorm
    buffers give the same summaries, equal to cosine_select's scores and to a float64
    reference over the parameters; backfill (streamed) agrees too."""
    sent: dict[str, dict[int, dict[str, Update]]] = {}
    for job, buffers in (("plain", False), ("bn", True)):
        base, round0 = bn_round(7, 5, buffers=buffers)
        sent[job] = {0: round0, 1: bn_round(8, 5, buffers=buffers)[1]}
        root = tmp_path / job
        drop(root / "initial.safetensors", base, job=job, kind="initial")
        for r, updates in sent[job].items():
            for c, u in updates.items():
                drop(root / f"r{r}" / f"{c}.safetensors", u, job=job, round=r, client=c)
        ingest(bucket, s3_server, root, job=job)
    assert [t.name for t in bucket.get_manifest("bn", 0).tensors][3:6] == [
        "bn.running_mean",
        "bn.running_var",
        "bn.num_batches_tracked",
    ]
    node = CacheNode(bucket, budget_bytes=10**8)

    def summaries(job: str, r: int, name: str) -> np.ndarray:
        manifest = bucket.get_manifest(job, r)
        return np.array([manifest.updates[c].summary[name] for c in manifest.clients])

    for r in (0, 1):
        clients = bucket.get_manifest("bn", r).clients
        base = trainable(bn_round(7, 5, buffers=False)[0]) if r == 0 else None
        want = direct_scores([trainable(sent["bn"][r][c]) for c in clients], base)
        for job in ("plain", "bn"):
            answer = node.handle(
                {"op": "run", "workload": "cosine_select", "job": job, "round": r, "params": {}}
            )
            scores = answer["result"]["scores"]
            cos = summaries(job, r, COS_TO_MEAN)
            np.testing.assert_allclose(cos, [scores[c] for c in clients], atol=1e-6)
            np.testing.assert_allclose(cos, want[COS_TO_MEAN], rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(summaries(job, r, UPDATE_NORM), want[UPDATE_NORM], rtol=1e-5)
        if r == 0:  # deltas: the sign-flipper points away from the mean, counters or not
            assert cos[-1] < 0.0 < cos[:-1].min()

    for job in ("plain", "bn"):  # backfill, streamed one update at a time
        run_backfill(job, s3_endpoint=s3_server.url, bucket=bucket.bucket, max_round_bytes=1)
    for r in (0, 1):
        for name in (COS_TO_MEAN, UPDATE_NORM, CONTRIBUTION):
            np.testing.assert_allclose(
                summaries("bn", r, name), summaries("plain", r, name), rtol=1e-5, atol=1e-6
            )


def test_rounds_argument_is_a_half_open_range() -> None:
    assert parse_rounds("3:7") == (3, 7)
    assert parse_rounds(":5") == (None, 5) and parse_rounds("2:") == (2, None)
    assert parse_rounds(None) == (None, None)
    for bad in ("7:3", "x:1", "5"):
        with pytest.raises(Exception, match="rounds"):
            parse_rounds(bad)
