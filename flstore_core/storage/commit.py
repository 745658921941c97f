"""The rules for committing a round, written once for the object store and for ingestion.

* A round's updates agree on tensor names, shapes and dtypes (:func:`check_agreement`), matched
  by name: a file may store its tensors in any order (the ``safetensors`` library sorts them by
  name), so order is never a difference. The reference is the committed manifest's tensors, or
  for a new round the specs most updates share (:func:`majority_specs`), laid out in the job's
  canonical tensor order (:func:`round_reference`).
* A job has one canonical tensor order (ARCHITECTURE §2): its registry model's state-dict order
  when the job declares a model, else the order of its first committed round
  (:meth:`~flstore_core.storage.object_store.ObjectStore.tensor_order` finds it). The manifest's
  ``tensors`` — the round matrix's columns, and so every model result — follow it
  (:func:`in_order`).
* A committed update is immutable (:func:`committed_entry`): writing the identical update again
  is a no-op, a different one for the same client is refused. A committed round's clients,
  their updates and ``num_examples`` are final (:func:`kept_entries`); a late client joins a
  committed round only where the job spec allows it (:func:`check_late_clients`); a backfill
  may add summaries, never change one (:func:`with_summaries`).
* A stored update's manifest entry is a function of its encoded form (:func:`entry_of`), or of
  its stored bytes when another process wrote it (:func:`entry_of_stored`).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping, Sequence

import numpy as np

from flstore_core.data.codec import (
    CodecLimits,
    EncodedUpdate,
    TensorSpec,
    describe_frames,
    parse_safetensors,
    row_sq_norm,
)
from flstore_core.data.manifest import NORM, RoundManifest, UpdateEntry
from flstore_core.errors import ConflictError, CorruptUpdateError, MismatchError


def check_agreement(
    reference: Sequence[TensorSpec], specs: Sequence[TensorSpec], client: str
) -> None:
    """Raise :class:`MismatchError` naming ``client`` and the tensor if the specs disagree."""
    ref = {s.name: s for s in reference}
    got = {s.name: s for s in specs}
    for name, s in ref.items():
        g = got.get(name)
        if g is None:
            raise MismatchError(f"client {client!r}: tensor {name!r} is missing from its update")
        if g.shape != s.shape:
            raise MismatchError(
                f"client {client!r}: tensor {name!r} has shape {list(g.shape)}, the round has "
                f"{list(s.shape)}"
            )
        if g.dtype != s.dtype:
            raise MismatchError(
                f"client {client!r}: tensor {name!r} has dtype {g.dtype}, the round has {s.dtype}"
            )
    extra = sorted(set(got) - set(ref))
    if extra:
        raise MismatchError(f"client {client!r}: tensor {extra[0]!r} is not in the round")


def majority_specs(
    specs_of: Mapping[str, tuple[TensorSpec, ...]], written_at: Mapping[str, object]
) -> tuple[TensorSpec, ...]:
    """The specs most clients agree on, order aside (the same tensors stored in another order
    are the same specs); on a tie, those of the earliest written update. The answer is laid out
    as that group's earliest written update stores it."""
    first = sorted(specs_of, key=lambda c: (str(written_at.get(c) or ""), c))
    counts: dict[frozenset[TensorSpec], int] = {}
    rank: dict[frozenset[TensorSpec], int] = {}
    as_stored: dict[frozenset[TensorSpec], tuple[TensorSpec, ...]] = {}
    for i, client in enumerate(first):
        key = frozenset(specs_of[client])
        counts[key] = counts.get(key, 0) + 1
        if key not in rank:
            rank[key], as_stored[key] = i, specs_of[client]
    return as_stored[max(counts, key=lambda k: (counts[k], -rank[k]))]


def in_order(specs: Sequence[TensorSpec], order: Sequence[str] | None) -> tuple[TensorSpec, ...]:
    """``specs`` laid out in the canonical tensor ``order`` (names), or as given when there is no
    order yet or its names are not exactly the specs' (a job whose updates do not match its
    declared model keeps the updates' order; the model-based workloads name the tensor)."""
    by_name = {s.name: s for s in specs}
    if not order or len(order) != len(by_name) or set(order) != set(by_name):
        return tuple(specs)
    return tuple(by_name[n] for n in order)


def round_reference(
    existing: RoundManifest | None,
    specs_of: Mapping[str, tuple[TensorSpec, ...]],
    written_at: Mapping[str, object],
    order: Sequence[str] | None,
) -> tuple[TensorSpec, ...]:
    """The tensors a round is committed with: a committed round's own (a late client joins the
    round as it is), else the majority's specs in the job's canonical order."""
    if existing is not None:
        return existing.tensors
    return in_order(majority_specs(specs_of, written_at), order)


