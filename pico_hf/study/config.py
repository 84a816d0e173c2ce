"""A study: one base training config, variants of it as dotted overrides, seeds, evaluation and analysis.

    name: norm-eps
    base_config: ../demo.yaml              # relative to this file
    overrides: {training.max_steps: 100}   # applied to every run (optional)
    variants:                              # the first one is the baseline unless `baseline` names another
      baseline: {}
      eps-1e-3: {model.norm_eps: 1.0e-3}
    seeds: 2                               # or a list, e.g. [42, 43]
    evaluation: {metrics: [paloma]}        # the `evaluation` section of every run
    analysis: ../analysis/demo.yaml        # a pico-analyze config (path or inline); `target_checkpoint: final`
    quick: {overrides: {...}, seeds: 2}    # what `--quick` changes; its overrides apply last, over the variants'
    primary: [eval_heldout_loss]           # the quantities the verdicts are about (the default)
    contrasts: [[relora, full-rank-jagged]]  # further verdicts: a variant against another (a control arm)
    allow_unequal_budget: false            # true: variants may change the steps, batch or sequence length

Overrides are the keys and values `recipes/train.py` takes on its command line (`model.norm_eps=1e-3`), as a
mapping or as a list of `key=value` strings. Every run of the study is checked here, before anything trains.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..configuration import ConfigError, check_keys, load_yaml, parse_override
from ..learning_dynamics.analysis_config import AnalysisConfig, parse_analysis_config
from ..training.config import PicoTrainingConfig, load_config

STUDY_KEYS = (
    "name",
    "base_config",
    "overrides",
    "variants",
    "baseline",
    "seeds",
    "evaluation",
    "analysis",
    "primary",
    "contrasts",
    "allow_unequal_budget",
)
QUICK_KEYS = ("overrides", "seeds", "analysis")
# The study owns these: every run gets the same data order (per seed), evaluation and checkpoint layout.
STUDY_OWNED = {
    "training.seed": "the study sets it from `seeds`",
    "data": "every variant trains on the same data in the same order",
    "evaluation": "every variant is evaluated the same way: set the study's `evaluation`",
    "checkpointing": "checkpoints, learning-dynamics capture and run folders are the study's",
}
# Set by the study for every run, whatever the config says.
RUN_OWNED = {
    "training.seed": "the study sets it from `seeds`",
    "checkpointing.runs_dir": "runs live in the study's folder",
    "checkpointing.run_name": "runs are named <variant>_seed<seed>",
}
# What a run trains on: a variant that changes one of these compares unequal budgets.
BUDGET_KEYS = ("training.max_steps", "data.dataloader.batch_size", "model.max_seq_len")
BATCH_KEY = "data.dataloader.batch_size"
# The shared held-out curve every run of a study logs (`eval_heldout_loss`), unless the study sets its own.
HELDOUT_EVERY = "evaluation.heldout_every_n_steps"
DEFAULT_HELDOUT_EVERY = 10
DEFAULT_PRIMARY = ("eval_heldout_loss",)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
FINAL = "final"  # `target_checkpoint: final` in the analysis: the run's last step


@dataclass(frozen=True)
class RunSpec:
    """One training run of the study: a variant at a seed, with every override train.py is given."""

    variant: str
    seed: int
    overrides: tuple[str, ...]
    config: PicoTrainingConfig = field(compare=False, repr=False)

    @property
    def name(self) -> str:
        return f"{self.variant}_seed{self.seed}"

    @property
    def run_dir(self) -> Path:
        return self.config.run_dir


@dataclass(frozen=True)
class StudyConfig:
    name: str
    path: Path
    base_config: Path
    overrides: tuple[str, ...]
    variants: dict[str, tuple[str, ...]]
    baseline: str
    seeds: tuple[int, ...]
    evaluation: tuple[str, ...]
    analysis: dict[str, Any] | None  # a pico-analyze config mapping, `final` targets not yet resolved
    quick: bool
    output_dir: Path
    runs: tuple[RunSpec, ...]
    quick_overrides: tuple[str, ...] = ()
    primary: tuple[str, ...] = DEFAULT_PRIMARY
    # (variant, reference) pairs judged besides each variant against the baseline
    contrasts: tuple[tuple[str, str], ...] = ()
    allow_unequal_budget: bool = False

    @property
    def study_dir(self) -> Path:
        return self.output_dir / self.name

    @property
    def runs_dir(self) -> Path:
        return self.study_dir / "runs"

    def analysis_for(self, run: RunSpec) -> AnalysisConfig | None:
        """The analysis config of one run, `target_checkpoint: final` set to its last step."""
        if self.analysis is None:
            return None
        return parse_analysis_config(resolve_final(self.analysis, run.config.training.max_steps))

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "base_config": str(self.base_config),
            "overrides": list(self.overrides),
            "variants": {name: list(values) for name, values in self.variants.items()},
            "baseline": self.baseline,
            "seeds": list(self.seeds),
            "evaluation": list(self.evaluation),
            "analysis": self.analysis,
            "quick": self.quick,
            "quick_overrides": list(self.quick_overrides),
            "primary": list(self.primary),
            "contrasts": [list(pair) for pair in self.contrasts],
            "allow_unequal_budget": self.allow_unequal_budget,
        }

    def set_keys(self) -> list[str]:
        """Every dotted key that the study, a variant or `--quick` sets, in the order first set."""
        overrides = [*self.overrides, *self.evaluation, *self.quick_overrides]
        overrides += [o for values in self.variants.values() for o in values]
        return list(dict.fromkeys(parse_override(o)[0] for o in overrides))


def _contrasts(raw: Any, variants: Mapping[str, Any], baseline: str) -> tuple[tuple[str, str], ...]:
    """`contrasts: [[variant, reference], ...]`: pairs of distinct variants, neither pair the baseline's own."""
    if not isinstance(raw, list):
        raise ConfigError(f"contrasts must be a list of [variant, reference] pairs, got {raw!r}")
    pairs: list[tuple[str, str]] = []
    for index, pair in enumerate(raw):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(v, str) for v in pair)):
            raise ConfigError(
                f"contrasts[{index}] must be a [variant, reference] pair of names, got {pair!r}"
            )
        unknown = [v for v in pair if v not in variants]
        if unknown:
            raise ConfigError(
                f"contrasts[{index}] names {unknown[0]!r}, not one of the variants {list(variants)}"
            )
        variant, reference = pair
        if variant == reference:
            raise ConfigError(f"contrasts[{index}] compares {variant!r} with itself")
        if baseline in pair:  # [relora, baseline] or its mirror [baseline, relora]
            raise ConfigError(
                f"contrasts[{index}]: every variant is already compared with the baseline {baseline!r}"
            )
        if (variant, reference) in pairs:
            raise ConfigError(f"contrasts[{index}] repeats [{variant}, {reference}]")
        pairs.append((variant, reference))
    return tuple(pairs)


