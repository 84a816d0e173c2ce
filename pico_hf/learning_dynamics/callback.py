"""Learning-dynamics capture at every checkpoint of a training run, and the metrics computed on it.

What a checkpoint at step N holds under `learning_dynamics/` (pico-train's definitions):

- `val`: a fixed evaluation set (`checkpointing.learning_dynamics.eval_data`), run forward and backward with
  the weights of step N when the checkpoint is written; gradients are those of the mean next-token loss over
  the whole set.
- `train`: the batch of optimizer step N+1 as the real training step saw it: activations recorded by forward
  hooks during its micro-batches, gradients read just before its update (the optimizer's own gradient: the
  mean loss over the global batch, reduced across processes), weights of step N. No second forward or
  backward pass is run. The last checkpoint of a run has no next step, so no `train` split.

pico-train instead summed per-sub-batch mean-loss gradients over `B / learning_dynamics.batch_size`
sub-batches, so its gradients equal these times that number of sub-batches (for `val`: the number of
`learning_dynamics.batch_size` sub-batches of the evaluation set). Scale-free metrics (PER, condition number,
Gini, Hoyer, CKA, PWCCA) are unaffected; norms scale by it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from transformers import TrainerControl, TrainerState, TrainingArguments

from ..training.config import PicoTrainingConfig
from ..training.rundir import RunLayout
from ..training.trainer import CheckpointContributor
from .capture import (
    ActivationRecorder,
    EffectiveGradientRecorder,
    find_layers,
    gradients_of,
    save_states,
    to_sample_order,
    weights_of,
)

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"


def load_eval_rows(name: str, max_samples: int | None, max_seq_len: int) -> list[list[int]]:
    """The `val` split's rows (token ids), each cut to `max_seq_len + 1` tokens (inputs plus next tokens)."""
    from ..hub_access import hub_reachable, offline_requested
    from ..training.data import EMBEDDED, INPUT_IDS, check_columns, open_pretokenized

    if name != EMBEDDED and not Path(name).exists() and not hub_reachable() and not offline_requested():
        logger.warning(
            "Learning-dynamics eval data '%s' is unreachable offline; using the embedded split", name
        )
        name = EMBEDDED
    split = "val" if name != EMBEDDED and not Path(name).exists() else "validation"
    dataset = open_pretokenized(
        name, split=split, streaming=False, key="checkpointing.learning_dynamics.eval_data"
    )
    check_columns(dataset, name)
    if max_samples is not None:
        dataset = dataset.select(range(min(max_samples, len(dataset))))
    rows = [list(ids[: max_seq_len + 1]) for ids in dataset[INPUT_IDS]]
    short = [i for i, row in enumerate(rows) if len(row) < 2]
    if short:
        raise ValueError(
            f"Learning-dynamics eval data '{name}' has rows of fewer than 2 tokens (rows {short[:5]})"
        )
    return rows


