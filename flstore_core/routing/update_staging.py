"""Eager warming: a round's owners read each update as it lands, before the round's commit.

On AWS the bucket notifies the router function of every object created under ``jobs/`` whose
key ends ``.safetensors.zst`` (a second filter beside the manifests', which it does not overlap:
S3 refuses two configurations whose prefixes and suffixes both overlap, and neither suffix ends
the other); locally the stack's S3 front sends the same records
(:mod:`lambdas.local_runtime.s3_notifications`). :class:`UpdateStager` turns the records of
update keys ``jobs/{job}/rounds/{round:08d}/updates/{client}.safetensors.zst`` into ``stage``
ops (:class:`~flstore_core.protocol.StageOp`) on the owners the round will have; the nodes hold
the decoded rows (:mod:`flstore_core.cache.staging`) and the commit's warming
(:mod:`flstore_core.routing.commit_warming`) then reads only what was not staged.

**Owners before the commit.** The round's layout is not known before its manifest, so the
stager follows the job's last committed round before it (the round the updates' tensors are
taken from): when that round is served whole, the updates go to the owners of the whole round
shard ``round_shard(job, round)`` — its ``replication`` nodes by rendezvous hashing, exactly
the nodes the commit's prefetch loads it on when it is served whole too. When that round needed
column blocks, or the job has no committed round yet (no tensors to decode in), nothing is
staged and the round is warmed at the commit as before. A commit whose layout differs (it needs
blocks) re-plans: the nodes drop the staged rows when the blocks are loaded.

**Never in the commit's way.** A node runs one invocation at a time, so each owner's stagings
go one after another, and before each the manifest is looked up (one HEAD): once the round is
committed the rest are not sent, and the commit's ``load`` reads them. A staging that fails, a
record that is lost or refused, costs only speed; nothing here raises for an update.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote_plus

from flstore_core.data import layout
from flstore_core.errors import FLStoreError, ValidationError
from flstore_core.ids import validate_client, validate_job
from flstore_core.protocol import StageOp
from flstore_core.routing.invoker import NodeFailure, NodeThrottled
from flstore_core.routing.placement import place_shard, round_shard

if TYPE_CHECKING:
    from flstore_core.routing.router import Router

log = logging.getLogger(__name__)

# seconds an owner's staging waits out a busy node before it gives up (the commit reads it)
THROTTLE_WAIT_S = 30.0
THROTTLE_RETRY_S = 0.05


@dataclass(frozen=True, order=True)
class LandedUpdate:
    """One record of a notification: ``client``'s update of ``round`` of ``job`` was written."""

    job: str
    round: int
    client: str
    etag: str = ""


def parse_update_key(key: str) -> tuple[str, int, str] | None:
    """``(job, round, client)`` of an update key, ``None`` for any other key (a global model,
    a validation set); a key under ``updates/`` that is not canonical is a
    :class:`ValidationError`."""
    parts = key.split("/")
    if len(parts) != 6 or parts[0] != "jobs" or parts[2] != "rounds" or parts[4] != "updates":
        return None
    if not parts[5].endswith(layout.UPDATE_SUFFIX) or len(parts[3]) != 8 or not parts[3].isdigit():
        raise ValidationError(f"{key!r} is not a canonical update key")
    job, round_ = validate_job(parts[1]), int(parts[3])
    client = validate_client(parts[5].removesuffix(layout.UPDATE_SUFFIX))
    if layout.update_key(job, round_, client) != key:
        raise ValidationError(f"{key!r} is not a canonical update key")
    return job, round_, client


def landed_updates(event: Mapping[str, Any], bucket: str) -> list[LandedUpdate]:
    """The updates an S3 event's records name, in order; other keys are skipped and a
    malformed record is logged, never raised."""
    out: list[LandedUpdate] = []
    for index, record in enumerate(event.get("Records") or []):
        try:
            if not str(record.get("eventName", "")).startswith("ObjectCreated:"):
                continue
            s3 = record["s3"]
            if s3["bucket"]["name"] != bucket:
                raise ValidationError(f"bucket {s3['bucket']['name']!r} is not {bucket!r}")
            parsed = parse_update_key(unquote_plus(str(s3["object"]["key"])))
        except (FLStoreError, KeyError, TypeError, AttributeError, ValueError) as exc:
            log.warning("update staging: refused record %d: %s", index, exc)
            continue
        if parsed is not None:
            out.append(LandedUpdate(*parsed, etag=str(s3["object"].get("eTag", ""))))
    return sorted(out)


