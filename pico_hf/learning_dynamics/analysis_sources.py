"""Where an analysis reads a run's learning-dynamics states: a local run directory (pico-hf's safetensors or
pico-train's `.pt` files) or a Hub repo branch, one commit per step and split."""

from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

from .capture import DATA_TYPES, STATE_SUFFIXES, load_states
from .components import ModelShape

States = dict[str, dict[str, torch.Tensor]]

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

        from ..hub_access import hub_reachable, offline_requested

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


__all__ = [
    "AnalysisError",
    "AnalysisExists",
    "CheckpointSource",
    "HubRun",
    "LocalRun",
    "StatesUnavailable",
    "read_split_states",
]
