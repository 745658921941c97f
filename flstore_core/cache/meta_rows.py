"""The rows of the ``meta`` shard: per round, every client's ``num_examples``, metrics and
summaries, held as columns.

A job of 2,000 rounds × 100 clients has 200,000 client rows. Held as a :class:`ClientRound`
object each (two dicts of boxed floats) plus the parsed manifests they came from, they took
~1.65 KB a row — 331 MB of a 512 MB node, which then ran out of memory answering
``reputation`` (``benchmarks/long_jobs.py``). A :class:`RoundRows` keeps a round as one float64
array per metric and per summary (NaN where a client has none: stored values are finite), an
int64 array of ``num_examples`` and the round's client ids, one tuple shared by every round with
the same clients; ~50 bytes a row. It is a ``Mapping[str, ClientRound]``: a row is built when
asked for, equal to the row read from the manifest (the same Python floats).
"""

from __future__ import annotations

import sys
import threading
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from flstore_core.data.manifest import RoundManifest

# what one round's columns cost beyond their arrays: the object, its dicts of columns, the
# round's totals (a few dicts of floats)
ROUND_OVERHEAD = 1024
# a client id held once per distinct set of clients: the string, its tuple slot and its index
CLIENT_ID_BYTES = 160


@dataclass(frozen=True)
class RoundTotals:
    """Sums over every participant of one round, per source (``num_examples`` and each
    summary): what a client-class workload needs about the round's other clients.

    ``positive[s] = Σ_j max(v_{j,s}, 0)`` over the participants ``j`` that have ``s``, and
    ``present[s]`` how many have it (a backfill may have summarised some clients only).
    """

    participants: int
    positive: dict[str, float]
    present: dict[str, int]

    def everyone_has(self, source: str) -> bool:
        return self.present.get(source, 0) == self.participants

    @classmethod
    def of(cls, manifest: RoundManifest) -> RoundTotals:
        """The manifest's totals, computed once per manifest object (every client row of the
        round shares them: loading n clients costs one pass over the round, not n)."""
        with _TOTALS_LOCK:
            held = _TOTALS.get(id(manifest))
            if held is not None and held[0] is manifest:
                _TOTALS.move_to_end(id(manifest))
                return held[1]
        totals = cls.compute(manifest)
        with _TOTALS_LOCK:
            # the manifest is held with its totals, so its id cannot be reused while cached
            _TOTALS[id(manifest)] = (manifest, totals)
            while len(_TOTALS) > _TOTALS_KEPT:
                _TOTALS.popitem(last=False)
        return totals

    @classmethod
    def compute(cls, manifest: RoundManifest) -> RoundTotals:
        """The manifest's totals, not remembered (the meta shard computes each once, and a
        remembered manifest stays in memory: 4,096 of them were most of a 512 MB node)."""
        positive: dict[str, float] = {"num_examples": 0.0}
        present: dict[str, int] = {"num_examples": len(manifest.updates)}
        for c in sorted(manifest.updates):  # sorted: the float sums do not depend on order
            e = manifest.updates[c]
            positive["num_examples"] += max(float(e.num_examples), 0.0)
            for source, value in e.summary.items():
                positive[source] = positive.get(source, 0.0) + max(float(value), 0.0)
                present[source] = present.get(source, 0) + 1
        return cls(len(manifest.updates), positive, present)


_TOTALS: OrderedDict[int, tuple[RoundManifest, RoundTotals]] = OrderedDict()
_TOTALS_LOCK = threading.Lock()
_TOTALS_KEPT = 4096  # manifests whose totals are remembered (least recently used dropped)


@dataclass(frozen=True)
class ClientRound:
    """One client's row of one round: what it reported and what ingestion summarised, and the
    round's totals over all its participants (``None`` for rows not read from a manifest)."""

    round: int
    num_examples: int
    metrics: dict[str, Any]
    summary: dict[str, float]
    totals: RoundTotals | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "round": self.round,
            "num_examples": self.num_examples,
            "metrics": self.metrics,
            "summary": self.summary,
        }


F64 = npt.NDArray[np.float64]


class ClientIds:
    """Client-id tuples shared across the rounds of one load: rounds with the same clients
    hold one tuple and one index (``shared``), and every id is interned."""

    def __init__(self) -> None:
        self._held: dict[tuple[str, ...], tuple[tuple[str, ...], dict[str, int]]] = {}

    def shared(self, clients: list[str]) -> tuple[tuple[str, ...], dict[str, int]]:
        """The held tuple equal to ``clients`` and its index (held now if new)."""
        key = tuple(clients)
        held = self._held.get(key)
        if held is None:
            ids = tuple(sys.intern(c) for c in clients)
            held = self._held[ids] = (ids, {c: i for i, c in enumerate(ids)})
        return held

    @property
    def nbytes(self) -> int:
        return sum(CLIENT_ID_BYTES * len(k) for k in self._held)

    def __len__(self) -> int:
        return len(self._held)


