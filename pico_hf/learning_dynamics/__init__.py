"""Learning dynamics: pico-analyze's components and metrics, usable in training and on saved checkpoints."""

from .components import (
    COMPONENT_REGISTRY,
    ComponentData,
    ComponentSpec,
    ModelShape,
    component_data_types,
    extract_component,
    register_component,
)
from .metrics import (
    METRIC_REGISTRY,
    MetricSpec,
    RankDeficientWarning,
    compute_metrics,
    parse_metric_specs,
    register_metric,
)

__all__ = [
    "COMPONENT_REGISTRY",
    "METRIC_REGISTRY",
    "ComponentData",
    "ComponentSpec",
    "MetricSpec",
    "ModelShape",
    "RankDeficientWarning",
    "component_data_types",
    "compute_metrics",
    "extract_component",
    "parse_metric_specs",
    "register_component",
    "register_metric",
]
