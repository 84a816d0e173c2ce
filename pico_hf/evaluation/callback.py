"""Evaluation at every checkpoint of a training run, as pico-train does it.

`evaluation.metrics` (default `["paloma"]`) lists what runs at each checkpoint; `[]` (or null) turns it off.
`paloma` is the perplexity the published pico models report (`pico_hf.evaluation.perplexity`: mean over
texts of each text's perplexity) on `evaluation.paloma.dataset_name` (a Hub id, a local path, or
"embedded" for pico-hf's held-out split; a Hub dataset that cannot be reached falls back to the embedded
split with a one-line warning at start).

Results go to `runs/<run>/<checkpointing.evaluation.eval_results_dir>/step_N.json`, written atomically by the
main process, with the dataset actually measured: `{"paloma": 41.2, "dataset": "pico-lm/pretokenized-paloma-tinsy"}`
(pico-train's field, plus `dataset`) for a Paloma-layout dataset, and `{"embedded_heldout_perplexity": 41.2,
"dataset": "embedded"}` for the embedded split, so a stand-in never reads as Paloma. Values are logged the way
transformers' own evaluation logs them, `eval_<name>` (trackers show `eval/<name>`), and `on_evaluate` fires
with them, so `metric_for_best_model` (e.g. `eval_paloma`, with `greater_is_better: false`) and callbacks such as early stopping see them.

The live model is evaluated (no reload from disk), in eval mode under no_grad; its train/eval mode, its
gradients and the global RNG states (python, numpy, torch, CUDA) are left exactly as they were, so a run
resumed from a checkpoint reproduces an uninterrupted one bit for bit. With several processes, every
process scores its share of the texts and the results are gathered, so a sharded model (FSDP, ZeRO-3)
works as well as a replicated one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ..training.config import ConfigError, PicoTrainingConfig
from ..training.trainer import CheckpointContributor, RunLayout
from .perplexity import (
    encode_texts,
    load_texts,
    mean_perplexity,
    perplexity_metric_name,
    resolve_dataset,
    text_perplexities,
)

logger = logging.getLogger(__name__)

PALOMA = "paloma"
SUPPORTED_METRICS = (PALOMA,)


@contextlib.contextmanager
def isolated_evaluation(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode under no_grad; afterwards the model's mode and every global RNG state are as they were."""
    was_training = model.training
    python_state, numpy_state = random.getstate(), np.random.get_state()
    torch_state = torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)
        random.setstate(python_state)
        np.random.set_state(numpy_state)
        torch.set_rng_state(torch_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)


def write_results(path: Path, results: dict[str, float]) -> None:
    """Write `step_N.json` whole or not at all: a temporary file in the same folder, then a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as handle:
        json.dump(results, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


class EvaluationCallback(CheckpointContributor):
    """Runs `evaluation.metrics` on the live model at every checkpoint; see the module docstring."""

    def __init__(
        self,
        metrics: list[str],
        token_ids: list[list[int]],
        results_dir: Path,
        batch_size: int,
        pad_token_id: int = 0,
        dataset_name: str = "",
    ) -> None:
        self.metrics = metrics
        self.token_ids = token_ids  # the evaluation texts, tokenized and truncated once
        self.results_dir = Path(results_dir)
        self.batch_size = batch_size
        self.pad_token_id = pad_token_id
        self.dataset_name = dataset_name
        # (step, seconds) of every evaluation this process ran: what evaluation costs the run.
        self.timings: list[tuple[int, float]] = []

    def paloma(self, model: torch.nn.Module, args: TrainingArguments) -> float:
        mine = text_perplexities(
            model,
            self.token_ids,
            self.batch_size,
            self.pad_token_id,
            process_index=args.process_index,
            num_processes=args.world_size,
        )
        if args.world_size > 1:
            from accelerate.utils import gather_object

            merged: dict[int, float] = {}
            for shard in gather_object([mine]):
                merged.update(shard)
            mine = merged
        return mean_perplexity([mine[i] for i in range(len(self.token_ids))])

    def evaluate(self, model: torch.nn.Module, args: TrainingArguments) -> dict[str, Any]:
        """What `step_N.json` holds: each metric's value under the name that says what it measured, and the
        perplexity's dataset."""
        results: dict[str, Any] = {}
        with isolated_evaluation(model):
            for metric in self.metrics:
                if metric == PALOMA:
                    results[perplexity_metric_name(self.dataset_name)] = self.paloma(model, args)
                    results["dataset"] = self.dataset_name
        return results

    def on_checkpoint(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: torch.nn.Module | None = None,
        trainer: Any = None,
        **kwargs: Any,
    ):
        start = time.perf_counter()
        results = self.evaluate(model, args)
        self.timings.append((state.global_step, time.perf_counter() - start))
        if state.is_world_process_zero:
            write_results(self.results_dir / f"step_{state.global_step}.json", results)
        if trainer is not None:
            report(trainer, results)


