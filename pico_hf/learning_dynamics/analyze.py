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
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
import yaml

from ..configuration import ConfigError, check_keys, from_dict, load_yaml, unknown_keys_listed
from .capture import DATA_TYPES, STATE_SUFFIXES, load_states
from .components import ModelShape, component_data_types
from .metrics import MetricSpec, compute_metrics, parse_metric_specs

logger = logging.getLogger("pico_hf.analyze")

States = dict[str, dict[str, torch.Tensor]]

LOG_FILE = "analysis.log"
LOG_FORMAT = "%(asctime)s - %(name)s - %(levelname)s - %(message)s"  # pico-train's and pico-analyze's
LOG_DATE_FORMAT = "%Y-%m-%d %H:%M:%S"
LEARNING_DYNAMICS_COMMIT = re.compile(
    r"^Saving Learning Dynamics Data \((?P<split>[^)]+)\) -- Step (?P<step>\d+)$"
)
TRAINING_CONFIG_FILE = "training_config.yaml"
_STEP_DIR = re.compile(r"^step_(\d+)$")


class AnalysisError(RuntimeError):
    """Nothing could be analysed, or the run cannot be read at all."""


class AnalysisExists(AnalysisError):
    """The output folder already holds an analysis (and `overwrite` was not given)."""


class StatesUnavailable(AnalysisError):
    """One step's states exist but cannot be read (a failed download, a corrupt file); that step is skipped."""


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


# --- where states come from --------------------------------------------------------------------------------


def read_split_states(directory: Path, split: str, data_types: Sequence[str]) -> States:
    """`load_states`, with an unreadable file reported as `StatesUnavailable` (that step is skipped)."""
    try:
        return load_states(directory, split, data_types)
    except ValueError as error:
        raise StatesUnavailable(str(error)) from error


def _has_split(directory: Path, split: str) -> bool:
    return any(
        (directory / f"{split}_{kind}{suffix}").is_file() for kind in DATA_TYPES for suffix in STATE_SUFFIXES
    )


class CheckpointSource(ABC):
    """A run whose checkpoints hold learning-dynamics states."""

    description: str

    @abstractmethod
    def training_config(self) -> dict[str, Any]:
        """The run's `training_config.yaml` ({} when it has none)."""

    @abstractmethod
    def available_steps(self, split: str) -> list[int]:
        """Steps that have states for `split`, ascending."""

    @abstractmethod
    def load(self, step: int, split: str, data_types: Sequence[str]) -> States:
        """The states of `split` at `step` ({} when absent)."""

    @abstractmethod
    def model_config(self) -> dict[str, Any] | None:
        """A checkpoint's model `config.json`, the fallback for the model shape."""

    @property
    def run_name(self) -> str | None:
        return (self.training_config().get("checkpointing") or {}).get("run_name")

    def learning_dynamics_dir(self) -> str:
        return (self.training_config().get("checkpointing") or {}).get("learning_dynamics_dir") or (
            "learning_dynamics"
        )

    def record_dirs(self) -> tuple[str, str]:
        """The run's evaluation results folder and logs folder (`eval_results`, `logs` by default)."""
        checkpointing = self.training_config().get("checkpointing") or {}
        evaluation = checkpointing.get("evaluation") or {}
        return evaluation.get("eval_results_dir") or "eval_results", checkpointing.get("logs_dir") or "logs"

    @abstractmethod
    def run_records(self) -> Path:
        """A folder with the run's records beside its checkpoints, as in a run directory: its evaluation
        results (`eval_results/step_N.json`) and training curves (`logs/metrics.jsonl`), where it has them."""

    def model_shape(self) -> ModelShape:
        """d_model and attention heads, from the training config (else a checkpoint's config.json)."""
        errors = []
        for what, read in (
            (TRAINING_CONFIG_FILE, lambda: self.training_config().get("model")),
            ("config.json", self.model_config),  # read only when needed: on the Hub, a download
        ):
            config = read()
            if not config:
                errors.append(f"no {what}")
                continue
            config = dict(config)
            if config.get("attention_n_kv_heads") is None:  # pico-train: null means one kv head per head
                config["attention_n_kv_heads"] = config.get("attention_n_heads")
            try:
                return ModelShape.from_config(config)
            except ValueError as error:
                errors.append(f"{what}: {error}")
        raise AnalysisError(
            f"{self.description}: ov_circuit components need the model shape (d_model, attention_n_heads, "
            f"attention_n_kv_heads), and it could not be read ({'; '.join(errors)})"
        )


