"""Cost per request of FLStore and of the two aggregator baselines (ARCHITECTURE §8).

All prices are published AWS on-demand prices for us-east-1 (US East, N. Virginia), kept in one
table — the fields of :class:`Prices`, each with its unit, its source page and the month it was
checked — and overridable by a JSON file (``FLSTORE_PRICES_FILE``) or a dict
(:func:`load_prices`). Free tiers, Savings Plans and reserved capacity are ignored: the figures
are what a request costs at list price.

How each system is charged, following the published FLStore evaluation:

- **FLStore** pays per use: every Lambda invocation a request made (billed duration rounded up
  to 1 ms × configured memory in GB, plus the per-request fee), the API Gateway HTTP API
  request(s), and the S3 GETs/PUTs of cold misses and stored results
  (:func:`flstore_request_cost`).
- **Baselines** run on always-on servers, charged as the request's duration × the servers'
  hourly price (:func:`server_request_cost`), and, as a second view, the hourly price spread
  over a stated request rate (:func:`amortised_server_cost`). ``objstore-agg`` is one EC2
  aggregator plus its S3 GETs (:func:`objstore_agg_cost`); ``cache-agg`` is the aggregator plus
  one ElastiCache node (:func:`cache_agg_cost`).

Sources (checked 2026-11):

- AWS Lambda pricing: https://aws.amazon.com/lambda/pricing/
- Amazon API Gateway pricing: https://aws.amazon.com/api-gateway/pricing/
- Amazon S3 pricing: https://aws.amazon.com/s3/pricing/
- Amazon EC2 On-Demand pricing: https://aws.amazon.com/ec2/pricing/on-demand/
- Amazon ElastiCache pricing: https://aws.amazon.com/elasticache/pricing/
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from flstore_core import config
from flstore_core.errors import ValidationError

PRICES_FILE_ENV = config.PRICES_FILE.name
PRICES_CHECKED = "2026-11"

LAMBDA_PRICING_URL = "https://aws.amazon.com/lambda/pricing/"
API_GATEWAY_PRICING_URL = "https://aws.amazon.com/api-gateway/pricing/"
S3_PRICING_URL = "https://aws.amazon.com/s3/pricing/"
EC2_PRICING_URL = "https://aws.amazon.com/ec2/pricing/on-demand/"
ELASTICACHE_PRICING_URL = "https://aws.amazon.com/elasticache/pricing/"
PAPER_ARTIFACT_SOURCE = "FLStore paper artifact (handlers: total_time * cost_per_hour / 3600)"

MS_PER_HOUR = 3_600_000.0
HOURS_PER_MONTH = 30 * 24  # a 30-day month, as the keep-warm estimate states
MINUTES_PER_MONTH = HOURS_PER_MONTH * 60

Architecture = Literal["x86_64", "arm64"]


def _price(value: float | str, unit: str, source: str, note: str = "") -> Any:
    """A field of the price table: its default, unit, source page and date checked."""
    meta = {"unit": unit, "source": source, "checked": PRICES_CHECKED, "note": note}
    return field(default=value, metadata=meta)


def _label(value: str, source: str, note: str = "") -> Any:
    return _price(value, "", source, note)


@dataclass(frozen=True)
class Prices:
    """Published on-demand prices, us-east-1, checked 2026-11 (one field per price).

    Parameters
    ----------
    lambda_gb_second_x86 : float, default 0.0000166667
        Lambda duration, USD per GB-second, x86_64 (first 6 billion GB-s a month).
    lambda_gb_second_arm : float, default 0.0000133334
        Lambda duration, USD per GB-second, arm64 (first 7.5 billion GB-s a month).
    lambda_requests_per_million : float, default 0.20
        Lambda requests, USD per 1M invocations.
    api_gateway_http_per_million : float, default 1.00
        API Gateway HTTP API, USD per 1M requests (first 300M a month; metered in 512 KB
        increments of request size).
    s3_get_per_thousand : float, default 0.0004
        S3 Standard GET/SELECT and all other requests, USD per 1,000.
    s3_put_per_thousand : float, default 0.005
        S3 Standard PUT/COPY/POST/LIST, USD per 1,000.
    ec2_aggregator_hourly : float, default 0.192
        The baseline aggregator's instance, USD per hour (m5.xlarge, Linux).
    ec2_aggregator_instance : str, default "m5.xlarge"
        Its instance type: 4 vCPUs for parallel S3 GETs and zstd decoding, 16 GiB so that a
        10 × 11.7M-float32 round (468 MB decoded; about 2 GB at peak with the compressed
        frames, the stacked ``(n, d)`` matrix and workload temporaries) fits several times over.
    elasticache_node_hourly : float, default 0.206
        The ``cache-agg`` baseline's cache node, USD per hour (cache.r6g.large, Redis OSS).
    elasticache_node_type : str, default "cache.r6g.large"
        Its node type: 13.07 GiB of memory, the smallest current-generation memory-optimised
        node that holds the W = 2 hot rounds of that workload with room to spare.
    paper_aggregator_hourly : float, default 0.922
        The published FLStore artifact's rate for the baselines' servers, USD per hour: its
        handlers charge ``total_time * cost_per_hour / 3600`` (``cost_usd_paper``).
    paper_function_hourly : float, default 0.11988
        The same artifact's rate for FLStore's functions, USD per hour.
    region : str, default "us-east-1"
        Region the prices are for (a label; change it with the prices).
    """

    lambda_gb_second_x86: float = _price(0.0000166667, "USD per GB-s", LAMBDA_PRICING_URL)
    lambda_gb_second_arm: float = _price(0.0000133334, "USD per GB-s", LAMBDA_PRICING_URL)
    lambda_requests_per_million: float = _price(0.20, "USD per 1M requests", LAMBDA_PRICING_URL)
    api_gateway_http_per_million: float = _price(
        1.00, "USD per 1M requests", API_GATEWAY_PRICING_URL, "HTTP API, first 300M a month"
    )
    s3_get_per_thousand: float = _price(0.0004, "USD per 1,000 requests", S3_PRICING_URL)
    s3_put_per_thousand: float = _price(0.005, "USD per 1,000 requests", S3_PRICING_URL)
    ec2_aggregator_hourly: float = _price(
        0.192, "USD per hour", EC2_PRICING_URL, "m5.xlarge, Linux"
    )
    ec2_aggregator_instance: str = _label("m5.xlarge", EC2_PRICING_URL)
    elasticache_node_hourly: float = _price(
        0.206, "USD per hour", ELASTICACHE_PRICING_URL, "cache.r6g.large, Redis OSS"
    )
    elasticache_node_type: str = _label("cache.r6g.large", ELASTICACHE_PRICING_URL)
    paper_aggregator_hourly: float = _price(
        0.922, "USD per hour", PAPER_ARTIFACT_SOURCE, "the aggregator baselines' servers"
    )
    paper_function_hourly: float = _price(
        0.11988, "USD per hour", PAPER_ARTIFACT_SOURCE, "FLStore's functions"
    )
    region: str = _label("us-east-1", "")

    def lambda_gb_second(self, architecture: Architecture = "x86_64") -> float:
        """USD per GB-second of Lambda duration on ``architecture``."""
        if architecture == "arm64":
            return self.lambda_gb_second_arm
        if architecture == "x86_64":
            return self.lambda_gb_second_x86
        raise ValidationError(f"unknown Lambda architecture {architecture!r}: x86_64 or arm64")

    def table(self) -> list[dict[str, object]]:
        """The price table as rows ``{name, value, unit, source, checked, note}``."""
        return [
            {"name": f.name, "value": getattr(self, f.name), **f.metadata}
            for f in dataclasses.fields(self)
        ]


DEFAULT_PRICES = Prices()


def _check_override(name: str, value: object) -> object:
    fields = {f.name: f for f in dataclasses.fields(Prices)}
    if name not in fields:
        raise ValidationError(
            f"unknown price {name!r}: known prices are {', '.join(sorted(fields))}"
        )
    if fields[name].type in ("str", str):
        if not isinstance(value, str) or not value:
            raise ValidationError(f"price {name!r} must be a non-empty string, got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValidationError(f"price {name!r} must be a finite number, got {value!r}")
    if value < 0:
        raise ValidationError(f"price {name!r} must be >= 0, got {value!r}")
    return float(value)


def load_prices(
    overrides: Mapping[str, object] | None = None, path: str | os.PathLike[str] | None = None
) -> Prices:
    """The default prices, updated by a JSON file and then by ``overrides``.

    The file is ``path`` if given, else the one named by ``FLSTORE_PRICES_FILE`` if set; it
    holds a JSON object of field names of :class:`Prices` to values. Unknown names, non-numbers
    and negative prices raise :class:`ValidationError`.
    """
    merged: dict[str, object] = {}
    file = path if path is not None else config.PRICES_FILE.get()
    if file is not None:
        try:
            with open(file, encoding="utf-8") as fh:
                data = json.load(fh)
        except FileNotFoundError:
            raise ValidationError(f"prices file {os.fspath(file)!r} does not exist") from None
        except (OSError, ValueError) as exc:
            raise ValidationError(f"cannot read prices file {os.fspath(file)!r}: {exc}") from exc
        if not isinstance(data, dict):
            raise ValidationError(f"prices file {os.fspath(file)!r} must hold a JSON object")
        merged.update(data)
    merged.update(overrides or {})
    checked = {name: _check_override(name, value) for name, value in merged.items()}
    return dataclasses.replace(DEFAULT_PRICES, **checked)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Invocation:
    """One Lambda invocation a request made: the function, its billed duration and memory.

    ``billed_ms`` may be the measured duration; Lambda bills it rounded up to the next 1 ms.
    """

    function: str
    billed_ms: float
    memory_mb: int
    architecture: Architecture = "x86_64"

    def __post_init__(self) -> None:
        ms = self.billed_ms
        if isinstance(ms, bool) or not isinstance(ms, int | float) or not math.isfinite(ms):
            raise ValidationError(f"billed_ms of {self.function!r} must be a number, got {ms!r}")
        if ms < 0:
            raise ValidationError(f"billed_ms of {self.function!r} must be >= 0, got {ms!r}")
        mem = self.memory_mb
        if isinstance(mem, bool) or not isinstance(mem, int) or mem <= 0:
            raise ValidationError(
                f"memory_mb of {self.function!r} must be a positive integer, got {mem!r}"
            )

    @property
    def gb_seconds(self) -> float:
        """Billed GB-seconds: ceil(duration to 1 ms) / 1000 × memory_mb / 1024."""
        return math.ceil(self.billed_ms) / 1000.0 * (self.memory_mb / 1024.0)


@dataclass(frozen=True)
class CostBreakdown:
    """Cost of one FLStore request in USD, by AWS service."""

    lambda_compute: float
    lambda_requests: float
    api_gateway: float
    s3: float
    total: float

    def to_dict(self) -> dict[str, float]:
        """The breakdown as a JSON-ready dict."""
        return dataclasses.asdict(self)


def _count(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValidationError(f"{name} must be a non-negative integer, got {value!r}")
    return value


def flstore_request_cost(
    invocations: Sequence[Invocation],
    s3_gets: int = 0,
    s3_puts: int = 0,
    api_requests: int = 1,
    prices: Prices = DEFAULT_PRICES,
) -> CostBreakdown:
    """Per-request cost of FLStore: its Lambda invocations, API requests and S3 requests.

    Lambda compute is Σ ceil(ms) / 1000 × memory_mb / 1024 × the GB-second price of each
    invocation's architecture, plus the per-request fee for each invocation (AWS Lambda
    pricing, https://aws.amazon.com/lambda/pricing/). ``api_requests`` counts API Gateway HTTP
    API requests (a request over 512 KB counts once per 512 KB), ``s3_gets`` the GETs of cold
    misses and ``s3_puts`` the results written to S3.
    """
    _count("api_requests", api_requests)
    compute = sum(inv.gb_seconds * prices.lambda_gb_second(inv.architecture) for inv in invocations)
    requests = len(invocations) * prices.lambda_requests_per_million / 1e6
    api = api_requests * prices.api_gateway_http_per_million / 1e6
    s3 = s3_requests_cost(s3_gets, s3_puts, prices)
    return CostBreakdown(compute, requests, api, s3, total=compute + requests + api + s3)


def server_request_cost(duration_ms: float, hourly_usd: float) -> float:
    """Cost of a request on always-on servers: its duration × their hourly price.

    ``duration_ms / 3.6e6 × hourly_usd`` — how the published FLStore evaluation charges the
    aggregator baselines (the server is paid for while it serves the request).
    """
    if not math.isfinite(duration_ms) or duration_ms < 0:
        raise ValidationError(f"duration_ms must be >= 0, got {duration_ms!r}")
    if not math.isfinite(hourly_usd) or hourly_usd < 0:
        raise ValidationError(f"hourly_usd must be >= 0, got {hourly_usd!r}")
    return duration_ms / MS_PER_HOUR * hourly_usd


def amortised_server_cost(hourly_usd: float, requests_per_hour: float) -> float:
    """Cost of a request on always-on servers at a stated load: hourly price / request rate.

    This counts the idle time an always-on server is paid for too, so it is the fairer figure at
    low request rates and converges to :func:`server_request_cost` at full utilisation.
    """
    if not math.isfinite(hourly_usd) or hourly_usd < 0:
        raise ValidationError(f"hourly_usd must be >= 0, got {hourly_usd!r}")
    if not math.isfinite(requests_per_hour) or requests_per_hour <= 0:
        raise ValidationError(f"requests_per_hour must be > 0, got {requests_per_hour!r}")
    return hourly_usd / requests_per_hour


def objstore_agg_cost(duration_ms: float, s3_gets: int, prices: Prices = DEFAULT_PRICES) -> float:
    """Per-request cost of ``objstore-agg``: the EC2 aggregator's time plus its S3 GETs."""
    _count("s3_gets", s3_gets)
    server = server_request_cost(duration_ms, prices.ec2_aggregator_hourly)
    return server + s3_gets * prices.s3_get_per_thousand / 1e3


