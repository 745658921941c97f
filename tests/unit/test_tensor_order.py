"""Tensors by name, whatever order a file stores them in (ARCHITECTURE §2).

The ``safetensors`` library stores tensors sorted by name; a PyTorch state dict lists them in
registration order. A federated ``digits_cnn`` job (:func:`evaluation.digits_job.simulate`) is
trained once into a moto bucket in state-dict order — the reference — and its very updates,
initial and global models are written again with ``safetensors.numpy.save`` (sorted by name)
into two more jobs: one through the ingestion pipeline, one through the object store's API (what
the SDK and the Flower integration call). Every model-based workload must answer both exactly as
it answers the reference, rounds that mix both orders are aligned, the job's canonical order
(the model's, else the first committed round's) lays out the manifest, the round matrix and the
model results, and a real mismatch is reported with the tensor's name.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import save

from evaluation.baselines.redis_source import load_round_from
from evaluation.digits_job import simulate
from flstore_core import models
from flstore_core.cache.node import CacheNode
from flstore_core.cache.round_data import ArtifactStats, RoundData
from flstore_core.cache.round_loading import load_round
from flstore_core.data import layout as layout_keys
from flstore_core.data.codec import TensorSpec, Update, decode_update, parse_safetensors
from flstore_core.data.manifest import JobSpec
from flstore_core.errors import InvalidParamsError
from flstore_core.sdk.jobs import create_job
from flstore_core.storage.commit import check_agreement, majority_specs
from flstore_core.storage.object_store import ObjectStore
from flstore_core.workloads import WorkloadResult, get
from flstore_core.workloads.contribution_loo import fresh_model_weights
from lambdas.local_runtime.s3_server import LocalS3
from pipelines.ingest import run_ingest
from tests.conftest import small_update

MODEL = "digits_cnn"
REF, INGESTED, API, MIXED_INGESTED, MIXED_API = (
    "order-ref",
    "order-ingest",
    "order-api",
    "order-mixed-ingest",
    "order-mixed-api",
)
SORTED_JOBS = (INGESTED, API, MIXED_INGESTED, MIXED_API)
CLIENTS, ROUNDS, MALICIOUS = 5, 2, "client-04"
LAST = ROUNDS - 1

# every model-based round workload with the params that exercise it (personalize by both rules)
WORKLOADS: list[tuple[str, dict[str, Any]]] = [
    ("accuracy_select", {"k": 3}),
    ("contribution_loo", {}),
    ("contribution_shapley", {}),
    ("personalize", {"client": "client-01"}),
    ("personalize", {"client": "client-01", "by": "accuracy"}),
    ("feddebug", {}),
    ("fltrust", {}),
    ("fedavg", {}),
]


def state_names() -> list[str]:
    return [s.name for s in models.state_specs(models.build(MODEL))]


def library_file(update: Update, **meta: Any) -> bytes:
    """``update`` as the ``safetensors`` library writes it (tensors sorted by name), with the
    raw-file metadata of ARCHITECTURE §2."""
    fields = {"num_examples": str(update.num_examples), "metrics": json.dumps(update.metrics)}
    fields.update({k: str(v) for k, v in meta.items()})
    tensors = {k: np.array(v, order="C") for k, v in update.tensors.items()}  # 0-d stays 0-d
    return save(tensors, metadata=fields)


def mixed(i: int) -> bool:
    """Clients of the mixed jobs alternate: even ones in state-dict order, odd ones sorted."""
    return i % 2 == 0


@pytest.fixture(scope="module")
def jobs(s3_server: LocalS3, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ObjectStore]:
    st = ObjectStore("tensor-order", endpoint_url=s3_server.url)
    st.ensure_bucket()
    simulate(st, job=REF, clients=CLIENTS, rounds=ROUNDS, malicious=(MALICIOUS,), local_epochs=2)
    x, y = st.get_validation_set(REF)
    drops = tmp_path_factory.mktemp("drops")
    for job in SORTED_JOBS:
        st.put_job_spec(JobSpec(job, model=MODEL))
        st.put_validation_set(job, x, y)
    # models: sorted files, ingested for the ingested jobs, stored through the API for the others
    models_of = {"initial": st.get_initial(REF)} | {
        str(r): st.get_global(REF, r) for r in range(ROUNDS)
    }
    for job in (INGESTED, MIXED_INGESTED):
        for name, model in models_of.items():
            meta: dict[str, Any] = {
                "job": job,
                "kind": "initial" if name == "initial" else "global",
            }
            if name != "initial":
                meta["round"] = name
            (drops / f"{job}-model-{name}.safetensors").write_bytes(library_file(model, **meta))
    for job in (API, MIXED_API):
        st.put_initial(job, parse_safetensors(library_file(models_of["initial"])))
        for r in range(ROUNDS):
            st.put_global(job, r, parse_safetensors(library_file(models_of[str(r)])))
    for r in range(ROUNDS):
        manifest = st.get_manifest(REF, r)
        entries: dict[str, list[Any]] = {API: [], MIXED_API: []}
        for i, client in enumerate(manifest.clients):
            update = st.get_update(REF, r, client)
            for job in (INGESTED, MIXED_INGESTED):
                if job == MIXED_INGESTED and mixed(i):
                    data = _own_raw(update, job, r, client)
                else:
                    data = library_file(update, job=job, round=r, client=client)
                (drops / f"{job}-{r}-{client}.safetensors").write_bytes(data)
            for job in (API, MIXED_API):
                sent = update if job == MIXED_API and mixed(i) else _sorted(update)
                sent.num_examples, sent.metrics = update.num_examples, update.metrics
                entries[job].append(st.put_update(job, r, client, sent))
        for job in (API, MIXED_API):
            st.commit_round(job, r, entries[job])
    summary = run_ingest(str(drops), s3_endpoint=s3_server.url, bucket=st.bucket)
    assert summary.deadletters == [], summary.deadletters
    yield st
    st.close()


def _sorted(update: Update) -> Update:
    """``update`` as the ``safetensors`` library hands it back (sorted by name)."""
    return parse_safetensors(library_file(update))


def _own_raw(update: Update, job: str, round_: int, client: str) -> bytes:
    from flstore_core.data.rawfile import write_raw_update

    return write_raw_update(
        Update(
            dict(update.tensors),
            num_examples=update.num_examples,
            metrics=update.metrics,
            job=job,
            round=round_,
            client=client,
        )
    )


@pytest.fixture(scope="module")
def rounds(jobs: ObjectStore) -> dict[str, RoundData]:
    return {job: load_round(jobs, job, LAST, ArtifactStats()) for job in (REF, *SORTED_JOBS)}


def test_the_library_really_stores_the_tensors_sorted_and_not_in_state_dict_order(
    jobs: ObjectStore,
) -> None:
    update = jobs.get_update(REF, 0, "client-00")
    assert list(update.tensors) == state_names()
    sorted_names = list(_sorted(update).tensors)
    assert sorted_names == sorted(state_names()) != state_names()


@pytest.mark.parametrize("job", SORTED_JOBS)
def test_the_manifest_and_the_round_matrix_follow_the_models_state_dict_order(
    jobs: ObjectStore, rounds: dict[str, RoundData], job: str
) -> None:
    for r in range(ROUNDS):
        assert jobs.get_manifest(job, r).tensors == tuple(models.state_specs(models.build(MODEL)))
    data, ref = rounds[job], rounds[REF]
    assert data.clients == ref.clients
    assert np.array_equal(data.matrix, ref.matrix)  # bit for bit: the same columns
    assert data.base is not None and ref.base is not None
    assert np.array_equal(data.base, ref.base)  # the sorted global model counts as the base
    assert np.array_equal(data.num_examples, ref.num_examples)
    # the aggregator baselines' loader reads the same matrix and base
    with ThreadPoolExecutor(2) as pool:
        baseline = load_round_from(jobs.blobs, job, LAST, ArtifactStats(), pool)
    assert baseline.specs == ref.specs and np.array_equal(baseline.matrix, ref.matrix)
    assert baseline.base is not None and np.array_equal(baseline.base, ref.base)


@pytest.mark.parametrize("job", SORTED_JOBS)
def test_the_ingest_summaries_are_the_references(jobs: ObjectStore, job: str) -> None:
    if job in (API, MIXED_API):
        return  # the API path writes only the norm, the same either way
    ref = jobs.get_manifest(REF, LAST)
    got = jobs.get_manifest(job, LAST)
    for client in ref.clients:
        assert got.updates[client].summary.keys() >= {"norm", "cos_to_mean", "update_norm"}
        assert got.updates[client].summary["norm"] == pytest.approx(
            ref.updates[client].summary["norm"], rel=1e-6
        )


@pytest.fixture(scope="module")
def reference_answers(rounds: dict[str, RoundData]) -> dict[str, WorkloadResult]:
    """Each workload's answer on the state-dict ordered job, computed once."""
    out = {}
    for workload, params in WORKLOADS:
        w = get(workload)
        out[f"{workload}{params}"] = w.run(rounds[REF], w.validate(dict(params)))
    return out


