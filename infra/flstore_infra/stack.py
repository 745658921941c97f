"""``create_stack``: the whole of FLStore on AWS, composed from the components."""

from __future__ import annotations

from dataclasses import dataclass

import pulumi
import pulumi_aws as aws

from .api import HttpApi
from .arns import AwsScope
from .container_image import CacheNodeImage
from .functions import CacheNodes, ZipFunction, authorizer_function, router_function
from .keepwarm import KeepWarmSchedule
from .notifications import CommitNotification
from .packaging import PACKAGES, BuildArtifacts, build_artifacts
from .settings import StackSettings, load_settings
from .storage import DataBucket

OUTPUTS = ("api_url", "bucket", "cache_functions", "router_function", "authorizer_function")


@dataclass
class FLStoreStack:
    """Handles on what ``create_stack`` declared, for tests and for callers composing more."""

    settings: StackSettings
    artifacts: BuildArtifacts
    scope: AwsScope
    bucket: DataBucket
    image: CacheNodeImage
    cache_nodes: CacheNodes
    router: ZipFunction
    authorizer: ZipFunction
    api: HttpApi
    keep_warm: KeepWarmSchedule | None
    commit_warming: CommitNotification
    outputs: dict[str, pulumi.Input[object]]


def current_scope(settings: StackSettings) -> AwsScope:
    """The account, region and partition the AWS provider deploys into."""
    region = settings.region or aws.get_region().region
    return AwsScope(
        partition=aws.get_partition().partition,
        region=region,
        account=aws.get_caller_identity().account_id,
    )


def warn_about_inputs(settings: StackSettings, artifacts: BuildArtifacts) -> None:
    """Warn about what deploys but will not work as meant: untracked files, no tokens."""
    if not artifacts.from_git:
        pulumi.log.warn(
            f"git did not list the files of {' and '.join(PACKAGES)} (not a git checkout, or "
            "git is missing): every file in them is deployed, tracked or not"
        )
    if artifacts.untracked:
        pulumi.log.warn(
            f"{len(artifacts.untracked)} file(s) in {' and '.join(PACKAGES)} are not tracked by "
            f"git and are not deployed (e.g. {artifacts.untracked[0]}); `git add` them to "
            "deploy them"
        )
    if not settings.token_hashes:
        pulumi.log.warn(
            "flstore:tokenHashes is empty: every authenticated route will answer 401 "
            "until you add a token hash (see README, 'Deploy to AWS')"
        )


def export_outputs(
    *,
    scope: AwsScope,
    bucket: DataBucket,
    image: CacheNodeImage,
    cache_nodes: CacheNodes,
    router: ZipFunction,
    authorizer: ZipFunction,
    api: HttpApi,
) -> dict[str, pulumi.Input[object]]:
    """Export the stack outputs (``OUTPUTS`` and the image and region) and return them."""
    outputs: dict[str, pulumi.Input[object]] = {
        "api_url": api.url,
        "bucket": bucket.bucket.bucket,
        "cache_functions": [f.name for f in cache_nodes.functions],
        "router_function": router.function.name,
        "authorizer_function": authorizer.function.name,
        "cache_image": image.image_uri,
        "region": scope.region,
    }
    for key, value in outputs.items():
        pulumi.export(key, value)
    return outputs


def keep_warm_schedule(settings: StackSettings, cache_nodes: CacheNodes) -> KeepWarmSchedule | None:
    """The cache nodes' keep-warm schedule, or none when ``keep_warm_minutes`` is 0."""
    if not settings.keep_warm_minutes:
        return None
    return KeepWarmSchedule(
        f"{settings.prefix}-keepwarm",
        settings=settings,
        functions=cache_nodes.functions,
        names=cache_nodes.names,
    )


def commit_notification(
    settings: StackSettings, scope: AwsScope, bucket: DataBucket, router: ZipFunction
) -> CommitNotification:
    """The bucket's notification of manifest writes to the router: a round committed by any
    writer is warmed (:mod:`.notifications`)."""
    return CommitNotification(
        f"{settings.prefix}-commit-warming",
        bucket=bucket.bucket,
        bucket_arn=bucket.arn,
        account=scope.account,
        function=router.function,
    )


def create_stack(settings: StackSettings | None = None) -> FLStoreStack:
    """Declare every FLStore resource for ``settings`` (the stack config when omitted).

    Builds what it deploys first, from the working tree (``packaging.build_artifacts``).
    """
    settings = settings or load_settings()
    artifacts = build_artifacts(architecture=settings.architecture)
    warn_about_inputs(settings, artifacts)
    scope = current_scope(settings)
    bucket_name = scope.bucket_name(settings.prefix)
    tokens = pulumi.Output.secret(settings.tokens_json())
    # Pulumi compares archives by the sha256 of the zip's bytes, which the build keeps
    # identical for an unchanged tree: no change, no update.
    archive = pulumi.FileArchive(str(artifacts.router_zip))

    bucket = DataBucket(
        f"{settings.prefix}-data",
        settings=settings,
        bucket_name=bucket_name,
        bucket_arn=scope.s3_bucket(bucket_name),
    )
    image = CacheNodeImage(
        f"{settings.prefix}-cache-node", settings=settings, scope=scope, artifacts=artifacts
    )
    # Functions start after the bucket exists: the first keep-warm ping reads from it.
    after_bucket = pulumi.ResourceOptions(depends_on=[bucket])
    cache_nodes = CacheNodes(
        f"{settings.prefix}-cache-nodes",
        settings=settings,
        scope=scope,
        bucket_name=bucket_name,
        image_uri=image.image_uri,
        # The image's repository policy lets Lambda pull it.
        opts=pulumi.ResourceOptions(depends_on=[bucket, image]),
    )
    router = router_function(
        settings=settings,
        scope=scope,
        bucket_name=bucket_name,
        archive=archive,
        tokens=tokens,
        opts=after_bucket,
    )
    authorizer = authorizer_function(settings=settings, scope=scope, archive=archive, tokens=tokens)
    api = HttpApi(
        f"{settings.prefix}-api",
        settings=settings,
        router=router.function,
        authorizer=authorizer.function,
    )
    keep_warm = keep_warm_schedule(settings, cache_nodes)
    commit_warming = commit_notification(settings, scope, bucket, router)

    outputs = export_outputs(
        scope=scope,
        bucket=bucket,
        image=image,
        cache_nodes=cache_nodes,
        router=router,
        authorizer=authorizer,
        api=api,
    )
    return FLStoreStack(
        settings=settings,
        artifacts=artifacts,
        scope=scope,
        bucket=bucket,
        image=image,
        cache_nodes=cache_nodes,
        router=router,
        authorizer=authorizer,
        api=api,
        keep_warm=keep_warm,
        commit_warming=commit_warming,
        outputs=outputs,
    )
