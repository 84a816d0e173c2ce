"""One run directory, one training at a time, one run's data: the checks made before a run writes anything.

- A finished run started again does nothing (`finished_step`).
- A run directory already holding a run is resumed only when the model, data and seed are the ones it was
  started with, and never reused when `auto_resume` is off (`check_existing_run`).
- A lock file (`run.lock`, held with `fcntl.flock`) names the process training in the directory; the kernel
  releases it when that process dies, so a killed run's lock never blocks its resume (`RunLock`).
- `RunLayout` names the paths of a run and finds its newest complete checkpoint.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
from pathlib import Path
from typing import Any

import yaml
from transformers.trainer import TRAINER_STATE_NAME

from .config import ConfigError, PicoTrainingConfig

CONFIG_NAME = "training_config.yaml"
LOCK_NAME = "run.lock"
DATA_POSITION_NAME = "data_position.json"
LATEST = "latest"
# What a checkpoint's weights and data position depend on: resuming with any of these changed would mix runs.
IDENTITY_SECTIONS = ("model", "data")
IDENTITY_KEYS = ("training.seed",)
# Identity keys added after runs were made without them, with the value those runs had (they read the data in
# its stored order): such a run resumes with that value and is refused with the new default.
ADDED_KEYS = {"data.dataloader.shuffle": False}


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix.rstrip("."): tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(_flatten(value, f"{prefix}{key}."))
    return flat


def _identity(tree: dict[str, Any]) -> dict[str, Any]:
    flat = _flatten(tree)
    return {
        key: value
        for key, value in flat.items()
        if key.split(".")[0] in IDENTITY_SECTIONS or key in IDENTITY_KEYS
    }


def has_run(checkpoints_dir: Path) -> bool:
    """Whether a run directory already holds a run: any checkpoint (a run that failed its checks has none)."""
    return any(checkpoints_dir.glob("step_*"))


def check_existing_run(config: PicoTrainingConfig, checkpoints_dir: Path) -> None:
    """Refuse to mix a new run with the one already in the run directory."""
    run_dir = config.run_dir
    if not has_run(checkpoints_dir):
        return
    name = config.checkpointing.run_name
    if not config.checkpointing.training.auto_resume:
        raise ConfigError(
            f"Run directory {run_dir} already holds run '{name}' and checkpointing.training.auto_resume is "
            f"false. Start a new run with another checkpointing.run_name, or delete {run_dir} to start this "
            "one over (or set checkpointing.training.auto_resume=true to resume it)"
        )
    saved = run_dir / CONFIG_NAME
    if not saved.exists():
        return
    stored = {**ADDED_KEYS, **_identity(yaml.safe_load(saved.read_text()) or {})}
    current = _identity(config.to_dict())
    differing = sorted(k for k in stored.keys() | current.keys() if stored.get(k) != current.get(k))
    if differing:
        changes = ", ".join(f"{k} ({stored.get(k)!r} -> {current.get(k)!r})" for k in differing)
        raise ConfigError(
            f"Cannot resume run '{name}' in {run_dir}: its {CONFIG_NAME} differs in {changes}. Start a new "
            f"run with another checkpointing.run_name, or delete {run_dir} to start over with these settings"
        )


def checkpoint_step(checkpoint: Path, state_dirname: str) -> int:
    """The optimizer step a checkpoint was saved at."""
    position = checkpoint / state_dirname / "data_position.json"
    return json.loads(position.read_text())["step"] if position.exists() else int(checkpoint.name[5:])


def finished_step(latest: Path | None, state_dirname: str, max_steps: int) -> int | None:
    """The step of `latest` when it is `max_steps` (the run is complete), else None. A `max_steps` below the
    run's step is an error: the run cannot be shortened to a step it is already past."""
    if latest is None:
        return None
    step = checkpoint_step(latest, state_dirname)
    if step > max_steps:
        raise ConfigError(
            f"training.max_steps={max_steps} is below the run's current step {step} (its latest checkpoint is "
            f"{latest.name}): set training.max_steps={step} or more to keep this run, or use another "
            "checkpointing.run_name"
        )
    return step if step == max_steps else None


