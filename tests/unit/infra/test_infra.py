"""The Pulumi program under mocks: what ``pulumi up`` would declare, for two stack configs.

No Pulumi CLI and no AWS: ``RecordingMocks`` stands in for the engine and records every
resource's inputs. Each test runs the program afresh and asserts on what it declared,
inside an ``apply`` that waits until every resource is registered; ``@pulumi.runtime.test``
makes a failed assertion there fail the test instead of vanishing. The program builds what
it deploys for real, as under `pulumi up` (no `build/` step): the router zip and the image
context come from this working tree and the build cache (see test_packaging.py).
"""

from __future__ import annotations

import json
import re
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pulumi
import pytest

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO / "infra"))

ACCOUNT = "123456789012"
DIGEST = "sha256:" + "ab" * 32
TOKEN_HASH = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"

# The two stacks of the issue: the defaults, and 5 nodes / R=3 / another prefix.
DEFAULTS = {"aws:region": "us-east-1"}
FIVE_NODES = {
    "aws:region": "eu-west-1",
    "flstore:cacheNodes": "5",
    "flstore:replication": "3",
    "flstore:prefix": "fltest",
    "flstore:hotRounds": "3",
    "flstore:keepWarmMinutes": "1",
    "flstore:cacheMemoryMb": "4096",
    "flstore:routerMemoryMb": "1024",
    "flstore:architecture": "arm64",
    "flstore:logRetentionDays": "30",
    "flstore:tokenHashes": json.dumps({TOKEN_HASH: ["demo", "other-job"]}),
}
KMS_KEY = "arn:aws:kms:eu-west-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab"


# How the engine protocol marks a secret value (pulumi.runtime.rpc).
_SIG_KEY, _SECRET_SIG = "4dabf18193072939515e22adb298388d", "1b47061264138c4ac30d75fd1eb44270"


def _is_secret(value: Any) -> bool:
    return isinstance(value, dict) and value.get(_SIG_KEY) == _SECRET_SIG


def reveal(value: Any) -> Any:
    """``value`` with every secret replaced by its plain value."""
    if _is_secret(value):
        return reveal(value["value"])
    if isinstance(value, dict):
        return {k: reveal(v) for k, v in value.items()}
    if isinstance(value, list):
        return [reveal(v) for v in value]
    return value


@dataclass
class Declared:
    """One resource the program declared: type token, name, (camelCase) inputs revealed."""

    type: str
    name: str
    inputs: dict[str, Any]
    secret_inputs: frozenset[str] = frozenset()


@dataclass
class RecordingMocks(pulumi.runtime.Mocks):
    """Mock engine: records every resource and computes the outputs AWS would."""

    region: str = "us-east-1"
    declared: list[Declared] = field(default_factory=list)

    def new_resource(self, args: pulumi.runtime.MockResourceArgs) -> tuple[str, dict]:
        inputs = reveal(dict(args.inputs))
        secret = frozenset(k for k, v in args.inputs.items() if _is_secret(v))
        self.declared.append(Declared(args.typ, args.name, inputs, secret))
        return f"{args.name}-id", {**inputs, **self._computed(args.typ, args.name, inputs)}

    def _computed(self, typ: str, name: str, inputs: dict[str, Any]) -> dict[str, Any]:
        region = self.region
        if typ == "aws:s3/bucket:Bucket":
            return {"arn": f"arn:aws:s3:::{inputs['bucket']}"}
        if typ == "aws:lambda/function:Function":
            arn = f"arn:aws:lambda:{region}:{ACCOUNT}:function:{inputs['name']}"
            invoke = f"arn:aws:apigateway:{region}:lambda:path/2015-03-31/functions/{arn}"
            return {"arn": arn, "invokeArn": f"{invoke}/invocations"}
        if typ == "aws:iam/role:Role":
            return {"arn": f"arn:aws:iam::{ACCOUNT}:role/{name}"}
        if typ == "aws:cloudwatch/logGroup:LogGroup":
            return {"arn": f"arn:aws:logs:{region}:{ACCOUNT}:log-group:{inputs['name']}"}
        if typ == "aws:cloudwatch/eventRule:EventRule":
            return {"arn": f"arn:aws:events:{region}:{ACCOUNT}:rule/{inputs['name']}"}
        if typ == "aws:apigatewayv2/api:Api":
            return {
                "apiEndpoint": f"https://abc123.execute-api.{region}.amazonaws.com",
                "executionArn": f"arn:aws:execute-api:{region}:{ACCOUNT}:abc123",
            }
        if typ == "aws:apigatewayv2/stage:Stage":
            return {"invokeUrl": f"https://abc123.execute-api.{region}.amazonaws.com/"}
        if typ == "aws:ecr/repository:Repository":
            url = f"{ACCOUNT}.dkr.ecr.{region}.amazonaws.com/{inputs['name']}"
            return {"repositoryUrl": url, "registryId": ACCOUNT}
        if typ == "docker-build:index:Image":
            return {"digest": DIGEST, "ref": f"{inputs['tags'][0]}@{DIGEST}"}
        return {}

    def call(self, args: pulumi.runtime.MockCallArgs) -> dict[str, Any]:
        region = self.region
        return {
            "aws:index/getCallerIdentity:getCallerIdentity": {
                "accountId": ACCOUNT,
                "arn": f"arn:aws:iam::{ACCOUNT}:user/deployer",
                "id": ACCOUNT,
                "userId": "AIDAEXAMPLE",
            },
            "aws:index/getPartition:getPartition": {
                "partition": "aws",
                "dnsSuffix": "amazonaws.com",
                "id": "aws",
                "reverseDnsPrefix": "com.amazonaws",
            },
            "aws:index/getRegion:getRegion": {"region": region, "name": region, "id": region},
            "aws:ecr/getAuthorizationToken:getAuthorizationToken": {
                "authorizationToken": "QVdTOnRva2Vu",
                "expiresAt": "2030-01-01T00:00:00Z",
                "id": region,
                "password": "token",
                "proxyEndpoint": f"https://{ACCOUNT}.dkr.ecr.{region}.amazonaws.com",
                "region": region,
                "registryId": ACCOUNT,
                "userName": "AWS",
            },
        }.get(args.token, {})


MOCKS = RecordingMocks()
pulumi.runtime.set_mocks(MOCKS, project="flstore", stack="test", preview=False)

# The program is imported only now that the mocks are in place.
from flstore_infra import api, iam, keepwarm, packaging, target  # noqa: E402
from flstore_infra.notifications import filters_overlap  # noqa: E402
from flstore_infra.settings import ConfigError, StackSettings, parse_token_hashes  # noqa: E402
from flstore_infra.stack import OUTPUTS, FLStoreStack, create_stack  # noqa: E402

