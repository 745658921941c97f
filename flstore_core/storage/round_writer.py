"""Writing a round: storing client updates, then committing the round with its manifest.

Writes are ordered so a failure never leaves a visible half-round: updates first, the manifest
last (a round exists for readers only once its manifest does). Rewriting an update with the
same content is a no-op in effect; changing a committed client's update is refused; a late
client joins a committed round by a new commit (the union) only where the job spec allows it.
The manifest's first write is a conditional create and every rewrite is conditional on the
version read (ARCHITECTURE §2: commits are atomic under concurrency). The rules themselves are
:mod:`flstore_core.storage.commit`, shared with ingestion.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime

from flstore_core.data import layout
from flstore_core.data.codec import CodecLimits, EncodedUpdate, TensorSpec
from flstore_core.data.manifest import RoundManifest, UpdateEntry
from flstore_core.errors import ConflictError, NotFoundError, PreconditionFailedError
from flstore_core.ids import validate_job, validate_round
from flstore_core.storage.blobs import BlobInfo
from flstore_core.storage.catalog import find_manifest, read_manifest_version, update_times
from flstore_core.storage.commit import (
    check_agreement,
    check_late_clients,
    committed_entry,
    entry_of,
    entry_of_stored,
    kept_entries,
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

        Refused before any write if the round is already committed with other tensors, with a
        different update for this client, or without this client where the job allows no late
        client (or its window has passed)."""
        key = layout.update_key(job, round_, client)
        manifest = find_manifest(self.io, job, round_)
        if manifest is not None:
            check_agreement(manifest.tensors, encoded.specs, client)
            old = committed_entry(manifest, client, encoded.sha256)
            if old is not None:
                return old
            # a late client: refused before its object is written, so a refusal leaves nothing
            # in the round's prefix (the commit checks again: the window may close meanwhile)
            version = self.io.blobs.head(layout.manifest_key(job, round_))
            check_late_clients(
                manifest, [client], self.jobs.get(job).late_window_s, _age_s(version)
            )
        entry = entry_of(client, key, encoded)
        self.io.put(key, encoded.data, sha256_b64=encoded.stored_sha256_b64 or None)
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
        existing, version = read_manifest_version(self.io, job, round_)
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
        late: list[str] = []
        if existing is not None:
            updates = kept_entries(existing, updates)
            late = sorted(set(updates) - set(existing.updates))
            if given:  # a stray object no one asked to commit (a refused late client) stays out
                updates = {c: e for c, e in updates.items() if c in given or c not in late}
                late = [c for c in late if c in given]
            check_late_clients(existing, late, spec.late_window_s, _age_s(version))
        updates = with_summaries(updates, summaries, final=existing is not None and not late)
        manifest = RoundManifest(job, round_, spec.precision, tuple(reference), updates)
        self._write_manifest(manifest, existing, version)
        for client in specs_of:
            self._pending_specs.pop((job, round_, client), None)
        return manifest

    def _write_manifest(
        self, manifest: RoundManifest, existing: RoundManifest | None, version: BlobInfo | None
    ) -> None:
        """Write a round's manifest: a conditional create for the first commit (a race lost to
        an identical commit is success, to another a ConflictError), a rewrite only of the
        version read (``If-Match``), nothing when it is unchanged."""
        key = layout.manifest_key(manifest.job, manifest.round)
        body = manifest.to_json()
        what = f"the manifest of round {manifest.round} of job {manifest.job!r}"
        if existing is None:
            self.io.create(key, body, what, content_type="application/json")
            return
        if existing.to_json() == body:
            return
        try:
            self.io.put(key, body, "application/json", if_match=version.etag if version else "")
        except PreconditionFailedError as exc:
            raise ConflictError(
                f"{what} ({key}) changed while this commit was made; commit again"
            ) from exc

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


def _age_s(version: BlobInfo | None) -> float:
    """Seconds since a manifest was last written (its listed write time); infinite when the
    backend does not say, so a late client is refused rather than let in."""
    try:
        written = datetime.fromisoformat(version.modified) if version else None
    except ValueError:
        written = None
    if written is None:
        return math.inf
    if written.tzinfo is None:
        written = written.replace(tzinfo=UTC)
    return (datetime.now(UTC) - written).total_seconds()