class UpdateStager:
    """Sends each landed update to the owners its round will have (module docstring)."""

    def __init__(self, router: Router) -> None:
        self.router = router

    def handle(self, event: Mapping[str, Any]) -> dict[str, Any]:
        """Stage the updates ``event`` names; a report by outcome (``job/round/client``)."""
        return self.stage(landed_updates(event, self.router.store.bucket))

    def stage(self, updates: list[LandedUpdate]) -> dict[str, Any]:
        """Stage ``updates`` on their rounds' owners, each owner's one after another."""
        report: dict[str, Any] = {"staged": [], "skipped": {}, "failed": {}}
        by_owner: dict[int, list[StageOp]] = {}
        for update in updates:
            name = f"{update.job}/{update.round}/{update.client}"
            try:
                plan = self.owners(update.job, update.round)
            except FLStoreError as exc:
                report["skipped"][name] = exc.message
                continue
            if isinstance(plan, str):
                report["skipped"][name] = plan
                continue
            owners, tensors_round = plan
            op = StageOp(update.job, update.round, update.client, tensors_round, update.etag)
            for index in owners:
                by_owner.setdefault(index, []).append(op)
        for outcomes in self.router.scatter.pool.map(
            lambda item: self._stage_on(*item), sorted(by_owner.items())
        ):
            for name, outcome in outcomes:
                if outcome == "staged":
                    report["staged"].append(name)
                elif outcome.startswith("failed"):
                    report["failed"][name] = outcome
                else:
                    report["skipped"][name] = outcome
        return report

    def owners(self, job: str, round_: int) -> tuple[list[int], int] | str:
        """The nodes ``round_``'s updates are staged on and the committed round whose tensors
        they are decoded in, or why they are not staged."""
        committed = self.router.manifests.rounds(job)
        if round_ in committed:
            return "committed: the commit's warming loads it"
        before = [r for r in committed if r < round_]
        if not before:
            return "no committed round before it: warmed at the commit"
        if self.router.plan_round(job, before[-1]).sharded:
            return f"round {before[-1]} is served in blocks: warmed at the commit"
        config = self.router.config
        return place_shard(round_shard(job, round_), config.nodes, config.replication), before[-1]

    def _stage_on(self, index: int, ops: list[StageOp]) -> list[tuple[str, str]]:
        """Send ``ops`` to node ``index`` one after another, stopping once their round is
        committed; ``(node/job/round/client, outcome)`` for each."""
        function = self.router.scatter.function(index)
        out: list[tuple[str, str]] = []
        for op in ops:
            name = f"{function}:{op.job}/{op.round}/{op.client}"
            if self.router.store.stat(layout.manifest_key(op.job, op.round)) is not None:
                out.append((name, "committed: the commit's load reads it"))
                continue
            out.append((name, self._invoke(function, op)))
        return out

    def _invoke(self, function: str, op: StageOp) -> str:
        """One ``stage`` invocation, waiting out a busy node; its outcome in a word."""
        deadline = time.monotonic() + THROTTLE_WAIT_S
        while True:
            try:
                answer = self.router.scatter.invoker.invoke(function, op.to_event()).payload
                break
            except NodeThrottled as exc:
                if time.monotonic() > deadline:
                    return f"failed: {exc}"
                time.sleep(THROTTLE_RETRY_S)
            except NodeFailure as exc:
                return f"failed: {exc}"
        if "error" in answer:
            return f"failed: {answer['error'].get('message', answer['error'])}"
        if "staged" in answer:
            return "staged"
        if "failed" in answer:
            return f"failed: {answer.get('reason', '')}"
        return next(iter(answer), "unknown")