# Every resource the program constructs passes through this stack transformation: it
# collects them (to wait for their registration) and applies a test's `tamper`, if any.
_constructed: list[pulumi.Resource] = []
_tampering: list[Callable[[pulumi.ResourceTransformationArgs], dict | None]] = []


def _observe(args: pulumi.ResourceTransformationArgs) -> pulumi.ResourceTransformationResult | None:
    _constructed.append(args.resource)
    for tamper in _tampering:
        props = tamper(args)
        if props is not None:
            return pulumi.ResourceTransformationResult(props, args.opts)
    return None


pulumi.runtime.register_stack_transformation(_observe)


@dataclass
class Deployment:
    """What one run of the program declared."""

    stack: FLStoreStack
    declared: list[Declared]

    def of_type(self, token: str) -> list[Declared]:
        return [d for d in self.declared if d.type == token]

    def named(self, token: str, name: str) -> Declared:
        (match,) = [d for d in self.of_type(token) if d.name == name]
        return match


FUNCTION = "aws:lambda/function:Function"
PERMISSION = "aws:lambda/permission:Permission"
ROLE = "aws:iam/role:Role"
ROLE_POLICY = "aws:iam/rolePolicy:RolePolicy"
LOG_GROUP = "aws:cloudwatch/logGroup:LogGroup"
RULE = "aws:cloudwatch/eventRule:EventRule"
TARGET = "aws:cloudwatch/eventTarget:EventTarget"
ROUTE = "aws:apigatewayv2/route:Route"
PUBLIC_ACCESS_BLOCK = "aws:s3/bucketPublicAccessBlock:BucketPublicAccessBlock"
ENCRYPTION = (
    "aws:s3/bucketServerSideEncryptionConfiguration:BucketServerSideEncryptionConfiguration"
)
BUCKET_POLICY = "aws:s3/bucketPolicy:BucketPolicy"
REPO_POLICY = "aws:ecr/repositoryPolicy:RepositoryPolicy"
NOTIFICATION = "aws:s3/bucketNotification:BucketNotification"


def run_program(config: dict[str, str]) -> FLStoreStack:
    """Run the program with a fresh stack config; returns before registration finishes.

    The program builds what it deploys, as under `pulumi up`: the router zip and the image
    context from this working tree, in the build cache (the wheels are downloaded the first
    time only).
    """
    MOCKS.declared.clear()
    MOCKS.region = config["aws:region"]
    _constructed.clear()
    secret = [k for k in config if k == "flstore:tokenHashes"]
    pulumi.runtime.set_all_config(config, secret)
    return create_stack()


def deploy(config: dict[str, str]) -> pulumi.Output[Deployment]:
    """Run the program; the Output resolves once every declared resource is registered."""
    stack = run_program(config)
    registered = pulumi.Output.all(*[r.urn for r in _constructed])
    return registered.apply(lambda _: Deployment(stack, list(MOCKS.declared)))


def policy_documents(deployment: Deployment) -> dict[str, dict[str, Any]]:
    """Every IAM document the program declared, by the resource that carries it."""
    docs = {d.name: json.loads(d.inputs["policy"]) for d in deployment.of_type(ROLE_POLICY)}
    docs |= {d.name: json.loads(d.inputs["assumeRolePolicy"]) for d in deployment.of_type(ROLE)}
    docs |= {d.name: json.loads(d.inputs["policy"]) for d in deployment.of_type(BUCKET_POLICY)}
    docs |= {d.name: json.loads(d.inputs["policy"]) for d in deployment.of_type(REPO_POLICY)}
    return docs


def resources_of(policy: dict[str, Any], action: str) -> set[str]:
    return {
        resource
        for statement in policy["Statement"]
        if statement["Effect"] == "Allow" and action in statement["Action"]
        for resource in statement["Resource"]
    }


def security_findings(deployment: Deployment) -> list[str]:
    """The stack-wide audit: a private, encrypted, TLS-only bucket and safe policies."""
    findings = []
    for block in deployment.of_type(PUBLIC_ACCESS_BLOCK):
        flags = (
            "blockPublicAcls",
            "blockPublicPolicy",
            "ignorePublicAcls",
            "restrictPublicBuckets",
        )
        open_flags = [f for f in flags if block.inputs.get(f) is not True]
        if open_flags:
            findings.append(f"{block.name}: public access not blocked: {open_flags}")
    for bucket in deployment.of_type("aws:s3/bucket:Bucket"):
        if not deployment.of_type(PUBLIC_ACCESS_BLOCK):
            findings.append(f"{bucket.name}: no public access block")
        encryption = deployment.of_type(ENCRYPTION)
        algorithms = {
            rule["applyServerSideEncryptionByDefault"]["sseAlgorithm"]
            for config in encryption
            for rule in config.inputs["rules"]
        }
        if not algorithms or not algorithms <= {"AES256", "aws:kms"}:
            findings.append(f"{bucket.name}: not encrypted at rest ({algorithms})")
    for name, document in policy_documents(deployment).items():
        findings += [f"{name}: {finding}" for finding in iam.find_unsafe_statements(document)]
    for permission in deployment.of_type(PERMISSION):
        if not permission.inputs.get("sourceArn"):
            findings.append(f"{permission.name}: any {permission.inputs['principal']} may invoke")
    return findings


# --- resource counts follow the config -------------------------------------------------


@pulumi.runtime.test
def test_default_stack_has_eight_cache_nodes_named_by_prefix() -> None:
    def check(d: Deployment) -> None:
        names = sorted(f.inputs["name"] for f in d.of_type(FUNCTION))
        expected = [f"flstore-cache-{i}" for i in range(8)]
        assert names == sorted([*expected, "flstore-router", "flstore-authorizer"])
        assert len(d.of_type(TARGET)) == 8
        assert len(d.of_type(RULE)) == 2  # EventBridge takes at most 5 targets per rule

    return deploy(DEFAULTS).apply(check)


