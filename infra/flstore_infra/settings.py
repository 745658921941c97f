"""Stack config (namespace ``flstore``): read once, checked before any resource is declared.

| key | default | meaning |
|---|---|---|
| ``cacheNodes`` | 8 | N cache-node functions ``{prefix}-cache-{i}`` |
| ``cacheMemoryMb`` | 3008 | memory of each cache node; what its runtime leaves is the budget |
| ``cacheBudgetMb`` | unset | MB of data per node, ``< cacheMemoryMb``; unset: memory − 352 MB |
| ``cacheTimeoutSeconds`` | 120 | timeout of a cache-node invocation |
| ``replication`` | 2 | R, replicas of each shard (``1 <= R <= N``) |
| ``hotRounds`` | 2 | W, latest rounds kept hot |
| ``keepWarmMinutes`` | 5 | ping period of every cache node; 0 turns the schedule off |
| ``prefix`` | ``flstore`` | prefix of every function, bucket and log group name |
| ``routerMemoryMb`` | 512 | memory of the router |
| ``routerTimeoutSeconds`` | 29 | router timeout (API Gateway gives up after 30 s) |
| ``architecture`` | ``x86_64`` | ``x86_64`` or ``arm64``, for every function and the image |
| ``kmsKeyArn`` | unset | customer-managed KMS key for the bucket (SSE-S3 when unset) |
| ``tokenHashes`` | ``{}`` | secret: JSON ``{sha256-hex of a token: [job, ...] or ["*"]}`` |
| ``logRetentionDays`` | 14 | retention of every log group |
| ``resultsExpireDays`` | 7 | age at which objects tagged ``flstore:kind=result`` expire |
| ``noncurrentVersionDays`` | 30 | age at which overwritten/deleted object versions expire |
| ``throttleRateLimit`` | 50 | API stage steady-state requests per second |
| ``throttleBurstLimit`` | 100 | API stage burst |
| ``forceDestroy`` | false | let ``pulumi destroy`` delete a non-empty bucket and image repository |

plus ``aws:region``. The 352 MB a node keeps back are its runtime with torch loaded (288 MB)
and one request's working memory (64 MB), as ``flstore_core.cache.budget`` measured them.
``artifactDir`` is no longer read: the program builds what it deploys
(``packaging``), in a cache on the deployer's machine rather than in the stack's config.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import pulumi

NAMESPACE = "flstore"

# CloudWatch Logs accepts only these retention periods.
LOG_RETENTION_DAYS = frozenset(
    {1, 3, 5, 7, 14, 30, 60, 90, 120, 150, 180, 365, 400, 545, 731, 1096, 1827, 2192, 2557}
    | {2922, 3288, 3653}
)
ARCHITECTURES = ("x86_64", "arm64")
# The prefix names S3 buckets too, so it obeys the stricter S3 rules (lowercase, no `_`).
_PREFIX = re.compile(r"^[a-z](?:[a-z0-9-]{0,22}[a-z0-9])?$")
_KMS_KEY_ARN = re.compile(r"^arn:aws[a-z-]*:kms:[a-z0-9-]+:\d{12}:key/[A-Za-z0-9-]+$")
_TOKEN_HASH = re.compile(r"^[0-9a-f]{64}$")
_JOB = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
# A cache node's budget is what its memory leaves once its runtime (Python, numpy, boto3,
# scikit-learn, torch) and one request's working memory are resident: the figures of
# flstore_core.cache.budget (RUNTIME_MB["torch"], WORKING_MB, MIN_BUDGET_MB), measured by
# benchmarks/node_runtime.py. Mirrored, not imported: nothing here imports the runtime code;
# tests/infra checks that both derive the same budget.
NODE_RUNTIME_MB = 288
NODE_WORKING_MB = 64
MIN_CACHE_BUDGET_MB = 16


class ConfigError(ValueError):
    """A stack config value FLStore cannot deploy; the message names the key and the fix."""


def parse_token_hashes(raw: str | None) -> Mapping[str, tuple[str, ...]]:
    """Parse ``flstore:tokenHashes``: a JSON object from sha256-hex to granted jobs.

    Only hashes belong in the config (``flstore token new`` prints one); a value that is
    not 64 lowercase hex digits is refused, as it is probably a raw token.
    """
    if raw is None or not raw.strip():
        return MappingProxyType({})
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"flstore:tokenHashes is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError("flstore:tokenHashes must be a JSON object {sha256-hex: [jobs]}")
    grants: dict[str, tuple[str, ...]] = {}
    for digest, jobs in data.items():
        if not _TOKEN_HASH.match(digest):
            raise ConfigError(
                "flstore:tokenHashes keys must be sha256 hex digests of tokens, never the "
                "tokens themselves; hash one with `flstore token new`"
            )
        if not isinstance(jobs, list) or not jobs:
            raise ConfigError(f"flstore:tokenHashes[{digest[:8]}…] must be a non-empty list")
        for job in jobs:
            if job != "*" and not (isinstance(job, str) and _JOB.match(job)):
                raise ConfigError(
                    f"flstore:tokenHashes[{digest[:8]}…] grants {job!r}, "
                    "which is neither a job id nor '*'"
                )
        grants[digest] = tuple(jobs)
    return MappingProxyType(grants)


@dataclass(frozen=True)
class StackSettings:
    """Everything the program needs from the stack config, validated on construction."""

    prefix: str = "flstore"
    cache_nodes: int = 8
    cache_memory_mb: int = 3008
    cache_budget_mb: int | None = None
    cache_timeout_s: int = 120
    replication: int = 2
    hot_rounds: int = 2
    keep_warm_minutes: int = 5
    router_memory_mb: int = 512
    router_timeout_s: int = 29
    architecture: str = "x86_64"
    kms_key_arn: str | None = None
    token_hashes: Mapping[str, tuple[str, ...]] = field(
        default_factory=lambda: MappingProxyType({}), repr=False
    )
    log_retention_days: int = 14
    results_expire_days: int = 7
    noncurrent_version_days: int = 30
    throttle_rate_limit: float = 50.0
    throttle_burst_limit: int = 100
    force_destroy: bool = False
    region: str | None = None

    def __post_init__(self) -> None:
        problems = list(self._problems())
        if problems:
            raise ConfigError("invalid stack config: " + "; ".join(problems))

    def _problems(self) -> list[str]:
        out = []
        if not _PREFIX.match(self.prefix) or self.prefix.startswith("xn--"):
            out.append(
                f"flstore:prefix {self.prefix!r} must be 1-24 lowercase letters, digits or '-', "
                "starting with a letter and not ending with '-'"
            )
        if not 1 <= self.cache_nodes <= 100:
            out.append(f"flstore:cacheNodes must be 1..100, not {self.cache_nodes}")
        if not 1 <= self.replication <= max(self.cache_nodes, 1):
            out.append(
                f"flstore:replication must be 1..cacheNodes ({self.cache_nodes}), "
                f"not {self.replication}"
            )
        if self.hot_rounds < 1:
            out.append(f"flstore:hotRounds must be >= 1, not {self.hot_rounds}")
        if not 0 <= self.keep_warm_minutes <= 1440:
            out.append(
                f"flstore:keepWarmMinutes must be 0 (off) .. 1440, not {self.keep_warm_minutes}"
            )
        memory = {"cacheMemoryMb": self.cache_memory_mb, "routerMemoryMb": self.router_memory_mb}
        for key, mb in memory.items():
            if not 128 <= mb <= 10240:
                out.append(f"flstore:{key} must be 128..10240 (Lambda's range), not {mb}")
        if (
            self.cache_budget_mb is not None
            and not 1 <= self.cache_budget_mb < self.cache_memory_mb
        ):
            out.append(
                f"flstore:cacheBudgetMb must be 1..cacheMemoryMb - 1 ({self.cache_memory_mb - 1}): "
                f"the rest holds the node's runtime; not {self.cache_budget_mb}"
            )
        if not 1 <= self.cache_timeout_s <= 900:
            out.append(f"flstore:cacheTimeoutSeconds must be 1..900, not {self.cache_timeout_s}")
        if not 1 <= self.router_timeout_s <= 30:
            out.append(
                "flstore:routerTimeoutSeconds must be 1..30 (API Gateway's integration limit), "
                f"not {self.router_timeout_s}"
            )
        if self.architecture not in ARCHITECTURES:
            out.append(f"flstore:architecture must be one of {ARCHITECTURES}")
        if self.kms_key_arn is not None and not _KMS_KEY_ARN.match(self.kms_key_arn):
            out.append(
                "flstore:kmsKeyArn must be a KMS key ARN (arn:aws:kms:REGION:ACCOUNT:key/ID); "
                "aliases cannot be scoped in IAM"
            )
        if self.log_retention_days not in LOG_RETENTION_DAYS:
            out.append(
                f"flstore:logRetentionDays must be one of {sorted(LOG_RETENTION_DAYS)}, "
                f"not {self.log_retention_days}"
            )
        if self.results_expire_days < 1 or self.noncurrent_version_days < 1:
            out.append("flstore:resultsExpireDays and noncurrentVersionDays must be >= 1")
        if self.throttle_rate_limit <= 0 or self.throttle_burst_limit <= 0:
            out.append("flstore:throttleRateLimit and throttleBurstLimit must be > 0")
        return out

    # Names shared with the runtime code (ARCHITECTURE §3).
    @property
    def cache_function_names(self) -> list[str]:
        return [f"{self.prefix}-cache-{i}" for i in range(self.cache_nodes)]

    @property
    def router_function_name(self) -> str:
        return f"{self.prefix}-router"

    @property
    def authorizer_function_name(self) -> str:
        return f"{self.prefix}-authorizer"

    @property
    def cache_budget_bytes(self) -> int:
        """Bytes of data every cache node holds, and the router plans column blocks with."""
        if self.cache_budget_mb is not None:
            return self.cache_budget_mb * 2**20
        free = self.cache_memory_mb - NODE_RUNTIME_MB - NODE_WORKING_MB
        return max(free, MIN_CACHE_BUDGET_MB) * 2**20

    def tokens_json(self) -> str:
        """``FLSTORE_TOKENS`` as the router and authorizer read it."""
        return json.dumps({k: list(v) for k, v in sorted(self.token_hashes.items())})


def load_settings(config: pulumi.Config | None = None) -> StackSettings:
    """Read the ``flstore`` namespace (and ``aws:region``) of the current stack."""
    cfg = config or pulumi.Config(NAMESPACE)
    defaults = StackSettings()
    if cfg.get("artifactDir") is not None:
        pulumi.log.warn(
            f"{NAMESPACE}:artifactDir is no longer read: `pulumi up` builds what it deploys "
            f"(see README, 'Deploy to AWS'); `pulumi config rm {NAMESPACE}:artifactDir`"
        )
    tokens_key = f"{NAMESPACE}:tokenHashes"
    raw_tokens = cfg.get("tokenHashes")
    if raw_tokens and not pulumi.runtime.is_config_secret(tokens_key):
        pulumi.log.warn(
            f"{tokens_key} is stored in plain text; set it with `pulumi config set --secret`"
        )
    return StackSettings(
        prefix=cfg.get("prefix") or defaults.prefix,
        cache_nodes=cfg.get_int("cacheNodes", defaults.cache_nodes),
        cache_memory_mb=cfg.get_int("cacheMemoryMb", defaults.cache_memory_mb),
        cache_budget_mb=cfg.get_int("cacheBudgetMb"),
        cache_timeout_s=cfg.get_int("cacheTimeoutSeconds", defaults.cache_timeout_s),
        replication=cfg.get_int("replication", defaults.replication),
        hot_rounds=cfg.get_int("hotRounds", defaults.hot_rounds),
        keep_warm_minutes=cfg.get_int("keepWarmMinutes", defaults.keep_warm_minutes),
        router_memory_mb=cfg.get_int("routerMemoryMb", defaults.router_memory_mb),
        router_timeout_s=cfg.get_int("routerTimeoutSeconds", defaults.router_timeout_s),
        architecture=cfg.get("architecture") or defaults.architecture,
        kms_key_arn=cfg.get("kmsKeyArn") or None,
        token_hashes=parse_token_hashes(raw_tokens),
        log_retention_days=cfg.get_int("logRetentionDays", defaults.log_retention_days),
        results_expire_days=cfg.get_int("resultsExpireDays", defaults.results_expire_days),
        noncurrent_version_days=cfg.get_int(
            "noncurrentVersionDays", defaults.noncurrent_version_days
        ),
        throttle_rate_limit=cfg.get_float("throttleRateLimit", defaults.throttle_rate_limit),
        throttle_burst_limit=cfg.get_int("throttleBurstLimit", defaults.throttle_burst_limit),
        force_destroy=cfg.get_bool("forceDestroy", defaults.force_destroy),
        region=pulumi.Config("aws").get("region"),
    )
