"""Where the command line finds the local stack (``.flstore/local.json`` in the working
directory, ARCHITECTURE §6), the store it writes to, and the console every command prints to."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console

from flstore_core import config

console = Console()
STATE = Path(".flstore") / "local.json"


def local_store() -> Any:
    """The object store of the local stack (``.flstore/local.json``), else of the environment
    (``FLSTORE_S3_ENDPOINT``, ``FLSTORE_BUCKET``)."""
    from flstore_core.storage.object_store import ObjectStore

    if STATE.exists() and not config.S3_ENDPOINT.get():
        state = json.loads(STATE.read_text())
        return ObjectStore(state["bucket"], endpoint_url=state["s3_endpoint"])
    return ObjectStore()


def stack_target() -> tuple[str | None, str | None, Any]:
    """``(s3_endpoint, bucket, prefetch target)`` of the local stack, when one runs here and
    ``FLSTORE_S3_ENDPOINT`` does not point elsewhere."""
    if not STATE.exists() or config.S3_ENDPOINT.get():
        return None, None, None
    from pipelines.runtime import PrefetchTarget

    state = json.loads(STATE.read_text())
    return state["s3_endpoint"], state["bucket"], PrefetchTarget.from_local_state(STATE)
