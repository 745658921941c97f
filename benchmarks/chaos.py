"""Chaos: the API under load while cache nodes die, S3 misbehaves and an ingestion is killed.
Figures, not pass/fail.

A local stack of ``--nodes`` cache nodes (replication 2) with an explicit small cache budget
(``StackConfig(budget_bytes=...)``) so that one job's round is served in column blocks, its S3
endpoint a :class:`~lambdas.local_runtime.fault_proxy.FaultProxy` in front of moto. Three jobs
(``alpha`` with a stored initial model, so its rows are deltas; ``beta`` without; ``gamma``,
larger than one node's budget: sharded). Before the storm every request of the workload mix
(cosine_select, krum, fedavg, trimmed_mean on each job's committed rounds) is answered once:
that answer's ``result`` is the reference.

Then, for each phase, ``--clients`` threads send those requests through the HTTP gateway for
``--seconds`` while a background thread ingests new rounds of alpha and beta with
:func:`pipelines.ingest.run_ingest` (raw files written by the SDK's
:class:`~flstore_core.sdk.round_writer.RoundWriter`, straight to moto):

1. ``baseline`` — nothing injected;
2. ``node_kills`` — one cache node's instances SIGKILLed every ``--kill-every`` seconds;
3. ``total_outage`` — every node killed at once (a declared total outage), a quarter into the
   phase: ``recovery_s`` is the time from the kill until a request sent after it succeeds,
   ``recovery_all_s`` until every request of the mix sent after it has succeeded once;
4. ``s3_faults`` — the proxy answers slowly, 503 SlowDown, 500 InternalError, drops connections
   before forwarding and after (a lost answer), and every node's cache is evicted every few
   seconds so that rounds are read again through it;
5. ``ingest_kill`` — a ``flstore ingest`` subprocess SIGKILLed mid-round (once some of its
   updates are in S3), then run again to completion.

Each phase reports ``requests``, ``status_counts``, ``differing`` (answers whose
``json.dumps(result, sort_keys=True)`` differs from the reference's), ``lost`` and
``duplicated`` (the updates sent in that phase against S3: every sent update committed exactly
once with the same tensors; orphan update objects a manifest does not list count as
duplicated), ``p50``/``p99`` latency (ms, all requests of the phase) and ``recovery_s``; and,
to diagnose, ``unexpected_statuses`` (no answer, or any status but 200 except a 503 of the
declared outage), the first ``non_200`` answers (status, body or exception, latency) and each
differing answer's ``differing_detail`` (fields that differ, largest relative difference, the
answer's ``meta``, both results, and the requests whose reference it equals — an answer to
another request rather than other bits of this one).
Output: ARCHITECTURE §9 (``--json OUT``). ``--quick`` shortens every phase (~2 minutes).
"""

from __future__ import annotations

import http.client
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.report import parser, write_report
from flstore_core.data import layout
from flstore_core.data.codec import Update
from flstore_core.protocol import EvictOp
from flstore_core.routing.planner import plan_round
from flstore_core.sdk.round_writer import RoundWriter
from flstore_core.storage.object_store import ObjectStore
from lambdas.local_runtime.fault_proxy import FaultProxy, Faults
from lambdas.local_runtime.s3_server import LocalS3
from lambdas.local_runtime.stack import LocalStack, StackConfig

ROOT = Path(__file__).resolve().parent.parent
MiB = 1024 * 1024
BUCKET = "chaos"
WORKLOADS = ("cosine_select", "krum", "fedavg", "trimmed_mean")
# job -> (clients, parameters per client, rounds, stored initial model)
JOBS: dict[str, tuple[int, int, int, bool]] = {
    "alpha": (8, 20_000, 2, True),
    "beta": (10, 20_000, 1, False),
    "gamma": (10, 400_000, 1, True),
}
S3_FAULTS = Faults(slow=0.05, slow_s=(0.3, 1.5), slow_down=0.05, internal=0.03, drop=0.02,
                   lost_answer=0.02, cut=0.02)  # fmt: skip
INGESTED_CLIENTS = 4  # per background round
FIRST_INGESTED = 100  # rounds ingested in the background: 100, 101, ... across all phases
KILLED_ROUND = 100_000  # the round whose ingestion is killed
KILLED_CLIENTS = 24
KILLED_PARAMS = 200_000


