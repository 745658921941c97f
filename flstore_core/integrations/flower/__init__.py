"""Flower integration: one line turns a Flower strategy into one that feeds FLStore.

A Flower user changes the line that builds the strategy of their ``ServerApp``::

    strategy = with_flstore(FedAvg(...), sink=flstore_sink(context.run_config), job="my-job")

and runs it as before (``strategy.start(grid=grid, ...)``). The result is the same strategy
(an instance of a subclass of its class, so ``isinstance(strategy, FedAvg)`` still holds) that,
after each ``aggregate_train``, hands FLStore every reply's update and the aggregate; what the
wrapped strategy returns is returned unchanged: FLStore observes, it never steers the aggregate.

One module per concern; every public name is re-exported here, and this package is the import
path users and the rest of the project rely on (``from flstore_core.integrations.flower import
with_flstore``):

- :mod:`~flstore_core.integrations.flower.sinks` — where rounds go: the sink protocols
  (:class:`FLStoreSink`, :class:`InitialModelSink`) and the two sinks, :class:`StoreSink` (the
  object store, with the ingest summaries and, given a :class:`Prefetcher`, warm cache nodes)
  and :class:`RoundWriterSink` (raw update files for the Beam ingestion).
- :mod:`~flstore_core.integrations.flower.run_config` — :func:`flstore_sink`: the sink a Flower
  app's run config and environment describe (the local stack's ``.flstore/local.json`` when
  there is one).
- :mod:`~flstore_core.integrations.flower.replies` — Flower train replies as FLStore updates:
  tensor names, ``num_examples``, metric names (:data:`METRIC_NAMES`), client ids
  (:data:`CLIENT_ID_KEY`).
- :mod:`~flstore_core.integrations.flower.strategy` — :func:`with_flstore` and the mixin it puts
  in front of the strategy's class: round numbering, the initial and global models, optional
  client selection by FLStore.

The integration uses Flower's public API only (``flwr.app``, ``flwr.serverapp``); apps that use it
run as any Flower app does, with ``flwr run`` (``examples/flower-app`` is one). flwr is imported
only inside functions, so this package (and the sinks) import without it.
"""

from flstore_core.integrations.flower.replies import (
    CLIENT_ID_KEY,
    METRIC_NAMES,
    arrays_to_tensors,
    reported_client_id,
    update_from_reply,
    updates_from_replies,
)
from flstore_core.integrations.flower.run_config import flstore_sink
from flstore_core.integrations.flower.sinks import (
    FLStoreSink,
    InitialModelSink,
    Prefetcher,
    RoundWriterSink,
    StoreSink,
)
from flstore_core.integrations.flower.strategy import (
    SELECT_WORKLOADS,
    FLStoreSettings,
    FLStoreStrategy,
    SelectWith,
    with_flstore,
)

__all__ = [
    "CLIENT_ID_KEY",
    "METRIC_NAMES",
    "SELECT_WORKLOADS",
    "FLStoreSettings",
    "FLStoreSink",
    "FLStoreStrategy",
    "InitialModelSink",
    "Prefetcher",
    "RoundWriterSink",
    "SelectWith",
    "StoreSink",
    "arrays_to_tensors",
    "flstore_sink",
    "reported_client_id",
    "update_from_reply",
    "updates_from_replies",
    "with_flstore",
]