@pulumi.runtime.test
def test_five_nodes_make_five_functions_targets_and_permissions() -> None:
    def check(d: Deployment) -> None:
        cache = [f for f in d.of_type(FUNCTION) if f.inputs.get("packageType") == "Image"]
        assert sorted(f.inputs["name"] for f in cache) == [f"fltest-cache-{i}" for i in range(5)]
        assert len(d.of_type(TARGET)) == 5
        assert len(d.of_type(RULE)) == 1
        events = [
            p for p in d.of_type(PERMISSION) if p.inputs["principal"] == "events.amazonaws.com"
        ]
        assert len(events) == 5
        api = [
            p for p in d.of_type(PERMISSION) if p.inputs["principal"] == "apigateway.amazonaws.com"
        ]
        # the router for the /v1 routes and for $default (unmatched requests), the authorizer
        assert len(api) == 3
        arns = sorted(str(p.inputs["sourceArn"]).split(":")[-1].split("/", 1)[1] for p in api)
        assert arns == ["*/$default", "*/*/v1/*", "authorizers/" + arns[2].split("/")[1]]
        assert len(d.of_type(LOG_GROUP)) == 5 + 2 + 1  # cache nodes, router/authorizer, API

    return deploy(FIVE_NODES).apply(check)


@pulumi.runtime.test
def test_cache_nodes_get_placement_and_budget_from_config() -> None:
    def check(d: Deployment) -> None:
        for i in range(5):
            node = d.named(FUNCTION, f"fltest-cache-{i}")
            env = node.inputs["environment"]["variables"]
            assert env["FLSTORE_NODE_INDEX"] == str(i)
            assert env["FLSTORE_CACHE_NODES"] == "5"
            assert env["FLSTORE_REPLICATION"] == "3"
            assert env["FLSTORE_HOT_ROUNDS"] == "3"
            assert env["FLSTORE_PREFIX"] == "fltest"
            assert env["FLSTORE_BUCKET"] == f"fltest-{ACCOUNT}-eu-west-1"
            # 4096 MB less the torch runtime (288 MB) and one request's working memory (64 MB)
            assert env["FLSTORE_CACHE_BUDGET_BYTES"] == str((4096 - 288 - 64) * 2**20)
            assert "FLSTORE_TOKENS" not in env
            assert node.inputs["memorySize"] == 4096
            assert node.inputs["architectures"] == ["arm64"]
            assert node.inputs["imageUri"] == (
                f"{ACCOUNT}.dkr.ecr.eu-west-1.amazonaws.com/fltest-cache-node@{DIGEST}"
            )

    return deploy(FIVE_NODES).apply(check)


@pulumi.runtime.test
def test_cache_node_image_is_built_from_the_staged_context_and_pushed() -> None:
    def check(d: Deployment) -> None:
        (image,) = d.of_type("docker-build:index:Image")
        context = d.stack.artifacts.cache_node_context
        assert image.inputs["context"]["location"] == str(context)
        assert image.inputs["dockerfile"]["location"] == str(context / "Dockerfile")
        assert (context / "Dockerfile").read_bytes() == packaging.DOCKERFILE_SOURCE.read_bytes()
        assert image.inputs["push"] is True
        assert image.inputs["platforms"] == ["linux/arm64"]
        assert image.inputs["buildArgs"] == {"PYTHON_VERSION": target.LAMBDA_PYTHON}
        repo_url = f"{ACCOUNT}.dkr.ecr.eu-west-1.amazonaws.com/fltest-cache-node"
        assert image.inputs["tags"] == [f"{repo_url}:latest"]
        (registry,) = image.inputs["registries"]
        assert registry["address"] == f"{ACCOUNT}.dkr.ecr.eu-west-1.amazonaws.com"
        (repository,) = d.of_type("aws:ecr/repository:Repository")
        assert repository.inputs["imageScanningConfiguration"] == {"scanOnPush": True}

    return deploy(FIVE_NODES).apply(check)


@pulumi.runtime.test
def test_router_and_authorizer_ship_the_zip_with_the_token_hashes() -> None:
    def check(d: Deployment) -> None:
        router = d.named(FUNCTION, "fltest-router")
        authorizer = d.named(FUNCTION, "fltest-authorizer")
        assert router.inputs["handler"] == "lambdas.router.handler"
        assert authorizer.inputs["handler"] == "lambdas.authorizer.handler"
        assert router.inputs["memorySize"] == 1024
        assert router.inputs["timeout"] <= 30
        for function in (router, authorizer):
            assert function.inputs["runtime"] == target.LAMBDA_RUNTIME
            assert isinstance(function.inputs["code"], pulumi.FileArchive)
            assert function.inputs["code"].path == str(d.stack.artifacts.router_zip)
            with zipfile.ZipFile(function.inputs["code"].path) as archive:
                module = function.inputs["handler"].rsplit(".", 1)[0]
                assert archive.getinfo(module.replace(".", "/") + ".py")
            tokens = json.loads(function.inputs["environment"]["variables"]["FLSTORE_TOKENS"])
            assert tokens == {TOKEN_HASH: ["demo", "other-job"]}
            assert "environment" in function.secret_inputs  # kept out of state and logs
        router_env = router.inputs["environment"]["variables"]
        assert router_env["FLSTORE_CACHE_NODES"] == "5"
        assert router_env["FLSTORE_REPLICATION"] == "3"
        assert router_env["FLSTORE_CACHE_MEMORY_MB"] == "4096"
        # the router plans column blocks with the budget the nodes hold data under
        assert router_env["FLSTORE_CACHE_BUDGET_BYTES"] == str((4096 - 288 - 64) * 2**20)
        assert router_env["FLSTORE_BUCKET"] == f"fltest-{ACCOUNT}-eu-west-1"

    return deploy(FIVE_NODES).apply(check)


@pulumi.runtime.test
def test_keep_warm_pings_every_cache_node_at_the_configured_rate() -> None:
    def check(d: Deployment) -> None:
        assert [r.inputs["scheduleExpression"] for r in d.of_type(RULE)] == ["rate(1 minute)"]
        pinged = {t.inputs["arn"] for t in d.of_type(TARGET)}
        assert pinged == {
            f"arn:aws:lambda:eu-west-1:{ACCOUNT}:function:fltest-cache-{i}" for i in range(5)
        }
        assert {json.loads(t.inputs["input"])["op"] for t in d.of_type(TARGET)} == {"ping"}
        rule_arn = f"arn:aws:events:eu-west-1:{ACCOUNT}:rule/fltest-keepwarm-0"
        events = [
            p for p in d.of_type(PERMISSION) if p.inputs["principal"] == "events.amazonaws.com"
        ]
        assert {p.inputs["sourceArn"] for p in events} == {rule_arn}

    return deploy(FIVE_NODES).apply(check)


@pulumi.runtime.test
def test_keep_warm_minutes_zero_turns_the_schedule_off() -> None:
    def check(d: Deployment) -> None:
        assert d.of_type(RULE) == [] and d.of_type(TARGET) == []

    return deploy({**DEFAULTS, "flstore:keepWarmMinutes": "0"}).apply(check)


