"""Perplexity as the published pico models report it (the `pico-lm/perplexity` metric pico-train uses).

Every text is tokenized without special tokens and truncated to `max_length` tokens; its perplexity is
exp(mean next-token NLL over its real tokens, the first token predicting nothing), and the reported value is
the unweighted mean of the per-text perplexities (not exp of the corpus NLL). These are the semantics of
`pico-lm/perplexity` (evaluate's classic perplexity metric with `add_start_token=False`), so values here are
comparable with the `eval_results/step_N.json` files of the published runs.

One implementation serves the in-training evaluation callback (on the live model) and `eval/run.py --paloma`;
the `evaluate` metric module in `eval/metrics/perplexity` is a standalone copy (an `evaluate` module cannot
import pico_hf), kept equal to this one by `tests/test_eval_perplexity.py`:

    result = compute_perplexity(model, tokenizer, texts, max_length=2048, batch_size=16)
    result.mean_perplexity, result.perplexities

Batches are padded on the right (causal attention keeps real tokens blind to padding), formed from texts
sorted by length, and cut into row chunks so that no forward holds more than `max_logits_elements`
float32 logits: a 2048-token batch of 16 at the OLMo vocabulary would otherwise need 6.6 GB at once.
"""

from __future__ import annotations

import glob
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..hub_access import hub_reachable

logger = logging.getLogger(__name__)

EMBEDDED = "embedded"
# The name a perplexity is recorded and logged under: `paloma` (pico-train's field) for a Paloma-layout dataset
# the run named, and its own name for pico-hf's embedded held-out split, so a stand-in never reads as Paloma.
EMBEDDED_METRIC = "embedded_heldout_perplexity"
TEXT_COLUMN = "text"
# Float32 logits held by one forward pass: 2**28 elements = 1 GiB.
MAX_LOGITS_ELEMENTS = 2**28


@dataclass
class PerplexityResult:
    perplexities: list[float]
    mean_perplexity: float

    def to_dict(self) -> dict[str, list[float] | float]:
        return {"perplexities": self.perplexities, "mean_perplexity": self.mean_perplexity}


def encode_texts(
    tokenizer,
    texts: Sequence[str],
    max_length: int | None = None,
    add_start_token: bool = False,
) -> list[list[int]]:
    """Token ids per text: no special tokens, truncated to `max_length` (including the start token, if any).

    Every text must keep at least two tokens (one to condition on, one to predict)."""
    if isinstance(texts, str):
        raise TypeError("texts must be a sequence of strings, not a single string")
    start: list[int] = []
    if add_start_token:
        if tokenizer.bos_token_id is None:
            raise ValueError(
                f"add_start_token=True needs a tokenizer with a bos token, and {type(tokenizer).__name__} "
                f"({tokenizer.name_or_path}) has none; pico models are evaluated with add_start_token=False"
            )
        start = [tokenizer.bos_token_id]
    if max_length is not None and max_length < 2:
        raise ValueError(f"max_length must be at least 2 tokens, got {max_length}")
    limit = max_length - len(start) if max_length is not None else None
    encoded = tokenizer(
        list(texts), add_special_tokens=False, truncation=limit is not None, max_length=limit
    )["input_ids"]
    token_ids = [start + ids for ids in encoded]
    for index, ids in enumerate(token_ids):
        if len(ids) < 2:
            raise ValueError(
                f"Text {index} ({texts[index][:50]!r}) has {len(ids)} token(s); perplexity needs at least two "
                "(one to predict from, one to predict). Remove empty or one-token texts"
                + ("." if add_start_token else ", or pass add_start_token=True.")
            )
    return token_ids


def plan_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Text indices per batch: longest texts first, so padding is small and the largest batch comes first."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def _model_device(model: torch.nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _vocab_size(model: torch.nn.Module) -> int:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and getattr(head, "weight", None) is not None and head.weight.dim() == 2:
        return head.weight.shape[0]
    return int(model.config.vocab_size)