def cache_agg_cost(duration_ms: float, prices: Prices = DEFAULT_PRICES) -> float:
    """Per-request cost of ``cache-agg``: the EC2 aggregator's and the ElastiCache node's time."""
    hourly = prices.ec2_aggregator_hourly + prices.elasticache_node_hourly
    return server_request_cost(duration_ms, hourly)


def idle_monthly_cost(
    cache_nodes: int,
    memory_mb: int,
    keep_warm_minutes: int,
    ping_ms: float = 2.0,
    prices: Prices = DEFAULT_PRICES,
    architecture: Architecture = "x86_64",
) -> float:
    """USD per 30-day month of the keep-warm pings of a deployed stack with no traffic.

    Each of ``cache_nodes`` functions of ``memory_mb`` is invoked once every
    ``keep_warm_minutes`` for ``ping_ms`` (billed rounded up to 1 ms): Lambda requests plus
    GB-seconds (https://aws.amazon.com/lambda/pricing/). The schedule itself, S3 storage and
    logs are not included.
    """
    _count("cache_nodes", cache_nodes)
    if isinstance(keep_warm_minutes, bool) or not isinstance(keep_warm_minutes, int):
        raise ValidationError(f"keep_warm_minutes must be an integer, got {keep_warm_minutes!r}")
    if keep_warm_minutes <= 0:
        raise ValidationError(f"keep_warm_minutes must be > 0, got {keep_warm_minutes!r}")
    pings = cache_nodes * (MINUTES_PER_MONTH / keep_warm_minutes)
    ping = Invocation("keep-warm", ping_ms, memory_mb, architecture)
    per_ping = ping.gb_seconds * prices.lambda_gb_second(architecture) + (
        prices.lambda_requests_per_million / 1e6
    )
    return pings * per_ping