@pulumi.runtime.test
def test_schedule_expression_uses_singular_for_one_minute() -> None:
    assert keepwarm.schedule_expression(1) == "rate(1 minute)"
    assert keepwarm.schedule_expression(5) == "rate(5 minutes)"


# --- least privilege ---------------------------------------------------------------------


@pytest.mark.parametrize("config", [DEFAULTS, FIVE_NODES], ids=["defaults", "five-nodes"])
@pulumi.runtime.test
def test_every_policy_document_passes_the_safety_check(config: dict) -> None:
    def check(d: Deployment) -> None:
        documents = policy_documents(d)
        # 3 role policies, 3 trust policies, the bucket's and the image repository's
        assert len(documents) == 3 + 3 + 1 + 1
        for name, document in documents.items():
            assert iam.find_unsafe_statements(document) == [], name
        assert security_findings(d) == []

    return deploy(config).apply(check)


@pytest.mark.parametrize("config", [DEFAULTS, FIVE_NODES], ids=["defaults", "five-nodes"])
@pulumi.runtime.test
def test_role_policies_are_scoped_to_bucket_nodes_and_own_logs(config: dict) -> None:
    prefix = config.get("flstore:prefix", "flstore")
    nodes = int(config.get("flstore:cacheNodes", 8))
    region = config["aws:region"]
    bucket = f"arn:aws:s3:::{prefix}-{ACCOUNT}-{region}"
    data = {
        bucket,
        f"{bucket}/jobs/*",
        f"{bucket}/jobs/*/results/*",
        f"{bucket}/jobs/*/*/results/*",
    }
    markers = {f"{bucket}/jobs/*/warm/*", f"{bucket}/jobs/*/*/warm/*"}
    meta_rows = {f"{bucket}/jobs/*/meta/rows.zst", f"{bucket}/jobs/*/*/meta/rows.zst"}
    cache_arns = {
        f"arn:aws:lambda:{region}:{ACCOUNT}:function:{prefix}-cache-{i}" for i in range(nodes)
    }

    def logs(*functions: str) -> set[str]:
        return {f"arn:aws:logs:{region}:{ACCOUNT}:log-group:/aws/lambda/{f}:*" for f in functions}

    def check(d: Deployment) -> None:
        docs = policy_documents(d)
        cache = docs[f"{prefix}-cache-nodes-policy"]
        router = docs[f"{prefix}-router-policy"]
        authorizer = docs[f"{prefix}-authorizer-policy"]

        def everything(policy: dict) -> set[str]:
            return {r for s in policy["Statement"] for r in s["Resource"]}

        cache_logs = logs(*[f"{prefix}-cache-{i}" for i in range(nodes)])
        assert everything(cache) == data | meta_rows | cache_logs
        assert everything(router) == data | markers | cache_arns | logs(f"{prefix}-router")
        assert everything(authorizer) == logs(f"{prefix}-authorizer")
        assert resources_of(router, "lambda:InvokeFunction") == cache_arns
        results = {f"{bucket}/jobs/*/results/*"}
        for policy in (cache, router):
            assert resources_of(policy, "s3:GetObject") == {f"{bucket}/jobs/*"}
            assert resources_of(policy, "s3:ListBucket") == {bucket}
        # a cache node also writes its job's meta rows (the cold-load snapshot)
        assert resources_of(cache, "s3:PutObject") == results | {f"{bucket}/jobs/*/meta/rows.zst"}
        # the router writes warm markers too (commit-driven warming), nothing else new
        assert resources_of(router, "s3:PutObject") == results | {f"{bucket}/jobs/*/warm/*"}
        assert resources_of(router, "s3:DeleteObject") == results
        assert resources_of(router, "s3:AbortMultipartUpload") == results
        assert resources_of(cache, "s3:DeleteObject") == set()
        for policy in (cache, router):
            denies = {s["Sid"]: s for s in policy["Statement"] if s["Effect"] == "Deny"}
            deny = denies.pop("DenyResultWritesOutsideJobResults")
            assert deny["Resource"] == [f"{bucket}/jobs/*/*/results/*"]
            assert set(deny["Action"]) == set(iam.RESULT_WRITE_ACTIONS)
            if policy is router:
                deny = denies.pop("DenyMarkerWritesOutsideJobWarm")
                assert deny["Resource"] == [f"{bucket}/jobs/*/*/warm/*"]
                assert deny["Action"] == ["s3:PutObject"]
            else:
                deny = denies.pop("DenyMetaRowsOutsideJobMeta")
                assert deny["Resource"] == [f"{bucket}/jobs/*/*/meta/rows.zst"]
                assert deny["Action"] == ["s3:PutObject"]
            assert denies == {}
        actions = {a for s in authorizer["Statement"] for a in s["Action"]}
        assert actions == set(iam.LOG_ACTIONS)
        for role in d.of_type(ROLE):
            trust = json.loads(role.inputs["assumeRolePolicy"])
            assert trust["Statement"][0]["Principal"] == {"Service": "lambda.amazonaws.com"}
        (pull,) = docs[f"{prefix}-cache-node-policy"]["Statement"]
        assert pull["Principal"] == {"Service": "lambda.amazonaws.com"}
        pullers = set(pull["Condition"]["StringLike"]["aws:sourceArn"])
        assert pullers == cache_arns | {f"{arn}:*" for arn in cache_arns}

    return deploy(config).apply(check)


@pulumi.runtime.test
def test_kms_key_encrypts_the_bucket_and_is_granted_only_through_s3() -> None:
    def check(d: Deployment) -> None:
        (encryption,) = d.of_type(ENCRYPTION)
        (rule,) = encryption.inputs["rules"]
        assert rule["applyServerSideEncryptionByDefault"] == {
            "sseAlgorithm": "aws:kms",
            "kmsMasterKeyId": KMS_KEY,
        }
        docs = policy_documents(d)
        for name in ("fltest-cache-nodes-policy", "fltest-router-policy"):
            assert resources_of(docs[name], "kms:Decrypt") == {KMS_KEY}
        assert resources_of(docs["fltest-authorizer-policy"], "kms:Decrypt") == set()
        assert security_findings(d) == []

    return deploy({**FIVE_NODES, "flstore:kmsKeyArn": KMS_KEY}).apply(check)


# --- the bucket ------------------------------------------------------------------------


