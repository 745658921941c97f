"""Least-privilege policy documents for FLStore, and the check that keeps them least-privilege.

Each builder is a pure function from ARNs to a policy document (a dict). ``render`` turns
a document into the JSON the program hands to AWS, but only after
``find_unsafe_statements`` found nothing wrong with it, so an unsafe document stops the
deployment at preview instead of reaching IAM. The tests run the same check on every
document the program declares.

What each function kind may do (ARCHITECTURE §2-§3):

| kind | S3 (only its bucket) | Lambda | logs |
|---|---|---|---|
| cache node | read/list ``jobs/``; write ``{job}/results/``, ``{job}/meta/rows.zst`` | none | own |
| router | read/list ``jobs/``; write ``{job}/results/``, ``{job}/warm/`` | the cache nodes | own |
| authorizer | none | none | own |

(``{job}/…`` is under ``jobs/``; the cache nodes log to their own groups, the exact ARNs of
the nodes are the router's to invoke.)

Cache nodes write results too: a model result (e.g. ``fedavg`` of a ResNet) is computed on
the node and is far larger than the 6 MB a Lambda response can carry back to the router. A
cache node also writes its job's meta rows (``jobs/{job}/meta/rows.zst``), derived from the
manifests, so that a cold load of a long job's meta shard reads one object and not every
manifest.
The router also writes each round's warm marker (``jobs/{job}/warm/{round:08d}.json``) when the
bucket's notification of a committed manifest has warmed it
(:mod:`flstore_core.routing.commit_warming`): that is the whole of what commit-driven warming
adds to its role, since it already invokes the cache nodes and reads every job's objects.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

POLICY_VERSION = "2012-10-17"
DATA_PREFIX = "jobs/"
RESULT_OBJECTS = "jobs/*/results/*"
# A `*` in an S3 ARN matches across `/`, so RESULT_OBJECTS alone also matches any key with a
# `/results/` segment deeper down (`jobs/a/rounds/00000001/updates/results/x`). IAM has no
# segment wildcard and no condition key holding the object key for PutObject/DeleteObject, so
# each grant on RESULT_OBJECTS comes with a Deny of NOT_RESULT_OBJECTS: a `/results/` after two
# or more segments below `jobs/`. Job ids hold no `/` (flstore_core.ids), so every key of
# `jobs/{job}/results/` stays allowed (but a workload named `results` could not write there).
NOT_RESULT_OBJECTS = "jobs/*/*/results/*"
RESULT_WRITE_ACTIONS = (
    "s3:PutObject",
    "s3:PutObjectTagging",
    "s3:DeleteObject",
    "s3:AbortMultipartUpload",
)
LOG_ACTIONS = ("logs:CreateLogStream", "logs:PutLogEvents")
# the warm markers, with the same Deny as results for what `*` matches deeper down
WARM_MARKERS = "jobs/*/warm/*"
NOT_WARM_MARKERS = "jobs/*/*/warm/*"
# a job's meta rows, which a cache node writes so a cold load need not read every manifest
# (flstore_core/cache/meta_snapshot.py); the same Deny for `*` reaching deeper down
META_ROWS = "jobs/*/meta/rows.zst"
NOT_META_ROWS = "jobs/*/*/meta/rows.zst"

Policy = dict[str, Any]


class UnsafePolicyError(ValueError):
    """A policy document failed ``find_unsafe_statements``; ``findings`` says why."""

    def __init__(self, findings: Sequence[str]) -> None:
        self.findings = list(findings)
        super().__init__("unsafe policy document: " + "; ".join(self.findings))


def _document(statements: Iterable[Mapping[str, Any]]) -> Policy:
    return {"Version": POLICY_VERSION, "Statement": [dict(s) for s in statements]}


def lambda_trust_policy() -> Policy:
    """Who may assume a function role: the Lambda service, nobody else."""
    return _document(
        [
            {
                "Sid": "LambdaAssumesRole",
                "Effect": "Allow",
                "Principal": {"Service": "lambda.amazonaws.com"},
                "Action": "sts:AssumeRole",
            }
        ]
    )


def _write_own_logs(log_group_arns: Sequence[str]) -> dict[str, Any]:
    # `:*` covers the group's log streams, which is where PutLogEvents lands; the groups
    # themselves are created by the program, so no logs:CreateLogGroup.
    return {
        "Sid": "WriteOwnLogs",
        "Effect": "Allow",
        "Action": list(LOG_ACTIONS),
        "Resource": [f"{arn}:*" for arn in log_group_arns],
    }


def _read_job_data(bucket_arn: str) -> list[dict[str, Any]]:
    return [
        {
            "Sid": "ReadJobObjects",
            "Effect": "Allow",
            "Action": ["s3:GetObject"],
            "Resource": [f"{bucket_arn}/{DATA_PREFIX}*"],
        },
        {
            # Listings with a prefix only under `jobs/`. IfExists: a GET or HEAD of a missing
            # key asks for ListBucket without a prefix, and must be allowed for S3 to answer
            # 404 (an unknown job or round, a result memo's miss) instead of 403, which the
            # store would have to take for an outage. IAM cannot tell that check from a LIST
            # sent without a prefix, so the role can list key names (never read objects)
            # outside `jobs/` too: the price of honest 404s, stated in docs/security.md.
            "Sid": "ListJobObjects",
            "Effect": "Allow",
            "Action": ["s3:ListBucket"],
            "Resource": [bucket_arn],
            "Condition": {"StringLikeIfExists": {"s3:prefix": [DATA_PREFIX, f"{DATA_PREFIX}*"]}},
        },
    ]


def _write_results(bucket_arn: str) -> dict[str, Any]:
    # PutObjectTagging: results are written with the `flstore:kind=result` tag that the
    # bucket's lifecycle rule expires them by.
    return {
        "Sid": "WriteResults",
        "Effect": "Allow",
        "Action": ["s3:PutObject", "s3:PutObjectTagging"],
        "Resource": [f"{bucket_arn}/{RESULT_OBJECTS}"],
    }


def _only_job_results(bucket_arn: str) -> dict[str, Any]:
    # see NOT_RESULT_OBJECTS: what RESULT_OBJECTS matches beyond `jobs/{job}/results/`
    return {
        "Sid": "DenyResultWritesOutsideJobResults",
        "Effect": "Deny",
        "Action": list(RESULT_WRITE_ACTIONS),
        "Resource": [f"{bucket_arn}/{NOT_RESULT_OBJECTS}"],
    }


def _compose_results(bucket_arn: str) -> dict[str, Any]:
    # the router joins a sharded round's model result from the frames its block holders wrote
    # (a multipart upload copying them: PutObject on the result, GetObject on the parts), then
    # deletes the frames, and aborts the upload if a part fails
    return {
        "Sid": "ComposeResults",
        "Effect": "Allow",
        "Action": ["s3:AbortMultipartUpload", "s3:DeleteObject"],
        "Resource": [f"{bucket_arn}/{RESULT_OBJECTS}"],
    }


def _write_warm_markers(bucket_arn: str) -> list[dict[str, Any]]:
    # a marker says a round is warm at a manifest version (commit-driven warming); only PUT:
    # a marker is replaced, never tagged or deleted. The Deny keeps `*` from reaching a
    # `/warm/` segment below a job's own prefix (see NOT_RESULT_OBJECTS); it would also refuse
    # a result key with a `/warm/` segment, and no workload or result part is named so
    return [
        {
            "Sid": "WriteWarmMarkers",
            "Effect": "Allow",
            "Action": ["s3:PutObject"],
            "Resource": [f"{bucket_arn}/{WARM_MARKERS}"],
        },
        {
            "Sid": "DenyMarkerWritesOutsideJobWarm",
            "Effect": "Deny",
            "Action": ["s3:PutObject"],
            "Resource": [f"{bucket_arn}/{NOT_WARM_MARKERS}"],
        },
    ]


def _write_meta_rows(bucket_arn: str) -> list[dict[str, Any]]:
    # one object a job, replaced whole: only PUT, never tagged or deleted
    return [
        {
            "Sid": "WriteMetaRows",
            "Effect": "Allow",
            "Action": ["s3:PutObject"],
            "Resource": [f"{bucket_arn}/{META_ROWS}"],
        },
        {
            "Sid": "DenyMetaRowsOutsideJobMeta",
            "Effect": "Deny",
            "Action": ["s3:PutObject"],
            "Resource": [f"{bucket_arn}/{NOT_META_ROWS}"],
        },
    ]


def _use_bucket_key(kms_key_arn: str) -> dict[str, Any]:
    region = kms_key_arn.split(":")[3]
    return {
        "Sid": "UseBucketKeyThroughS3",
        "Effect": "Allow",
        "Action": ["kms:Decrypt", "kms:GenerateDataKey"],
        "Resource": [kms_key_arn],
        # Only on behalf of S3, so the role cannot decrypt arbitrary ciphertext with the key.
        "Condition": {"StringEquals": {"kms:ViaService": f"s3.{region}.amazonaws.com"}},
    }


def cache_node_policy(
    *, bucket_arn: str, log_group_arns: Sequence[str], kms_key_arn: str | None = None
) -> Policy:
    """The cache-node role: read job data, write results and a job's meta rows, log to the
    cache-node groups."""
    statements = [
        *_read_job_data(bucket_arn),
        _write_results(bucket_arn),
        _only_job_results(bucket_arn),
        *_write_meta_rows(bucket_arn),
    ]
    if kms_key_arn:
        statements.append(_use_bucket_key(kms_key_arn))
    statements.append(_write_own_logs(log_group_arns))
    return _document(statements)


def router_policy(
    *,
    bucket_arn: str,
    log_group_arn: str,
    cache_function_arns: Sequence[str],
    kms_key_arn: str | None = None,
) -> Policy:
    """The router role: invoke exactly the cache nodes, read job data, write results (and
    join and delete the frames of a sharded round's model result) and warm markers."""
    statements = [
        {
            "Sid": "InvokeCacheNodes",
            "Effect": "Allow",
            "Action": ["lambda:InvokeFunction"],
            "Resource": list(cache_function_arns),
        },
        *_read_job_data(bucket_arn),
        _write_results(bucket_arn),
        _compose_results(bucket_arn),
        _only_job_results(bucket_arn),
        *_write_warm_markers(bucket_arn),
    ]
    if kms_key_arn:
        statements.append(_use_bucket_key(kms_key_arn))
    statements.append(_write_own_logs([log_group_arn]))
    return _document(statements)


def authorizer_policy(*, log_group_arn: str) -> Policy:
    """The authorizer role: its tokens come from its environment, so only its logs."""
    return _document([_write_own_logs([log_group_arn])])


def image_repository_policy(*, function_arns: Sequence[str]) -> Policy:
    """The image repository's policy: Lambda may pull it, for the cache nodes only.

    Declared here rather than left to Lambda (which adds one on first use if the deployer
    may), so the deployer needs no ecr:SetRepositoryPolicy and state matches AWS.
    """
    return _document(
        [
            {
                "Sid": "LambdaPullsForCacheNodes",
                "Effect": "Allow",
                "Principal": {"Service": "lambda.amazonaws.com"},
                "Action": ["ecr:BatchGetImage", "ecr:GetDownloadUrlForLayer"],
                "Condition": {
                    "StringLike": {
                        "aws:sourceArn": [
                            qualified for arn in function_arns for qualified in (arn, f"{arn}:*")
                        ]
                    }
                },
            }
        ]
    )


def bucket_policy(*, bucket_arn: str) -> Policy:
    """The data bucket's resource policy: refuse plain HTTP and TLS older than 1.2."""
    resources = [bucket_arn, f"{bucket_arn}/*"]
    return _document(
        [
            {
                "Sid": "DenyInsecureTransport",
                "Effect": "Deny",
                "Principal": "*",
                "Action": "s3:*",
                "Resource": resources,
                "Condition": {"Bool": {"aws:SecureTransport": "false"}},
            },
            {
                "Sid": "DenyOutdatedTls",
                "Effect": "Deny",
                "Principal": "*",
                "Action": "s3:*",
                "Resource": resources,
                "Condition": {"NumericLessThan": {"s3:TlsVersion": "1.2"}},
            },
        ]
    )


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, list | tuple) else [value]


