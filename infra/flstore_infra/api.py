"""The public face: an API Gateway HTTP API whose routes (ARCHITECTURE §4) go to the router.

Every route but ``GET /v1/health`` and the API's documentation (``GET /v1/openapi.json``, its
Swagger UI at ``GET /v1/docs``) passes the Lambda REQUEST authorizer first. It answers
whether the bearer token is known, whatever the path (whether the token is granted the job in
the path is the router's 403, ARCHITECTURE §4), so API Gateway caches its answer by the
``Authorization`` header alone. The local gateway (``lambdas/local_runtime/gateway.py``) serves
the same routes, identity sources and cache TTL; ``tests/infra`` checks they agree.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pulumi
import pulumi_aws as aws

from .settings import StackSettings


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    authorized: bool = True

    @property
    def key(self) -> str:
        return f"{self.method} {self.path}"


ROUTES = (
    Route("GET", "/v1/health", authorized=False),
    Route("GET", "/v1/workloads"),
    Route("GET", "/v1/jobs/{job}/rounds"),
    Route("POST", "/v1/jobs/{job}/workloads/{name}"),
    # the OpenAPI document and its Swagger UI, readable without a token
    Route("GET", "/v1/openapi.json", authorized=False),
    Route("GET", "/v1/docs", authorized=False),
)
# Any other method and path goes to the router unauthenticated, which answers the contract's
# JSON 404 (ARCHITECTURE §4) instead of API Gateway's own {"message": "Not Found"}; the local
# gateway sends unmatched requests the same way.
DEFAULT_ROUTE_KEY = "$default"
AUTHORIZER_CACHE_TTL_S = 300
# Also the cache key of the authorizer's answers (see the module docstring).
IDENTITY_SOURCES = ("$request.header.Authorization",)
INTEGRATION_TIMEOUT_MS = 30_000
ACCESS_LOG_FORMAT = json.dumps(
    {
        "requestId": "$context.requestId",
        "ip": "$context.identity.sourceIp",
        "requestTime": "$context.requestTime",
        "routeKey": "$context.routeKey",
        "status": "$context.status",
        "responseLength": "$context.responseLength",
        "latencyMs": "$context.responseLatency",
        "integrationLatencyMs": "$context.integrationLatency",
        "integrationError": "$context.integrationErrorMessage",
        "authorizerError": "$context.authorizer.error",
    }
)


class HttpApi(pulumi.ComponentResource):
    """HTTP API, router integration, authorizer, routes, throttled and logged stage."""

    api: aws.apigatewayv2.Api
    stage: aws.apigatewayv2.Stage
    routes: dict[str, aws.apigatewayv2.Route]
    url: pulumi.Output[str]

    def __init__(
        self,
        resource_name: str,
        *,
        settings: StackSettings,
        router: aws.lambda_.Function,
        authorizer: aws.lambda_.Function,
        opts: pulumi.ResourceOptions | None = None,
    ) -> None:
        super().__init__("flstore:api:HttpApi", resource_name, None, opts)
        self._name = resource_name
        self._child = pulumi.ResourceOptions(parent=self)
        self.api = aws.apigatewayv2.Api(
            resource_name,
            name=resource_name,
            protocol_type="HTTP",
            description="FLStore HTTP API",
            opts=self._child,
        )
        integration = self._router_integration(router)
        token_authorizer = self._token_authorizer(authorizer)
        self.routes = self._routes(
            pulumi.Output.concat("integrations/", integration.id), token_authorizer
        )
        self.stage = self._stage(settings)
        self._grant_invoke(router, authorizer, token_authorizer)
        self.url = self.stage.invoke_url
        self.register_outputs({"url": self.url})

    def _router_integration(self, router: aws.lambda_.Function) -> aws.apigatewayv2.Integration:
        return aws.apigatewayv2.Integration(
            f"{self._name}-router",
            api_id=self.api.id,
            integration_type="AWS_PROXY",
            integration_method="POST",
            integration_uri=router.arn,
            payload_format_version="2.0",
            timeout_milliseconds=INTEGRATION_TIMEOUT_MS,
            opts=self._child,
        )

    def _token_authorizer(self, authorizer: aws.lambda_.Function) -> aws.apigatewayv2.Authorizer:
        return aws.apigatewayv2.Authorizer(
            f"{self._name}-tokens",
            name=f"{self._name}-tokens",
            api_id=self.api.id,
            authorizer_type="REQUEST",
            authorizer_uri=authorizer.invoke_arn,
            authorizer_payload_format_version="2.0",
            enable_simple_responses=True,
            identity_sources=list(IDENTITY_SOURCES),
            authorizer_result_ttl_in_seconds=AUTHORIZER_CACHE_TTL_S,
            opts=self._child,
        )

    def _routes(
        self, target: pulumi.Output[str], token_authorizer: aws.apigatewayv2.Authorizer
    ) -> dict[str, aws.apigatewayv2.Route]:
        """Every contract route, then the unmatched ``$default`` one, all to the router."""
        routes = {}
        for route in ROUTES:
            auth = (
                {"authorization_type": "CUSTOM", "authorizer_id": token_authorizer.id}
                if route.authorized
                else {"authorization_type": "NONE"}
            )
            routes[route.key] = aws.apigatewayv2.Route(
                f"{self._name}-{route.method.lower()}{_slug(route.path)}",
                api_id=self.api.id,
                route_key=route.key,
                target=target,
                opts=self._child,
                **auth,
            )
        routes[DEFAULT_ROUTE_KEY] = aws.apigatewayv2.Route(
            f"{self._name}-unmatched",
            api_id=self.api.id,
            route_key=DEFAULT_ROUTE_KEY,
            target=target,
            authorization_type="NONE",
            opts=self._child,
        )
        return routes

    def _stage(self, settings: StackSettings) -> aws.apigatewayv2.Stage:
        """The auto-deployed ``$default`` stage: throttled, with JSON access logs."""
        access_logs = aws.cloudwatch.LogGroup(
            f"{self._name}-access-logs",
            name=f"/aws/apigateway/{self._name}",
            retention_in_days=settings.log_retention_days,
            opts=self._child,
        )
        return aws.apigatewayv2.Stage(
            f"{self._name}-default",
            api_id=self.api.id,
            name="$default",
            auto_deploy=True,
            default_route_settings={
                "throttling_rate_limit": settings.throttle_rate_limit,
                "throttling_burst_limit": settings.throttle_burst_limit,
            },
            access_log_settings={
                "destination_arn": access_logs.arn,
                "format": ACCESS_LOG_FORMAT,
            },
            opts=pulumi.ResourceOptions(parent=self, depends_on=list(self.routes.values())),
        )

    def _grant_invoke(
        self,
        router: aws.lambda_.Function,
        authorizer: aws.lambda_.Function,
        token_authorizer: aws.apigatewayv2.Authorizer,
    ) -> None:
        # API Gateway may invoke the router for this API's routes only, and the
        # authorizer for this authorizer only.
        aws.lambda_.Permission(
            f"{self._name}-invokes-router",
            action="lambda:InvokeFunction",
            function=router.name,
            principal="apigateway.amazonaws.com",
            source_arn=pulumi.Output.concat(self.api.execution_arn, "/*/*/v1/*"),
            opts=self._child,
        )
        aws.lambda_.Permission(
            f"{self._name}-invokes-router-unmatched",
            action="lambda:InvokeFunction",
            function=router.name,
            principal="apigateway.amazonaws.com",
            source_arn=pulumi.Output.concat(self.api.execution_arn, "/*/$default"),
            opts=self._child,
        )
        aws.lambda_.Permission(
            f"{self._name}-invokes-authorizer",
            action="lambda:InvokeFunction",
            function=authorizer.name,
            principal="apigateway.amazonaws.com",
            source_arn=pulumi.Output.concat(
                self.api.execution_arn, "/authorizers/", token_authorizer.id
            ),
            opts=self._child,
        )


def _slug(path: str) -> str:
    return path.replace("{", "").replace("}", "").replace("/", "-")
