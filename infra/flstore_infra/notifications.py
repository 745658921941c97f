"""Commit-driven warming on AWS: the bucket notifies the router function of every manifest write,
and of every update written before it (eager warming: :mod:`flstore_core.routing.update_staging`).

A round becomes visible when its manifest ``jobs/{job}/rounds/{round:08d}/manifest.json`` is
written, by whichever writer commits it (ingestion, the SDK, the Flower sink, a backfill), none
of which holds a router or may invoke a function. An S3 event notification on ``jobs/`` …
``manifest.json`` invokes the router function asynchronously for each such write; its handler
warms the round (:mod:`flstore_core.routing.commit_warming`), retried by Lambda's asynchronous
invocation when it fails.

Why the router function and not a function of its own: warming is the router's ``prefetch``
(placement, the planner, invoking the cache nodes), and its role already invokes the cache nodes
and reads every job's objects; the only grant warming adds is writing the warm markers under
``jobs/{job}/warm/`` (``iam.router_policy``). A function of its own would need the same invoke
and read grants in a second role, and its own package of the router's code.

S3 checks that it may invoke the function when the notification is created, so the notification
is declared after the invoke permission (``depends_on``); the permission names the bucket's ARN
and the account owning it (``source_account``), since bucket names are global and a deleted
bucket's name could be taken by another account.
"""

from __future__ import annotations

import pulumi
import pulumi_aws as aws

MANIFEST_EVENTS = ["s3:ObjectCreated:*"]
MANIFEST_PREFIX = "jobs/"
MANIFEST_SUFFIX = "manifest.json"
# the second filter: updates, staged on their round's owners before the commit. S3 refuses two
# configurations of one event type whose prefixes overlap and whose suffixes overlap (one ends
# the other): "manifest.json" and ".safetensors.zst" do not, so the two stand side by side.
# It also matches global models and validation sets, which the router skips unread.
UPDATE_SUFFIX = ".safetensors.zst"


def filters_overlap(a: tuple[str, str], b: tuple[str, str]) -> bool:
    """Whether two ``(prefix, suffix)`` filters overlap as S3 judges it (both the prefixes
    and the suffixes: one a prefix, resp. a suffix, of the other)."""
    prefixes = a[0].startswith(b[0]) or b[0].startswith(a[0])
    suffixes = a[1].endswith(b[1]) or b[1].endswith(a[1])
    return prefixes and suffixes


class CommitNotification(pulumi.ComponentResource):
    """The bucket's notifications of manifest and update writes to the router (two filters on
    ``jobs/``, one invoke permission for both)."""

    permission: aws.lambda_.Permission
    notification: aws.s3.BucketNotification

    def __init__(
        self,
        resource_name: str,
        *,
        bucket: aws.s3.Bucket,
        bucket_arn: str,
        account: str,
        function: aws.lambda_.Function,
        opts: pulumi.ResourceOptions | None = None,
    ) -> None:
        super().__init__("flstore:notifications:CommitNotification", resource_name, None, opts)
        self.permission = aws.lambda_.Permission(
            f"{resource_name}-permission",
            action="lambda:InvokeFunction",
            function=function.name,
            principal="s3.amazonaws.com",
            source_arn=bucket_arn,
            source_account=account,
            opts=pulumi.ResourceOptions(parent=self),
        )
        self.notification = aws.s3.BucketNotification(
            resource_name,
            bucket=bucket.id,
            lambda_functions=[
                {
                    "lambda_function_arn": function.arn,
                    "events": MANIFEST_EVENTS,
                    "filter_prefix": MANIFEST_PREFIX,
                    "filter_suffix": suffix,
                }
                for suffix in (MANIFEST_SUFFIX, UPDATE_SUFFIX)
            ],
            opts=pulumi.ResourceOptions(parent=self, depends_on=[self.permission]),
        )
        self.register_outputs({})
