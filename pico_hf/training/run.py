"""Build and run a pico training job from a `PicoTrainingConfig`: the recipe's whole body."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import ProgressCallback, TrainerCallback, TrainingArguments, set_seed
from transformers.integrations import TensorBoardCallback

from ..configuration import Problems, wandb_problem
from ..evaluation.callback import build_evaluation_callbacks
from ..evaluation.heldout import build_heldout_callbacks
from ..hub.callback import build_hub_callbacks, hub_early_uploads, hub_push_error, hub_summary
from ..hub.cards import build_card_callbacks
from ..learning_dynamics.callback import build_learning_dynamics_callbacks
from ..models.pico_decoder import PicoDecoderConfig, PicoDecoderForCausalLM
from ..tokenization import load_tokenizer
from .arguments import check_training_arguments
from .config import PRECISIONS, ConfigError, PicoTrainingConfig
from .console import interrupts_end_cleanly, log_console
from .data import BatchLayout, DataError, PretokenizedStream, training_sequences
from .modes import build_mode
from .rundir import (
    RunLayout,
    RunLock,
    check_existing_run,
    checkpoint_step,
    finished_step,
    remove_leftovers,
    saved_config,
    write_config,
)
from .schedules import optimization_lr_multiplier
from .trainer import PicoTrainer, no_clipping

logger = logging.getLogger("pico_hf.training")


def training_arguments(config: PicoTrainingConfig, run: RunLayout) -> TrainingArguments:
    """pico-train's settings as TrainingArguments, then the `training_arguments` block on top."""
    fabric, optimization = config.training.fabric, config.training.optimization
    use_cpu = fabric.accelerator == "cpu" or not torch.cuda.is_available()
    mixed, _ = PRECISIONS[fabric.precision]
    if use_cpu and mixed != "no":
        mixed = "no"  # CPU runs train in float32; mixed precision is a GPU setting
    values: dict[str, Any] = dict(
        output_dir=str(run.checkpoints_dir),
        max_steps=config.training.max_steps,
        gradient_accumulation_steps=optimization.gradient_accumulation_steps,
        learning_rate=optimization.lr,
        lr_scheduler_type="linear",
        warmup_steps=optimization.lr_warmup_steps,
        optim="adamw_torch",
        weight_decay=0.01,  # torch.optim.AdamW's default, which pico-train uses
        max_grad_norm=no_clipping(),
        seed=config.training.seed,
        bf16=mixed == "bf16",
        fp16=mixed == "fp16",
        use_cpu=use_cpu,
        logging_steps=config.monitoring.logging.log_every_n_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=config.checkpointing.save_every_n_steps,
        eval_strategy="no",
        report_to=["tensorboard", *(["wandb"] if config.monitoring.save_to_wandb else [])],
        run_name=config.checkpointing.run_name,
        ignore_data_skip=True,  # the data stream is positioned exactly on resume
        remove_unused_columns=False,
        dataloader_num_workers=0,
        include_num_input_tokens_seen=True,
        ddp_find_unused_parameters=False,
        disable_tqdm=False,
    )
    check_training_arguments(config.training_arguments)
    values.update(config.training_arguments)
    args = TrainingArguments(**values)
    # training.fabric.precision decides: an accelerate config's `mixed_precision` reaches TrainingArguments
    # through ACCELERATE_MIXED_PRECISION and would otherwise autocast a `32-true` run (or a CPU run).
    args.mixed_precision = mixed
    return args


def resolve_device(config: PicoTrainingConfig) -> str | None:
    """Record in the config what will actually run: CUDA asked for on a machine without it trains on CPU in
    float32. Returns a one-line notice when the config was changed."""
    fabric = config.training.fabric
    if fabric.accelerator == "cpu" or torch.cuda.is_available():
        return None
    asked = f"{fabric.accelerator} / {fabric.precision}"
    fabric.accelerator = "cpu"
    if PRECISIONS[fabric.precision][0] != "no":
        fabric.precision = "32-true"  # CPU runs train in float32; mixed precision is a GPU setting
    return f"training.fabric asks for {asked} but CUDA is not available: training on cpu / {fabric.precision}"


