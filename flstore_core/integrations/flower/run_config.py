"""FLStore settings of a Flower app, read from its run config and the environment.

A Flower app carries its settings in its run config (``[tool.flwr.app.config]`` of its
``pyproject.toml``, overridden with ``flwr run --run-config``); the process that runs its
``ServerApp`` carries FLStore's ``FLSTORE_*`` environment. :func:`flstore_sink` reads both, so
that the one FLStore line of a ServerApp is::

    strategy = with_flstore(
        FedAvg(...),
        sink=flstore_sink(context.run_config),
        job=str(context.run_config["flstore-job"]),
    )

Run-config keys (all optional; declare the ones you want to override in the app's config):

- ``flstore-job`` — the FLStore job the rounds belong to (read by the app, as above).
- ``flstore-model`` — the registry model the app trains (``digits_cnn``, …), declared as the
  job's model before its first round (:class:`StoreSink`'s ``model``), so that the model
  workloads answer; empty or absent: the job keeps what it declares. ``flstore_sink``'s
  ``validation`` (the server's held-out ``(x, y)``) is declared with it.
- ``flstore-bucket`` — the bucket; empty or absent: ``FLSTORE_BUCKET``.
- ``flstore-max-in-flight`` — rounds handed to the background writer and not yet stored
  before the strategy waits (default 2; 0 stores each round inside ``aggregate_train``):
  :class:`StoreSink`'s ``max_in_flight``, which ``with_flstore`` reads.
- ``flstore-local-state`` — the local stack's state file, default ``.flstore/local.json``,
  relative to the working directory of the ServerApp's process (with ``flwr run``'s local
  SuperLink: the directory that SuperLink was started in).

Where the store is, first match wins:

1. ``flstore-bucket`` in the run config, or ``FLSTORE_S3_ENDPOINT`` in the environment: the
   store the environment describes (``FLSTORE_S3_ENDPOINT``, ``FLSTORE_BUCKET``, AWS
   credentials), with that bucket;
2. the local stack's state file exists: its bucket and S3 endpoint. A stack whose S3 endpoint
   notifies commits (``commit_notifications`` in its state, as on AWS, where the bucket
   notifies the router function) warms every round the sink commits by itself, so the sink
   writes and commits only; with an older state file every round is warmed on the stack's
   cache nodes through its Lambda endpoint (the router's ``prefetch``) by the sink;
3. otherwise: ``ObjectStore()`` (``FLSTORE_BUCKET`` on AWS).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flstore_core import config
from flstore_core.errors import ValidationError
from flstore_core.integrations.flower.sinks import StoreSink

__all__ = [
    "BUCKET_KEY",
    "JOB_KEY",
    "LOCAL_STATE",
    "LOCAL_STATE_KEY",
    "MAX_IN_FLIGHT_KEY",
    "MODEL_KEY",
    "flstore_sink",
]

JOB_KEY = "flstore-job"
MODEL_KEY = "flstore-model"
BUCKET_KEY = "flstore-bucket"
LOCAL_STATE_KEY = "flstore-local-state"
MAX_IN_FLIGHT_KEY = "flstore-max-in-flight"
LOCAL_STATE = Path(".flstore") / "local.json"


def flstore_sink(
    run_config: Mapping[str, Any] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    validation: tuple[Any, Any] | None = None,
) -> StoreSink:
    """The :class:`StoreSink` a Flower app's run config and environment describe (see the
    module docstring for the keys and the order in which they are tried); ``validation``, the
    server's held-out ``(x, y)``, is declared as the job's with the run config's model."""
    from flstore_core.storage.object_store import ObjectStore

    run_config = run_config or {}
    model = str(run_config.get(MODEL_KEY) or "").strip() or None
    declares: dict[str, Any] = {
        "model": model,
        "validation": validation if model else None,
        "max_in_flight": _max_in_flight(run_config.get(MAX_IN_FLIGHT_KEY)),
    }
    bucket = str(run_config.get(BUCKET_KEY) or "").strip() or None
    if bucket is not None or config.S3_ENDPOINT.get(environ):
        return StoreSink(
            ObjectStore(
                bucket or config.BUCKET.get(environ),
                endpoint_url=config.S3_ENDPOINT.get(environ),
            ),
            **declares,
        )
    state_file = Path(str(run_config.get(LOCAL_STATE_KEY) or LOCAL_STATE))
    if state_file.exists():
        return _local_stack_sink(state_file, declares)
    return StoreSink(ObjectStore(config.BUCKET.get(environ)), **declares)


def _max_in_flight(value: Any) -> int | None:
    """The run config's ``flstore-max-in-flight`` (absent or empty: None, the default)."""
    if value is None or str(value).strip() == "":
        return None
    try:
        count = int(value)
    except (TypeError, ValueError):
        count = -1
    if count < 0 or (isinstance(value, float) and not float(value).is_integer()):
        raise ValidationError(
            f"{MAX_IN_FLIGHT_KEY}={value!r}: give a whole number of rounds, 0 or more"
        )
    return count


def _local_stack_sink(state_file: Path, declares: dict[str, Any]) -> StoreSink:
    """A sink into the local stack that ``state_file`` describes, warming its cache nodes."""
    from flstore_core.aws import lambda_client
    from flstore_core.routing.auth import TokenTable
    from flstore_core.routing.invoker import NodeInvoker
    from flstore_core.routing.router import Router, RouterConfig
    from flstore_core.storage.object_store import ObjectStore

    try:
        state = json.loads(state_file.read_text(encoding="utf-8"))
        store = ObjectStore(str(state["bucket"]), endpoint_url=str(state["s3_endpoint"]))
        placement = RouterConfig(
            prefix=str(state.get("prefix", "flstore")),
            nodes=int(state["nodes"]),
            replication=int(state["replication"]),
        )
        endpoint = str(state["lambda_endpoint"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValidationError(
            f"cannot read the local stack's state {state_file}: {exc!r}; "
            "restart it with `flstore local up`"
        ) from exc
    if state.get("commit_notifications"):
        # warming the round here too would only collide with the notification's warming (both
        # loading on one-instance nodes: throttled invokes, dropped events) and lengthen the run
        return StoreSink(store, **declares)
    # only the placement and the invoker are used (prefetch): no tokens
    invoker = NodeInvoker(lambda_client(endpoint))
    router = Router(store, invoker, TokenTable.with_tokens({}), placement)
    return StoreSink(store, prefetch=router, **declares)
