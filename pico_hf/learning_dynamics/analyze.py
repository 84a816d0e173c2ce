"""Offline learning-dynamics analysis of a training run: pico-analyze's job on pico-hf.

An analysis config (pico-analyze's format) names metrics, the steps to analyse and where to write:

    analysis_name: demo-analysis
    metrics:
      - metric_name: cka
        target_checkpoint: 150
        data_split: val
        components:
          - component_name: ov_circuit
            data_type: activations
            layer_suffixes: {output_layer: attention.o_proj, value_layer: attention.v_proj}
            layers: [0, 11]
      - {metric_name: norm, norm_type: nuclear, data_split: val, components: [...]}
    steps: {start: 0, end: 150, step: 50}     # or a list; omitted: every step the run has
    monitoring:
      output_dir: analysis_results

The run is a local run directory (pico-hf's safetensors or the original pico-train's `.pt` files) or a Hub
repo branch, where a step's states are the files of the commit titled
`Saving Learning Dynamics Data (<split>) -- Step <N>` (the branch's files only hold the latest step).
Results go where pico-analyze writes them:

    <output_dir>/<analysis_name>/analysis.log
    <output_dir>/<analysis_name>/step_<N>/<result_name>_<split>.json     one flat {component_key: value}

Result names follow the metrics library: options join the metric name (`norm_nuclear_val.json`), so two norms
never overwrite each other. Component keys are pico-analyze's without the training wrapper's prefix
(`layers.0.swiglu.w_2.weights`, never `_forward_module.layers.0...`), so a pico-train run and a pico-hf run
of the same model give the same keys.

All metrics of one split at one step go through one `compute_metrics` call (per comparison target), so each
matrix is decomposed once however many metrics need its singular values; a comparative metric's target
checkpoint is read once for the whole analysis.
"""

from __future__ import annotations

import difflib
import json
import logging
import math
import re
import shutil
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from ..configuration import ConfigError, wandb_problem
from .analysis_config import AnalysisConfig, _data_types, result_stem
from .analysis_sources import AnalysisError, AnalysisExists, CheckpointSource, States, StatesUnavailable
from .components import ModelShape
from .metrics import MetricSpec, compute_metrics

logger = logging.getLogger("pico_hf.analyze")

LOG_FILE = "analysis.log"
LOG_FORMAT = "%(asctime)s - %(name)s - %(levelname)s - %(message)s"  # pico-train's and pico-analyze's
LOG_DATE_FORMAT = "%Y-%m-%d %H:%M:%S"


# --- running an analysis -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Skipped:
    """Something not analysed: which step (None: every step), split and results, and why."""

    step: int | None
    split: str
    results: tuple[str, ...]
    reason: str

    def describe(self) -> str:
        where = "every step" if self.step is None else f"step {self.step}"
        return f"{where}, split {self.split!r}: {', '.join(self.results)} not computed ({self.reason})"


@dataclass
class AnalysisResult:
    """What an analysis wrote: per result stem, step -> {component_key: value}."""

    output_dir: Path
    config: AnalysisConfig
    source: str
    results: dict[str, dict[int, dict[str, float]]]
    skipped: list[Skipped]
    notes: list[str]

    @property
    def steps(self) -> list[int]:
        return sorted({step for by_step in self.results.values() for step in by_step})


def _plan_groups(specs: Sequence[MetricSpec]) -> list[tuple[int | None, list[MetricSpec]]]:
    """Specs of one split grouped by comparison target, one `compute_metrics` call each; single-checkpoint
    specs ride along with the first group so their singular values are shared with everything else."""
    by_target: dict[int | None, list[MetricSpec]] = {}
    for spec in specs:
        target = spec.target_checkpoint if spec.build().comparative else None
        by_target.setdefault(target, [])
        by_target[target].append(spec)
    single = by_target.pop(None, [])
    groups = list(by_target.items())
    if groups:
        groups[0] = (groups[0][0], single + groups[0][1])
    elif single:
        groups = [(None, single)]
    return groups


