"""Components: the matrices that learning-dynamics metrics are computed on.

A component turns one checkpoint's learning-dynamics states into named matrices, following
pico-analyze's component types and result keys:

- `simple`: a layer's stored tensor as is, keyed `{prefix}{layer}.{suffix}.{data_type}`.
- `ov_circuit`: the attention value and output projections taken together, per head
  (`{prefix}{layer}.ov_circuit.{data_type}.heads.{h}`) and for all heads concatenated along dim 1
  (`{prefix}{layer}.ov_circuit.{data_type}`).

States are nested dicts `{data_type: {layer_name: tensor}}` with `data_type` one of `weights`,
`activations`, `gradients` and layer names as stored by pico-train (e.g. `layers.0.attention.v_proj`).
Weights and gradients are `[out, in]` matrices, activations `[n_samples, dim]`.

Same-shaped matrices are returned stacked (`ComponentBatch`) so metrics run batched linear algebra over
every head and layer at once. Adding a component type is one `@register_component` class.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..configuration import check_keys

DATA_TYPES: tuple[str, ...] = ("activations", "weights", "gradients")

# Learning-dynamics states: {data_type: {layer_name: tensor}}.
CheckpointStates = Mapping[str, Mapping[str, torch.Tensor]]


@dataclass(frozen=True)
class ModelShape:
    """The attention geometry that compound components need (GQA: several query heads share a kv head)."""

    d_model: int
    attention_n_heads: int
    attention_n_kv_heads: int

    def __post_init__(self) -> None:
        if self.d_model % self.attention_n_heads:
            raise ValueError(
                f"d_model ({self.d_model}) must be divisible by attention_n_heads ({self.attention_n_heads})"
            )
        if self.attention_n_heads % self.attention_n_kv_heads:
            raise ValueError(
                f"attention_n_heads ({self.attention_n_heads}) must be divisible by "
                f"attention_n_kv_heads ({self.attention_n_kv_heads})"
            )

    @property
    def head_dim(self) -> int:
        return self.d_model // self.attention_n_heads

    @classmethod
    def from_config(cls, config: Any) -> ModelShape:
        """Read the shape from a model config object (e.g. `PicoDecoderConfig`) or a mapping.

        A pico training config (`{"model": {...}}`) is accepted too.
        """
        if isinstance(config, ModelShape):
            return config
        names = ("d_model", "attention_n_heads", "attention_n_kv_heads")
        if isinstance(config, Mapping):
            fields = config["model"] if "model" in config and "d_model" not in config else config
            values = {name: fields.get(name) for name in names}
        else:
            values = {name: getattr(config, name, None) for name in names}
        missing = [name for name, value in values.items() if value is None]
        if missing:
            raise ValueError(f"model config lacks {', '.join(missing)}")
        return cls(**{name: int(value) for name, value in values.items()})


@dataclass(frozen=True)
class ComponentSpec:
    """One component entry of a metric spec, in pico-analyze's config format.

    Example: `{"component_name": "ov_circuit", "data_type": "weights", "layers": [0, 1],
    "layer_suffixes": {"value_layer": "attention.v_proj", "output_layer": "attention.o_proj"}}`.
    `layer_suffixes` is a string for `simple` and a role -> suffix mapping for compound components;
    mappings are stored as sorted `(role, suffix)` pairs so specs are hashable.
    """

    component_name: str
    layer_suffixes: str | tuple[tuple[str, str], ...]
    layers: tuple[int, ...]
    data_type: str

    KEYS: ClassVar[tuple[str, ...]] = ("component_name", "layer_suffixes", "layers", "data_type")

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> ComponentSpec:
        check_keys("", config, cls.KEYS, lead="unknown component")
        missing = [key for key in cls.KEYS if config.get(key) is None]
        if missing:
            raise ValueError(f"component spec {dict(config)} lacks {missing}")
        suffixes = config["layer_suffixes"]
        if isinstance(suffixes, Mapping):
            suffixes = tuple(sorted((str(role), str(suffix)) for role, suffix in suffixes.items()))
        elif not isinstance(suffixes, str):
            raise ValueError(f"layer_suffixes must be a string or a mapping, got {suffixes!r}")
        layers = config["layers"]
        if isinstance(layers, int) or not all(isinstance(layer, int) and layer >= 0 for layer in layers):
            raise ValueError(f"layers must be a list of non-negative layer indices, got {layers!r}")
        spec = cls(
            component_name=str(config["component_name"]),
            layer_suffixes=suffixes,
            layers=tuple(layers),
            data_type=str(config["data_type"]),
        )
        get_component(spec.component_name).validate(spec)
        return spec

    @property
    def suffix_map(self) -> dict[str, str]:
        if isinstance(self.layer_suffixes, str):
            raise ValueError(f"component {self.component_name!r} needs a mapping of layer_suffixes")
        return dict(self.layer_suffixes)


@dataclass(frozen=True)
class ComponentBatch:
    """Same-shaped component matrices stacked along dim 0, with their result keys.

    `origin` names what was computed (component type, data type, layer suffixes); with a key it
    identifies one matrix within one checkpoint's states, which is what caches key on.
    """

    keys: tuple[str, ...]
    data: torch.Tensor  # (len(keys), rows, cols)
    origin: Hashable


@dataclass(frozen=True)
class ComponentData:
    """All matrices of one component spec: batched for computation, `keys` in pico-analyze's order."""

    batches: tuple[ComponentBatch, ...]
    keys: tuple[str, ...]

    def tensors(self) -> dict[str, torch.Tensor]:
        """The component matrices by result key (views into the batches)."""
        by_key = {
            key: matrix for batch in self.batches for key, matrix in zip(batch.keys, batch.data, strict=True)
        }
        return {key: by_key[key] for key in self.keys}