# the mixed jobs hold the very matrix and base of the reference (checked above), so the workloads
# run on the two all-sorted jobs, one per path
@pytest.mark.parametrize("job", (INGESTED, API))
@pytest.mark.parametrize(("workload", "params"), WORKLOADS, ids=lambda p: str(p))
def test_every_model_workload_answers_as_on_the_state_dict_ordered_job(
    rounds: dict[str, RoundData],
    reference_answers: dict[str, WorkloadResult],
    job: str,
    workload: str,
    params: dict[str, Any],
) -> None:
    w = get(workload)
    want = reference_answers[f"{workload}{params}"]
    got = w.run(rounds[job], w.validate(dict(params)))
    assert got.result == want.result
    if want.model is not None:
        assert got.model is not None
        want_model = want.model() if callable(want.model) else want.model
        got_model = got.model() if callable(got.model) else got.model
        assert np.array_equal(got_model, want_model)


def node_run(node: CacheNode, job: str, workload: str, **params: Any) -> dict[str, Any]:
    event: dict[str, Any] = {"op": "run", "workload": workload, "job": job, "params": params}
    if workload != "inference":
        event["round"] = LAST
    answer = node.handle(event)
    assert "error" not in answer, answer
    return answer["result"]  # type: ignore[no-any-return]


