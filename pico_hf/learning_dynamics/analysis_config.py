"""The analysis config, pico-analyze's format (see `pico_hf.learning_dynamics.analyze`): parsed and checked
before anything is read."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..configuration import ConfigError, check_keys, from_dict, load_yaml, unknown_keys_listed
from .capture import DATA_TYPES
from .components import component_data_types
from .metrics import MetricSpec, parse_metric_specs

# --- config -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WandbSettings:
    entity: str | None = None
    project: str | None = None


@dataclass(frozen=True)
class MonitoringSettings:
    output_dir: str = "analysis_results"
    save_to_wandb: bool = False
    wandb: WandbSettings = field(default_factory=WandbSettings)
    # pico-analyze's Pico Labs reporting: accepted so its configs load, not supported.
    save_to_picolabs: bool = False
    pico_report: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class AnalysisConfig:
    """A parsed pico-analyze config. `steps` is None when the config names none: every step the run has."""

    analysis_name: str | None
    metrics: tuple[MetricSpec, ...]
    steps: tuple[int, ...] | None
    monitoring: MonitoringSettings = field(default_factory=MonitoringSettings)

    KEYS = ("analysis_name", "metrics", "steps", "monitoring")

    @property
    def splits(self) -> list[str]:
        """The data splits the metrics read, in first-use order."""
        return list(dict.fromkeys(str(spec.data_split) for spec in self.metrics))


def parse_steps(value: Any) -> tuple[int, ...] | None:
    """A list of steps, or `{start, end, step}` with `end` included (pico-analyze's StepRangeConfig)."""
    if value is None:
        return None
    if isinstance(value, Mapping):
        check_keys("steps", value, ("start", "end", "step"))
        missing = [key for key in ("start", "end", "step") if value.get(key) is None]
        if missing:
            raise ConfigError(f"steps range lacks {missing}: give start, end and step (end is included)")
        start, end, stride = (value[key] for key in ("start", "end", "step"))
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (start, end, stride)):
            raise ConfigError(f"steps range values must be integers, got {dict(value)}")
        if stride <= 0 or start < 0 or end < start:
            raise ConfigError(f"steps range needs 0 <= start <= end and step > 0, got {dict(value)}")
        # pico-analyze used range(start, end + step, step), which overshoots `end` when step does not divide
        # end - start; the intent (end included, nothing beyond it) is kept.
        return tuple(range(start, end + 1, stride))
    if isinstance(value, (list, tuple)):
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
            raise ConfigError(f"steps must be non-negative integers, got {list(value)}")
        return tuple(sorted(set(value)))
    raise ConfigError(f"steps must be a list of integers or a {{start, end, step}} range, got {value!r}")


def _parse_monitoring(value: Any) -> MonitoringSettings:
    if value is None:
        return MonitoringSettings()
    if not isinstance(value, Mapping):
        raise ConfigError(f"monitoring must be a mapping, got {value!r}")
    pico_report = value.get("pico_report") or {}
    if isinstance(pico_report, Mapping):  # a plain mapping whose keys are still pico-analyze's
        check_keys("monitoring.pico_report", pico_report, ("lab_hash", "experiment_name"))
    if value.get("output_dir") == "":  # as null: the default folder
        value = {**value, "output_dir": None}
    # Null stands for the default, as in pico-analyze; unknown keys are listed in its form.
    return from_dict(
        MonitoringSettings, value, "monitoring.", unknown=unknown_keys_listed, none_is_default=True
    )


def parse_analysis_config(config: Mapping[str, Any]) -> AnalysisConfig:
    """Check and parse a pico-analyze config mapping; errors name the offending key or metric."""
    if not isinstance(config, Mapping):
        raise ConfigError(f"an analysis config must be a mapping, got {type(config).__name__}")
    check_keys("", config, AnalysisConfig.KEYS)
    metrics = config.get("metrics") or []
    if not isinstance(metrics, list) or not metrics:
        raise ConfigError("metrics must be a non-empty list of metric specs")
    specs = []
    for index, metric in enumerate(metrics):
        where = f"metrics[{index}]" + (
            f" ({metric.get('metric_name')})"
            if isinstance(metric, Mapping) and "metric_name" in metric
            else ""
        )
        if not isinstance(metric, Mapping):
            raise ConfigError(f"{where} must be a mapping, got {metric!r}")
        if "metric_name" not in metric:
            raise ConfigError(f"{where}: metric_name must be specified for each metric")
        try:
            spec = MetricSpec.from_dict(metric)
        except ValueError as error:
            raise ConfigError(f"{where}: {error}") from error
        if spec.data_split is None:
            raise ConfigError(f"{where}: data_split must be set (e.g. train or val)")
        if spec.build().comparative and spec.target_checkpoint is None:
            raise ConfigError(
                f"{where}: {spec.metric_name} compares against a target checkpoint: set target_checkpoint"
            )
        specs.append(spec)
    try:
        specs = parse_metric_specs(specs)
    except ValueError as error:
        raise ConfigError(str(error)) from error
    name = config.get("analysis_name")
    return AnalysisConfig(
        analysis_name=str(name) if name else None,
        metrics=tuple(specs),
        steps=parse_steps(config.get("steps")),
        monitoring=_parse_monitoring(config.get("monitoring")),
    )


def load_analysis_config(path: str | Path) -> AnalysisConfig:
    raw = load_yaml(path, "Analysis config")
    try:
        return parse_analysis_config(raw or {})
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from error


def _data_types(specs: Iterable[MetricSpec]) -> list[str]:
    needed = {
        kind for spec in specs for component in spec.components for kind in component_data_types(component)
    }
    return [kind for kind in DATA_TYPES if kind in needed]


def result_stem(spec: MetricSpec) -> str:
    """`{result_name}_{split}`: the per-step output file's name without `.json`."""
    return spec.output_filename.removesuffix(".json")


__all__ = [
    "AnalysisConfig",
    "MonitoringSettings",
    "load_analysis_config",
    "parse_analysis_config",
    "parse_steps",
    "result_stem",
]
