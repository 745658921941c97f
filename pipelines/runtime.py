"""What the pipelines' workers need to reach FLStore, carried as small picklable values.

A DoFn is pickled into the job graph and rebuilt on a worker that may be another process or
another machine (Dataflow, Flink, Spark), so it carries *how to connect* — :class:`StoreTarget`,
:class:`PrefetchTarget` — and makes its clients in ``setup()``. Progress reaches the caller of
``run_ingest`` through a registry keyed by run id: on an in-process runner (``FnApiRunner``) the
worker threads find the caller's callback there; on a remote runner they find nothing and only
Beam metrics report (the summary is built from those either way).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from flstore_core.aws import s3_client
from flstore_core.data.codec import Precision
from flstore_core.data.manifest import JobSpec
from flstore_core.errors import NotFoundError, ValidationError
from flstore_core.storage.object_store import ObjectStore

if TYPE_CHECKING:
    from flstore_core.routing.router import Router

METRICS_NAMESPACE = "flstore"
LOCAL_STATE = Path(".flstore") / "local.json"


def new_run_id() -> str:
    """A sortable, unique id for one run: it names the run's dead-letter object."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(3)


@dataclass(frozen=True)
class StoreTarget:
    """Where FLStore's bucket is; explicit credentials only when the runner's workers need them.

    Credentials come from Beam's own S3 options (``--s3_access_key_id`` …) when given, so a
    remote runner's workers can write without an ambient AWS identity; otherwise boto3's usual
    chain (environment, profile, instance role) applies, with the local-endpoint defaults of
    :func:`flstore_core.aws.s3_client`.
    """

    bucket: str
    endpoint_url: str | None = None
    access_key_id: str | None = field(default=None, repr=False)
    secret_access_key: str | None = field(default=None, repr=False)
    region_name: str | None = None

    def store(self, max_workers: int = 4) -> ObjectStore:
        """A fresh :class:`ObjectStore` (one per DoFn instance, made in ``setup``)."""
        client = s3_client(
            self.endpoint_url,
            max_pool=32,
            access_key_id=self.access_key_id,
            secret_access_key=self.secret_access_key,
            region_name=self.region_name if self.access_key_id else None,
        )
        return ObjectStore(self.bucket, client=client, max_workers=max_workers)


def ensure_job_spec(store: ObjectStore, job: str, precision: Precision | None) -> JobSpec:
    """The job's spec, declaring it (default spec, ``precision`` if given) when it is new.

    A declared job keeps its storage precision: asking for another one is an error rather than a
    silent mix of precisions within a job.
    """
    try:
        spec = store.get_job_spec(job)
    except NotFoundError:
        return store.put_job_spec(JobSpec(job=job, precision=precision or "float32"))
    if precision is not None and precision != spec.precision:
        raise ValidationError(
            f"job {job!r} stores its updates as {spec.precision}; ingesting as {precision} would "
            "mix precisions (drop --precision, or declare a new job)"
        )
    return spec


