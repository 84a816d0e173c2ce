"""The training configuration: pico-train's sections, keys and defaults, as dataclasses.

A pico-train YAML file loads unchanged. Keys that only meant something to Lightning Fabric are accepted and
mapped onto accelerate (or noted as unused); any `transformers.TrainingArguments` field can be passed through
the extra `training_arguments` block. Unknown keys are errors that name the closest valid key.

    config = load_config("recipes/configs/demo.yaml", ["training.max_steps=50"])
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

# ConfigError and parse_override are imported from here across pico_hf (and by the recipes).
from ..configuration import (
    ConfigError,
    Problems,
    apply_overrides,
    as_dict,
    config_fields,
    from_dict,
    leaf_keys,
    load_yaml,
)
from ..configuration import parse_override as parse_override
from ..tokenization import OLMO_TOKENIZER_ID
from .modes import check_modes, mode_sections
from .modes.relora import ReLoRAConfig, check_cosine, check_jagged_cosine

DEFAULT_LAYER_SUFFIXES = ["attention.v_proj", "attention.o_proj", "swiglu.w_2"]
# The pico-lm suite's global batch: 1024 sequences of 2048 tokens.
BATCH_SIZE = 1024
MAX_SEQ_LEN = 2048
VOCAB_SIZE = 50304


# --- data -----------------------------------------------------------------------------------------------


@dataclass
class DatasetConfig:
    # A Hub dataset id, a local directory or parquet file/glob, or "embedded" (the corpus shipped with
    # pico-hf). Rows hold `input_ids` of max_seq_len + 1 tokens (or a multiple of max_seq_len, plus one).
    name: str = "pico-lm/pretokenized-dolma"
    # None: stream Hub datasets, memory-map local ones.
    streaming: bool | None = None


@dataclass
class DataLoaderConfig:
    # Global batch size in sequences, across processes and gradient-accumulation steps.
    batch_size: int = BATCH_SIZE
    # Read the sequences in an order drawn from training.seed (shuffled within blocks of 8192 rows, per
    # epoch); false: the dataset's stored order, as pico-train reads it, the same for every seed.
    shuffle: bool = True


@dataclass
class TokenizerConfig:
    name: str = OLMO_TOKENIZER_ID
    vocab_size: int = VOCAB_SIZE


@dataclass
class DataConfig:
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    dataloader: DataLoaderConfig = field(default_factory=DataLoaderConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)


# --- model ----------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    model_type: str = "pico_decoder"
    d_model: int = 768
    n_layers: int = 12
    vocab_size: int = VOCAB_SIZE
    batch_size: int = BATCH_SIZE
    max_seq_len: int = MAX_SEQ_LEN
    attention_n_heads: int = 12
    attention_n_kv_heads: int | None = 4
    activation_hidden_dim: int = 3072
    norm_eps: float = 1e-6
    position_emb_theta: float = 10000.0


# --- training -------------------------------------------------------------------------------------------


@dataclass
class FabricConfig:
    """Lightning Fabric's launch settings. Under accelerate the process count comes from `accelerate launch`;
    `precision` and `accelerator` still apply."""

    num_nodes: int = 1
    num_devices: int = 1
    precision: str = "bf16-mixed"
    accelerator: str = "cuda"


@dataclass
class OptimizationConfig:
    optimizer: str = "adamw"
    lr: float = 3e-4
    # `linear_with_warmup` (pico-train's), `cosine` (warmup, then one cosine to lr * min_lr_ratio) or
    # `jagged_cosine` (ReLoRA's schedule without adapters: the cosine re-warms after every reset). A ReLoRA run
    # sets its schedule in `training.relora`.
    lr_scheduler: str = "linear_with_warmup"
    lr_warmup_steps: int = 2500
    gradient_accumulation_steps: int = 128
    # The cosine schedules' keys, named as in `training.relora`; null: `training.relora`'s value (so a control
    # arm and a ReLoRA arm can share one schedule, --quick overrides included). Setting one that the chosen
    # lr_scheduler does not use is an error.
    min_lr_ratio: float | None = None  # cosine, jagged_cosine
    reset_frequency: int | None = None  # jagged_cosine: a re-warmup every N steps ...
    restart_warmup_steps: int | None = None  # ... over this many steps ...
    warm_start_steps: int | None = None  # ... counted from this step (a ReLoRA arm's full-rank warm start)

    def jagged_schedule(self, relora: ReLoRAConfig | None = None) -> dict[str, Any]:
        """The jagged cosine's keys, each at `relora`'s value (the run's `training.relora`) where it is unset."""
        fallback = relora if relora is not None else ReLoRAConfig()
        return {
            key: getattr(fallback, key) if getattr(self, key) is None else getattr(self, key)
            for key in SCHEDULE_KEYS["jagged_cosine"]
        }


# training.optimization.lr_scheduler -> the schedule keys of training.optimization it reads.
SCHEDULE_KEYS = {
    "linear_with_warmup": (),
    "cosine": ("min_lr_ratio",),
    "jagged_cosine": ("min_lr_ratio", "reset_frequency", "restart_warmup_steps", "warm_start_steps"),
}


@dataclass
class TrainingConfig:
    fabric: FabricConfig = field(default_factory=FabricConfig)
    optimization: OptimizationConfig = field(default_factory=OptimizationConfig)
    max_steps: int = 200_000
    # Seeds model initialisation, the data order (data.dataloader.shuffle) and every other random choice of
    # the run (pico-train: 42).
    seed: int = 42

    # Beside these keys, `training.<key>` for each training mode (pico_hf.training.modes): its own section,
    # off unless its `enabled`.
    @staticmethod
    def config_sections() -> dict[str, type]:
        return mode_sections()

    def __post_init__(self) -> None:
        for key, section in mode_sections().items():
            self.__dict__.setdefault(key, section())

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and as_dict(self) == as_dict(other)


# --- evaluation -----------------------------------------------------------------------------------------


@dataclass
class PalomaEvaluationConfig:
    dataset_name: str = "pico-lm/pretokenized-paloma-tinsy"
    dataset_split: str = "val"
    max_length: int = MAX_SEQ_LEN
    batch_size: int = 16
    # Evaluate on the first N texts only (all when null): caps the cost of evaluating every checkpoint.
    max_samples: int | None = None


@dataclass
class LmEvalEvaluationConfig:
    # For the lm-eval tasks of `evaluation.metrics`: documents per task (a fraction when < 1; all when null).
    limit: float | None = None
    batch_size: int = 8


@dataclass
class BlimpEvaluationConfig:
    # For `blimp` in `evaluation.metrics` (pico_hf.evaluation.blimp): the first N pairs of each of the 67
    # sub-tasks (all 1,000 when null), and sentences per forward pass.
    max_pairs_per_task: int | None = None
    batch_size: int = 128


@dataclass
class EvaluationConfig:
    # `paloma`, `blimp` and/or lm-eval task or group names (e.g. pico_blimp, pico_arc_easy).
    metrics: list[str] | None = field(default_factory=lambda: ["paloma"])
    paloma: PalomaEvaluationConfig = field(default_factory=PalomaEvaluationConfig)
    lm_eval: LmEvalEvaluationConfig = field(default_factory=LmEvalEvaluationConfig)
    blimp: BlimpEvaluationConfig = field(default_factory=BlimpEvaluationConfig)
    # The held-out curve: every N optimizer steps (and at step 0), the mean next-token loss of the evaluation
    # split (`paloma.dataset_name`/`dataset_split`, texts cut at `paloma.max_length`), logged as
    # `eval_heldout_loss`; off when null. Studies turn it on for every run.
    heldout_every_n_steps: int | None = None
    # The first N texts of that split (all when null); 16 keeps the demo's curve under 5% of its training time.
    heldout_max_samples: int | None = 16


# --- monitoring -----------------------------------------------------------------------------------------


@dataclass
class LoggingConfig:
    log_level: str = "INFO"
    log_every_n_steps: int = 100


@dataclass
class WandbConfig:
    project: str = ""
    entity: str = ""


@dataclass
class PicoReportConfig:
    lab_hash: str = ""
    auto_commit: bool = True


@dataclass
class MonitoringConfig:
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    save_to_wandb: bool = False
    wandb: WandbConfig = field(default_factory=WandbConfig)
    save_to_picolabs: bool = False
    pico_report: PicoReportConfig = field(default_factory=PicoReportConfig)


# --- checkpointing --------------------------------------------------------------------------------------


@dataclass
class TrainingCheckpointingConfig:
    auto_resume: bool = True


@dataclass
class EvaluationCheckpointingConfig:
    eval_results_dir: str = "eval_results"


@dataclass
class LearningDynamicsCheckpointingConfig:
    # An empty list turns capture off.
    layer_suffixes: list[str] = field(default_factory=lambda: list(DEFAULT_LAYER_SUFFIXES))
    sequence_idx: int = -1
    # Sub-batch size (across processes) for the `val` split's forward/backward.
    batch_size: int = 8
    # The `val` split: a Hub id, a local path or "embedded"; null for no `val` split.
    eval_data: str | None = "pico-lm/pretokenized-paloma-tinsy"
    # Use only the first N rows of eval_data (all when null).
    eval_max_samples: int | None = None
    # Metrics computed at every checkpoint, in pico-analyze's format ({metric_name, data_split, components,
    # ...}); comparative ones (cka, pwcca) compare with `target_checkpoint`, by default the previous checkpoint.
    metrics: list[dict[str, Any]] = field(default_factory=list)
    # "safetensors" (pico-hf), "pt" (pico-train's `{split}_{type}.pt`, readable by the original pico-analyze)
    # or "both".
    file_format: str = "safetensors"


@dataclass
class HuggingFaceCheckpointingConfig:
    repo_id: str = ""
    collection_slug: str | None = None


@dataclass
class CheckpointingConfig:
    run_name: str | None = None
    runs_dir: str = "runs"
    checkpoints_dir: str = "checkpoints"
    logs_dir: str = "logs"
    fabric_checkpoint_dir: str = "fabric_state"
    fabric_checkpoint_filename: str = "checkpoint.pt"
    learning_dynamics_dir: str = "learning_dynamics"
    save_every_n_steps: int = 1000
    save_to_hf: bool | None = False
    hf_checkpoint: HuggingFaceCheckpointingConfig = field(default_factory=HuggingFaceCheckpointingConfig)
    training: TrainingCheckpointingConfig = field(default_factory=TrainingCheckpointingConfig)
    evaluation: EvaluationCheckpointingConfig = field(default_factory=EvaluationCheckpointingConfig)
    learning_dynamics: LearningDynamicsCheckpointingConfig = field(
        default_factory=LearningDynamicsCheckpointingConfig
    )


# --- the whole run --------------------------------------------------------------------------------------


@dataclass
class PicoTrainingConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    monitoring: MonitoringConfig = field(default_factory=MonitoringConfig)
    checkpointing: CheckpointingConfig = field(default_factory=CheckpointingConfig)
    # Any `transformers.TrainingArguments` field, applied last (e.g. {report_to: [wandb], optim: adamw_torch_fused}).
    training_arguments: dict[str, Any] = field(default_factory=dict)

    @property
    def run_dir(self) -> Path:
        return Path(self.checkpointing.runs_dir) / str(self.checkpointing.run_name)

    @property
    def checkpoints_dir(self) -> Path:
        return self.run_dir / self.checkpointing.checkpoints_dir

    @property
    def logs_dir(self) -> Path:
        return self.run_dir / self.checkpointing.logs_dir

    def to_dict(self) -> dict[str, Any]:
        return as_dict(self)

    def save_yaml(self, path: Path) -> None:
        path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=True))