def apply_wandb_settings(config: PicoTrainingConfig) -> None:
    """monitoring.wandb.project / entity reach W&B through the environment its Trainer integration reads."""
    wandb = config.monitoring.wandb
    if config.monitoring.save_to_wandb:
        if wandb.project:
            os.environ["WANDB_PROJECT"] = wandb.project
        if wandb.entity:
            os.environ["WANDB_ENTITY"] = wandb.entity


# The keys that shape the learning-rate schedule, besides ReLoRA's.
SCHEDULE_KEYS = ("training.max_steps", "training.optimization.lr", "training.optimization.lr_warmup_steps")


def learning_rate_at(config: PicoTrainingConfig, step: int) -> float:
    """The learning rate optimizer step `step` (1-based, as the log counts) trains with: linear decay after a
    linear warmup, as `lr_scheduler_type="linear"`, or ReLoRA's jagged cosine."""
    training, optimization = config.training, config.training.optimization
    max_steps, warmup = training.max_steps, optimization.lr_warmup_steps
    step -= 1  # the schedules count the steps taken before this one
    if training.relora.enabled:
        from .relora import jagged_cosine

        relora = training.relora
        multiplier = jagged_cosine(
            step,
            max_steps=max_steps,
            warmup_steps=warmup,
            reset_frequency=relora.reset_frequency,
            restart_warmup_steps=relora.restart_warmup_steps,
            min_lr_ratio=relora.min_lr_ratio,
            warm_start_steps=relora.warm_start_steps,
        )
    elif step < warmup:
        multiplier = step / max(1, warmup)
    else:
        multiplier = max(0.0, (max_steps - step) / max(1, max_steps - warmup))
    return optimization.lr * multiplier


def schedule_change(saved: PicoTrainingConfig, config: PicoTrainingConfig, step: int) -> str | None:
    """One line when resuming after `step` with other schedule settings than the run had: the keys that
    changed and the learning rate's jump (the schedule is recomputed from the new settings). Step `step + 1`
    still trains with the rate the checkpoint's optimizer holds; the recomputed schedule sets the next one's."""
    changed = step + 2
    if changed > config.training.max_steps:
        return None
    before, after = learning_rate_at(saved, changed), learning_rate_at(config, changed)
    if math.isclose(before, after, rel_tol=1e-9, abs_tol=0.0):
        return None
    old, new = saved.to_dict(), config.to_dict()

    def value(tree: dict[str, Any], key: str) -> Any:
        for part in key.split("."):
            tree = tree[part]
        return tree

    keys = [*SCHEDULE_KEYS, *(f"training.relora.{name}" for name in new["training"]["relora"])]
    changes = ", ".join(
        f"{key} {value(old, key)!r} -> {value(new, key)!r}"
        for key in keys
        if value(old, key) != value(new, key)
    )
    return (
        f"resuming after step {step} with {changes}: the learning-rate schedule is recomputed, the rate of "
        f"step {changed} goes from {before:.4g} to {after:.4g}"
    )


