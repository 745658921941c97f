"""Ingestion's trust boundary: raw update files are untrusted input.

One hostile file beside valid ones becomes that file's dead letter and the valid files commit
(any exception of a per-file step, not only FLStore's own); sizes, nesting and numbers a file
declares are checked before anything is allocated for them; a value that would break a round
for good (``num_examples = 10**30``) is refused at ingestion, in the SDK and when a manifest is
read back; and a client sent twice in one run is a dead letter every time, never a path-order
winner. The pipeline runs on Beam's in-process FnApiRunner against the session's moto S3.
"""

from __future__ import annotations

import itertools
import json
import struct
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import pipelines.commit
import pipelines.sources
import pipelines.store_updates
import pipelines.validate
from flstore_core.data.codec import (
    DEFAULT_LIMITS,
    CodecLimits,
    Update,
    decompress,
    encode_update,
    parse_header,
    parse_safetensors,
    serialize,
    update_from_metadata,
)
from flstore_core.data.manifest import RoundManifest
from flstore_core.data.rawfile import read_raw_header, write_raw_update
from flstore_core.errors import (
    CorruptUpdateError,
    FLStoreError,
    LimitExceededError,
    StoredObjectCorruptError,
    ValidationError,
)
from flstore_core.storage.object_store import ObjectStore
from lambdas.local_runtime.s3_server import LocalS3
from pipelines.backfill import run_backfill
from pipelines.ingest import IngestSummary, main, run_ingest
from tests.conftest import small_update

JOB = "trust"
GiB = 1024**3
_buckets = itertools.count()


# ---------------------------------------------------------------------- raw files by hand


def raw_file(meta: dict[str, str], entries: dict[str, tuple[str, list[int], bytes]]) -> bytes:
    """A safetensors file exactly as given: a hostile writer's header, no checks."""
    header: dict[str, Any] = {"__metadata__": meta}
    offset, data = 0, b""
    for name, (dtype, shape, payload) in entries.items():
        header[name] = {
            "dtype": dtype,
            "shape": shape,
            "data_offsets": [offset, offset + len(payload)],
        }
        offset, data = offset + len(payload), data + payload
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    return struct.pack("<Q", len(head)) + head + data


def with_metadata(raw: bytes, **changes: str) -> bytes:
    """``raw`` with ``__metadata__`` fields replaced (a valid file's data, a hostile header)."""
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    header["__metadata__"].update(changes)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    return struct.pack("<Q", len(head)) + head + raw[8 + n :]


def valid(round_: int, client: str, seed: int = 0) -> bytes:
    return write_raw_update(small_update(seed, job=JOB, round=round_, client=client))


def meta(round_: int, client: str) -> dict[str, str]:
    return {"job": JOB, "round": str(round_), "client": client, "num_examples": "1"}


def put(root: Path, name: str, data: bytes) -> Path:
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def new_store(s3_server: LocalS3) -> ObjectStore:
    st = ObjectStore(f"trust-{next(_buckets)}", endpoint_url=s3_server.url)
    st.ensure_bucket()
    return st


def ingest(store: ObjectStore, s3_server: LocalS3, src: Path) -> IngestSummary:
    return run_ingest(str(src), job=JOB, s3_endpoint=s3_server.url, bucket=store.bucket)


def letters(summary: IngestSummary) -> dict[str, Any]:
    return {Path(d.file).name: d for d in summary.deadletters}


# ---------------------------------------------------------------------- one run, many attacks

HOSTILE = {
    # the codec's reshape raised ValueError ("array is too big") and stopped the run
    "shape.safetensors": raw_file(meta(1, "shape"), {"t": ("F32", [0, 2**62, 2**62], b"")}),
    # json.loads raised RecursionError and stopped the run
    "deep.safetensors": with_metadata(valid(0, "deep", 5), metrics="[" * 100_000 + "]" * 100_000),
    # accepted, then fedavg and cosine_select on the round answered 503 (OverflowError)
    "examples.safetensors": with_metadata(valid(0, "examples", 6), num_examples=str(10**30)),
    "metric.safetensors": with_metadata(valid(0, "metric", 7), metrics='{"loss": 1e400}'),
    # the same client twice: both copies are dead letters, whatever their paths
    "a/dup.safetensors": valid(0, "dup", 8),
    "b/dup.safetensors": valid(0, "dup", 9),
}