def update_of(rng: np.random.Generator, params: int, base: dict[str, np.ndarray] | None) -> Update:
    """A client's model: two weight/bias layers (a tensor boundary to cut blocks at), near the
    base when there is one."""
    half = params // 2
    shapes = {"l0.weight": half - 10, "l0.bias": 10, "l1.weight": params - half - 10, "l1.bias": 10}
    tensors = {}
    for name, size in shapes.items():
        delta = rng.standard_normal(size).astype(np.float32) * 0.01
        tensors[name] = (base[name] + delta) if base is not None else delta * 100
    return Update(tensors, num_examples=int(rng.integers(10, 100)))


def base_of(params: int) -> dict[str, np.ndarray]:
    return update_of(np.random.default_rng(12345), params, None).tensors


def setup_jobs(store: ObjectStore) -> list[tuple[str, int]]:
    """Write the committed rounds the clients ask about; returns (job, round) pairs."""
    rounds = []
    for j, (job, (clients, params, n_rounds, with_base)) in enumerate(JOBS.items()):
        base = base_of(params) if with_base else None
        if base is not None:
            store.put_initial(job, Update(base, num_examples=0, kind="initial"))
        for r in range(n_rounds):
            rng = np.random.default_rng(1000 * j + r)
            for i in range(clients):
                store.put_update(job, r, f"c{i:02d}", update_of(rng, params, base))
            store.commit_round(job, r)
            rounds.append((job, r))
    return rounds


# ---------------------------------------------------------------------- requests


@dataclass
class Sample:
    start: float
    end: float
    status: int  # 0: no HTTP answer
    key: tuple[str, str, int]
    result: str | None  # json.dumps(result, sort_keys=True) of a 200
    # what a reader needs to diagnose an odd answer: the exception of a status 0, the body of
    # another non-200, the answer's ``meta`` (nodes tried, cache state) of a 200
    note: str | None = None


def call(gateway: str, token: str, key: tuple[str, str, int], timeout: float = 120) -> Sample:
    job, workload, round_ = key
    url = urlsplit(gateway)
    t0 = time.monotonic()
    try:
        conn = http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port, timeout=timeout)
        body = json.dumps({"round": round_, "params": {}})
        conn.request(
            "POST",
            f"/v1/jobs/{job}/workloads/{workload}",
            body=body,
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        )
        resp = conn.getresponse()
        data = resp.read()
        conn.close()
        status = resp.status
        result = None
        if status == 200:
            answer = json.loads(data)
            result = json.dumps(answer["result"], sort_keys=True)
            note = json.dumps(answer.get("meta"), sort_keys=True)
        else:
            note = data[:500].decode("utf-8", "replace")
    except (OSError, http.client.HTTPException, ValueError, KeyError) as exc:
        status, result, note = 0, None, f"{type(exc).__name__}: {exc}"[:500]
    return Sample(t0, time.monotonic(), status, key, result, note)


class Clients:
    """``n`` threads sending random requests of the mix until :meth:`stop`."""

    def __init__(self, n: int, gateway: str, token: str, keys: list[tuple[str, str, int]]):
        self.samples: list[Sample] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._loop, args=(gateway, token, keys, i), daemon=True)
            for i in range(n)
        ]

    def _loop(self, gateway: str, token: str, keys: list[tuple[str, str, int]], i: int) -> None:
        rng = random.Random(i)
        while not self._stop.is_set():
            sample = call(gateway, token, rng.choice(keys))
            with self._lock:
                self.samples.append(sample)

    def __enter__(self) -> Clients:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()


# ---------------------------------------------------------------------- ingestion


@dataclass
class Sent:
    """Updates sent for ingestion: (job, round) -> client -> tensors."""

    rounds: dict[tuple[str, int], dict[str, dict[str, np.ndarray]]] = field(default_factory=dict)

    def add(self, job: str, round_: int, updates: dict[str, Update]) -> None:
        self.rounds[(job, round_)] = {c: u.tensors for c, u in updates.items()}


def write_drop(root: Path, job: str, round_: int, clients: int, params: int, sent: Sent) -> str:
    rng = np.random.default_rng(hash((job, round_)) % 2**32)
    base = base_of(JOBS[job][1]) if JOBS[job][3] and params == JOBS[job][1] else None
    updates = {f"n{i:02d}": update_of(rng, params, base) for i in range(clients)}
    drop = RoundWriter(root, job).write_round(round_, updates, ingest=False)
    sent.add(job, round_, updates)
    return drop.source