def _overrides(value: Any, where: str) -> list[str]:
    """A mapping `{model.norm_eps: 1e-3}` or a list `["model.norm_eps=1e-3"]` as train.py's `key=value`s."""
    if value is None:
        return []
    if isinstance(value, Mapping):
        # JSON is YAML: train.py parses the value back to exactly what the study file held.
        return [f"{key}={json.dumps(item)}" for key, item in value.items()]
    if isinstance(value, list):
        for item in value:
            if not isinstance(item, str):
                raise ConfigError(f"{where}: override {item!r} must be a 'section.key=value' string")
            parse_override(item)  # the same check train.py makes
        return list(value)
    raise ConfigError(
        f"{where} must be a mapping of dotted keys to values or a list of key=value, got {value!r}"
    )


def _flatten(section: str, value: Any) -> list[str]:
    """`evaluation: {paloma: {max_samples: 8}}` -> `["evaluation.paloma.max_samples=8"]`."""
    if isinstance(value, Mapping):
        return [item for key, sub in value.items() for item in _flatten(f"{section}.{key}", sub)]
    return [f"{section}={json.dumps(value)}"]


def _check_owned(
    overrides: list[str], where: str, owned_keys: Mapping[str, str], allowed: tuple[str, ...] = ()
) -> None:
    for override in overrides:
        key = parse_override(override)[0]
        if key in allowed:
            continue
        for owned, why in owned_keys.items():
            if key == owned or key.startswith(owned + "."):
                raise ConfigError(f"{where}: '{key}' cannot be set here ({why})")


def seed_list(value: Any, where: str = "seeds") -> list[int]:
    """An int N (seeds 0..N-1) or a list of distinct non-negative ints."""
    if isinstance(value, bool):
        raise ConfigError(f"{where} must be a positive number of seeds or a list of seeds, got {value!r}")
    if isinstance(value, int):
        if value < 1:
            raise ConfigError(f"{where} must be at least 1, got {value}")
        return list(range(value))
    if isinstance(value, list) and value:
        if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in value):
            raise ConfigError(f"{where} must be non-negative integers, got {value}")
        if len(set(value)) != len(value):
            raise ConfigError(f"{where} has repeated seeds: {value}")
        return list(value)
    raise ConfigError(
        f"{where} must be a positive number of seeds or a non-empty list of seeds, got {value!r}"
    )


