"""Reading committed rounds, verified: one client's update, a whole round as one float32
matrix, a column block of a round, and a column block of a round's base model.

Rounds are read with parallel GETs on the store's pool and decoded straight into one
``(n_clients, n_params)`` float32 matrix (:class:`RoundMatrix`), the form every workload uses.
Every object is checked against its manifest (the sha256 of its bytes, or the digest of each
frame read); one that fails is not served (:mod:`~flstore_core.storage.verified`).
"""

from __future__ import annotations

from collections.abc import MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from flstore_core.data.blocks import block_specs
from flstore_core.data.codec import (
    CodecLimits,
    DecodedRow,
    FrameIndex,
    TensorMismatchError,
    TensorSpec,
    Update,
    decode_columns_into,
    decode_frames_columns_into,
    decode_into,
    header_prefix,
    slices_of,
    stored_specs,
    update_metadata,
)
from flstore_core.data.manifest import RoundManifest, UpdateEntry
from flstore_core.data.rows import unflatten
from flstore_core.errors import NotFoundError, ValidationError
from flstore_core.ids import validate_client
from flstore_core.storage.blobs import Buffer
from flstore_core.storage.catalog import get_manifest
from flstore_core.storage.counted import CountedBlobs
from flstore_core.storage.stored_models import base_key
from flstore_core.storage.verified import corrupt_as_unavailable, decode_stored

#: a row already decoded and its squared norm (:meth:`RoundReader.read_round`'s ``held``)
HeldRow = tuple[npt.NDArray[np.float32], float]