_LAYER_INDEX = re.compile(r"^(.*?)\d+\.")


def layer_prefix(layer_names: Sequence[str]) -> str:
    """The part of the layer names before the layer index (`"layers."` for `layers.0.attention.v_proj`)."""
    prefixes = {match.group(1) for name in layer_names if (match := _LAYER_INDEX.match(name))}
    if len(prefixes) > 1:
        raise ValueError(f"layer names use several prefixes before the layer index: {sorted(prefixes)}")
    return prefixes.pop() if prefixes else ""


class _StateReader:
    """Looks layers up in one checkpoint's states with errors that name the missing key."""

    def __init__(self, states: CheckpointStates):
        self.states = states
        self._prefixes: dict[str, str] = {}

    def data(self, data_type: str) -> Mapping[str, torch.Tensor]:
        if data_type not in self.states:
            raise ValueError(f"states have no {data_type!r} entry (have: {sorted(self.states)})")
        return self.states[data_type]

    def prefix(self, data_type: str) -> str:
        if data_type not in self._prefixes:
            self._prefixes[data_type] = layer_prefix(list(self.data(data_type)))
        return self._prefixes[data_type]

    def matrix(self, data_type: str, layer: int, suffix: str) -> torch.Tensor:
        data = self.data(data_type)
        name = f"{self.prefix(data_type)}{layer}.{suffix}"
        if name not in data:
            available = sorted(data)
            shown = ", ".join(available[:8]) + (
                f", ... ({len(available)} in all)" if len(available) > 8 else ""
            )
            raise ValueError(f"{data_type} have no layer {name!r} (available: {shown})")
        tensor = data[name]
        if tensor.ndim != 2:
            raise ValueError(f"{data_type} {name!r}: expected a 2-D matrix, got shape {tuple(tensor.shape)}")
        # SVD and friends need float32 or better; activations are often stored in bfloat16.
        if tensor.dtype not in (torch.float32, torch.float64):
            tensor = tensor.float()
        return tensor


def _stack_by_shape(
    keys: Sequence[str], matrices: Sequence[torch.Tensor], origin: Hashable
) -> list[ComponentBatch]:
    groups: dict[tuple, list[int]] = {}
    for index, matrix in enumerate(matrices):
        groups.setdefault((tuple(matrix.shape), matrix.dtype, matrix.device), []).append(index)
    return [
        ComponentBatch(tuple(keys[i] for i in indices), torch.stack([matrices[i] for i in indices]), origin)
        for indices in groups.values()
    ]


