"""Train and analyse every run of a study, reusing what is already done.

A run is done when its folder holds the checkpoint of its last step (and that step's evaluation, when the
study evaluates) and was trained with exactly the config the study asks for now; done runs are not touched.
A run with earlier checkpoints only was interrupted: training it again resumes from its latest checkpoint
(`checkpointing.training.auto_resume`). A run folder whose saved config differs from the study's is an error,
never silently mixed into the comparison.

Runs are trained one after the other. Launched as one process, each run is `recipes/train.py` in a fresh
interpreter (isolated: nothing of one run leaks into the next). Under `accelerate launch` (several processes),
every process trains each run in-process, so each run uses all the processes the study was given; the main
process then analyses and reports.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from ..training.rundir import RunLayout
from .config import RunSpec, StudyConfig

logger = logging.getLogger("pico_hf.study")

TIMING_FILE = "study_timing.json"  # wall time of each training attempt the study made for the run
ANALYSIS_DIR = "analysis"
ANALYSIS_MARKER = "study_analysis.json"  # the analysis config the results in `analysis/` were computed with

NEW, PARTIAL, DONE = "new", "partial", "done"


class StudyError(RuntimeError):
    """A run failed or a run folder does not belong to this study."""


def _normalised(tree: Any) -> Any:
    return yaml.safe_load(yaml.safe_dump(tree, sort_keys=True))


def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    """A run's config without where its folder is: a study folder can be moved or copied."""
    config = _normalised(config)
    config.get("checkpointing", {}).pop("runs_dir", None)
    return config


def run_layout(spec: RunSpec) -> RunLayout:
    checkpointing = spec.config.checkpointing
    return RunLayout(
        spec.run_dir,
        checkpointing.checkpoints_dir,
        checkpointing.logs_dir,
        checkpointing.fabric_checkpoint_dir,
    )


def run_state(spec: RunSpec) -> str:
    """NEW (nothing trained), PARTIAL (interrupted: resumable) or DONE, from the run's files."""
    saved = spec.run_dir / "training_config.yaml"
    if not saved.is_file():
        return NEW
    if _comparable(yaml.safe_load(saved.read_text())) != _comparable(spec.config.to_dict()):
        raise StudyError(
            f"Run {spec.run_dir} was trained with a different config than the study now gives "
            f"variant {spec.variant!r}, seed {spec.seed}; delete that folder (or rename the study) to retrain it"
        )
    latest = run_layout(spec).latest_checkpoint()
    final_step = spec.config.training.max_steps
    if latest is None or latest.name != f"step_{final_step}":
        return PARTIAL
    if spec.config.evaluation.metrics:
        results = spec.run_dir / spec.config.checkpointing.evaluation.eval_results_dir
        if not (results / f"step_{final_step}.json").is_file():
            return PARTIAL
    return DONE


@dataclass
class RunOutcome:
    spec: RunSpec
    status: str  # "reused", "trained" or "resumed"


def say(message: str) -> None:
    print(message, flush=True)  # before the run's own output, which a subprocess writes straight out


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def train_subprocess(spec: RunSpec, base_config: Path, train_script: Path) -> None:
    """`recipes/train.py --config <base> <overrides>` in a fresh interpreter; its output goes to ours."""
    command = [sys.executable, str(train_script), "--config", str(base_config), *spec.overrides]
    returncode = subprocess.call(command)
    if returncode != 0:
        raise StudyError(
            f"Training {spec.name} failed (exit status {returncode}); see {spec.run_dir / 'logs'}. "
            "Run the study again to resume it."
        )


def train_in_process(spec: RunSpec) -> None:
    """`run_training` in this process (every process of an `accelerate launch` trains the run together)."""
    from ..training.run import run_training

    # Each run adds its log file to these loggers; take them off again so the next run's lines stay out of it.
    loggers = [logging.getLogger(name) for name in ("transformers", "pico_hf", "pico_hf.training")]
    handlers = {log.name: list(log.handlers) for log in loggers}
    try:
        run_training(spec.config)
    finally:
        for log in loggers:
            for handler in log.handlers[:]:
                if handler not in handlers[log.name]:
                    log.removeHandler(handler)
                    handler.close()
        gc.collect()


