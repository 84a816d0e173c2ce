"""Which `transformers.TrainingArguments` fields the `training_arguments` block may set.

The pico config owns the run's schedule, data order, checkpoints and publishing; the same setting given
again as a TrainingArguments field would be ignored or would desynchronise data and checkpoints, so it is a
config error naming the pico key to use. Every other field works as transformers documents it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from transformers import TrainingArguments

from ..configuration import ConfigError, suggest

# TrainingArguments field -> what to use instead.
OWNED_BY_PICO = {
    "output_dir": "checkpointing.runs_dir and checkpointing.run_name",
    "run_name": "checkpointing.run_name",
    "max_steps": "training.max_steps",
    "num_train_epochs": "training.max_steps",
    "gradient_accumulation_steps": "training.optimization.gradient_accumulation_steps",
    "per_device_train_batch_size": "data.dataloader.batch_size (the global batch)",
    "learning_rate": "training.optimization.lr",
    "warmup_steps": "training.optimization.lr_warmup_steps",
    "warmup_ratio": "training.optimization.lr_warmup_steps",
    "lr_scheduler_type": "training.optimization.lr_scheduler",
    "seed": "training.seed",
    "data_seed": "training.seed",
    "full_determinism": "training.seed",
    "bf16": "training.fabric.precision",
    "fp16": "training.fabric.precision",
    "use_cpu": "training.fabric.accelerator",
    "logging_steps": "monitoring.logging.log_every_n_steps",
    "save_steps": "checkpointing.save_every_n_steps",
    "save_strategy": "checkpointing.save_every_n_steps",
    "resume_from_checkpoint": "checkpointing.training.auto_resume",
    "push_to_hub": "checkpointing.save_to_hf",
    "hub_model_id": "checkpointing.hf_checkpoint.repo_id",
    "hub_strategy": "checkpointing.save_to_hf (every checkpoint is pushed)",
    "hub_token": "checkpointing.save_to_hf (log in with `hf auth login` or HF_TOKEN)",
    "hub_private_repo": "checkpointing.hf_checkpoint.repo_id (create the repository private beforehand)",
    "hub_always_push": "checkpointing.save_to_hf",
    "hub_revision": "checkpointing.save_to_hf (each checkpoint is its own branch)",
}
# Fields the recipe cannot honour, and why.
NOT_SUPPORTED = {
    "save_total_limit": "every checkpoint is kept (pico-train's run layout, which publishing and analysis read)",
    "ignore_data_skip": "the data stream is always positioned exactly where a resumed run stopped",
    "dataloader_num_workers": "the training data is read in the training process, whose stream position "
    "each checkpoint saves for an exact resume",
    "eval_strategy": "evaluation runs at each checkpoint; set evaluation.metrics",
}


def check_training_arguments(values: dict[str, Any]) -> None:
    """Errors for `training_arguments` keys that are not TrainingArguments fields, or that pico owns."""
    valid = {f.name for f in dataclasses.fields(TrainingArguments)}
    for key in values:
        path = f"training_arguments.{key}"
        if key not in valid:
            close = suggest(key, sorted(valid))
            hint = f"; did you mean '{close}'?" if close else ""
            raise ConfigError(f"Unknown config key '{path}': not a TrainingArguments field{hint}")
        if key in OWNED_BY_PICO:
            raise ConfigError(f"'{path}' is set by the pico config: use {OWNED_BY_PICO[key]} instead")
        if key in NOT_SUPPORTED:
            raise ConfigError(f"'{path}' is not supported: {NOT_SUPPORTED[key]}")