@torch.no_grad()
def row_nlls(
    model: torch.nn.Module,
    rows: Sequence[Sequence[int]],
    pad_token_id: int = 0,
    max_logits_elements: int = MAX_LOGITS_ELEMENTS,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Next-token NLLs of rows of token ids, right-padded into one batch and run in as many forwards as keep the
    logits under `max_logits_elements`: yields (nll, mask), each (b, T-1), per forward."""
    device = _model_device(model)
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)
        attention_mask[i, : len(row)] = 1
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)

    rows_per_forward = max(1, max_logits_elements // (width * _vocab_size(model)))
    for start in range(0, len(rows), rows_per_forward):
        ids = input_ids[start : start + rows_per_forward]
        mask = attention_mask[start : start + rows_per_forward]
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits  # (b, T, V)
        shift_logits = logits[:, :-1].float()
        nll = F.cross_entropy(
            shift_logits.reshape(-1, shift_logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none"
        ).view(ids.shape[0], -1)  # (b, T-1)
        del logits, shift_logits
        yield nll, mask[:, 1:]


@torch.no_grad()
def batch_perplexities(
    model: torch.nn.Module,
    rows: Sequence[Sequence[int]],
    pad_token_id: int = 0,
    max_logits_elements: int = MAX_LOGITS_ELEMENTS,
) -> list[float]:
    """exp(mean NLL of tokens 2..n) for each row of token ids, in one right-padded batch."""
    perplexities: list[float] = []
    for nll, mask in row_nlls(model, rows, pad_token_id, max_logits_elements):
        shift_mask = mask.to(nll.dtype)
        perplexities += torch.exp((nll * shift_mask).sum(1) / shift_mask.sum(1)).tolist()
    return perplexities


def text_perplexities(
    model: torch.nn.Module,
    token_ids: Sequence[Sequence[int]],
    batch_size: int = 16,
    pad_token_id: int = 0,
    process_index: int = 0,
    num_processes: int = 1,
    max_logits_elements: int = MAX_LOGITS_ELEMENTS,
) -> dict[int, float]:
    """{text index: perplexity} for this process's share of the texts.

    Batches are planned over all texts, then dealt out round-robin; every process runs the same number of
    forward passes (a process short of work repeats a batch and drops the result), so sharded models
    (FSDP, ZeRO-3), whose forwards are collective, stay in step."""
    batches = plan_batches([len(ids) for ids in token_ids], batch_size)
    if not batches:
        return {}
    mine = batches[process_index::num_processes]
    rounds = math.ceil(len(batches) / num_processes)
    results: dict[int, float] = {}
    for round_index in range(rounds):
        batch = mine[round_index] if round_index < len(mine) else batches[0]
        values = batch_perplexities(model, [token_ids[i] for i in batch], pad_token_id, max_logits_elements)
        if round_index < len(mine):
            results.update(zip(batch, values, strict=True))
    return results


def mean_perplexity(perplexities: Sequence[float]) -> float:
    """The reported value: the unweighted mean of per-text perplexities (numpy's mean, as pico-lm/perplexity)."""
    return float(np.mean(perplexities))


def compute_perplexity(
    model: torch.nn.Module,
    tokenizer,
    texts: Sequence[str],
    max_length: int | None = None,
    batch_size: int = 16,
    add_start_token: bool = False,
    max_logits_elements: int = MAX_LOGITS_ELEMENTS,
) -> PerplexityResult:
    """Per-text and mean perplexity of `model` on `texts` (pico-lm/perplexity semantics), in eval mode under
    no_grad; the model's train/eval mode is restored afterwards."""
    token_ids = encode_texts(tokenizer, texts, max_length, add_start_token)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    was_training = model.training
    model.eval()
    try:
        by_index = text_perplexities(
            model, token_ids, batch_size, pad, max_logits_elements=max_logits_elements
        )
    finally:
        model.train(was_training)
    perplexities = [by_index[i] for i in range(len(token_ids))]
    return PerplexityResult(perplexities, mean_perplexity(perplexities))


def is_hub_dataset(name: str) -> bool:
    """A Hub dataset id ("owner/name"): not "embedded", not an existing local path, not path-shaped."""
    if name == EMBEDDED or Path(name).expanduser().exists():
        return False
    return not name.startswith((".", "/", "~")) and name.count("/") == 1 and not glob.has_magic(name)


def perplexity_metric_name(dataset: str) -> str:
    """`embedded_heldout_perplexity` for the embedded split, else `paloma` (the dataset is recorded beside it)."""
    return EMBEDDED_METRIC if dataset == EMBEDDED else "paloma"


def resolve_dataset(name: str, warn: bool = True) -> str:
    """`name`, or "embedded" (with a one-line warning) when it is a Hub dataset and the Hub is unreachable."""
    if is_hub_dataset(name) and not hub_reachable():
        if warn:
            logger.warning(
                "Evaluation dataset '%s' is on the Hugging Face Hub, which is unreachable: using the embedded "
                "held-out split instead, recorded as '%s', not as Paloma",
                name,
                EMBEDDED_METRIC,
            )
        return EMBEDDED
    return name


def load_texts(
    name: str, split: str = "val", max_samples: int | None = None, key: str = "evaluation.paloma.dataset_name"
) -> list[str]:
    """The `text` column of an evaluation set in the `pico-lm/pretokenized-paloma` layout: a Hub id, a local
    path, or "embedded" (pico-hf's held-out split); the first `max_samples` rows when given."""
    from ..training.data import open_pretokenized

    if max_samples is not None and max_samples < 1:
        raise ValueError(f"max_samples must be positive or None, got {max_samples}")
    dataset = open_pretokenized(name, split, key=key)
    columns = dataset.column_names
    if columns is None:  # a streamed dataset without declared features: read the first row's keys
        columns = list(next(iter(dataset), {}))
    if TEXT_COLUMN not in columns:
        raise ValueError(f"Evaluation dataset '{name}' has no '{TEXT_COLUMN}' column (columns: {columns})")
    dataset = dataset.select_columns([TEXT_COLUMN])
    if max_samples is not None:
        dataset = dataset.take(max_samples)
    texts = [row[TEXT_COLUMN] for row in dataset]
    if not texts:
        raise ValueError(f"Evaluation dataset '{name}' (split '{split}') is empty")
    return texts


__all__ = [
    "EMBEDDED",
    "EMBEDDED_METRIC",
    "PerplexityResult",
    "batch_perplexities",
    "compute_perplexity",
    "encode_texts",
    "load_texts",
    "mean_perplexity",
    "perplexity_metric_name",
    "plan_batches",
    "resolve_dataset",
    "text_perplexities",
]