def committed_entry(manifest: RoundManifest | None, client: str, sha256: str) -> UpdateEntry | None:
    """The committed entry of ``client`` when it holds exactly this update (``sha256`` of the
    uncompressed bytes), ``None`` when the client is not committed; :class:`ConflictError` when a
    different update of the client is."""
    old = None if manifest is None else manifest.updates.get(client)
    if old is None:
        return None
    if old.sha256 != sha256:
        raise ConflictError(
            f"client {client!r} already has a different update committed in round "
            f"{manifest.round if manifest else '?'} of job "
            f"{manifest.job if manifest else '?'!r}; committed updates are immutable"
        )
    return old


def entry_of(client: str, key: str, encoded: EncodedUpdate) -> UpdateEntry:
    """The manifest entry of an encoded update stored under ``key`` (not yet committed)."""
    return UpdateEntry(
        client=client,
        key=key,
        sha256=encoded.sha256,
        raw_bytes=encoded.raw_bytes,
        stored_bytes=encoded.stored_bytes,
        num_examples=encoded.num_examples,
        metrics=encoded.metrics,
        summary={NORM: encoded.norm},
        frames=encoded.frames,
        frame_sha256=encoded.frame_digests,
    )


def entry_of_stored(
    client: str, key: str, data: bytes, limits: CodecLimits
) -> tuple[UpdateEntry, tuple[TensorSpec, ...]]:
    """The manifest entry of an update object read back from ``key`` (written by another
    process, so its frame index is read off the object), and its tensors' specs in their
    source dtypes; a malformed object is a :class:`CorruptUpdateError` naming ``client``."""
    raw, frames, digests = describe_frames(data, limits)
    try:
        update = parse_safetensors(raw, limits)
    except CorruptUpdateError as exc:
        raise CorruptUpdateError(f"client {client!r}: {exc.message}") from exc
    sq = row_sq_norm(update)
    entry = UpdateEntry(
        client=client,
        key=key,
        sha256=hashlib.sha256(raw).hexdigest(),
        raw_bytes=len(raw),
        stored_bytes=len(data),
        num_examples=update.num_examples,
        metrics=update.metrics,
        summary={NORM: float(np.sqrt(sq))},
        frames=frames,
        frame_sha256=digests,
    )
    # reduced-precision storage widens back to float32, so specs carry the source dtypes
    return entry, tuple(update.specs())


def with_summaries(
    updates: Mapping[str, UpdateEntry],
    summaries: Mapping[str, Mapping[str, float]] | None,
    *,
    final: bool = False,
) -> dict[str, UpdateEntry]:
    """``updates`` with each committed client's ``summaries`` merged into its entry's summary
    (a summary of a client not in ``updates`` is ignored). With ``final`` (the round's
    membership is the committed one: a backfill, a repeated commit) only new fields are added:
    a changed value of an existing one is a :class:`ConflictError`, since past answers read it."""
    merged = dict(updates)
    for client, extra in (summaries or {}).items():
        if client in merged:  # a copy: the existing manifest's entries stay as they were
            old = merged[client]
            if final:
                changed = sorted(k for k, v in extra.items() if old.summary.get(k, v) != v)
                if changed:
                    raise ConflictError(
                        f"client {client!r}: summary {changed[0]!r} is committed as "
                        f"{old.summary[changed[0]]!r}, not {extra[changed[0]]!r}; a committed "
                        "round's summaries are only ever added to, never changed"
                    )
            merged[client] = dataclasses.replace(old, summary={**old.summary, **extra})
    return merged


def kept_entries(
    existing: RoundManifest, updates: Mapping[str, UpdateEntry]
) -> dict[str, UpdateEntry]:
    """``updates`` with every client committed in ``existing`` kept exactly as committed (its
    update and ``num_examples`` are final); a given entry that differs in either is a
    :class:`ConflictError` naming the client."""
    kept = dict(updates)
    for client, old in existing.updates.items():
        new = kept.get(client, old)
        if new.sha256 != old.sha256 or new.num_examples != old.num_examples:
            raise ConflictError(
                f"client {client!r} is committed in round {existing.round} of job "
                f"{existing.job!r} with update sha256 {old.sha256} and num_examples "
                f"{old.num_examples}; a committed round's updates are final"
            )
        kept[client] = old
    return kept


def check_late_clients(
    existing: RoundManifest, late: Sequence[str], window_s: float | None, since_commit_s: float
) -> None:
    """Refuse ``late`` clients joining the committed round ``existing`` unless the job allows
    late clients (``window_s``, its ``late_clients.within_s``) and the round's manifest was
    written at most that long ago (``since_commit_s``): a late client rewrites the round's
    membership, and so past answers on it."""
    if not late:
        return
    if window_s is None:
        allowed = "the job does not allow late clients (its job spec's late_clients is off)"
    elif not since_commit_s <= window_s:
        allowed = (
            f"it was committed {since_commit_s:.0f} s ago, past the job's late_clients window "
            f"of {window_s:g} s"
        )
    else:
        return
    raise ConflictError(
        f"client {late[0]!r} cannot join round {existing.round} of job {existing.job!r}: "
        f"{allowed}; the round's clients are final ({len(existing.updates)} committed)"
    )
