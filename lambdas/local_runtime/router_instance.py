"""One instance of the local router function: the router's handler, built from its environment.

The local stack deploys the router on its Lambda endpoint (:mod:`lambdas.local_runtime.
router_function`); each instance is a worker process importing this module, as a Lambda
sandbox imports ``lambdas.router``. The handler is ``lambdas.router``'s; only the router behind
it is built differently: from :func:`router_environment`'s variables, which carry every
:class:`~flstore_core.routing.router.RouterConfig` field (the stack's node budget and
``min_blocks`` included, which ``RouterConfig.from_env`` does not read) and the hashed token
table. Its ``lambda.invoke`` of the nodes goes over the endpoint's invoke channel, a Unix socket
without HTTP (:mod:`lambdas.local_runtime.invoke_channel`), unsigned: the local endpoint never
checks a signature, and SigV4 was ~0.1 ms of every invocation.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

from flstore_core import config
from flstore_core.aws import lambda_client
from flstore_core.routing.auth import TokenTable
from flstore_core.routing.invoker import NodeInvoker
from flstore_core.routing.router import Router, RouterConfig
from flstore_core.storage.object_store import ObjectStore
from lambdas.local_runtime.invoke_channel import serve_over_channel
from lambdas.router import build_app, handle, logger

#: The environment variable holding the router's settings (a JSON ``RouterConfig``).
SETTINGS = config.LOCAL_ROUTER_CONFIG.name
#: The environment variable holding the path of the endpoint's invoke channel.
CHANNEL = config.LOCAL_INVOKE_CHANNEL.name


def router_environment(
    settings: RouterConfig,
    hashed_tokens: Mapping[str, list[str]],
    lambda_endpoint: str,
    channel: str,
) -> dict[str, str]:
    """The variables an instance's router is built from, beside the S3 endpoint and bucket:
    ``hashed_tokens`` is the token table as ``FLSTORE_TOKENS`` holds it (sha256 digests to the
    jobs they are granted); ``channel`` the path of the endpoint's
    :class:`~lambdas.local_runtime.invoke_channel.InvokeChannel`."""
    return {
        SETTINGS: json.dumps(dataclasses.asdict(settings)),
        config.TOKENS.name: json.dumps(dict(hashed_tokens)),
        config.LAMBDA_ENDPOINT.name: lambda_endpoint,
        CHANNEL: channel,
    }


def build_router() -> Router:
    """This instance's router, from :func:`router_environment`'s variables."""
    settings = RouterConfig(**json.loads(os.environ[SETTINGS]))
    nodes = lambda_client()
    serve_over_channel(nodes, os.environ[CHANNEL])
    invoker = NodeInvoker(nodes, settings.node_memory_mb)
    return Router(ObjectStore(), invoker, TokenTable.from_env(), settings)


# the router is built at the instance's first request (the stack's warm-up), not at import
app = build_app(build_router)


@logger.inject_lambda_context(log_event=False)
def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    """The router function's entry point: one request of the local gateway."""
    return handle(app, event, context)
