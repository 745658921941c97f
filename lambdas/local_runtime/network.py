"""A network model of AWS's hops, injected where the local stack and the baselines make them.

On one machine every hop is loopback: the gateway forwards to the router over a socket in
microseconds, the router's ``lambda.invoke`` reaches a worker process as fast, S3 is a moto
server and Redis a local process. On AWS each of these is a network hop with a latency and a
bandwidth of its own, and a figure measured on loopback compares two floors that neither
system has in production. :class:`NetworkModel` is the table of those hops — every field a
published figure with its unit, source and date, overridable by a JSON file as the price table
of :mod:`flstore_core.cost` is — and the pacing parts (:class:`Nic`, :class:`S3Link`) are
what the hops call to wait as long as AWS would make them wait:

* the caller is an FL server in the same region for every system. It reaches FLStore through
  API Gateway's public endpoint (``api_gateway_ms``, then the router function's invocation,
  ``lambda_invoke_ms``), and the baselines' aggregator over its VPC (one round trip,
  ``vpc_round_trip_ms``);
* every synchronous Lambda invoke (router → cache node) costs ``lambda_invoke_ms`` and moves its
  payloads at the function's network rate;
* S3 answers after its first-byte latency (``s3_get_ms``, ``s3_put_ms``), then moves the bytes
  at one connection's rate (``s3_connection_mb_s``), and never faster than the client's network
  interface: a Lambda function's (``lambda_burst_*`` then ``lambda_sustained_mib_s``, whatever
  its memory) or the aggregator's EC2 instance's (``ec2_*``);
* a Redis command costs ElastiCache's round trip (``elasticache_get_ms``) and moves its bytes at
  the slower of the two interfaces (``elasticache_*`` and ``ec2_*``).

The delays are added on top of what the local hop costs (its real loopback and CPU time),
so overlap, parallel GETs and retries behave as they would: each connection waits for its
own transfer, and concurrent transfers share the interface that carries them.

**Assumptions, stated.** API Gateway publishes only a p99 (< 10 ms added); the model adds it
to every request, which is pessimistic for FLStore. No AWS figure exists for a synchronous
invoke's round trip; the model takes the warm-start median Wang et al. measured. EC2 instances
burst for "5 to 60 minutes" on credits AWS does not size; the model gives the baselines their
burst rate throughout, which favours them.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MiB = 1024 * 1024
MB = 1_000_000

CHECKED = "2026-12"
APIGW_GA = (
    "AWS, 'Amazon API Gateway HTTP APIs are now generally available' (2020-03-12): "
    "p99 latency overhead under 10 ms"
)
WANG_ATC18 = (
    "Wang et al., 'Peeking Behind the Curtains of Serverless Platforms', USENIX ATC 2018: "
    "median warm-start latency of AWS Lambda"
)
SKYRISE = "Bodner et al., 'Skyrise', arXiv 2501.07771 (us-east-1, 2024)"
S3_GUIDELINES = "AWS, 'Performance design patterns for Amazon S3': 85-90 MB/s per connection"
ELASTICACHE = "AWS ElastiCache for Redis, same-AZ GET: ~0.4 ms p50 (1.3 ms p99)"
ELASTICACHE_NODES = "AWS ElastiCache supported node types, network performance: cache.r6g.large"
EC2_BANDWIDTH = "AWS EC2 network bandwidth, general purpose instances: m5.xlarge"


def _figure(value: float, unit: str, source: str, note: str = "") -> Any:
    """A field of the table: its default, unit, source and the month it was checked."""
    return field(default=value, metadata={"unit": unit, "source": source, "note": note})


@dataclass(frozen=True)
class NetworkModel:
    """Per-hop latency and bandwidth of AWS, us-east-1 (one field per published figure)."""

    api_gateway_ms: float = _figure(10.0, "ms", APIGW_GA, "p99 applied to every request")
    lambda_invoke_ms: float = _figure(
        25.0, "ms", WANG_ATC18, "no AWS figure; every synchronous invoke, API Gateway's too"
    )
    s3_get_ms: float = _figure(27.0, "ms", SKYRISE, "small-object GET, first byte, p50")
    s3_put_ms: float = _figure(40.0, "ms", SKYRISE, "PUT, p50")
    s3_connection_mb_s: float = _figure(87.5, "MB/s", S3_GUIDELINES, "midpoint of 85-90")
    lambda_burst_mib_s: float = _figure(1228.8, "MiB/s", SKYRISE, "~1.2 GiB/s burst, §4.2")
    lambda_burst_mib: float = _figure(300.0, "MiB", SKYRISE, "burst budget, §4.2")
    lambda_sustained_mib_s: float = _figure(
        75.0, "MiB/s", SKYRISE, "after the burst, at any memory size, §4.2"
    )
    ec2_baseline_gbps: float = _figure(1.25, "Gbit/s", EC2_BANDWIDTH, "baseline")
    ec2_burst_gbps: float = _figure(
        10.0, "Gbit/s", EC2_BANDWIDTH, "burst, given throughout (favours the baselines)"
    )
    elasticache_get_ms: float = _figure(0.4, "ms", ELASTICACHE, "round trip per command")
    elasticache_baseline_gbps: float = _figure(0.75, "Gbit/s", ELASTICACHE_NODES, "baseline")
    elasticache_burst_gbps: float = _figure(
        10.0, "Gbit/s", ELASTICACHE_NODES, "burst, given throughout (favours the baselines)"
    )
    vpc_round_trip_ms: float = _figure(
        0.4, "ms", ELASTICACHE, "same-AZ round trip: an ElastiCache GET bounds it from above"
    )
    name: str = "aws"

    def table(self) -> list[dict[str, Any]]:
        """Every figure with its unit and source (what a report prints and a JSON keeps)."""
        rows = []
        for f in dataclasses.fields(self):
            if f.name == "name":
                continue
            rows.append(
                {
                    "field": f.name,
                    "value": getattr(self, f.name),
                    "unit": f.metadata["unit"],
                    "source": f.metadata["source"],
                    "note": f.metadata["note"],
                    "checked": CHECKED,
                }
            )
        return rows

    def to_json(self) -> dict[str, Any]:
        """``{"name": ..., "hops": [table rows]}``: what a benchmark's JSON records."""
        return {"name": self.name, "hops": self.table()}

    @property
    def lambda_nic(self) -> Nic:
        """A fresh interface of one Lambda function instance (its own burst budget)."""
        return Nic(
            self.lambda_sustained_mib_s * MiB,
            burst_rate_bytes_s=self.lambda_burst_mib_s * MiB,
            burst_bytes=self.lambda_burst_mib * MiB,
        )

    @property
    def ec2_nic(self) -> Nic:
        """A fresh interface of the aggregator's EC2 instance (burst rate throughout)."""
        return Nic(self.ec2_burst_gbps * 1e9 / 8)

    @property
    def redis_nic(self) -> Nic:
        """The slower of the aggregator's and the cache node's interfaces, burst throughout."""
        return Nic(min(self.ec2_burst_gbps, self.elasticache_burst_gbps) * 1e9 / 8)

    def s3_link(self, nic: Nic) -> S3Link:
        """S3 as seen from a client behind ``nic``."""
        return S3Link(self, nic)


