"""`PicoTrainer`: transformers' Trainer with pico-train's data order, run layout and crash-safe checkpoints.

Run layout (pico-train's):

    runs/<run_name>/
        training_config.yaml                  the resolved config
        logs/                                 log file, metrics.jsonl, tensorboard/
        checkpoints/
            step_<N>/                         a valid pico-lm checkpoint (config.json, model.safetensors,
                                              tokenizer, model code) plus what callbacks add
                fabric_state/                 the state to resume: optimizer, scheduler, RNG, trainer
                                              state, data position (accelerate/Trainer files)
            latest -> step_<N>

A checkpoint is written to `.step_<N>.tmp/` and renamed into place when complete, then `latest` is swapped
atomically; a run killed at any moment resumes from a complete checkpoint.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import accelerate
import torch
from accelerate.utils import parse_flag_from_env
from accelerate.utils.constants import FSDP_MODEL_NAME
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.fsdp import FSDPModule
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer import TRAINER_STATE_NAME, TRAINING_ARGS_NAME
from transformers.trainer_callback import ExportableState

from .config import ConfigError
from .data import TrainingSequences, load_position, save_position
from .rundir import DATA_POSITION_NAME, LATEST, RunLayout
from .weights import load_complete_weights

if TYPE_CHECKING:
    from .modes import TrainingMode


class CheckpointContributor(TrainerCallback):
    """A callback that takes part in writing each checkpoint (learning dynamics, evaluation, publishing).

    - `on_checkpoint` runs on every process with the checkpoint's temporary directory, after the model and
      training state are written: whatever it writes there appears atomically with the rest.
    - `needs_next_step` asks to keep the checkpoint open until the next optimizer step, whose micro-batches
      and gradients (before the update) belong to it; `on_checkpoint_next_step` then runs just before that
      update, again with the temporary directory. The last checkpoint of a run never waits.
    - `on_checkpoint_published` runs on every process once the checkpoint is complete under its final name.
    """

    def on_checkpoint(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ):
        pass

    def needs_next_step(self, state: TrainerState) -> bool:
        return False

    def on_checkpoint_next_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ):
        pass

    def on_checkpoint_published(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ):
        pass


@dataclass
class PendingCheckpoint:
    """A checkpoint written to its temporary directory, waiting for the next optimizer step."""

    step: int
    tmp_dir: Path
    final_dir: Path
    waiting: list[CheckpointContributor]


def _fsync_tree(path: Path) -> None:
    for file in path.rglob("*"):
        if file.is_file():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())


def publish(tmp_dir: Path, final_dir: Path, latest: Path) -> None:
    """Move a finished checkpoint into place and point `latest` at it, each step atomic."""
    _fsync_tree(tmp_dir)
    if final_dir.exists():  # re-saving a step (e.g. the last one after a resume): replace it whole
        old = final_dir.with_name(f".{final_dir.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        final_dir.rename(old)
        tmp_dir.rename(final_dir)
        shutil.rmtree(old)
    else:
        tmp_dir.rename(final_dir)
    link = latest.with_name(f".{LATEST}.tmp")
    link.unlink(missing_ok=True)
    link.symlink_to(final_dir.name, target_is_directory=True)
    os.replace(link, latest)


class PicoTrainer(Trainer):
    """transformers.Trainer for pico: one training loop, with pico-train's global data order, checkpoint layout
    (pico-lm model files + resumable state), step-0 checkpoint, and throughput/inf-nan logging."""

    def __init__(
        self,
        *args: Any,
        train_sequences: TrainingSequences,
        run: RunLayout,
        mode: TrainingMode | None = None,
        lr_multiplier: Callable[[int], float] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.train_sequences = train_sequences
        self.run = run
        self.mode = mode  # a research mode (pico_hf.training.modes), whose hooks this trainer calls
        # training.optimization's schedule (pico_hf.training.schedules), or None: the Trainer's linear one.
        self.lr_multiplier = lr_multiplier
        # The step a fresh run starts from: 0, or that of a checkpoint it continues (a mode's warm start).
        self.start_step = 0
        if mode is not None:
            mode.attach(self)
        self.add_callback(_CheckpointScheduling(self))
        self._pending: PendingCheckpoint | None = None
        self._nonfinite_losses = 0
        self._last_log: tuple[float, int] | None = None

    # --- distribution -------------------------------------------------------------------------------------

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        # accelerate (1.x) turns an FSDP or DeepSpeed launch on CPU processes into plain data parallel without
        # a word: a run must do what its accelerate config says, or stop.
        requested = {
            "FSDP": (parse_flag_from_env("ACCELERATE_USE_FSDP"), self.is_fsdp_enabled),
            "DeepSpeed": (parse_flag_from_env("ACCELERATE_USE_DEEPSPEED"), self.is_deepspeed_enabled),
        }
        for name, (asked, enabled) in requested.items():
            if asked and not enabled:
                raise ConfigError(
                    f"The accelerate config asks for {name}, but accelerate {accelerate.__version__} runs "
                    f"{self.accelerator.num_processes} process(es) on {self.accelerator.device.type} as "
                    f"'{self.accelerator.distributed_type.value}' ({name} needs GPUs). On CPU, launch with "
                    "recipes/accelerate/cpu.yaml (data parallel) or torchrun."
                )

    # --- data ---------------------------------------------------------------------------------------------

    def get_train_dataloader(self) -> DataLoader:
        # Already per-process micro-batches in the global order: no sampler, no accelerate re-sharding.
        # Its own generator: creating an iterator draws a seed, which from the global RNG would shift the stream
        # (dropout) of a resumed run, whose RNG state is restored before the iterator is made.
        return DataLoader(self.train_sequences, batch_size=None, num_workers=0, generator=torch.Generator())

    def get_decay_parameter_names(self, model: torch.nn.Module) -> list[str]:
        # pico-train's optimizer is torch's AdamW on every parameter (weight decay 0.01 on norms too).
        return [name for name, _ in model.named_parameters()]

    def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: torch.device) -> Any:
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        if not batch_samples and self.train_sequences.data_error is not None:
            # Bad data ahead: stop, with a checkpoint of every step done (unless one is written or open).
            self.control.should_training_stop = True
            step = self.state.global_step
            open_here = self._pending is not None and self._pending.step == step
            self.control.should_save = not open_here and not self.run.step_dir(step).exists()
        return batch_samples, num_items_in_batch

    def create_optimizer(self, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
        if self.mode is None:
            return super().create_optimizer(model)
        target = model if model is not None else self.model
        return self.mode.create_optimizer(target, lambda: super(PicoTrainer, self).create_optimizer(model))

    def create_scheduler(
        self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None
    ) -> torch.optim.lr_scheduler.LRScheduler:
        if self.lr_scheduler is not None:
            return self.lr_scheduler
        schedule = self.mode.lr_multiplier(num_training_steps) if self.mode is not None else None
        schedule = schedule or self.lr_multiplier
        if schedule is None:
            return super().create_scheduler(num_training_steps, optimizer)
        optimizer = optimizer if optimizer is not None else self.optimizer
        if self.start_step:  # the schedule goes on at the step the run starts from (a resume loads its own)
            for group in optimizer.param_groups:
                group.setdefault("initial_lr", group["lr"])
        self.lr_scheduler = LambdaLR(optimizer, schedule, last_epoch=self.start_step - 1)
        self._created_lr_scheduler = True
        return self.lr_scheduler

    # --- training step and logging ------------------------------------------------------------------------

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        loss = None
        if self.mode is not None and model.training and not return_outputs:
            loss = self.mode.compute_loss(model, inputs)  # a mean over this micro-batch
        if loss is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        # The Trainer divides by the accumulation steps only when no `num_items_in_batch` normalised the loss.
        return loss if num_items_in_batch is None else loss / self.current_gradient_accumulation_steps

    def training_step(
        self, model: torch.nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None
    ) -> torch.Tensor:
        loss = super().training_step(model, inputs, num_items_in_batch)
        self._nonfinite_losses = self._nonfinite_losses + (~torch.isfinite(loss.detach())).long()  # no sync
        return loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        training_log = "loss" in logs  # a training log, not the end-of-training summary
        if training_log and self.mode is not None:
            self.mode.update_training_log(logs)
        if training_log:
            now, tokens = time.perf_counter(), self.state.num_input_tokens_seen
            if self._last_log is not None and now > self._last_log[0]:
                logs["tokens_per_second"] = round((tokens - self._last_log[1]) / (now - self._last_log[0]), 1)
            self._last_log = (now, tokens)
            logs["inf_or_nan_count"] = int(self._nonfinite_losses)
            self._nonfinite_losses = 0
        # The share of the dataset consumed (the Trainer's own epoch counts fractions of max_steps); none for
        # streamed data of unknown length.
        total = self.train_sequences.stream.num_sequences
        consumed = self.state.global_step * self.train_sequences.layout.global_batch
        self.state.epoch = round(consumed / total, 4) if total else None
        super().log(logs, start_time)

    # --- checkpoints --------------------------------------------------------------------------------------

    def _save_checkpoint(self, model: torch.nn.Module, trial: Any) -> None:
        step = self.state.global_step
        final_dir = self.run.step_dir(step)
        tmp_dir = final_dir.with_name(f".{final_dir.name}.tmp")
        state_dir = self.run.state_dir(tmp_dir)
        if self.args.should_save:
            shutil.rmtree(tmp_dir, ignore_errors=True)
            state_dir.mkdir(parents=True)
        self.accelerator.wait_for_everyone()

        self.store_flos()
        self.save_model(str(tmp_dir), _internal_call=True)  # pico-lm model files + tokenizer
        if self.args.should_save and (tmp_dir / TRAINING_ARGS_NAME).exists():
            (tmp_dir / TRAINING_ARGS_NAME).rename(state_dir / TRAINING_ARGS_NAME)
        if not self.args.save_only_model:
            # Before the first step the optimizer has no state to save, and FSDP's optimizer state dict would
            # make one by running a zero-gradient step, which shifts Adam's step count for the whole run.
            # Resuming from a checkpoint without optimizer files starts the optimizer and scheduler afresh.
            if not (self.is_fsdp_enabled and not self.optimizer.state):
                self._save_optimizer_and_scheduler(str(state_dir))
            self._save_scaler(str(state_dir))
            self._save_rng_state(str(state_dir))
            if self.args.should_save:  # FSDP's copy of the weights beside its optimizer: in model.safetensors
                (state_dir / f"{FSDP_MODEL_NAME}.bin").unlink(missing_ok=True)
        if self.args.should_save:
            for callback in [*self.callback_handler.callbacks, self.control]:
                if isinstance(callback, ExportableState):
                    self.state.stateful_callbacks[callback.__class__.__name__] = callback.state()
            self.state.save_to_json(str(state_dir / TRAINER_STATE_NAME))
            save_position(state_dir / DATA_POSITION_NAME, step, self.train_sequences.position_after(step))
            if self.mode is not None:
                self.mode.save_state(state_dir)

        for contributor in self.contributors:
            contributor.on_checkpoint(
                self.args, self.state, self.control, checkpoint_dir=tmp_dir, model=self.model, trainer=self
            )
        waiting = [c for c in self.contributors if c.needs_next_step(self.state)]
        if waiting and step < self.state.max_steps:
            self._pending = PendingCheckpoint(step, tmp_dir, final_dir, waiting)
        else:
            self._publish(tmp_dir, final_dir)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        # FSDP2 swaps the model's class for a generated `FSDP<Name>` subclass. save_pretrained would record that
        # class in `auto_map` (copying torch's FSDP sources beside the model) and miss the key renaming registered
        # under the model's own class name: save as the plain class (the full state dict is already gathered).
        model = self.accelerator.unwrap_model(self.model)
        if self.mode is not None:  # a mode may save other weights than the live model's (a plain model's)
            state_dict = self.mode.checkpoint_weights(model) or state_dict
        sharded_class = type(model)
        if isinstance(model, FSDPModule):
            model.__class__ = next(c for c in sharded_class.__mro__ if not issubclass(c, FSDPModule))
        try:
            super()._save(output_dir, state_dict)
        finally:
            model.__class__ = sharded_class

    @property
    def contributors(self) -> list[CheckpointContributor]:
        return [c for c in self.callback_handler.callbacks if isinstance(c, CheckpointContributor)]

    def finish_pending_checkpoint(self, next_step_ran: bool = True) -> None:
        """Complete the checkpoint kept open for this optimizer step (just before its update), then publish it."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        if next_step_ran:
            for contributor in pending.waiting:
                contributor.on_checkpoint_next_step(
                    self.args,
                    self.state,
                    self.control,
                    checkpoint_dir=pending.tmp_dir,
                    model=self.model,
                    trainer=self,
                )
        self._publish(pending.tmp_dir, pending.final_dir)

    def _publish(self, tmp_dir: Path, final_dir: Path) -> None:
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            publish(tmp_dir, final_dir, self.run.checkpoints_dir / LATEST)
        self.accelerator.wait_for_everyone()
        for contributor in self.contributors:
            contributor.on_checkpoint_published(
                self.args, self.state, self.control, checkpoint_dir=final_dir, model=self.model, trainer=self
            )

    def train(self, resume_from_checkpoint: str | None = None, **kwargs: Any):
        """Train; `resume_from_checkpoint` is a `step_N` directory (or its state folder)."""
        self.start_step = 0
        if resume_from_checkpoint is None and self.mode is not None:
            # A fresh run that continues another run's checkpoint: from its step and data position.
            position = self.mode.start_position()
            if position is not None:
                stream_state = {k: v for k, v in position.items() if k != "step"}
                self.train_sequences.resume_at(
                    position["step"], stream_state if "datasets" in position else None
                )
                self.start_step = position["step"]
        if resume_from_checkpoint is not None:
            step_dir = Path(resume_from_checkpoint)
            if step_dir.name == self.run.state_dirname:
                step_dir = step_dir.parent
            position = load_position(self.run.state_dir(step_dir) / DATA_POSITION_NAME)
            if position is None:
                raise ValueError(f"{step_dir} is not a resumable checkpoint: {DATA_POSITION_NAME} is missing")
            stream_state = {k: v for k, v in position.items() if k != "step"}
            self.train_sequences.resume_at(position["step"], stream_state if "datasets" in position else None)
            resume_from_checkpoint = str(self.run.state_dir(step_dir))
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def _init_training_state(self, *args: Any, **kwargs: Any) -> tuple[int, int]:
        trained = super()._init_training_state(*args, **kwargs)
        if self.start_step and self.state.global_step == 0:  # a fresh run, continuing: no step 0 of its own
            self.state.global_step = self.start_step
        return trained

    def _load_from_checkpoint(
        self, resume_from_checkpoint: str, model: torch.nn.Module | None = None
    ) -> None:
        # The weights live beside the state folder, in the pico-lm format; load them through from_pretrained,
        # which knows that format, then copy into the live model.
        # `set_model_state_dict` also fills FSDP2's sharded parameters from the full state dict.
        step_dir = Path(resume_from_checkpoint).parent
        target = self.accelerator.unwrap_model(model if model is not None else self.model)
        plain_class = next(c for c in type(target).__mro__ if not issubclass(c, FSDPModule))
        loaded = load_complete_weights(plain_class, step_dir, next(target.parameters()).dtype)
        weights = loaded.state_dict()
        if self.mode is not None:
            weights = self.mode.resume(Path(resume_from_checkpoint), target, weights)
        set_model_state_dict(target, weights, options=StateDictOptions(full_state_dict=True))


class _CheckpointScheduling(TrainerCallback):
    """pico-train checkpoints (and evaluates) the untrained model too: save the first step when a run starts fresh.
    A checkpoint kept open for the next optimizer step is completed just before that step's update."""

    def __init__(self, trainer: PicoTrainer) -> None:
        self.trainer = trainer

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ):
        start = self.trainer.start_step  # 0, or the step of a checkpoint this fresh run continues
        if state.global_step == start and not self.trainer.run.step_dir(start).exists():
            self.trainer._save_checkpoint(self.trainer.model, trial=None)

    def on_pre_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ):
        self.trainer.finish_pending_checkpoint()

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ):
        self.trainer.finish_pending_checkpoint(
            next_step_ran=False
        )  # a run stopped early publishes what it has


def no_clipping() -> float:
    """`max_grad_norm` that never clips (pico-train does not) but still makes the Trainer report the norm."""
    return math.inf
