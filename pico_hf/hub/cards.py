"""Model cards: the Hub README.md of the suite models and of every checkpoint a run writes.

Cards are rendered by huggingface_hub (`ModelCard.from_template` with `ModelCardData` and `EvalResult`, so the
YAML metadata and the `model-index` are huggingface_hub's own) from the Jinja template beside this file,
`model_card_template.md`, and from facts only: the resolved config, the parameter count of the architecture,
the trainer state saved with the checkpoint and the evaluation results measured during the run. Nothing is
shown that was not measured.

    python -m pico_hf.hub.cards suite            # model_cards/pico-decoder-{tiny,small,medium,large}/README.md
    python -m pico_hf.hub.cards run runs/<run>   # README.md of every checkpoint of a local run
    python -m pico_hf.hub.cards run runs/<run> --analysis analysis_results/<name>   # the last one shows its plots

During training, `ModelCardCallback` writes `README.md` into each checkpoint as soon as it is complete, so it
is part of the `Saving HF Model -- Step N` commit when the run is pushed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from transformers import TrainerControl, TrainerState, TrainingArguments

from ..models.pico_decoder import PicoDecoderConfig, PicoDecoderForCausalLM
from ..training.config import ConfigError, load_config
from ..training.trainer import CheckpointContributor

TEMPLATE = Path(__file__).with_name("model_card_template.md")
SUITE = ("tiny", "small", "medium", "large")
SUITE_ORG = "pico-lm"
CARD_FILE = "README.md"
TAGS = ["pico", "pico-decoder", "learning-dynamics", "causal-lm"]
ANALYSIS_REPO_DIR = "analysis"  # an analysis goes in the repo under analysis/<analysis_name>/
DESCRIPTION_KEYS = ("dataset", "dataset_split")  # fields of eval_results/step_N.json that are not metrics
SUITE_SUMMARY = (
    "pico-decoder-{size} is one of the four decoders of the [Pico](https://github.com/pico-lm) suite, trained "
    "with the same recipe and data at four sizes to study how language models learn. The published repo's "
    "`main` holds the final checkpoint; its run branches hold every checkpoint with the learning-dynamics "
    "data captured at it. This card describes the recipe (`{config}`); it shows no evaluation numbers, since "
    "none were measured by this project."
)
NO_SUITE_EVALUATION = (
    "No evaluation numbers are given here: none were measured by this project. The Paloma perplexity of each "
    "checkpoint is in `eval_results/step_N.json` on the run branches."
)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _human_count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit} ({n:,})"
    return str(n)


def architecture(model: dict[str, Any]) -> dict[str, Any]:
    """The architecture table's values from a `model:` config section, with the parameter count computed
    from the config (weights on the meta device: nothing is allocated)."""
    fields = {k: v for k, v in model.items() if k not in ("model_type", "batch_size")}
    with torch.device("meta"):
        parameters = PicoDecoderForCausalLM(PicoDecoderConfig(**fields)).num_parameters()
    kv_heads = fields.get("attention_n_kv_heads") or fields.get("attention_n_heads")
    return {**fields, "attention_n_kv_heads": kv_heads, "parameters": _human_count(parameters)}


def training_recipe(tree: dict[str, Any]) -> list[tuple[str, str]]:
    """Rows of the recipe table from a resolved training config (as `PicoTrainingConfig.to_dict()`)."""
    data, model, training = tree["data"], tree["model"], tree["training"]
    optimization = training["optimization"]
    tokens_per_step = data["dataloader"]["batch_size"] * model["max_seq_len"]
    rows = [
        ("data", f"`{data['dataset']['name']}`"),
        ("tokenizer", f"`{data['tokenizer']['name']}`"),
        ("global batch", f"{data['dataloader']['batch_size']} sequences x {model['max_seq_len']} tokens"),
        ("steps", f"{training['max_steps']:,} ({training['max_steps'] * tokens_per_step:,} tokens)"),
        ("optimizer", f"{optimization['optimizer']}, learning rate {_fmt(optimization['lr'])}"),
        (
            "schedule",
            f"{optimization['lr_scheduler']}, {optimization['lr_warmup_steps']:,} warmup steps",
        ),
        ("precision", str(training["fabric"]["precision"])),
        ("seed", str(training.get("seed", "n/a"))),
        ("checkpoint every", f"{tree['checkpointing']['save_every_n_steps']:,} steps"),
    ]
    return rows


@dataclass(frozen=True)
class EvalData:
    """The data an evaluation measured, as the `model-index` names it: a Hub id (`type`) where the data has one,
    its config and split; `hub_id` None for local data, which is named without one."""

    name: str
    hub_id: str | None = None
    config: str | None = None
    split: str | None = None

    @property
    def type(self) -> str:
        return self.hub_id or LOCAL_DATASET_TYPE


# The model-index requires a dataset `type`, normally a Hub id; local data gets this instead (no Hub id has it).
LOCAL_DATASET_TYPE = "local"
# lm-eval tasks (pico-hf's `pico_*` copies score the same rows as lm-eval's own) and the Hub data they read.
LM_EVAL_DATA = {
    "arc_easy": EvalData("ARC-Easy", "allenai/ai2_arc", "ARC-Easy", "test"),
    "pico_arc_easy": EvalData("ARC-Easy", "allenai/ai2_arc", "ARC-Easy", "validation"),
    "hellaswag": EvalData("HellaSwag", "Rowan/hellaswag", split="validation"),
    "pico_hellaswag": EvalData("HellaSwag", "Rowan/hellaswag", split="validation"),
    "blimp": EvalData("BLiMP", "nyu-mll/blimp", split="train"),
    "pico_blimp": EvalData("BLiMP", "nyu-mll/blimp", split="train"),
    "pico_paloma": EvalData("pico-hf embedded held-out split"),
}
PALOMA_HUB_ID = "allenai/paloma"  # lm-eval's paloma_<source> tasks
# A group's sub-tasks (e.g. BLiMP's 67) go in the card one by one only when there are at most this many;
# otherwise the group's aggregate stands for them (every score stays in eval_results/step_N.json).
MAX_SUBTASKS_IN_CARD = 8


def perplexity_data(dataset: str) -> EvalData:
    """The data of the perplexity metric: the configured Paloma set (a Hub id), or local data (the embedded
    held-out split, a local folder) named without a Hub id."""
    if dataset == "embedded":
        return EvalData("pico-hf embedded held-out split")
    if _is_hub_id(dataset):
        return EvalData(dataset, dataset)
    return EvalData(Path(dataset).name or dataset)


def lm_eval_data(task: str) -> EvalData:
    """The data an lm-eval task (or one of its sub-tasks) reads; an unknown task is named as itself, locally."""
    if task in LM_EVAL_DATA:
        return LM_EVAL_DATA[task]
    for group in ("pico_blimp", "blimp"):
        if task.startswith(f"{group}_"):  # a BLiMP sub-task is a config of the BLiMP dataset
            sub = task.removeprefix(f"{group}_")
            return EvalData(f"BLiMP {sub}", "nyu-mll/blimp", sub, "train")
    if task.startswith("paloma_"):
        source = task.removeprefix("paloma_")
        return EvalData(f"Paloma {source}", PALOMA_HUB_ID, source, "val")
    return EvalData(task)


def _card_scores(results: dict[str, Any]) -> list[tuple[str, str, float]]:
    """(task, metric, value) of every lm-eval score to show: all of them, except the sub-tasks of a group with
    more than MAX_SUBTASKS_IN_CARD of them (the group's aggregate stands for those)."""
    tasks = {name: value for name, value in results.items() if isinstance(value, dict)}
    groups = {name: [t for t in tasks if t.startswith(f"{name}_")] for name in tasks}
    hidden = {t for subtasks in groups.values() if len(subtasks) > MAX_SUBTASKS_IN_CARD for t in subtasks}
    return [
        (task, metric, value)
        for task, metrics in tasks.items()
        if task not in hidden
        for metric, value in metrics.items()
        if _is_score(value)
    ]


def _is_score(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def read_evaluation(path: Path, default_dataset: str | None) -> list[EvalResult]:
    """`eval_results/step_N.json` as `model-index` entries. Every numeric top-level field is a perplexity,
    measured on the file's `dataset` field when it has one, else on `default_dataset` (the configured Paloma
    set); every lm-eval score (`{task: {metric: value}}`) is `task/metric`, on the data the task reads
    (BLiMP: the group's aggregate, and its sub-tasks only when there are few)."""
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ConfigError(f"{path} is not a JSON evaluation result: {error}") from error
    if not isinstance(results, dict):
        raise ConfigError(f"{path} holds {type(results).__name__}, expected a JSON object of metrics")
    measured_on = perplexity_data(str(results.get("dataset") or default_dataset or "unknown"))
    if results.get("dataset_split"):
        measured_on = EvalData(
            measured_on.name, measured_on.hub_id, measured_on.config, results["dataset_split"]
        )
    scores = [
        (measured_on, name, "perplexity" if "perplexity" in name or name == "paloma" else name, value)
        for name, value in results.items()
        if name not in DESCRIPTION_KEYS and _is_score(value)
    ]
    scores += [
        (lm_eval_data(task), f"{task}/{metric}", metric, value)
        for task, metric, value in _card_scores(results)
    ]
    return [
        EvalResult(
            task_type="text-generation",
            dataset_type=data.type,
            dataset_name=data.name,
            dataset_config=data.config,
            dataset_split=data.split,
            metric_type=metric_type,
            metric_name=name,
            metric_value=round(float(value), 4),
        )
        for data, name, metric_type, value in scores
    ]


def _card_data(model_name: str, datasets: list[str], evaluations: list[EvalResult]) -> ModelCardData:
    return ModelCardData(
        model_name=model_name,
        language="en",
        license="apache-2.0",
        library_name="transformers",
        pipeline_tag="text-generation",
        datasets=[d for d in datasets if _is_hub_id(d)] or None,
        tags=list(TAGS),
        eval_results=evaluations or None,
    )


def _is_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not Path(name).exists()


def _render(data: ModelCardData, **facts: Any) -> ModelCard:
    # ModelCardData moves model_name into the model-index when there are eval results: the title needs it too.
    return ModelCard.from_template(data, template_path=str(TEMPLATE), model_name=data.model_name, **facts)


def suite_card(config_path: Path) -> ModelCard:
    """The card of one suite model, from its training config (e.g. recipes/configs/pico-decoder-tiny.yaml)."""
    config, _ = load_config(config_path)
    tree = config.to_dict()
    name = str(config.checkpointing.run_name)
    size = name.removeprefix("pico-decoder-")
    return _render(
        _card_data(name, [config.data.dataset.name], []),
        summary=SUITE_SUMMARY.format(size=size, config=f"recipes/configs/{Path(config_path).name}"),
        arch=architecture(tree["model"]),
        recipe=training_recipe(tree),
        progress=None,
        evaluations=[],
        no_evaluation=NO_SUITE_EVALUATION,
        load_id=f"{SUITE_ORG}/{name}",
        revision_arg="",
        learning_dynamics=(
            "Each checkpoint of the run branches carries the activations, weights and gradients of the "
            "configured layers on a fixed training batch and on a held-out batch "
            "(`learning_dynamics/{train,val}_*`), committed as `Saving Learning Dynamics Data (<split>) -- Step "
            "N`."
        ),
        ld_files=[],
        analysis=None,
        analyze_repo=f"{SUITE_ORG}/{name}",
        analyze_branch=f"{name}-1",
    )


def write_suite_cards(configs_dir: Path, out_dir: Path) -> list[Path]:
    """Render `out_dir/pico-decoder-<size>/README.md` for every suite size; returns the paths written."""
    written = []
    for size in SUITE:
        card = suite_card(Path(configs_dir) / f"pico-decoder-{size}.yaml")
        path = Path(out_dir) / f"pico-decoder-{size}" / CARD_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(str(card))
        written.append(path)
    return written


# --- an analysis of the run (recipes/analyze.py's output folder) -------------------------------------------


@dataclass(frozen=True)
class Analysis:
    """An analysis folder written by `recipes/analyze.py` (`<output_dir>/<analysis_name>/`) with its plots."""

    folder: Path
    name: str
    steps: tuple[int, ...]
    plots: tuple[Path, ...]  # plots/<metric>_<split>.png

    @property
    def repo_dir(self) -> str:
        return f"{ANALYSIS_REPO_DIR}/{self.name}"

    def in_repo(self, path: Path) -> str:
        return f"{self.repo_dir}/{path.relative_to(self.folder).as_posix()}"


def read_analysis(folder: Path) -> Analysis:
    """The analysis in `folder`; an error names the folder when it is not one or has no plots."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(
            f"{folder} is not an analysis folder (recipes/analyze.py writes <output_dir>/<analysis_name>/)"
        )
    plots = tuple(sorted((folder / "plots").glob("*.png")))
    if not plots:
        raise ConfigError(
            f"{folder} holds no plots (plots/*.png): run recipes/analyze.py on the run without --no_report"
        )
    steps = sorted(
        int(match[1])
        for entry in folder.iterdir()
        if entry.is_dir() and (match := re.fullmatch(r"step_(\d+)", entry.name))
    )
    return Analysis(folder, folder.name, tuple(steps), plots)


def _analysis_facts(analysis: Analysis | None) -> dict[str, Any] | None:
    if analysis is None:
        return None
    return {
        "name": analysis.name,
        "steps": ", ".join(map(str, analysis.steps)) or "none",
        "report": f"{analysis.repo_dir}/report.md"
        if (analysis.folder / "report.md").is_file()
        else f"{analysis.repo_dir}/",
        "plots": [(path.stem, analysis.in_repo(path)) for path in analysis.plots],
    }


# --- the card of a run's checkpoint -----------------------------------------------------------------------


def _saved_tree(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "training_config.yaml"
    if not path.is_file():
        raise ConfigError(f"{path} does not exist: a model card is rendered from the run's resolved config")
    config, _ = load_config(path)  # fills defaults the file may lack, with the run's own values
    return config.to_dict()


def _progress(step_dir: Path, tree: dict[str, Any], state_dirname: str, step: int) -> dict[str, Any]:
    tokens = step * tree["data"]["dataloader"]["batch_size"] * tree["model"]["max_seq_len"]
    loss, lr = "n/a", "n/a"
    state_file = step_dir / state_dirname / "trainer_state.json"
    if state_file.is_file():
        history = json.loads(state_file.read_text()).get("log_history", [])
        logged = [entry for entry in history if "loss" in entry and entry.get("step", 0) <= step]
        if logged:
            loss = f"{logged[-1]['loss']:.4f} (step {logged[-1]['step']})"
            lr = _fmt(logged[-1].get("learning_rate", "n/a"))
    return {
        "step": f"{step:,}",
        "max_steps": f"{tree['training']['max_steps']:,}",
        "tokens": f"{tokens:,}",
        "loss": loss,
        "learning_rate": lr,
    }


def checkpoint_card(
    run_dir: Path,
    step: int,
    repo_id: str | None = None,
    branch: str | None = None,
    analysis: Analysis | None = None,
) -> ModelCard:
    """The card of checkpoint `step_N` of a run, from what the run has on disk; with `analysis`, the card
    also shows its plots, linked where the analysis goes in the repo (`analysis/<name>/plots/`)."""
    run_dir = Path(run_dir)
    tree = _saved_tree(run_dir)
    checkpointing = tree["checkpointing"]
    name = str(checkpointing["run_name"] or run_dir.name)
    repo_id = repo_id or checkpointing["hf_checkpoint"].get("repo_id") or None
    branch = branch or name
    step_dir = run_dir / checkpointing["checkpoints_dir"] / f"step_{step}"
    eval_file = run_dir / checkpointing["evaluation"]["eval_results_dir"] / f"step_{step}.json"
    evaluations = (
        read_evaluation(eval_file, tree["evaluation"]["paloma"]["dataset_name"])
        if eval_file.is_file()
        else []
    )
    ld_dir = step_dir / checkpointing["learning_dynamics_dir"]
    ld_files = (
        sorted(
            f"{ld_dir.name}/{p.relative_to(ld_dir).as_posix()}"
            for p in ld_dir.iterdir()
            if not p.name.startswith(".")
        )
        if ld_dir.is_dir()
        else []
    )
    # Loaded from the Hub (the run's branch) when the run has a repo, else from the checkpoint's own folder.
    load_id = repo_id or step_dir.as_posix()
    return _render(
        _card_data(name, [tree["data"]["dataset"]["name"]], evaluations),
        summary=(
            f"Checkpoint `step_{step}` of the pico-decoder run `{name}`, trained with "
            "[pico-hf](https://github.com/pico-lm). Every checkpoint of the run is a commit series on the "
            f"`{branch}` branch (`Saving HF Model -- Step N`, ...); the repo's `main` holds the final model."
        ),
        arch=architecture(tree["model"]),
        recipe=training_recipe(tree),
        progress=_progress(step_dir, tree, checkpointing["fabric_checkpoint_dir"], step),
        evaluations=evaluations,
        no_evaluation="No evaluation was run at this checkpoint.",
        load_id=load_id,
        revision_arg=f', revision="{branch}"' if repo_id else "",
        learning_dynamics=(
            "This checkpoint's activations, weights and gradients of the configured layers "
            f"(`{checkpointing['learning_dynamics_dir']}/`) are committed as `Saving Learning Dynamics Data "
            f"(<split>) -- Step {step}`."
            if ld_files
            else "No learning-dynamics data was captured at this checkpoint."
        ),
        ld_files=ld_files,
        analysis=_analysis_facts(analysis),
        analyze_repo=repo_id or "<repo_id>",
        analyze_branch=branch,
    )


def write_checkpoint_card(
    run_dir: Path,
    step: int,
    repo_id: str | None = None,
    branch: str | None = None,
    analysis: Analysis | None = None,
) -> Path:
    """Write `step_N/README.md` whole or not at all (a temporary file, then a rename)."""
    run_dir = Path(run_dir)
    checkpoints = _saved_tree(run_dir)["checkpointing"]["checkpoints_dir"]
    path = run_dir / checkpoints / f"step_{step}" / CARD_FILE
    text = str(checkpoint_card(run_dir, step, repo_id, branch, analysis))
    fd, tmp = tempfile.mkstemp(prefix=".README.", dir=path.parent)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.replace(tmp, path)
    return path


class ModelCardCallback(CheckpointContributor):
    """Writes README.md into each checkpoint once it is complete (main process), before it is pushed."""

    def __init__(self, run_dir: Path, repo_id: str | None, branch: str) -> None:
        self.run_dir, self.repo_id, self.branch = Path(run_dir), repo_id, branch

    def on_checkpoint_published(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        checkpoint_dir: Path | None = None,
        **kwargs: Any,
    ):
        if not state.is_world_process_zero or checkpoint_dir is None:
            return
        step = int(Path(checkpoint_dir).name.removeprefix("step_"))
        write_checkpoint_card(self.run_dir, step, self.repo_id, self.branch)


def build_card_callbacks(config: Any, run: Any) -> list[ModelCardCallback]:
    checkpointing = config.checkpointing
    return [
        ModelCardCallback(
            run.run_dir, checkpointing.hf_checkpoint.repo_id or None, str(checkpointing.run_name)
        )
    ]


# --- the card of a Llama export (python -m pico_hf.convert to-llama) ---------------------------------------


def llama_export_card(source: str, destination: Path, model: Any) -> ModelCard:
    """The README.md of a pico-decoder checkpoint converted to `LlamaForCausalLM`: where it came from, its
    shape, and how to load it with transformers alone."""
    config = model.config
    data = ModelCardData(
        language="en",
        license="apache-2.0",
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=["pico", "llama", "causal-lm"],
        base_model=source if _is_hub_id(source) else None,
    )
    kv_heads = config.num_key_value_heads or config.num_attention_heads
    text = f"""---
{data.to_yaml()}
---

# {Path(destination).name}

A `LlamaForCausalLM` converted from the pico-decoder checkpoint `{source}` with
`python -m pico_hf.convert to-llama`. The conversion is exact: pico-decoder and Llama are the same function up
to parameter names and the layout of rotary dimensions (each head's q and k rows are permuted), so the two
compute the same logits to float precision. Training recipe, evaluation and learning dynamics are described by
the source checkpoint's own card.

## Architecture

| hidden size | layers | attention heads | KV heads | intermediate size | vocabulary | context | parameters |
|---|---|---|---|---|---|---|---|
| {config.hidden_size} | {config.num_hidden_layers} | {config.num_attention_heads} | {kv_heads} | {config.intermediate_size} | {config.vocab_size} | {config.max_position_embeddings} | {_human_count(model.num_parameters())} |

## How to use

With transformers alone (no pico-hf, no remote code):

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{Path(destination).as_posix()}")
tokenizer = AutoTokenizer.from_pretrained("{Path(destination).as_posix()}")
```

Back to pico-decoder: `python -m pico_hf.convert from-llama {Path(destination).as_posix()} <output folder>`.
"""
    return ModelCard(text)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pico_hf.hub.cards", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    suite = commands.add_parser("suite", help="render the four suite cards")
    suite.add_argument("--configs", type=Path, default=Path("recipes/configs"))
    suite.add_argument("--out", type=Path, default=Path("model_cards"))
    run = commands.add_parser("run", help="render the card of every checkpoint of a local run")
    run.add_argument("run_dir", type=Path)
    run.add_argument("--repo_id", "--repo-id", dest="repo_id")
    run.add_argument("--branch")
    run.add_argument(
        "--analysis",
        type=Path,
        help="an analysis of the run (recipes/analyze.py's folder): the last card shows its plots",
    )
    args = parser.parse_args(argv)
    try:
        if args.command == "suite":
            paths = write_suite_cards(args.configs, args.out)
        else:
            from .commits import RunFolders, checkpoint_steps

            steps = checkpoint_steps(args.run_dir, RunFolders.from_run_dir(args.run_dir))
            if not steps:
                raise ConfigError(f"{args.run_dir} holds no complete checkpoint")
            analysis = read_analysis(args.analysis) if args.analysis is not None else None
            paths = [
                write_checkpoint_card(
                    args.run_dir, s, args.repo_id, args.branch, analysis if s == steps[-1] else None
                )
                for s in steps
            ]
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = [
    "Analysis",
    "ModelCardCallback",
    "architecture",
    "checkpoint_card",
    "llama_export_card",
    "read_analysis",
    "read_evaluation",
    "suite_card",
    "write_checkpoint_card",
    "write_suite_cards",
]