# ---------------------------------------------------------------------- amortised accounting
#
# The published FLStore evaluation compares systems at a stated load: one request per workload
# per round, one round a minute. These functions turn measured requests into cost per request
# under that load (``cost_usd``, the always-on servers' price spread over the requests they
# serve) and under the duration-only view (``cost_usd_duration``, the servers paid only while
# they serve a request: the figure most favourable to the baselines). benchmarks/paper.py uses
# them; each is a plain formula over the price table, tested in tests/test_cost.py.

ROUTER_MEMORY_MB = 512  # infra's routerMemoryMb default: the router function's memory


@dataclass(frozen=True)
class RequestLoad:
    """The load the amortised costs are stated at.

    ``requests_per_round`` requests (one per workload) every round, ``rounds_per_minute`` rounds a
    minute: ``requests_per_hour = requests_per_round × rounds_per_minute × 60``.
    """

    requests_per_round: int
    rounds_per_minute: float = 1.0

    def __post_init__(self) -> None:
        n = self.requests_per_round
        if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            raise ValidationError(f"requests_per_round must be a positive integer, got {n!r}")
        rate = self.rounds_per_minute
        if isinstance(rate, bool) or not isinstance(rate, int | float):
            raise ValidationError(f"rounds_per_minute must be a number, got {rate!r}")
        if not math.isfinite(rate) or rate <= 0:
            raise ValidationError(f"rounds_per_minute must be > 0, got {rate!r}")

    @property
    def requests_per_hour(self) -> float:
        """``requests_per_round × rounds_per_minute × 60``."""
        return self.requests_per_round * self.rounds_per_minute * 60.0

    @property
    def rounds_per_month(self) -> float:
        """``rounds_per_minute × MINUTES_PER_MONTH`` (a 30-day month)."""
        return self.rounds_per_minute * MINUTES_PER_MONTH


