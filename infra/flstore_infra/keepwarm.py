"""The keep-warm schedule: ping every cache node every ``keepWarmMinutes``.

A cache node's value is the data in its memory; Lambda reclaims an idle instance after
minutes, so each node gets a ``{"op": "ping"}`` on a fixed rate. EventBridge allows at
most five targets per rule, so the nodes are spread over ``ceil(N / 5)`` rules.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import pulumi
import pulumi_aws as aws

from .settings import StackSettings

PING = json.dumps({"op": "ping"})
MAX_TARGETS_PER_RULE = 5


def schedule_expression(minutes: int) -> str:
    """EventBridge's rate syntax, which wants the singular for one."""
    return "rate(1 minute)" if minutes == 1 else f"rate({minutes} minutes)"


class KeepWarmSchedule(pulumi.ComponentResource):
    """EventBridge rules with one ping target (and one invoke permission) per cache node."""

    rules: list[aws.cloudwatch.EventRule]
    targets: list[aws.cloudwatch.EventTarget]

    def __init__(
        self,
        resource_name: str,
        *,
        settings: StackSettings,
        functions: Sequence[aws.lambda_.Function],
        names: Sequence[str],
        opts: pulumi.ResourceOptions | None = None,
    ) -> None:
        super().__init__("flstore:keepwarm:KeepWarmSchedule", resource_name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        self.rules = []
        self.targets = []
        nodes = list(zip(names, functions, strict=True))
        for group, start in enumerate(range(0, len(nodes), MAX_TARGETS_PER_RULE)):
            rule = aws.cloudwatch.EventRule(
                f"{resource_name}-{group}",
                name=f"{resource_name}-{group}",
                description="Keep FLStore cache nodes warm",
                schedule_expression=schedule_expression(settings.keep_warm_minutes),
                opts=child,
            )
            self.rules.append(rule)
            for name, function in nodes[start : start + MAX_TARGETS_PER_RULE]:
                permission = aws.lambda_.Permission(
                    f"{name}-keepwarm-permission",
                    action="lambda:InvokeFunction",
                    function=function.name,
                    principal="events.amazonaws.com",
                    source_arn=rule.arn,
                    opts=child,
                )
                self.targets.append(
                    aws.cloudwatch.EventTarget(
                        f"{name}-keepwarm",
                        rule=rule.name,
                        arn=function.arn,
                        input=PING,
                        opts=pulumi.ResourceOptions(parent=self, depends_on=[permission]),
                    )
                )
        self.register_outputs({"rules": [r.name for r in self.rules]})