@pulumi.runtime.test
def test_bucket_is_private_encrypted_versioned_and_tls_only() -> None:
    def check(d: Deployment) -> None:
        (bucket,) = d.of_type("aws:s3/bucket:Bucket")
        assert bucket.inputs["bucket"] == f"flstore-{ACCOUNT}-us-east-1"
        assert bucket.inputs["forceDestroy"] is False
        (block,) = d.of_type(PUBLIC_ACCESS_BLOCK)
        assert all(
            block.inputs[f] is True
            for f in (
                "blockPublicAcls",
                "blockPublicPolicy",
                "ignorePublicAcls",
                "restrictPublicBuckets",
            )
        )
        (encryption,) = d.of_type(ENCRYPTION)
        assert encryption.inputs["rules"][0]["applyServerSideEncryptionByDefault"] == {
            "sseAlgorithm": "AES256"
        }
        (versioning,) = d.of_type("aws:s3/bucketVersioning:BucketVersioning")
        assert versioning.inputs["versioningConfiguration"]["status"] == "Enabled"
        (ownership,) = d.of_type("aws:s3/bucketOwnershipControls:BucketOwnershipControls")
        assert ownership.inputs["rule"]["objectOwnership"] == "BucketOwnerEnforced"
        (policy,) = d.of_type(BUCKET_POLICY)
        deny_plain_http = [
            s
            for s in json.loads(policy.inputs["policy"])["Statement"]
            if s["Effect"] == "Deny"
            and s["Condition"].get("Bool", {}).get("aws:SecureTransport") == "false"
        ]
        assert deny_plain_http and deny_plain_http[0]["Principal"] == "*"

    return deploy(DEFAULTS).apply(check)


@pulumi.runtime.test
def test_results_expire_by_the_tag_results_are_written_with() -> None:
    def check(d: Deployment) -> None:
        (lifecycle,) = d.of_type("aws:s3/bucketLifecycleConfiguration:BucketLifecycleConfiguration")
        rules = {r["id"]: r for r in lifecycle.inputs["rules"]}
        results = rules["expire-results"]
        assert results["filter"]["tag"] == {"key": "flstore:kind", "value": "result"}
        assert results["expiration"]["days"] == 7
        assert rules["tidy-job-versions"]["filter"]["prefix"] == "jobs/"
        assert rules["tidy-job-versions"]["noncurrentVersionExpiration"]["noncurrentDays"] == 30

    return deploy(DEFAULTS).apply(check)


# --- the API -----------------------------------------------------------------------------


@pulumi.runtime.test
def test_every_route_but_health_and_the_docs_requires_the_authorizer() -> None:
    def check(d: Deployment) -> None:
        routes = {r.inputs["routeKey"]: r.inputs for r in d.of_type(ROUTE)}
        assert set(routes) == {
            "GET /v1/health",
            "GET /v1/workloads",
            "GET /v1/jobs/{job}/rounds",
            "POST /v1/jobs/{job}/workloads/{name}",
            "GET /v1/openapi.json",
            "GET /v1/docs",
            "$default",  # anything else: the router's JSON 404, as the local gateway answers
        }
        for public in ("GET /v1/health", "GET /v1/openapi.json", "GET /v1/docs", "$default"):
            route = routes.pop(public)
            assert route["authorizationType"] == "NONE", public
            assert "authorizerId" not in route, public
        (authorizer,) = d.of_type("aws:apigatewayv2/authorizer:Authorizer")
        for key, route in routes.items():
            assert route["authorizationType"] == "CUSTOM", key
            assert route["authorizerId"] == f"{authorizer.name}-id", key
        assert authorizer.inputs["authorizerType"] == "REQUEST"
        # Cached per token: the answer does not depend on the path (the router checks jobs).
        assert authorizer.inputs["identitySources"] == ["$request.header.Authorization"]
        assert authorizer.inputs["authorizerResultTtlInSeconds"] == 300
        assert authorizer.inputs["enableSimpleResponses"] is True
        assert authorizer.inputs["authorizerPayloadFormatVersion"] == "2.0"
        assert authorizer.inputs["authorizerUri"].endswith(
            ":function:flstore-authorizer/invocations"
        )
        (integration,) = d.of_type("aws:apigatewayv2/integration:Integration")
        assert integration.inputs["integrationType"] == "AWS_PROXY"
        assert integration.inputs["payloadFormatVersion"] == "2.0"
        assert integration.inputs["integrationUri"].endswith(":function:flstore-router")
        targets = {r.inputs["target"] for r in d.of_type(ROUTE)}
        assert targets == {f"integrations/{integration.name}-id"}

    return deploy(DEFAULTS).apply(check)


@pulumi.runtime.test
def test_stage_throttles_and_writes_access_logs_to_its_own_group() -> None:
    def check(d: Deployment) -> None:
        (stage,) = d.of_type("aws:apigatewayv2/stage:Stage")
        assert stage.inputs["autoDeploy"] is True
        throttling = stage.inputs["defaultRouteSettings"]
        assert throttling == {"throttlingRateLimit": 50, "throttlingBurstLimit": 100}
        logs = stage.inputs["accessLogSettings"]
        assert logs["destinationArn"].endswith(":log-group:/aws/apigateway/flstore-api")
        assert "$context.requestId" in logs["format"]
        api_logs = d.named(LOG_GROUP, "flstore-api-access-logs")
        assert api_logs.inputs["retentionInDays"] == 14

    return deploy(DEFAULTS).apply(check)


@pulumi.runtime.test
def test_stage_throttling_comes_from_the_stack_config() -> None:
    config = {**DEFAULTS, "flstore:throttleRateLimit": "7.5", "flstore:throttleBurstLimit": "15"}

    def check(d: Deployment) -> None:
        (stage,) = d.of_type("aws:apigatewayv2/stage:Stage")
        throttling = stage.inputs["defaultRouteSettings"]
        assert throttling == {"throttlingRateLimit": 7.5, "throttlingBurstLimit": 15}

    return deploy(config).apply(check)


@pytest.mark.parametrize("key", ["flstore:throttleRateLimit", "flstore:throttleBurstLimit"])
@pulumi.runtime.test
def test_a_throttle_that_is_not_positive_is_refused(key: str) -> None:
    with pytest.raises(ConfigError, match="throttle"):
        run_program({**DEFAULTS, key: "0"})


@pulumi.runtime.test
def test_every_function_has_its_log_group_with_retention() -> None:
    def check(d: Deployment) -> None:
        groups = {g.inputs["name"]: g.inputs["retentionInDays"] for g in d.of_type(LOG_GROUP)}
        for function in d.of_type(FUNCTION):
            assert groups[f"/aws/lambda/{function.inputs['name']}"] == 30
        assert set(groups.values()) == {30}

    return deploy(FIVE_NODES).apply(check)