def s3_requests_cost(s3_gets: int = 0, s3_puts: int = 0, prices: Prices = DEFAULT_PRICES) -> float:
    """``s3_gets × GET price + s3_puts × PUT price`` (S3 Standard, per request)."""
    _count("s3_gets", s3_gets)
    _count("s3_puts", s3_puts)
    return s3_gets * prices.s3_get_per_thousand / 1e3 + s3_puts * prices.s3_put_per_thousand / 1e3


def aggregator_hourly(system: str, prices: Prices = DEFAULT_PRICES) -> float:
    """The always-on servers' hourly price of a baseline: ``objstore-agg`` is the EC2 aggregator,
    ``cache-agg`` the aggregator plus the ElastiCache node."""
    if system == "objstore-agg":
        return prices.ec2_aggregator_hourly
    if system == "cache-agg":
        return prices.ec2_aggregator_hourly + prices.elasticache_node_hourly
    raise ValidationError(f"unknown baseline {system!r}: objstore-agg or cache-agg")


def aggregator_amortised_cost(
    system: str,
    load: RequestLoad,
    s3_gets: int = 0,
    s3_puts: int = 0,
    prices: Prices = DEFAULT_PRICES,
) -> float:
    """``cost_usd`` of one baseline request at ``load``:
    ``hourly(system) / load.requests_per_hour + s3_gets × GET + s3_puts × PUT``.

    The servers are paid every hour whether busy or not, so each request carries its share of
    the hour at the stated rate (:func:`amortised_server_cost`), plus the S3 requests it made
    (the round's GETs for ``objstore-agg``; the PUT of a model result it writes, for both).
    """
    server = amortised_server_cost(aggregator_hourly(system, prices), load.requests_per_hour)
    return server + s3_requests_cost(s3_gets, s3_puts, prices)


