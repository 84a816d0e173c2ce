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

`blimp` is lm-eval's blimp group scored by `pico_hf.evaluation.blimp` on the live model: the shipped pairs,
the first `evaluation.blimp.max_pairs_per_task` of each of the 67 sub-tasks (all 1,000 when null), sorted by
length into batches of `evaluation.blimp.batch_size` sentences, one forward each; the same per-sub-task `acc`
as lm-eval's `blimp_<uid>` tasks, at less cost (docs/performance.md). It goes to `step_N.json` as `{"blimp": {"acc": 0.61},
"blimp_adjunct_island": {"acc": 0.55}, ...}` (logged as `eval_blimp/acc`, ...); with several processes the
batches are shared out and the scores are those of one process.

Any other name in `evaluation.metrics` is an lm-eval task, group or tag (e.g. `[paloma, pico_blimp,
pico_arc_easy]`), run through `pico_hf.evaluation.harness.evaluate` on the live model (lm-eval's HFLM wraps the
model object itself: no reload, no copy of the weights), with `evaluation.lm_eval.limit` documents per task and
`evaluation.lm_eval.batch_size`. Its scores go to `step_N.json` as `{"pico_arc_easy": {"acc": 0.25, ...}}` and
are logged as `eval_pico_arc_easy/acc`. Unknown names are config errors before the first step; tasks that need
an unreachable Hub are skipped with a one-line warning at start. With several processes, every process scores
its share of each task's documents (lm-eval's data-parallel evaluation, through the process group training
already has) and process 0 broadcasts the merged scores, so every process logs the same values and they equal
a 1-process run's; a few-shot task keeps them all on process 0 (lm-eval draws each process's examples from its
own generator), the others waiting. Either way each process runs its forward passes alone: this needs a
replicated model (DDP), not a sharded one (FSDP, DeepSpeed ZeRO-3), whose forward passes must be in step
across processes.

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
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ..training.config import ConfigError, PicoTrainingConfig
from ..training.rundir import RunLayout
from ..training.trainer import CheckpointContributor
from .blimp import BLIMP, BlimpPairs, blimp_scores, load_blimp_pairs
from .perplexity import (
    encode_texts,
    load_texts,
    mean_perplexity,
    perplexity_metric_name,
    resolve_dataset,
    text_perplexities,
)

if TYPE_CHECKING:
    from .harness import TaskSelection

logger = logging.getLogger(__name__)

PALOMA = "paloma"


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
        tasks: list[str] | None = None,
        tokenizer: Any = None,
        lm_eval_limit: float | None = None,
        lm_eval_batch_size: int = 8,
        lm_eval_data_parallel: bool = True,
        blimp_pairs: BlimpPairs | None = None,
        blimp_batch_size: int = 128,
    ) -> None:
        self.metrics = metrics
        self.token_ids = token_ids  # the evaluation texts, tokenized and truncated once
        self.results_dir = Path(results_dir)
        self.batch_size = batch_size
        self.pad_token_id = pad_token_id
        self.dataset_name = dataset_name
        self.tasks = list(tasks or [])  # lm-eval tasks that can run (checked, Hub-less ones set aside)
        self.tokenizer = tokenizer
        self.lm_eval_limit = lm_eval_limit
        self.lm_eval_batch_size = lm_eval_batch_size
        # Several processes share the lm-eval documents out (faster than process 0 alone, see the README's
        # benchmarks), unless a task is few-shot: its examples would then differ from a 1-process run's.
        self.lm_eval_data_parallel = lm_eval_data_parallel
        self.blimp_pairs = blimp_pairs  # the `blimp` metric's tokenized pairs (pico_hf.evaluation.blimp)
        self.blimp_batch_size = blimp_batch_size
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
            if PALOMA in self.metrics:
                results[perplexity_metric_name(self.dataset_name)] = self.paloma(model, args)
                results["dataset"] = self.dataset_name
            if self.blimp_pairs is not None:
                results.update(self.blimp(model, args))
            if self.tasks:
                results.update(self.lm_eval(model, args))
        return results

    def blimp(self, model: torch.nn.Module, args: TrainingArguments) -> dict[str, dict[str, float]]:
        """lm-eval's blimp scores (`blimp` and `blimp_<uid>`, {"acc": ...}) from the batched scorer; every
        process scores its share of the batches and gets the merged scores."""
        return blimp_scores(
            model,
            self.blimp_pairs,
            self.blimp_batch_size,
            self.pad_token_id,
            process_index=args.process_index,
            num_processes=args.world_size,
        )

    def lm_eval(self, model: torch.nn.Module, args: TrainingArguments) -> dict[str, dict[str, float]]:
        """{task: {metric: value}}, the same on every process. With several processes and
        `lm_eval_data_parallel`, every process scores its share of each task's documents and lm-eval merges
        them on process 0; otherwise process 0 scores them all while the others wait. Either way process 0
        broadcasts the scores."""
        from .harness import evaluate

        data_parallel = args.world_size > 1 and self.lm_eval_data_parallel
        scores = [None]
        if data_parallel or args.process_index == 0:
            report = evaluate(
                model,
                self.tokenizer,
                self.tasks,
                limit=self.lm_eval_limit,
                batch_size=self.lm_eval_batch_size,
                bootstrap_iters=0,  # no stderr: it would cost more than the evaluation
                distributed=data_parallel,
            )
            scores = [report.scores()]  # empty on processes other than 0 of a data-parallel evaluation
        if args.world_size > 1:
            from accelerate.utils import broadcast_object_list

            broadcast_object_list(scores, from_process=0)  # also the barrier the other processes wait at
        return scores[0]

    def on_checkpoint(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: torch.nn.Module | None = None,
        trainer: Any = None,
        **kwargs: Any,
    ):
        sharded = trainer is not None and (trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled)
        if self.tasks and args.world_size > 1 and sharded:
            raise ConfigError(
                "evaluation.metrics: lm-eval tasks run each process's forward passes alone and need a "
                "replicated model (DDP); "
                f"with a sharded one evaluate the saved checkpoints with eval/run.py (tasks: {self.tasks})"
            )
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
    metrics: dict[str, float] = {}
    for name, value in results.items():
        if isinstance(value, dict):  # an lm-eval task's scores
            metrics.update({f"eval_{name}/{metric}": score for metric, score in value.items()})
        elif isinstance(value, (int, float)):
            metrics[f"eval_{name}"] = value
    trainer.log(dict(metrics))  # log adds epoch and tokens seen to the dict it gets
    if trainer.args.metric_for_best_model is not None:
        trainer._determine_best_metric(metrics=metrics, trial=None)
    trainer.control = trainer.callback_handler.on_evaluate(
        trainer.args, trainer.state, trainer.control, metrics
    )


def _lm_eval_selection(config: PicoTrainingConfig, warn: bool = True) -> TaskSelection:
    """The lm-eval tasks of `evaluation.metrics` and which of them can run; unknown names are config errors."""
    from .harness import EvaluationError, TaskSelection, resolve_tasks, task_manager_for

    names = [m for m in config.evaluation.metrics or [] if m not in (PALOMA, BLIMP)]
    if not names:
        return TaskSelection(runnable=[])

    lm_eval = config.evaluation.lm_eval
    if lm_eval.batch_size < 1:
        raise ConfigError(f"evaluation.lm_eval.batch_size must be positive, got {lm_eval.batch_size}")
    if lm_eval.limit is not None and lm_eval.limit <= 0:
        raise ConfigError(f"evaluation.lm_eval.limit must be positive or null, got {lm_eval.limit}")
    try:
        selection = resolve_tasks(names, task_manager_for(names))
    except EvaluationError as error:
        raise ConfigError(
            f"evaluation.metrics: {error} ('{PALOMA}' is the published perplexity, '{BLIMP}' the batched BLiMP)"
        ) from error
    for task, reason in selection.skipped.items():
        if warn:
            logger.warning("Evaluation skips %s at every checkpoint: %s", task, reason)
    return selection


def check_evaluation_config(config: PicoTrainingConfig) -> list[str]:
    """The metrics to run (empty: evaluation is off), after checking the `evaluation` section."""
    metrics, _ = _checked_evaluation(config, warn=False)
    return metrics


def check_paloma_batches(paloma: Any, max_seq_len: int, use: str = "") -> None:
    """`evaluation.paloma`'s text length and batch size, which the perplexity and the held-out curve both read;
    `use` says, in the message, what cuts its texts at `max_length`."""
    if paloma.max_length > max_seq_len:
        raise ConfigError(
            f"evaluation.paloma.max_length ({paloma.max_length}) is longer than model.max_seq_len "
            f"({max_seq_len}); {use}set evaluation.paloma.max_length={max_seq_len}"
        )
    if paloma.max_length < 2:
        raise ConfigError(f"evaluation.paloma.max_length must be at least 2, got {paloma.max_length}")
    if paloma.batch_size < 1:
        raise ConfigError(f"evaluation.paloma.batch_size must be positive, got {paloma.batch_size}")


def _checked_evaluation(config: PicoTrainingConfig, warn: bool) -> tuple[list[str], TaskSelection]:
    """The metrics to run and the lm-eval tasks among them, the `evaluation` section checked (tasks resolved
    once: indexing lm-eval's task files takes seconds)."""
    metrics = list(config.evaluation.metrics or [])
    selection = _lm_eval_selection(config, warn)
    if BLIMP in metrics:
        blimp = config.evaluation.blimp
        if blimp.max_pairs_per_task is not None and not 1 <= blimp.max_pairs_per_task <= 1000:
            raise ConfigError(
                "evaluation.blimp.max_pairs_per_task must be between 1 and 1000 (the pairs of a BLiMP sub-task) "
                f"or null, got {blimp.max_pairs_per_task}"
            )
        if blimp.batch_size < 1:
            raise ConfigError(f"evaluation.blimp.batch_size must be positive, got {blimp.batch_size}")
    if PALOMA not in metrics:
        return metrics, selection
    paloma = config.evaluation.paloma
    check_paloma_batches(paloma, config.model.max_seq_len)
    if paloma.max_samples is not None and paloma.max_samples < 1:
        raise ConfigError(f"evaluation.paloma.max_samples must be positive or null, got {paloma.max_samples}")
    return metrics, selection


def build_evaluation_callbacks(config: PicoTrainingConfig, run: RunLayout) -> list[TrainerCallback]:
    """The evaluation callback for a run, or none when `evaluation.metrics` is empty; the evaluation data is
    loaded here, so a bad dataset fails before the first step."""
    from accelerate import PartialState

    is_main = PartialState().is_main_process
    metrics, selection = _checked_evaluation(config, warn=is_main)
    if not metrics:
        return []
    from ..tokenization import load_tokenizer

    if selection.few_shot and PartialState().num_processes > 1 and is_main:
        logger.warning(
            "Evaluation runs the lm-eval tasks on process 0 alone: %s draw few-shot examples per process, "
            "so sharing their documents out would change the examples",
            ", ".join(selection.few_shot[:3]) + (" and more" if len(selection.few_shot) > 3 else ""),
        )
    tokenizer = load_tokenizer(config.data.tokenizer.name)
    paloma = config.evaluation.paloma
    name, token_ids = "", []
    if PALOMA in metrics:
        name = resolve_dataset(paloma.dataset_name, warn=is_main)
        try:
            texts = load_texts(name, paloma.dataset_split, paloma.max_samples)
            token_ids = encode_texts(tokenizer, texts, paloma.max_length)
        except ConfigError:  # the data loader's own message names evaluation.paloma.dataset_name
            raise
        except ValueError as error:
            raise ConfigError(f"evaluation.paloma (dataset '{name}'): {error}") from error
    blimp_pairs = None
    if BLIMP in metrics:
        try:
            blimp_pairs = load_blimp_pairs(tokenizer, config.evaluation.blimp.max_pairs_per_task)
        except ValueError as error:  # e.g. a tokenizer without the bos/eos token lm-eval conditions on
            raise ConfigError(f"evaluation.metrics: {BLIMP}: {error}") from error
    return [
        EvaluationCallback(
            metrics,
            token_ids,
            run.run_dir / config.checkpointing.evaluation.eval_results_dir,
            paloma.batch_size,
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
            name,
            tasks=selection.runnable,
            tokenizer=tokenizer,
            lm_eval_limit=config.evaluation.lm_eval.limit,
            lm_eval_batch_size=config.evaluation.lm_eval.batch_size,
            lm_eval_data_parallel=not selection.few_shot,
            blimp_pairs=blimp_pairs,
            blimp_batch_size=config.evaluation.blimp.batch_size,
        )
    ]


__all__ = [
    "EvaluationCallback",
    "build_evaluation_callbacks",
    "check_evaluation_config",
    "isolated_evaluation",
    "write_results",
]