@pytest.mark.parametrize("job", (INGESTED, API))
def test_model_results_and_inference_through_a_cache_node(jobs: ObjectStore, job: str) -> None:
    node = CacheNode(jobs, budget_bytes=10**8)
    for workload, params in (("personalize", {"client": "client-02"}), ("fltrust", {})):
        want = decode_update(jobs.get_object(node_run(node, REF, workload, **params)["model_key"]))
        got = decode_update(jobs.get_object(node_run(node, job, workload, **params)["model_key"]))
        assert list(got.tensors) == state_names()  # the job's canonical order
        for name in state_names():
            assert np.array_equal(got.tensors[name], want.tensors[name])
    x, y = jobs.get_validation_set(REF)
    inputs = x[:7].tolist()
    asks: list[dict[str, Any]] = [{}, {"round": 0}, {"inputs": inputs, "labels": y[:7].tolist()}]
    for params in asks:
        assert node_run(node, job, "inference", **params) == node_run(
            node, REF, "inference", **params
        )


# ---------------------------------------------------------------------- the commit rules


def specs(*names: str) -> tuple[TensorSpec, ...]:
    return tuple(TensorSpec(n, "F32", (i + 1,)) for i, n in enumerate(sorted(names)))


def layout(all_specs: tuple[TensorSpec, ...], *names: str) -> tuple[TensorSpec, ...]:
    by_name = {s.name: s for s in all_specs}
    return tuple(by_name[n] for n in names)