def aggregator_duration_cost(
    system: str,
    duration_ms: float,
    s3_gets: int = 0,
    s3_puts: int = 0,
    prices: Prices = DEFAULT_PRICES,
) -> float:
    """``cost_usd_duration`` of one baseline request:
    ``duration_ms / 3.6e6 × hourly(system) + s3_gets × GET + s3_puts × PUT``.

    The servers are charged only while they serve the request (:func:`server_request_cost`):
    idle hours are free, the view most favourable to the baselines.
    """
    server = server_request_cost(duration_ms, aggregator_hourly(system, prices))
    return server + s3_requests_cost(s3_gets, s3_puts, prices)


def invocations_cost(invocations: Sequence[Invocation], prices: Prices = DEFAULT_PRICES) -> float:
    """Lambda charges of some invocations: ``Σ ceil(ms)/1000 × memory_mb/1024 × GB-s price``
    plus the per-invocation fee for each (no API Gateway, no S3)."""
    return flstore_request_cost(invocations, api_requests=0, prices=prices).total


def router_invocation(duration_ms: float, memory_mb: int = ROUTER_MEMORY_MB) -> Invocation:
    """The router function's own invocation for a request that took ``duration_ms`` in it, at
    its memory (``routerMemoryMb``, default 512): on AWS the router is a Lambda function too."""
    return Invocation("router", duration_ms, memory_mb)