class LearningDynamicsCallback(CheckpointContributor):
    """Captures pico-train's learning-dynamics states into every checkpoint and computes configured metrics."""

    def __init__(self, config: PicoTrainingConfig, run: RunLayout, eval_rows: list[list[int]] | None) -> None:
        ld = config.checkpointing.learning_dynamics
        self.layer_suffixes = list(ld.layer_suffixes)
        self.sequence_idx = ld.sequence_idx
        self.eval_batch_size = ld.batch_size
        self.eval_rows = eval_rows
        self.dirname = config.checkpointing.learning_dynamics_dir
        self.global_batch = config.data.dataloader.batch_size
        self.metric_specs = ld.metrics
        self.file_format = ld.file_format
        self.run = run
        self.layers: dict[str, torch.nn.Module] = {}
        self.recorder: ActivationRecorder | None = None
        self.effective_gradients: EffectiveGradientRecorder | None = None
        self.pending_train_ids: list[torch.Tensor] = []
        self.capture_next_step = False
        self.metrics = None  # built lazily, needs the model shape

    # --- setup ------------------------------------------------------------------------------------------------

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model=None, **kwargs
    ):
        self.layers = find_layers(model, self.layer_suffixes)
        self.recorder = ActivationRecorder(model, self.layers, self.sequence_idx)
        self.effective_gradients = EffectiveGradientRecorder(self.layers)  # ReLoRA's LoRA layers
        model.register_forward_pre_hook(self._record_inputs, with_kwargs=True)
        self.tokenizer = kwargs.get("processing_class")
        if self.metric_specs:
            from .tracker import MetricsTracker

            self.metrics = MetricsTracker.from_config(self.metric_specs, model.config)
            if state.global_step > 0:  # resumed: comparisons continue from the states saved on disk
                self.metrics.restore(state.global_step, lambda step: self.run.step_dir(step) / self.dirname)

    def _record_inputs(self, module: torch.nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        if self.recorder is not None and self.recorder.armed and module.training:
            ids = kwargs.get("input_ids", args[0] if args else None)
            targets = kwargs.get("shift_labels")
            if ids is not None and targets is not None:  # inputs plus the last target: the full training row
                self.pending_train_ids.append(torch.cat([ids, targets[:, -1:]], dim=1).cpu())

    # --- checkpoint hooks ---------------------------------------------------------------------------------------

    def on_checkpoint(self, args, state, control, checkpoint_dir: Path, model=None, trainer=None, **kwargs):
        directory = Path(checkpoint_dir) / self.dirname
        if self.eval_rows:
            activations, gradients = self._eval_states(model, trainer)
            weights = weights_of(self.layers)  # on every process: gathering FSDP2 shards is a collective
            if args.should_save:
                save_states(
                    directory,
                    "val",
                    activations,
                    weights,
                    gradients,
                    self.eval_rows,
                    self.tokenizer,
                    self.file_format,
                )
        if state.global_step >= state.max_steps:  # no next step: finish now, with `val` only
            self._finish(args, state, directory, trainer)
        else:
            self.capture_next_step = True

    def needs_next_step(self, state: TrainerState) -> bool:
        return True

    def on_step_begin(self, args, state, control, **kwargs):
        if self.capture_next_step:  # this step's batch and gradients belong to the open checkpoint
            self.capture_next_step = False
            self.pending_train_ids = []
            self.recorder.start()
            self.effective_gradients.start()

    def on_checkpoint_next_step(
        self, args, state, control, checkpoint_dir: Path, model=None, trainer=None, **kwargs
    ):
        recorded = self.recorder.stop()
        effective = self.effective_gradients.stop()
        if trainer.accelerator.num_processes > 1:  # DDP averages the other gradients across processes
            for tensor in effective.values():
                moved = tensor.to(trainer.args.device)
                dist.all_reduce(moved)
                tensor.copy_(moved.cpu() / trainer.accelerator.num_processes)
        micro_batch = trainer.args.per_device_train_batch_size
        activations = {name: self._gather(rows, trainer, micro_batch) for name, rows in recorded.items()}
        input_ids = self._gather(torch.cat(self.pending_train_ids), trainer, micro_batch)
        self.pending_train_ids = []
        directory = Path(checkpoint_dir) / self.dirname
        weights, gradients = (
            weights_of(self.layers),
            gradients_of(self.layers, effective),
        )  # FSDP2: collectives
        if args.should_save:
            save_states(
                directory,
                "train",
                activations,
                weights,
                gradients,
                input_ids.tolist(),
                self.tokenizer,
                self.file_format,
            )
        self._finish(args, state, directory, trainer)

    # --- internals --------------------------------------------------------------------------------------------

    def _gather(self, local: torch.Tensor, trainer, micro_batch: int) -> torch.Tensor:
        processes = trainer.accelerator.num_processes
        if processes == 1:
            return local
        gathered = trainer.accelerator.gather(local.to(trainer.args.device)).cpu()
        return to_sample_order(local, gathered, processes, micro_batch)

    def _eval_states(self, model, trainer) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Forward and backward over the evaluation rows with the current weights; training state untouched."""
        unwrapped = trainer.accelerator.unwrap_model(model)
        processes, rank = trainer.accelerator.num_processes, trainer.accelerator.process_index
        micro = max(1, self.eval_batch_size // processes)
        # Longest rows first, so each sub-batch pads to rows of about its own length (in stored order a
        # 2048-token split computes several times its real tokens); activations go back to stored order below.
        order = sorted(range(len(self.eval_rows)), key=lambda i: (-len(self.eval_rows[i]), i))
        rows = [self.eval_rows[i] for i in order]
        chunk = micro * processes
        padded_len = -(-len(rows) // chunk) * chunk
        # Processes need equal shares: pad with copies of the shortest row that carry no loss and are dropped
        # afterwards.
        extended = [(rows[min(i, len(rows) - 1)], i < len(rows)) for i in range(padded_len)]
        mine = [
            extended[(g * processes + rank) * micro : (g * processes + rank + 1) * micro]
            for g in range(padded_len // chunk)
        ]
        n_targets = sum(len(row) - 1 for row in rows)
        pad_id = unwrapped.config.pad_token_id if unwrapped.config.pad_token_id is not None else 0
        device = trainer.args.device

        # FSDP2 reduce-scatters each backward's gradients averaged over processes; DDP is not involved here (the
        # unwrapped model), so its gradients are summed below instead.
        sharded = any(isinstance(p, DTensor) for p in unwrapped.parameters())
        saved_grads = {name: p.grad for name, p in unwrapped.named_parameters()}
        was_training = unwrapped.training
        unwrapped.zero_grad(set_to_none=True)
        unwrapped.eval()
        self.recorder.start()
        self.effective_gradients.start()
        try:
            for micro_rows in mine:
                width = max(len(row) for row, _ in micro_rows) - 1
                input_ids = torch.full((len(micro_rows), width), pad_id, dtype=torch.long)
                targets = torch.full((len(micro_rows), width), -100, dtype=torch.long)
                attention_mask = torch.zeros((len(micro_rows), width), dtype=torch.long)
                for i, (row, real) in enumerate(micro_rows):
                    row = torch.tensor(row)
                    input_ids[i, : len(row) - 1] = row[:-1]
                    attention_mask[i, : len(row) - 1] = 1
                    if real:
                        targets[i, : len(row) - 1] = row[1:]
                lengths = attention_mask.sum(1)
                self.recorder.positions = (
                    (lengths + self.sequence_idx)
                    if self.sequence_idx < 0
                    else torch.full_like(lengths, self.sequence_idx)
                )
                with trainer.autocast_smart_context_manager(), torch.enable_grad():
                    out = unwrapped(
                        input_ids=input_ids.to(device),
                        attention_mask=attention_mask.to(device),
                        shift_labels=targets.to(device),
                        skip_logits=True,
                        num_items_in_batch=n_targets,
                    )
                (out.loss * processes if sharded else out.loss).backward()
            recorded = self.recorder.stop()
            effective = self.effective_gradients.stop()
            gradients = gradients_of(self.layers, effective)
        finally:
            self.recorder.armed = False
            self.effective_gradients.armed = False
            unwrapped.train(was_training)
            for name, param in unwrapped.named_parameters():
                param.grad = saved_grads[name]
        if processes > 1 and dist.is_initialized():
            for name, tensor in gradients.items():
                if sharded and name not in effective:  # FSDP2 has reduced these already
                    continue
                moved = tensor.to(device)
                dist.all_reduce(moved)
                tensor.copy_(moved.cpu() / (processes if sharded else 1))  # undo the loss scaling above
        # Row i of the split is row stored_order[i] of the sorted ones.
        stored_order = torch.empty(len(order), dtype=torch.long)
        stored_order[torch.tensor(order)] = torch.arange(len(order))
        activations = {
            name: self._gather(outputs, trainer, micro)[: len(rows)][stored_order]
            for name, outputs in recorded.items()
        }
        return activations, gradients

    def _finish(self, args, state: TrainerState, directory: Path, trainer) -> None:
        """Metrics for this checkpoint's states, logged and written beside them."""
        if self.metrics is None or not args.should_save:
            return
        results = self.metrics.update(state.global_step, directory)
        (directory / METRICS_FILE).write_text(json.dumps(results, indent=2))
        trainer.log(self.metrics.flatten(results))


def build_learning_dynamics_callbacks(config: PicoTrainingConfig, run: RunLayout) -> list:
    ld = config.checkpointing.learning_dynamics
    if not ld.layer_suffixes:
        return []
    eval_rows = (
        load_eval_rows(ld.eval_data, ld.eval_max_samples, config.model.max_seq_len) if ld.eval_data else None
    )
    return [LearningDynamicsCallback(config, run, eval_rows)]
