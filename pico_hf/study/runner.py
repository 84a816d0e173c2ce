"""Train and analyse every run of a study, reusing what is already done.

A run is done when its folder holds the checkpoint of its last step (and that step's evaluation, when the
study evaluates) and was trained with exactly the config the study asks for now; done runs are not touched.
A run with earlier checkpoints only was interrupted: training it again resumes from its latest checkpoint
(`checkpointing.training.auto_resume`). A run folder whose saved config differs from the study's is an error,
never silently mixed into the comparison.

Launched as one process, each run is `recipes/train.py` in a fresh interpreter (isolated: nothing of one run
leaks into the next), `jobs` of them at once, each with its share of the CPU threads (and, with as many GPUs
as jobs, a GPU of its own). A run that fails does not stop the others: its exit status and the last lines of
its output are kept for the report, and the study ends with exit status 1. Under `accelerate launch` (several processes),
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
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
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
FAILED = "failed"
LOG_TAIL_LINES = 20  # of a failed run's output, in the report


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
    results = spec.run_dir / spec.config.checkpointing.evaluation.eval_results_dir
    if spec.config.evaluation.metrics and not (results / f"step_{final_step}.json").is_file():
        return PARTIAL
    if spec.config.evaluation.heldout_every_n_steps is not None:
        from ..evaluation.heldout import HELDOUT_FILE, read_heldout_losses

        if final_step not in read_heldout_losses(results / HELDOUT_FILE):
            return PARTIAL
    return DONE


@dataclass
class RunOutcome:
    spec: RunSpec
    status: str  # "reused", "trained", "resumed" or "failed"
    exit_status: int | None = None  # of a failed run
    log_tail: list[str] = field(default_factory=list)  # its last lines of output


class RunFailed(Exception):
    def __init__(self, exit_status: int, log_tail: list[str]) -> None:
        super().__init__(f"exit status {exit_status}")
        self.exit_status = exit_status
        self.log_tail = log_tail


def say(message: str) -> None:
    print(message, flush=True)  # before the run's own output, which a subprocess writes straight out


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


_print_lock = threading.Lock()


def train_subprocess(
    spec: RunSpec, base_config: Path, train_script: Path, env: dict[str, str] | None = None, prefix: str = ""
) -> None:
    """`recipes/train.py --config <base> <overrides>` in a fresh interpreter; its output goes to ours (each line
    after `prefix`), and its last lines to the failure it raises."""
    command = [sys.executable, str(train_script), "--config", str(base_config), *spec.overrides]
    tail: deque[str] = deque(maxlen=LOG_TAIL_LINES)
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace", env=env
    )
    assert process.stdout is not None
    for line in process.stdout:
        tail.append(line.rstrip("\n"))
        with _print_lock:
            sys.stdout.write(prefix + line)
            sys.stdout.flush()
    returncode = process.wait()
    if returncode != 0:
        raise RunFailed(returncode, list(tail))


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
    jobs: int = 1,
) -> list[RunOutcome]:
    """Train every run not yet done, `jobs` at a time, started in the study's order (variant by variant, seed
    by seed). A failed run is an outcome with status FAILED; the others still train."""
    states = {spec.name: run_state(spec) for spec in study.runs}  # all checked before anything trains

    def attempt(index: int, spec: RunSpec) -> RunOutcome:
        state = states[spec.name]
        where = f"[{index}/{len(study.runs)}] {spec.name}"
        if state == DONE:
            log(f"{where}: done, reused ({spec.run_dir})")
            return RunOutcome(spec, "reused")
        latest = run_layout(spec).latest_checkpoint() if state == PARTIAL else None
        log(f"{where}: " + (f"resuming from {latest}" if latest else "training") + f" -> {spec.run_dir}")
        start, ok = time.perf_counter(), False
        try:
            train(spec)
            ok = run_state(spec) == DONE
            failure = None if ok else RunFailed(0, [f"ended without its final checkpoint in {spec.run_dir}"])
        except RunFailed as error:
            failure = error
        except Exception as error:  # an in-process run: its traceback is its log tail
            lines = traceback.format_exception(error)
            failure = RunFailed(1, "".join(lines).rstrip("\n").splitlines()[-LOG_TAIL_LINES:])
        finally:
            if is_main_process():
                _record_attempt(spec, time.perf_counter() - start, str(latest) if latest else None, ok)
        if failure is not None:
            log(f"{where}: failed (exit status {failure.exit_status})")
            return RunOutcome(spec, FAILED, failure.exit_status, failure.log_tail)
        return RunOutcome(spec, "resumed" if latest else "trained")

    numbered = list(enumerate(study.runs, 1))
    if jobs == 1:
        return [attempt(index, spec) for index, spec in numbered]
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(lambda item: attempt(*item), numbered))


def analyse_runs(
    study: StudyConfig, log: Callable[[str], None] = say, runs: list[RunSpec] | None = None
) -> list[str]:
    """The study's learning-dynamics analysis of each run (default: all) into `<run>/analysis/`, unless already
    there with the same config. Returns warnings (runs or steps that could not be analysed)."""
    from ..learning_dynamics.analysis_sources import AnalysisError, LocalRun
    from ..learning_dynamics.analyze import run_analysis

    if study.analysis is None:
        return []
    warnings = []
    for spec in study.runs if runs is None else runs:
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
    jobs: int = 1,
) -> tuple[list[RunOutcome], list[str]]:
    """Train what is missing, then (main process) analyse. `in_process` defaults to True under a multi-process
    launch, else runs are `train_script` subprocesses, `jobs` at once."""
    from ..training.config import ConfigError

    if in_process is None:
        in_process = world_size() > 1 or train_script is None
    if jobs < 1:
        raise ConfigError(f"--jobs must be at least 1, got {jobs}")
    if jobs > 1 and in_process:
        raise ConfigError(
            "--jobs runs each run in a process of its own: it cannot be combined with --in_process or a "
            "multi-process launch (where every process trains each run)"
        )
    if in_process:
        train: Callable[[RunSpec], None] = train_in_process
    else:
        assert train_script is not None
        train = subprocess_trainer(study, train_script, jobs)

    if not is_main_process():
        log = _silent
    outcomes = train_runs(study, train, log, jobs)
    done = [o.spec for o in outcomes if o.status != FAILED]
    warnings = analyse_runs(study, log, done) if is_main_process() else []
    return outcomes, warnings


def subprocess_trainer(study: StudyConfig, train_script: Path, jobs: int) -> Callable[[RunSpec], None]:
    """Each run a `train_script` process; with jobs > 1, each with 1/jobs of the CPU threads (and its own GPU
    when there are as many GPUs as jobs), its output lines prefixed with the run's name."""
    if jobs == 1:
        return lambda spec: train_subprocess(spec, study.base_config, train_script)
    import queue

    import torch

    threads = max(1, (os.cpu_count() or 1) // jobs)
    gpus: queue.Queue[str | None] = queue.Queue()
    for slot in range(jobs):
        gpus.put(str(slot) if torch.cuda.device_count() >= jobs else None)

    def train(spec: RunSpec) -> None:
        gpu = gpus.get()
        try:
            env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
            if gpu is not None:
                env["CUDA_VISIBLE_DEVICES"] = gpu
            train_subprocess(spec, study.base_config, train_script, env, prefix=f"[{spec.name}] ")
        finally:
            gpus.put(gpu)

    return train


def _silent(message: str) -> None:
    pass


__all__ = [
    "ANALYSIS_DIR",
    "DONE",
    "FAILED",
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