def take_seeds(seeds: list[int], count: int) -> list[int]:
    """`--seeds N`: the first N of the study's seeds, continued past the last one if N is larger."""
    if count < 1:
        raise ConfigError(f"--seeds must be at least 1, got {count}")
    seeds = list(seeds)
    while len(seeds) < count:
        seeds.append(max(seeds) + 1)
    return seeds[:count]


def resolve_final(analysis: Mapping[str, Any], final_step: int) -> dict[str, Any]:
    analysis = copy.deepcopy(dict(analysis))
    for metric in analysis.get("metrics") or []:
        if isinstance(metric, dict) and metric.get("target_checkpoint") == FINAL:
            metric["target_checkpoint"] = final_step
    return analysis


def _load_analysis(value: Any, base: Path) -> dict[str, Any] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = load_yaml((base / value).resolve(), "analysis: config file") or {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"analysis must be a path to a pico-analyze config or a mapping, got {value!r}")
    value = dict(value)
    value.pop("monitoring", None)  # results go into each run's folder
    value.pop("analysis_name", None)
    try:
        parse_analysis_config(resolve_final(value, 1))  # every key and metric checked before training
    except ConfigError as error:
        raise ConfigError(f"analysis: {error}") from error
    return value


def load_study_config(
    path: str | Path,
    *,
    seeds: int | None = None,
    quick: bool = False,
    output_dir: str | Path = "studies",
) -> StudyConfig:
    """Read and check a study file; every run's training config is built and validated here."""
    if seeds is not None and seeds < 1:
        raise ConfigError(f"--seeds must be at least 1, got {seeds}")
    path = Path(path)
    raw = load_yaml(path, "Study config") or {}
    try:
        return _parse(raw, path, seeds, quick, Path(output_dir))
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from error