class Component(ABC):
    """A component type: turns states into named matrices. Subclasses set `name` and register."""

    name: ClassVar[str]
    data_types: ClassVar[tuple[str, ...]] = DATA_TYPES

    def validate(self, spec: ComponentSpec) -> None:
        """Check a spec for this component type; raise ValueError naming the problem."""
        if spec.data_type not in self.data_types:
            raise ValueError(
                f"component {self.name!r} does not support data_type {spec.data_type!r} "
                f"(supported: {', '.join(self.data_types)})"
            )

    def reads(self, spec: ComponentSpec) -> set[str]:
        """The stored data types `extract` reads for this spec (what a checkpoint must provide)."""
        return {spec.data_type}

    @abstractmethod
    def extract(
        self, spec: ComponentSpec, states: CheckpointStates, model_shape: ModelShape | None
    ) -> ComponentData:
        """Build the component's matrices for the spec's layers."""


COMPONENT_REGISTRY: dict[str, type[Component]] = {}


def register_component(cls: type[Component]) -> type[Component]:
    COMPONENT_REGISTRY[cls.name] = cls
    return cls


def get_component(name: str) -> Component:
    if name not in COMPONENT_REGISTRY:
        raise ValueError(
            f"unknown component_name {name!r}; valid component names: {sorted(COMPONENT_REGISTRY)}"
        )
    return COMPONENT_REGISTRY[name]()


def component_data_types(spec: ComponentSpec) -> set[str]:
    """The stored data types a component is built from (an OV circuit needs the weights for any data type)."""
    return get_component(spec.component_name).reads(spec)


def extract_component(
    spec: ComponentSpec | Mapping[str, Any], states: CheckpointStates, model_shape: Any = None
) -> ComponentData:
    """Build one component from one checkpoint's states (`{data_type: {layer_name: tensor}}`).

    `model_shape` is a `ModelShape` or anything `ModelShape.from_config` reads; compound components need it.
    """
    if not isinstance(spec, ComponentSpec):
        spec = ComponentSpec.from_dict(spec)
    shape = None if model_shape is None else ModelShape.from_config(model_shape)
    return get_component(spec.component_name).extract(spec, states, shape)


@register_component
class SimpleComponent(Component):
    """A layer's stored weights, activations or gradients, unchanged."""

    name = "simple"

    def validate(self, spec: ComponentSpec) -> None:
        super().validate(spec)
        if not isinstance(spec.layer_suffixes, str):
            raise ValueError(
                f"component 'simple' needs a single layer_suffixes string, got {spec.layer_suffixes}"
            )

    def extract(
        self, spec: ComponentSpec, states: CheckpointStates, model_shape: ModelShape | None
    ) -> ComponentData:
        reader = _StateReader(states)
        suffix = spec.layer_suffixes
        prefix = reader.prefix(spec.data_type)
        matrices = [reader.matrix(spec.data_type, layer, suffix) for layer in spec.layers]
        keys = tuple(f"{prefix}{layer}.{suffix}.{spec.data_type}" for layer in spec.layers)
        origin = (self.name, spec.data_type, suffix)
        return ComponentData(tuple(_stack_by_shape(keys, matrices, origin)), keys)


