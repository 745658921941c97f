"""The whole of FLStore on one machine: local S3, cache-node functions, router and gateway.

:class:`LocalStack` is what ``flstore local up``, the demo, the tests and the benchmarks start:
a moto S3 server (or any S3 endpoint), a local Lambda endpoint serving ``{prefix}-cache-{i}``
and ``{prefix}-router`` (one OS process per warm instance, as on AWS: the router serves one
request per instance, :mod:`lambdas.local_runtime.router_function`), and the local API Gateway
in front of the router function, running the Lambda authorizer first. ``stack.router`` is a
router in this process for admin calls (prefetch, node ops, plans) that benchmarks and tests
make. It writes ``.flstore/local.json`` (ARCHITECTURE §6) when given a working directory.

With ``StackConfig(network=...)`` (:mod:`lambdas.local_runtime.network`) each hop AWS would
put between them waits its modelled time on top of the local one: the gateway its own and its
invocation of the router function, every invocation of a cache node (the parent's router and
the router function's instances alike), and every S3 request of a function, through a proxy of
its own (:mod:`lambdas.local_runtime.function_network`). The parent's ``stack.store`` (what
benchmarks and tests write data with, untimed) reaches S3 directly.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flstore_core import config
from flstore_core.aws import lambda_client
from flstore_core.cache.budget import MiB, stack_budget
from flstore_core.errors import ValidationError
from flstore_core.routing.auth import TokenTable, hash_token, new_token
from flstore_core.routing.invoker import NodeInvoker
from flstore_core.routing.placement import node_name
from flstore_core.routing.router import Router, RouterConfig
from flstore_core.storage.object_store import ObjectStore
from lambdas.authorizer import decide
from lambdas.local_runtime.function_network import FunctionNetwork
from lambdas.local_runtime.gateway import AUTHORIZER_CACHE_TTL_S, LocalGateway
from lambdas.local_runtime.in_process import InProcessTransport, serve_in_process
from lambdas.local_runtime.invoke_channel import InvokeChannel
from lambdas.local_runtime.lambda_endpoint import FunctionSpec, LocalLambda
from lambdas.local_runtime.network import NetworkModel
from lambdas.local_runtime.router_function import HANDLER, RouterFunction, deploy, function_name
from lambdas.local_runtime.router_instance import router_environment
from lambdas.local_runtime.s3_notifications import S3Notifications, function_delivery
from lambdas.local_runtime.s3_server import LocalS3

REPO_ROOT = Path(__file__).resolve().parents[2]
STATE_FILE = Path(".flstore") / "local.json"
ROUTER_MEMORY_MB = 3008
ROUTER_TIMEOUT_S = 900.0


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
    # where the embedded S3 keeps its objects between a stop and a start (None: in memory
    # only, gone at stop); unused with s3_endpoint, whose S3 keeps its own
    data_dir: str | Path | None = None
    tokens: dict[str, list[str]] = field(default_factory=dict)  # extra tokens -> granted jobs
    # how long the gateway caches the authorizer's answers (authorizerResultTtlInSeconds)
    authorizer_ttl_s: float = AUTHORIZER_CACHE_TTL_S
    # the parent's router (stack.router) reaches the local endpoint in this process, without the
    # loopback socket (lambdas.local_runtime.in_process); False sends it over HTTP. The router
    # function's instances are other processes: theirs always go over HTTP
    in_process_invoke: bool = True
    # router instances serving requests at once (the router function's reserved concurrency);
    # more concurrent requests wait for one at the gateway. Each instance has caches of its own
    # (manifests, sharded views) and a cold start of ~1 s of imports: with 16, the quick chaos
    # run's 16 clients on 2 cores got 52 answers in its 15 s baseline phase (p99 40 s), with 4
    # 942 (1,087 with the router in the gateway's process)
    router_concurrency: int = 4
    # the S3 front notifies update writes too, which the router stages on their round's owners
    # before the commit (flstore_core.routing.update_staging); False: manifests only, as before
    stage_updates: bool = True
    # AWS's hops modelled on top of the local ones (load_network("aws")); None: loopback only
    network: NetworkModel | None = None

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
        self.router_function: RouterFunction | None = None
        # how the router function's instances invoke the nodes (without HTTP)
        self.channel: InvokeChannel | None = None
        self.store: ObjectStore | None = None
        # what answers the router's lambda.invoke in this process (None: over HTTP)
        self.node_transport: InProcessTransport | None = None
        # each function's interface and S3 proxy under the network model (None without one)
        self.network: FunctionNetwork | None = None
        # the S3 front that notifies the router function of manifest writes (the bucket's
        # notification on AWS): writers_s3_endpoint
        self.notifications: S3Notifications | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> LocalStack:
        cfg = self.config
        if cfg.s3_endpoint:
            self.s3_endpoint = cfg.s3_endpoint
        else:
            self._s3 = LocalS3(data_dir=cfg.data_dir, buckets=(cfg.bucket,)).start()
            self.s3_endpoint = self._s3.url
        self.store = ObjectStore(cfg.bucket, endpoint_url=self.s3_endpoint)
        self.store.ensure_bucket()
        if cfg.network is not None:
            self.network = FunctionNetwork(cfg.network)
        self.lam = LocalLambda(
            self._node_functions(), cwd=REPO_ROOT, sys_path=[REPO_ROOT], network=self.network
        )
        self.lam.start()
        # every client of the Invoke API reaches lam.invoke_api: paced under the network model
        self.channel = InvokeChannel(self.lam.invoke_api).start()
        hashed = {hash_token(t): jobs for t, jobs in {self.token: ["*"], **cfg.tokens}.items()}
        tokens = TokenTable(hashed)
        nodes = lambda_client(self.lam.url)
        if cfg.in_process_invoke:
            self.node_transport = serve_in_process(nodes, self.lam.invoke_api)
        settings = RouterConfig(
            prefix=cfg.prefix,
            nodes=cfg.nodes,
            replication=cfg.replication,
            node_memory_mb=cfg.memory_mb,
            cache_budget_bytes=cfg.node_budget,
            min_blocks=cfg.min_blocks,
        )
        # the parent's router: benchmarks and tests call its prefetch, node_op, plan_round
        self.router = Router(self.store, NodeInvoker(nodes, cfg.memory_mb), tokens, settings)
        # the routers serving requests: instances of the router function, one request each
        router = self._function_spec(
            function_name(cfg.prefix),
            HANDLER,
            router_environment(settings, hashed, self.lam.url, self.channel.path),
            reserved_concurrency=cfg.router_concurrency,
            # the in-process router had no limits of its own: none that a node's settings
            # would newly impose (Lambda's largest timeout; the memory of a large node)
            memory_mb=max(cfg.memory_mb, ROUTER_MEMORY_MB),
            timeout_s=max(cfg.timeout_s, ROUTER_TIMEOUT_S),
        )
        self.router_function = deploy(self.lam, router)
        self.notifications = S3Notifications(
            self.s3_endpoint,
            cfg.bucket,
            function_delivery(self.lam, router.name),
            updates=cfg.stage_updates,
        ).start()
        # the authorizer runs first, as API Gateway's Lambda authorizer does on AWS
        self.gateway = LocalGateway(
            self.router_function,
            authorizer=lambda event, ctx: decide(tokens, event),
            authorizer_ttl_s=cfg.authorizer_ttl_s,
            network=cfg.network,
            router_nic=None if self.network is None else self.network.nic(router.name),
        ).start()
        if self.workdir is not None:
            self.write_state(self.workdir)
        return self

    def _node_functions(self) -> list[FunctionSpec]:
        """The cache-node functions ``{prefix}-cache-{i}``."""
        cfg = self.config
        return [
            self._function_spec(
                node_name(cfg.prefix, i),
                "lambdas.cache_node.handler",
                {
                    config.NODE_INDEX.name: str(i),
                    config.HOT_ROUNDS.name: str(cfg.hot_rounds),
                    config.CACHE_BUDGET_BYTES.name: str(cfg.node_budget),
                    "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"),
                },
                reserved_concurrency=cfg.concurrency,
            )
            for i in range(cfg.nodes)
        ]

    def _function_spec(
        self,
        name: str,
        handler: str,
        environment: dict[str, str],
        reserved_concurrency: int,
        memory_mb: int | None = None,
        timeout_s: float | None = None,
    ) -> FunctionSpec:
        """A function of the stack: its own variables beside the store's and the credentials."""
        cfg = self.config
        return FunctionSpec(
            name=name,
            handler=handler,
            environment={
                config.S3_ENDPOINT.name: self.function_s3_endpoint(name),
                config.BUCKET.name: cfg.bucket,
                "AWS_ACCESS_KEY_ID": "local",
                "AWS_SECRET_ACCESS_KEY": "local",
                "AWS_DEFAULT_REGION": "us-east-1",
                "POWERTOOLS_LOG_LEVEL": "WARNING",
                **environment,
            },
            memory_mb=memory_mb or cfg.memory_mb,
            timeout_s=timeout_s or cfg.timeout_s,
            reserved_concurrency=reserved_concurrency,
            idle_timeout_s=cfg.idle_timeout_s,
        )

    def function_s3_endpoint(self, name: str) -> str:
        """The S3 endpoint function ``name`` reaches: its own paced proxy under the network
        model, else the stack's S3."""
        if self.network is None:
            return self.s3_endpoint
        return self.network.s3_endpoint(name, self.s3_endpoint)

    def stop(self) -> None:
        if self.notifications is not None:
            self.notifications.stop()
        if self.gateway is not None:
            self.gateway.stop()
        if self.lam is not None:
            self.lam.stop()
        if self.channel is not None:
            self.channel.stop()
        if self.network is not None:
            self.network.stop()
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
    def data_dir(self) -> Path | None:
        """Where the embedded S3 keeps its objects (None: in memory only, or not embedded)."""
        return self._s3.data_dir if self._s3 is not None else None

    def restored_jobs(self) -> list[str]:
        """The jobs the embedded S3 restored from ``data_dir`` at start (none without one)."""
        if self._s3 is None or not self._s3.restored.objects.get(self.config.bucket):
            return []
        assert self.store is not None, "stack not started"
        return self.store.list_jobs()

    @property
    def gateway_url(self) -> str:
        assert self.gateway is not None, "stack not started"
        return self.gateway.url

    @property
    def lambda_endpoint(self) -> str:
        assert self.lam is not None, "stack not started"
        return self.lam.url

    @property
    def writers_s3_endpoint(self) -> str:
        """The S3 endpoint writers are given (``.flstore/local.json``: the Flower app, the CLI,
        the SDK): a front that notifies the router function of every manifest written, as the
        bucket does on AWS, so a round they commit is warmed. The functions, ``stack.store`` and
        ``stack.s3_endpoint`` reach S3 directly: the front holds every body it forwards, and a
        baseline reading rounds through it would pay that hop where on AWS it would not."""
        assert self.notifications is not None, "stack not started"
        return self.notifications.url

    def state(self) -> dict[str, Any]:
        """What ``.flstore/local.json`` holds."""
        return {
            "gateway_url": self.gateway_url,
            "lambda_endpoint": self.lambda_endpoint,
            "s3_endpoint": self.writers_s3_endpoint,
            "bucket": self.config.bucket,
            "token": self.token,
            "prefix": self.config.prefix,
            "nodes": self.config.nodes,
            "replication": self.config.replication,
            "memory_mb": self.config.memory_mb,
            "budget_bytes": self.config.node_budget,
            "network": None if self.config.network is None else self.config.network.name,
            # writers reach S3 through the notifying front: a manifest's write warms its round
            # (lambdas.local_runtime.s3_notifications), so a writer needs no router of its own
            "commit_notifications": True,
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
