"""Learning-dynamics metrics with pico-analyze's definitions, computed batched on components.

Single-checkpoint metrics: `per`, `condition_number`, `gini`, `hoyer`, `norm` (`norm_type`
`frobenius`, `nuclear` or `inf`). Comparative metrics (source checkpoint against a target checkpoint):
`cka`, `pwcca`. Specs use pico-analyze's config format:

    {"metric_name": "norm", "norm_type": "nuclear", "data_split": "val",
     "components": [{"component_name": "simple", "data_type": "weights",
                     "layer_suffixes": "swiglu.w_2", "layers": [0, 1]}]}

Result names. Every spec gets a stable `result_name`: the metric name followed by its option values in
declaration order, so `norm` with `norm_type: nuclear` is `norm_nuclear` and `per` stays `per`. Output
files are `{result_name}_{data_split}.json` (pico-analyze's `{metric}_{split}.json` for every metric
without options), so two norms no longer overwrite each other.

Singular values are computed once per matrix per `compute_metrics` call and shared by every metric that
needs them (PER, condition number, nuclear norm). Adding a metric is one `@register_metric` class.
"""

from __future__ import annotations

import math
import warnings
from abc import ABC, abstractmethod
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from ..configuration import suggest
from .components import (
    DATA_TYPES,
    CheckpointStates,
    ComponentBatch,
    ComponentData,
    ComponentSpec,
    ModelShape,
    extract_component,
)


class RankDeficientWarning(UserWarning):
    """An input to a metric is rank-deficient, so the metric's value is ill-conditioned."""


class SingularValueCache:
    """Singular values of the component matrices of one checkpoint, each computed at most once.

    Keyed on the computation (component origin and result key), never on tensor identity; live for
    one `compute_metrics` call, so results cannot go stale.
    """

    def __init__(self) -> None:
        self._values: dict[tuple[Hashable, str], torch.Tensor] = {}

    def __call__(self, batch: ComponentBatch) -> torch.Tensor:
        """Singular values of every matrix in the batch, `(len(keys), min(rows, cols))`, descending."""
        missing = [i for i, key in enumerate(batch.keys) if (batch.origin, key) not in self._values]
        if missing:
            data = batch.data if len(missing) == len(batch.keys) else batch.data[missing]
            if data.shape[-2] < data.shape[-1]:
                # Same singular values; LAPACK's divide-and-conquer SVD is far faster on tall matrices
                # (10x on CPU for the [n_samples, heads * d_model] OV activations).
                data = data.mT
            for i, values in zip(missing, torch.linalg.svdvals(data), strict=True):
                self._values[(batch.origin, batch.keys[i])] = values
        return torch.stack([self._values[(batch.origin, key)] for key in batch.keys])


class Metric(ABC):
    """A metric. Subclasses set `name`, the data types they accept and their options, and register.

    `options` maps each option key of the spec (e.g. `norm_type`) to its allowed values; every declared
    option is required and becomes part of the result name.
    """

    name: ClassVar[str]
    data_types: ClassVar[tuple[str, ...]] = DATA_TYPES
    options: ClassVar[dict[str, tuple[str, ...]]] = {}
    comparative: ClassVar[bool] = False

    def __init__(self, **options: str):
        for option, allowed in self.options.items():
            value = options.get(option)
            if value not in allowed:
                raise ValueError(f"metric {self.name!r} needs {option} in {list(allowed)}, got {value!r}")
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            raise ValueError(f"metric {self.name!r} takes no option(s) {unknown}")
        self.option_values = {option: options[option] for option in self.options}


class SingleCheckpointMetric(Metric):
    """A metric of one checkpoint's component matrices."""

    @abstractmethod
    def compute(self, batch: ComponentBatch, singular_values: SingularValueCache) -> torch.Tensor:
        """One value per matrix of the batch, `(len(batch.keys),)`."""


class ComparativeMetric(Metric):
    """A metric comparing a source checkpoint's component matrices with a target checkpoint's."""

    comparative = True

    @abstractmethod
    def compare(self, source: ComponentBatch, target: ComponentBatch) -> torch.Tensor:
        """One value per matrix pair, `(len(source.keys),)`."""


