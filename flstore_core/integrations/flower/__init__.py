"""Flower integration: one line turns a Flower strategy into one that feeds FLStore.

``flower.py`` became this package; its code lives in :mod:`.strategy` for now, and every
public name is re-exported here, so ``from flstore_core.integrations.flower import with_flstore``
keeps working.
"""

from flstore_core.integrations.flower.strategy import (
    CLIENT_ID_KEY,
    METRIC_NAMES,
    SELECT_WORKLOADS,
    FLStoreSettings,
    FLStoreSink,
    FLStoreStrategy,
    InitialModelSink,
    InProcessRun,
    RoundWriterSink,
    SelectWith,
    StoreSink,
    arrays_to_tensors,
    reported_client_id,
    run_in_process,
    update_from_reply,
    updates_from_replies,
    with_flstore,
)

__all__ = [
    "CLIENT_ID_KEY",
    "METRIC_NAMES",
    "SELECT_WORKLOADS",
    "FLStoreSettings",
    "FLStoreSink",
    "FLStoreStrategy",
    "InProcessRun",
    "InitialModelSink",
    "RoundWriterSink",
    "SelectWith",
    "StoreSink",
    "arrays_to_tensors",
    "reported_client_id",
    "run_in_process",
    "update_from_reply",
    "updates_from_replies",
    "with_flstore",
]