# Keys that configured Lightning Fabric or pico's own services; accepted, with one line on what they do here.
FABRIC_NOTES = {
    "training.fabric.num_devices": "the process count comes from `accelerate launch --num_processes`",
    "training.fabric.num_nodes": "the node count comes from `accelerate launch --num_machines`",
    "checkpointing.fabric_checkpoint_filename": "the training state is saved as Trainer/accelerate files "
    "in the `fabric_checkpoint_dir` folder",
    "monitoring.save_to_picolabs": "Pico Labs reporting is not supported; use `training_arguments.report_to`",
    "monitoring.pico_report": "Pico Labs reporting is not supported; use `training_arguments.report_to`",
}


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, check: bool = True
) -> tuple[PicoTrainingConfig, list[str]]:
    """Read a pico-train-style YAML file and dotted overrides into a validated config.

    Returns the config and notes on keys that are accepted but mean something different here."""
    tree: dict[str, Any] = {}
    if path is not None:
        tree = load_yaml(path, "Config file") or {}
        if not isinstance(tree, dict):
            raise ConfigError(
                f"Config file {path} must hold a mapping of sections, got {type(tree).__name__}"
            )
    apply_overrides(tree, overrides)
    notes: list[str] = []

    def note(key: str) -> None:
        if key in FABRIC_NOTES:
            notes.append(f"{key}: {FABRIC_NOTES[key]}.")

    config = from_dict(PicoTrainingConfig, tree, visit=note)
    if check:  # value checks (`--help` lists values without them: the metric checks import torch)
        validate(config)
    if config.checkpointing.run_name is None:
        config.checkpointing.run_name = datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    return config, notes


