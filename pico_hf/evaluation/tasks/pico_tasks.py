"""Data loaders and document processing for pico-hf's lm-eval tasks.

The offline tasks read copies that ship with the repository (`pico_hf/evaluation/data/`, built by `tools/build_eval_data.py`)
and the embedded held-out corpus of the `pico_hf` package, so they run without the Hugging Face Hub.
Prompts and preprocessing are lm-eval's own: HellaSwag documents go through the installed
`lm_eval/tasks/hellaswag/utils.py`, so `pico_hellaswag` and lm-eval's `hellaswag` score the same requests.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import datasets

DATA_DIR = Path(__file__).resolve().parents[1] / "data"


class _NoMetadataNotice(logging.Filter):
    """lm-eval warns, once per task, that a task loading its data with `custom_dataset` takes kwargs from
    `--metadata`. These loaders take none: the notice is dropped for pico tasks, also under the `lm_eval` CLI
    (which imports this file when it reads the tasks)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith("pico_") and "Custom kwargs can be passed to `--metadata`" in message)


_task_logger = logging.getLogger("lm_eval.api.task")
if not any(isinstance(f, _NoMetadataNotice) for f in _task_logger.filters):
    _task_logger.addFilter(_NoMetadataNotice())


def _parquet(filename: str, split: str) -> datasets.DatasetDict:
    path = DATA_DIR / filename
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing; rebuild the offline evaluation data with tools/build_eval_data.py"
        )
    return datasets.DatasetDict({split: datasets.Dataset.from_parquet(str(path))})


def load_hellaswag(**kwargs: Any) -> datasets.DatasetDict:
    """HellaSwag's validation split (10,042 rows), as `Rowan/hellaswag` serves it."""
    return _parquet("hellaswag_validation.parquet", "validation")


def load_arc_easy(**kwargs: Any) -> datasets.DatasetDict:
    """ARC-Easy's validation split (570 rows), as `allenai/ai2_arc` (`ARC-Easy`) serves it."""
    return _parquet("arc_easy_validation.parquet", "validation")


def load_embedded_paloma(**kwargs: Any) -> datasets.DatasetDict:
    """The held-out split of pico-hf's embedded corpus: one document per row (`text`, `source`, `input_ids`),
    in the `pico-lm/pretokenized-paloma` layout."""
    from pico_hf.assets import CORPUS_DIR

    files = sorted(str(path) for path in (CORPUS_DIR / "validation").glob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"{CORPUS_DIR / 'validation'} holds no parquet files")
    return datasets.DatasetDict({"val": datasets.Dataset.from_parquet(files)})


def process_hellaswag(dataset: datasets.Dataset) -> datasets.Dataset:
    """lm-eval's own HellaSwag preprocessing (query, choices, gold)."""
    from lm_eval.tasks.hellaswag.utils import process_docs

    return process_docs(dataset)


def doc_to_text_target(doc: dict[str, Any]) -> str:
    """The document scored by `loglikelihood_rolling` (as lm-eval's Paloma tasks do)."""
    return str(doc["text"])
