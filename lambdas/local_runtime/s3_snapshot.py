"""The local S3's objects on disk, so that ``flstore local up`` keeps what it was given.

moto keeps its buckets in memory only: a stack stopped and started again had lost every job.
:func:`save_buckets` writes every object of every bucket to a directory, and
:func:`restore_buckets` PUTs them back into a fresh server. The directory is plain files, never
a pickle (nothing here may unpickle what a directory hands it)::

    DIR/index.json                 {"format": 1, "buckets": {bucket: [object, ...]}}
    DIR/blobs/ab/abcdef…           each distinct body once, named by its SHA-256 (hex)

An object's entry holds its key, the SHA-256 of its body (the blob's name), its content type,
user metadata, tags, and the checksum S3 kept with it (``{"algorithm": "SHA256", "value":
"…base64…"}``, or none), which the restore sends back verbatim: an object the blob layer
wrote with a SHA-256 is checked on read after a restore as before, and one whose bytes no
longer match it is still refused. A composite checksum (a multipart object's, ``…-N``) is not
a checksum of the bytes and is not sent back; S3 never checked such an object's whole body.

ETags are not kept: S3 computes them. A single-part object's ETag is the MD5 of its body, so it
comes back the same; a multipart one's comes back as a single part's. The blob layer reads an
ETag fresh before a conditional write (``IfMatch``), never from before the restore.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

import boto3
from botocore.config import Config

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

log = logging.getLogger(__name__)

INDEX = "index.json"
BLOBS = "blobs"
FORMAT = 1
# the checksums S3 keeps with an object, by the name of its field in a GetObject answer
CHECKSUM_FIELDS = {
    "SHA256": "ChecksumSHA256",
    "SHA1": "ChecksumSHA1",
    "CRC32": "ChecksumCRC32",
    "CRC32C": "ChecksumCRC32C",
    "CRC64NVME": "ChecksumCRC64NVME",
}


@dataclass(frozen=True)
class Restored:
    """What :func:`restore_buckets` put back: objects per bucket, and those it skipped."""

    objects: dict[str, int]
    skipped: int = 0

    @property
    def total(self) -> int:
        """Objects restored in all buckets."""
        return sum(self.objects.values())


def snapshot_client(endpoint_url: str) -> S3Client:
    """A client that hands over stored bytes and checksums as they are: it checks no
    response's checksum (a corrupt object is saved corrupt, to be refused on read as before)
    and adds none of its own to a PUT (an object saved without one is restored without)."""
    client: S3Client = boto3.client(
        "s3",
        endpoint_url=endpoint_url,
        aws_access_key_id="local",
        aws_secret_access_key="local",
        region_name="us-east-1",
        config=Config(
            s3={"addressing_style": "path"},
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        ),
    )
    return client


def save_buckets(client: S3Client, directory: Path, only: Collection[str] | None = None) -> int:
    """Write every object of every bucket (of ``only``'s, when given) to ``directory``; returns
    how many. The index is replaced in one rename, then blobs no object names any more are
    removed."""
    directory.mkdir(parents=True, exist_ok=True)
    buckets: dict[str, list[dict[str, Any]]] = {}
    for bucket in client.list_buckets().get("Buckets", []):
        name = str(bucket["Name"])
        if only is not None and name not in only:
            continue
        buckets[name] = [_save_object(client, name, key, directory) for key in _keys(client, name)]
    tmp = directory / f"{INDEX}.tmp"
    tmp.write_text(json.dumps({"format": FORMAT, "buckets": buckets}, indent=1))
    os.replace(tmp, directory / INDEX)
    _drop_unreferenced(directory, {o["sha256"] for objs in buckets.values() for o in objs})
    return sum(len(objs) for objs in buckets.values())


def _keys(client: S3Client, bucket: str) -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return [str(item["Key"]) for page in pages for item in page.get("Contents", [])]


def _save_object(client: S3Client, bucket: str, key: str, directory: Path) -> dict[str, Any]:
    # the body without its check (asking for the checksum with the GET makes botocore check
    # it), the checksum from a HEAD that asks for it
    body: bytes = client.get_object(Bucket=bucket, Key=key)["Body"].read()
    obj: Any = client.head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")
    digest = hashlib.sha256(body).hexdigest()
    blob = _blob_path(directory, digest)
    if not blob.exists():  # bodies are named by their hash: an existing one is this one
        blob.parent.mkdir(parents=True, exist_ok=True)
        tmp = blob.with_suffix(".tmp")
        tmp.write_bytes(body)
        os.replace(tmp, blob)
    tags = client.get_object_tagging(Bucket=bucket, Key=key).get("TagSet", [])
    checksum = next(
        (
            {"algorithm": algorithm, "value": str(obj[field])}
            for algorithm, field in CHECKSUM_FIELDS.items()
            if obj.get(field)
        ),
        None,
    )
    return {
        "key": key,
        "sha256": digest,
        "size": len(body),
        "content_type": str(obj.get("ContentType") or "application/octet-stream"),
        "metadata": dict(obj.get("Metadata") or {}),
        "tags": {str(t["Key"]): str(t["Value"]) for t in tags},
        "checksum": checksum,
    }


def _blob_path(directory: Path, digest: str) -> Path:
    return directory / BLOBS / digest[:2] / digest


def _drop_unreferenced(directory: Path, digests: set[str]) -> None:
    for blob in (directory / BLOBS).glob("*/*"):
        if blob.name not in digests:
            blob.unlink(missing_ok=True)


def restore_buckets(client: S3Client, directory: Path) -> Restored:
    """PUT back every object :func:`save_buckets` wrote to ``directory`` (nothing if it holds
    no index). A blob missing or not matching its name is skipped with a warning, so the rest
    of the store still comes up."""
    index_path = directory / INDEX
    if not index_path.exists():
        return Restored({})
    index = json.loads(index_path.read_text())
    if index.get("format") != FORMAT:
        raise ValueError(f"{index_path}: format {index.get('format')!r}, expected {FORMAT}")
    counts: dict[str, int] = {}
    skipped = 0
    for bucket, objects in index["buckets"].items():
        _ensure_bucket(client, bucket)
        counts[bucket] = 0
        for entry in objects:
            if _restore_object(client, bucket, entry, directory):
                counts[bucket] += 1
            else:
                skipped += 1
    return Restored(counts, skipped)


def _ensure_bucket(client: S3Client, bucket: str) -> None:
    existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
    if bucket not in existing:
        client.create_bucket(Bucket=bucket)


def _restore_object(client: S3Client, bucket: str, entry: dict[str, Any], directory: Path) -> bool:
    blob = _blob_path(directory, entry["sha256"])
    body = blob.read_bytes() if blob.exists() else None
    if body is None or hashlib.sha256(body).hexdigest() != entry["sha256"]:
        log.warning(
            "local S3: not restoring s3://%s/%s: %s missing or changed", bucket, entry["key"], blob
        )
        return False
    kwargs: dict[str, Any] = {
        "Bucket": bucket,
        "Key": entry["key"],
        "Body": body,
        "ContentType": entry["content_type"],
        "Metadata": entry["metadata"],
    }
    if entry["tags"]:
        kwargs["Tagging"] = urlencode(entry["tags"])
    checksum = entry.get("checksum")
    if checksum and "-" not in checksum["value"]:  # "…-N": a multipart object's composite
        kwargs["ChecksumAlgorithm"] = checksum["algorithm"]
        kwargs[CHECKSUM_FIELDS[checksum["algorithm"]]] = checksum["value"]
    client.put_object(**kwargs)
    return True
