"""Ingestion throughput: the Beam pipeline next to a plain boto3 loop, interleaved in one run.

Input: ``--updates`` (default 100) ResNet-18-sized raw update files (~47 MB each, 4.7 GB in all),
``--clients`` per round, on local disk (generated once into ``--workdir`` and reused).

Systems (metric ``throughput_mb_s`` of *raw* update bytes per second of wall time):

* ``beam-ingest`` — :func:`pipelines.ingest.run_ingest` on ``FnApiRunner`` (its defaults: one
  worker thread per core): header validation, round agreement, NaN/Inf check, encode (sha256 +
  zstd), PUT, the two summary passes, the commits and the dead-letter step;
* ``boto3-loop`` — the floor of any ingestion: one boto3 client PUTting the *same* zstd-compressed
  bytes the pipeline stores (pre-encoded once, read from local files), one after another;
* ``boto3-loop-compress`` (reference) — the loop a user would write without FLStore: read each
  raw file, ``zstd -1`` it, PUT it.

The S3 endpoint is a moto server in its own process, so its CPU does not share the benchmark's
interpreter. Every measurement writes into a fresh bucket, emptied afterwards. Beside the wall
time each run reports CPU seconds (p50): ``cpu_s`` of this process, ``moto_cpu_s`` of the
server. The pipeline's store workers set the process's allocator to keep freed memory
(:mod:`pipelines.memory_reuse`); the setting is process-wide, so from the warm-up on the loops
run with it too (it spares them page faults as well: the comparison does not favour the
pipeline).
"""

from __future__ import annotations

import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import zstandard

from benchmarks.codec import resnet18_sized_update
from benchmarks.report import interleave, parser, summarize, write_report
from flstore_core.aws import s3_client
from flstore_core.data import layout
from flstore_core.data.codec import encode_update
from flstore_core.data.rawfile import read_raw_update, write_raw_update
from pipelines.ingest import run_ingest

JOB = "bench"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class MotoProcess:
    """A moto S3 server in a child process (``ThreadedMotoServer``)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        code = (
            "import logging, time\n"
            "from moto.server import ThreadedMotoServer\n"
            "logging.getLogger('werkzeug').setLevel(logging.ERROR)\n"
            f"ThreadedMotoServer(ip_address='127.0.0.1', port={self.port}, verbose=False).start()\n"
            "while True: time.sleep(3600)\n"
        )
        self.proc = subprocess.Popen([sys.executable, "-c", code])
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError("moto server did not start")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)

    def cpu_s(self) -> float:
        """CPU seconds the server has used so far (Linux ``/proc``; 0 elsewhere)."""
        try:
            with open(f"/proc/{self.proc.pid}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def own_cpu_s() -> float:
    """CPU seconds this process has used so far (every thread)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def prepare(workdir: Path, n: int, clients: int) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Raw files (and their pre-encoded objects with canonical keys); reused when present, and
    any other raw file in the folder removed."""
    raw_dir, enc_dir = workdir / "raw", workdir / "encoded"
    raw_dir.mkdir(parents=True, exist_ok=True)
    enc_dir.mkdir(parents=True, exist_ok=True)
    raw_files, encoded = [], []
    for i in range(n):
        r, c = divmod(i, clients)
        client = f"client-{c:03d}"
        raw = raw_dir / f"{r:04d}" / f"{client}.safetensors"
        enc = enc_dir / f"{r:04d}-{client}.zst"
        if not raw.exists() or not enc.exists():
            raw.parent.mkdir(parents=True, exist_ok=True)
            update = resnet18_sized_update(seed=i)
            update.job, update.round, update.client = JOB, r, client
            update.metrics = {"loss": 0.7 + 0.01 * i}
            write_raw_update(update, str(raw))
            enc.write_bytes(encode_update(read_raw_update(str(raw))).data)
            print(f"  prepared {i + 1}/{n}", end="\r", flush=True)
        raw_files.append(raw)
        encoded.append((enc, layout.update_key(JOB, r, client)))
    # the pipeline reads the whole folder: files of an earlier, larger run would be ingested too
    for stale in set(raw_dir.rglob("*.safetensors")) - set(raw_files):
        stale.unlink()
    print()
    return raw_files, encoded


def s3(url: str) -> Any:
    return s3_client(url, max_pool=32)


def empty(client: Any, bucket: str) -> None:
    """Delete everything in ``bucket`` and the bucket (frees moto's memory and disk)."""
    paginator = client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket):
        keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
        if keys:
            client.delete_objects(Bucket=bucket, Delete={"Objects": keys})
    client.delete_bucket(Bucket=bucket)


