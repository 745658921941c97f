"""The bucket's event notifications, emulated: a front of the local S3 that tells the router
function of every manifest and update written.

On AWS the data bucket notifies the router function of every object created under ``jobs/``
whose key ends ``manifest.json`` (``infra/flstore_infra/notifications.py``), so a round is warmed
whoever commits it (:mod:`flstore_core.routing.commit_warming`). Locally, :class:`S3Notifications`
is an HTTP front of the stack's S3 — a transparent
:class:`~lambdas.local_runtime.fault_proxy.FaultProxy` whose observer sees every answered
request — that, after a successful PutObject, CopyObject or CompleteMultipartUpload of such a
key in the stack's bucket, sends the S3 event (the record format S3 sends Lambda) to the router
function. Writers that reach S3 through it (the Flower app in another process, the CLI's
ingest, the SDK: the ``s3_endpoint`` of ``.flstore/local.json``) trigger warming without
holding a router or any Lambda permission.

Updates (keys under ``jobs/`` ending ``.safetensors.zst``, the second notification) are sent the
same way from a queue of their own, so that the router stages them on their round's owners
before the commit (:mod:`flstore_core.routing.update_staging`) and a manifest's event never
waits behind them.

Delivery is asynchronous, as S3's is: the writer's PUT is answered at once, and one background
thread invokes the function with the events in the order the writes were answered. Records that
queue up while an event is being delivered go out together in the next event (at most
``max_records``); the handler orders them by job and round. A delivery that fails is retried
``attempts - 1`` more times after ``retry_s``, doubling (Lambda's asynchronous invocation
retries a failed event twice, after a minute and two); then it is dropped, logged and counted.
"""

from __future__ import annotations

import itertools
import json
import logging
import re
import threading
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs, quote_plus, unquote, urlsplit

from lambdas.local_runtime.fault_proxy import FaultProxy, Forwarded
from lambdas.local_runtime.invoke_errors import InvokeApiError
from lambdas.local_runtime.lambda_endpoint import LocalLambda

log = logging.getLogger(__name__)

#: The notification's filter, as the Pulumi program declares it.
KEY_PREFIX = "jobs/"
KEY_SUFFIX = "manifest.json"
#: the second filter's suffix: updates (and global models, validation sets, which the router
#: skips), for staging before the commit (:mod:`flstore_core.routing.update_staging`)
UPDATE_SUFFIX = ".safetensors.zst"
#: Query parameters of a PUT that is not the creation of an object (a part, tags, an ACL…).
NOT_A_CREATION = {"uploadId", "partNumber", "tagging", "acl", "retention", "legal-hold"}
THROTTLE_RETRY_S = 0.05
_ETAG = re.compile(rb"<ETag>\s*(?:&quot;|\")?([^<\"&]+)")

Deliver = Callable[[bytes], None]


def created_object(answered: Forwarded) -> tuple[str, str, str, str] | None:
    """``(event name, bucket, key, etag)`` of a request that created an object (path-style
    addressing, as the local stack's clients use), ``None`` for any other request."""
    if not 200 <= answered.status < 300:
        return None
    parts = urlsplit(answered.path)
    query = parse_qs(parts.query, keep_blank_values=True)
    bucket, _, raw_key = parts.path.lstrip("/").partition("/")
    if not bucket or not raw_key:
        return None
    headers = {k.lower(): v for k, v in answered.headers.items()}
    if answered.method == "PUT" and not NOT_A_CREATION & set(query):
        name = "ObjectCreated:Copy" if "x-amz-copy-source" in headers else "ObjectCreated:Put"
    elif answered.method == "POST" and "uploadId" in query and b"<Error>" not in answered.body:
        name = "ObjectCreated:CompleteMultipartUpload"  # S3 may answer its error with a 200
    else:
        return None
    etag = {k.lower(): v for k, v in answered.response_headers.items()}.get("etag", "")
    if not etag and (match := _ETAG.search(answered.body)):  # Copy, Complete: in the body
        etag = match.group(1).decode()
    return name, bucket, unquote(raw_key), etag.strip('"')


def s3_record(
    name: str, bucket: str, key: str, etag: str, sequencer: int, region: str
) -> dict[str, Any]:
    """One record of an S3 event notification to Lambda (event version 2.1), key URL-encoded
    as S3 sends it."""
    when = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return {
        "eventVersion": "2.1",
        "eventSource": "aws:s3",
        "awsRegion": region,
        "eventTime": when,
        "eventName": name,
        "s3": {
            "s3SchemaVersion": "1.0",
            "configurationId": "flstore-commit-warming",
            "bucket": {"name": bucket, "arn": f"arn:aws:s3:::{bucket}"},
            "object": {
                "key": quote_plus(key, safe="/"),
                "eTag": etag,
                "sequencer": f"{sequencer:016X}",
            },
        },
    }


def function_delivery(endpoint: LocalLambda, function: str) -> Deliver:
    """Deliver an event to ``function`` on the local Lambda endpoint: a synchronous invoke
    that waits out throttles (Lambda's queue holds a throttled event) and raises when the
    function fails, so the event is retried."""

    def deliver(payload: bytes) -> None:
        while True:
            try:
                result = endpoint.invoke(function, payload)
                break
            except InvokeApiError as exc:
                if exc.status != 429:
                    raise
                time.sleep(THROTTLE_RETRY_S)
        if result.function_error:
            raise RuntimeError(f"{function} failed: {result.payload[:300]!r}")

    return deliver