@pytest.fixture(scope="module")
def hostile_run(
    s3_server: LocalS3, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ObjectStore, IngestSummary]]:
    root = tmp_path_factory.mktemp("hostile")
    for i in range(3):
        put(root, f"good/c{i}.safetensors", valid(0, f"c{i}", i))
    for name, data in HOSTILE.items():
        put(root, name, data)
    store = new_store(s3_server)
    try:
        yield store, ingest(store, s3_server, root)
    finally:
        store.close()


def hostile_root(file: str) -> Path:
    """The folder of the hostile run (the parent of ``good/``)."""
    path = Path(file)
    return path.parent.parent if path.parent.name in {"a", "b"} else path.parent


def test_hostile_files_are_dead_letters_and_the_valid_round_commits(
    hostile_run: tuple[ObjectStore, IngestSummary],
) -> None:
    store, summary = hostile_run
    assert store.get_manifest(JOB, 0).clients == ["c0", "c1", "c2"]
    assert summary.committed == [f"{JOB}/0"]
    names = sorted(str(Path(d.file).relative_to(hostile_root(d.file))) for d in summary.deadletters)
    assert names == sorted(HOSTILE)
    assert len(summary.deadletters) == len(HOSTILE)


def test_a_shape_the_codec_cannot_allocate_is_refused_from_the_header(
    hostile_run: tuple[ObjectStore, IngestSummary],
) -> None:
    d = letters(hostile_run[1])["shape.safetensors"]
    assert (d.code, d.stage) == ("too_large", "header")


def test_metrics_nested_past_the_depth_cap_are_corrupt(
    hostile_run: tuple[ObjectStore, IngestSummary],
) -> None:
    d = letters(hostile_run[1])["deep.safetensors"]
    assert (d.code, d.stage) == ("corrupt_update", "header") and "nest" in d.reason


@pytest.mark.parametrize("name", ["examples.safetensors", "metric.safetensors"])
def test_out_of_range_numbers_are_refused_at_ingestion(
    hostile_run: tuple[ObjectStore, IngestSummary], name: str
) -> None:
    d = letters(hostile_run[1])[name]
    assert (d.code, d.stage) == ("corrupt_update", "header")


def test_a_client_sent_twice_in_one_run_is_a_dead_letter_every_time(
    hostile_run: tuple[ObjectStore, IngestSummary],
) -> None:
    dups = sorted(
        (d for d in hostile_run[1].deadletters if d.client == "dup"), key=lambda d: d.file
    )
    assert [d.code for d in dups] == ["duplicate", "duplicate"]
    a, b = dups
    assert b.file in a.reason and a.file in b.reason
    assert "dup" not in hostile_run[0].get_manifest(JOB, 0).updates


# ---------------------------------------------------------------------- any exception, any step


def _raise_for_evil(exc: BaseException, real: Any, client_of: Any) -> Any:
    def patched(*args: Any, **kwargs: Any) -> Any:
        if client_of(*args, **kwargs) == "evil":
            raise exc
        return real(*args, **kwargs)

    return patched


STEPS = {
    # header parse: any exception the codec lets through
    "header": (
        pipelines.sources,
        "check_identity",
        lambda update: update.client,
        MemoryError(),
    ),
    # round validation
    "round": (
        pipelines.validate,
        "check_agreement",
        lambda reference, specs, client: client,
        ValueError("bad shape"),
    ),
    # parse of the data and encoding
    "store": (
        pipelines.store_updates,
        "encode_update",
        lambda update, precision, **_: update.client,
        RecursionError("deep"),
    ),
    # the summaries of the round the file is in: that round fails, the others commit
    "commit": (
        pipelines.commit,
        "stream_scores",
        lambda clients, *a, **k: "evil" if "evil" in clients else None,
        OverflowError("int too large to convert to float"),
    ),
}