@pytest.mark.parametrize("config", [DEFAULTS, FIVE_NODES], ids=["defaults", "five-nodes"])
@pulumi.runtime.test
def test_stack_outputs_name_the_api_bucket_and_functions(config: dict) -> None:
    stack = run_program(config)
    prefix = config.get("flstore:prefix", "flstore")
    nodes = int(config.get("flstore:cacheNodes", 8))
    assert set(OUTPUTS) <= set(stack.outputs)
    values = pulumi.Output.all(**{k: stack.outputs[k] for k in OUTPUTS})

    def check(out: dict[str, Any]) -> None:
        assert out["api_url"].startswith("https://") and ".execute-api." in out["api_url"]
        assert out["bucket"] == f"{prefix}-{ACCOUNT}-{config['aws:region']}"
        assert out["cache_functions"] == [f"{prefix}-cache-{i}" for i in range(nodes)]
        assert out["router_function"] == f"{prefix}-router"
        assert out["authorizer_function"] == f"{prefix}-authorizer"

    return values.apply(check)


# --- the checks catch what they are for --------------------------------------------------


@pulumi.runtime.test
def test_audit_catches_a_bucket_made_public() -> None:
    def open_bucket(args: pulumi.ResourceTransformationArgs) -> dict | None:
        if args.type_ == PUBLIC_ACCESS_BLOCK:
            return {**args.props, "block_public_policy": False, "restrict_public_buckets": False}
        return None

    _tampering.append(open_bucket)
    try:
        deployment = deploy(DEFAULTS)
    finally:
        _tampering.clear()

    def check(d: Deployment) -> None:
        findings = security_findings(d)
        assert len(findings) == 1
        assert "public access not blocked" in findings[0]
        assert "blockPublicPolicy" in findings[0] and "restrictPublicBuckets" in findings[0]

    return deployment.apply(check)


@pulumi.runtime.test
def test_audit_catches_a_wildcard_statement_slipped_into_a_role() -> None:
    def widen_router(args: pulumi.ResourceTransformationArgs) -> dict | None:
        if args.type_ == ROLE_POLICY and args.name == "flstore-router-policy":
            policy = json.loads(args.props["policy"])
            policy["Statement"].append({"Effect": "Allow", "Action": "s3:*", "Resource": "*"})
            return {**args.props, "policy": json.dumps(policy)}
        return None

    _tampering.append(widen_router)
    try:
        deployment = deploy(DEFAULTS)
    finally:
        _tampering.clear()

    def check(d: Deployment) -> None:
        findings = security_findings(d)
        assert findings == [
            "flstore-router-policy: statement 9: wildcard action 's3:*'",
            "flstore-router-policy: statement 9: resource '*' is every resource ('*')",
        ]

    return deployment.apply(check)


@pulumi.runtime.test
def test_program_refuses_to_declare_an_unsafe_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    safe = iam.router_policy

    def with_admin(**kwargs: Any) -> dict[str, Any]:
        policy = safe(**kwargs)
        policy["Statement"].append({"Effect": "Allow", "Action": "*", "Resource": "*"})
        return policy

    monkeypatch.setattr(iam, "router_policy", with_admin)
    with pytest.raises(iam.UnsafePolicyError, match="wildcard action '\\*'"):
        run_program(DEFAULTS)


@pytest.mark.parametrize(
    "policy, finding",
    [
        ({"Effect": "Allow", "Action": "*", "Resource": "*"}, "wildcard action '*'"),
        ({"Effect": "Allow", "Action": "s3:Get*", "Resource": "arn:aws:s3:::b/*"}, "wildcard"),
        (
            {"Effect": "Allow", "Action": "s3:GetObject", "Resource": "arn:aws:s3:::*"},
            "every bucket",
        ),
        (
            {
                "Effect": "Allow",
                "Action": "lambda:InvokeFunction",
                "Resource": "arn:aws:lambda:us-east-1:1:function:*",
            },
            "every lambda resource",
        ),
        ({"Effect": "Allow", "Action": "s3:GetObject", "Principal": "*"}, "any principal"),
        ({"Effect": "Allow", "NotAction": "iam:*", "Resource": "arn:aws:s3:::b"}, "NotAction"),
        ({"Effect": "Allow", "Action": "s3:GetObject"}, "has no Resource"),
    ],
)
@pulumi.runtime.test
def test_find_unsafe_statements_flags(policy: dict, finding: str) -> None:
    findings = iam.find_unsafe_statements({"Version": iam.POLICY_VERSION, "Statement": [policy]})
    assert any(finding in f for f in findings), findings


@pulumi.runtime.test
def test_find_unsafe_statements_lets_denies_and_scoped_grants_pass() -> None:
    bucket = "arn:aws:s3:::flstore-1-us-east-1"
    assert iam.find_unsafe_statements(iam.bucket_policy(bucket_arn=bucket)) == []
    scoped = iam.cache_node_policy(
        bucket_arn=bucket, log_group_arns=["arn:aws:logs:us-east-1:1:log-group:/aws/lambda/x"]
    )
    assert iam.find_unsafe_statements(json.dumps(scoped)) == []


# --- config and artifacts ------------------------------------------------------------------


@pulumi.runtime.test
def test_replication_above_node_count_is_rejected() -> None:
    config = {**DEFAULTS, "flstore:cacheNodes": "2", "flstore:replication": "3"}
    with pytest.raises(ConfigError, match="flstore:replication"):
        run_program(config)


@pulumi.runtime.test
def test_an_explicit_cache_budget_goes_to_every_node_and_the_router() -> None:
    config = {**FIVE_NODES, "flstore:cacheBudgetMb": "200"}

    def check(d: Deployment) -> None:
        budgets = {
            f.inputs["name"]: f.inputs["environment"]["variables"]["FLSTORE_CACHE_BUDGET_BYTES"]
            for f in d.of_type(FUNCTION)
            if f.inputs["name"] != "fltest-authorizer"
        }
        assert sorted(budgets) == sorted(
            [*(f"fltest-cache-{i}" for i in range(5)), "fltest-router"]
        )
        assert set(budgets.values()) == {str(200 * 2**20)}

    return deploy(config).apply(check)


@pytest.mark.parametrize("budget_mb", ["0", "-5", "4096", "5000"])
@pulumi.runtime.test
def test_a_cache_budget_not_below_the_node_memory_is_rejected(budget_mb: str) -> None:
    config = {**FIVE_NODES, "flstore:cacheBudgetMb": budget_mb}
    with pytest.raises(
        ConfigError, match=r"flstore:cacheBudgetMb must be 1\.\.cacheMemoryMb - 1 \(4095\)"
    ):
        run_program(config)


