"""Writing a round: storing client updates, then committing the round with its manifest.

Writes are ordered so a failure never leaves a visible half-round: updates first, the manifest
last (a round exists for readers only once its manifest does). Rewriting an update with the
same content is a no-op in effect; changing a committed client's update is refused; a late
client joins a committed round by a new commit (the union). The rules themselves are
:mod:`flstore_core.storage.commit`, shared with ingestion.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping

from flstore_core.data import layout
from flstore_core.data.codec import CodecLimits, EncodedUpdate, TensorSpec
from flstore_core.data.manifest import RoundManifest, UpdateEntry
from flstore_core.errors import NotFoundError
from flstore_core.ids import validate_job, validate_round
from flstore_core.storage.catalog import find_manifest, update_times
from flstore_core.storage.commit import (
    check_agreement,
    committed_entry,
    entry_of,
    entry_of_stored,
    round_reference,
    with_summaries,
)
from flstore_core.storage.counted import CountedBlobs
from flstore_core.storage.jobs import JobSpecs

Specs = tuple[TensorSpec, ...]


class RoundWriter:
    """Stores updates and commits rounds for one store object."""

    def __init__(self, io: CountedBlobs, jobs: JobSpecs, limits: CodecLimits) -> None:
        self.io = io
        self.jobs = jobs
        self.limits = limits
        self._lock = threading.Lock()
        # specs of updates written through this object, so that commit need not read them back
        self._pending_specs: dict[tuple[str, int, str], Specs] = {}

    def put_encoded(
        self, job: str, round_: int, client: str, encoded: EncodedUpdate
    ) -> UpdateEntry:
        """Store an already encoded update; returns its manifest entry (not yet committed).

        Refused before any write if the round is already committed with other tensors, or with a
        different update for this client."""
        key = layout.update_key(job, round_, client)
        manifest = find_manifest(self.io, job, round_)
        if manifest is not None:
            check_agreement(manifest.tensors, encoded.specs, client)
            old = committed_entry(manifest, client, encoded.sha256)
            if old is not None:
                return old
        entry = entry_of(client, key, encoded)
        self.io.put(key, encoded.data)
        with self._lock:
            self._pending_specs[(job, round_, client)] = encoded.specs
        return entry

    def commit_round(
        self,
        job: str,
        round_: int,
        entries: Iterable[UpdateEntry] | None = None,
        summaries: dict[str, dict[str, float]] | None = None,
        specs: dict[str, Specs] | None = None,
    ) -> RoundManifest:
        """Make a round visible by writing its manifest, once all its updates are stored.

        Every update object under the round's prefix is included: those described by
        ``entries`` (what :meth:`put_encoded` returned) as given, any other (written by another
        process) read back and verified. Committing again is idempotent, and a late client is
        added to the manifest (the union). Names, shapes and dtypes must agree across the round,
        matched by name (clients may store their tensors in different orders); on a mismatch
        nothing is written and the error names the client and the tensor. A new round's tensors
        are laid out in the job's canonical order (:meth:`JobSpecs.tensor_order`).
        """
        validate_job(job)
        validate_round(round_)
        spec = self.jobs.get(job)
        existing = find_manifest(self.io, job, round_)
        given = {e.client: e for e in entries or ()}
        written_at = update_times(self.io.blobs, job, round_)
        missing = sorted(set(given) - set(written_at))
        if missing:
            raise NotFoundError(
                f"round {round_} of job {job!r}: update of client {missing[0]!r} is not stored"
            )
        updates, specs_of = self._gather(job, round_, existing, given, written_at, specs or {})
        if not updates:
            raise NotFoundError(f"round {round_} of job {job!r} has no stored updates to commit")
        order = None if existing else self.jobs.tensor_order(job)
        reference = round_reference(existing, specs_of, written_at, order)
        for client in sorted(specs_of):
            check_agreement(reference, specs_of[client], client)
        updates = with_summaries(updates, summaries)
        manifest = RoundManifest(job, round_, spec.precision, tuple(reference), updates)
        if existing is None or existing.to_json() != manifest.to_json():
            self.io.put(layout.manifest_key(job, round_), manifest.to_json(), "application/json")
        for client in specs_of:
            self._pending_specs.pop((job, round_, client), None)
        return manifest

    def _gather(
        self,
        job: str,
        round_: int,
        existing: RoundManifest | None,
        given: Mapping[str, UpdateEntry],
        stored: Iterable[str],
        specs: Mapping[str, Specs],
    ) -> tuple[dict[str, UpdateEntry], dict[str, Specs]]:
        """The round's entries (the committed ones, then every stored update: as ``given``, or
        read back) and the specs of every update to check against the round's tensors: from
        ``specs``, from this object's writes, or read back with the objects not given."""
        updates: dict[str, UpdateEntry] = dict(existing.updates) if existing else {}
        specs_of: dict[str, Specs] = {}
        to_read = []
        for client in sorted(stored):
            if client in given:
                updates[client] = given[client]
                pending = specs.get(client) or self._pending_specs.get((job, round_, client))
                if pending is not None:
                    specs_of[client] = pending
                else:
                    to_read.append(client)
            elif client not in updates:
                to_read.append(client)
        described = self.io.executor().map(lambda c: self._describe(job, round_, c), to_read)
        for client, (entry, read_specs) in zip(to_read, described, strict=True):
            updates[client] = given.get(client, entry)
            specs_of[client] = read_specs
        return updates, specs_of

    def _describe(self, job: str, round_: int, client: str) -> tuple[UpdateEntry, Specs]:
        key = layout.update_key(job, round_, client)
        data = self.io.get(key, f"update of client {client!r}")
        return entry_of_stored(client, key, data, self.limits)
