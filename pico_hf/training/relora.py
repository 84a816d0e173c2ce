"""ReLoRA pretraining (Lialin et al. 2023) of the pico-decoder through PEFT's LoRA layers.

The attention and SwiGLU projections get PEFT LoRA adapters; embeddings, norms and the output projection stay
full-rank trainable. Every `reset_frequency` steps each adapter is merged into its frozen base weight in place
and re-initialised (A kaiming, B zero), the LoRA parameters' Adam moments are pruned, and the learning rate
re-warms (the jagged cosine schedule). The Parameter objects survive every merge, so the optimizer and the DDP
wrapper are built once. The sum of many rank-r updates is a high-rank update.

What the run writes stays a plain pico run: each checkpoint's model files hold the effective (merged) weights,
so they load with `AutoModelForCausalLM.from_pretrained` and no peft; `fabric_state/relora_state.safetensors`
holds what else resuming mid-cycle needs, bit for bit: the wrapped modules' base weights and adapters.

Learning dynamics see each wrapped module as a full-rank run would (see `learning_dynamics.capture`): its weight
is the effective weight W + scaling * B @ A; its gradient is dL/dW_eff = sum over tokens of grad_out^T x, from
the module's input x and output gradient recorded by hooks during the real training step (the frozen base
weight itself gets no gradient, and nothing the optimizer sees changes).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, distribute_tensor
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from .modes.relora import DEEPSPEED_UNSUPPORTED, ReLoRA, ReLoRAConfig
from .schedules import jagged_cosine
from .weights import load_complete_weights

logger = logging.getLogger(__name__)

ADAPTER = "default"
RELORA_STATE_NAME = "relora_state.safetensors"


# --- the schedule (the jagged cosine is in .schedules) -------------------------------------------------


def is_reset_step(step: int, *, lora_start: int, reset_frequency: int, max_steps: int) -> bool:
    """Merge-and-reinit happens after optimizer step `step` (never after the last one); LoRA training starts
    after step `lora_start` (the warm start's end)."""
    since_start = step - lora_start
    return since_start > 0 and since_start % reset_frequency == 0 and step < max_steps


# --- wrapping, merging, pruning -------------------------------------------------------------------------


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The model's PEFT LoRA layers by module name."""
    from peft.tuners.lora import LoraLayer

    return {name: module for name, module in model.named_modules() if isinstance(module, LoraLayer)}


def is_lora_parameter(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def wrap_model(model: nn.Module, relora: ReLoRAConfig) -> nn.Module:
    """Inject PEFT LoRA adapters (A kaiming, B zero: the model's function is unchanged) into `model`, in place.

    Base weights of the wrapped modules are frozen; every other parameter stays trainable. During a warm start
    (`warm_start_steps`) it is the other way round until `set_phase` switches to LoRA."""
    from peft import LoraConfig, inject_adapter_in_model

    from .config import ConfigError

    lora_config = LoraConfig(
        r=relora.r,
        lora_alpha=relora.lora_alpha,
        lora_dropout=relora.lora_dropout,
        target_modules=list(relora.target_modules),
        bias="none",
    )
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    try:
        inject_adapter_in_model(lora_config, model, adapter_name=ADAPTER)
    except ValueError as error:  # PEFT's "Target modules ... not found in the base model"
        raise ConfigError(
            f"training.relora.target_modules {list(relora.target_modules)} match no module of the model: {error}"
        ) from error
    if not lora_layers(model):
        raise ConfigError(
            f"training.relora.target_modules {list(relora.target_modules)} match no module of the model"
        )
    for name, param in model.named_parameters():
        # PEFT froze the whole model; restore what was trainable, except the wrapped base weights.
        param.requires_grad = is_lora_parameter(name) or (name in trainable and ".base_layer." not in name)
    set_phase(model, lora=relora.warm_start_steps == 0)
    return model


def set_phase(model: nn.Module, lora: bool) -> None:
    """LoRA phase: adapters train, wrapped base weights are frozen. Warm start: the reverse (full-rank)."""
    for name, param in model.named_parameters():
        if is_lora_parameter(name):
            param.requires_grad = lora
        elif ".base_layer." in name:
            param.requires_grad = not lora
            if lora:
                param.grad = None


# Under FSDP2 (recipes/accelerate/fsdp.yaml) each parameter and its optimizer state are DTensors, sharded along
# dim 0 across processes. The merge, the new A and the pruning masks are computed on whole tensors, the same
# on every process and the same as in one process; each process then applies its own shard of them.


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: gathered from every process if it is sharded (a collective: all processes call it)."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def local_part(tensor: torch.Tensor) -> torch.Tensor:
    """The part of `tensor` this process holds, as a plain tensor that in-place updates write through."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This process's shard of `full`, laid out as `like` (a parameter or optimizer state) is."""
    if isinstance(like, DTensor):  # every process holds the same `full`: split it locally, no broadcast
        full = distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None).to_local()
    return full.to(like.device, like.dtype)


def lora_delta(layer: nn.Module, adapter: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """scaling * B @ A, the adapter's update to the base weight, as PEFT's `get_delta_weight` computes it."""
    delta = b.float() @ a.float()
    return (delta.T if layer.fan_in_fan_out else delta) * layer.scaling[adapter]


def effective_state_dict(
    model: nn.Module, state: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """The plain model's state dict: each wrapped module's weight is base + scaling * B @ A, adapters dropped.

    `state` is the wrapped model's whole state dict (by default `model.state_dict()`, for an unsharded model)."""
    state = model.state_dict() if state is None else state
    effective = {}
    with torch.no_grad():
        for key, tensor in state.items():
            if is_lora_parameter(key):
                continue
            effective[key.replace(".base_layer.", ".")] = tensor
        for name, layer in lora_layers(model).items():
            if layer.merged:
                continue
            key = f"{name}.weight"
            base = effective[key]
            for adapter in layer.active_adapters:
                a, b = (state[f"{name}.lora_{m}.{adapter}.weight"] for m in "AB")
                base = base + lora_delta(layer, adapter, a, b).to(base.device, base.dtype)
            effective[key] = base
    return effective


def gathered_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's whole state dict: under FSDP2 gathered to process 0 (the others get {}); a collective."""
    if isinstance(model, FSDPModule):
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(model, options=options)
    return model.state_dict()


@torch.no_grad()
def merge_and_reinit(model: nn.Module, seed: int) -> None:
    """Fold each adapter into its base weight in place, then re-initialise it (A kaiming, B zero) as PEFT does.

    The new A comes from a generator seeded by `seed`, so every process draws the same A and a resumed run
    the same as an uninterrupted one; the global RNG stream (dropout) is left where it was."""
    generator = torch.Generator().manual_seed(seed)
    for layer in lora_layers(model).values():
        for adapter in layer.active_adapters:
            base = layer.get_base_layer().weight
            a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
            delta = lora_delta(layer, adapter, whole(a), whole(b))
            local_part(base).add_(shard_like(delta, base))
            # PEFT's reset_lora_parameters(init_lora_weights=True), drawn whole on the CPU from `generator`.
            new_a = torch.empty(a.shape)
            nn.init.kaiming_uniform_(new_a, a=math.sqrt(5), generator=generator)
            local_part(a).copy_(shard_like(new_a, a))
            local_part(b).zero_()


@torch.no_grad()
def prune_lora_moments(
    optimizer: torch.optim.Optimizer,
    lora_parameters: list[torch.Tensor],
    mode: str,
    ratio: float,
    seed: int,
) -> float:
    """Zero a `ratio` share of each LoRA parameter's Adam moments (`exp_avg`, `exp_avg_sq`), by `mode`:
    `random` (entries drawn from a generator seeded by `seed`) or `magnitude` (the smallest |value| of each
    tensor). Other parameters' state is untouched. Returns the fraction of the LoRA moments zeroed.

    The optimizer state is keyed by parameter, sharded or not (FSDP2); each mask is drawn for the whole
    tensor, so a sharded run zeroes the same entries as one process."""
    generator = torch.Generator().manual_seed(seed)
    zeroed = total = 0
    for param in lora_parameters:
        state = optimizer.state.get(param, {})
        for key in ("exp_avg", "exp_avg_sq"):
            moment = state.get(key)
            if moment is None:
                continue
            if mode == "random":
                keep = torch.rand(moment.shape, generator=generator) >= ratio
            else:
                magnitude = whole(moment).abs().flatten().float().cpu()
                k = int(ratio * magnitude.numel())
                keep = torch.ones_like(magnitude, dtype=torch.bool)
                if k:
                    keep[magnitude.argsort(stable=True)[:k]] = False
                keep = keep.view(moment.shape)
            local_part(moment).mul_(shard_like(keep, moment))
            zeroed += int((~keep).sum())
            total += keep.numel()
    return zeroed / total if total else 0.0


def warm_start_position(source: str, state_dirname: str, global_batch: int, max_steps: int) -> dict[str, Any]:
    """The saved data position of the run checkpoint `source`, where a run warm-started from it continues."""
    from .config import ConfigError
    from .data import load_position
    from .trainer import DATA_POSITION_NAME

    key = f"training.relora.warm_start_checkpoint '{source}'"
    path = Path(source) / state_dirname / DATA_POSITION_NAME
    position = load_position(path) if Path(source).is_dir() else None
    if position is None:
        raise ConfigError(
            f"{key} is not a training checkpoint (a run's checkpoints/step_N): {path} is missing, so the run "
            "cannot continue from its step and data position"
        )
    step = position["step"]
    if step >= max_steps:
        raise ConfigError(
            f"training.max_steps ({max_steps}) must be greater than the step of {key} ({step}): max_steps counts "
            "the warm start's steps too"
        )
    if "sequence" in position and position["sequence"] != step * global_batch:
        raise ConfigError(
            f"{key} was trained with a global batch of {position['sequence'] // max(step, 1)} sequences, this run "
            f"with {global_batch} (data.dataloader.batch_size): its data position does not carry over"
        )
    return position


def load_warm_start(model: nn.Module, source: str) -> None:
    """Copy a run checkpoint's weights (its `step_N` directory) into the not yet wrapped `model`."""
    from .config import ConfigError

    try:
        loaded = load_complete_weights(type(model), source, next(model.parameters()).dtype)
    except (OSError, ValueError) as error:
        raise ConfigError(
            f"training.relora.warm_start_checkpoint '{source}' cannot be loaded: {error}"
        ) from error
    try:
        model.load_state_dict(loaded.state_dict())
    except RuntimeError as error:
        raise ConfigError(
            f"training.relora.warm_start_checkpoint '{source}' does not fit the configured model: {error}"
        ) from error


# --- the mode -------------------------------------------------------------------------------------------


class ReLoRAMode(ReLoRA):
    """The jagged cosine schedule, resets, merged checkpoints and exact resume of a LoRA-wrapped model."""

    section: ReLoRAConfig
    # The saved data position of warm_start_checkpoint, where this run continues from (`prepare_model`).
    warm_start: dict[str, Any] | None = None
    # The whole state dict of the checkpoint being written (process 0's under FSDP2), for `save_state`.
    checkpoint_state: dict[str, torch.Tensor] | None = None

    def prepare_model(
        self, model: nn.Module, *, tokenizer: Any, micro_batch: int, world_size: int
    ) -> nn.Module:
        """Warm-start and wrap `model`."""
        from .config import ConfigError

        relora = self.section
        if relora.warm_start_steps and world_size > 1:
            # DDP registers the parameters that need gradients once; the warm start's switch would change them.
            raise ConfigError(
                "training.relora.warm_start_steps needs a single process; with several, warm-start from a "
                "full-rank checkpoint with training.relora.warm_start_checkpoint"
            )
        if relora.warm_start_checkpoint:
            # As the reference does: the LoRA phase continues from the checkpoint's step and data position
            # (training.max_steps is the total); its weights, not its optimizer, initialise the run.
            self.warm_start = warm_start_position(
                relora.warm_start_checkpoint,
                self.config.checkpointing.fabric_checkpoint_dir,
                self.config.data.dataloader.batch_size,
                self.config.training.max_steps,
            )
            load_warm_start(model, relora.warm_start_checkpoint)
        return wrap_model(model, relora)

    @property
    def lora_start(self) -> int:
        """The step after which the LoRA phase starts: the end of the warm start, in this run or before it."""
        return self.warm_start["step"] if self.warm_start else self.section.warm_start_steps

    def start_position(self) -> dict[str, Any] | None:
        return self.warm_start

    def callbacks(self) -> list[TrainerCallback]:
        return [ReLoRACallback(self)]

    def attach(self, trainer: Any) -> None:
        from .config import ConfigError

        if trainer.is_deepspeed_enabled:  # e.g. training_arguments.deepspeed
            raise ConfigError(DEEPSPEED_UNSUPPORTED)
        super().attach(trainer)

    def lora_parameters(self) -> list[nn.Parameter]:
        model = self.trainer.accelerator.unwrap_model(self.trainer.model)
        return [p for n, p in model.named_parameters() if is_lora_parameter(n)]

    def create_optimizer(
        self, model: nn.Module, create: Callable[[], torch.optim.Optimizer]
    ) -> torch.optim.Optimizer:
        # Everything that trains in some phase is in the optimizer from the start, so switching phase after a
        # warm start never rebuilds it; parameters without a gradient are skipped by AdamW.
        frozen = [p for p in model.parameters() if not p.requires_grad]
        for param in frozen:
            param.requires_grad = True
        try:
            if self.section.warm_start_steps == 0:  # base weights never train: keep them out
                for name, param in model.named_parameters():
                    if ".base_layer." in name:
                        param.requires_grad = False
            return create()
        finally:
            for param in frozen:
                param.requires_grad = False

    def lr_multiplier(self, num_training_steps: int) -> Callable[[int], float]:
        return partial(
            jagged_cosine,
            max_steps=num_training_steps,
            warmup_steps=self.trainer.args.get_warmup_steps(num_training_steps),
            reset_frequency=self.section.reset_frequency,
            restart_warmup_steps=self.section.restart_warmup_steps,
            min_lr_ratio=self.section.min_lr_ratio,
            warm_start_steps=self.lora_start,
        )

    def checkpoint_weights(self, model: nn.Module) -> dict[str, torch.Tensor]:
        # The checkpoint's model files are the plain model with the effective weights. Runs on every process
        # (under FSDP2 the whole state dict is gathered to process 0, which writes the files); `save_state`,
        # on process 0 after it, writes the same gathered state.
        self.checkpoint_state = gathered_state_dict(model)
        return effective_state_dict(model, self.checkpoint_state) if self.checkpoint_state else {}

    def save_state(self, state_dir: Path) -> None:
        # The wrapped modules' base weights and adapters; the rest is in the model files.
        state, self.checkpoint_state = self.checkpoint_state, None
        state = {k: v.detach().contiguous() for k, v in state.items() if is_wrapped_key(k)}
        save_file(state, str(Path(state_dir) / RELORA_STATE_NAME))

    def resume(
        self, state_dir: Path, model: nn.Module, weights: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        path = state_dir / RELORA_STATE_NAME
        if not path.is_file():
            raise ValueError(f"{state_dir.parent} is not a ReLoRA checkpoint: {RELORA_STATE_NAME} is missing")
        # Unwrapped parameters from the plain model files (saved as they were), the rest bit for bit from the
        # ReLoRA state: the merged weight of a wrapped module is not its base weight.
        wrapped = load_file(str(path))
        return {key: wrapped[key] if is_wrapped_key(key) else weights[key] for key in model.state_dict()}


def is_wrapped_key(key: str) -> bool:
    return ".base_layer." in key or is_lora_parameter(key)


class ReLoRACallback(TrainerCallback):
    """Switches from the warm start to LoRA, and merges, re-initialises and prunes at each reset step."""

    def __init__(self, mode: ReLoRAMode) -> None:
        self.mode = mode

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ):
        trainer = self.mode.trainer
        model = trainer.accelerator.unwrap_model(trainer.model)
        set_phase(model, lora=state.global_step >= self.mode.section.warm_start_steps)

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ):
        relora, trainer, step = self.mode.section, self.mode.trainer, state.global_step
        model = trainer.accelerator.unwrap_model(trainer.model)
        if relora.warm_start_steps and step == relora.warm_start_steps:
            set_phase(model, lora=True)
            for name, param in model.named_parameters():  # the base weights' moments are no longer needed
                if ".base_layer." in name:
                    trainer.optimizer.state.pop(param, None)
            logger.info("Warm start done after %d full-rank steps; training LoRA adapters", step)
        lora_start = self.mode.lora_start
        if not is_reset_step(
            step, lora_start=lora_start, reset_frequency=relora.reset_frequency, max_steps=state.max_steps
        ):
            return
        resets = (step - lora_start) // relora.reset_frequency
        seed = args.seed * 100_003 + resets
        merge_and_reinit(model, seed)
        fraction = prune_lora_moments(
            trainer.optimizer, self.mode.lora_parameters(), relora.optimizer_reset, relora.reset_ratio, seed
        )
        lr = trainer.lr_scheduler.get_last_lr()[0]
        should_log = control.should_log  # logging here must not swallow this step's regular log line
        trainer.log({"relora/resets": resets, "relora/fraction_zeroed": round(fraction, 6), "relora/lr": lr})
        control.should_log = should_log
