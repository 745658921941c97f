"""Result objects: what workloads write under a job's ``results/`` prefix, and the other raw
objects the store writes and reads by key.

Results carry a lifecycle tag so the bucket expires them; a model result too large to hold
whole is written block by block as parts and joined into one object (a multipart copy).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from flstore_core.data import layout
from flstore_core.errors import ValidationError
from flstore_core.ids import validate_job
from flstore_core.storage.counted import CountedBlobs

if TYPE_CHECKING:
    from flstore_core.storage.object_store import ObjectStore

# results carry this tag: the bucket's lifecycle rule expires them (infra/flstore_infra/storage.py)
RESULT_TAGS = {"flstore:kind": "result"}

RESPONSE_LIMIT = 6 * 1024 * 1024  # Lambda's synchronous response limit
# what a cache node answers inline: the router's limit less room for the envelope around the
# result (the node's timings and counts, the router's meta)
NODE_INLINE_LIMIT = RESPONSE_LIMIT - 256 * 1024


def offload_if_large(
    store: ObjectStore, job: str, workload: str, round_: int, result: dict[str, Any], limit: int
) -> dict[str, Any]:
    """``result`` when its JSON is at most ``limit`` bytes, else ``{"result_key", "bytes"}``
    once it is written to ``jobs/{job}/results/{workload}/{round}/{digest}.json`` (the digest
    of its sorted JSON: the same answer, from any node or the router, has the same key)."""
    body = json.dumps(result, sort_keys=True).encode()
    if len(body) <= limit:
        return result
    digest = hashlib.sha256(body).hexdigest()[:16]
    key = f"{layout.results_prefix(job, workload, round_)}{digest}.json"
    store.put_result(key, body)
    return {"result_key": key, "bytes": len(body)}


def check_result_key(key: str) -> None:
    """Raise :class:`ValidationError` unless ``key`` is under a job's own ``results/`` prefix,
    ``jobs/{job}/results/…`` exactly (not a ``results/`` folder anywhere below ``jobs/``)."""
    parts = key.split("/", 3)
    if len(parts) < 4 or parts[0] != "jobs" or parts[2] != "results" or not parts[3]:
        raise ValidationError(f"result key {key!r} is not under a job's results/ prefix")
    validate_job(parts[1])


class ResultObjects:
    """Writing, joining and removing result objects, and raw objects by key."""

    def __init__(self, io: CountedBlobs) -> None:
        self.io = io

    def put_result(self, key: str, body: bytes, content_type: str = "application/json") -> str:
        """Write a result object under a job's ``results/`` prefix."""
        check_result_key(key)
        self.io.put(key, body, content_type, tags=RESULT_TAGS)
        return key

    def compose_result(
        self, key: str, parts: Sequence[str], content_type: str = "application/octet-stream"
    ) -> str:
        """Write a result object as the concatenation of result objects ``parts`` (a model
        result written block by block: each part one zstd frame), without holding it whole."""
        for name in (key, *parts):
            check_result_key(name)
        self.io.blobs.compose(key, parts, content_type=content_type, tags=RESULT_TAGS)
        self.io.count(puts=1)
        return key

    def delete_results(self, keys: Sequence[str]) -> None:
        """Remove result objects (the parts of a composed result once it is written)."""
        for key in keys:
            check_result_key(key)
            self.io.blobs.delete(key)

    def put_object(
        self, key: str, body: bytes, content_type: str = "application/octet-stream"
    ) -> str:
        """Write any object under a job's prefix or the bucket's ``ingest/`` prefix (ingestion's
        dead letters); the canonical objects have their own methods, which check them."""
        if not key.startswith(("jobs/", "ingest/")):
            raise ValidationError(f"key {key!r} is outside the jobs/ and ingest/ prefixes")
        self.io.put(key, body, content_type)
        return key
