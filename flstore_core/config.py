"""Every ``FLSTORE_*`` setting, in one place: its name, default and meaning.

Functions, the router, the pipelines, the baselines and the command line read their settings
here and nowhere else, so a name is spelt once and its default agrees everywhere. Pulumi
(``infra/``) and the local stack set the same names on the functions they start; a test checks
that what they set is declared here. ``--help`` of the command line and the README's table are
generated from :data:`SETTINGS` in spirit: they name these settings, nothing else.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from flstore_core.errors import ValidationError


@dataclass(frozen=True)
class Setting:
    """One environment setting: its variable name, its default (``None``: unset) and meaning."""

    name: str
    default: str | None
    description: str

    def get(self, environ: Mapping[str, str] | None = None) -> str | None:
        """The value in the environment, or the default when unset or empty."""
        value = (os.environ if environ is None else environ).get(self.name, "").strip()
        return value or self.default

    def get_int(self, environ: Mapping[str, str] | None = None) -> int:
        """The value as an integer; a clear error when it is not one."""
        value = self.get(environ)
        try:
            return int(value or "")
        except ValueError:
            raise ValidationError(f"{self.name} must be an integer, got {value!r}") from None

    @property
    def default_int(self) -> int:
        """The default as an integer (for option defaults spelt once, here)."""
        if self.default is None:
            raise ValueError(f"{self.name} has no default")
        return int(self.default)

    def get_list(self, environ: Mapping[str, str] | None = None) -> tuple[str, ...]:
        """The value as a comma-separated list, blanks dropped."""
        return tuple(p.strip() for p in (self.get(environ) or "").split(",") if p.strip())


# ---------------------------------------------------------------------- where the data is

S3_ENDPOINT = Setting(
    "FLSTORE_S3_ENDPOINT", None, "S3 endpoint URL (a moto server locally); unset: AWS"
)
BUCKET = Setting("FLSTORE_BUCKET", "flstore", "the bucket that holds every job")
LAMBDA_ENDPOINT = Setting(
    "FLSTORE_LAMBDA_ENDPOINT", None, "Lambda Invoke API endpoint (the local one); unset: AWS"
)

# ---------------------------------------------------------------------- the cache

PREFIX = Setting("FLSTORE_PREFIX", "flstore", "name prefix of the functions: {prefix}-cache-{i}")
CACHE_NODES = Setting("FLSTORE_CACHE_NODES", "8", "number of cache-node functions")
REPLICATION = Setting("FLSTORE_REPLICATION", "2", "replicas of every shard (R)")
CACHE_MEMORY_MB = Setting("FLSTORE_CACHE_MEMORY_MB", "3008", "memory of a cache-node function")
CACHE_BUDGET_BYTES = Setting(
    "FLSTORE_CACHE_BUDGET_BYTES",
    None,
    "bytes of data a node holds; unset: its memory less its runtime (flstore_core.cache.budget)",
)
HOT_ROUNDS = Setting("FLSTORE_HOT_ROUNDS", "2", "latest rounds of a job kept hot (W)")
NODE_INDEX = Setting("FLSTORE_NODE_INDEX", "-1", "this cache node's index (set per function)")
PREFETCH_MODELS = Setting(
    "FLSTORE_PREFETCH_MODELS", "fedavg", "aggregate models written when a round is prefetched"
)

# ---------------------------------------------------------------------- API, cost, clients

TOKENS = Setting(
    "FLSTORE_TOKENS", None, "JSON object sha256(token) -> granted jobs (router, authorizer)"
)
PRICES_FILE = Setting("FLSTORE_PRICES_FILE", None, "JSON file overriding the price table")
URL = Setting("FLSTORE_URL", None, "API base URL for the command line (default: local stack)")
TOKEN = Setting("FLSTORE_TOKEN", None, "bearer token for the command line")
BUILD_CACHE = Setting(
    "FLSTORE_BUILD_CACHE",
    None,
    "where `pulumi up` caches built zips, image contexts and wheels (default ~/.cache/flstore;"
    " read by infra/, which imports no runtime code)",
)
ARTIFACTS_BUDGET_S = Setting(
    "FLSTORE_ARTIFACTS_BUDGET_S",
    "60",
    "seconds a node spends on a prefetched round's model artifacts; the rest is left to requests",
)
MAX_UPDATE_BYTES = Setting(
    "FLSTORE_MAX_UPDATE_BYTES",
    str(8 * 1024**3),
    "the most tensor bytes one update may declare (the sum over its tensors of shape product x"
    " itemsize), checked from its header before anything is allocated; default 8 GiB, the"
    " codec's cap on a whole file (a default stack, 8 nodes of 3008 MB, holds ~20.7 GiB)",
)
VERBOSE = Setting("FLSTORE_VERBOSE", None, "any value: the command line also logs INFO records")

REQUEST_DEADLINE_S = Setting(
    "FLSTORE_REQUEST_DEADLINE_S",
    "26",
    "seconds a node spends on one workload request before it stops it (503 deadline_exceeded),"
    " and the most the router lets a request's estimate take: API Gateway's 29 s integration"
    " timeout minus 3 s for the router, the invocation and the answer's way back",
)

# ---------------------------------------------------------------------- the local stack's own

LOCAL_ROUTER_CONFIG = Setting(
    "FLSTORE_LOCAL_ROUTER_CONFIG",
    None,
    "local stack only: the router function's settings (a JSON RouterConfig) for its instances",
)
LOCAL_INVOKE_CHANNEL = Setting(
    "FLSTORE_LOCAL_INVOKE_CHANNEL",
    None,
    "local stack only: the Unix socket the router function's instances invoke nodes over",
)

SETTINGS: tuple[Setting, ...] = (
    S3_ENDPOINT,
    BUCKET,
    LAMBDA_ENDPOINT,
    PREFIX,
    CACHE_NODES,
    REPLICATION,
    CACHE_MEMORY_MB,
    CACHE_BUDGET_BYTES,
    HOT_ROUNDS,
    NODE_INDEX,
    PREFETCH_MODELS,
    ARTIFACTS_BUDGET_S,
    MAX_UPDATE_BYTES,
    REQUEST_DEADLINE_S,
    TOKENS,
    PRICES_FILE,
    URL,
    TOKEN,
    VERBOSE,
    BUILD_CACHE,
    LOCAL_ROUTER_CONFIG,
    LOCAL_INVOKE_CHANNEL,
)

# ---------------------------------------------------------------------- AWS's own variables

AWS_REGION = Setting("AWS_DEFAULT_REGION", "us-east-1", "region of every AWS client")
LAMBDA_MEMORY_MB = Setting(
    "AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "3008", "set by Lambda: the function's memory"
)
