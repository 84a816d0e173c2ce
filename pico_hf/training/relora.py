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
from functools import partial
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from .config import DEFAULT_RESET_RATIO, ReLoRAConfig
from .trainer import PicoTrainer

logger = logging.getLogger(__name__)

ADAPTER = "default"
RELORA_STATE_NAME = "relora_state.safetensors"


def validate_relora(relora: ReLoRAConfig, max_steps: int, lr_warmup_steps: int) -> list[str]:
    """Problems with a `training.relora` block, each naming its key (empty when it is off or sound)."""
    if not relora.enabled:
        return []
    key = "training.relora"
    problems = []
    if relora.r < 1:
        problems.append(f"{key}.r must be at least 1, got {relora.r}")
    if relora.lora_alpha <= 0:
        problems.append(f"{key}.lora_alpha must be positive, got {relora.lora_alpha}")
    if not 0 <= relora.lora_dropout < 1:
        problems.append(f"{key}.lora_dropout must be in [0, 1), got {relora.lora_dropout}")
    if not relora.target_modules:
        problems.append(f"{key}.target_modules must name at least one module")
    if relora.optimizer_reset not in DEFAULT_RESET_RATIO:
        problems.append(
            f"{key}.optimizer_reset must be one of {sorted(DEFAULT_RESET_RATIO)}, got '{relora.optimizer_reset}'"
        )
    if relora.optimizer_reset_ratio is not None and not 0 <= relora.optimizer_reset_ratio < 1:
        problems.append(f"{key}.optimizer_reset_ratio must be in [0, 1), got {relora.optimizer_reset_ratio}")
    if relora.restart_warmup_steps < 0:
        problems.append(f"{key}.restart_warmup_steps must not be negative, got {relora.restart_warmup_steps}")
    if relora.reset_frequency <= relora.restart_warmup_steps:
        problems.append(
            f"{key}.reset_frequency ({relora.reset_frequency}) must be greater than "
            f"{key}.restart_warmup_steps ({relora.restart_warmup_steps})"
        )
    if not 0 < relora.min_lr_ratio <= 1:
        problems.append(f"{key}.min_lr_ratio must be in (0, 1], got {relora.min_lr_ratio}")
    if relora.warm_start_steps < 0:
        problems.append(f"{key}.warm_start_steps must not be negative, got {relora.warm_start_steps}")
    elif relora.warm_start_steps >= max_steps:  # e.g. a demo shortened with training.max_steps alone
        problems.append(
            f"{key}.warm_start_steps ({relora.warm_start_steps}) must end before training.max_steps "
            f"({max_steps}): set {key}.warm_start_steps={max(0, max_steps - 1)} or lower, or raise training.max_steps"
        )
    if relora.warm_start_steps and relora.warm_start_checkpoint:
        problems.append(f"{key}: set warm_start_steps or warm_start_checkpoint, not both")
    if lr_warmup_steps > relora.warm_start_steps + relora.reset_frequency:
        problems.append(
            f"training.optimization.lr_warmup_steps ({lr_warmup_steps}) must end by the first reset, at step "
            f"{relora.warm_start_steps + relora.reset_frequency} ({key}.warm_start_steps + reset_frequency)"
        )
    return problems


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
        loaded = type(model).from_pretrained(source, dtype=next(model.parameters()).dtype)
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


# --- the trainer ----------------------------------------------------------------------------------------