class Systems:
    """The three ways of writing the prepared updates to S3, each into a fresh bucket that it
    empties afterwards; each returns its seconds."""

    def __init__(
        self,
        moto: MotoProcess,
        workdir: Path,
        raw_files: list[Path],
        encoded: list[tuple[Path, str]],
        beam_args: list[str],
    ) -> None:
        self.moto, self.workdir, self.beam_args = moto, workdir, beam_args
        self.raw_files, self.encoded = raw_files, encoded
        self.client = s3(moto.url)
        self.counter = iter(range(10**6))
        self.cctx = zstandard.ZstdCompressor(level=1, write_content_size=True)
        self.cpu: dict[str, list[tuple[float, float]]] = {}

    def measured(self, name: str, fn: Any) -> Any:
        """``fn`` (returning its seconds), also noting the CPU it and the server used."""

        def run() -> float:
            own, server = own_cpu_s(), self.moto.cpu_s()
            seconds: float = fn()
            self.cpu.setdefault(name, []).append((own_cpu_s() - own, self.moto.cpu_s() - server))
            return seconds

        return run

    def fresh_bucket(self, system: str) -> str:
        name = f"{system}-{next(self.counter)}"
        self.client.create_bucket(Bucket=name)
        return name

    def beam_ingest(self) -> float:
        """The Beam ingestion pipeline over the raw files."""
        bucket = self.fresh_bucket("beam")
        t0 = time.perf_counter()
        summary = run_ingest(
            str(self.workdir / "raw"),
            job=JOB,
            s3_endpoint=self.moto.url,
            bucket=bucket,
            beam_args=self.beam_args,
        )
        seconds = time.perf_counter() - t0
        assert summary.updates == len(self.raw_files) and not summary.deadletters, summary
        empty(self.client, bucket)
        return seconds

    def boto3_loop(self) -> float:
        """One PUT after another of the already encoded objects."""
        bucket = self.fresh_bucket("loop")
        t0 = time.perf_counter()
        for path, key in self.encoded:
            self.client.put_object(Bucket=bucket, Key=key, Body=path.read_bytes())
        seconds = time.perf_counter() - t0
        empty(self.client, bucket)
        return seconds

    def boto3_loop_compress(self) -> float:
        """One PUT after another of the raw files, each compressed first."""
        bucket = self.fresh_bucket("loopz")
        t0 = time.perf_counter()
        for path, (_, key) in zip(self.raw_files, self.encoded, strict=True):
            body = self.cctx.compress(path.read_bytes())
            self.client.put_object(Bucket=bucket, Key=key, Body=body)
        seconds = time.perf_counter() - t0
        empty(self.client, bucket)
        return seconds


def main() -> None:
    p = parser(__doc__ or "")
    p.add_argument("--updates", type=int, default=100, help="raw update files (ResNet-18 size)")
    p.add_argument("--clients", type=int, default=10, help="clients per round")
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "flstore-bench-ingest"))
    p.add_argument("--beam-arg", action="append", default=[], help="extra Beam option")
    p.set_defaults(repetitions=3)
    args = p.parse_args()

    workdir = Path(args.workdir)
    print(f"preparing {args.updates} raw updates in {workdir} …")
    raw_files, encoded = prepare(workdir, args.updates, args.clients)
    mb = sum(f.stat().st_size for f in raw_files) / 1e6
    stored_mb = sum(f.stat().st_size for f, _ in encoded) / 1e6
    # the host's load beside the figures: on the shared 2-core host the ratio falls with it (the
    # pipeline spends several times the loop's CPU in this process; moto the same for both)
    load_before = os.getloadavg()[0]
    moto = MotoProcess()
    systems = Systems(moto, workdir, raw_files, encoded, args.beam_arg)
    try:
        samples = interleave(
            {
                name: systems.measured(name, fn)
                for name, fn in (
                    ("beam-ingest", systems.beam_ingest),
                    ("boto3-loop", systems.boto3_loop),
                    ("boto3-loop-compress", systems.boto3_loop_compress),
                )
            },
            args.repetitions,
            warmup=1,
        )
    finally:
        moto.stop()
    load_after = os.getloadavg()[0]
    runs = []
    for system, secs in samples.items():
        cpu = systems.cpu[system][-len(secs) :]  # the timed repetitions, not the warm-up
        runs.append(
            {
                "system": system,
                "metric": "throughput_mb_s",
                **summarize([mb / s for s in secs]),
                "updates": len(raw_files),
                "clients": args.clients,
                "rounds": -(-len(raw_files) // args.clients),
                "raw_mb": round(mb, 1),
                "stored_mb": round(stored_mb, 1),
                "cpu_s": round(statistics.median(c for c, _ in cpu), 2),
                "moto_cpu_s": round(statistics.median(m for _, m in cpu), 2),
                "params": {
                    "runner": "FnApiRunner",
                    "s3": "moto (own process)",
                    "load_avg_1m": [round(load_before, 2), round(load_after, 2)],
                },
            }
        )
    write_report("ingest", runs, args.json)
    by = {r["system"]: r["p50"] for r in runs}
    for r in runs:
        print(
            f"{r['system']:>20}: p50 {r['p50']:7.1f} MB/s  p95 {r['p95']:7.1f} MB/s  n={r['n']}"
            f"  cpu {r['cpu_s']:5.2f} s  moto cpu {r['moto_cpu_s']:5.2f} s"
        )
    for base in ("boto3-loop", "boto3-loop-compress"):
        print(f"beam-ingest / {base:<19} = {by['beam-ingest'] / by[base]:.2f}x")


if __name__ == "__main__":
    main()