class DeliveryQueue:
    """Records delivered as events, in order, by one background thread, each event retried
    (the module docstring's delivery); ``name`` prefixes its thread's name."""

    def __init__(
        self, name: str, deliver: Deliver, attempts: int, retry_s: float, max_records: int
    ) -> None:
        self.deliver = deliver
        self.attempts = attempts
        self.retry_s = retry_s
        self.max_records = max_records
        self._queue: list[dict[str, Any]] = []
        self._busy = False
        self._stopping = False
        self._changed = threading.Condition()
        self._counts: Counter[str] = Counter()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """An event being delivered finishes, the queued ones are dropped."""
        with self._changed:
            self._stopping = True
            self._changed.notify_all()
        self._thread.join(timeout=30)

    def put(self, record: dict[str, Any]) -> None:
        with self._changed:
            self._queue.append(record)
            self._counts["records"] += 1
            self._changed.notify_all()

    def counts(self) -> dict[str, int]:
        with self._changed:
            return dict(self._counts)

    def wait_idle(self, deadline: float) -> bool:
        """Wait until the queue is delivered (or dropped) or ``deadline`` (monotonic) passes."""
        with self._changed:
            while self._queue or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._changed.wait(left)
        return True

    def _run(self) -> None:
        while True:
            with self._changed:
                while not self._queue and not self._stopping:
                    self._changed.wait()
                if self._stopping:
                    return
                records = self._queue[: self.max_records]
                del self._queue[: self.max_records]
                self._busy = True
            try:
                self._deliver({"Records": records})
            finally:
                with self._changed:
                    self._busy = False
                    self._changed.notify_all()

    def _deliver(self, event: dict[str, Any]) -> None:
        """Deliver one event, retrying a failure; log and count it when every attempt failed."""
        payload = json.dumps(event).encode()
        wait_s = self.retry_s
        for attempt in range(1, self.attempts + 1):
            try:
                self.deliver(payload)
            except Exception as exc:
                if attempt == self.attempts or self._stopping:
                    log.warning("S3 event of %d record(s) dropped: %s", len(event["Records"]), exc)
                    self._count("dropped")
                    return
                self._count("retries")
                time.sleep(wait_s)
                wait_s *= 2
                continue
            self._count("delivered")
            return

    def _count(self, what: str) -> None:
        with self._changed:
            self._counts[what] += 1


class S3Notifications:
    """``S3Notifications(upstream, bucket, deliver).start()``: ``.url`` is S3 that notifies.

    Parameters
    ----------
    upstream : str
        The S3 endpoint requests are forwarded to.
    bucket : str
        The bucket whose writes are notified (the notification is the bucket's).
    deliver : callable
        Sends one event (its JSON bytes) to the function; raises when it failed.
    attempts, retry_s : int, float
        Deliveries of an event before it is dropped, and the first wait between them.
    max_records : int
        Most records in one event.
    updates : bool
        Whether update writes are notified (the second filter), or manifests only.
    """

    def __init__(
        self,
        upstream: str,
        bucket: str,
        deliver: Deliver,
        *,
        attempts: int = 3,
        retry_s: float = 0.5,
        max_records: int = 10,
        region: str = "us-east-1",
        updates: bool = True,
    ) -> None:
        self.bucket = bucket
        self.region = region
        self.notify_updates = updates
        self.proxy = FaultProxy(upstream, observer=self.observe)
        self._sequencer = itertools.count(1)
        # manifests and updates are two notifications, delivered apart as S3 delivers events
        # concurrently: a commit never waits in a queue behind its round's updates' stagings
        self.commits = DeliveryQueue("s3-notifications", deliver, attempts, retry_s, max_records)
        self.updates = DeliveryQueue(
            "s3-update-notifications", deliver, attempts, retry_s, max_records
        )

    @property
    def url(self) -> str:
        """The notifying S3 endpoint."""
        return self.proxy.url

    def start(self) -> S3Notifications:
        self.proxy.start()
        self.commits.start()
        self.updates.start()
        return self

    def stop(self) -> None:
        """Stop serving S3; an event being delivered finishes, the queued ones are dropped."""
        self.proxy.stop()
        self.commits.stop()
        self.updates.stop()

    def counts(self) -> dict[str, int]:
        """Manifest records queued, events delivered, retries and events dropped; the same of
        update records, each prefixed ``update_``."""
        updates = {f"update_{k}": v for k, v in self.updates.counts().items()}
        return {**self.commits.counts(), **updates}

    def wait_idle(self, timeout_s: float) -> bool:
        """Wait until every queued record was delivered (or dropped); whether it was in time."""
        deadline = time.monotonic() + timeout_s
        return self.updates.wait_idle(deadline) and self.commits.wait_idle(deadline)

    def observe(self, answered: Forwarded) -> None:
        """The proxy's observer: queue the record of a manifest or update created in the
        bucket."""
        created = created_object(answered)
        if created is None:
            return
        name, bucket, key, etag = created
        if bucket != self.bucket or not key.startswith(KEY_PREFIX):
            return
        if key.endswith(KEY_SUFFIX):
            queue = self.commits
        elif key.endswith(UPDATE_SUFFIX) and self.notify_updates:
            queue = self.updates
        else:
            return
        queue.put(s3_record(name, bucket, key, etag, next(self._sequencer), self.region))