class Ingester:
    """Ingests a new round of alpha or beta (alternately) in a loop, through Beam, into moto."""

    def __init__(self, s3: str, root: Path, sent: Sent) -> None:
        self.s3, self.root, self.sent = s3, root, sent
        # each phase ingests new rounds: a round ingested again would count neither as lost
        # nor as duplicated (the phase checks the rounds it sent first)
        self.next_round = {
            job: 1 + max((r for j, r in sent.rounds if j == job and r < KILLED_ROUND),
                         default=FIRST_INGESTED - 1)
            for job in ("alpha", "beta")
        }  # fmt: skip
        self.errors: list[str] = []
        self.ingested = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        from pipelines.ingest import run_ingest

        jobs = ["alpha", "beta"]
        while not self._stop.is_set():
            job = jobs[self.ingested % 2]
            round_ = self.next_round[job]
            self.next_round[job] += 1
            src = write_drop(self.root, job, round_, INGESTED_CLIENTS, JOBS[job][1], self.sent)
            try:
                run_ingest(src, job=job, s3_endpoint=self.s3, bucket=BUCKET, summarize=False)
            except Exception as exc:
                self.errors.append(f"{job}/{round_}: {type(exc).__name__}: {exc}"[:300])
            self.ingested += 1
            self._stop.wait(2.0)

    def __enter__(self) -> Ingester:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def check_updates(store: ObjectStore, sent: Sent, keys: list[tuple[str, int]]) -> dict[str, int]:
    """Every sent update committed exactly once with its tensors: ``lost`` counts sent updates
    missing from the round's manifest or stored with other values, ``duplicated`` the update
    objects stored beyond the sent ones (orphans, twice-written clients)."""
    lost = duplicated = 0
    for job, round_ in keys:
        updates = sent.rounds[(job, round_)]
        try:
            manifest = store.get_manifest(job, round_)
            listed = set(manifest.updates)
        except Exception:
            lost += len(updates)
            continue
        for client, tensors in updates.items():
            if client not in listed:
                lost += 1
                continue
            stored = store.get_update(job, round_, client).tensors
            if set(stored) != set(tensors) or any(
                not np.array_equal(stored[k], v) for k, v in tensors.items()
            ):
                lost += 1
        duplicated += len(listed - set(updates))
        objects = list(store.list_keys(layout.updates_prefix(job, round_)))
        duplicated += max(0, len(objects) - len(updates))
    return {"lost": lost, "duplicated": duplicated}


def killed_ingestion(stack: LocalStack, s3: str, root: Path, sent: Sent) -> dict[str, Any]:
    """Run ``flstore ingest`` on a new round, SIGKILL it once some updates are in S3, run it
    again to completion."""
    job, round_ = "alpha", KILLED_ROUND
    src = write_drop(root, job, round_, KILLED_CLIENTS, KILLED_PARAMS, sent)
    cmd = [str(Path(sys.executable).parent / "flstore"), "ingest", src, "--job", job,
           "--s3-endpoint", s3, "--bucket", BUCKET, "--no-prefetch", "--json"]  # fmt: skip
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "local", "AWS_SECRET_ACCESS_KEY": "local"}
    cwd = tempfile.mkdtemp(prefix="chaos-ingest-")  # no .flstore/local.json here
    store = stack.store
    assert store is not None
    prefix = layout.updates_prefix(job, round_)
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    stored_at_kill = 0
    while proc.poll() is None and time.monotonic() - t0 < 120:
        stored_at_kill = sum(1 for _ in store.list_keys(prefix))
        if stored_at_kill >= 1:
            break
        time.sleep(0.05)
    killed = proc.poll() is None
    if killed:
        os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    committed_before = store.find_manifest(job, round_) is not None
    rerun = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    return {
        "killed": killed,
        "updates_in_s3_at_kill": stored_at_kill,
        "committed_before_rerun": committed_before,
        "rerun_rc": rerun.returncode,
        "rerun_error": rerun.stderr[-500:] if rerun.returncode else "",
        "key": (job, round_),
    }


# ---------------------------------------------------------------------- phases


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def inflict(
    name: str,
    args: Any,
    stack: LocalStack,
    proxy: FaultProxy,
    root: Path,
    s3: str,
    sent: Sent,
    extra: dict[str, Any],
) -> float | None:
    """Phase ``name``'s faults while the clients run; what it did goes into ``extra``. Returns
    when every node was killed at once (total_outage), else None."""
    assert stack.lam is not None and stack.router is not None
    nodes = [stack.node_function(i) for i in range(args.nodes)]
    rng = random.Random(name)
    end = time.monotonic() + args.seconds
    kill_at: float | None = None
    if name == "node_kills":
        kills = 0
        while time.monotonic() < end:
            time.sleep(rng.uniform(args.kill_every * 0.7, args.kill_every * 1.3))
            stack.lam.kill_instances(rng.choice(nodes))
            kills += 1
        extra["kills"] = kills
    elif name == "total_outage":
        time.sleep(args.seconds / 4)
        kill_at = time.monotonic()
        for fn in nodes:
            stack.lam.kill_instances(fn)
    elif name == "s3_faults":
        extra.update(s3_faults(args, stack, proxy, end))
    elif name == "ingest_kill":
        info = killed_ingestion(stack, s3, root, sent)
        extra["ingestion"] = {k: v for k, v in info.items() if k != "key"}
    time.sleep(max(0.0, end - time.monotonic()))
    return kill_at