@pytest.mark.parametrize("memory_mb", [128, 256, 512, 1024, 3008, 4096, 10240])
def test_the_stack_derives_the_budget_the_runtime_code_derives(memory_mb: int) -> None:
    """infra mirrors flstore_core.cache.budget rather than importing the runtime code: the two
    must agree, or the router and the nodes would plan with another budget than Pulumi set."""
    from flstore_core.cache import budget

    settings = StackSettings(cache_memory_mb=memory_mb)
    assert settings.cache_budget_bytes == budget.cache_budget(memory_mb, "torch")


@pulumi.runtime.test
def test_raw_tokens_are_refused_in_token_hashes() -> None:
    with pytest.raises(ConfigError, match="sha256"):
        parse_token_hashes(json.dumps({"my-secret-token": ["*"]}))
    with pytest.raises(ConfigError, match="neither a job id"):
        parse_token_hashes(json.dumps({TOKEN_HASH: ["Bad Job"]}))
    assert parse_token_hashes(json.dumps({TOKEN_HASH: ["*"]})) == {TOKEN_HASH: ("*",)}
    assert StackSettings().tokens_json() == "{}"


@pulumi.runtime.test
def test_program_builds_every_function_without_a_build_step() -> None:
    """`pulumi up` alone: no `build/` directory is read or written; the zip and the image
    context come from the build cache, built from this working tree."""
    build_dir_existed = (REPO / "build").exists()

    def check(d: Deployment) -> None:
        names = {f.inputs["name"] for f in d.of_type(FUNCTION)}
        cache_nodes = {f"fltest-cache-{i}" for i in range(5)}
        assert names == cache_nodes | {"fltest-router", "fltest-authorizer"}
        built = d.stack.artifacts
        assert zipfile.is_zipfile(built.router_zip)
        assert built.cache_node_dockerfile.is_file()
        for path in (built.router_zip, built.cache_node_context):
            assert path.is_relative_to(packaging.default_cache_dir())
            assert not path.is_relative_to(REPO / "build")
        assert (REPO / "build").exists() == build_dir_existed

    return deploy(FIVE_NODES).apply(check)


@pulumi.runtime.test
def test_rerunning_the_program_on_an_unchanged_tree_deploys_the_same_artifacts() -> None:
    first = run_program(DEFAULTS).artifacts
    zip_bytes = first.router_zip.read_bytes()
    second = run_program(DEFAULTS).artifacts
    assert second == first
    assert second.router_zip.read_bytes() == zip_bytes


def test_local_gateway_serves_the_routes_and_authorizer_settings_deployed() -> None:
    # infra imports no runtime code: the two tables are kept apart and checked here
    from lambdas.local_runtime import gateway

    deployed = {(r.key, r.authorized) for r in api.ROUTES}
    assert {(r.key, r.authorized) for r in gateway.ROUTES} == deployed
    assert gateway.IDENTITY_SOURCES == api.IDENTITY_SOURCES
    assert gateway.AUTHORIZER_CACHE_TTL_S == api.AUTHORIZER_CACHE_TTL_S


def test_every_route_the_router_serves_is_deployed() -> None:
    # the router's OpenAPI document lists its resolver's routes
    from lambdas.router import app, openapi_document

    served = {
        f"{method.upper()} {path}"
        for path, operations in openapi_document(app)["paths"].items()
        for method in operations
    }
    assert served == {r.key for r in api.ROUTES}


# --- commit-driven warming ------------------------------------------------------------------


@pytest.mark.parametrize("config", [DEFAULTS, FIVE_NODES], ids=["defaults", "five-nodes"])
@pulumi.runtime.test
def test_a_manifest_write_notifies_the_router_with_an_invoke_permission_first(
    config: dict,
) -> None:
    prefix = config.get("flstore:prefix", "flstore")
    region = config["aws:region"]
    router_arn = f"arn:aws:lambda:{region}:{ACCOUNT}:function:{prefix}-router"
    depends_on: dict[str, list[Any]] = {}

    def record_dependencies(args: pulumi.ResourceTransformationArgs) -> None:
        if args.type_ == NOTIFICATION:
            depends_on[args.name] = list(args.opts.depends_on or [])

    _tampering.append(record_dependencies)  # type: ignore[arg-type]
    try:
        stack = run_program(config)
        registered = pulumi.Output.all(*[r.urn for r in _constructed])
        deployment = registered.apply(lambda _: Deployment(stack, list(MOCKS.declared)))
    finally:
        _tampering.clear()

    def check(d: Deployment) -> None:
        (notification,) = d.of_type(NOTIFICATION)
        assert notification.inputs["bucket"] == f"{prefix}-data-id"
        assert notification.inputs["lambdaFunctions"] == [
            {
                "lambdaFunctionArn": router_arn,
                "events": ["s3:ObjectCreated:*"],
                "filterPrefix": "jobs/",
                "filterSuffix": suffix,
            }
            for suffix in ("manifest.json", ".safetensors.zst")
        ]
        # S3 refuses overlapping configurations: these two must not be
        filters = [
            (f["filterPrefix"], f["filterSuffix"]) for f in notification.inputs["lambdaFunctions"]
        ]
        assert not filters_overlap(*filters)
        (s3,) = [p for p in d.of_type(PERMISSION) if p.inputs["principal"] == "s3.amazonaws.com"]
        assert s3.inputs["function"] == f"{prefix}-router"
        assert s3.inputs["action"] == "lambda:InvokeFunction"
        assert s3.inputs["sourceArn"] == f"arn:aws:s3:::{prefix}-{ACCOUNT}-{region}"
        assert s3.inputs["sourceAccount"] == ACCOUNT
        # S3 checks it may invoke the function when the notification is created
        (after,) = depends_on.values()
        assert d.stack.commit_warming.permission in after
        assert security_findings(d) == []

    return deployment.apply(check)


# --- what the S3 grants admit, as IAM matches them ----------------------------------------


def _iam_like(pattern: str, value: str) -> bool:
    """IAM's ARN and StringLike matching: ``*`` is any run of characters, ``/`` included."""
    regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.fullmatch(regex, value) is not None


def _conditions_hold(condition: dict[str, Any], context: dict[str, str]) -> bool:
    for operator, keys in condition.items():
        for key, patterns in keys.items():
            if_exists = operator.endswith("IfExists")
            base = operator.removesuffix("IfExists")
            if key not in context:
                if not if_exists:
                    return False
                continue
            values = [patterns] if isinstance(patterns, str) else patterns
            if base == "StringLike" and not any(_iam_like(p, context[key]) for p in values):
                return False
            if base == "StringEquals" and context[key] not in values:
                return False
    return True


