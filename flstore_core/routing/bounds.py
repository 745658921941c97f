"""Every request's work is bounded before it starts: the router's check of a round workload's
estimate against one node's memory and the API's deadline (ARCHITECTURE §3).

A workload's params can ask for more than any node holds or any caller waits for (FedDebug on
10,000 inputs of a 30-client digits round took 40 s and ran both nodes it was sent to out of
memory). A workload declares what its params imply
(:mod:`flstore_core.workloads.estimates`); before any node is invoked, :class:`RequestBounds`
computes it for the round's shape and refuses with a 400 ``over_limit`` naming the limit and
the estimate when the piece one node runs cannot fit. A workload whose cost the planner already
bounded (:func:`~flstore_core.workloads.estimates.cheap`) costs no look-up here.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from flstore_core.cache.budget import RUNTIME_MB
from flstore_core.cache.shards import ManifestReader
from flstore_core.data.blocks import footprint
from flstore_core.errors import NotFoundError, OverLimitError
from flstore_core.storage.object_store import ObjectStore
from flstore_core.workloads import Workload
from flstore_core.workloads.estimates import RoundShape, cheap

MiB = 1024 * 1024
SPEC_TTL_S = 60.0  # a job's declared model is read again after this long


class RequestBounds:
    """Refuses a round workload whose estimate exceeds a node's working memory or the deadline.

    Parameters
    ----------
    store : ObjectStore
        Where the job specs are (the job's model).
    manifests : ManifestReader
        The router's manifests (the round's clients and tensors).
    node_memory_mb : int
        A cache node's memory; what a request may use of it is that less the torch runtime and
        the round it runs on (the node holds the round while the workload runs).
    deadline_s : float
        The seconds a node gives one request (``FLSTORE_REQUEST_DEADLINE_S``).
    manifest_age_s : float
        How stale a manifest may be (the router's, so a late client is counted as it plans).
    """

    def __init__(
        self,
        store: ObjectStore,
        manifests: ManifestReader,
        node_memory_mb: int,
        deadline_s: float,
        manifest_age_s: float,
    ) -> None:
        self.store = store
        self.manifests = manifests
        self.node_memory_mb = node_memory_mb
        self.deadline_s = deadline_s
        self.manifest_age_s = manifest_age_s
        self._lock = threading.Lock()
        self._models: dict[str, tuple[float, str | None]] = {}

    def check(
        self, workload: Workload, job: str, round_: int | None, params: dict[str, Any]
    ) -> None:
        """400 ``over_limit`` when ``workload`` with ``params`` cannot run on one node of the
        stack within the deadline; an uncommitted round is left to its node's 404."""
        if workload.estimate is cheap or round_ is None:
            return
        try:
            manifest = self.manifests.current(job, round_, self.manifest_age_s)
        except NotFoundError:
            return
        shape = RoundShape(len(manifest.updates), manifest.tensors, self._model(job))
        estimate = workload.estimate(params, shape)
        held = footprint(shape.clients, shape.params)
        room = (self.node_memory_mb - RUNTIME_MB["torch"]) * MiB - held
        if estimate.bytes > room:
            raise OverLimitError(
                f"{workload.name} with these params needs an estimated "
                f"{estimate.bytes / MiB:,.0f} MiB of working memory on one node, over the "
                f"{max(room, 0) / MiB:,.0f} MiB a {self.node_memory_mb} MB node has beside its "
                f"runtime and this round of {shape.clients} clients: ask for less work"
            )
        if estimate.seconds > self.deadline_s:
            raise OverLimitError(
                f"{workload.name} with these params needs an estimated {estimate.seconds:,.1f} s "
                f"on a round of {shape.clients} clients, over the request deadline of "
                f"{self.deadline_s:g} s: ask for less work"
            )

    def _model(self, job: str) -> str | None:
        """The job's declared model, from its spec (kept :data:`SPEC_TTL_S`)."""
        now = time.monotonic()
        with self._lock:
            known = self._models.get(job)
        if known is not None and now - known[0] < SPEC_TTL_S:
            return known[1]
        model = self.store.get_job_spec(job).model
        with self._lock:
            self._models[job] = (now, model)
        return model
