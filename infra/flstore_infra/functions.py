"""The Lambda functions: N cache nodes (image), the router and the authorizer (zip).

Each function kind gets one role with one inline policy from ``iam`` and each function
its own log group ``/aws/lambda/{name}`` with retention. The log group is declared before
the function so Lambda never creates an unmanaged one that keeps logs forever.

Environment contract with ``lambdas/`` (ARCHITECTURE §3):

| variable | cache node | router | authorizer |
|---|---|---|---|
| ``FLSTORE_BUCKET`` | yes | yes | |
| ``FLSTORE_PREFIX`` | yes | yes | yes |
| ``FLSTORE_CACHE_NODES``, ``FLSTORE_REPLICATION``, ``FLSTORE_HOT_ROUNDS`` | yes | yes | |
| ``FLSTORE_CACHE_MEMORY_MB``, ``FLSTORE_CACHE_BUDGET_BYTES`` | yes | yes | |
| ``FLSTORE_NODE_INDEX`` | yes | | |
| ``FLSTORE_TOKENS`` (secret) | | yes | yes |
"""

from __future__ import annotations

from collections.abc import Mapping

import pulumi
import pulumi_aws as aws

from . import iam
from .arns import AwsScope, lambda_log_group_name
from .settings import StackSettings
from .target import LAMBDA_RUNTIME

AUTHORIZER_MEMORY_MB = 256
AUTHORIZER_TIMEOUT_S = 10


def _log_group(
    function_name: str, settings: StackSettings, parent: pulumi.Resource
) -> aws.cloudwatch.LogGroup:
    return aws.cloudwatch.LogGroup(
        f"{function_name}-logs",
        name=lambda_log_group_name(function_name),
        retention_in_days=settings.log_retention_days,
        opts=pulumi.ResourceOptions(parent=parent),
    )


def _role(
    resource_name: str, description: str, policy: str, parent: pulumi.Resource
) -> tuple[aws.iam.Role, aws.iam.RolePolicy]:
    role = aws.iam.Role(
        f"{resource_name}-role",
        description=description,
        assume_role_policy=iam.render(iam.lambda_trust_policy()),
        opts=pulumi.ResourceOptions(parent=parent),
    )
    policy_resource = aws.iam.RolePolicy(
        f"{resource_name}-policy",
        role=role.id,
        policy=policy,
        opts=pulumi.ResourceOptions(parent=parent),
    )
    return role, policy_resource


def placement_environment(settings: StackSettings, bucket_name: str) -> dict[str, str]:
    """What the cache nodes and the router share: where the data is and how it is placed."""
    return {
        "FLSTORE_BUCKET": bucket_name,
        "FLSTORE_PREFIX": settings.prefix,
        "FLSTORE_CACHE_NODES": str(settings.cache_nodes),
        "FLSTORE_REPLICATION": str(settings.replication),
        "FLSTORE_HOT_ROUNDS": str(settings.hot_rounds),
        # The router prices node invocations with it (cost_usd in every answer).
        "FLSTORE_CACHE_MEMORY_MB": str(settings.cache_memory_mb),
        # One figure for both: the nodes hold data under it and the router cuts rounds into
        # column blocks that fit it.
        "FLSTORE_CACHE_BUDGET_BYTES": str(settings.cache_budget_bytes),
    }


class CacheNodes(pulumi.ComponentResource):
    """The cache-node functions ``{prefix}-cache-{i}``, their role and their log groups."""

    functions: list[aws.lambda_.Function]
    names: list[str]

    def __init__(
        self,
        resource_name: str,
        *,
        settings: StackSettings,
        scope: AwsScope,
        bucket_name: str,
        image_uri: pulumi.Input[str],
        opts: pulumi.ResourceOptions | None = None,
    ) -> None:
        super().__init__("flstore:functions:CacheNodes", resource_name, None, opts)
        self.names = settings.cache_function_names
        log_groups = [_log_group(name, settings, self) for name in self.names]
        policy = iam.render(
            iam.cache_node_policy(
                bucket_arn=scope.s3_bucket(bucket_name),
                log_group_arns=[scope.log_group(lambda_log_group_name(n)) for n in self.names],
                kms_key_arn=settings.kms_key_arn,
            )
        )
        role, role_policy = _role(
            resource_name, "FLStore cache nodes: read job data, write results", policy, self
        )
        shared = placement_environment(settings, bucket_name)
        self.functions = []
        for index, (name, log_group) in enumerate(zip(self.names, log_groups, strict=True)):
            variables = {
                **shared,
                "FLSTORE_NODE_INDEX": str(index),
            }
            self.functions.append(
                aws.lambda_.Function(
                    name,
                    name=name,
                    description=f"FLStore cache node {index} of {settings.cache_nodes}",
                    package_type="Image",
                    image_uri=image_uri,
                    role=role.arn,
                    architectures=[settings.architecture],
                    memory_size=settings.cache_memory_mb,
                    timeout=settings.cache_timeout_s,
                    environment={"variables": variables},
                    opts=pulumi.ResourceOptions(parent=self, depends_on=[log_group, role_policy]),
                )
            )
        self.register_outputs({"names": self.names})