API_GATEWAY_METERED_BYTES = 512 * 1024  # HTTP API requests are metered in 512 KB increments


def answer_cost(
    node_invocations: Sequence[Invocation],
    router: Invocation,
    s3_gets: int = 0,
    s3_puts: int = 0,
    request_bytes: int = 0,
    prices: Prices = DEFAULT_PRICES,
) -> dict[str, float]:
    """What one answer's ``meta.cost_breakdown`` bills, in USD: ``nodes`` (the cache-node
    invocations' Lambda charges), ``router`` (the router function's own invocation), ``api_gateway``
    (one HTTP API request per started 512 KB of the request body) and ``s3`` (the GETs of cold
    misses and the PUTs of results written). ``meta.cost_usd`` is their sum."""
    _count("request_bytes", request_bytes)
    api_requests = max(1, math.ceil(request_bytes / API_GATEWAY_METERED_BYTES))
    return {
        "nodes": invocations_cost(node_invocations, prices),
        "router": invocations_cost([router], prices),
        "api_gateway": api_requests * prices.api_gateway_http_per_million / 1e6,
        "s3": s3_requests_cost(s3_gets, s3_puts, prices),
    }


def round_work_cost(
    invocations: Sequence[Invocation],
    s3_gets: int = 0,
    s3_puts: int = 0,
    prices: Prices = DEFAULT_PRICES,
) -> float:
    """FLStore's per-round work outside requests — ingestion's prefetch: the cache nodes'
    ``load`` invocations (loading the round, computing its shared artifacts, writing its default
    models) — ``invocations_cost(invocations) + s3_gets × GET + s3_puts × PUT``."""
    return invocations_cost(invocations, prices) + s3_requests_cost(s3_gets, s3_puts, prices)


def flstore_overhead_per_request(
    round_work_usd: float, idle_monthly_usd: float, load: RequestLoad
) -> float:
    """FLStore's cost outside requests, per request at ``load``:
    ``(round_work_usd + idle_monthly_usd / load.rounds_per_month) / load.requests_per_round``.

    Each round's prefetch and artifact work, and the keep-warm pings of the month
    (:func:`idle_monthly_cost`) spread over its rounds, are shared by the round's requests.
    """
    for name, value in (("round_work_usd", round_work_usd), ("idle_monthly_usd", idle_monthly_usd)):
        if not math.isfinite(value) or value < 0:
            raise ValidationError(f"{name} must be >= 0, got {value!r}")
    per_round = round_work_usd + idle_monthly_usd / load.rounds_per_month
    return per_round / load.requests_per_round


def flstore_amortised_cost(request_usd: float, overhead_per_request_usd: float) -> float:
    """``cost_usd`` of one FLStore request: ``request_usd + overhead_per_request_usd`` — what the
    answer's ``meta.cost_usd`` bills (node invocations, the router's own invocation, API
    Gateway, S3) and the request's share of the round's prefetch and the idle keep-warm cost
    (:func:`flstore_overhead_per_request`)."""
    for name, value in (("request_usd", request_usd), ("overhead", overhead_per_request_usd)):
        if not math.isfinite(value) or value < 0:
            raise ValidationError(f"{name} must be >= 0, got {value!r}")
    return request_usd + overhead_per_request_usd