def report(trainer: Any, results: dict[str, Any]) -> None:
    """Log the numbers as `eval_<name>` (what transformers' TensorBoard/W&B integrations file under `eval/`),
    keep the best metric, and fire `on_evaluate`, as `Trainer.evaluate` does."""
    metrics = {f"eval_{name}": value for name, value in results.items() if isinstance(value, (int, float))}
    trainer.log(dict(metrics))  # log adds epoch and tokens seen to the dict it gets
    if trainer.args.metric_for_best_model is not None:
        trainer._determine_best_metric(metrics=metrics, trial=None)
    trainer.control = trainer.callback_handler.on_evaluate(
        trainer.args, trainer.state, trainer.control, metrics
    )


def check_evaluation_config(config: PicoTrainingConfig) -> list[str]:
    """The metrics to run (empty: evaluation is off), after checking the `evaluation` section."""
    metrics = list(config.evaluation.metrics or [])
    for metric in metrics:
        if metric not in SUPPORTED_METRICS:
            raise ConfigError(
                f"evaluation.metrics: unknown metric '{metric}'; supported: {', '.join(SUPPORTED_METRICS)} "
                "(lm-eval tasks run on saved checkpoints with eval/run.py)"
            )
    if not metrics:
        return []
    paloma = config.evaluation.paloma
    if paloma.max_length > config.model.max_seq_len:
        raise ConfigError(
            f"evaluation.paloma.max_length ({paloma.max_length}) is longer than model.max_seq_len "
            f"({config.model.max_seq_len}); set evaluation.paloma.max_length={config.model.max_seq_len}"
        )
    if paloma.max_length < 2:
        raise ConfigError(f"evaluation.paloma.max_length must be at least 2, got {paloma.max_length}")
    if paloma.batch_size < 1:
        raise ConfigError(f"evaluation.paloma.batch_size must be positive, got {paloma.batch_size}")
    if paloma.max_samples is not None and paloma.max_samples < 1:
        raise ConfigError(f"evaluation.paloma.max_samples must be positive or null, got {paloma.max_samples}")
    return metrics


def build_evaluation_callbacks(config: PicoTrainingConfig, run: RunLayout) -> list[TrainerCallback]:
    """The evaluation callback for a run, or none when `evaluation.metrics` is empty; the evaluation data is
    loaded here, so a bad dataset fails before the first step."""
    metrics = check_evaluation_config(config)
    if not metrics:
        return []
    from accelerate import PartialState

    from ..tokenization import load_tokenizer

    paloma = config.evaluation.paloma
    name = resolve_dataset(paloma.dataset_name, warn=PartialState().is_main_process)
    try:
        texts = load_texts(name, paloma.dataset_split, paloma.max_samples)
        tokenizer = load_tokenizer(config.data.tokenizer.name)
        token_ids = encode_texts(tokenizer, texts, paloma.max_length)
    except ValueError as error:  # includes ConfigError from the data loader
        raise ConfigError(f"evaluation.paloma (dataset '{name}'): {error}") from error
    return [
        EvaluationCallback(
            metrics,
            token_ids,
            run.run_dir / config.checkpointing.evaluation.eval_results_dir,
            paloma.batch_size,
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
            name,
        )
    ]


__all__ = [
    "EvaluationCallback",
    "build_evaluation_callbacks",
    "check_evaluation_config",
    "isolated_evaluation",
    "write_results",
]