class ZipFunction(pulumi.ComponentResource):
    """One zip-packaged function (router or authorizer) with its own role and log group."""

    function: aws.lambda_.Function
    name: str

    def __init__(
        self,
        function_name: str,
        *,
        description: str,
        handler: str,
        archive: pulumi.Archive,
        policy: str,
        memory_mb: int,
        timeout_s: int,
        settings: StackSettings,
        environment: Mapping[str, pulumi.Input[str]],
        opts: pulumi.ResourceOptions | None = None,
    ) -> None:
        super().__init__("flstore:functions:ZipFunction", function_name, None, opts)
        self.name = function_name
        log_group = _log_group(function_name, settings, self)
        role, role_policy = _role(function_name, description, policy, self)
        self.function = aws.lambda_.Function(
            function_name,
            name=function_name,
            description=description,
            runtime=LAMBDA_RUNTIME,
            handler=handler,
            code=archive,
            role=role.arn,
            architectures=[settings.architecture],
            memory_size=memory_mb,
            timeout=timeout_s,
            environment={"variables": dict(environment)},
            opts=pulumi.ResourceOptions(parent=self, depends_on=[log_group, role_policy]),
        )
        self.register_outputs({"name": function_name})


def router_function(
    *,
    settings: StackSettings,
    scope: AwsScope,
    bucket_name: str,
    archive: pulumi.Archive,
    tokens: pulumi.Input[str],
    opts: pulumi.ResourceOptions | None = None,
) -> ZipFunction:
    """The router: authenticates, plans, invokes the cache nodes and gathers results."""
    name = settings.router_function_name
    policy = iam.render(
        iam.router_policy(
            bucket_arn=scope.s3_bucket(bucket_name),
            log_group_arn=scope.log_group(lambda_log_group_name(name)),
            cache_function_arns=[scope.lambda_function(n) for n in settings.cache_function_names],
            kms_key_arn=settings.kms_key_arn,
        )
    )
    return ZipFunction(
        name,
        description="FLStore router: HTTP API to the cache nodes",
        handler="lambdas.router.handler",
        archive=archive,
        policy=policy,
        memory_mb=settings.router_memory_mb,
        timeout_s=settings.router_timeout_s,
        settings=settings,
        environment={
            **placement_environment(settings, bucket_name),
            "FLSTORE_TOKENS": tokens,
        },
        opts=opts,
    )


def authorizer_function(
    *,
    settings: StackSettings,
    scope: AwsScope,
    archive: pulumi.Archive,
    tokens: pulumi.Input[str],
    opts: pulumi.ResourceOptions | None = None,
) -> ZipFunction:
    """The HTTP API's Lambda REQUEST authorizer: is the bearer token one we issued?"""
    name = settings.authorizer_function_name
    policy = iam.render(
        iam.authorizer_policy(log_group_arn=scope.log_group(lambda_log_group_name(name)))
    )
    return ZipFunction(
        name,
        description="FLStore authorizer: bearer tokens by sha256",
        handler="lambdas.authorizer.handler",
        archive=archive,
        policy=policy,
        memory_mb=AUTHORIZER_MEMORY_MB,
        timeout_s=AUTHORIZER_TIMEOUT_S,
        settings=settings,
        environment={
            "FLSTORE_PREFIX": settings.prefix,
            "FLSTORE_TOKENS": tokens,
        },
        opts=opts,
    )