def paper_artifact_cost(system: str, latency_ms: float, prices: Prices = DEFAULT_PRICES) -> float:
    """``cost_usd_paper`` of one request, the published artifact's method: the request's wall
    time × a fixed hourly rate — ``paper_function_hourly`` for FLStore (``flstore…`` systems),
    ``paper_aggregator_hourly`` for either baseline — with no fees, no idle time, no prefetch."""
    if system in ("objstore-agg", "cache-agg"):
        return server_request_cost(latency_ms, prices.paper_aggregator_hourly)
    if not system.startswith("flstore"):
        raise ValidationError(f"unknown system {system!r}: flstore…, objstore-agg or cache-agg")
    return server_request_cost(latency_ms, prices.paper_function_hourly)


def reduction(system_value: float, baseline_value: float) -> float:
    """``1 − system_value / baseline_value``: the share of the baseline's latency or cost saved
    (negative when the system is worse)."""
    if not math.isfinite(baseline_value) or baseline_value <= 0:
        raise ValidationError(f"a baseline value must be > 0, got {baseline_value!r}")
    return 1.0 - system_value / baseline_value


def reduction_summary(pairs: Sequence[tuple[float, float]]) -> dict[str, float]:
    """``{"avg", "peak"}`` of :func:`reduction` over ``(system, baseline)`` pairs: the mean over
    the pairs (workloads) and the largest."""
    if not pairs:
        raise ValidationError("no (system, baseline) pairs to summarise")
    values = [reduction(s, b) for s, b in pairs]
    return {"avg": sum(values) / len(values), "peak": max(values)}


# ---------------------------------------------------------------------- cost against request rate
#
# Which system is cheaper depends on the rate: FLStore pays per request plus each round's work,
# the baselines' servers are paid by the hour however few requests they serve.


@dataclass(frozen=True)
class SweepInputs:
    """What a request costs at any rate: FLStore's measured marginal cost of a request (its
    answers' mean ``meta.cost_usd``), its work per round (prefetch) and keep-warm cost per hour;
    each baseline's per-request S3 cost (its servers' hourly price comes from the prices)."""

    flstore_request_usd: float
    round_work_usd: float
    idle_hourly_usd: float
    baseline_s3_usd: Mapping[str, float]


def sweep_point(
    inputs: SweepInputs,
    requests_per_round: float,
    rounds_per_hour: float,
    prices: Prices = DEFAULT_PRICES,
) -> dict[str, float]:
    """Dollars per request at one rate: FLStore's ``request + round_work / requests_per_round +
    idle_hourly / requests_per_hour``; each baseline's ``hourly / requests_per_hour + s3``."""
    if not requests_per_round > 0 or not rounds_per_hour > 0:
        raise ValidationError("requests_per_round and rounds_per_hour must be > 0")
    rate = requests_per_round * rounds_per_hour
    flstore = inputs.flstore_request_usd + inputs.round_work_usd / requests_per_round
    point = {
        "requests_per_round": requests_per_round,
        "rounds_per_hour": rounds_per_hour,
        "requests_per_hour": rate,
        "flstore_usd": flstore + inputs.idle_hourly_usd / rate,
    }
    for system, key in (("objstore-agg", "objstore_usd"), ("cache-agg", "cache_usd")):
        hourly = aggregator_hourly(system, prices)
        point[key] = hourly / rate + inputs.baseline_s3_usd.get(system, 0.0)
    return point


def crossover_rate(
    inputs: SweepInputs, system: str, requests_per_round: float, prices: Prices = DEFAULT_PRICES
) -> float | None:
    """Requests per hour above which FLStore stops being cheaper than baseline ``system``, at a
    fixed ``requests_per_round`` (closed form of :func:`sweep_point`'s two lines).

    FLStore costs ``A + c / R`` a request at ``R`` requests an hour (``A`` its request and its
    share of a round's work, ``c`` its keep-warm per hour), the baseline ``s + H / R``: equal at
    ``R = (H − c) / (A − s)``. None when FLStore is cheaper at every rate (``A <= s``); 0.0 when
    it is cheaper at no low rate (``H <= c``).
    """
    a = inputs.flstore_request_usd + inputs.round_work_usd / requests_per_round
    s = inputs.baseline_s3_usd.get(system, 0.0)
    h, c = aggregator_hourly(system, prices), inputs.idle_hourly_usd
    if h <= c:
        return 0.0
    if a <= s:
        return None
    return (h - c) / (a - s)