@pytest.mark.parametrize("stage", sorted(STEPS))
def test_any_exception_of_a_per_file_step_is_that_files_dead_letter(
    stage: str, s3_server: LocalS3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module, name, client_of, exc = STEPS[stage]
    monkeypatch.setattr(module, name, _raise_for_evil(exc, getattr(module, name), client_of))
    for i in range(2):
        put(tmp_path, f"r0/c{i}.safetensors", valid(0, f"c{i}", i))
    put(tmp_path, "r1/evil.safetensors", valid(1, "evil", 3))
    put(tmp_path, "r1/c0.safetensors", valid(1, "c0", 4))
    store = new_store(s3_server)
    try:
        summary = ingest(store, s3_server, tmp_path)
        assert store.get_manifest(JOB, 0).clients == ["c0", "c1"]
        evil = letters(summary)["evil.safetensors"]
        client = None if stage == "header" else "evil"  # a header that failed names no one
        assert (evil.stage, evil.code, evil.client) == (stage, "error", client)
        assert evil.exception == type(exc).__name__ and evil.reason.startswith(type(exc).__name__)
        if stage == "commit":  # the round's other file was not committed either: it says why
            assert store.find_manifest(JOB, 1) is None
            assert len(summary.deadletters) == 2
        else:
            assert store.get_manifest(JOB, 1).clients == ["c0"]
            assert len(summary.deadletters) == 1
    finally:
        store.close()


def test_the_run_reports_its_dead_letters_and_exits_non_zero(
    s3_server: LocalS3, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    put(tmp_path, "c0.safetensors", valid(0, "c0"))
    put(tmp_path, "shape.safetensors", HOSTILE["shape.safetensors"])
    store = new_store(s3_server)
    try:
        argv = [str(tmp_path), "--job", JOB, "--s3-endpoint", s3_server.url]
        assert main([*argv, "--bucket", store.bucket, "--no-prefetch"]) == 1
        out = json.loads(capsys.readouterr().out)
        assert len(out["deadletters"]) == 1 and out["deadletters"][0]["exception"]
        assert store.get_manifest(JOB, 0).clients == ["c0"]
    finally:
        store.close()


def test_backfill_turns_a_round_it_cannot_recompute_into_a_dead_letter(
    s3_server: LocalS3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for r in range(2):
        put(tmp_path, f"r{r}/c0.safetensors", valid(r, "c0", r))
        put(tmp_path, f"r{r}/c1.safetensors", valid(r, "c1", r + 5))
    store = new_store(s3_server)
    try:
        # without summaries, which the backfill then adds (it never changes one)
        first = run_ingest(
            str(tmp_path), job=JOB, s3_endpoint=s3_server.url, bucket=store.bucket, summarize=False
        )
        assert first.deadletters == []
        real_get = ObjectStore.get_manifest

        def get_manifest(self: ObjectStore, job: str, round_: int, *a: Any, **k: Any) -> Any:
            if round_ == 1:
                raise RecursionError("maximum recursion depth exceeded")
            return real_get(self, job, round_, *a, **k)

        monkeypatch.setattr(ObjectStore, "get_manifest", get_manifest)
        summary = run_backfill(JOB, s3_endpoint=s3_server.url, bucket=store.bucket)
        assert summary.rounds_backfilled == 1, summary.deadletters
        assert [(d.round, d.code, d.exception) for d in summary.deadletters] == [
            (1, "error", "RecursionError")
        ]
    finally:
        store.close()


# ---------------------------------------------------------------------- caps before allocation


def peak_of(parse: Any) -> int:
    tracemalloc.start()
    try:
        parse()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


def test_a_shape_with_a_zero_and_huge_dimensions_is_refused() -> None:
    raw = HOSTILE["shape.safetensors"]
    with pytest.raises(LimitExceededError):
        parse_safetensors(raw)


def test_the_declared_bytes_of_an_update_are_capped() -> None:
    raw = bytes(serialize(Update({f"t{i}": np.zeros(100, np.float32) for i in range(3)})))
    assert len(parse_safetensors(raw, CodecLimits(max_update_bytes=1200)).tensors) == 3
    with pytest.raises(LimitExceededError, match="1199"):
        parse_safetensors(raw, CodecLimits(max_update_bytes=1199))


def test_a_header_of_three_4_gib_tensors_is_refused_before_its_data_is_read() -> None:
    four = 4 * GiB // 4
    head = raw_file({}, {f"t{i}": ("F32", [four], b"") for i in range(3)})
    (n,) = struct.unpack("<Q", head[:8])
    # offsets as a real 12 GiB file has them (raw_file writes empty payloads)
    header = json.loads(head[8 : 8 + n])
    for i in range(3):
        header[f"t{i}"]["data_offsets"] = [i * 4 * GiB, (i + 1) * 4 * GiB]
    body = json.dumps(header).encode()
    data = struct.pack("<Q", len(body)) + body
    reads: list[int] = []

    def read(k: int) -> bytes:
        at = sum(reads)
        reads.append(k)
        return data[at : at + k]

    with pytest.raises(LimitExceededError):
        read_raw_header(read, len(data) + 12 * GiB)
    assert sum(reads) == len(data)  # the header, not a byte of data


def test_the_update_cap_is_a_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    from flstore_core import config
    from pipelines.ingest_config import IngestConfig
    from pipelines.runtime import StoreTarget

    assert config.MAX_UPDATE_BYTES in config.SETTINGS
    assert config.MAX_UPDATE_BYTES.default_int == DEFAULT_LIMITS.max_update_bytes
    monkeypatch.setenv("FLSTORE_MAX_UPDATE_BYTES", "1000")
    cfg = IngestConfig(run_id="r", store=StoreTarget(bucket="b"), s3_options={})
    assert cfg.limits.max_update_bytes == 1000


def test_a_zstd_frame_claiming_4_gib_is_corrupt_not_a_memory_error() -> None:
    # one raw block of 8 bytes in a frame whose header declares 4 GiB of content
    block = (8 << 3) | 1
    frame = (
        b"\x28\xb5\x2f\xfd"
        + bytes([0xE0])
        + struct.pack("<Q", 4 * GiB)
        + bytes((block & 0xFF, (block >> 8) & 0xFF, block >> 16))
        + b"\0" * 8
    )
    errors: list[BaseException] = []

    def parse() -> None:
        try:
            decompress(frame)
        except BaseException as exc:  # the type is what is tested
            errors.append(exc)

    assert peak_of(parse) < 16 * 1024 * 1024
    assert len(errors) == 1 and isinstance(errors[0], CorruptUpdateError), errors


def test_metrics_depth_is_checked_without_recursion() -> None:
    for text in ("[" * 100_000, "{" * 65, '{"a": ' + "[" * 64 + "]" * 64 + "}"):
        with pytest.raises(CorruptUpdateError, match="nest"):
            update_from_metadata({}, {"metrics": text})
    # brackets inside a string do not count
    ok = update_from_metadata({}, {"metrics": json.dumps({"[" * 100: 1.0})})
    assert ok.metrics == {"[" * 100: 1.0}


# ---------------------------------------------------------------------- numbers a round relies on


@pytest.mark.parametrize("n", [str(10**30), str(2**53), "-1", "1e3"])
def test_num_examples_out_of_range_is_corrupt_metadata(n: str) -> None:
    with pytest.raises(CorruptUpdateError, match="num_examples"):
        update_from_metadata({}, {"num_examples": n})


def test_num_examples_up_to_2_53_minus_1_is_accepted() -> None:
    assert update_from_metadata({}, {"num_examples": str(2**53 - 1)}).num_examples == 2**53 - 1


@pytest.mark.parametrize(
    "metrics", ['{"loss": 1e400}', '{"loss": -1e400}', '{"loss": "x"}', '{"loss": {"a": 1}}']
)
def test_a_metric_that_is_not_a_finite_number_is_corrupt_metadata(metrics: str) -> None:
    with pytest.raises(CorruptUpdateError, match="metric"):
        update_from_metadata({}, {"metrics": metrics})


@pytest.mark.parametrize(
    ("examples", "metrics"),
    [(10**30, {}), (2**53, {}), (-1, {}), (1, {"loss": float("inf")}), (1, {"loss": 10**400})],
)
def test_the_sdk_refuses_an_update_that_would_break_a_round(
    examples: int, metrics: dict[str, Any]
) -> None:
    update = small_update(1, job=JOB, round=0, client="c0")
    update.num_examples, update.metrics = examples, metrics
    with pytest.raises(ValidationError):
        encode_update(update)


def _manifest(**entry: Any) -> bytes:
    enc = encode_update(small_update(1))
    obj = {
        "format": "flstore-manifest/1",
        "job": JOB,
        "round": 0,
        "precision": "float32",
        "tensors": [s.to_json() for s in enc.specs],
        "updates": {
            "c0": {
                "key": "k",
                "sha256": enc.sha256,
                "raw_bytes": enc.raw_bytes,
                "stored_bytes": len(enc.data),
                "num_examples": 10,
                "metrics": {"loss": 0.5},
                "summary": {"norm": 1.0},
                **entry,
            }
        },
    }
    return json.dumps(obj).encode().replace(b'"INF"', b"1e400").replace(b'"BIG"', b"1" * 40)


@pytest.mark.parametrize(
    "entry",
    [
        {"num_examples": 10**30},
        {"num_examples": "INF"},
        {"raw_bytes": "INF"},
        {"stored_bytes": "BIG"},
        {"summary": {"norm": 10**400}},
        {"summary": {"norm": "INF"}},
        {"metrics": {"loss": "INF"}},
    ],
)
def test_a_manifest_with_a_number_out_of_range_is_corrupt(entry: dict[str, Any]) -> None:
    assert RoundManifest.from_json(_manifest()).updates["c0"].num_examples == 10
    with pytest.raises(StoredObjectCorruptError):
        RoundManifest.from_json(_manifest(**entry))


def test_every_error_here_is_typed() -> None:
    # what the dead letters and the API map to codes and statuses
    for exc in (CorruptUpdateError, LimitExceededError, StoredObjectCorruptError):
        assert issubclass(exc, FLStoreError)
    assert parse_header is not None


def test_files_that_do_not_fit_the_jobs_model_are_dead_letters_not_commits(
    s3_server: LocalS3, tmp_path: Path
) -> None:
    """A job that declares a model takes only files that load into it: the others are dead
    letters naming the tensor, and a round of them is not committed (it would answer only at
    query time, with an error no re-ingestion could fix)."""
    from flstore_core import models
    from flstore_core.data.codec import Update
    from flstore_core.data.manifest import JobSpec

    store = new_store(s3_server)
    try:
        store.put_job_spec(JobSpec(JOB, model="digits_cnn"))
        state = models.state_arrays(models.build("digits_cnn"))
        for i in range(2):
            update = Update(dict(state), num_examples=1, job=JOB, round=0, client=f"fits{i}")
            put(tmp_path, f"good/fits{i}.safetensors", write_raw_update(update))
        for i in range(3):  # another model's state dicts: the majority of the run, still refused
            put(tmp_path, f"bad/other{i}.safetensors", valid(0, f"other{i}", i))
        summary = ingest(store, s3_server, tmp_path)
        dead = letters(summary)
        assert sorted(dead) == [f"other{i}.safetensors" for i in range(3)]
        assert all(d.code == "mismatch" and "digits_cnn" in d.reason for d in dead.values())
        assert all("tensor '" in d.reason for d in dead.values())  # each names a tensor
        assert store.get_manifest(JOB, 0).clients == ["fits0", "fits1"]  # not outvoted
    finally:
        store.close()
