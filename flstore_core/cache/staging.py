"""Updates held before their round's commit: a cache node's eager warming.

Loading a committed ResNet-18 × 10 round costs its owners ~7.8 s each (10 × 47 MB read and
decoded) after the manifest lands, on a 2-core host. The updates land one by one during the
round, so a round's owners may read each as it lands (the ``stage`` op,
:class:`~flstore_core.protocol.StageOp`, sent by the router on the update's S3 event,
:mod:`flstore_core.routing.update_staging`) and the commit's ``load`` then reads only what was
not staged.

* **What is held.** Per ``(job, round)`` a :class:`PendingRound`: the tensors the rows were
  decoded in (those of the job's last committed round, which the router names), the round's
  base model (the global model after the round before, written before any of this round's
  updates: read once, at the round's first staging, with its ETag) and per client the decoded
  float32 row, the SHA-256 of its uncompressed bytes and its squared norm — exactly what
  :meth:`~flstore_core.storage.round_reader.RoundReader.read_round` would decode from the same
  object, by the same function. With a base the row is held as its delta ``w - base``, the
  float32 subtraction the commit's :class:`~flstore_core.cache.round_data.RoundData` makes, so
  the commit neither reads the base again nor subtracts it from the staged rows.
* **Budget.** A staged row is counted against the node's cache budget
  (:meth:`~flstore_core.cache.shard_cache.ShardCache.reserve`, evicting as a new shard would);
  a row that does not fit drops the round's pending state, and the commit loads it as before.
  At most :data:`ROUNDS_PER_JOB` rounds of a job are pending (a newer round's first update
  drops the oldest: its commit is done or will not come) and none longer than
  :data:`PENDING_TTL_S`.
* **At the commit** (:meth:`StagedRounds.take`) a staged row is used only when its digest is the
  one the manifest names for that client and the manifest's tensors are the ones it was decoded
  in — the manifest decides, never the staged object; a client staged but not committed is
  dropped, and a client never staged (a lost event, a failed staging) is read from S3. The
  staged base is used only when the base object's ETag is still the one read (a HEAD at the
  commit, :func:`~flstore_core.cache.round_loading.load_round`); else every row is read again.
  A round loaded in column blocks (its layout is not the one staged) drops the pending state.
* **Never an error for the round.** A staging that fails (the object gone, corrupt, of other
  tensors) is counted and answered, and costs only speed: the commit reads that client.

The Gram and the shared artifacts are computed at the commit on the assembled rows, as for a
round loaded from S3 (70 ms for 10 × 11.7M float32 on one BLAS thread): :func:`~flstore_core.
cache.gram.block_sums` centres each column block on a row chosen from every client's raw Gram,
so a Gram grown one client at a time would not be the same bits, and answers must be.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from flstore_core.cache.shard_cache import ShardCache
from flstore_core.data import layout
from flstore_core.data.codec import TensorSpec
from flstore_core.data.manifest import RoundManifest
from flstore_core.data.rows import base_vector
from flstore_core.errors import FLStoreError
from flstore_core.protocol import StageOp
from flstore_core.storage.object_store import ObjectStore
from flstore_core.storage.round_reader import HeldRow
from flstore_core.storage.stored_models import base_key

#: rounds of one job a node holds pending at once (the round being written and the one before,
#: whose commit may still be on its way)
ROUNDS_PER_JOB = 2
#: seconds a pending round is kept without its commit
PENDING_TTL_S = 900.0

ManifestOf = Callable[[str, int], RoundManifest]  # (job, committed round) -> its manifest


@dataclass
class StagedRow:
    """One client's update, decoded before the commit."""

    row: npt.NDArray[np.float32]
    sha256: str
    sq_norm: float
    etag: str


@dataclass
class PendingRound:
    """The staged rows of one round not yet committed (or not yet loaded here); with a
    ``base`` (its object's ETag ``base_etag``) the rows are deltas from it. A client of
    ``order`` (the clients of the round the tensors come from) is decoded into its row of
    ``matrix``, laid out as a commit of the same clients reads the round: that commit takes
    the matrix itself, its staged rows neither copied nor their pages touched again."""

    specs: tuple[TensorSpec, ...]
    base: npt.NDArray[np.float32] | None = None
    base_etag: str = ""
    rows: dict[str, StagedRow] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)
    order: list[str] = field(default_factory=list)
    matrix: npt.NDArray[np.float32] | None = None

    def slot(self, client: str) -> npt.NDArray[np.float32] | None:
        """The row of :attr:`matrix` ``client`` is decoded into (the matrix allocated at the
        first: its pages are touched as rows are written), ``None`` for a client not in
        :attr:`order`."""
        if client not in self.order:
            return None
        if self.matrix is None:
            width = sum(s.numel for s in self.specs)
            self.matrix = np.empty((len(self.order), width), dtype=np.float32)
        row: npt.NDArray[np.float32] = self.matrix[self.order.index(client)]
        return row

    @property
    def nbytes(self) -> int:
        base = 0 if self.base is None else int(self.base.nbytes)
        return base + sum(int(r.row.nbytes) for r in self.rows.values())


