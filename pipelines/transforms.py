"""The composite transforms of ingestion, each a labelled step of one sentence:

    ReadRawUpdates | ValidateUpdates | EncodeAndStore | CommitRounds | PrefetchOwners
                                     ╰ StoreModels ──╯  (bases before round summaries)
    … and every step's rejects | WriteDeadLetters

This module is their index (:func:`pipelines.ingest.build_ingest` writes the sentence); each step
lives in the module named after what it does.

* **ReadRawUpdates**, **ValidateUpdates** (:mod:`pipelines.validate`) read only headers: ids
  and metadata, dtypes, truncation, the ``--job`` claim, then group by ``(job, round)`` and
  check that the round's updates agree on tensor names, shapes and dtypes (against the
  committed manifest when the round already has one, else the majority). A mismatched file is
  rejected *before* it is stored, because a commit takes every object under the round's prefix.
* **EncodeAndStore**, **StoreModels** (:mod:`pipelines.store_updates`) read the data, reject
  NaN/Inf, encode with the job's precision and write the canonical object — or skip the PUT
  when the identical object is already there (same size and MD5 ETag; a re-run after a crash)
  or already committed (same sha256).
* **CommitRounds** (:mod:`pipelines.commit`) groups the stored updates by round, takes the
  summaries in two threaded passes over the round's files (their sum ``S``, then ``x_i·S`` and
  ``‖x_i‖²``; see :mod:`flstore_core.workloads.summaries`), and commits the manifest with them.
  The passes re-read the files rather than ship rows or running sums through the runner: a row
  is as large as a model, and Beam's runners move elements of tens of megabytes slowly
  (FnApiRunner's multi-threaded data plane needed 8 s and 3 GB for four 94 MB sums). A
  committed round whose membership did not change keeps its summaries, so a re-run rewrites
  nothing.
* **PrefetchOwners** (:mod:`pipelines.prefetch`) asks the owners of each job's latest
  ``hot_rounds`` rounds (primary and replicas, the router's placement) and of its client and
  meta shards to ``load``.
* **WriteDeadLetters** (:mod:`pipelines.deadletters`) writes every rejected file, with its
  reason, to one JSON-lines object per job and run (:func:`deadletter_key`).

Every step is configured by the run's :class:`IngestConfig` (:mod:`pipelines.ingest_config`)
and counts with :mod:`pipelines.metrics`. Side effects are idempotent: a retried bundle or a
re-run finds its objects in place. Clients (boto3, Beam's S3 IO) are made in ``DoFn.setup``.
"""

from __future__ import annotations

from pipelines.commit import CommitRounds
from pipelines.deadletters import WriteDeadLetters, deadletter_key
from pipelines.ingest_config import IngestConfig
from pipelines.metrics import COMMITTED_PREFIX, DEADLETTER_PREFIX
from pipelines.prefetch import PrefetchOwners
from pipelines.store_updates import EncodeAndStore, StoreModels
from pipelines.validate import ReadRawUpdates, ValidateUpdates

__all__ = [
    "COMMITTED_PREFIX",
    "DEADLETTER_PREFIX",
    "CommitRounds",
    "EncodeAndStore",
    "IngestConfig",
    "PrefetchOwners",
    "ReadRawUpdates",
    "StoreModels",
    "ValidateUpdates",
    "WriteDeadLetters",
    "deadletter_key",
]
