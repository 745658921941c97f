"""The cache-node container image: an ECR repository and the image built and pushed into it.

Cache nodes run workloads with numpy, scikit-learn and torch, well past the 250 MB a zip
package may unpack to, so they ship as an image (up to 10 GB). ``pulumi up`` builds it
with Docker BuildKit (the ``docker-build`` provider) from the context the program staged
(``packaging.stage_image_context``), pushes it, and the functions pin it by digest, so a
new build is a new deployment and an unchanged one is not.
"""

from __future__ import annotations

import json

import pulumi
import pulumi_aws as aws
import pulumi_docker_build as docker_build

from . import iam
from .arns import AwsScope
from .packaging import BuildArtifacts
from .settings import StackSettings
from .target import LAMBDA_PYTHON

PLATFORMS = {
    "x86_64": docker_build.Platform.LINUX_AMD64,
    "arm64": docker_build.Platform.LINUX_ARM64,
}
IMAGE_TAG = "latest"
CACHE_TAG = "buildcache"
KEEP_UNTAGGED_IMAGES = 5


class CacheNodeImage(pulumi.ComponentResource):
    """ECR repository plus the cache-node image; ``image_uri`` is ``repo@sha256:…``."""

    repository: aws.ecr.Repository
    image: docker_build.Image
    image_uri: pulumi.Output[str]

    def __init__(
        self,
        resource_name: str,
        *,
        settings: StackSettings,
        scope: AwsScope,
        artifacts: BuildArtifacts,
        opts: pulumi.ResourceOptions | None = None,
    ) -> None:
        super().__init__("flstore:image:CacheNodeImage", resource_name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        self.repository = aws.ecr.Repository(
            resource_name,
            name=resource_name,
            image_tag_mutability="MUTABLE",  # `latest` moves; functions pin the digest
            image_scanning_configuration={"scan_on_push": True},
            encryption_configurations=[{"encryption_type": "AES256"}],
            force_delete=settings.force_destroy,
            opts=child,
        )
        aws.ecr.LifecyclePolicy(
            f"{resource_name}-lifecycle",
            repository=self.repository.name,
            policy=json.dumps(
                {
                    "rules": [
                        {
                            "rulePriority": 1,
                            "description": "keep the last few superseded images",
                            "selection": {
                                "tagStatus": "untagged",
                                "countType": "imageCountMoreThan",
                                "countNumber": KEEP_UNTAGGED_IMAGES,
                            },
                            "action": {"type": "expire"},
                        }
                    ]
                }
            ),
            opts=child,
        )
        aws.ecr.RepositoryPolicy(
            f"{resource_name}-policy",
            repository=self.repository.name,
            policy=iam.render(
                iam.image_repository_policy(
                    function_arns=[scope.lambda_function(n) for n in settings.cache_function_names]
                )
            ),
            opts=child,
        )
        url = self.repository.repository_url
        token = aws.ecr.get_authorization_token_output(registry_id=self.repository.registry_id)
        cache_ref = url.apply(lambda u: f"{u}:{CACHE_TAG}")
        self.image = docker_build.Image(
            resource_name,
            context={"location": str(artifacts.cache_node_context)},
            dockerfile={"location": str(artifacts.cache_node_dockerfile)},
            platforms=[PLATFORMS[settings.architecture]],
            # The zip functions run the same Python (packaging.LAMBDA_RUNTIME).
            build_args={"PYTHON_VERSION": LAMBDA_PYTHON},
            push=True,
            tags=[url.apply(lambda u: f"{u}:{IMAGE_TAG}")],
            registries=[
                {
                    "address": url.apply(lambda u: u.split("/", 1)[0]),
                    "username": token.user_name,
                    "password": token.password,
                }
            ],
            cache_from=[{"registry": {"ref": cache_ref}}],
            cache_to=[
                {"registry": {"ref": cache_ref, "image_manifest": True, "oci_media_types": True}}
            ],
            # Previews stay fast; the image is built by `pulumi up`.
            build_on_preview=False,
            opts=child,
        )
        self.image_uri = pulumi.Output.concat(url, "@", self.image.digest)
        self.register_outputs({"image_uri": self.image_uri})