def validate(config: PicoTrainingConfig) -> None:
    """Value checks that need no data, model or process group; every problem found is reported at once."""
    problems = Problems()
    optimization = config.training.optimization
    if optimization.optimizer.lower() != "adamw":
        problems.add(f"training.optimization.optimizer must be 'adamw', got '{optimization.optimizer}'")
    with problems.check():
        check_lr_schedule(optimization, config.training.max_steps, config.training.relora)
    positive = {
        "training.max_steps": config.training.max_steps,
        "training.optimization.gradient_accumulation_steps": optimization.gradient_accumulation_steps,
        "data.dataloader.batch_size": config.data.dataloader.batch_size,
        "checkpointing.save_every_n_steps": config.checkpointing.save_every_n_steps,
        "monitoring.logging.log_every_n_steps": config.monitoring.logging.log_every_n_steps,
        "training.optimization.lr": optimization.lr,
    }
    for key, value in positive.items():
        if value <= 0:
            problems.add(f"{key} must be positive, got {value}")
    if optimization.lr_warmup_steps < 0:
        problems.add(
            f"training.optimization.lr_warmup_steps must be 0 or more, got {optimization.lr_warmup_steps}"
        )
    if config.training.fabric.precision not in PRECISIONS:
        problems.add(
            f"training.fabric.precision must be one of {sorted(PRECISIONS)}, got '{config.training.fabric.precision}'"
        )
    if config.checkpointing.save_to_hf and not config.checkpointing.hf_checkpoint.repo_id:
        problems.add("checkpointing.save_to_hf is true but checkpointing.hf_checkpoint.repo_id is empty")
    if config.model.model_type != "pico_decoder":
        problems.add(f"model.model_type must be 'pico_decoder', got '{config.model.model_type}'")
    for problem in model_shape_problems(config.model):
        problems.add(problem)
    if config.training.max_steps > 0:  # the modes' checks (a warm start) are made against a valid max_steps
        for problem in check_modes(config):
            problems.add(problem)
    learning_dynamics = config.checkpointing.learning_dynamics
    from ..learning_dynamics.capture import FILE_FORMATS

    if learning_dynamics.file_format not in FILE_FORMATS:
        problems.add(
            f"checkpointing.learning_dynamics.file_format must be one of {list(FILE_FORMATS)}, "
            f"got '{learning_dynamics.file_format}'"
        )
    if learning_dynamics.metrics and config.model.n_layers > 0:
        from ..learning_dynamics.tracker import check_metrics_capturable

        splits = ["train", "val"] if learning_dynamics.eval_data else ["train"]
        try:
            check_metrics_capturable(
                learning_dynamics.metrics, learning_dynamics.layer_suffixes, config.model.n_layers, splits
            )
        except ValueError as error:
            problems.add(f"checkpointing.learning_dynamics.{error}")
    problems.raise_any()