@dataclass
class RoundMatrix:
    """A committed round as one contiguous float32 matrix, rows in ``clients`` order.

    ``specs`` give each column range's tensor name, source dtype and shape (``slices`` the
    ranges); ``sq_norms`` are the rows' squared L2 norms, computed while decoding.
    """

    job: str
    round: int
    clients: list[str]
    matrix: npt.NDArray[np.float32]
    specs: tuple[TensorSpec, ...]
    num_examples: npt.NDArray[np.int64]
    metrics: list[dict[str, Any]]
    sq_norms: npt.NDArray[np.float64]
    slices: list[tuple[int, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.slices:
            self.slices = slices_of(self.specs)

    @property
    def nbytes(self) -> int:
        return int(self.matrix.nbytes)

    def row_of(self, client: str) -> int:
        try:
            return self.clients.index(client)
        except ValueError:
            raise NotFoundError(
                f"client {client!r} is not in round {self.round} of job {self.job!r}"
            ) from None

    def tensors_of(self, vector: npt.NDArray[Any]) -> dict[str, npt.NDArray[Any]]:
        """Unflatten a row-shaped vector into named tensors with their source dtypes."""
        return unflatten(vector, self.specs)


class RoundReader:
    """Verified reads of a store's committed rounds."""

    def __init__(self, io: CountedBlobs, limits: CodecLimits) -> None:
        self.io = io
        self.limits = limits

    def get_update(self, job: str, round_: int, client: str) -> Update:
        """One committed client update, verified against the manifest."""
        manifest = get_manifest(self.io, job, round_)
        entry = manifest.updates.get(validate_client(client))
        if entry is None:
            raise NotFoundError(f"client {client!r} is not in round {round_} of job {job!r}")
        data = self.io.get(entry.key, f"update of client {client!r}")
        return decode_stored(data, entry.key, self.limits, expected_sha256=entry.sha256)

    def read_round(
        self,
        job: str,
        round_: int,
        clients: Sequence[str] | None = None,
        manifest: RoundManifest | None = None,
        held: MutableMapping[str, HeldRow] | None = None,
        into: npt.NDArray[np.float32] | None = None,
    ) -> RoundMatrix:
        """A committed round as a :class:`RoundMatrix`, fetched with parallel GETs.

        Each update is decompressed straight into its row; every row is verified against the
        manifest's checksum and tensor specs. ``held`` are rows already decoded (a node's
        staged updates, :mod:`flstore_core.cache.staging`), whose caller checked them against
        this manifest: each is copied into its row and let go (the matrix's pages are touched
        as rows arrive, so memory grows by one row, not by the round), and only the other
        clients are read. ``into``: the matrix to fill (one row per client, in the round's
        order), whose held rows are already in place — they are neither copied nor read.
        """
        manifest = manifest or get_manifest(self.io, job, round_)
        order = clients_of(manifest, clients)
        specs = manifest.tensors
        shape = (len(order), manifest.n_params)
        matrix = into if into is not None and into.shape == shape else np.empty(shape, np.float32)
        sq = np.empty(len(order), dtype=np.float64)
        todo = []
        for i, client in enumerate(order):
            row = None if held is None else held.pop(client, None)
            if row is None:
                todo.append(i)
                continue
            if row[0].ctypes.data != matrix[i].ctypes.data:  # not decoded in place
                matrix[i] = row[0]
            sq[i] = row[1]
            del row

        def load(i: int) -> None:
            entry = manifest.updates[order[i]]
            data = self.io.get(entry.key, f"update of client {order[i]!r}")
            with corrupt_as_unavailable(entry.key):
                row = decode_into(
                    data,
                    matrix[i],
                    specs,
                    expected_sha256=entry.sha256,
                    limits=self.limits,
                    who=f"client {order[i]!r}",
                )
            sq[i] = row.sq_norm

        list(self.io.executor().map(load, todo))
        return round_matrix(manifest, order, matrix, specs, sq)

    def read_update_row(
        self,
        key: str,
        specs: tuple[TensorSpec, ...],
        who: str,
        out: npt.NDArray[np.float32] | None = None,
    ) -> tuple[npt.NDArray[np.float32], DecodedRow]:
        """One stored update not (yet) named by a manifest, decoded into a row in the order of
        ``specs``: the object is verified against the checksum stored with it and decoded
        under the same checks as a committed one (names, shapes, finiteness); the digest of
        its uncompressed bytes comes back with it, for a caller to match against the manifest
        that later commits it. ``out``: the row to decode into (a slot of a matrix)."""
        data = self.io.get(key, f"update of {who}")
        row = np.empty(sum(s.numel for s in specs), dtype=np.float32) if out is None else out
        with corrupt_as_unavailable(key):
            decoded = decode_into(data, row, specs, limits=self.limits, who=who)
        return row, decoded

    def read_round_block(
        self,
        job: str,
        round_: int,
        columns: tuple[int, int],
        manifest: RoundManifest | None = None,
        clients: Sequence[str] | None = None,
        chunk_bytes: int = 1 << 20,
    ) -> RoundMatrix:
        """The columns ``[a, b)`` of a committed round (a column block, :mod:`~flstore_core.
        data.blocks`) as a ``(clients, b - a)`` :class:`RoundMatrix`.

        A client whose manifest entry indexes its frames (an update stored in several zstd
        frames, :func:`~flstore_core.data.codec.encode_update`) is read by ranged GETs: its
        header frame, then the frames holding the block's bytes (one GET per run of
        consecutive frames), each verified against its digest in the manifest — a block costs
        its share of the stored bytes plus a frame or two at its edges, not the whole object
        (:func:`~flstore_core.data.codec.decode_frames_columns_into`). The whole row, and an
        entry without frames (one-frame updates, manifests from before frames), is streamed
        (one GET) and decoded with
        :func:`~flstore_core.data.codec.decode_columns_into`: verified whole against the
        manifest's checksum and tensor specs, only the block's columns kept. Clients are read in
        parallel on the store's pool, so at most ``max_workers`` streams are open: memory is the
        block plus ``max_workers`` × ``chunk_bytes`` (and a zstd window each). ``specs`` are the
        block's (:func:`~flstore_core.data.blocks.block_specs`), ``sq_norms`` the rows' parts.
        """
        manifest = manifest or get_manifest(self.io, job, round_)
        order = clients_of(manifest, clients)
        a, b = columns
        if not 0 <= a < b <= manifest.n_params:
            raise ValidationError(
                f"columns [{a}, {b}) are not a block of round {round_}'s "
                f"{manifest.n_params} parameters"
            )
        specs = manifest.tensors
        matrix = np.empty((len(order), b - a), dtype=np.float32)
        sq = np.empty(len(order), dtype=np.float64)

        whole = (a, b) == (0, manifest.n_params)

        def load(i: int) -> None:
            entry = manifest.updates[order[i]]
            who = f"client {order[i]!r}"
            if entry.frames and not whole:
                head = expected_header(manifest, entry)
                sq[i] = self.read_frames(entry, matrix[i], specs, columns, who, head)
                return
            stream = self.io.open(entry.key, f"update of client {order[i]!r}")
            try:
                with corrupt_as_unavailable(entry.key):
                    row = decode_columns_into(
                        stream,
                        matrix[i],
                        specs,
                        columns,
                        expected_sha256=entry.sha256,
                        limits=self.limits,
                        who=who,
                        chunk_bytes=chunk_bytes,
                    )
            finally:
                stream.close()
            sq[i] = row.sq_norm

        list(self.io.executor().map(load, range(len(order))))
        return round_matrix(manifest, order, matrix, block_specs(specs, columns), sq)

    def read_frames(
        self,
        entry: UpdateEntry,
        out: npt.NDArray[np.float32],
        specs: Sequence[TensorSpec],
        columns: tuple[int, int],
        who: str,
        header: bytes | None = None,
    ) -> float:
        """Columns of a framed update by ranged GETs of the frames that hold them (the header
        frame, then one GET per run of consecutive frames), each checked against its digest in
        the manifest; the block's squared norm."""

        def fetch(start: int, end: int) -> Buffer:
            return self.io.get_range(entry.key, start, end, f"update of {who}")

        with corrupt_as_unavailable(entry.key):
            row = decode_frames_columns_into(
                fetch,
                FrameIndex.from_pairs(entry.frames, entry.frame_sha256),
                out,
                specs,
                columns,
                limits=self.limits,
                who=who,
                header=header,
            )
        return row.sq_norm

    def read_base_block(
        self,
        job: str,
        round_: int,
        specs: Sequence[TensorSpec],
        columns: tuple[int, int],
        chunk_bytes: int = 1 << 20,
    ) -> npt.NDArray[np.float32] | None:
        """The columns ``[a, b)`` of a round's base model (ARCHITECTURE §2: ``global/{round-1}``,
        or the initial model at round 0), streamed like :meth:`read_round_block`; ``None`` when
        there is no base or it does not fit ``specs`` (the rule of
        :func:`~flstore_core.data.rows.base_vector`).

        The base is read whole (streamed), not by frames: it is in no manifest, so its frame
        index is unknown without reading it, and it is one object per block against a round's
        many clients."""
        key = base_key(job, round_)
        stream = self.io.blobs.open(key)
        if stream is None or not specs:
            return None
        self.io.count(gets=1)
        out = np.empty(columns[1] - columns[0], dtype=np.float32)
        try:
            with corrupt_as_unavailable(key):
                try:
                    decode_columns_into(
                        stream,
                        out,
                        specs,
                        columns,
                        limits=self.limits,
                        who=f"base model of round {round_}",
                        chunk_bytes=chunk_bytes,
                    )
                # inside the mapping: a base that does not fit is no base, not damaged bytes
                except TensorMismatchError:
                    return None
        finally:
            stream.close()
        return out


def expected_header(manifest: RoundManifest, entry: UpdateEntry) -> bytes | None:
    """The header frame :func:`~flstore_core.data.codec.encode_update` writes for ``entry``'s
    update when its tensors are in the round's order: the manifest's specs in its storage
    precision and the metadata the manifest records. A framed block read compares it with the
    first frame's digest and, when they agree, skips the header GET; ``None`` when the
    metadata cannot be rebuilt (the header is then read)."""
    update = Update(
        {},
        num_examples=entry.num_examples,
        metrics=entry.metrics,
        job=manifest.job,
        round=manifest.round,
        client=entry.client,
    )
    try:
        meta = update_metadata(update, manifest.precision)
        return header_prefix(stored_specs(manifest.tensors, manifest.precision), meta)
    except ValidationError:
        return None


def clients_of(manifest: RoundManifest, clients: Sequence[str] | None) -> list[str]:
    """The rows to read: ``clients`` (every client of the round if None), each in the round."""
    order = list(manifest.clients if clients is None else clients)
    for c in order:
        if c not in manifest.updates:
            raise NotFoundError(
                f"client {c!r} is not in round {manifest.round} of job {manifest.job!r}"
            )
    return order


def round_matrix(
    manifest: RoundManifest,
    order: list[str],
    matrix: npt.NDArray[np.float32],
    specs: tuple[TensorSpec, ...],
    sq: npt.NDArray[np.float64],
) -> RoundMatrix:
    """The :class:`RoundMatrix` of rows read in ``order`` (whole rows or a block's columns)."""
    return RoundMatrix(
        job=manifest.job,
        round=manifest.round,
        clients=order,
        matrix=matrix,
        specs=specs,
        num_examples=np.array([manifest.updates[c].num_examples for c in order], dtype=np.int64),
        metrics=[manifest.updates[c].metrics for c in order],
        sq_norms=sq,
    )
