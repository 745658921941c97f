"""boto3 clients configured one way: endpoints, local credentials, region, retries, pools.

Every S3 and Lambda client FLStore makes comes from here, so the object store, the router, the
pipelines and the baselines agree on retries and on how a local endpoint (moto, the local
Lambda endpoint) is reached without real credentials.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import boto3
from botocore.config import Config

from flstore_core import config

if TYPE_CHECKING:
    from mypy_boto3_lambda import LambdaClient
    from mypy_boto3_s3 import S3Client


def client_kwargs(
    endpoint_url: str | None,
    *,
    access_key_id: str | None = None,
    secret_access_key: str | None = None,
    region_name: str | None = None,
) -> dict[str, Any]:
    """Endpoint, region and credentials for a boto3 client.

    Explicit credentials win; a local endpoint accepts any credentials, so when the environment
    has none it gets placeholder ones rather than failing on boto3's lookup. Against AWS
    (no endpoint) boto3's usual chain applies.
    """
    kwargs: dict[str, Any] = {}
    if endpoint_url:
        kwargs["endpoint_url"] = endpoint_url
        kwargs["region_name"] = region_name or config.AWS_REGION.get()
    elif region_name:
        kwargs["region_name"] = region_name
    if access_key_id:
        kwargs["aws_access_key_id"] = access_key_id
        kwargs["aws_secret_access_key"] = secret_access_key
    elif endpoint_url and not _has_ambient_key():
        kwargs["aws_access_key_id"] = "local"
        kwargs["aws_secret_access_key"] = "local"
    return kwargs


def local_credentials_needed(endpoint_url: str | None) -> bool:
    """Whether a client of ``endpoint_url`` would be given placeholder credentials."""
    return bool(endpoint_url) and not _has_ambient_key()


def _has_ambient_key() -> bool:
    return bool(os.environ.get("AWS_ACCESS_KEY_ID"))


def s3_client(
    endpoint_url: str | None = None,
    *,
    max_pool: int = 32,
    access_key_id: str | None = None,
    secret_access_key: str | None = None,
    region_name: str | None = None,
) -> S3Client:
    """An S3 client with FLStore's retry settings; endpoint from ``FLSTORE_S3_ENDPOINT``.

    Request bodies are not SHA-256 signed (``payload_signing_enabled``): botocore already
    leaves them unsigned over HTTPS when a checksum header (CRC32 by default) covers the body,
    which is every PUT to AWS, but signs them over plain HTTP — a local endpoint — which hashed
    every 45 MB model result a second time (40-90 ms of a ResNet-18 krum request on 2 cores).
    The CRC32 checksum still covers the body either way.
    """
    endpoint_url = endpoint_url or config.S3_ENDPOINT.get()
    cfg = Config(
        retries={"max_attempts": 5, "mode": "adaptive"},
        max_pool_connections=max_pool,
        connect_timeout=5,
        read_timeout=60,
        s3={"addressing_style": "path", "payload_signing_enabled": False}
        if endpoint_url
        else {"payload_signing_enabled": False},
    )
    kwargs = client_kwargs(
        endpoint_url,
        access_key_id=access_key_id,
        secret_access_key=secret_access_key,
        region_name=region_name,
    )
    client: S3Client = boto3.client("s3", config=cfg, **kwargs)
    return client


def lambda_client(endpoint_url: str | None = None, read_timeout: float = 900) -> LambdaClient:
    """A Lambda client without SDK retries (the router retries on other nodes itself);
    endpoint from ``FLSTORE_LAMBDA_ENDPOINT``."""
    endpoint_url = endpoint_url or config.LAMBDA_ENDPOINT.get()
    cfg = Config(
        retries={"max_attempts": 0, "mode": "standard"},
        read_timeout=read_timeout,
        connect_timeout=5,
        max_pool_connections=64,
    )
    client: LambdaClient = boto3.client("lambda", config=cfg, **client_kwargs(endpoint_url))
    return client