def allowed(policy: dict[str, Any], action: str, arn: str, context: dict[str, str]) -> bool:
    """Whether ``policy`` lets ``action`` on ``arn`` (an explicit Deny wins over any Allow)."""
    verdicts = set()
    for statement in policy["Statement"]:
        actions = statement["Action"]
        actions = [actions] if isinstance(actions, str) else actions
        resources = statement.get("Resource", [])
        resources = [resources] if isinstance(resources, str) else resources
        if action not in actions or not any(_iam_like(r, arn) for r in resources):
            continue
        if _conditions_hold(statement.get("Condition", {}), context):
            verdicts.add(statement["Effect"])
    return "Allow" in verdicts and "Deny" not in verdicts


BUCKET_ARN = "arn:aws:s3:::flstore-1-us-east-1"
LOGS = ["arn:aws:logs:us-east-1:1:log-group:/aws/lambda/x"]
S3_ROLES = {
    "cache node": iam.cache_node_policy(bucket_arn=BUCKET_ARN, log_group_arns=LOGS),
    "router": iam.router_policy(
        bucket_arn=BUCKET_ARN,
        log_group_arn=LOGS[0],
        cache_function_arns=["arn:aws:lambda:us-east-1:1:function:flstore-cache-0"],
    ),
}
RESULT_WRITES = ("s3:PutObject", "s3:PutObjectTagging", "s3:DeleteObject")


@pytest.mark.parametrize("role", sorted(S3_ROLES))
@pytest.mark.parametrize(
    "key",
    [
        "jobs/a/rounds/00000001/updates/results/x",  # `*` of an ARN crosses `/`
        "jobs/a/rounds/00000001/results/manifest.json",
        "jobs/a/ingest/results/x",
        "jobs/a/rounds/00000001/manifest.json",
        "jobs/a/job.json",
        "ingest/results/x",
    ],
)
def test_results_grants_admit_no_key_outside_a_jobs_results_prefix(role: str, key: str) -> None:
    policy = S3_ROLES[role]
    for action in RESULT_WRITES if role == "router" else RESULT_WRITES[:2]:
        assert not allowed(policy, action, f"{BUCKET_ARN}/{key}", {}), (action, key)


@pytest.mark.parametrize("role", sorted(S3_ROLES))
def test_results_grants_admit_a_jobs_results_keys(role: str) -> None:
    policy = S3_ROLES[role]
    for key in ["jobs/a/results/fedavg/00000001/r.bin", "jobs/b-2/results/x"]:
        assert allowed(policy, "s3:PutObject", f"{BUCKET_ARN}/{key}", {}), key
        assert allowed(policy, "s3:GetObject", f"{BUCKET_ARN}/{key}", {}), key
    delete = allowed(policy, "s3:DeleteObject", f"{BUCKET_ARN}/jobs/a/results/x", {})
    assert delete is (role == "router")


@pytest.mark.parametrize("role", sorted(S3_ROLES))
def test_listing_needs_a_jobs_prefix(role: str) -> None:
    policy = S3_ROLES[role]
    assert allowed(policy, "s3:ListBucket", BUCKET_ARN, {"s3:prefix": "jobs/a/rounds/"})
    assert allowed(policy, "s3:ListBucket", BUCKET_ARN, {"s3:prefix": "jobs/"})
    for prefix in ("", "ingest/", "job", "other/jobs/"):
        assert not allowed(policy, "s3:ListBucket", BUCKET_ARN, {"s3:prefix": prefix}), prefix
    # No prefix at all stays allowed: S3 checks ListBucket without a prefix to answer a GET or
    # HEAD of a missing key, and only with it is that a 404 (an unknown job or round, a memo
    # miss) rather than a 403; the cost is that such a role can list key names bucket-wide
    # (iam._read_job_data says so).
    assert allowed(policy, "s3:ListBucket", BUCKET_ARN, {})


@pytest.mark.parametrize(
    "key",
    [
        "jobs/a/rounds/00000001/manifest.json",
        "jobs/a/rounds/00000001/updates/warm/x",  # `*` of an ARN crosses `/`
        "jobs/a/rounds/warm/00000001.json",
        "jobs/a/job.json",
        "jobs/a/warmth/00000001.json",
        "warm/00000001.json",
    ],
)
def test_the_router_writes_warm_markers_only_under_a_jobs_warm_prefix(key: str) -> None:
    router = S3_ROLES["router"]
    assert allowed(router, "s3:PutObject", f"{BUCKET_ARN}/jobs/a/warm/00000001.json", {})
    assert allowed(router, "s3:PutObject", f"{BUCKET_ARN}/jobs/b-2/warm/00000012.json", {})
    assert not allowed(router, "s3:PutObject", f"{BUCKET_ARN}/{key}", {}), key
    for action in ("s3:DeleteObject", "s3:PutObjectTagging"):
        assert not allowed(router, action, f"{BUCKET_ARN}/jobs/a/warm/00000001.json", {})
    cache = S3_ROLES["cache node"]
    assert not allowed(cache, "s3:PutObject", f"{BUCKET_ARN}/jobs/a/warm/00000001.json", {})


@pytest.mark.parametrize(
    "key",
    [
        "jobs/a/rounds/00000001/manifest.json",
        "jobs/a/rounds/00000001/meta/rows.zst",  # `*` of an ARN crosses `/`
        "jobs/a/meta/rows.json",
        "jobs/a/job.json",
        "meta/rows.zst",
    ],
)
def test_a_cache_node_writes_meta_rows_only_at_a_jobs_meta_rows_key(key: str) -> None:
    cache = S3_ROLES["cache node"]
    assert allowed(cache, "s3:PutObject", f"{BUCKET_ARN}/jobs/a/meta/rows.zst", {})
    assert not allowed(cache, "s3:PutObject", f"{BUCKET_ARN}/{key}", {}), key
    for action in ("s3:DeleteObject", "s3:PutObjectTagging"):
        assert not allowed(cache, action, f"{BUCKET_ARN}/jobs/a/meta/rows.zst", {})
    assert not allowed(S3_ROLES["router"], "s3:PutObject", f"{BUCKET_ARN}/jobs/a/meta/rows.zst", {})


def test_s3_overlap_rule_as_the_notifications_apply_it() -> None:
    # both a prefix and a suffix shared: S3 refuses the pair
    assert filters_overlap(("jobs/", "manifest.json"), ("jobs/", ".json"))
    assert filters_overlap(("jobs/a/", "x.zst"), ("jobs/", ".zst"))
    # the prefixes overlap but neither suffix ends the other: allowed
    assert not filters_overlap(("jobs/", "manifest.json"), ("jobs/", ".safetensors.zst"))
    assert not filters_overlap(("jobs/", ".zst"), ("other/", ".zst"))
