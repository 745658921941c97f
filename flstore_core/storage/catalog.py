"""What the bucket holds, found by listing it: the jobs, a job's committed rounds (their
manifests, and each manifest's version) and its global models, a round's stored updates.

A round exists for readers only once its manifest does (ARCHITECTURE §2), so "committed rounds"
are the manifests listed and :func:`find_manifest` is ``None`` for a round being written.
"""

from __future__ import annotations

from flstore_core.data import layout
from flstore_core.data.manifest import RoundManifest
from flstore_core.errors import NotFoundError, UnavailableError
from flstore_core.storage.blobs import BlobInfo, BlobStore
from flstore_core.storage.counted import CountedBlobs

# reads of a manifest and its version before giving up on a round rewritten meanwhile
_VERSION_READS = 3


def job_names(blobs: BlobStore) -> list[str]:
    """Every job with an object in the bucket, sorted."""
    jobs = []
    for common in blobs.list_prefixes("jobs/", "/"):
        name = common[len("jobs/") :].rstrip("/")
        if name:
            jobs.append(name)
    return sorted(jobs)


def get_manifest(io: CountedBlobs, job: str, round_: int) -> RoundManifest:
    """The manifest of a committed round; :class:`NotFoundError` if it is not committed."""
    data = io.get(
        layout.manifest_key(job, round_), f"round {round_} of job {job!r} (not committed?)"
    )
    return RoundManifest.from_json(data)


def find_manifest(io: CountedBlobs, job: str, round_: int) -> RoundManifest | None:
    """The manifest of a committed round, or ``None`` if the round is not committed."""
    try:
        return get_manifest(io, job, round_)
    except NotFoundError:
        return None


def read_manifest_version(
    io: CountedBlobs, job: str, round_: int
) -> tuple[RoundManifest | None, BlobInfo | None]:
    """The manifest of a round and the version of it that was read (its ETag and write time), or
    ``(None, None)`` when the round is not committed: what a conditional rewrite
    (``If-Match``) names. The version is a HEAD before and after the GET, read again when they
    differ (a rewrite in between): a GET's bytes are not an ETag where S3 encrypts with KMS."""
    key = layout.manifest_key(job, round_)
    for _ in range(_VERSION_READS):
        before = io.blobs.head(key)
        if before is None:
            return None, None
        manifest = find_manifest(io, job, round_)
        after = io.blobs.head(key)
        if manifest is not None and after is not None and after.etag == before.etag:
            return manifest, after
    raise UnavailableError(f"{key} was rewritten while it was read, {_VERSION_READS} times")


def first_manifest(io: CountedBlobs, job: str) -> RoundManifest | None:
    """The manifest of the job's lowest-numbered committed round, found with one delimited
    LIST of its round prefixes; ``None`` while no round is committed."""
    for prefix in io.blobs.list_prefixes(layout.rounds_prefix(job), "/"):
        r = layout.parse_round_from_key(job, prefix + "manifest.json")
        manifest = None if r is None else find_manifest(io, job, r)
        if manifest is not None:
            return manifest
    return None


def manifest_versions(blobs: BlobStore, job: str) -> dict[int, str]:
    """Every committed round of a job, ascending, with its manifest's version tag (the
    object's ETag) — from the one LIST that listing the rounds makes anyway, so that a cache
    of manifests can tell a rewritten one (a backfill, a late client) from the copy it holds
    without a HEAD per manifest.

    The LIST is delimited by ``/updates/``: each round's update objects are rolled up into
    one common prefix, so the listing grows with the job's rounds, not with its update
    objects (50 rounds of 100 clients: one page, not six)."""
    prefix = layout.rounds_prefix(job)
    versions: dict[int, str] = {}
    for info in blobs.list(prefix, delimiter=layout.UPDATES_DELIMITER):
        key = info.key
        if key.endswith("/manifest.json"):
            r = layout.parse_round_from_key(job, key)
            if r is not None:
                # a backend without ETags: size and write time stand in for one
                versions[r] = info.etag or f"{info.size}@{info.modified}"
    return dict(sorted(versions.items()))


def update_times(blobs: BlobStore, job: str, round_: int) -> dict[str, str]:
    """``{client: write time}`` of every update object stored under the round's prefix,
    committed or not."""
    return {
        c: info.modified
        for info in blobs.list(layout.updates_prefix(job, round_))
        if (c := layout.parse_client_from_update_key(info.key)) is not None
    }


def global_rounds(blobs: BlobStore, job: str) -> list[int]:
    """Rounds that have a stored global model, ascending."""
    prefix = layout.job_prefix(job) + "global/"
    rounds = []
    for info in blobs.list(prefix):
        name = info.key[len(prefix) :].removesuffix(layout.UPDATE_SUFFIX)
        if len(name) == 8 and name.isdigit():
            rounds.append(int(name))
    return sorted(rounds)