def _parse(raw: Any, path: Path, seeds: int | None, quick: bool, output_dir: Path) -> StudyConfig:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"a study config must be a mapping, got {type(raw).__name__}")
    check_keys("", raw, [*STUDY_KEYS, "quick"], lead="unknown")
    name = str(raw.get("name") or path.stem)
    if not _NAME.match(name):
        raise ConfigError(f"name {name!r} must be letters, digits, '.', '_' or '-'")
    if not raw.get("base_config"):
        raise ConfigError("base_config must name the training config the variants change")
    base_config = (path.parent / str(raw["base_config"])).resolve()
    if not base_config.is_file():
        raise ConfigError(f"base_config {base_config} does not exist")

    common = _overrides(raw.get("overrides"), "overrides")
    quick_section = raw.get("quick") or {}
    if not isinstance(quick_section, Mapping):
        raise ConfigError(f"quick must be a mapping with keys {list(QUICK_KEYS)}, got {quick_section!r}")
    check_keys("quick", quick_section, QUICK_KEYS, lead="unknown")
    # --quick shrinks every run, the variants' own settings included (a ReLoRA variant's reset schedule must
    # fit the quick run's steps): its overrides come last.
    quick_overrides = _overrides(quick_section.get("overrides"), "quick.overrides") if quick else []
    _check_owned(common, "overrides", RUN_OWNED)
    _check_owned(quick_overrides, "quick.overrides", RUN_OWNED)
    allow_unequal = raw.get("allow_unequal_budget", False)
    if not isinstance(allow_unequal, bool):
        raise ConfigError(f"allow_unequal_budget must be true or false, got {allow_unequal!r}")
    primary = raw.get("primary", list(DEFAULT_PRIMARY))
    if isinstance(primary, str):
        primary = [primary]
    if not isinstance(primary, list) or not primary or not all(isinstance(p, str) and p for p in primary):
        raise ConfigError(f"primary must be a non-empty list of quantity names, got {primary!r}")
    if len(set(primary)) != len(primary):
        raise ConfigError(f"primary has repeated names: {primary}")

    variants_raw = raw.get("variants")
    if not isinstance(variants_raw, Mapping) or not variants_raw:
        raise ConfigError("variants must be a non-empty mapping: name -> overrides ({} for the baseline)")
    variants: dict[str, tuple[str, ...]] = {}
    for variant, value in variants_raw.items():
        variant = str(variant)
        if not _NAME.match(variant):
            raise ConfigError(f"variant name {variant!r} must be letters, digits, '.', '_' or '-'")
        overrides = _overrides(value, f"variants.{variant}")
        # The batch is the one data key a variant may change, and only where budgets may differ.
        allowed = (BATCH_KEY,) if allow_unequal else ()
        _check_owned(overrides, f"variants.{variant}", STUDY_OWNED, allowed)
        variants[variant] = tuple(overrides)
    baseline = str(raw.get("baseline") or next(iter(variants)))
    if baseline not in variants:
        raise ConfigError(f"baseline {baseline!r} is not one of the variants {list(variants)}")
    contrasts = _contrasts(raw.get("contrasts", []), variants, baseline)

    seed_values = seed_list(
        quick_section.get("seeds") if quick and "seeds" in quick_section else raw.get("seeds", 1)
    )
    if seeds is not None:
        seed_values = take_seeds(seed_values, seeds)

    evaluation_raw = raw.get("evaluation")
    if evaluation_raw is not None and not isinstance(evaluation_raw, Mapping):
        raise ConfigError(
            f"evaluation must be a mapping of the `evaluation` section's keys, got {evaluation_raw!r}"
        )
    evaluation = _flatten("evaluation", dict(evaluation_raw)) if evaluation_raw else []
    if not any(parse_override(o)[0] == HELDOUT_EVERY for o in evaluation):
        evaluation.append(f"{HELDOUT_EVERY}={DEFAULT_HELDOUT_EVERY}")  # every study logs the shared curve

    analysis_raw = quick_section.get("analysis", raw.get("analysis")) if quick else raw.get("analysis")
    analysis = _load_analysis(analysis_raw, path.parent)

    full_name = f"{name}-quick" if quick else name
    runs_dir = output_dir / full_name / "runs"
    runs = []
    for variant, variant_overrides in variants.items():
        for seed in seed_values:
            overrides = [
                *common,
                *evaluation,
                *variant_overrides,
                *quick_overrides,
                f"training.seed={seed}",
                f"checkpointing.runs_dir={json.dumps(str(runs_dir))}",
                f"checkpointing.run_name={variant}_seed{seed}",
                "checkpointing.training.auto_resume=true",
            ]
            try:
                config, _ = load_config(base_config, overrides)
                check_run_config(config)
            except ConfigError as error:
                raise ConfigError(f"variant {variant!r} (seed {seed}): {error}") from error
            runs.append(RunSpec(variant, seed, tuple(overrides), config))
    _check_budgets(runs, baseline, variants, allow_unequal)
    return StudyConfig(
        name=full_name,
        path=path,
        base_config=base_config,
        overrides=tuple(common),
        variants=variants,
        baseline=baseline,
        seeds=tuple(seed_values),
        evaluation=tuple(evaluation),
        analysis=analysis,
        quick=quick,
        output_dir=output_dir,
        runs=tuple(runs),
        quick_overrides=tuple(quick_overrides),
        primary=tuple(primary),
        contrasts=contrasts,
        allow_unequal_budget=allow_unequal,
    )


def dotted(config: Any, key: str) -> Any:
    """`config["training"]["max_steps"]` for "training.max_steps" (a config object or its saved mapping)."""
    value = config.to_dict() if hasattr(config, "to_dict") else config
    for part in key.split("."):
        if not isinstance(value, Mapping) or part not in value:
            raise KeyError(key)
        value = value[part]
    return value


def _check_budgets(
    runs: list[RunSpec], baseline: str, variants: Mapping[str, tuple[str, ...]], allow_unequal: bool
) -> None:
    """A variant trains on as many tokens as the baseline (same steps, batch and sequence length), or the
    study says it compares unequal budgets (then at equal tokens)."""
    if allow_unequal:
        return
    reference = next(run.config for run in runs if run.variant == baseline)
    for run in runs:
        for key in BUDGET_KEYS:
            mine, theirs = dotted(run.config, key), dotted(reference, key)
            if mine != theirs:
                raise ConfigError(
                    f"variant {run.variant!r}: {key}={mine} changes the training budget (the baseline "
                    f"{baseline!r} has {theirs}); set `allow_unequal_budget: true` to compare at equal tokens"
                )


def check_run_config(config: PicoTrainingConfig) -> None:
    """The checks a run makes when it starts that need no data or model, made before anything trains."""
    from ..evaluation.callback import check_evaluation_config
    from ..evaluation.heldout import check_heldout_config

    check_evaluation_config(config)
    check_heldout_config(config)


__all__ = [
    "BUDGET_KEYS",
    "FINAL",
    "RunSpec",
    "StudyConfig",
    "dotted",
    "load_study_config",
    "resolve_final",
    "seed_list",
    "take_seeds",
]
