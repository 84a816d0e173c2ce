"""The Trainer callbacks that publish a run while it trains: each checkpoint is queued on the Hub commit queue
once it is complete, and its large files upload early (`pico_hf.hub.publish` describes the commits)."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from huggingface_hub.utils import disable_progress_bars
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ..training.trainer import CheckpointContributor
from .commits import (
    _STEP_DIR,
    STAGING_PREFIX,
    HubPublisher,
    HubPushError,
    RunFolders,
    _files_under,
    _visible,
    check_hub_ready,
    checkpoint_steps,
    describe_error,
    plan_checkpoint_commits,
)

logger = logging.getLogger("pico_hf.training.hub")  # under the training logger: same console and log file


class HubPublishCallback(CheckpointContributor):
    """Pushes each checkpoint of the run once it is published complete on disk (main process only)."""

    def __init__(self, publisher: HubPublisher, run_dir: Path, folders: RunFolders) -> None:
        self.publisher, self.run_dir, self.folders = publisher, Path(run_dir), folders
        self.early_upload = HubEarlyUpload(publisher, folders)
        self._prepared = False
        self._ended = False
        self.push_error: HubPushError | None = None
        self._trainer: Any = None
        self._last_step: int | None = None  # the final checkpoint, pushed once training has ended

    def _prepare(self) -> None:
        if not self._prepared:
            self.publisher.prepare()
            self._prepared = True

    def _submit(self, step: int) -> None:
        self.publisher.submit(plan_checkpoint_commits(self.run_dir, step, self.folders))

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if not state.is_world_process_zero:
            return
        self._prepare()
        # Staging folders of early uploads a killed run left behind (the uploads died with it).
        for stale in (self.run_dir / self.folders.checkpoints).glob(f"{STAGING_PREFIX}*"):
            shutil.rmtree(stale, ignore_errors=True)
        # Checkpoints written before this start (a resumed or re-run job): push what the branch lacks of them.
        for step in checkpoint_steps(self.run_dir, self.folders):
            if step <= state.global_step:
                self._submit(step)

    def on_checkpoint_published(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        checkpoint_dir: Path | None = None,
        **kwargs: Any,
    ):
        self._trainer = kwargs.get("trainer", self._trainer)
        if not state.is_world_process_zero:
            return
        self._prepare()
        match = _STEP_DIR.match(Path(checkpoint_dir).name) if checkpoint_dir is not None else None
        step = int(match[1]) if match else state.global_step
        if step >= state.max_steps and not self._ended:
            # The run's last log (the trainer's summary of the run) comes after its last checkpoint: that
            # checkpoint's commits are planned when training ends, so its curves are the whole local files.
            self._last_step = step
            return
        self._submit(step)
        if self._ended:  # published while training was being wrapped up: nobody waits for it later
            self.publisher.finish()

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        # A checkpoint still open (a run stopped early) is published first, on every process as the trainer
        # would, so that it is pushed too and survives a HubPushError below.
        if self._trainer is not None and hasattr(self._trainer, "finish_pending_checkpoint"):
            self._trainer.finish_pending_checkpoint(next_step_ran=False)
        if not state.is_world_process_zero:
            return
        self._ended = True
        try:
            self._finish(state)
        except HubPushError as error:
            # Raised by the run once the trainer has wrapped up (progress bar, summary): see hub_push_error.
            self.push_error = error

    def _finish(self, state: TrainerState) -> None:
        if self._last_step is not None:
            self._prepare()
            self._submit(self._last_step)
        self.publisher.finish()
        final = max(checkpoint_steps(self.run_dir, self.folders), default=None)
        if final is not None and final == state.global_step >= state.max_steps:  # a finished run only
            try:
                oid = self.publisher.push_final(self.run_dir, final, self.folders)
            except Exception as error:
                command = self.publisher.completing_command()
                raise HubPushError(
                    f"The final model (step {final}) could not be put on 'main' of {self.publisher.repo_id}: "
                    f"{describe_error(error)}. The run branch is complete; push it with: {command}",
                    command,
                ) from error
            if oid is not None:
                logger.info("Pushed the final model (step_%d) and its card to 'main' (%s)", final, oid[:8])


class HubEarlyUpload(CheckpointContributor):
    """Starts the upload of a checkpoint's weights and training state as soon as they are written, while the
    contributors after it (learning dynamics, evaluation) still work on the checkpoint; it must come before
    them among the callbacks."""

    def __init__(self, publisher: HubPublisher, folders: RunFolders) -> None:
        self.publisher, self.folders = publisher, folders

    def on_checkpoint(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        checkpoint_dir: Path | None = None,
        **kwargs: Any,
    ):
        if not state.is_world_process_zero or checkpoint_dir is None or self.publisher._head is None:
            return  # not prepared yet (the branch must exist)
        step_dir = Path(checkpoint_dir)
        found = [(p, p.name) for p in sorted(step_dir.iterdir()) if p.is_file() and _visible(p)]
        found += _files_under(step_dir / self.folders.fabric_state, self.folders.fabric_state)
        self.publisher.upload_early(found, staging_parent=step_dir.parent)


def hub_early_uploads(callbacks: Sequence[TrainerCallback]) -> list[HubEarlyUpload]:
    """The early-upload contributor of the Hub publisher among `callbacks` (none when pushing is off), to be
    placed before the contributors that make checkpoints slow to complete."""
    return [c.early_upload for c in callbacks if isinstance(c, HubPublishCallback)]


def build_hub_callbacks(config: Any, run: Any) -> list[TrainerCallback]:
    """The Hub publisher when `checkpointing.save_to_hf` is on (checked to be usable before training)."""
    checkpointing = config.checkpointing
    if not checkpointing.save_to_hf:
        return []
    check_hub_ready()
    # Background uploads would draw huggingface_hub's per-file bars over the training progress bar.
    disable_progress_bars()
    publisher = HubPublisher(
        checkpointing.hf_checkpoint.repo_id,
        branch=str(checkpointing.run_name),
        collection_slug=checkpointing.hf_checkpoint.collection_slug,
        run_dir=run.run_dir,
    )
    return [HubPublishCallback(publisher, run.run_dir, RunFolders.from_checkpointing(checkpointing))]


def hub_push_error(trainer: Any) -> HubPushError | None:
    """What the run's final push left undone, if anything (raised by `run_training` after its summary)."""
    callbacks = [c for c in trainer.callback_handler.callbacks if isinstance(c, HubPublishCallback)]
    return callbacks[0].push_error if callbacks else None


def hub_summary(trainer: Any) -> str | None:
    """The run summary's `hub:` line: commits pushed and retries, and what is left with its command."""
    callbacks = [c for c in trainer.callback_handler.callbacks if isinstance(c, HubPublishCallback)]
    if not callbacks:
        return None
    publisher = callbacks[0].publisher
    with publisher._lock:
        pushed, left = len(publisher.pushed), len(publisher._pending)
    line = f"{pushed} commits pushed, {publisher.retries} retries"
    if left:
        line += f"; {left} NOT pushed, finish with: {publisher.completing_command()}"
    return line