def _is_public(principal: Any) -> bool:
    if principal == "*":
        return True
    if isinstance(principal, Mapping):
        return any("*" in _as_list(v) for v in principal.values())
    return False


_TYPED_WILDCARD = re.compile(r"^[A-Za-z0-9-]+[:/]\*$")  # e.g. `function:*`, `log-group:*`


def _unscoped(resource: Any) -> str | None:
    """Why a Resource entry covers more than FLStore's own things, or None if it does not."""
    if not isinstance(resource, str):
        return "is not a string"
    if resource == "*":
        return "is every resource ('*')"
    parts = resource.split(":", 5)
    if len(parts) < 6 or parts[0] != "arn":
        return "is not an ARN"
    _, _, service, _, account, rest = parts
    if account == "*":
        return "spans every account"
    if service == "s3":
        if "*" in rest.split("/", 1)[0]:
            return "spans every bucket"
        return None
    if rest == "*" or rest.startswith("*") or _TYPED_WILDCARD.match(rest):
        return f"spans every {service} resource"
    return None


def find_unsafe_statements(policy: Mapping[str, Any] | str) -> list[str]:
    """List what makes a policy document unsafe; an empty list means it passed.

    Deny statements only ever narrow access, so they pass. An Allow statement fails on:
    any wildcard in an action (``*``, ``s3:*``, ``s3:Get*``), ``NotAction`` /
    ``NotResource`` / ``NotPrincipal``, a ``*`` principal, a resource that is ``*`` or spans
    a whole service, account or every bucket, and an identity statement with no resource.
    """
    doc = json.loads(policy) if isinstance(policy, str) else policy
    if not isinstance(doc, Mapping) or "Statement" not in doc:
        return ["document has no Statement"]
    statements = doc["Statement"]
    if isinstance(statements, Mapping):
        statements = [statements]
    findings: list[str] = []
    for index, statement in enumerate(statements):
        where = f"statement {index}"
        if isinstance(statement, Mapping) and statement.get("Sid"):
            where += f" ({statement['Sid']})"
        if not isinstance(statement, Mapping):
            findings.append(f"{where}: is not an object")
            continue
        effect = statement.get("Effect")
        if effect == "Deny":
            continue
        if effect != "Allow":
            findings.append(f"{where}: Effect must be Allow or Deny, not {effect!r}")
            continue
        for key in ("NotAction", "NotResource", "NotPrincipal"):
            if key in statement:
                findings.append(f"{where}: Allow with {key} grants everything not listed")
        actions = _as_list(statement.get("Action"))
        if not actions and "NotAction" not in statement:
            findings.append(f"{where}: has no Action")
        for action in actions:
            if not isinstance(action, str) or "*" in action:
                findings.append(f"{where}: wildcard action {action!r}")
        if "Principal" in statement:
            if _is_public(statement["Principal"]):
                findings.append(f"{where}: allows any principal ('*')")
        elif "Resource" not in statement and "NotResource" not in statement:
            findings.append(f"{where}: has no Resource")
        for resource in _as_list(statement.get("Resource")):
            reason = _unscoped(resource)
            if reason:
                findings.append(f"{where}: resource {resource!r} {reason}")
    return findings


def render(policy: Mapping[str, Any]) -> str:
    """The JSON of a policy document that passed ``find_unsafe_statements``.

    Raises ``UnsafePolicyError`` otherwise: the program's guard against ever deploying one.
    """
    findings = find_unsafe_statements(policy)
    if findings:
        raise UnsafePolicyError(findings)
    return json.dumps(policy, separators=(",", ":"))