def load_network(spec: str | Path | dict[str, Any] | None) -> NetworkModel | None:
    """``None``/``"none"``/``"off"``: no model; ``"aws"``: the published table; a JSON file's
    path or a dict: the table with those fields overridden (unknown fields are an error)."""
    if spec is None or spec in ("none", "off", ""):
        return None
    if spec == "aws":
        return NetworkModel()
    if isinstance(spec, dict):
        overrides = spec
    else:
        overrides = json.loads(Path(spec).read_text(encoding="utf-8"))
        if not isinstance(overrides, dict):
            raise ValueError(f"{spec}: a network model file is a JSON object of fields")
    known = {f.name for f in dataclasses.fields(NetworkModel)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown network model fields {unknown}; known: {sorted(known)}")
    for key, value in overrides.items():
        if key != "name" and (not isinstance(value, int | float) or value < 0):
            raise ValueError(f"network model field {key!r} must be a number >= 0, got {value!r}")
    return dataclasses.replace(NetworkModel(), **{"name": "custom", **overrides})


class Nic:
    """A network interface shared by every transfer through it, as a token bucket.

    Bytes move at ``burst_rate_bytes_s`` while the burst budget lasts (``burst_bytes``, refilled
    at the sustained rate) and at ``rate_bytes_s`` after it. Transfers queue in arrival order:
    :meth:`reserve` books one and says when its last byte is through.
    """

    def __init__(
        self,
        rate_bytes_s: float,
        burst_rate_bytes_s: float | None = None,
        burst_bytes: float = 0.0,
    ) -> None:
        if rate_bytes_s <= 0:
            raise ValueError("a network interface needs a positive rate")
        self.rate = rate_bytes_s
        self.burst_rate = max(burst_rate_bytes_s or rate_bytes_s, rate_bytes_s)
        self.burst_bytes = burst_bytes
        self._credit = burst_bytes
        self._free_at = 0.0
        self._last: float | None = None  # when the credit was last brought up to date
        self._lock = threading.Lock()

    def reserve(self, nbytes: int, now: float | None = None) -> float:
        """Book ``nbytes`` through the interface; the monotonic time its last byte is through."""
        with self._lock:
            now = time.monotonic() if now is None else now
            start = max(now, self._free_at)
            if self._last is not None:
                refill = max(0.0, start - self._last) * self.rate
                self._credit = min(self.burst_bytes, self._credit + refill)
            self._last = start
            fast = min(self._credit, float(nbytes))
            self._credit -= fast
            self._free_at = start + fast / self.burst_rate + (nbytes - fast) / self.rate
            return self._free_at


class S3Link:
    """What one S3 request costs a client behind ``nic``: the first-byte latency, then its bytes
    at one connection's rate, never faster than the interface lets them through."""

    def __init__(self, model: NetworkModel, nic: Nic) -> None:
        self.model = model
        self.nic = nic

    def delay_s(self, method: str, nbytes: int, now: float | None = None) -> float:
        """Seconds to wait on top of the local request for a ``method`` moving ``nbytes``."""
        now = time.monotonic() if now is None else now
        first = (self.model.s3_put_ms if method in ("PUT", "POST") else self.model.s3_get_ms) / 1e3
        if nbytes <= 0:
            return first
        own = nbytes / (self.model.s3_connection_mb_s * MB)
        shared = self.nic.reserve(nbytes, now + first) - now
        return max(first + own, shared)

    def wait(self, method: str, nbytes: int) -> None:
        """Sleep for :meth:`delay_s`."""
        time.sleep(self.delay_s(method, nbytes))


def invoke_delay_s(model: NetworkModel, nic: Nic, payload_bytes: int) -> float:
    """A synchronous Lambda invoke's round trip plus its payloads through the caller's
    interface (request and answer; Lambda caps them at 6 MB each)."""
    done = nic.reserve(payload_bytes) - time.monotonic() if payload_bytes > 0 else 0.0
    return model.lambda_invoke_ms / 1e3 + max(0.0, done)


def redis_delay_s(model: NetworkModel, nic: Nic, nbytes: int) -> float:
    """One Redis command: ElastiCache's round trip plus its bytes through ``nic``."""
    done = nic.reserve(nbytes) - time.monotonic() if nbytes > 0 else 0.0
    return model.elasticache_get_ms / 1e3 + max(0.0, done)
