"""Answers of workloads already run on one version of a shard: an identical request is
answered from the node's memory.

A :class:`ResultMemo` belongs to one shard *object* — a job's
:class:`~flstore_core.cache.shards.JobMeta` or its
:class:`~flstore_core.cache.shards.GlobalModels` — and lives exactly as long as it: a node
replaces a meta shard by a new object whenever it refreshes it (a newly committed round, a
rewritten manifest, a prefetch's ``load``, its ``REFRESH_S`` age), so the answers kept are
those of the data the node would compute from, never older. The model shard's answers are
keyed by the round of the global model they used (a stored global model is never rewritten).

Keys are the SHA-256 of the workload name, the request that decides the answer (its
validated params, with defaults filled in, and the clients or rounds it spans) and the version
of the job's spec and validation set the shard was read with
(:mod:`flstore_core.cache.spec_versions`: a forced change of the job's model or validation set
is a new key, even on a shard read before the change) in canonical JSON, so a request with an
input batch keys by its digest, not by a copy of the batch. Only
deterministic workloads are kept — every catalogue workload is: the randomised ones take a
``seed`` param, which is part of the key. Answers are kept as returned and must not be
mutated by their readers (the node serialises them, nothing else touches them).
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable
from typing import Any

import cachetools

# answers kept per shard (least recently used dropped): each is a JSON object a response can
# carry inline (a node offloads a larger one to S3 and keeps the pointer:
# flstore_core.storage.results.offload_if_large) ...
MEMO_ANSWERS = 64
# ... and at most this many bytes of them, as compact JSON: a reputation series over 2,000
# rounds × 100 clients is ~5 MB of JSON, ~30 MB as Python objects, and 64 of them would not fit
# a node of 512 MB (each answer counts at least MEMO_BYTES / MEMO_ANSWERS, so the count holds)
MEMO_BYTES = 8 * 1024 * 1024


def json_size(answer: dict[str, Any]) -> int:
    """An answer's size as compact JSON (what a response carries), roughly."""
    return len(json.dumps(answer, separators=(",", ":"), default=str))


class ResultMemo:
    """Answers by request digest, for one version of one shard."""

    def __init__(self, capacity: int = MEMO_ANSWERS, max_bytes: int = MEMO_BYTES) -> None:
        floor = max(1, max_bytes // capacity)
        # (answer, its JSON size); each counts at least ``floor`` against ``max_bytes``
        self._answers: cachetools.LRUCache[str, tuple[dict[str, Any], int]] = cachetools.LRUCache(
            max_bytes, getsizeof=lambda kept: max(kept[1], floor)
        )
        self._lock = threading.Lock()

    @staticmethod
    def key(workload: str, request: dict[str, Any], version: str = "") -> str:
        """The digest of a workload, the request that decides its answer and the version of
        the job's spec and validation set it runs with (``""``: a shard without a job context,
        as in the unit tests of the memo itself)."""
        text = json.dumps([workload, request, version], sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    def answer(
        self, key: str, compute: Callable[[], dict[str, Any]]
    ) -> tuple[dict[str, Any], bool]:
        """``(answer, reused)``: the kept answer for ``key``, else ``compute()`` kept (unless
        larger than the memo) and returned. An exception of ``compute`` keeps nothing."""
        with self._lock:
            kept = self._answers.get(key)
        if kept is not None:
            return kept[0], True
        value = compute()
        size = json_size(value)
        with self._lock:
            if size <= self._answers.maxsize:
                self._answers[key] = (value, size)
        return value, False

    def nbytes(self) -> int:
        """The kept answers' size as compact JSON (what a response carries), roughly."""
        with self._lock:
            return sum(size for _, size in self._answers.values())

    def __len__(self) -> int:
        with self._lock:
            return len(self._answers)