class ReLoRATrainer(PicoTrainer):
    """PicoTrainer for a LoRA-wrapped model: jagged cosine schedule, resets, merged checkpoints, exact resume."""

    def __init__(self, *args: Any, relora: ReLoRAConfig, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.relora = relora
        self.add_callback(ReLoRACallback(self))

    def lora_parameters(self) -> list[nn.Parameter]:
        model = self.accelerator.unwrap_model(self.model)
        return [p for n, p in model.named_parameters() if is_lora_parameter(n)]

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        # Everything that trains in some phase is in the optimizer from the start, so switching phase after a
        # warm start never rebuilds it; parameters without a gradient are skipped by AdamW.
        target = model if model is not None else self.model
        frozen = [p for p in target.parameters() if not p.requires_grad]
        for param in frozen:
            param.requires_grad = True
        try:
            if self.relora.warm_start_steps == 0:  # base weights never train: keep them out
                for name, param in target.named_parameters():
                    if ".base_layer." in name:
                        param.requires_grad = False
            return super().create_optimizer(model)
        finally:
            for param in frozen:
                param.requires_grad = False

    def create_scheduler(
        self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None
    ) -> torch.optim.lr_scheduler.LRScheduler:
        if self.lr_scheduler is None:
            schedule = partial(
                jagged_cosine,
                max_steps=num_training_steps,
                warmup_steps=self.args.get_warmup_steps(num_training_steps),
                reset_frequency=self.relora.reset_frequency,
                restart_warmup_steps=self.relora.restart_warmup_steps,
                min_lr_ratio=self.relora.min_lr_ratio,
                warm_start_steps=self.relora.warm_start_steps,
            )
            self.lr_scheduler = LambdaLR(optimizer if optimizer is not None else self.optimizer, schedule)
            self._created_lr_scheduler = True
        return self.lr_scheduler

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        # The checkpoint's model files are the plain model with the effective weights.
        super()._save(output_dir, state_dict=effective_state_dict(self.accelerator.unwrap_model(self.model)))

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if (
            self.args.should_save
        ):  # the wrapped modules' base weights and adapters; the rest is in the model files
            model = self.accelerator.unwrap_model(self.model)
            state = {k: v.detach().contiguous() for k, v in model.state_dict().items() if is_wrapped_key(k)}
            save_file(state, str(Path(output_dir) / RELORA_STATE_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        state_dir = Path(resume_from_checkpoint)
        path = state_dir / RELORA_STATE_NAME
        if not path.is_file():
            raise ValueError(f"{state_dir.parent} is not a ReLoRA checkpoint: {RELORA_STATE_NAME} is missing")
        target = self.accelerator.unwrap_model(model if model is not None else self.model)
        # Unwrapped parameters from the plain model files (saved as they were), the rest bit for bit from the
        # ReLoRA state: the merged weight of a wrapped module is not its base weight.
        plain = (
            type(target).from_pretrained(state_dir.parent, dtype=next(target.parameters()).dtype).state_dict()
        )
        wrapped = load_file(str(path))
        state = {key: wrapped[key] if is_wrapped_key(key) else plain[key] for key in target.state_dict()}
        with torch.no_grad():  # in place: Parameter identity (optimizer, DDP) is kept
            target.load_state_dict(state)


def is_wrapped_key(key: str) -> bool:
    return ".base_layer." in key or is_lora_parameter(key)


class ReLoRACallback(TrainerCallback):
    """Switches from the warm start to LoRA, and merges, re-initialises and prunes at each reset step."""

    def __init__(self, trainer: ReLoRATrainer) -> None:
        self.trainer = trainer

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ):
        model = self.trainer.accelerator.unwrap_model(self.trainer.model)
        set_phase(model, lora=state.global_step >= self.trainer.relora.warm_start_steps)

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ):
        relora, trainer, step = self.trainer.relora, self.trainer, state.global_step
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
            trainer.optimizer, trainer.lora_parameters(), relora.optimizer_reset, relora.reset_ratio, seed
        )
        lr = trainer.lr_scheduler.get_last_lr()[0]
        should_log = control.should_log  # logging here must not swallow this step's regular log line
        trainer.log({"relora/resets": resets, "relora/fraction_zeroed": round(fraction, 6), "relora/lr": lr})
        control.should_log = should_log


def prepare_relora(model: nn.Module, relora: ReLoRAConfig, world_size: int) -> tuple[nn.Module, Any]:
    """The recipe's hook: warm-start and wrap `model`; returns it and the trainer class to build."""
    from .config import ConfigError

    if relora.warm_start_steps and world_size > 1:
        # DDP registers the parameters that need gradients once; the warm start's switch would change them.
        raise ConfigError(
            "training.relora.warm_start_steps needs a single process; with several, warm-start from a "
            "full-rank checkpoint with training.relora.warm_start_checkpoint"
        )
    if relora.warm_start_checkpoint:
        load_warm_start(model, relora.warm_start_checkpoint)
    return wrap_model(model, relora), partial(ReLoRATrainer, relora=relora)