def model_shape_problems(model: ModelConfig) -> list[str]:
    """pico-decoder's shape constraints, every one broken, naming the `model.` keys. `PicoDecoderConfig`
    checks the same at construction (its file travels with each checkpoint as remote code, so it cannot import
    this one; a test keeps the two in step); here they run with the other value checks, before torch loads."""
    problems = []
    sizes = ("d_model", "n_layers", "vocab_size", "attention_n_heads", "activation_hidden_dim", "max_seq_len")
    for name in (*sizes, "attention_n_kv_heads"):
        value = getattr(model, name)
        if value is not None and value <= 0:
            problems.append(f"model.{name} must be positive, got {value}")
    if problems:
        return problems
    heads = model.attention_n_heads
    kv_heads = model.attention_n_kv_heads or heads
    if model.d_model % heads:
        problems.append(
            f"model.d_model ({model.d_model}) must be divisible by model.attention_n_heads ({heads})"
        )
    elif (model.d_model // heads) % 2:
        problems.append(
            "RoPE rotates pairs of dimensions, so the head dim model.d_model / model.attention_n_heads "
            f"({model.d_model} / {heads} = {model.d_model // heads}) must be even"
        )
    if heads % kv_heads:
        problems.append(
            f"model.attention_n_heads ({heads}) must be divisible by model.attention_n_kv_heads ({kv_heads})"
        )
    return problems


def check_lr_schedule(optimization: OptimizationConfig, max_steps: int, relora: ReLoRAConfig) -> None:
    """`training.optimization.lr_scheduler` and the schedule keys it reads (and none that it does not)."""
    key = "training.optimization"
    if optimization.lr_scheduler not in SCHEDULE_KEYS:
        raise ConfigError(
            f"{key}.lr_scheduler must be one of {list(SCHEDULE_KEYS)}, got '{optimization.lr_scheduler}'"
        )
    used = SCHEDULE_KEYS[optimization.lr_scheduler]
    for name in SCHEDULE_KEYS["jagged_cosine"]:
        if name not in used and getattr(optimization, name) is not None:
            raise ConfigError(
                f"{key}.{name} is set but lr_scheduler '{optimization.lr_scheduler}' does not use it (it is a key "
                f"of {' and '.join(s for s, keys in SCHEDULE_KEYS.items() if name in keys)})"
            )
    if optimization.lr_scheduler == "linear_with_warmup":
        return
    schedule = optimization.jagged_schedule(relora)
    if optimization.lr_scheduler == "cosine":
        problems = check_cosine(key, schedule["min_lr_ratio"])
    else:
        problems = check_jagged_cosine(
            key, **schedule, max_steps=max_steps, lr_warmup_steps=optimization.lr_warmup_steps
        )
    if problems:
        raise ConfigError.of(problems)


# Lightning precision strings -> (mixed-precision mode for accelerate, parameter dtype).
PRECISIONS = {
    "32": ("no", "float32"),
    "32-true": ("no", "float32"),
    "bf16-mixed": ("bf16", "float32"),
    "bf16": ("bf16", "float32"),
    "16-mixed": ("fp16", "float32"),
    "bf16-true": ("no", "bfloat16"),
}


def describe_sections(config: PicoTrainingConfig | None = None, sources: dict[str, str] | None = None) -> str:
    """Every section and key with the value that will run (pico-train's defaults when `config` is None), each
    set key marked with where it came from (`sources`: dotted key or section -> "file" / "command line")."""
    lines = []
    sources = sources or {}

    def source(key: str) -> str | None:
        parts = key.split(".")
        for end in range(len(parts), 0, -1):  # the key, or a section set whole on the command line
            if ".".join(parts[:end]) in sources:
                return sources[".".join(parts[:end])]
        inner = [origin for set_key, origin in sources.items() if set_key.startswith(key + ".")]
        return inner[-1] if inner else None  # a mapping value (training_arguments) set key by key

    def walk(cls: type, prefix: str, instance: Any) -> None:
        for name, annotation in config_fields(cls).items():
            value = getattr(instance, name)
            if dataclasses.is_dataclass(annotation):
                walk(annotation, f"{prefix}{name}.", value)
            else:
                origin = source(f"{prefix}{name}")
                lines.append(f"  {prefix}{name} = {value!r}" + (f"    <- {origin}" if origin else ""))

    walk(PicoTrainingConfig, "", config or PicoTrainingConfig())
    return "\n".join(lines)


def describe_config(path: Path | None, overrides: list[str]) -> str:
    """`--help`'s list of keys: the values a run with this config file and these overrides would use."""
    try:
        config, _ = load_config(path, overrides, check=False)
    except ConfigError as error:
        return f"Sections and keys (pico-train's defaults; {error}):\n" + describe_sections()
    tree = (yaml.safe_load(Path(path).read_text()) or {}) if path is not None else {}
    sources = {key: Path(path).name for key in leaf_keys(tree)} if path is not None else {}
    for override in overrides:
        sources[override.split("=", 1)[0].strip()] = "command line"
    origin = os.path.relpath(path) if path is not None else "no file"
    return (
        f"Sections and keys, with the values a run would use: those marked '<-' come from {origin} or the "
        "command line, the others are pico-train's defaults.\n" + describe_sections(config, sources)
    )
