"""The held-out curve: the mean next-token loss of a fixed held-out set, every N optimizer steps.

`evaluation.heldout_every_n_steps: N` (off when null) measures, at step 0, every N-th step and the last step,
the loss of the live model (eval mode, no_grad, RNG states and train mode restored) on the first
`evaluation.heldout_max_samples` texts of the run's evaluation split (`evaluation.paloma.dataset_name` and
`dataset_split`, each text cut at `evaluation.paloma.max_length` tokens): the sum of every text's next-token
negative log-likelihoods over the number of tokens predicted (the first token of a text predicts nothing).
Unlike the training `loss`, it does not depend on the training objective (a MAML meta step logs the loss of a
masked batch), so it compares any two runs on the same data; it is a study's default primary metric.

The value is logged as `eval_heldout_loss` (console, log file, `metrics.jsonl`, TensorBoard/W&B under
`eval/heldout_loss`) and kept in `<eval_results_dir>/heldout_loss.json`:

    {"dataset": "embedded", "split": "val", "texts": 16, "max_length": 64, "loss": {"0": 10.83, "10": 7.91}}

Batches are planned over all texts and dealt out to the processes round-robin, each batch holding the same
texts whatever the number of processes, and the per-text sums are added up in text order in float64: 1 and 2
processes log the same values, and a resumed run logs the values of an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ..training.config import ConfigError, PicoTrainingConfig
from ..training.rundir import RunLayout
from .callback import check_paloma_batches, isolated_evaluation, write_results
from .perplexity import MAX_LOGITS_ELEMENTS, encode_texts, load_texts, plan_batches, resolve_dataset, row_nlls

logger = logging.getLogger(__name__)

HELDOUT_METRIC = "heldout_loss"  # logged as eval_heldout_loss
HELDOUT_FILE = "heldout_loss.json"


@torch.no_grad()
def batch_nll_sums(
    model: torch.nn.Module,
    rows: Sequence[Sequence[int]],
    pad_token_id: int = 0,
    max_logits_elements: int = MAX_LOGITS_ELEMENTS,
) -> list[tuple[float, int]]:
    """(sum of next-token NLLs, tokens predicted) for each row of token ids, in one right-padded batch."""
    sums: list[tuple[float, int]] = []
    for nll, mask in row_nlls(model, rows, pad_token_id, max_logits_elements):
        totals = (nll * mask.to(nll.dtype)).sum(1).tolist()
        sums += list(zip(totals, mask.sum(1).tolist(), strict=True))
    return sums


def heldout_loss(
    model: torch.nn.Module,
    token_ids: Sequence[Sequence[int]],
    batch_size: int,
    pad_token_id: int = 0,
    process_index: int = 0,
    num_processes: int = 1,
) -> float:
    """Mean next-token NLL over every predicted token of `token_ids`; every process must call it (the
    processes' shares are gathered), and every process gets the same value."""
    batches = plan_batches([len(ids) for ids in token_ids], batch_size)
    mine = batches[process_index::num_processes]
    per_text: dict[int, tuple[float, int]] = {}
    # Every process runs the same number of forward passes (one short of work repeats a batch and drops the
    # result), so a sharded model's collective forwards stay in step.
    for round_index in range(math.ceil(len(batches) / num_processes)):
        batch = mine[round_index] if round_index < len(mine) else batches[0]
        sums = batch_nll_sums(model, [token_ids[i] for i in batch], pad_token_id)
        if round_index < len(mine):
            per_text.update(zip(batch, sums, strict=True))
    if num_processes > 1:
        from accelerate.utils import gather_object

        merged: dict[int, tuple[float, int]] = {}
        for shard in gather_object([per_text]):
            merged.update(shard)
        per_text = merged
    total = math.fsum(per_text[i][0] for i in range(len(token_ids)))
    count = sum(per_text[i][1] for i in range(len(token_ids)))
    return total / count


class HeldoutLossCallback(TrainerCallback):
    """Logs `eval_heldout_loss` at step 0, every `every_n_steps` steps and the last step; see the module
    docstring. `bind(trainer)` gives it the trainer whose log the value joins."""

    def __init__(
        self,
        every_n_steps: int,
        token_ids: list[list[int]],
        path: Path,
        batch_size: int,
        pad_token_id: int,
        description: dict[str, Any],
    ) -> None:
        self.every_n_steps = every_n_steps
        self.token_ids = token_ids
        self.path = Path(path)
        self.batch_size = batch_size
        self.pad_token_id = pad_token_id
        self.description = description  # dataset, split, texts, max_length: what the values measure
        self.trainer: Any = None
        self.timings: list[tuple[int, float]] = []  # (step, seconds): what the curve costs the run
        self._measured: set[int] = set()

    def bind(self, trainer: Any) -> None:
        self.trainer = trainer

    def read(self) -> dict[int, float]:
        return read_heldout_losses(self.path)

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ):
        if (
            state.is_world_process_zero and self.path.is_file()
        ):  # a resumed run measures its later steps again
            self._write({s: v for s, v in self.read().items() if s <= state.global_step})
        if state.global_step == 0:
            self.measure(args, state, kwargs["model"])

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ):
        if state.global_step % self.every_n_steps == 0 or state.global_step == state.max_steps:
            should_log = control.should_log  # logging here must not swallow this step's regular log line
            self.measure(args, state, kwargs["model"])
            control.should_log = should_log

    def measure(self, args: TrainingArguments, state: TrainerState, model: torch.nn.Module) -> float:
        start = time.perf_counter()
        with isolated_evaluation(model):
            loss = heldout_loss(
                model, self.token_ids, self.batch_size, self.pad_token_id, args.process_index, args.world_size
            )
        self.timings.append((state.global_step, time.perf_counter() - start))
        self._measured.add(state.global_step)
        if state.is_world_process_zero:
            self._write({**self.read(), state.global_step: loss})
        if self.trainer is not None:
            self.trainer.log({f"eval_{HELDOUT_METRIC}": loss})
        return loss

    def _write(self, losses: dict[int, float]) -> None:
        loss = {str(step): losses[step] for step in sorted(losses)}
        write_results(self.path, {**self.description, "loss": loss})  # type: ignore[dict-item]