@dataclass(frozen=True)
class PrefetchTarget:
    """How to reach the cache nodes: the router's placement settings and the Lambda endpoint."""

    prefix: str = "flstore"
    nodes: int = 8
    replication: int = 2
    lambda_endpoint: str | None = None  # None: AWS Lambda of the workers' ambient region
    hot_rounds: int = 2  # only the latest W rounds of a job are worth warming (ARCHITECTURE §3)
    # the nodes' cache budget, which the planner cuts large rounds into blocks by (None: the
    # environment's FLSTORE_CACHE_BUDGET_BYTES, else what the default node memory leaves)
    budget_bytes: int | None = None

    @classmethod
    def from_router(cls, router: Router, hot_rounds: int = 2) -> PrefetchTarget:
        """The target a live :class:`Router` invokes (same placement, same endpoint)."""
        from flstore_core.routing.invoker import NodeInvoker

        # a fake invoker (tests) stands for AWS: the workers find their region's endpoint
        invoker = router.invoker
        endpoint = invoker.endpoint_url if isinstance(invoker, NodeInvoker) else ".amazonaws.com"
        return cls(
            prefix=router.config.prefix,
            nodes=router.config.nodes,
            replication=router.config.replication,
            lambda_endpoint=None if ".amazonaws.com" in endpoint else endpoint,
            hot_rounds=hot_rounds,
            budget_bytes=router.config.budget,
        )

    @classmethod
    def from_local_state(
        cls, path: str | Path = LOCAL_STATE, hot_rounds: int = 2
    ) -> PrefetchTarget:
        """The target of a running local stack (``.flstore/local.json``)."""
        state = json.loads(Path(path).read_text())
        return cls(
            prefix=str(state.get("prefix", "flstore")),
            nodes=int(state.get("nodes", 4)),
            replication=int(state.get("replication", 2)),
            lambda_endpoint=str(state["lambda_endpoint"]),
            hot_rounds=hot_rounds,
            budget_bytes=int(state["budget_bytes"]) if state.get("budget_bytes") else None,
        )

    def with_nodes(self, nodes: int | None) -> PrefetchTarget:
        if nodes is None:
            return self
        if nodes < 1:
            raise ValidationError("--nodes must be at least 1")
        return dataclasses.replace(self, nodes=nodes)

    def router(self, store: ObjectStore) -> Router:
        """A :class:`Router` wired like the deployed one; only its placement and invoker are
        used (``prefetch``), so it carries no tokens."""
        from flstore_core.aws import lambda_client
        from flstore_core.routing.auth import TokenTable
        from flstore_core.routing.invoker import NodeInvoker
        from flstore_core.routing.router import Router, RouterConfig

        return Router(
            store,
            NodeInvoker(lambda_client(self.lambda_endpoint)),
            TokenTable.with_tokens({}),
            RouterConfig(
                prefix=self.prefix,
                nodes=self.nodes,
                replication=self.replication,
                cache_budget_bytes=self.budget_bytes,
            ),
        )


# ---------------------------------------------------------------------- progress


EventKind = Literal[
    "planned", "header", "stored", "model", "deadletter", "committed", "prefetched", "done"
]


@dataclass(frozen=True)
class ProgressEvent:
    """One step of a run, for a progress bar: ``files`` and ``bytes`` are increments."""

    kind: EventKind
    files: int = 0
    bytes: int = 0
    detail: str = ""


ProgressCallback = Callable[[ProgressEvent], None]

_listeners: dict[str, ProgressCallback] = {}
_listeners_lock = threading.Lock()


def listen(run_id: str, callback: ProgressCallback | None) -> None:
    """Route the progress events of ``run_id`` to ``callback`` (``None`` stops routing)."""
    with _listeners_lock:
        if callback is None:
            _listeners.pop(run_id, None)
        else:
            _listeners[run_id] = callback


def report(run_id: str, event: ProgressEvent) -> None:
    """Deliver an event to the run's listener, if it lives in this process; never raises."""
    with _listeners_lock:
        callback = _listeners.get(run_id)
    if callback is not None:
        # a broken progress bar must not fail an ingestion
        with contextlib.suppress(Exception):
            callback(event)


def beam_s3_options(options: Any) -> dict[str, Any]:
    """Beam's S3 options as the plain dict its S3 client accepts (picklable, for workers)."""
    from apache_beam.options.pipeline_options import S3Options

    view = options.view_as(S3Options)
    names = (
        "s3_access_key_id",
        "s3_secret_access_key",
        "s3_session_token",
        "s3_endpoint_url",
        "s3_region_name",
        "s3_api_version",
        "s3_verify",
        "s3_disable_ssl",
    )
    return {n: getattr(view, n) for n in names}


def release(result: Any) -> None:
    """Let go of what a finished run holds: Beam's Dask runner opens a ``distributed.Client``
    per run and leaves it open, reconnecting to a scheduler that may have gone away since."""
    client = getattr(result, "client", None)
    if client is not None:
        with contextlib.suppress(Exception):
            client.close()