def test_majority_counts_the_same_tensors_in_another_order_as_the_same_specs() -> None:
    every = specs("a", "b", "c")
    other = (TensorSpec("a", "F32", (9,)), *every[1:])  # a real difference: a's shape
    specs_of = {
        "c1": layout(every, "c", "b", "a"),
        "c2": layout(every, "a", "b", "c"),
        "c3": other,
        "c4": other,
    }
    # {c1, c2} are one group of two, as large as {c3, c4}: the earliest written group wins, laid
    # out as its earliest written update stores it
    written = {"c1": "1", "c2": "2", "c3": "3", "c4": "4"}
    assert majority_specs(specs_of, written) == layout(every, "c", "b", "a")
    specs_of["c5"] = layout(every, "b", "c", "a")
    written["c5"] = "0"
    assert majority_specs(specs_of, written) == layout(every, "b", "c", "a")
    check_agreement(every, layout(every, "c", "a", "b"), "c9")  # order is not a difference


def test_a_job_without_model_keeps_the_order_of_its_first_committed_round(
    store: ObjectStore,
) -> None:
    job = "order-no-model"
    store.put_job_spec(JobSpec(job))
    own = list(small_update(0).tensors)
    # round 3 first: clients 0 and 1 in sorted order, client 2 in its own
    for i in range(3):
        u = small_update(i)
        store.put_update(job, 3, f"c{i}", u if i == 2 else _sorted(u))
    first = store.commit_round(job, 3)
    assert [s.name for s in first.tensors] == sorted(own)  # the majority's layout
    # a later round stored in the other order, and an earlier one committed after it, take it
    for r in (4, 1):
        for i in range(2):
            store.put_update(job, r, f"c{i}", small_update(10 * r + i))
        assert [s.name for s in ObjectStore(blobs=store.blobs).commit_round(job, r).tensors] == (
            sorted(own)
        )
        data = load_round(store, job, r, ArtifactStats())
        for row, client in enumerate(data.clients):
            sent = small_update(10 * r + int(client[1:]))
            tensors = data.tensors_of(data.matrix[row])
            assert list(tensors) == sorted(own)
            for name, value in sent.tensors.items():
                assert np.array_equal(tensors[name], value)


def test_a_mismatch_names_the_tensor_that_really_differs(rounds: dict[str, RoundData]) -> None:
    data = rounds[INGESTED]
    renamed = tuple(
        TensorSpec("head.bias", s.dtype, s.shape) if s.name == "fc2.bias" else s for s in data.specs
    )
    wrong = RoundData(
        data.job,
        data.round,
        data.clients,
        data.matrix.copy(),
        renamed,
        data.num_examples,
        data.metrics,
        base=data.base,
        context=data.context,
    )
    for workload in ("accuracy_select", "feddebug"):
        w = get(workload)
        with pytest.raises(InvalidParamsError, match=r"'fc2\.bias' of the model is missing"):
            w.run(wrong, w.validate({}))
    with pytest.raises(InvalidParamsError, match=r"'fc2\.bias' of the model is missing"):
        fresh_model_weights(MODEL, wrong)
    model = models.build(MODEL)
    extra = (*data.specs, TensorSpec("extra", "F32", (1,)))
    with pytest.raises(InvalidParamsError, match=r"'extra' of the updates is not in the model"):
        models.load_vector(model, np.zeros(data.matrix.shape[1] + 1, np.float32), extra)


def test_a_model_loads_from_a_row_in_any_order(rounds: dict[str, RoundData]) -> None:
    """``load_vector`` against ``load_state_dict`` of the tensors by name, the reference."""
    data = rounds[REF]
    row = data.matrix[1]
    tensors = data.tensors_of(row)
    shuffled = [data.specs[i] for i in np.random.default_rng(0).permutation(len(data.specs))]
    vector = np.concatenate([tensors[s.name].reshape(-1) for s in shuffled])
    got = models.load_vector(models.build(MODEL), vector, shuffled).state_dict()
    want = models.build(MODEL)
    import torch

    want.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in tensors.items()})
    for name, value in want.state_dict().items():
        assert torch.equal(got[name], value)