def _record_attempt(spec: RunSpec, seconds: float, resumed_from: str | None, ok: bool) -> None:
    path = spec.run_dir / TIMING_FILE
    attempts = json.loads(path.read_text())["attempts"] if path.is_file() else []
    attempts.append(
        {
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "seconds": round(seconds, 2),
            "resumed_from": resumed_from,
            "completed": ok,
        }
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"attempts": attempts}, indent=1) + "\n")


def train_runs(
    study: StudyConfig,
    train: Callable[[RunSpec], None],
    log: Callable[[str], None] = say,
) -> list[RunOutcome]:
    """Train every run not yet done, in the study's order (variant by variant, seed by seed)."""
    states = {spec.name: run_state(spec) for spec in study.runs}  # all checked before anything trains
    outcomes = []
    for index, spec in enumerate(study.runs, 1):
        state = states[spec.name]
        where = f"[{index}/{len(study.runs)}] {spec.name}"
        if state == DONE:
            log(f"{where}: done, reused ({spec.run_dir})")
            outcomes.append(RunOutcome(spec, "reused"))
            continue
        latest = run_layout(spec).latest_checkpoint() if state == PARTIAL else None
        log(f"{where}: " + (f"resuming from {latest}" if latest else "training") + f" -> {spec.run_dir}")
        start, ok = time.perf_counter(), False
        try:
            train(spec)
            ok = True
        finally:
            if is_main_process():
                _record_attempt(spec, time.perf_counter() - start, str(latest) if latest else None, ok)
        if run_state(spec) != DONE:
            raise StudyError(f"Training {spec.name} ended without its final checkpoint in {spec.run_dir}")
        outcomes.append(RunOutcome(spec, "resumed" if latest else "trained"))
    return outcomes


def analyse_runs(study: StudyConfig, log: Callable[[str], None] = say) -> list[str]:
    """The study's learning-dynamics analysis of each run into `<run>/analysis/`, unless already there with
    the same config. Returns warnings (runs or steps that could not be analysed)."""
    from ..learning_dynamics.analysis_sources import AnalysisError, LocalRun
    from ..learning_dynamics.analyze import run_analysis

    if study.analysis is None:
        return []
    warnings = []
    for spec in study.runs:
        analysis = study.analysis_for(spec)
        assert analysis is not None
        output_dir = spec.run_dir / ANALYSIS_DIR
        marker = output_dir / ANALYSIS_MARKER
        wanted = _normalised(_analysis_mapping(study, spec))
        if marker.is_file() and json.loads(marker.read_text()) == wanted:
            continue
        log(f"analysing {spec.name} -> {output_dir}")
        try:
            result = run_analysis(analysis, LocalRun(spec.run_dir), output_dir=output_dir)
        except AnalysisError as error:
            warnings.append(f"{spec.name}: not analysed ({error})")
            continue
        warnings += [f"{spec.name}: {skipped.describe()}" for skipped in result.skipped]
        marker.write_text(json.dumps(wanted, indent=1) + "\n")
    return warnings


def _analysis_mapping(study: StudyConfig, spec: RunSpec) -> dict[str, Any]:
    from .config import resolve_final

    assert study.analysis is not None
    return resolve_final(study.analysis, spec.config.training.max_steps)


def run_study(
    study: StudyConfig,
    train_script: Path | None = None,
    *,
    in_process: bool | None = None,
    log: Callable[[str], None] = say,
) -> tuple[list[RunOutcome], list[str]]:
    """Train what is missing, then (main process) analyse. `in_process` defaults to True under a multi-process
    launch, else runs are `train_script` subprocesses."""
    if in_process is None:
        in_process = world_size() > 1 or train_script is None
    if in_process:
        train: Callable[[RunSpec], None] = train_in_process
    else:
        assert train_script is not None
        script = train_script

        def train(spec: RunSpec) -> None:
            train_subprocess(spec, study.base_config, script)

    if not is_main_process():
        log = _silent
    outcomes = train_runs(study, train, log)
    warnings = analyse_runs(study, log) if is_main_process() else []
    return outcomes, warnings


def _silent(message: str) -> None:
    pass


__all__ = [
    "ANALYSIS_DIR",
    "DONE",
    "NEW",
    "PARTIAL",
    "TIMING_FILE",
    "RunOutcome",
    "StudyError",
    "analyse_runs",
    "run_state",
    "run_study",
    "train_runs",
]
