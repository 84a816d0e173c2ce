"""Reading a run's evaluation results, `eval_results/step_N.json`, as series by step."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

_STEP = re.compile(r"^step_(\d+)(?:\.json)?$")

Series = dict[int, float]  # step -> value


def _flatten_numbers(tree: Mapping[str, Any], prefix: str = "") -> tuple[dict[str, float], str | None]:
    values: dict[str, float] = {}
    dataset = None
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, bool):
            continue
        if isinstance(value, (int, float)):
            values[name] = float(value)
        elif isinstance(value, Mapping):
            sub, sub_dataset = _flatten_numbers(value, name + "/")
            values.update(sub)
            dataset = dataset or sub_dataset
        elif key == "dataset" and isinstance(value, str):
            dataset = value
    return values, dataset


def read_eval_results(results_dir: Path) -> tuple[dict[str, Series], dict[str, str]]:
    """Every numeric value of `step_N.json` as {name: {step: value}}, and {name: dataset} where named."""
    series: dict[str, Series] = {}
    datasets: dict[str, str] = {}
    if not results_dir.is_dir():
        return series, datasets
    for path in results_dir.iterdir():
        match = _STEP.match(path.name)
        if not match or not path.is_file():
            continue
        values, dataset = _flatten_numbers(json.loads(path.read_text()))
        for name, value in values.items():
            series.setdefault(name, {})[int(match[1])] = value
            if dataset and "/" not in name:  # `dataset` names the perplexity's texts, not a task's scores
                datasets[name] = dataset
    return {name: dict(sorted(by_step.items())) for name, by_step in sorted(series.items())}, datasets