@register_component
class OVCircuitComponent(Component):
    """The OV circuit: value and output projections of each attention head taken together.

    With head dim `hd = d_model / H` and kv head `k = h // (H / KV)` for query head `h`, and
    `W_V^k = W_V[k*hd:(k+1)*hd, :]`, `W_O^h = W_O[:, h*hd:(h+1)*hd]` (pico-analyze's definitions):

    - weights: `W_V^k @ W_O^h`, `[hd, hd]`
    - activations: `v[:, k*hd:(k+1)*hd] @ (W_O^h).T`, `[n_samples, d_model]`
    - gradients: `W_O^h @ dW_V^k + dW_O^h @ W_V^k`, `[d_model, d_model]`

    The full component concatenates the heads along dim 1. See
    https://transformer-circuits.pub/2021/framework/index.html for the idea.
    """

    name = "ov_circuit"
    ROLES: ClassVar[tuple[str, ...]] = ("output_layer", "value_layer")

    def validate(self, spec: ComponentSpec) -> None:
        super().validate(spec)
        if isinstance(spec.layer_suffixes, str) or set(spec.suffix_map) != set(self.ROLES):
            raise ValueError(
                f"component 'ov_circuit' needs layer_suffixes with exactly {list(self.ROLES)}, "
                f"got {spec.layer_suffixes!r}"
            )

    def reads(self, spec: ComponentSpec) -> set[str]:
        return {"weights", spec.data_type}  # every OV data type is taken through W_V and W_O

    def extract(
        self, spec: ComponentSpec, states: CheckpointStates, model_shape: ModelShape | None
    ) -> ComponentData:
        if model_shape is None:
            raise ValueError(
                "component 'ov_circuit' needs the model shape (d_model, attention heads, kv heads)"
            )
        reader = _StateReader(states)
        suffixes = spec.suffix_map
        n_heads, hd = model_shape.attention_n_heads, model_shape.head_dim
        n_kv, d_model = model_shape.attention_n_kv_heads, model_shape.d_model

        def load(data_type: str, role: str, expected: tuple[int | None, int | None]) -> torch.Tensor:
            # Stacked over layers: (L, rows, cols).
            matrices = []
            for layer in spec.layers:
                matrix = reader.matrix(data_type, layer, suffixes[role])
                if any(
                    want is not None and got != want for got, want in zip(matrix.shape, expected, strict=True)
                ):
                    shown = tuple("*" if want is None else want for want in expected)
                    raise ValueError(
                        f"{data_type} of layer {layer} {suffixes[role]!r} has shape {tuple(matrix.shape)}, "
                        f"expected {shown} for d_model={d_model}, {n_heads} heads, {n_kv} kv heads"
                    )
                matrices.append(matrix)
            if len({m.shape for m in matrices}) > 1:
                raise ValueError(
                    f"{data_type} {suffixes[role]!r} differ in shape across layers {spec.layers}"
                )
            return torch.stack(matrices)

        w_o = load("weights", "output_layer", (d_model, n_heads * hd))
        kv_of_head = torch.arange(n_heads, device=w_o.device) // (n_heads // n_kv)
        layers = len(spec.layers)
        # W_O^h for every head, (L, H, d_model, hd).
        w_o_heads = w_o.unflatten(2, (n_heads, hd)).permute(0, 2, 1, 3)

        if spec.data_type == "activations":
            v = load("activations", "value_layer", (None, n_kv * hd))
            w_o_heads = w_o_heads.to(torch.promote_types(v.dtype, w_o.dtype))
            v_heads = v.to(w_o_heads.dtype).unflatten(2, (n_kv, hd))[:, :, kv_of_head].transpose(1, 2)
            heads = v_heads @ w_o_heads.transpose(-1, -2)  # (L, H, n_samples, d_model)
        else:
            w_v = load("weights", "value_layer", (n_kv * hd, d_model))
            w_v_heads = w_v.unflatten(1, (n_kv, hd))[:, kv_of_head]  # (L, H, hd, d_model)
            if spec.data_type == "weights":
                heads = w_v_heads @ w_o_heads  # (L, H, hd, hd)
            else:
                dw_o = load("gradients", "output_layer", (d_model, n_heads * hd))
                dw_v = load("gradients", "value_layer", (n_kv * hd, d_model))
                dw_o_heads = dw_o.unflatten(2, (n_heads, hd)).permute(0, 2, 1, 3)
                dw_v_heads = dw_v.unflatten(1, (n_kv, hd))[:, kv_of_head]
                heads = w_o_heads @ dw_v_heads + dw_o_heads @ w_v_heads  # (L, H, d_model, d_model)

        rows, cols = heads.shape[-2:]
        full = heads.transpose(1, 2).reshape(layers, rows, n_heads * cols)  # heads side by side along dim 1

        prefix = reader.prefix(spec.data_type)
        base = [f"{prefix}{layer}.ov_circuit.{spec.data_type}" for layer in spec.layers]
        head_keys = tuple(f"{b}.heads.{h}" for b in base for h in range(n_heads))
        origin = (self.name, spec.data_type, spec.layer_suffixes)
        batches = (
            ComponentBatch(head_keys, heads.reshape(layers * n_heads, rows, cols), origin),
            ComponentBatch(tuple(base), full, origin),
        )
        keys = tuple(
            key for i, b in enumerate(base) for key in (*head_keys[i * n_heads : (i + 1) * n_heads], b)
        )
        return ComponentData(batches, keys)


__all__ = [
    "COMPONENT_REGISTRY",
    "DATA_TYPES",
    "CheckpointStates",
    "Component",
    "ComponentBatch",
    "ComponentData",
    "ComponentSpec",
    "ModelShape",
    "OVCircuitComponent",
    "SimpleComponent",
    "extract_component",
    "get_component",
    "layer_prefix",
    "register_component",
]
