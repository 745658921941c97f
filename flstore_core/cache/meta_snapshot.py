"""A job's meta rows kept in S3 as one object, so a node that starts cold reads one object, not
every round manifest.

Reading the manifests of a 2,000-round job of 100 clients took a node 25–33 s on a loaded
2-core host (~10 ms to read and check each 44 KB manifest), past the 26 s a request may take:
a ``reputation`` on a node that had just started could not answer. The node that loads the meta
shard therefore writes its rows, with the manifest version each round was read at, to
``jobs/{job}/meta/rows.zst`` (:func:`flstore_core.data.layout.meta_rows_key`) once
:data:`SNAPSHOT_EVERY` rounds were read from manifests since the last snapshot; a cold load
starts from it and reads only the rounds that are new or whose manifest was rewritten since
(:func:`~flstore_core.cache.shards.load_meta`'s ``known``), so it answers exactly what the
manifests say. The snapshot is derived data: one that is missing, unreadable or inconsistent is
ignored (the manifests are read), and writing one is best effort.

Format: zstd of an 8-byte little-endian header length, a JSON header (``format``, ``job``,
``rows``, the ``columns`` in order with their dtypes, the distinct client-id ``sets``, per round
``[round, version, set, start]``, its ``totals`` and the non-float values of ``extra``), then
each column's ``rows`` values (int64 ``num_examples``, float64 metrics and summaries, NaN where a
client has none). No pickle: arrays are read with ``numpy.frombuffer``.
"""

from __future__ import annotations

import json
import logging
import struct
from typing import Any

import numpy as np
import zstandard

from flstore_core.cache.meta_rows import ClientIds, RoundRows, RoundTotals
from flstore_core.cache.shards import JobMeta, ManifestReader, load_meta
from flstore_core.data import layout
from flstore_core.data.manifest import JobSpec
from flstore_core.ids import validate_client, validate_round
from flstore_core.storage.object_store import ObjectStore

log = logging.getLogger(__name__)

FORMAT = "flstore-meta-rows/1"
# rounds read from manifests since the last snapshot that make a load write a new one
SNAPSHOT_EVERY = 100
MAX_SNAPSHOT_BYTES = 1 << 30  # decompressed: 20M rows of five values


def encode(meta: JobMeta) -> bytes:
    """The snapshot of ``meta``'s column-held rounds (a round held otherwise is left out)."""
    rounds = [(r, rows) for r, rows in sorted(meta.rounds.items()) if isinstance(rows, RoundRows)]
    metric_names = list(dict.fromkeys(m for _, rows in rounds for m in rows.metrics))
    summary_names = list(dict.fromkeys(s for _, rows in rounds for s in rows.summary))
    sets: dict[int, int] = {}
    ids: list[list[str]] = []
    table: list[list[Any]] = []
    totals: list[list[Any]] = []
    extra: list[list[Any]] = []
    start = 0
    for r, rows in rounds:
        if id(rows.clients) not in sets:
            sets[id(rows.clients)] = len(ids)
            ids.append(list(rows.clients))
        table.append([r, meta.versions.get(r, ""), sets[id(rows.clients)], start])
        t = rows.totals
        totals.append([t.participants, t.positive, t.present])
        extra.extend([r, c, e[0], e[1]] for c, e in rows.extra.items())
        start += len(rows)

    def column(get: Any) -> bytes:
        parts = [get(rows) for _, rows in rounds]
        return np.concatenate(parts).astype("<f8").tobytes() if parts else b""

    def nan(n: int) -> np.ndarray:
        return np.full(n, np.nan)

    examples = [rows.num_examples for _, rows in rounds] or [np.zeros(0, dtype=np.int64)]
    data = [np.concatenate(examples).astype("<i8").tobytes()]
    data += [column(lambda rows, m=m: rows.metrics.get(m, nan(len(rows)))) for m in metric_names]
    data += [column(lambda rows, s=s: rows.summary.get(s, nan(len(rows)))) for s in summary_names]
    header = {
        "format": FORMAT,
        "job": meta.spec.job,
        "rows": start,
        "columns": ["num_examples"]
        + [f"metric:{m}" for m in metric_names]
        + [f"summary:{s}" for s in summary_names],
        "sets": ids,
        "rounds": table,
        "totals": totals,
        "extra": extra,
    }
    head = json.dumps(header, separators=(",", ":")).encode()
    raw = struct.pack("<Q", len(head)) + head + b"".join(data)
    return zstandard.ZstdCompressor(level=3).compress(raw)


