"""Capturing learning-dynamics states: per layer, activations, weights and gradients.

Keys are pico-train's: module names relative to the decoder trunk, e.g. `layers.0.attention.v_proj`, for the
modules whose name contains one of the configured layer suffixes. Per split, a checkpoint's
`learning_dynamics/` folder holds:

    {split}_activations.safetensors   [n_samples, out_features]: the module's output at `sequence_idx`
    {split}_weights.safetensors       [out_features, in_features]
    {split}_gradients.safetensors     [out_features, in_features]: gradient of the mean next-token loss
    {split}_data/                     the samples' `input_ids` and decoded `text` (datasets.save_to_disk)

With `file_format="pt"` (or `"both"`) the three state files are (also) written as pico-train's
`{split}_{type}.pt`: plain dicts of tensors, loadable with `torch.load(..., weights_only=True)`, which the
original pico-analyze reads.

`load_states` reads these, and the `.pt` files written by the original pico-train (`torch.load` with
`weights_only=True`, Lightning/DeepSpeed wrapper prefixes stripped).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.tensor import DTensor

DATA_TYPES = ("activations", "weights", "gradients")
# Saved states: ours first, then the original pico-train's pickles.
STATE_SUFFIXES = (".safetensors", ".pt")
# `checkpointing.learning_dynamics.file_format` -> the suffixes written.
FILE_FORMATS = {"safetensors": (".safetensors",), "pt": (".pt",), "both": (".safetensors", ".pt")}
# Wrappers the original pico-train saved keys under (Lightning Fabric, DeepSpeed, DDP).
_WRAPPER_PREFIX = re.compile(r"^(?:_forward_module\.)?(?:module\.)?(?:_orig_mod\.)?")


def trunk(model: nn.Module) -> nn.Module:
    """The decoder trunk whose module names are pico-train's (`layers.{i}...`)."""
    return getattr(model, getattr(model, "base_model_prefix", ""), model)


def find_layers(model: nn.Module, layer_suffixes: Sequence[str]) -> dict[str, nn.Linear]:
    """Modules of the trunk whose name contains a configured suffix, in model order (pico-train's rule)."""
    modules: dict[str, nn.Module] = {}
    for name, module in trunk(model).named_modules():
        if (
            name
            and any(suffix in name for suffix in layer_suffixes)
            and isinstance(getattr(module, "weight", None), torch.Tensor)
            # A wrapper's inner modules (a PEFT LoRA layer's base_layer, lora_A, ...) are not layers of their own.
            and not any(name.startswith(f"{outer}.") for outer in modules)
        ):
            modules[name] = module
    if not modules:
        raise ValueError(
            f"No module of the model matches the learning-dynamics layer suffixes {list(layer_suffixes)}"
        )
    return modules


class ActivationRecorder:
    """Forward hooks keeping each layer's output at one token per sample, only while armed.

    A layer that runs twice in one model forward (activation-checkpointing recomputation) is recorded once.
    `positions` (one index per row, for padded batches) overrides `sequence_idx` for the next forward."""

    def __init__(self, model: nn.Module, layers: dict[str, nn.Module], sequence_idx: int = -1) -> None:
        self.sequence_idx = sequence_idx
        self.armed = False
        self.positions: torch.Tensor | None = None
        self.outputs: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
        self._seen: set[str] = set()
        self._handles = [model.register_forward_pre_hook(self._new_forward)]
        self._handles += [module.register_forward_hook(self._hook(name)) for name, module in layers.items()]

    def _new_forward(self, module: nn.Module, args: Any) -> None:
        self._seen.clear()

    def _hook(self, name: str):
        def record(module: nn.Module, args: Any, output: torch.Tensor) -> None:
            if not self.armed or name in self._seen:
                return
            self._seen.add(name)
            output = output.detach()
            if self.positions is None:
                picked = output[:, self.sequence_idx]  # (batch, out_features)
            else:
                picked = output[
                    torch.arange(output.shape[0], device=output.device), self.positions.to(output.device)
                ]
            self.outputs[name].append(picked.float().cpu())

        return record

    def start(self) -> None:
        self.outputs = {name: [] for name in self.outputs}
        self._seen.clear()
        self.armed = True

    def stop(self) -> dict[str, torch.Tensor]:
        """Disarm; each layer's recorded rows, concatenated in forward order."""
        self.armed = False
        self.positions = None
        return {name: torch.cat(rows) for name, rows in self.outputs.items() if rows}

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