def saved_config(run_dir: Path) -> PicoTrainingConfig | None:
    """The config the run in `run_dir` last trained with (its training_config.yaml), if it has one."""
    from .config import load_config

    saved = run_dir / CONFIG_NAME
    if not saved.exists():
        return None
    try:
        return load_config(saved, check=False)[0]
    except ConfigError:  # written by another version of pico-hf: nothing to compare with
        return None


def write_config(config: PicoTrainingConfig, run_dir: Path) -> None:
    """`training_config.yaml`, written whole or not at all (temporary file, then an atomic rename)."""
    tmp = run_dir / f".{CONFIG_NAME}.tmp"
    with tmp.open("w") as handle:
        yaml.safe_dump(config.to_dict(), handle, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, run_dir / CONFIG_NAME)


def remove_leftovers(checkpoints_dir: Path) -> None:
    """Folders a killed run can leave: a checkpoint being replaced (`.step_N.old`)."""
    for old in checkpoints_dir.glob(".step_*.old"):
        shutil.rmtree(old, ignore_errors=True)


class RunLock:
    """An exclusive lock on a run directory, held for the life of the training."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self._handle = None

    def acquire(self) -> RunLock:
        handle = open(self.path, "a+")  # noqa: SIM115 (held, open, for the whole run)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip() or "another process"
            handle.close()
            raise ConfigError(
                f"Run directory {self.path.parent} is in use by {owner} (lock {self.path}). Wait for that "
                "training to end, or use another checkpointing.run_name"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on host {socket.gethostname()}\n")
        handle.flush()
        self._handle = handle
        return self

    def release(self) -> None:
        if self._handle is not None:
            fcntl.flock(self._handle, fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None


class RunLayout:
    """Paths of one run, in pico-train's layout."""

    def __init__(
        self,
        run_dir: Path,
        checkpoints_dirname: str = "checkpoints",
        logs_dirname: str = "logs",
        state_dirname: str = "fabric_state",
    ) -> None:
        self.run_dir = Path(run_dir)
        self.checkpoints_dir = self.run_dir / checkpoints_dirname
        self.logs_dir = self.run_dir / logs_dirname
        self.state_dirname = state_dirname

    def step_dir(self, step: int) -> Path:
        return self.checkpoints_dir / f"step_{step}"

    def state_dir(self, step_dir: Path) -> Path:
        return Path(step_dir) / self.state_dirname

    def is_complete(self, step_dir: Path) -> bool:
        state = self.state_dir(step_dir)
        return all((step_dir / f).is_file() for f in ("config.json", "model.safetensors")) and all(
            (state / f).is_file() for f in (TRAINER_STATE_NAME, DATA_POSITION_NAME)
        )

    def latest_checkpoint(self) -> Path | None:
        """The newest complete checkpoint: `latest` if it is sound, else the highest complete `step_N`."""
        latest = self.checkpoints_dir / LATEST
        if latest.is_symlink() and self.is_complete(latest.resolve()):
            return latest.resolve()
        steps = sorted(
            (p for p in self.checkpoints_dir.glob("step_*") if p.name[5:].isdigit() and self.is_complete(p)),
            key=lambda p: int(p.name[5:]),
        )
        return steps[-1] if steps else None

    def remove_partial_checkpoints(self) -> None:
        """Checkpoints still being written, and a `latest` link not yet moved into place (an interrupt between
        creating the new link and the rename leaves it; `latest` itself still names a complete checkpoint)."""
        for partial in self.checkpoints_dir.glob(".step_*.tmp"):
            shutil.rmtree(partial, ignore_errors=True)
        (self.checkpoints_dir / f".{LATEST}.tmp").unlink(missing_ok=True)