@dataclass
class StagedTake:
    """What a commit takes of a pending round: the rows its manifest names (deltas from
    ``base`` when it is given), the base's ETag when it was read, and the matrix they were
    decoded in when it is laid out as the manifest's clients (the round's matrix, to fill)."""

    rows: dict[str, HeldRow]
    base: npt.NDArray[np.float32] | None = None
    base_etag: str = ""
    matrix: npt.NDArray[np.float32] | None = None


@dataclass
class StagingStats:
    """What staging did on a node (``flstore stats``: rows staged and used at commit)."""

    staged: int = 0  # rows read and held
    duplicates: int = 0  # a staging of a row held at the same ETag: nothing read
    failed: int = 0  # stagings that could not read or decode their update
    refused: int = 0  # rows that did not fit the budget (the round's pending state dropped)
    late: int = 0  # stagings of a round already held: nothing read
    used: int = 0  # staged rows a commit took
    discarded: int = 0  # staged rows a commit did not name (or named with another digest)
    dropped_rounds: int = 0  # pending rounds dropped (budget, TTL, newer rounds, a layout)

    def to_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


class StagedRounds:
    """A node's pending rounds: :meth:`stage` an update, :meth:`take` them at the commit.

    Parameters
    ----------
    store : ObjectStore
        Where the updates are read.
    cache : ShardCache
        The node's cache, whose budget the staged rows are counted against.
    manifest_of : callable
        ``manifest_of(job, round)``: a committed round's manifest (the node's manifests): the
        tensors the rows are decoded in, and the clients whose order the matrix is laid out in.
    """

    def __init__(self, store: ObjectStore, cache: ShardCache, manifest_of: ManifestOf) -> None:
        self.store = store
        self.cache = cache
        self.manifest_of = manifest_of
        self.stats = StagingStats()
        self._pending: dict[tuple[str, int], PendingRound] = {}
        self._lock = threading.Lock()

    def stage(self, op: StageOp, held: bool) -> dict[str, Any]:
        """Read and hold ``op``'s update (``held``: its round is loaded here already, so there
        is nothing to stage); the answer says what was done, never raises for the update."""
        name = f"{op.job}/{op.round}/{op.client}"
        if held:
            self.stats.late += 1
            return {"late": name}
        self._expire(op.job, op.round)
        before = self.manifest_of(op.job, op.tensors_round)  # a 404 when it is not committed
        specs = before.tensors
        with self._lock:
            pending = self._pending.get((op.job, op.round))
            if pending is not None and pending.specs != specs:
                self._drop_locked((op.job, op.round))  # another layout named: start again
                pending = None
            known = None if pending is None else pending.rows.get(op.client)
            if known is not None and op.etag and known.etag == op.etag:
                self.stats.duplicates += 1
                return {"duplicate": name}
        fresh = PendingRound(specs, order=list(before.clients)) if pending is None else None
        if fresh is not None:
            fresh.base, fresh.base_etag = self._base(op.job, op.round, specs)
        row_bytes = 4 * sum(s.numel for s in specs)
        reserved = row_bytes + (0 if fresh is None else fresh.nbytes)
        if not self.cache.reserve(reserved):
            self.stats.refused += 1
            self.drop(op.job, op.round)
            return {"refused": name, "reason": "over the node's budget"}
        with self._lock:
            pending = self._pending.setdefault((op.job, op.round), fresh or PendingRound(specs))
        if pending is not fresh and fresh is not None:  # started meanwhile: its base is kept
            self.cache.release(fresh.nbytes)
        key = layout.update_key(op.job, op.round, op.client)
        try:
            row, decoded = self.store.read_update_row(
                key, specs, f"client {op.client!r}", pending.slot(op.client)
            )
        except FLStoreError as exc:
            self.cache.release(row_bytes)
            self.stats.failed += 1
            if pending.slot(op.client) is not None:  # its row was partly overwritten
                self._forget(pending, op.client)
            if not pending.rows:  # nothing staged: its base is not held for nothing
                self.drop(op.job, op.round)
            return {"failed": name, "reason": exc.message}
        if pending.base is not None:
            row -= pending.base  # in place, the float32 subtraction RoundData makes
        staged = StagedRow(row, decoded.sha256, decoded.sq_norm, op.etag)
        with self._lock:
            old = pending.rows.pop(op.client, None)
            pending.rows[op.client] = staged
            self.stats.staged += 1
            rows = len(pending.rows)
        if old is not None:  # a rewritten object: the newer read replaces it
            self.cache.release(int(old.row.nbytes))
        return {"staged": name, "rows": rows}

    def _base(
        self, job: str, round_: int, specs: tuple[TensorSpec, ...]
    ) -> tuple[npt.NDArray[np.float32] | None, str]:
        """The round's base as a row in the order of ``specs`` and its object's ETag (read
        after the HEAD: a base rewritten between the two has a newer ETag at the commit, which
        then reads every row); ``(None, "")`` when there is none, it does not fit the tensors
        or it cannot be read (the rows are then staged as they are stored)."""
        try:
            info = self.store.stat(base_key(job, round_))
            base = None if info is None else base_vector(self.store.get_base(job, round_), specs)
        except FLStoreError:
            return None, ""
        return (None, "") if base is None or info is None else (base, info.etag)

    def take(self, manifest: RoundManifest) -> StagedTake:
        """The staged rows the committed ``manifest`` names with the same digest, decoded in
        its tensors, by client, and the base they are deltas from (if any); the round's pending
        state is dropped and its bytes released."""
        with self._lock:
            pending = self._pending.pop((manifest.job, manifest.round), None)
        if pending is None:
            return StagedTake({})
        self.cache.release(pending.nbytes)
        out: dict[str, HeldRow] = {}
        for client, staged in pending.rows.items():
            entry = manifest.updates.get(client)
            same = entry is not None and entry.sha256 == staged.sha256
            if same and pending.specs == manifest.tensors:
                out[client] = (staged.row, staged.sq_norm)
                continue
            self.stats.discarded += 1
        self.stats.used += len(out)
        pending.rows.clear()  # the rows live on in ``out`` only, so a reader can let each go
        same_layout = pending.order == list(manifest.clients) and bool(out)
        matrix = pending.matrix if same_layout else None
        return StagedTake(out, pending.base, pending.base_etag, matrix)

    def _forget(self, pending: PendingRound, client: str) -> None:
        """Let go of ``client``'s staged row (the commit reads it)."""
        with self._lock:
            old = pending.rows.pop(client, None)
        if old is not None:
            self.cache.release(int(old.row.nbytes))

    def drop(self, job: str, round_: int) -> None:
        """Drop a round's pending state (its layout is not the staged one, or it did not fit)."""
        with self._lock:
            self._drop_locked((job, round_))

    def held_bytes(self, job: str, round_: int) -> int:
        """The bytes a round's pending state holds against the budget (0 when none)."""
        with self._lock:
            pending = self._pending.get((job, round_))
            return 0 if pending is None else pending.nbytes

    def pending(self) -> dict[str, int]:
        """``job/round`` -> rows held, for :meth:`to_dict`."""
        with self._lock:
            return {f"{j}/{r}": len(p.rows) for (j, r), p in sorted(self._pending.items())}

    def to_dict(self) -> dict[str, Any]:
        """The counters, the rounds pending and the bytes they hold."""
        return {**self.stats.to_dict(), "pending": self.pending(), "bytes": self.cache.reserved}

    def _expire(self, job: str, round_: int) -> None:
        """Drop pending rounds past :data:`PENDING_TTL_S`, and the job's oldest beyond
        :data:`ROUNDS_PER_JOB` once ``round_`` is pending too."""
        now = time.monotonic()
        with self._lock:
            for key in [k for k, p in self._pending.items() if now - p.started > PENDING_TTL_S]:
                self._drop_locked(key)
            mine = sorted({r for j, r in self._pending if j == job} | {round_})
            for old in mine[:-ROUNDS_PER_JOB]:
                self._drop_locked((job, old))

    def _drop_locked(self, key: tuple[str, int]) -> None:
        pending = self._pending.pop(key, None)
        if pending is not None:
            self.cache.release(pending.nbytes)
            self.stats.dropped_rounds += 1