class LocalRun(CheckpointSource):
    """A run directory: `training_config.yaml` and `checkpoints/step_N/learning_dynamics/`."""

    def __init__(self, run_path: str | Path):
        self.run_path = Path(run_path)
        self.description = f"run {self.run_path}"
        if not self.run_path.is_dir():
            raise AnalysisError(f"Run path {self.run_path} does not exist")
        config_path = self.run_path / TRAINING_CONFIG_FILE
        self._config: dict[str, Any] = {}
        if config_path.is_file():
            self._config = yaml.safe_load(config_path.read_text()) or {}
        checkpoints = (self._config.get("checkpointing") or {}).get("checkpoints_dir") or "checkpoints"
        self.checkpoints = self.run_path / checkpoints
        if not self.checkpoints.is_dir():
            raise AnalysisError(
                f"Run path {self.run_path} does not contain a checkpoint folder ({checkpoints}/)"
            )

    def training_config(self) -> dict[str, Any]:
        return self._config

    def run_records(self) -> Path:
        return self.run_path

    def _step_dirs(self) -> dict[int, Path]:
        steps = {}
        for entry in self.checkpoints.iterdir():
            match = _STEP_DIR.match(entry.name)
            if match and entry.is_dir() and not entry.is_symlink():  # `latest` is a link to a step
                steps[int(match[1])] = entry
        return dict(sorted(steps.items()))

    def available_steps(self, split: str) -> list[int]:
        ld = self.learning_dynamics_dir()
        return [step for step, path in self._step_dirs().items() if _has_split(path / ld, split)]

    def load(self, step: int, split: str, data_types: Sequence[str]) -> States:
        directory = self.checkpoints / f"step_{step}" / self.learning_dynamics_dir()
        return read_split_states(directory, split, data_types)

    def model_config(self) -> dict[str, Any] | None:
        for path in reversed(self._step_dirs().values()):
            if (path / "config.json").is_file():
                return json.loads((path / "config.json").read_text())
        return None