class RoundRows(Mapping[str, ClientRound]):
    """One round's client rows as columns (see the module's docstring)."""

    __slots__ = (
        "_extra",
        "_index",
        "clients",
        "metrics",
        "num_examples",
        "round",
        "summary",
        "totals",
    )

    def __init__(
        self,
        round_: int,
        clients: tuple[str, ...],
        index: dict[str, int],
        num_examples: npt.NDArray[np.int64],
        metrics: dict[str, F64],
        summary: dict[str, F64],
        extra: dict[str, tuple[dict[str, Any], dict[str, Any]]],
        totals: RoundTotals,
    ) -> None:
        self.round = round_
        self.clients = clients
        self._index = index
        self.num_examples = num_examples
        self.metrics = metrics
        self.summary = summary
        self._extra = extra  # values that are not floats (lists, integers), per client
        self.totals = totals

    def __getitem__(self, client: str) -> ClientRound:
        picked = self.pick([client]) if client in self._index else []
        if not picked:
            raise KeyError(client)
        return picked[0][1]

    def pick(self, clients: Sequence[str]) -> list[tuple[str, ClientRound]]:
        """The rows of those of ``clients`` in this round, in the order given: each column read
        once for them all (a row at a time reads a numpy scalar per value, ~4× slower)."""
        idx = [self._index[c] for c in clients if c in self._index]
        if not idx:
            return []
        examples = self.num_examples[idx].tolist()
        metrics = [(m, col[idx].tolist()) for m, col in self.metrics.items()]
        summary = [(s, col[idx].tolist()) for s, col in self.summary.items()]
        out = []
        for j, i in enumerate(idx):
            client = self.clients[i]
            # NaN (v != v) marks a value the client does not have
            row_metrics = {m: v[j] for m, v in metrics if v[j] == v[j]}
            row_summary = {s: v[j] for s, v in summary if v[j] == v[j]}
            extra = self._extra.get(client)
            if extra is not None:
                row_metrics.update(extra[0])
                row_summary.update(extra[1])
            row = ClientRound(self.round, examples[j], row_metrics, row_summary, self.totals)
            out.append((client, row))
        return out

    @property
    def extra(self) -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
        """The values that are not floats (lists, integers): ``client -> (metrics, summary)``."""
        return self._extra

    def __contains__(self, client: object) -> bool:
        return client in self._index

    def __iter__(self) -> Iterator[str]:
        return iter(self.clients)

    def __len__(self) -> int:
        return len(self.clients)

    @property
    def nbytes(self) -> int:
        """The round's own bytes (its client ids are counted once per load: ClientIds)."""
        arrays = self.num_examples.nbytes + sum(
            c.nbytes for c in (*self.metrics.values(), *self.summary.values())
        )
        return ROUND_OVERHEAD + arrays + 512 * len(self._extra)


def _columns(values: list[dict[str, Any]], extra: list[dict[str, Any]]) -> dict[str, F64]:
    """Float columns of per-client dicts (NaN where a client has none); a value that is not a
    float goes to that client's ``extra`` dict instead."""
    names: dict[str, None] = {}
    for row in values:
        names.update(dict.fromkeys(row))
    out: dict[str, F64] = {}
    for name in names:
        col = np.full(len(values), np.nan)
        for i, row in enumerate(values):
            v = row.get(name)
            if type(v) is float:
                col[i] = v
            elif v is not None:
                extra[i][name] = v
        out[name] = col
    return out


def round_rows(manifest: RoundManifest, ids: ClientIds) -> RoundRows:
    """A round's rows from its manifest (the manifest itself is not kept)."""
    clients, index = ids.shared(sorted(manifest.updates))
    entries = [manifest.updates[c] for c in clients]
    metric_extra: list[dict[str, Any]] = [{} for _ in clients]
    summary_extra: list[dict[str, Any]] = [{} for _ in clients]
    metrics = _columns([e.metrics for e in entries], metric_extra)
    summary = _columns([e.summary for e in entries], summary_extra)
    extra = {
        c: (metric_extra[i], summary_extra[i])
        for i, c in enumerate(clients)
        if metric_extra[i] or summary_extra[i]
    }
    num_examples = np.array([e.num_examples for e in entries], dtype=np.int64)
    totals = RoundTotals.compute(manifest)
    return RoundRows(manifest.round, clients, index, num_examples, metrics, summary, extra, totals)