def s3_faults(args: Any, stack: LocalStack, proxy: FaultProxy, end: float) -> dict[str, Any]:
    """S3 misbehaves (``S3_FAULTS``) while every node is emptied every ``kill_every`` seconds,
    so that requests go back to S3; the requests and faults the proxy saw."""
    assert stack.router is not None
    counts0 = proxy.counts()
    proxy.faults = S3_FAULTS
    evictions = 0
    try:
        while time.monotonic() < end:
            time.sleep(args.kill_every)
            for i in range(args.nodes):
                try:
                    stack.router.node_op(i, EvictOp(all=True))
                    evictions += 1
                except Exception:
                    pass
    finally:
        proxy.faults = Faults()
    counts = proxy.counts()
    return {
        "s3_requests_through_proxy": counts.get("requests", 0) - counts0.get("requests", 0),
        "faults_injected": {
            k: counts.get(k, 0) - counts0.get(k, 0) for k in counts if k != "requests"
        },
        "evictions": evictions,
    }


def recovery_after(
    samples: list[Sample],
    kill_at: float,
    reference: dict[tuple[str, str, int], str],
    extra: dict[str, Any],
) -> float | None:
    """Seconds from the outage to the first answer again (the failures after it, and the time
    until every request was answered again, go into ``extra``)."""
    after = [s for s in samples if s.start >= kill_at and s.status == 200]
    recovery = round(min(s.end for s in after) - kill_at, 3) if after else None
    extra["failed_after_kill"] = sum(1 for s in samples if s.end >= kill_at and s.status != 200)
    # until every request of the mix has been answered again (recovery_s: until any was)
    firsts = {s.key: s.end for s in sorted(after, key=lambda s: -s.end)}  # earliest wins
    extra["recovery_all_s"] = (
        round(max(firsts.values()) - kill_at, 3) if len(firsts) == len(reference) else None
    )
    return recovery


def differing_detail(
    differing: list[Sample], reference: dict[tuple[str, str, int], str]
) -> list[dict[str, Any]]:
    """The first few answers other than the reference, and how they differ."""
    return [
        {
            **difference(reference[s.key], s.result),
            "meta": s.note,
            "got": s.result[:1500],
            "want": reference[s.key][:1500],
            # an answer to another request (a mix-up) rather than other bits of this one
            "matches_reference_of": sorted(
                "/".join(map(str, k)) for k, v in reference.items() if v == s.result
            ),
        }
        for s in differing[:3]
        if s.result is not None
    ]


def run_phase(
    name: str,
    args: Any,
    stack: LocalStack,
    proxy: FaultProxy,
    keys: list[tuple[str, str, int]],
    reference: dict[tuple[str, str, int], str],
    sent: Sent,
    root: Path,
    s3: str,
) -> dict[str, Any]:
    """One phase: the clients and an ingester run for ``args.seconds`` while ``name``'s faults
    are inflicted; then every answer is checked against the reference and every update sent
    against the store."""
    extra: dict[str, Any] = {}
    before = set(sent.rounds)
    ingester = Ingester(s3, root, sent)
    with ingester, Clients(args.clients, stack.gateway_url, stack.token, keys) as clients:
        kill_at = inflict(name, args, stack, proxy, root, s3, sent, extra)
    samples = clients.samples
    statuses = Counter(str(s.status) for s in samples)
    differing = [s for s in samples if s.result is not None and s.result != reference[s.key]]
    new_rounds = sorted(set(sent.rounds) - before)
    checked = check_updates(stack.store, sent, new_rounds)  # type: ignore[arg-type]
    recovery = None if kill_at is None else recovery_after(samples, kill_at, reference, extra)
    latencies = [(s.end - s.start) * 1000 for s in samples]
    run = {
        "name": name,
        "seconds": args.seconds,
        "requests": len(samples),
        "status_counts": dict(statuses),
        "differing": len(differing),
        "differing_requests": sorted({"/".join(map(str, s.key)) for s in differing}),
        "differing_detail": differing_detail(differing, reference),
        # answers the bar refuses: no answer (status 0) or any status but 200, except
        # a 503 during the declared total outage
        "unexpected_statuses": sum(
            1
            for s in samples
            if s.status != 200 and not (name == "total_outage" and s.status == 503)
        ),
        # the first few answers other than 200 (a 503 of the declared outage included)
        "non_200": [
            {
                "request": "/".join(map(str, s.key)),
                "status": s.status,
                "note": s.note,
                "ms": round((s.end - s.start) * 1000, 1),
            }
            for s in samples
            if s.status != 200
        ][:5],
        "lost": checked["lost"],
        "duplicated": checked["duplicated"],
        "rounds_ingested": len(new_rounds),
        "ingest_errors": ingester.errors[:5],
        "p50": percentile(latencies, 50),
        "p99": percentile(latencies, 99),
        "recovery_s": recovery,
        **extra,
    }
    print(json.dumps({k: v for k, v in run.items() if k != "ingest_errors"}), flush=True)
    return run


