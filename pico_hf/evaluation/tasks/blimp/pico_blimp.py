"""Loader for pico-hf's BLiMP tasks: one sub-dataset of the offline copy in `pico_hf/evaluation/data/blimp.parquet`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import datasets
import pyarrow.parquet as pq

BLIMP_FILE = Path(__file__).resolve().parents[2] / "data" / "blimp.parquet"


def load_blimp(uid: str, **kwargs: Any) -> datasets.DatasetDict:
    """The 1,000 pairs of BLiMP sub-dataset `uid`, as the Hub dataset `nyu-mll/blimp` (config `uid`) serves
    them (split `train`). Read in memory: a 67-task group would otherwise fill the `datasets` cache 67 times."""
    if not BLIMP_FILE.is_file():
        raise FileNotFoundError(
            f"{BLIMP_FILE} is missing; rebuild the offline evaluation data with tools/build_eval_data.py"
        )
    table = pq.read_table(BLIMP_FILE, filters=[("UID", "==", uid)])
    if table.num_rows == 0:
        raise ValueError(f"{BLIMP_FILE} has no BLiMP sub-dataset '{uid}'")
    return datasets.DatasetDict({"train": datasets.Dataset(table)})