METRIC_REGISTRY: dict[str, type[Metric]] = {}


def register_metric(cls: type[Metric]) -> type[Metric]:
    METRIC_REGISTRY[cls.name] = cls
    return cls


def _get_metric_class(name: str) -> type[Metric]:
    if name not in METRIC_REGISTRY:
        raise ValueError(f"unknown metric {name!r}; valid metrics: {sorted(METRIC_REGISTRY)}")
    return METRIC_REGISTRY[name]


# -----------------
# Single-checkpoint metrics
# -----------------


def _sort_rows(x: torch.Tensor) -> torch.Tensor:
    """Sort each row ascending. On CPU NumPy's vectorised sort is about 10x faster than torch.sort."""
    if x.device.type == "cpu":
        return torch.from_numpy(np.sort(x.detach().numpy(), axis=-1))
    return x.sort(dim=-1).values


@register_metric
class PERMetric(SingleCheckpointMetric):
    """Proportional effective rank: `exp(-sum p ln p) / len(s)` with `p = s / sum(s)` over singular values.

    From "Tending Towards Stability: Convergence Challenges in Small Language Models"
    (https://aclanthology.org/2024.findings-emnlp.187/). Zero singular values contribute 0 (the limit).
    """

    name = "per"
    data_types = ("weights", "gradients")

    def compute(self, batch: ComponentBatch, singular_values: SingularValueCache) -> torch.Tensor:
        s = singular_values(batch)
        p = s / s.sum(dim=-1, keepdim=True)
        entropy = -torch.special.xlogy(p, p).sum(dim=-1)
        return torch.exp(entropy) / s.shape[-1]


@register_metric
class ConditionNumberMetric(SingleCheckpointMetric):
    """Condition number: largest over smallest singular value."""

    name = "condition_number"

    def compute(self, batch: ComponentBatch, singular_values: SingularValueCache) -> torch.Tensor:
        s = singular_values(batch)
        return s.amax(dim=-1) / s.amin(dim=-1)


@register_metric
class GiniMetric(SingleCheckpointMetric):
    """Gini coefficient of the absolute entries: `sum((2i - n - 1) x_i) / (n sum x)` over sorted `|x|`.

    0 for an all-zero matrix, by convention.
    """

    name = "gini"

    def compute(self, batch: ComponentBatch, singular_values: SingularValueCache) -> torch.Tensor:
        x = _sort_rows(batch.data.flatten(1).abs())
        n = x.shape[-1]
        rank = torch.arange(1, n + 1, dtype=x.dtype, device=x.device)
        # float64 accumulation: float32 sums over millions of entries (OV components) drift by ~1e-4.
        total = x.sum(dim=-1, dtype=torch.float64)
        gini = ((2 * rank - n - 1) * x).sum(dim=-1, dtype=torch.float64) / (n * total)
        return torch.where(total == 0, torch.zeros_like(gini), gini)


@register_metric
class HoyerMetric(SingleCheckpointMetric):
    """Hoyer sparsity: `(sqrt(n) - |x|_1 / |x|_2) / (sqrt(n) - 1)` over all entries (NaN if all zero)."""

    name = "hoyer"

    def compute(self, batch: ComponentBatch, singular_values: SingularValueCache) -> torch.Tensor:
        x = batch.data.flatten(1)
        sqrt_n = math.sqrt(x.shape[-1])
        # float64 accumulation: the ratio is amplified by 1 / (sqrt(n) - ratio), float32 sums drift by ~1e-4.
        ratio = x.abs().sum(dim=-1, dtype=torch.float64) / torch.linalg.vector_norm(
            x, dim=-1, dtype=torch.float64
        )
        return (sqrt_n - ratio) / (sqrt_n - 1)