class HubRun(CheckpointSource):
    """A run pushed to the Hub by pico-train or pico-hf: one branch, a commit per split and step.

    The branch's learning_dynamics folder only holds the latest step, so each step's files are downloaded
    at the commit titled `Saving Learning Dynamics Data (<split>) -- Step <N>`, and only those the metrics read.
    """

    def __init__(self, repo_id: str, branch: str, cache_dir: str | Path | None = None):
        from huggingface_hub import HfApi
        from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

        from ..hub import hub_reachable, offline_requested

        self.repo_id, self.branch, self.cache_dir = repo_id, branch, cache_dir
        self.description = f"{repo_id}@{branch}"
        if offline_requested():
            raise AnalysisError(
                f"Cannot read {self.description}: Hub access is switched off (HF_HUB_OFFLINE or "
                "TRANSFORMERS_OFFLINE is set); unset it, or analyse a local copy with --run_path"
            )
        if not hub_reachable():
            raise AnalysisError(f"Cannot read {self.description}: the Hugging Face Hub cannot be reached")
        self.api = HfApi()
        try:
            commits = self.api.list_repo_commits(repo_id, revision=branch)
        except RepositoryNotFoundError as error:
            raise AnalysisError(f"Hub repo {repo_id} does not exist (or is private: log in)") from error
        except RevisionNotFoundError as error:
            raise AnalysisError(f"Hub repo {repo_id} has no branch {branch!r}") from error
        except HfHubHTTPError as error:
            raise AnalysisError(f"Listing the commits of {self.description} failed: {error}") from error
        # Newest first: a step pushed twice (a resumed upload) is read from its latest commit.
        self.commits: dict[tuple[str, int], str] = {}
        for commit in commits:
            match = LEARNING_DYNAMICS_COMMIT.match(commit.title.strip())
            if match:
                self.commits.setdefault((match["split"], int(match["step"])), commit.commit_id)
        self._files: dict[str, Any] = {}  # downloaded from the branch head, parsed

    def _branch_file(self, filename: str) -> Any:
        """A YAML or JSON file at the head of the branch, parsed (None when the branch has none)."""
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError

        if filename not in self._files:
            try:
                path = hf_hub_download(self.repo_id, filename, revision=self.branch, cache_dir=self.cache_dir)
            except EntryNotFoundError:
                self._files[filename] = None
            else:
                self._files[filename] = yaml.safe_load(Path(path).read_text())  # YAML reads JSON too
        return self._files[filename]

    def training_config(self) -> dict[str, Any]:
        return self._branch_file(TRAINING_CONFIG_FILE) or {}

    def model_config(self) -> dict[str, Any] | None:
        return self._branch_file("config.json")

    def available_steps(self, split: str) -> list[int]:
        return sorted(step for s, step in self.commits if s == split)

    def run_records(self) -> Path:
        """The branch head's evaluation results and `logs/metrics.jsonl` (each checkpoint's commits carry
        them up to its step), downloaded."""
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError

        eval_dir, logs_dir = self.record_dirs()
        try:
            return Path(
                snapshot_download(
                    self.repo_id,
                    revision=self.branch,
                    allow_patterns=[f"{eval_dir}/*.json", f"{logs_dir}/metrics.jsonl"],
                    cache_dir=self.cache_dir,
                )
            )
        except (HfHubHTTPError, OSError) as error:
            raise AnalysisError(f"Downloading the records of {self.description} failed: {error}") from error

    def load(self, step: int, split: str, data_types: Sequence[str]) -> States:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError
        from huggingface_hub.utils import (
            are_progress_bars_disabled,
            disable_progress_bars,
            enable_progress_bars,
        )

        commit = self.commits.get((split, step))
        if commit is None:
            return {}
        ld = self.learning_dynamics_dir()
        patterns = [f"{ld}/{split}_{kind}{suffix}" for kind in data_types for suffix in STATE_SUFFIXES]
        bars_were_on = not are_progress_bars_disabled()
        disable_progress_bars()  # one "Fetching n files" bar per step would bury the analysis' own progress
        try:
            snapshot = snapshot_download(
                self.repo_id, revision=commit, allow_patterns=patterns, cache_dir=self.cache_dir
            )
        except (HfHubHTTPError, OSError) as error:
            raise StatesUnavailable(
                f"downloading {split} states of step {step} (commit {commit}) failed: {error}"
            ) from error
        finally:
            if bars_were_on:
                enable_progress_bars()
        return read_split_states(Path(snapshot) / ld, split, data_types)


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
        try:
            import wandb
        except ImportError:
            logger.warning(
                "monitoring.save_to_wandb is true but wandb is not installed (pip install wandb); "
                "results are written to disk only"
            )
            return
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
    "AnalysisConfig",
    "AnalysisError",
    "AnalysisExists",
    "AnalysisResult",
    "CheckpointSource",
    "HubRun",
    "LocalRun",
    "MonitoringSettings",
    "Skipped",
    "StatesUnavailable",
    "analysis_output_dir",
    "load_analysis_config",
    "parse_analysis_config",
    "parse_steps",
    "read_split_states",
    "result_stem",
    "run_analysis",
]
