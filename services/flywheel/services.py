"""The four services by name: their config class, server module, proto service and default ports.
Imports are lazy so light commands (status) do not load torch."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ServiceSpec:
    name: str
    config_path: str  # "module:Class"
    server_module: str
    proto_service: str
    port: int
    metrics_port: int

    def config_class(self) -> Any:
        module, cls = self.config_path.split(":")
        return getattr(importlib.import_module(module), cls)

    def serve_function(self) -> Any:
        return importlib.import_module(self.server_module).serve


SERVICES: dict[str, ServiceSpec] = {
    spec.name: spec
    for spec in (
        ServiceSpec(
            "generator",
            "flywheel.generator.config:GeneratorConfig",
            "flywheel.generator.server",
            "flywheel.v1.GeneratorService",
            50051,
            9101,
        ),
        ServiceSpec(
            "reward",
            "flywheel.reward.config:RewardConfig",
            "flywheel.reward.server",
            "flywheel.v1.RewardService",
            50052,
            9102,
        ),
        ServiceSpec(
            "feedback",
            "flywheel.feedback.config:FeedbackConfig",
            "flywheel.feedback.server",
            "flywheel.v1.FeedbackService",
            50053,
            9103,
        ),
        ServiceSpec(
            "learner",
            "flywheel.learner.config:LearnerConfig",
            "flywheel.learner.server",
            "flywheel.v1.LearnerService",
            50054,
            9104,
        ),
    )
}
