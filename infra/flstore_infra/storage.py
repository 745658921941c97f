"""The data bucket: private, encrypted, versioned, TLS-only, results expiring by tag.

Lifecycle filters take a literal key prefix, and results live in the middle of a key
(``jobs/{job}/results/...``), so results are expired by an object tag instead: whoever
writes a result tags it ``flstore:kind=result`` (``RESULT_TAG``).
"""

from __future__ import annotations

import pulumi
import pulumi_aws as aws
from pulumi_aws.s3 import (
    BucketServerSideEncryptionConfigurationRuleApplyServerSideEncryptionByDefaultArgsDict as DefaultEncryption,  # noqa: E501
)

from . import iam
from .settings import StackSettings

RESULT_TAG = ("flstore:kind", "result")
ABORT_MULTIPART_AFTER_DAYS = 7


class DataBucket(pulumi.ComponentResource):
    """The one S3 bucket holding every job (``jobs/{job}/...``)."""

    bucket: aws.s3.Bucket
    name: str
    arn: str

    def __init__(
        self,
        resource_name: str,
        *,
        settings: StackSettings,
        bucket_name: str,
        bucket_arn: str,
        opts: pulumi.ResourceOptions | None = None,
    ) -> None:
        super().__init__("flstore:storage:DataBucket", resource_name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        self.name = bucket_name
        self.arn = bucket_arn
        self.bucket = aws.s3.Bucket(
            resource_name,
            bucket=bucket_name,
            force_destroy=settings.force_destroy,
            opts=child,
        )
        on_bucket = pulumi.ResourceOptions(parent=self, depends_on=[self.bucket])
        ownership = aws.s3.BucketOwnershipControls(
            f"{resource_name}-ownership",
            bucket=self.bucket.id,
            rule={"object_ownership": "BucketOwnerEnforced"},  # no ACLs at all
            opts=on_bucket,
        )
        self.public_access_block = aws.s3.BucketPublicAccessBlock(
            f"{resource_name}-public-access",
            bucket=self.bucket.id,
            block_public_acls=True,
            block_public_policy=True,
            ignore_public_acls=True,
            restrict_public_buckets=True,
            opts=on_bucket,
        )
        self._encrypt(resource_name, settings, on_bucket)
        versioning = aws.s3.BucketVersioning(
            f"{resource_name}-versioning",
            bucket=self.bucket.id,
            versioning_configuration={"status": "Enabled"},
            opts=on_bucket,
        )
        self._expire(resource_name, settings, versioning)
        aws.s3.BucketPolicy(
            f"{resource_name}-policy",
            bucket=self.bucket.id,
            policy=iam.render(iam.bucket_policy(bucket_arn=bucket_arn)),
            # Both touch bucket policy state; S3 fails one if they race.
            opts=pulumi.ResourceOptions(
                parent=self, depends_on=[self.public_access_block, ownership]
            ),
        )
        self.register_outputs({"bucket": self.bucket.bucket})

    def _encrypt(
        self, resource_name: str, settings: StackSettings, on_bucket: pulumi.ResourceOptions
    ) -> None:
        """Default encryption: the stack's KMS key when set, else S3-managed AES-256."""
        default_encryption: DefaultEncryption
        if settings.kms_key_arn:
            default_encryption = {
                "sse_algorithm": "aws:kms",
                "kms_master_key_id": settings.kms_key_arn,
            }
        else:
            default_encryption = {"sse_algorithm": "AES256"}
        aws.s3.BucketServerSideEncryptionConfiguration(
            f"{resource_name}-encryption",
            bucket=self.bucket.id,
            rules=[
                {
                    "apply_server_side_encryption_by_default": default_encryption,
                    # S3 Bucket Keys cut KMS requests (and their cost) by ~99 %.
                    "bucket_key_enabled": bool(settings.kms_key_arn),
                }
            ],
            opts=on_bucket,
        )

    def _expire(
        self, resource_name: str, settings: StackSettings, versioning: aws.s3.BucketVersioning
    ) -> None:
        """Results expire by their tag; every job's old versions and stale uploads go too."""
        tag_key, tag_value = RESULT_TAG
        aws.s3.BucketLifecycleConfiguration(
            f"{resource_name}-lifecycle",
            bucket=self.bucket.id,
            rules=[
                {
                    "id": "expire-results",
                    "status": "Enabled",
                    "filter": {"tag": {"key": tag_key, "value": tag_value}},
                    "expiration": {"days": settings.results_expire_days},
                    "noncurrent_version_expiration": {"noncurrent_days": 1},
                },
                {
                    "id": "tidy-job-versions",
                    "status": "Enabled",
                    "filter": {"prefix": iam.DATA_PREFIX},
                    "noncurrent_version_expiration": {
                        "noncurrent_days": settings.noncurrent_version_days
                    },
                    "abort_incomplete_multipart_upload": {
                        "days_after_initiation": ABORT_MULTIPART_AFTER_DAYS
                    },
                    "expiration": {"expired_object_delete_marker": True},
                },
            ],
            # S3 rejects lifecycle rules on noncurrent versions until versioning is on.
            opts=pulumi.ResourceOptions(parent=self, depends_on=[versioning]),
        )