# --- the canonical order recorded at ``job create`` (commits where torch is not installed) ---


def _model_updates(n: int) -> list[Update]:
    """``n`` updates of ``MODEL`` as the ``safetensors`` library hands them back (sorted)."""
    reference = models.build(MODEL).state_dict()
    rng = np.random.default_rng(7)
    out = []
    for i in range(n):
        tensors = {
            k: v.numpy() + rng.standard_normal(tuple(v.shape)).astype(v.numpy().dtype)
            if v.is_floating_point()
            else v.numpy().copy()
            for k, v in reference.items()
        }
        out.append(_sorted(Update(tensors, num_examples=10 + i, metrics={})))
    return out


def _without_torch(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """As on an ingestion worker or the router: ``import torch`` fails, and so does the
    registry (it needs torch); the models it was asked for are returned."""
    monkeypatch.setitem(sys.modules, "torch", None)
    asked: list[str] = []

    def no_torch(name: str) -> Any:
        asked.append(name)
        raise ImportError("No module named 'torch'")

    monkeypatch.setattr(models, "state_names", no_torch)
    monkeypatch.setattr(models, "build", no_torch)
    return asked


def test_job_create_records_the_models_state_dict_order(store: ObjectStore) -> None:
    spec = create_job(store, "order-recorded", model=MODEL)
    expected = tuple(models.build(MODEL).state_dict())  # the reference: torch's own order
    assert spec.state_names == expected
    read = ObjectStore(blobs=store.blobs).get_job_spec("order-recorded")
    assert read.state_names == expected
    assert list(expected) != sorted(expected)  # else the commit below would prove nothing
    assert create_job(store, "order-no-model-spec").state_names is None


def test_a_commit_without_torch_lays_out_a_model_jobs_first_round_in_the_models_order(
    store: ObjectStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = "order-recorded-commit"
    create_job(store, job, model=MODEL)
    expected = tuple(models.build(MODEL).state_dict())
    updates = _model_updates(3)
    asked = _without_torch(monkeypatch)
    worker = ObjectStore(blobs=store.blobs)  # a fresh process: nothing cached
    assert worker.tensor_order(job) == expected
    for i, u in enumerate(updates):
        worker.put_update(job, 0, f"c{i}", u)
    manifest = worker.commit_round(job, 0)
    assert tuple(s.name for s in manifest.tensors) == expected  # not the majority's (sorted)
    data = load_round(worker, job, 0, ArtifactStats())
    for row, client in enumerate(data.clients):
        tensors = data.tensors_of(data.matrix[row])
        assert tuple(tensors) == expected
        for name, value in updates[int(client[1:])].tensors.items():
            assert np.array_equal(tensors[name], value)
    assert asked == []  # the recorded order, not the registry


def test_an_old_job_json_without_the_order_still_reads_and_commits(
    store: ObjectStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = "order-old-spec"
    old = {"format": "flstore-job/1", "job": job, "model": MODEL, "precision": "float32"}
    store.blobs.put(layout_keys.job_spec_key(job), json.dumps(old).encode())
    spec = ObjectStore(blobs=store.blobs).get_job_spec(job)
    assert (spec.model, spec.state_names, spec.parameters) == (MODEL, None, None)
    expected = tuple(models.build(MODEL).state_dict())
    updates = _model_updates(2)
    for i, u in enumerate(updates):
        store.put_update(job, 0, f"c{i}", u)
    # with torch: the registry's order, as before the field existed
    assert ObjectStore(blobs=store.blobs).tensor_order(job) == expected
    # without torch: the first committed round's order (here the majority's, sorted by name)
    _without_torch(monkeypatch)
    worker = ObjectStore(blobs=store.blobs)
    assert worker.tensor_order(job) is None
    manifest = worker.commit_round(job, 0)
    assert [s.name for s in manifest.tensors] == sorted(expected)
    assert ObjectStore(blobs=store.blobs).tensor_order(job) == tuple(sorted(expected))