def decode(job: str, blob: bytes) -> JobMeta:
    """The rounds of a snapshot of ``job`` as a :class:`JobMeta` to start a load from (its
    spec a placeholder: :func:`load_meta` reads the job's own); ``ValueError`` when it is not
    one."""
    raw = zstandard.ZstdDecompressor().decompress(blob, max_output_size=MAX_SNAPSHOT_BYTES)
    (size,) = struct.unpack_from("<Q", raw)
    header = json.loads(raw[8 : 8 + size])
    if header.get("format") != FORMAT or header.get("job") != job:
        raise ValueError("not a meta-rows snapshot of this job")
    n = int(header["rows"])
    columns: list[str] = header["columns"]
    if len(raw) != 8 + size + 8 * n * len(columns) or columns[0] != "num_examples":
        raise ValueError("the snapshot's columns do not add up")
    arrays = [
        np.frombuffer(raw, "<i8" if i == 0 else "<f8", n, 8 + size + 8 * n * i)
        for i in range(len(columns))
    ]
    if n and (int(arrays[0].min()) < 0 or any(np.isinf(a).any() for a in arrays[1:])):
        raise ValueError("the snapshot holds values no manifest can")
    ids = ClientIds()
    sets = [ids.shared([validate_client(c) for c in s]) for s in header["sets"]]
    extra: dict[tuple[int, str], tuple[dict[str, Any], dict[str, Any]]] = {
        (int(r), str(c)): (dict(m), dict(s)) for r, c, m, s in header["extra"]
    }
    meta = JobMeta(JobSpec(job), ids=ids)
    for (r, version, k, start), (participants, positive, present) in zip(
        header["rounds"], header["totals"], strict=True
    ):
        clients, index = sets[int(k)]
        end = int(start) + len(clients)
        if not 0 <= int(start) <= end <= n:
            raise ValueError("a round's rows lie outside the snapshot")

        def cut(i: int, lo: int = int(start), hi: int = end) -> np.ndarray:
            return arrays[i][lo:hi]

        metrics = {c[7:]: cut(i) for i, c in enumerate(columns) if c.startswith("metric:")}
        summary = {c[8:]: cut(i) for i, c in enumerate(columns) if c.startswith("summary:")}
        round_extra = {c: extra[(int(r), c)] for c in clients if (int(r), c) in extra}
        totals = RoundTotals(int(participants), dict(positive), dict(present))
        meta.rounds[validate_round(r)] = RoundRows(
            int(r), clients, index, cut(0), metrics, summary, round_extra, totals
        )
        meta.versions[int(r)] = str(version)
    return meta


def read_snapshot(store: ObjectStore, job: str) -> JobMeta | None:
    """The job's stored snapshot, or ``None`` (none, or one that cannot be used)."""
    key = layout.meta_rows_key(job)
    if store.stat(key) is None:
        return None
    try:
        return decode(job, store.get_object(key))
    except Exception as exc:  # derived data: the manifests are read instead
        log.warning("meta snapshot %s not used: %s", key, exc)
        return None


def load_meta_snapshotted(
    reader: ManifestReader, job: str, known: JobMeta | None = None, spec_version: str = ""
) -> JobMeta:
    """:func:`load_meta`, starting from the stored snapshot when nothing is ``known``, and
    writing a new snapshot once :data:`SNAPSHOT_EVERY` rounds were read from manifests since
    the last one."""
    start = known if known is not None else read_snapshot(reader.store, job)
    meta = load_meta(reader, job, known=start, spec_version=spec_version)
    if meta.unsnapshotted >= SNAPSHOT_EVERY:
        try:
            reader.store.put_object(layout.meta_rows_key(job), encode(meta))
            meta.unsnapshotted = 0
        except Exception as exc:  # best effort: the next load tries again
            log.warning("meta snapshot of %s not written: %s", job, exc)
    return meta
