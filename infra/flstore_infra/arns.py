"""ARNs of the things FLStore names itself, known before anything is created.

Function, log-group and bucket names are fixed by the stack config, so their ARNs follow
from the account, region and partition alone. Building them here (rather than waiting for
resource outputs) lets every policy document be rendered and checked at preview time.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AwsScope:
    """The partition, region and account a stack deploys into."""

    partition: str
    region: str
    account: str

    def lambda_function(self, name: str) -> str:
        return f"arn:{self.partition}:lambda:{self.region}:{self.account}:function:{name}"

    def log_group(self, name: str) -> str:
        """ARN of a log group, without the ``:*`` that IAM statements add for its streams."""
        return f"arn:{self.partition}:logs:{self.region}:{self.account}:log-group:{name}"

    def s3_bucket(self, name: str) -> str:
        return f"arn:{self.partition}:s3:::{name}"

    def bucket_name(self, prefix: str) -> str:
        """One data bucket per prefix, account and region (S3 names are global)."""
        return f"{prefix}-{self.account}-{self.region}"


def lambda_log_group_name(function_name: str) -> str:
    """The log group Lambda writes a function's logs to."""
    return f"/aws/lambda/{function_name}"
