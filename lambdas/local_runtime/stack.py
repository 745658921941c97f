"""The whole of FLStore on one machine: local S3, cache-node functions, router and gateway.

:class:`LocalStack` is what ``flstore local up``, the demo, the tests and the benchmarks start:
a moto S3 server (or any S3 endpoint), a local Lambda endpoint serving ``{prefix}-cache-{i}``
(one OS process per warm instance, as on AWS), the router wired to that endpoint through boto3,
and the local API Gateway in front of the router, running the Lambda authorizer first. It
writes ``.flstore/local.json`` (ARCHITECTURE §6) when given a working directory.
"""

from __future__ import annotations

import json
import os
import queue
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flstore_core import config
from flstore_core.aws import lambda_client
from flstore_core.cache.budget import MiB, stack_budget
from flstore_core.errors import ValidationError
from flstore_core.routing.auth import TokenTable, new_token
from flstore_core.routing.invoker import NodeInvoker
from flstore_core.routing.placement import node_name
from flstore_core.routing.router import Router, RouterConfig
from flstore_core.storage.object_store import ObjectStore
from lambdas.authorizer import decide
from lambdas.local_runtime.gateway import AUTHORIZER_CACHE_TTL_S, LocalGateway
from lambdas.local_runtime.in_process import InProcessTransport, serve_in_process
from lambdas.local_runtime.lambda_endpoint import FunctionSpec, LocalLambda
from lambdas.local_runtime.s3_server import LocalS3
from lambdas.router import build_app, handle

REPO_ROOT = Path(__file__).resolve().parents[2]
STATE_FILE = Path(".flstore") / "local.json"


@dataclass
class StackConfig:
    """Knobs of a local stack (the local counterparts of the Pulumi stack config)."""

    nodes: int = 4
    replication: int = 2
    hot_rounds: int = 2
    memory_mb: int = 3008
    # bytes of data each node holds; None: what memory_mb leaves once the node's runtime is
    # loaded (flstore_core.cache.budget.stack_budget). Set small in tests, so that the runtime
    # fits beside a round several times the budget
    budget_bytes: int | None = None
    # the router serves every round in at least this many column blocks (RouterConfig)
    min_blocks: int | None = None
    prefix: str = "flstore"
    bucket: str = "flstore-local"
    idle_timeout_s: float = 900.0
    timeout_s: float = 300.0
    concurrency: int = 1  # one warm instance per node: its memory is the cache
    s3_endpoint: str | None = None  # reuse a running S3 instead of starting moto
    tokens: dict[str, list[str]] = field(default_factory=dict)  # extra tokens -> granted jobs
    # how long the gateway caches the authorizer's answers (authorizerResultTtlInSeconds)
    authorizer_ttl_s: float = AUTHORIZER_CACHE_TTL_S
    # the router's boto3 lambda.invoke reaches the local endpoint in this process, without the
    # loopback socket (lambdas.local_runtime.in_process); False sends it over HTTP
    in_process_invoke: bool = True

    def __post_init__(self) -> None:
        if self.budget_bytes is not None and not 0 < self.budget_bytes < self.memory_mb * MiB:
            raise ValidationError(
                f"a cache budget of {self.budget_bytes} bytes does not fit a node of "
                f"{self.memory_mb} MB: give a positive budget below the node's memory (the "
                f"rest holds its runtime), or none for the default "
                f"({stack_budget(self.memory_mb) // MiB} MB)"
            )

    @property
    def node_budget(self) -> int:
        """Bytes of data every node holds and the router plans blocks with: one figure for
        both, so a block the router sends a node always fits."""
        return self.budget_bytes or stack_budget(self.memory_mb)