@contextmanager
def recording(recorder: ActivationRecorder):
    recorder.start()
    try:
        yield recorder
    finally:
        recorder.armed = False


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A parameter or gradient as one whole tensor. FSDP2 holds them as sharded DTensors: gathering them is a
    collective, so every process must call this, not only the one that saves."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def is_adapted(module: nn.Module) -> bool:
    """A PEFT LoRA layer (ReLoRA training): its `weight` is the frozen base, not what the forward applies."""
    return hasattr(module, "get_delta_weight") and hasattr(module, "base_layer")


def effective_weight(module: nn.Module) -> torch.Tensor:
    """The weight the forward applies: for a LoRA layer, base + scaling * B @ A of its unmerged adapters."""
    weight = full_tensor(module.weight.detach())
    if is_adapted(module) and not module.merged:
        with torch.no_grad():
            for adapter in module.active_adapters:
                # PEFT's get_delta_weight, from the whole A and B (under FSDP2 they are sharded too).
                a, b = (full_tensor(m[adapter].weight.detach()) for m in (module.lora_A, module.lora_B))
                delta = b.float() @ a.float()
                delta = (delta.T if module.fan_in_fan_out else delta) * module.scaling[adapter]
                weight = weight + delta.to(weight.dtype)
    return weight


def weights_of(layers: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    return {name: effective_weight(module).float().cpu().clone() for name, module in layers.items()}


class EffectiveGradientRecorder:
    """The gradient of the loss with respect to each LoRA layer's effective weight, while armed.

    A LoRA layer computes y = x W^T + scaling * B A dropout(x); its effective weight W_eff = W + scaling * B A
    gets dL/dW_eff = sum over tokens of grad_y^T x, the gradient a full-rank layer with weight W_eff would get
    (exactly, without LoRA dropout; with it, the one of the un-dropped input). Hooks record x and, through a
    tensor hook on y, grad_y during the real backward pass and accumulate that product; no parameter's `.grad`
    changes, so training is unaffected. Under DDP the sums are per process: `all_reduce` them."""

    def __init__(self, layers: dict[str, nn.Module]) -> None:
        self.layers = {name: module for name, module in layers.items() if is_adapted(module)}
        self.armed = False
        self.sums: dict[str, torch.Tensor] = {}
        self._handles = [m.register_forward_hook(self._hook(name)) for name, m in self.layers.items()]

    def _hook(self, name: str):
        def record(module: nn.Module, args: Any, output: torch.Tensor) -> None:
            if not self.armed or not output.requires_grad:
                return
            x = args[0].detach()

            def accumulate(grad: torch.Tensor) -> None:
                product = grad.reshape(-1, grad.shape[-1]).float().T @ x.reshape(-1, x.shape[-1]).float()
                self.sums[name] = self.sums[name] + product if name in self.sums else product

            output.register_hook(accumulate)

        return record

    def start(self) -> None:
        self.sums = {}
        self.armed = True

    def stop(self) -> dict[str, torch.Tensor]:
        self.armed = False
        sums, self.sums = self.sums, {}
        return sums

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def gradients_of(
    layers: dict[str, nn.Module], effective: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """Each layer's accumulated weight gradient, whole (DeepSpeed ZeRO's partitioned and FSDP2's sharded
    gradients are gathered: call it on every process); LoRA layers' gradients with respect to their effective
    weight come from `effective` (EffectiveGradientRecorder)."""
    gradients = {}
    for name, module in layers.items():
        if effective is not None and name in effective:
            gradients[name] = effective[name].detach().float().cpu().clone()
            continue
        grad = _full_grad(module.weight)
        if grad is None:
            raise RuntimeError(f"Layer {name} has no gradient to capture; is it frozen?")
        gradients[name] = full_tensor(grad.detach()).float().cpu().clone()
    return gradients


def _full_grad(param: torch.Tensor) -> torch.Tensor | None:
    if getattr(param, "ds_id", None) is not None or hasattr(param, "ds_tensor"):  # DeepSpeed-managed
        from deepspeed.utils import safe_get_full_grad

        return safe_get_full_grad(param)
    return param.grad


def to_sample_order(
    local: torch.Tensor, gathered: torch.Tensor, num_processes: int, micro_batch: int
) -> torch.Tensor:
    """Reorder rows gathered across processes into global sample order.

    Process p's g-th micro-batch of m rows holds global rows (g*P + p)*m ... ; `gathered` is every process's
    `local` concatenated in process order: (P * G * m, ...)."""
    if num_processes == 1:
        return local
    rows_per_process = local.shape[0]
    steps = rows_per_process // micro_batch
    shaped = gathered.reshape(num_processes, steps, micro_batch, *local.shape[1:])
    return shaped.transpose(0, 1).reshape(num_processes * rows_per_process, *local.shape[1:])


def save_states(
    directory: Path,
    split: str,
    activations: dict[str, torch.Tensor],
    weights: dict[str, torch.Tensor],
    gradients: dict[str, torch.Tensor] | None,
    input_ids: Sequence[Sequence[int]] | None = None,
    tokenizer: Any = None,
    file_format: str = "safetensors",
) -> None:
    """Write one split's states (and its samples) in the layout described in the module docstring."""
    if file_format not in FILE_FORMATS:
        raise ValueError(f"file_format must be one of {list(FILE_FORMATS)}, got '{file_format}'")
    directory.mkdir(parents=True, exist_ok=True)
    for data_type, tensors in (("activations", activations), ("weights", weights), ("gradients", gradients)):
        if not tensors:
            continue
        # clone: a view would pickle its whole storage into the .pt file
        tensors = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
        for suffix in FILE_FORMATS[file_format]:
            path = directory / f"{split}_{data_type}{suffix}"
            if suffix == ".safetensors":
                save_file(tensors, path)
            else:
                torch.save(tensors, path)
    if input_ids is not None:
        import datasets

        rows = [list(map(int, ids)) for ids in input_ids]
        columns: dict[str, list] = {"input_ids": rows}
        if tokenizer is not None:
            columns["text"] = tokenizer.batch_decode(rows, skip_special_tokens=True)
        bars_were_on = not datasets.are_progress_bars_disabled()
        datasets.disable_progress_bars()  # a bar per checkpoint would bury the training progress bar
        try:
            datasets.Dataset.from_dict(columns).save_to_disk(str(directory / f"{split}_data"))
        finally:
            if bars_were_on:
                datasets.enable_progress_bars()


def strip_wrapper_prefix(name: str) -> str:
    return _WRAPPER_PREFIX.sub("", name)


def load_states(
    directory: str | Path, split: str, data_types: Sequence[str] = DATA_TYPES
) -> dict[str, dict[str, torch.Tensor]]:
    """One split's states from a `learning_dynamics/` folder: ours (safetensors) or pico-train's (`.pt`).

    Returns {data_type: {layer_name: tensor}} for the asked data types present; empty if the split is absent.
    A file that cannot be read, or holds something other than named tensors, is a ValueError naming it."""
    directory = Path(directory)
    states: dict[str, dict[str, torch.Tensor]] = {}
    for data_type in data_types:
        path = next(
            (p for suffix in STATE_SUFFIXES if (p := directory / f"{split}_{data_type}{suffix}").is_file()),
            None,
        )
        if path is None:
            continue
        try:
            # pico-train pickled plain dicts of tensors: weights_only keeps arbitrary code out of the load.
            tensors = (
                load_file(path)
                if path.suffix == ".safetensors"
                else torch.load(path, map_location="cpu", weights_only=True)
            )
        except Exception as error:  # safetensors, pickle and I/O errors alike: name the file
            raise ValueError(f"cannot read {path}: {error}") from error
        if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
            raise ValueError(f"{path} does not hold a mapping of layer names to tensors")
        states[data_type] = {strip_wrapper_prefix(name): tensor for name, tensor in tensors.items()}
    return states


def batched(rows: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for start in range(0, len(rows), size):
        yield rows[start : start + size]