def build_model(config: PicoTrainingConfig, tokenizer: Any) -> PicoDecoderForCausalLM:
    fields = {f.name: getattr(config.model, f.name) for f in dataclasses.fields(config.model)}
    fields.pop("model_type")
    model_config = PicoDecoderConfig(
        **fields,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    set_seed(config.training.seed)  # identical initial weights for every process count and restart
    model = PicoDecoderForCausalLM(model_config)
    _, dtype = PRECISIONS[config.training.fabric.precision]
    return model.to(getattr(torch, dtype))


def check_data_fits(config: PicoTrainingConfig, stream: PretokenizedStream) -> None:
    """A global batch must fit in the dataset (a smaller one would repeat sequences within a batch)."""
    batch = config.data.dataloader.batch_size
    if stream.num_sequences is not None and stream.num_sequences < batch:
        raise ConfigError(
            f"Dataset '{stream.name}' holds {stream.num_sequences} sequences of {stream.max_seq_len} tokens, "
            f"fewer than one global batch (data.dataloader.batch_size={batch}): lower the batch size or use "
            "a larger dataset"
        )


def capture_bytes(config: PicoTrainingConfig, model: torch.nn.Module, num_processes: int) -> int:
    """Host memory the `train` split of one learning-dynamics capture holds: the whole global batch's token ids
    and, per captured module, one output row per sequence (gathered on every process), its weights and
    gradients."""
    from ..learning_dynamics.capture import find_layers

    layers = find_layers(model, config.checkpointing.learning_dynamics.layer_suffixes)
    batch = config.data.dataloader.batch_size
    ids = batch * (config.model.max_seq_len + 1) * 8 * 2  # recorded, then gathered
    outputs = sum(batch * m.weight.shape[0] * 4 * 2 for m in layers.values())
    tensors = sum(m.weight.numel() * 4 * 2 for m in layers.values())
    return (ids + outputs) * num_processes + tensors


def check_capture_fits(config: PicoTrainingConfig, needed: int, available: int | None = None) -> None:
    """Refuse up front a learning-dynamics capture that would not fit in host memory (half of it, leaving the
    rest to training)."""
    if available is None:
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if needed > available // 2:
        raise ConfigError(
            f"Learning-dynamics capture would hold about {needed / 2**30:.1f} GiB per checkpoint (the `train` "
            f"split keeps the whole global batch), more than half of this machine's {available / 2**30:.1f} GiB. "
            "Shrink data.dataloader.batch_size or checkpointing.learning_dynamics.layer_suffixes, or turn "
            "capture off with checkpointing.learning_dynamics.layer_suffixes=[]"
        )


def check_run_dir_writable(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write_test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as error:
        raise ConfigError(f"Run directory {run_dir} is not writable: {error}") from error


def tokens_per_step(config: PicoTrainingConfig) -> int:
    return config.data.dataloader.batch_size * config.model.max_seq_len


def format_duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.1f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def probe_step_seconds(
    model: torch.nn.Module, config: PicoTrainingConfig, micro_batch: int, lengths: tuple[int, int] = (32, 256)
) -> float:
    """Seconds one optimizer step would take here, from timed forward passes of two lengths: their difference
    gives the cost per token, the rest is the fixed cost of a forward pass, paid once per micro-batch. A backward
    pass costs about two forwards. Eval mode, no gradients, its own random generator: the run's weights,
    gradients and random state are untouched."""
    short, long = (min(config.model.max_seq_len, length) for length in lengths)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(config.model.vocab_size, (1, long), generator=generator)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(input_ids=ids[:, :short])  # the first call pays one-time costs

            def timed(length: int) -> float:
                start = time.perf_counter()
                model(input_ids=ids[:, :length])
                return time.perf_counter() - start

            short_seconds, long_seconds = timed(short), timed(long)
    finally:
        model.train(was_training)
    per_token = max(0.0, long_seconds - short_seconds) / max(1, long - short)
    fixed = max(0.0, short_seconds - per_token * short)
    micro_tokens = micro_batch * config.model.max_seq_len
    accumulation = config.training.optimization.gradient_accumulation_steps
    return 3 * accumulation * (fixed + per_token * micro_tokens)


# A run estimated to take longer than this on CPU is called sized for a GPU.
GPU_SIZED_SECONDS = 3600


def cpu_estimate(config: PicoTrainingConfig, step_seconds: float) -> str:
    """How long a config written for CUDA takes on this CPU, and what to lower when that is hours."""
    steps = config.training.max_steps
    estimate = (
        f"timed forward passes put a step of {tokens_per_step(config):,} tokens at about "
        f"{format_duration(step_seconds)} here, the {steps} steps at about {format_duration(step_seconds * steps)}"
    )
    if step_seconds * steps < GPU_SIZED_SECONDS:
        return estimate
    return (
        f"this config is sized for a GPU: {estimate}; for a CPU run lower data.dataloader.batch_size, "
        "model.max_seq_len or training.max_steps"
    )


class DurationEstimate(TrainerCallback):
    """After the first step of a start, one line: how long the step took and the rest of the run at that pace."""

    def __init__(self) -> None:
        self.started: float | None = None
        self.done = False

    def on_step_begin(self, args, state, control, **kwargs):
        if self.started is None:
            self.started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self.done or self.started is None:
            return
        self.done = True
        seconds = time.perf_counter() - self.started
        left = state.max_steps - state.global_step
        if state.is_world_process_zero and left > 0:
            from tqdm.auto import tqdm

            tqdm.write(
                f"Step {state.global_step} took {format_duration(seconds)}: the {left} steps left take about "
                f"{format_duration(seconds * left)} at that pace (checkpoints and evaluation not counted)",
                file=sys.stderr,
            )


class PicoProgressCallback(ProgressCallback):
    """The Trainer's progress bar; per-component learning-dynamics values go to the log files and TensorBoard,
    not the console, which shows how many were logged."""

    def __init__(self) -> None:
        super().__init__()
        # This callback comes last, so values other callbacks log in `on_train_begin` (the step-0 held-out
        # loss) arrive before its bar exists: they are shown once it does. None once training has begun.
        self.early_logs: list[dict[str, Any]] | None = []

    def on_train_begin(self, args, state, control, **kwargs):
        super().on_train_begin(args, state, control, **kwargs)
        early, self.early_logs = self.early_logs or [], None
        for logs in early:
            self.on_log(args, state, control, logs=logs, **kwargs)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.early_logs is not None and state.is_world_process_zero:
            self.early_logs.append(dict(logs or {}))
            return
        component_values = [key for key in logs or {} if key.startswith("learning_dynamics/")]
        if component_values:
            logs = {
                k: v
                for k, v in logs.items()
                if k not in component_values and k not in ("epoch", "num_input_tokens_seen")
            }
            logs = {
                f"learning_dynamics (step {state.global_step})": f"{len(component_values)} values",
                **logs,
            }
        super().on_log(args, state, control, logs=logs, **kwargs)


class LogLastStep(TrainerCallback):
    """Log the last step too, so the summary's final loss is the run's (e.g. `max_steps=2` with logging
    every 10 steps logs steps 1 and 2)."""

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == state.max_steps:
            control.should_log = True


class MetricsFileCallback(TrainerCallback):
    """Every log line also goes to `logs/metrics.jsonl`, one JSON object per line, on the main process."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_train_begin(self, args, state, control, **kwargs):
        # A resumed run replays the steps after its checkpoint: drop their rows so each step has one.
        if state.is_world_process_zero and self.path.exists():
            kept = [
                line
                for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= state.global_step
            ]
            tmp = self.path.with_name(f".{self.path.name}.tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, self.path)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            with self.path.open("a") as handle:
                handle.write(json.dumps({"step": state.global_step, **logs}) + "\n")


def setup_logging(run: RunLayout, level: str, is_main: bool) -> Path | None:
    """pico-train's log file, `logs/log_<time>.log`: `log_console` copies every console line into it."""
    if not is_main:
        return None
    path = run.logs_dir / f"log_{datetime.now().strftime('%Y%m%d_%H%M%S')}.log"
    if not any(isinstance(h, logging.StreamHandler) and h.stream is sys.stderr for h in logger.handlers):
        console = logging.StreamHandler(sys.stderr)
        console.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(console)
    logger.setLevel(level.upper())
    return path


@dataclass
class TrainingJob:
    config: PicoTrainingConfig
    trainer: PicoTrainer
    run: RunLayout
    resume_from: Path | None
    log_file: Path | None
    lock: RunLock | None = None
    schedule_notice: str | None = None  # how resuming changes the learning rate, if it does


@dataclass
class CompleteRun:
    """A run started again after it reached `training.max_steps`: nothing to do."""

    run: RunLayout
    step: int
    is_main: bool


def build_job(
    config: PicoTrainingConfig, extra_callbacks: list[TrainerCallback] | None = None
) -> TrainingJob | CompleteRun:
    """Everything a run needs, with every input checked before the first step."""
    run = RunLayout(
        config.run_dir,
        config.checkpointing.checkpoints_dir,
        config.checkpointing.logs_dir,
        config.checkpointing.fabric_checkpoint_dir,
    )
    device_notice = resolve_device(config)
    apply_wandb_settings(config)
    args = training_arguments(config, run)
    is_main = args.process_index == 0
    # Nothing is written before these checks: a finished run stays as it is, and two runs never mix.
    check_existing_run(config, run.checkpoints_dir)
    schedule_notice = None
    if config.checkpointing.training.auto_resume:
        latest = run.latest_checkpoint()
        step = finished_step(latest, run.state_dirname, config.training.max_steps)
        if step is not None:
            return CompleteRun(run, step, is_main)
        saved = saved_config(run.run_dir) if latest is not None else None
        if saved is not None:
            schedule_notice = schedule_change(saved, config, checkpoint_step(latest, run.state_dirname))
    lock = None
    if is_main:
        check_run_dir_writable(run.run_dir)
        lock = RunLock(run.run_dir).acquire()
    try:
        job = _build_job(config, run, args, extra_callbacks, device_notice)
        job.schedule_notice = schedule_notice
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    job.lock = lock
    return job


def _build_job(
    config: PicoTrainingConfig,
    run: RunLayout,
    args: TrainingArguments,
    extra_callbacks: list[TrainerCallback] | None,
    device_notice: str | None,
) -> TrainingJob:
    is_main = args.process_index == 0
    if is_main:
        run.checkpoints_dir.mkdir(parents=True, exist_ok=True)
    log_file = setup_logging(run, config.monitoring.logging.log_level, is_main)

    # Every input is checked before the first step, and every problem found is reported together: a check
    # that fails records its problem and the next one still runs.
    problems = Problems()
    layout = None
    with problems.check():
        layout = BatchLayout(
            global_batch=config.data.dataloader.batch_size,
            gradient_accumulation_steps=config.training.optimization.gradient_accumulation_steps,
            num_processes=args.world_size,
            process_index=args.process_index,
        )
        args.per_device_train_batch_size = layout.micro_batch
    if config.monitoring.save_to_wandb and (problem := wandb_problem()):
        problems.add(problem)
    hub_callbacks: list[TrainerCallback] = []
    with problems.check():
        hub_callbacks = build_hub_callbacks(config, run)  # fails fast when pushes could not work
    tokenizer = load_tokenizer(config.data.tokenizer.name)
    if len(tokenizer) > config.model.vocab_size:
        problems.add(
            f"Tokenizer '{config.data.tokenizer.name}' has {len(tokenizer)} tokens but model.vocab_size is "
            f"{config.model.vocab_size}: the model cannot embed every token"
        )
    if config.data.tokenizer.vocab_size != config.model.vocab_size:
        problems.add(
            f"data.tokenizer.vocab_size ({config.data.tokenizer.vocab_size}) and model.vocab_size "
            f"({config.model.vocab_size}) must agree"
        )
    stream = None
    with problems.check():
        stream = PretokenizedStream(
            config.data.dataset.name,
            config.model.max_seq_len,
            config.model.vocab_size,
            config.data.dataset.streaming,
            seed=config.training.seed if config.data.dataloader.shuffle else None,
        )
        check_data_fits(config, stream)
    model = build_model(config, tokenizer)
    if config.checkpointing.learning_dynamics.layer_suffixes:
        with problems.check():
            check_capture_fits(config, capture_bytes(config, model, args.world_size))
    mode = build_mode(config)  # the enabled research mode (pico_hf.training.modes), or None
    if mode is not None and layout is not None:
        with problems.check():
            model = mode.prepare_model(
                model, tokenizer=tokenizer, micro_batch=layout.micro_batch, world_size=args.world_size
            )
    learning_dynamics_callbacks, evaluation_callbacks = [], []
    with problems.check():
        learning_dynamics_callbacks = build_learning_dynamics_callbacks(config, run)
    with problems.check():
        evaluation_callbacks = build_evaluation_callbacks(config, run)
    problems.raise_any()
    assert layout is not None and stream is not None  # both were built, or a problem was raised
    if device_notice and is_main:  # a config written for CUDA, training on CPU: say how long it will take
        step_seconds = probe_step_seconds(model, config, layout.micro_batch)
        logger.info("Note: %s; %s", device_notice, cpu_estimate(config, step_seconds))
    mode_callbacks = mode.callbacks() if mode is not None else []

    resume_from = None
    if is_main:
        run.remove_partial_checkpoints()
        remove_leftovers(run.checkpoints_dir)
    if config.checkpointing.training.auto_resume:
        resume_from = run.latest_checkpoint()

    # Order matters: learning dynamics and evaluation add to each checkpoint before it is published; the Hub
    # publisher pushes it once it is complete.
    heldout = build_heldout_callbacks(config, run)
    callbacks: list[TrainerCallback] = [
        LogLastStep(),
        *mode_callbacks,  # first: their values join each log before it is written
        DurationEstimate(),
        MetricsFileCallback(run.logs_dir / "metrics.jsonl"),
        *hub_early_uploads(hub_callbacks),  # the weights upload while the checkpoint is still being evaluated
        *learning_dynamics_callbacks,
        *evaluation_callbacks,
        *heldout,
        *build_card_callbacks(config, run),  # README.md of each checkpoint, before it is pushed
        *hub_callbacks,
    ]
    if "tensorboard" in args.report_to and is_main:
        from torch.utils.tensorboard import SummaryWriter

        args.report_to = [r for r in args.report_to if r != "tensorboard"]
        callbacks.append(TensorBoardCallback(SummaryWriter(log_dir=str(run.logs_dir / "tensorboard"))))
    trainer = PicoTrainer(
        model=model,
        args=args,
        processing_class=tokenizer,
        train_sequences=training_sequences(stream, layout),
        run=run,
        mode=mode,
        lr_multiplier=optimization_lr_multiplier(
            config.training.optimization, config.training.max_steps, config.training.relora
        ),
        callbacks=callbacks + list(extra_callbacks or []),
    )
    for callback in heldout:
        callback.bind(trainer)  # its values join the trainer's log
    trainer.remove_callback(ProgressCallback)
    if not args.disable_tqdm:
        trainer.add_callback(PicoProgressCallback())
    if is_main:
        write_config(config, run.run_dir)  # what this run trains with, once every input checked out
    return TrainingJob(config, trainer, run, resume_from, log_file)


def end_process_group() -> None:
    """Leave the process group together at the end of a multi-process launch (a no-op otherwise).

    Left to interpreter exit, one process can finish while another still tears down its gloo connections,
    and that one aborts ("terminate called without an active exception"), failing a finished run."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def run_training(
    config: PicoTrainingConfig,
    notes: list[str] | None = None,
    extra_callbacks: list[TrainerCallback] | None = None,
) -> dict[str, Any]:
    """Train (resuming if a checkpoint exists and auto_resume is on) and return a summary."""
    transformers.logging.set_verbosity_warning()
    transformers.logging.disable_progress_bar()  # "Writing model shards" would break the training bar
    new = [p for p in [config.run_dir, *config.run_dir.parents] if not p.exists()]  # made by this start
    try:
        job = build_job(config, extra_callbacks)
    except BaseException:
        if new and int(os.environ.get("RANK", "0")) == 0:
            shutil.rmtree(new[-1], ignore_errors=True)  # a start that fails leaves nothing behind
        raise
    if isinstance(job, CompleteRun):
        message = (
            f"Run '{job.run.run_dir.name}' is complete (step {job.step} of {config.training.max_steps}). "
            "Nothing to do."
        )
        if job.is_main:
            print(message, flush=True)
        return {"run_dir": str(job.run.run_dir), "steps": job.step, "complete": True, "message": message}
    try:
        with log_console(job.log_file), interrupts_end_cleanly(job.trainer):
            return _train(job, config, notes)
    finally:
        if job.lock is not None:
            job.lock.release()


def _train(job: TrainingJob, config: PicoTrainingConfig, notes: list[str] | None) -> dict[str, Any]:
    trainer, run = job.trainer, job.run
    is_main = trainer.args.process_index == 0
    if is_main:
        for note in notes or []:
            logger.info("Note: %s", note)
        stream = trainer.train_sequences.stream
        logger.info(
            "Training %s (%.1fM parameters) on '%s' (%s sequences of %d tokens) for %d steps, global batch %d "
            "= %d process%s x %d accumulation x %d, %s tokens per step",
            run.run_dir.name,
            trainer.model.num_parameters() / 1e6,
            stream.name,
            stream.num_sequences if stream.num_sequences is not None else "streamed",
            stream.max_seq_len,
            config.training.max_steps,
            config.data.dataloader.batch_size,
            trainer.args.world_size,
            "" if trainer.args.world_size == 1 else "es",
            trainer.args.gradient_accumulation_steps,
            trainer.args.per_device_train_batch_size,
            f"{tokens_per_step(config):,}",
        )
        if job.resume_from is not None:
            logger.info("Resuming from %s", job.resume_from)
        if job.schedule_notice:
            logger.info("Note: %s", job.schedule_notice)
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=str(job.resume_from) if job.resume_from else None)
    summary = summarize(job, time.perf_counter() - start)
    if is_main:
        logger.info(format_summary(summary))
    error = trainer.train_sequences.data_error
    if error is not None:
        raise DataError(
            f"{error}. Training stopped after step {summary['steps']} (checkpoint: "
            f"{summary['latest_checkpoint']}); fix or replace the data and start the run again to resume"
        ) from error
    push_error = hub_push_error(trainer)
    if push_error is not None:  # training finished and is saved; only the upload is incomplete
        raise push_error
    return summary


def summarize(job: TrainingJob, seconds: float) -> dict[str, Any]:
    losses = [(entry["step"], entry["loss"]) for entry in job.trainer.state.log_history if "loss" in entry]
    latest = job.run.latest_checkpoint()
    return {
        "run_dir": str(job.run.run_dir),
        "steps": job.trainer.state.global_step,
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        "checkpoints": sorted(
            (p.name for p in job.run.checkpoints_dir.glob("step_*")), key=lambda n: int(n[5:])
        ),
        "latest_checkpoint": str(job.run.checkpoints_dir / latest.name) if latest else None,  # as run_dir
        "log_file": str(job.log_file) if job.log_file else None,
        "tensorboard": str(job.run.logs_dir / "tensorboard"),
        "seconds": round(seconds, 1),
        "resumed_from": str(job.resume_from) if job.resume_from else None,
        "hub": hub_summary(job.trainer),
    }


def format_summary(summary: dict[str, Any]) -> str:
    def loss(entry: tuple[int, float] | None) -> str:
        return "n/a" if entry is None or not math.isfinite(entry[1]) else f"{entry[1]:.3f} (step {entry[0]})"

    checkpoints = summary["checkpoints"]
    shown = (
        ", ".join(checkpoints)
        if len(checkpoints) <= 6
        else f"{', '.join(checkpoints[:3])}, ..., {checkpoints[-1]}"
    )
    return "\n".join(
        [
            "",
            f"Finished {summary['steps']} steps in {summary['seconds']:.0f}s"
            + (f" (resumed from {summary['resumed_from']})" if summary["resumed_from"] else ""),
            f"  loss:        {loss(summary['first_loss'])} -> {loss(summary['final_loss'])}",
            f"  run:         {summary['run_dir']}",
            f"  checkpoints: {shown}  (latest: {summary['latest_checkpoint']})",
            f"  logs:        {summary['log_file']}",
            f"  tensorboard: tensorboard --logdir {summary['tensorboard']}",
            *([f"  hub:         {summary['hub']}"] if summary.get("hub") else []),
        ]
    )