class LocalStack:
    """Start with ``with LocalStack() as stack:``; ``stack.gateway_url`` and ``stack.token``."""

    def __init__(self, config: StackConfig | None = None, workdir: str | Path | None = None):
        self.config = config or StackConfig()
        self.workdir = Path(workdir) if workdir is not None else None
        self.token = new_token()
        self._s3: LocalS3 | None = None
        self.s3_endpoint = ""
        self.lam: LocalLambda | None = None
        self.gateway: LocalGateway | None = None
        self.router: Router | None = None
        self.store: ObjectStore | None = None
        # what answers the router's lambda.invoke in this process (None: over HTTP)
        self.node_transport: InProcessTransport | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> LocalStack:
        cfg = self.config
        if cfg.s3_endpoint:
            self.s3_endpoint = cfg.s3_endpoint
        else:
            self._s3 = LocalS3().start()
            self.s3_endpoint = self._s3.url
        self.store = ObjectStore(cfg.bucket, endpoint_url=self.s3_endpoint)
        self.store.ensure_bucket()
        budget = cfg.node_budget
        functions = [
            FunctionSpec(
                name=node_name(cfg.prefix, i),
                handler="lambdas.cache_node.handler",
                environment={
                    config.S3_ENDPOINT.name: self.s3_endpoint,
                    config.BUCKET.name: cfg.bucket,
                    config.NODE_INDEX.name: str(i),
                    config.HOT_ROUNDS.name: str(cfg.hot_rounds),
                    config.CACHE_BUDGET_BYTES.name: str(budget),
                    "AWS_ACCESS_KEY_ID": "local",
                    "AWS_SECRET_ACCESS_KEY": "local",
                    "AWS_DEFAULT_REGION": "us-east-1",
                    "POWERTOOLS_LOG_LEVEL": "WARNING",
                    "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"),
                },
                memory_mb=cfg.memory_mb,
                timeout_s=cfg.timeout_s,
                reserved_concurrency=cfg.concurrency,
                idle_timeout_s=cfg.idle_timeout_s,
            )
            for i in range(cfg.nodes)
        ]
        self.lam = LocalLambda(functions, cwd=REPO_ROOT, sys_path=[REPO_ROOT]).start()
        tokens = TokenTable.with_tokens({self.token: ["*"], **cfg.tokens})
        nodes = lambda_client(self.lam.url)
        if cfg.in_process_invoke:
            self.node_transport = serve_in_process(nodes, self.lam)
        self.router = Router(
            self.store,
            NodeInvoker(nodes, cfg.memory_mb),
            tokens,
            RouterConfig(
                prefix=cfg.prefix,
                nodes=cfg.nodes,
                replication=cfg.replication,
                node_memory_mb=cfg.memory_mb,
                cache_budget_bytes=budget,
                min_blocks=cfg.min_blocks,
            ),
        )
        router = self.router
        # A resolver app keeps the request it is resolving on itself (the current event, the
        # route's arguments): on AWS an instance serves one request at a time, but the local
        # gateway serves requests on many threads, so each request borrows an app of its own
        # from a pool (apps share the one router), else two requests could swap arguments or
        # headers. The event being resolved is Powertools' per process, not per app: that one
        # lambdas.router.handle guards (one request at a time inside the resolver).
        apps: queue.SimpleQueue[Any] = queue.SimpleQueue()

        def serve(event: dict[str, Any], ctx: Any) -> dict[str, Any]:
            try:
                app = apps.get_nowait()
            except queue.Empty:
                app = build_app(lambda: router)
            try:
                return handle(app, event, ctx)
            finally:
                apps.put(app)

        # the authorizer runs first, as API Gateway's Lambda authorizer does on AWS
        self.gateway = LocalGateway(
            serve,
            authorizer=lambda event, ctx: decide(tokens, event),
            authorizer_ttl_s=cfg.authorizer_ttl_s,
        ).start()
        if self.workdir is not None:
            self.write_state(self.workdir)
        return self

    def stop(self) -> None:
        if self.gateway is not None:
            self.gateway.stop()
        if self.lam is not None:
            self.lam.stop()
        if self.store is not None:
            self.store.close()
        if self._s3 is not None:
            self._s3.stop()
        if self.workdir is not None:
            (self.workdir / STATE_FILE).unlink(missing_ok=True)

    def __enter__(self) -> LocalStack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ conveniences

    @property
    def gateway_url(self) -> str:
        assert self.gateway is not None, "stack not started"
        return self.gateway.url

    @property
    def lambda_endpoint(self) -> str:
        assert self.lam is not None, "stack not started"
        return self.lam.url

    def state(self) -> dict[str, Any]:
        """What ``.flstore/local.json`` holds."""
        return {
            "gateway_url": self.gateway_url,
            "lambda_endpoint": self.lambda_endpoint,
            "s3_endpoint": self.s3_endpoint,
            "bucket": self.config.bucket,
            "token": self.token,
            "prefix": self.config.prefix,
            "nodes": self.config.nodes,
            "replication": self.config.replication,
            "memory_mb": self.config.memory_mb,
            "budget_bytes": self.config.node_budget,
            "pid": os.getpid(),
        }

    def write_state(self, workdir: Path) -> Path:
        path = workdir / STATE_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.state(), indent=2))
        path.chmod(0o600)  # it holds the dev token
        return path

    def node_function(self, index: int) -> str:
        return node_name(self.config.prefix, index)