def _order_like(specs: Sequence[MetricSpec], reference: Sequence[MetricSpec]) -> list[MetricSpec]:
    position = {result_stem(spec): index for index, spec in enumerate(reference)}
    return sorted(specs, key=lambda spec: position[result_stem(spec)])


class _WarningLog:
    """Metric warnings (e.g. rank-deficient PWCCA inputs) logged once per result, with the steps they hit."""

    def __init__(self) -> None:
        self.steps: dict[tuple[str, str], list[int]] = {}

    def record(
        self, step: int, specs: Sequence[MetricSpec], caught: Sequence[warnings.WarningMessage]
    ) -> None:
        for warning in caught:
            message = str(warning.message)
            # Metric warnings start with the metric's name (e.g. "pwcca on layers.0...: ...").
            stem = next(
                (result_stem(spec) for spec in specs if message.startswith(f"{spec.metric_name} ")),
                ", ".join(result_stem(spec) for spec in specs),
            )
            key = (stem, message)
            if key not in self.steps:
                logger.warning("step %d, %s: %s", step, stem, message)
            self.steps.setdefault(key, []).append(step)

    def summary(self) -> list[str]:
        return [f"{stem}: {message} (steps {steps})" for (stem, message), steps in self.steps.items()]


def _write_json(path: Path, values: Mapping[str, float]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as file:
        json.dump(dict(values), file)  # pico-analyze's format: one flat object, json defaults


@contextmanager
def _file_log(output_dir: Path) -> Iterator[None]:
    """`analysis.log` in the output folder gets everything, per-component values included (DEBUG)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(output_dir / LOG_FILE)
    handler.setFormatter(logging.Formatter(LOG_FORMAT, datefmt=LOG_DATE_FORMAT))
    handler.setLevel(logging.DEBUG)
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)  # other handlers keep their own levels
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        handler.close()


class _WandbLog:
    """Values logged to Weights & Biases when `monitoring.save_to_wandb` is set and wandb is installed."""

    def __init__(self, config: AnalysisConfig, name: str):
        self.run = None
        if not config.monitoring.save_to_wandb:
            return
        import wandb  # installed: the config check says so

        settings = config.monitoring.wandb
        self.run = wandb.init(name=name, project=settings.project, entity=settings.entity)

    def log(self, step: int, values: Mapping[str, Mapping[str, float]]) -> None:
        if self.run is not None:
            self.run.log(
                {f"{stem}/{key}": value for stem, by_key in values.items() for key, value in by_key.items()},
                step=step,
            )

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()


def analysis_output_dir(config: AnalysisConfig, source: CheckpointSource) -> tuple[str, Path]:
    """The analysis name (pico-analyze's default: `<run_name>_analysis_<timestamp>`) and its folder."""
    name = config.analysis_name
    if not name:
        run_name = source.run_name or "run"
        name = f"{run_name}_analysis_{datetime.now().strftime('%Y%m%d_%H%M%S')}"
    return name, Path(config.monitoring.output_dir) / name


def run_analysis(
    config: AnalysisConfig,
    source: CheckpointSource,
    *,
    output_dir: Path | None = None,
    progress: Callable[[Iterable[int], int], Iterable[int]] | None = None,
    overwrite: bool = False,
) -> AnalysisResult:
    """Compute the config's metrics at each step of `source` and write them (see the module docstring).

    Missing steps, splits or targets are skipped with a warning naming them. Raises `AnalysisError` when
    nothing at all could be analysed, and `ConfigError` when a metric's `layer_suffixes` names no module of
    the run. `progress` wraps the step loop (e.g. a rich progress bar). An existing, non-empty output folder
    is an error unless `overwrite`, which empties it first: one folder never mixes two analyses.
    """
    if config.monitoring.save_to_wandb and (problem := wandb_problem()):  # as in training: before any work
        raise ConfigError(problem)
    name, default_dir = analysis_output_dir(config, source)
    output_dir = Path(output_dir) if output_dir is not None else default_dir
    # Only a log (of an analysis that failed) may be replaced without asking.
    if output_dir.is_dir() and any(p.name != LOG_FILE for p in output_dir.iterdir()) and not overwrite:
        raise AnalysisExists(
            f"{output_dir} already holds an analysis; pass --overwrite to replace it "
            "(or choose another analysis_name)"
        )
    if output_dir.is_dir():
        shutil.rmtree(output_dir)
    with _file_log(output_dir):
        return _analyse(config, source, name, output_dir, progress)


def _analyse(
    config: AnalysisConfig,
    source: CheckpointSource,
    name: str,
    output_dir: Path,
    progress: Callable[[Iterable[int], int], Iterable[int]] | None,
) -> AnalysisResult:
    wandb_log = None
    try:
        logger.info("Analysing %s into %s", source.description, output_dir)
        if config.monitoring.save_to_picolabs:
            logger.warning("monitoring.save_to_picolabs: Pico Labs reporting is not supported; ignored")
        specs_by_split = {
            split: [spec for spec in config.metrics if spec.data_split == split] for split in config.splits
        }
        available = {split: set(source.available_steps(split)) for split in config.splits}
        steps = list(config.steps) if config.steps is not None else sorted(set().union(*available.values()))
        if not steps:
            raise AnalysisError(
                f"{source.description} has no learning-dynamics states for split(s) {config.splits}"
            )
        needs_shape = any(
            c.component_name == "ov_circuit" for spec in config.metrics for c in spec.components
        )
        shape = source.model_shape() if needs_shape else None
        skipped: list[Skipped] = []

        # Comparison targets, read once: (split, step) -> states. Metrics whose target is missing are dropped.
        targets: dict[tuple[str, int], States] = {}
        for split, specs in specs_by_split.items():
            by_target: dict[int, list[MetricSpec]] = {}
            for spec in specs:
                if spec.build().comparative:
                    by_target.setdefault(spec.target_checkpoint, []).append(spec)
            for target, comparative in by_target.items():
                reason = f"target checkpoint step {target} has no {split!r} learning dynamics"
                if target in available[split]:
                    try:
                        states = source.load(target, split, _data_types(comparative))
                    except StatesUnavailable as error:
                        states, reason = {}, f"target checkpoint step {target}: {error}"
                    if states:
                        targets[(split, target)] = states
                        continue
                stems = tuple(result_stem(spec) for spec in comparative)
                skipped.append(Skipped(None, split, stems, reason))
                logger.warning("%s", skipped[-1].describe())
        plans = {
            split: _plan_groups(
                [
                    spec
                    for spec in specs
                    if not spec.build().comparative or (split, spec.target_checkpoint) in targets
                ]
            )
            for split, specs in specs_by_split.items()
        }

        wandb_log = _WandbLog(config, name)
        results: dict[str, dict[int, dict[str, float]]] = {result_stem(spec): {} for spec in config.metrics}
        warning_log = _WarningLog()
        checked: set[str] = set()  # splits whose module names were checked against the metrics' suffixes
        step_iter: Iterable[int] = progress(steps, len(steps)) if progress is not None else steps
        for step in step_iter:
            step_values: dict[str, dict[str, float]] = {}
            for split, groups in plans.items():
                split_specs = [spec for _, group in groups for spec in group]
                if not split_specs:
                    continue
                stems = tuple(result_stem(spec) for spec in _order_like(split_specs, config.metrics))
                if step not in available[split]:
                    skipped.append(
                        Skipped(step, split, stems, f"no {split!r} learning dynamics at step {step}")
                    )
                    logger.warning("%s", skipped[-1].describe())
                    continue
                try:
                    states = source.load(step, split, _data_types(split_specs))
                except StatesUnavailable as error:
                    skipped.append(Skipped(step, split, stems, str(error)))
                    logger.warning("%s", skipped[-1].describe())
                    continue
                if split not in checked:
                    _check_suffixes(split_specs, states)
                    checked.add(split)
                for target, group in groups:
                    if not group:
                        continue
                    target_states = targets.get((split, target)) if target is not None else None
                    step_values.update(
                        _compute_group(step, split, group, states, target_states, shape, skipped, warning_log)
                    )
            if not step_values:
                continue
            ordered = {
                result_stem(s): step_values[result_stem(s)]
                for s in config.metrics
                if result_stem(s) in step_values
            }
            for stem, values in ordered.items():
                _write_json(output_dir / f"step_{step}" / f"{stem}.json", values)
                results[stem][step] = values
            _log_values(step, ordered)
            wandb_log.log(step, ordered)

        if not any(results.values()):
            raise AnalysisError(
                f"Nothing could be analysed in {source.description}: "
                + "; ".join(s.describe() for s in skipped[:6])
                + (f"; and {len(skipped) - 6} more" if len(skipped) > 6 else "")
            )
        analysed = sorted({step for by_step in results.values() for step in by_step})
        logger.info("Analysed %d step(s): %s", len(analysed), analysed)
        return AnalysisResult(
            output_dir=output_dir,
            config=config,
            source=source.description,
            results={stem: by_step for stem, by_step in results.items() if by_step},
            skipped=skipped,
            notes=warning_log.summary(),
        )
    finally:
        if wandb_log is not None:
            wandb_log.finish()


def _compute_group(
    step: int,
    split: str,
    specs: Sequence[MetricSpec],
    states: States,
    target_states: States | None,
    shape: ModelShape | None,
    skipped: list[Skipped],
    warning_log: _WarningLog,
) -> dict[str, dict[str, float]]:
    """One `compute_metrics` call for the group; if the states lack something, each spec alone, so the
    failure is reported for the metrics it concerns and the others still get computed."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            computed = compute_metrics(specs, states, target_states, model_shape=shape)
            values = {result_stem(spec): computed[spec.result_name] for spec in specs}
        except ValueError:
            values = {}
            for spec in specs:
                try:
                    computed = compute_metrics([spec], states, target_states, model_shape=shape)
                except ValueError as error:
                    skipped.append(Skipped(step, split, (result_stem(spec),), str(error)))
                    logger.warning("%s", skipped[-1].describe())
                    continue
                values[result_stem(spec)] = computed[spec.result_name]
    warning_log.record(step, specs, caught)
    return values


_MODULE = re.compile(r"^.*?\d+\.")  # the layer prefix and index: `layers.0.` of `layers.0.swiglu.w_2`


def _check_suffixes(specs: Sequence[MetricSpec], states: States) -> None:
    """A suffix that matches no module of the run is a typo in the config, not a missing step."""
    modules = sorted({_MODULE.sub("", name) for by_name in states.values() for name in by_name})
    for spec in specs:
        for component in spec.components:
            suffixes = (
                [component.layer_suffixes]
                if isinstance(component.layer_suffixes, str)
                else [suffix for _, suffix in component.layer_suffixes]
            )
            for suffix in suffixes:
                if suffix not in modules:
                    close = difflib.get_close_matches(suffix, modules, n=1)
                    hint = f"; did you mean '{close[0]}'?" if close else ""
                    raise ConfigError(
                        f"metric {result_stem(spec)}: layer_suffixes '{suffix}' matches no module of the run"
                        f"{hint} (modules: {', '.join(modules)})"
                    )


def _component_kind(key: str) -> str:
    """`layers.3.ov_circuit.weights.heads.5` -> `ov_circuit.weights.heads`: what the key measures, any layer."""
    kind = _MODULE.sub("", key)
    return re.sub(r"\.heads\.\d+$", ".heads", kind)


def _log_values(step: int, results: Mapping[str, Mapping[str, float]]) -> None:
    """One console line per step, a mean per metric and component kind (per-head values apart from
    all-heads values); every value in the log file."""
    summaries = []
    for stem, values in results.items():
        kinds: dict[str, list[float]] = {}
        for key, value in values.items():
            logger.debug("step %d %s %s = %r", step, stem, key, value)
            if isinstance(value, float) and math.isfinite(value):
                kinds.setdefault(_component_kind(key), []).append(value)
        if not kinds:
            summaries.append(f"{stem} (no finite values)")
        for kind, finite in kinds.items():
            summaries.append(f"{stem} {kind} mean {sum(finite) / len(finite):.4g}")
    logger.info("step %d: %s", step, ", ".join(summaries))


__all__ = [
    "AnalysisResult",
    "Skipped",
    "analysis_output_dir",
    "run_analysis",
]