def check_heldout_config(config: PicoTrainingConfig) -> None:
    """The `evaluation.heldout_*` keys, checked before anything trains."""
    evaluation = config.evaluation
    every, samples = evaluation.heldout_every_n_steps, evaluation.heldout_max_samples
    if every is None:
        return
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ConfigError(
            f"evaluation.heldout_every_n_steps must be a positive integer or null, got {every!r}"
        )
    if samples is not None and (isinstance(samples, bool) or not isinstance(samples, int) or samples < 1):
        raise ConfigError(
            f"evaluation.heldout_max_samples must be a positive integer or null, got {samples!r}"
        )
    check_paloma_batches(
        evaluation.paloma, config.model.max_seq_len, "the held-out curve cuts its texts there: "
    )


def build_heldout_callbacks(config: PicoTrainingConfig, run: RunLayout) -> list[HeldoutLossCallback]:
    """The held-out curve's callback, or none when `evaluation.heldout_every_n_steps` is null; its texts are
    loaded here, so a bad dataset fails before the first step."""
    check_heldout_config(config)
    evaluation = config.evaluation
    if evaluation.heldout_every_n_steps is None:
        return []
    from accelerate import PartialState

    from ..tokenization import load_tokenizer

    paloma = evaluation.paloma
    tokenizer = load_tokenizer(config.data.tokenizer.name)
    name = resolve_dataset(paloma.dataset_name, warn=PartialState().is_main_process)
    try:
        texts = load_texts(name, paloma.dataset_split, evaluation.heldout_max_samples)
        token_ids = encode_texts(tokenizer, texts, paloma.max_length)
    except ValueError as error:  # includes ConfigError from the data loader
        raise ConfigError(f"evaluation.heldout_every_n_steps (dataset '{name}'): {error}") from error
    description = {
        "dataset": name,
        "split": paloma.dataset_split,
        "texts": len(token_ids),
        "max_length": paloma.max_length,
    }
    return [
        HeldoutLossCallback(
            evaluation.heldout_every_n_steps,
            token_ids,
            run.run_dir / config.checkpointing.evaluation.eval_results_dir / HELDOUT_FILE,
            paloma.batch_size,
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
            description,
        )
    ]


def read_heldout_losses(path: Path) -> dict[int, float]:
    """{step: eval_heldout_loss} from a run's `heldout_loss.json` (empty when absent)."""
    if not path.is_file():
        return {}
    return {int(step): float(value) for step, value in json.loads(path.read_text())["loss"].items()}


__all__ = [
    "HELDOUT_FILE",
    "HELDOUT_METRIC",
    "HeldoutLossCallback",
    "batch_nll_sums",
    "build_heldout_callbacks",
    "check_heldout_config",
    "heldout_loss",
    "read_heldout_losses",
]