PHASES = ("baseline", "node_kills", "total_outage", "s3_faults", "ingest_kill")


def difference(want: str, got: str | None) -> dict[str, Any]:
    """Where an answer differs from its reference: the result fields that differ and, for
    numbers, the largest relative difference (what a reader needs to tell a wrong answer from
    a last-bit difference)."""
    a, b = json.loads(want), json.loads(got or "null")
    if not isinstance(a, dict) or not isinstance(b, dict):
        return {"fields": ["<whole>"]}
    fields = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    worst = 0.0
    for k in fields:
        x, y = a.get(k), b.get(k)
        if isinstance(x, dict) and isinstance(y, dict):
            pairs = [(x[c], y[c]) for c in x if c in y]
        else:
            pairs = [(x, y)]
        for u, v in pairs:
            if isinstance(u, int | float) and isinstance(v, int | float) and u != v:
                worst = max(worst, abs(u - v) / max(abs(u), abs(v), 1e-300))
    return {"fields": fields, "max_rel_diff": worst}


def main() -> None:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="short phases (~2 minutes in all)")
    p.add_argument("--seconds", type=float, default=60.0, help="length of each phase")
    p.add_argument("--clients", type=int, default=16, help="concurrent client threads")
    p.add_argument("--nodes", type=int, default=4, help="cache nodes (replication 2)")
    p.add_argument("--memory-mb", type=int, default=1024, help="memory of each cache node")
    p.add_argument("--budget-mb", type=float, default=16.0, help="cache budget of each node")
    p.add_argument("--kill-every", type=float, default=5.0, help="seconds between node kills")
    p.add_argument("--phases", default=",".join(PHASES), help="comma-separated phases to run")
    args = p.parse_args()
    if args.quick:
        args.seconds = min(args.seconds, 15.0)
        args.kill_every = min(args.kill_every, 3.0)
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "local")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "local")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    runs: list[dict[str, Any]] = []
    with (
        LocalS3() as s3,
        FaultProxy(s3.url) as proxy,
        tempfile.TemporaryDirectory(prefix="chaos-") as tmp,
    ):
        direct = ObjectStore(BUCKET, endpoint_url=s3.url)
        direct.ensure_bucket()
        rounds = setup_jobs(direct)
        config = StackConfig(
            nodes=args.nodes,
            replication=2,
            memory_mb=args.memory_mb,
            budget_bytes=int(args.budget_mb * MiB),
            bucket=BUCKET,
            s3_endpoint=proxy.url,
        )
        with LocalStack(config) as stack:
            assert stack.router is not None
            blocks = {}
            for job, r in rounds:
                manifest = direct.get_manifest(job, r)
                plan = plan_round(
                    job,
                    r,
                    manifest.tensors,
                    len(manifest.updates),
                    nodes=args.nodes,
                    replication=2,
                    budget=config.node_budget,
                )  # the router's layout for this round
                blocks[f"{job}/{r}"] = len(plan.blocks)
            keys = [(job, w, r) for job, r in rounds for w in WORKLOADS]
            t0 = time.monotonic()
            reference = {}
            for key in keys:
                sample = call(stack.gateway_url, stack.token, key, timeout=300)
                if sample.result is None:
                    raise SystemExit(f"reference request {key} answered {sample.status}")
                reference[key] = sample.result
            print(f"references in {time.monotonic() - t0:.1f} s; blocks per round {blocks}")
            sent = Sent()
            for name in args.phases.split(","):
                runs.append(
                    run_phase(name, args, stack, proxy, keys, reference, sent, Path(tmp), s3.url)
                )
        direct.close()
    for run in runs:
        run["blocks_per_round"] = blocks
    write_report("chaos", runs, args.json)


if __name__ == "__main__":
    main()