@register_metric
class NormMetric(SingleCheckpointMetric):
    """Matrix norm: `frobenius`, `nuclear` (sum of singular values) or `inf` (largest absolute entry)."""

    name = "norm"
    options = {"norm_type": ("frobenius", "nuclear", "inf")}

    def compute(self, batch: ComponentBatch, singular_values: SingularValueCache) -> torch.Tensor:
        norm_type = self.option_values["norm_type"]
        if norm_type == "nuclear":
            return singular_values(batch).sum(dim=-1)
        if norm_type == "frobenius":
            return torch.linalg.vector_norm(batch.data, dim=(-2, -1), dtype=torch.float64)
        return batch.data.abs().amax(dim=(-2, -1))


# -----------------
# Comparative metrics
# -----------------


@register_metric
class CKAMetric(ComparativeMetric):
    """Linear CKA between centred activations (Kornblith et al. 2019, https://arxiv.org/abs/1905.00414).

    `CKA = ||X^T Y||_F^2 / (||X^T X||_F ||Y^T Y||_F)` on float32 activations centred over samples,
    evaluated via sample Gram matrices when there are fewer samples than features (same value).
    """

    name = "cka"
    data_types = ("activations",)

    def compare(self, source: ComponentBatch, target: ComponentBatch) -> torch.Tensor:
        dtype = torch.promote_types(torch.promote_types(source.data.dtype, target.data.dtype), torch.float32)
        x = source.data.to(dtype)
        y = target.data.to(dtype)
        x = x - x.mean(dim=1, keepdim=True)
        y = y - y.mean(dim=1, keepdim=True)
        n, dx, dy = x.shape[1], x.shape[2], y.shape[2]
        if n * (dx + dy) < dx * dy + dx * dx + dy * dy:
            gram_x, gram_y = x @ x.mT, y @ y.mT  # <XX^T, YY^T> = ||X^T Y||_F^2
            similarity = (gram_x * gram_y).sum(dim=(-2, -1))
        else:
            similarity = torch.linalg.matrix_norm(x.mT @ y) ** 2
            gram_x, gram_y = x.mT @ x, y.mT @ y
        return similarity / (torch.linalg.matrix_norm(gram_x) * torch.linalg.matrix_norm(gram_y))


