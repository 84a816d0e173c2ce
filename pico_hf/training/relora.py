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
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from .modes.relora import ReLoRA, ReLoRAConfig
from .weights import load_complete_weights

logger = logging.getLogger(__name__)

ADAPTER = "default"
RELORA_STATE_NAME = "relora_state.safetensors"


# --- the schedule ---------------------------------------------------------------------------------------


def jagged_cosine(
    step: int,
    *,
    max_steps: int,
    warmup_steps: int,
    reset_frequency: int,
    restart_warmup_steps: int,
    min_lr_ratio: float,
    warm_start_steps: int = 0,
) -> float:
    """The LR multiplier for optimizer step `step` (0-based): linear warmup, one cosine from the warmup's end to
    `min_lr_ratio` at `max_steps`, and after each reset (steps warm_start + k * reset_frequency, k >= 1) a linear
    re-warmup over `restart_warmup_steps` to the cosine's value at the re-warmup's end. The switch from the
    warm start to LoRA is no reset: the cosine's phase carries on."""

    def cosine(at: int) -> float:
        progress = min(max((at - warmup_steps) / max(1, max_steps - warmup_steps), 0.0), 1.0)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    if step < warmup_steps:
        return step / max(1, warmup_steps)
    since_start = step - warm_start_steps
    if since_start >= reset_frequency:
        into_cycle = since_start % reset_frequency
        if into_cycle < restart_warmup_steps:
            return into_cycle / restart_warmup_steps * cosine(step - into_cycle + restart_warmup_steps)
    return cosine(step)


def is_reset_step(step: int, relora: ReLoRAConfig, max_steps: int) -> bool:
    """Merge-and-reinit happens after optimizer step `step` (never after the last one)."""
    since_start = step - relora.warm_start_steps
    return since_start > 0 and since_start % relora.reset_frequency == 0 and step < max_steps


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


def effective_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The plain model's state dict: each wrapped module's weight is base + scaling * B @ A, adapters dropped."""
    deltas = {}
    with torch.no_grad():
        for name, layer in lora_layers(model).items():
            if not layer.merged:
                deltas[f"{name}.base_layer.weight"] = sum(
                    layer.get_delta_weight(a) for a in layer.active_adapters
                )
    state = {}
    for key, tensor in model.state_dict().items():
        if is_lora_parameter(key):
            continue
        if key in deltas:
            tensor = tensor + deltas[key].to(tensor.dtype)
        state[key.replace(".base_layer.", ".")] = tensor
    return state


@torch.no_grad()
def merge_and_reinit(model: nn.Module, seed: int) -> None:
    """Fold each adapter into its base weight in place, then re-initialise it (A kaiming, B zero) as PEFT does.

    The new A comes from a generator seeded by `seed`, so every process draws the same A and a resumed run
    the same as an uninterrupted one; the global RNG stream (dropout) is left where it was."""
    layers = lora_layers(model)
    devices = sorted({p.device.index for p in model.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for layer in layers.values():
            for adapter in layer.active_adapters:
                base = layer.get_base_layer().weight
                base.add_(layer.get_delta_weight(adapter).to(base.dtype))
                layer.reset_lora_parameters(adapter, True)


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
    tensor). Other parameters' state is untouched. Returns the fraction of the LoRA moments zeroed."""
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
                magnitude = moment.abs().flatten().float().cpu()
                k = int(ratio * magnitude.numel())
                keep = torch.ones_like(magnitude, dtype=torch.bool)
                if k:
                    keep[magnitude.argsort(stable=True)[:k]] = False
                keep = keep.view(moment.shape)
            moment.mul_(keep.to(moment.device, moment.dtype))
            zeroed += int((~keep).sum())
            total += keep.numel()
    return zeroed / total if total else 0.0


def load_warm_start(model: nn.Module, source: str) -> None:
    """Copy a pico checkpoint's weights (a path or Hub id) into the not yet wrapped `model`."""
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
            load_warm_start(model, relora.warm_start_checkpoint)
        return wrap_model(model, relora)

    def callbacks(self) -> list[TrainerCallback]:
        return [ReLoRACallback(self)]

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
            warm_start_steps=self.section.warm_start_steps,
        )

    def checkpoint_weights(self, model: nn.Module) -> dict[str, torch.Tensor]:
        # The checkpoint's model files are the plain model with the effective weights.
        return effective_state_dict(model)

    def save_state(self, state_dir: Path) -> None:
        # The wrapped modules' base weights and adapters; the rest is in the model files.
        model = self.trainer.accelerator.unwrap_model(self.trainer.model)
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items() if is_wrapped_key(k)}
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
        if not is_reset_step(step, relora, state.max_steps):
            return
        resets = (step - relora.warm_start_steps) // relora.reset_frequency
        seed = args.seed * 100_003 + resets
        merge_and_reinit(model, seed)
        fraction = prune_lora_moments(
            trainer.optimizer, self.mode.lora_parameters(), relora.optimizer_reset, relora.reset_ratio, seed
        )
        lr = trainer.lr_scheduler.get_last_lr()[0]
        should_log = control.should_log  # logging here must not swallow this step's regular log line
        trainer.log({"relora/resets": resets, "relora/fraction_zeroed": round(fraction, 6), "relora/lr": lr})
        control.should_log = should_log