@register_metric
class PWCCAMetric(ComparativeMetric):
    """Projection-weighted CCA (Morcos et al. 2018, https://arxiv.org/abs/1806.05759), as in the SVCCA library.

    Activations are `(neurons x samples)` for the definition; covariances are rescaled to a largest entry
    of 1, neurons with variance below `epsilon` dropped and `epsilon * I` added before whitening. The
    canonical correlations are weighted by how much of the side with fewer neurons each canonical
    direction accounts for.

    Unlike the reference, the computation is deterministic (no retries with random noise) and warns
    (`RankDeficientWarning`, naming the component) when a covariance has eigenvalues below `epsilon`: the
    value then depends on the regulariser. Needs more samples than neurons (as the reference); components
    with fewer get NaN and a warning. As in the SVCCA library, the neuron means are added back to the
    canonical directions, which makes the value depend on the signs LAPACK picks for singular vectors.
    """

    name = "pwcca"
    data_types = ("activations",)
    epsilon: ClassVar[float] = 1e-6

    def compare(self, source: ComponentBatch, target: ComponentBatch) -> torch.Tensor:
        x, y = source.data.double(), target.data.double()
        result = torch.full((x.shape[0],), math.nan, dtype=torch.float64, device=x.device)
        n_samples = x.shape[1]
        if n_samples <= max(x.shape[2], y.shape[2]):
            self._warn(
                source.keys,
                f"{n_samples} samples for {max(x.shape[2], y.shape[2])} neurons "
                "(PWCCA needs more samples than neurons); result is NaN",
            )
            return result

        xc, yc = x - x.mean(dim=1, keepdim=True), y - y.mean(dim=1, keepdim=True)
        sxx = xc.mT @ xc / (n_samples - 1)
        syy = yc.mT @ yc / (n_samples - 1)
        sxy = xc.mT @ yc / (n_samples - 1)
        x_max = sxx.abs().amax(dim=(-2, -1), keepdim=True)
        y_max = syy.abs().amax(dim=(-2, -1), keepdim=True)
        sxx, syy, sxy = sxx / x_max, syy / y_max, sxy / torch.sqrt(x_max * y_max)

        x_keep = sxx.diagonal(dim1=-2, dim2=-1) >= self.epsilon
        y_keep = syy.diagonal(dim1=-2, dim2=-1) >= self.epsilon
        complete = x_keep.all(dim=-1) & y_keep.all(dim=-1)
        deficient = torch.zeros_like(complete)
        if complete.any():
            index = complete.nonzero().squeeze(-1)
            values, low_rank = self._pwcca(
                sxx[index], sxy[index], syy[index], x[index], y[index], xc[index], yc[index]
            )
            result[index], deficient[index] = values, low_rank
        # Neurons with (near-)zero variance are dropped per matrix, so those matrices go one at a time.
        for i in (~complete).nonzero().squeeze(-1).tolist():
            kx, ky = x_keep[i], y_keep[i]
            if not kx.any() or not ky.any():
                result[i] = 0.0  # no neuron varies: the SVCCA library's zero result
                continue
            values, low_rank = self._pwcca(
                sxx[i][kx][:, kx][None],
                sxy[i][kx][:, ky][None],
                syy[i][ky][:, ky][None],
                x[i][:, kx][None],
                y[i][:, ky][None],
                xc[i][:, kx][None],
                yc[i][:, ky][None],
            )
            result[i], deficient[i] = values[0], low_rank[0]
        if deficient.any():
            keys = [key for key, low_rank in zip(source.keys, deficient.tolist(), strict=True) if low_rank]
            self._warn(
                keys,
                f"rank-deficient activations (covariance eigenvalues below epsilon={self.epsilon}); "
                "PWCCA is ill-conditioned",
            )
        return result

    def _pwcca(
        self,
        sxx: torch.Tensor,
        sxy: torch.Tensor,
        syy: torch.Tensor,
        x: torch.Tensor,
        y: torch.Tensor,
        xc: torch.Tensor,
        yc: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """PWCCA of a batch of rescaled covariances; returns values and rank-deficiency flags."""
        if sxx.shape[-1] > syy.shape[-1]:
            # Weights come from the side with fewer neurons; CCA is symmetric, so swap the roles.
            sxx, syy, sxy, x, y, xc, yc = syy, sxx, sxy.mT, y, x, yc, xc
        eye = torch.eye(sxx.shape[-1], dtype=sxx.dtype, device=sxx.device)
        eye_y = torch.eye(syy.shape[-1], dtype=syy.dtype, device=syy.device)
        # Regularised inverse square roots via one eigendecomposition each.
        w_x, v_x = torch.linalg.eigh(sxx + self.epsilon * eye)
        w_y, v_y = torch.linalg.eigh(syy + self.epsilon * eye_y)
        deficient = (w_x.amin(dim=-1) < 2 * self.epsilon) | (w_y.amin(dim=-1) < 2 * self.epsilon)
        tiny = torch.finfo(sxx.dtype).tiny
        invsqrt_xx = (v_x * w_x.clamp_min(tiny).rsqrt().unsqueeze(-2)) @ v_x.mT
        invsqrt_yy = (v_y * w_y.clamp_min(tiny).rsqrt().unsqueeze(-2)) @ v_y.mT
        # Decompose this exact matrix: adding the means back below makes the result depend on the signs
        # of the singular vectors, so algebraically equivalent factorisations would not match the reference.
        u, s, _ = torch.linalg.svd(invsqrt_xx @ sxy @ invsqrt_yy, full_matrices=False)
        # Canonical directions over samples; the SVCCA library adds the neuron means back.
        means = (x - xc)[:, :1, :].mT  # (B, neurons, 1)
        directions = u.mT @ xc.mT + means
        q, _ = torch.linalg.qr(directions.mT)
        weights = (q.mT @ x).abs().sum(dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        return (weights * s.abs()).sum(dim=-1), deficient

    def _warn(self, keys: Sequence[str], problem: str) -> None:
        shown = ", ".join(keys[:4]) + (f" and {len(keys) - 4} more" if len(keys) > 4 else "")
        warnings.warn(f"pwcca on {shown}: {problem}", RankDeficientWarning, stacklevel=4)


# -----------------
# Specs and computation
# -----------------


@dataclass(frozen=True)
class MetricSpec:
    """One metric entry of a pico-analyze learning-dynamics config.

    `options` holds metric-specific keys (e.g. `norm_type`); `target_checkpoint` is the step that
    comparative metrics compare against (the caller loads that checkpoint's states).
    """

    metric_name: str
    components: tuple[ComponentSpec, ...]
    data_split: str | None = None
    target_checkpoint: int | None = None
    options: dict[str, str] = field(default_factory=dict)

    KEYS: ClassVar[tuple[str, ...]] = ("metric_name", "components", "data_split", "target_checkpoint")

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> MetricSpec:
        """Parse a pico-analyze metric spec; `metric` is accepted as an alias of `metric_name`."""
        name = config.get("metric_name", config.get("metric"))
        if "metric_name" in config and "metric" in config and config["metric"] != name:
            raise ValueError(
                f"metric spec names two metrics: {config['metric_name']!r} and {config['metric']!r}"
            )
        if name is None:
            raise ValueError(f"metric spec {dict(config)} lacks metric_name")
        metric_cls = _get_metric_class(name)
        # Options of other metrics may appear as null (configs written for every metric alike).
        all_options = {option for registered in METRIC_REGISTRY.values() for option in registered.options}
        options = {}
        for key, value in config.items():
            if key in (*cls.KEYS, "metric"):
                continue
            if key in metric_cls.options:
                options[key] = value
            elif not (key in all_options and value is None):
                valid = [*cls.KEYS, *metric_cls.options]
                close = suggest(key, valid)
                hint = f"; did you mean {close!r}?" if close else ""
                raise ValueError(f"unknown key {key!r} in spec of metric {name!r}; valid keys: {valid}{hint}")
        components = config.get("components")
        if not components:
            raise ValueError(f"metric {name!r} spec has no components")
        target = config.get("target_checkpoint")
        spec = cls(
            metric_name=name,
            components=tuple(
                c if isinstance(c, ComponentSpec) else ComponentSpec.from_dict(c) for c in components
            ),
            data_split=config.get("data_split"),
            target_checkpoint=None if target is None else int(target),
            options=options,
        )
        spec.build()  # validates options and component data types now, not at compute time
        return spec

    def build(self) -> Metric:
        metric_cls = _get_metric_class(self.metric_name)
        for component in self.components:
            if component.data_type not in metric_cls.data_types:
                raise ValueError(
                    f"metric {self.metric_name!r} does not support data_type {component.data_type!r} "
                    f"(component {component.component_name!r}); supported: {', '.join(metric_cls.data_types)}"
                )
        return metric_cls(**self.options)

    @property
    def result_name(self) -> str:
        """The metric name plus option values in declaration order, e.g. `norm_nuclear`."""
        metric_cls = _get_metric_class(self.metric_name)
        return "_".join([self.metric_name, *(str(self.options[option]) for option in metric_cls.options)])

    @property
    def output_filename(self) -> str:
        """pico-analyze's per-step output file name, `{result_name}_{data_split}.json`."""
        split = f"_{self.data_split}" if self.data_split is not None else ""
        return f"{self.result_name}{split}.json"


def parse_metric_specs(configs: Sequence[Mapping[str, Any] | MetricSpec]) -> list[MetricSpec]:
    """Parse a config's `metrics` list; reject specs whose results would share an output file."""
    specs = [c if isinstance(c, MetricSpec) else MetricSpec.from_dict(c) for c in configs]
    seen: dict[str, int] = {}
    for index, spec in enumerate(specs):
        if spec.output_filename in seen:
            raise ValueError(
                f"metric specs {seen[spec.output_filename]} and {index} both write {spec.output_filename!r}; "
                "merge their components into one spec"
            )
        seen[spec.output_filename] = index
    return specs


class _CheckpointComponents:
    """One checkpoint's states with its components and singular values, each computed once."""

    def __init__(self, states: CheckpointStates, model_shape: ModelShape | None):
        self.states = states
        self.model_shape = model_shape
        self.singular_values = SingularValueCache()
        self._components: dict[ComponentSpec, ComponentData] = {}

    def component(self, spec: ComponentSpec) -> ComponentData:
        if spec not in self._components:
            self._components[spec] = extract_component(spec, self.states, self.model_shape)
        return self._components[spec]


def _check_pairs(spec: ComponentSpec, source: ComponentData, target: ComponentData) -> None:
    if source.keys != target.keys:
        raise ValueError(
            f"component {spec.component_name!r} has keys {source.keys} in source, {target.keys} in target"
        )
    for s, t in zip(source.batches, target.batches, strict=True):
        if s.data.shape[:2] != t.data.shape[:2]:
            raise ValueError(
                f"component {s.keys[0]!r}: source has shape {tuple(s.data.shape[1:])}, target "
                f"{tuple(t.data.shape[1:])}; comparative metrics need the same samples"
            )


def compute_metrics(
    metric_specs: Sequence[Mapping[str, Any] | MetricSpec],
    source_states: CheckpointStates,
    target_states: CheckpointStates | None = None,
    *,
    model_shape: ModelShape | Mapping[str, Any] | Any | None = None,
) -> dict[str, dict[str, float]]:
    """Compute metric specs on one checkpoint's learning-dynamics states.

    Args:
        metric_specs: pico-analyze metric specs (dicts) or parsed `MetricSpec`s.
        source_states: `{data_type: {layer_name: tensor}}` of the checkpoint to analyse.
        target_states: the same for the checkpoint comparative metrics compare against.
        model_shape: `ModelShape`, or a config with `d_model`, `attention_n_heads`,
            `attention_n_kv_heads`; needed by `ov_circuit` components.

    Returns:
        `{result_name: {component_key: value}}`, components in spec order.
    """
    specs = [s if isinstance(s, MetricSpec) else MetricSpec.from_dict(s) for s in metric_specs]
    names = [spec.result_name for spec in specs]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(
            f"several metric specs share the result name(s) {duplicates}; merge their components"
        )
    shape = None if model_shape is None else ModelShape.from_config(model_shape)
    source = _CheckpointComponents(source_states, shape)
    target = None if target_states is None else _CheckpointComponents(target_states, shape)

    results: dict[str, dict[str, float]] = {}
    with torch.no_grad():
        for spec in specs:
            metric = spec.build()
            if metric.comparative and target is None:
                raise ValueError(
                    f"metric {spec.metric_name!r} compares against a target checkpoint: pass target_states"
                )
            values: dict[str, float] = {}
            for component_spec in spec.components:
                data = source.component(component_spec)
                by_key: dict[str, float] = {}
                # Plain loops (no comprehensions) so metric warnings point at the caller of compute_metrics.
                if isinstance(metric, ComparativeMetric):
                    target_data = target.component(component_spec)
                    _check_pairs(component_spec, data, target_data)
                    for batch, target_batch in zip(data.batches, target_data.batches, strict=True):
                        by_key.update(
                            zip(batch.keys, metric.compare(batch, target_batch).tolist(), strict=True)
                        )
                else:
                    for batch in data.batches:
                        batch_values = metric.compute(batch, source.singular_values)
                        by_key.update(zip(batch.keys, batch_values.tolist(), strict=True))
                values.update((key, by_key[key]) for key in data.keys)
            results[spec.result_name] = values
    return results


__all__ = [
    "METRIC_REGISTRY",
    "CKAMetric",
    "ComparativeMetric",
    "ConditionNumberMetric",
    "GiniMetric",
    "HoyerMetric",
    "Metric",
    "MetricSpec",
    "NormMetric",
    "PERMetric",
    "PWCCAMetric",
    "RankDeficientWarning",
    "SingleCheckpointMetric",
    "SingularValueCache",
    "compute_metrics",
    "parse_metric_specs",
    "register_metric",
]
