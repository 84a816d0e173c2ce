"""lm-evaluation-harness on pico checkpoints: task resolution, model loading with clear errors, and reports.

`eval/run.py` is the command line over this module:

    manager = task_manager()                         # lm-eval's tasks plus pico-hf's (TASKS_DIR)
    model, tokenizer = load_model("runs/demo/checkpoints/step_150")
    report = evaluate(model, tokenizer, ["pico_paloma", "pico_arc_easy"], manager, limit=100)
    print(report.markdown())

Tasks whose data lives on the Hugging Face Hub (lm-eval's `hellaswag`, `blimp`, `paloma_*`, pico's
`pico_paloma_tinsy`, ...) run unchanged when the Hub is reachable; otherwise they are skipped with a
one-line reason, never replaced by something else. pico-hf's offline tasks read data that ships with the
package (`pico_hf/evaluation/tasks` and `data`, installed by `pip install` too).
"""

from __future__ import annotations

import difflib
import fnmatch
import json
import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..hub_access import hub_reachable, offline_requested
from ..tokenization import OLMO_TOKENIZER_ID, load_tokenizer
from .perplexity import compute_perplexity, load_texts, perplexity_metric_name, resolve_dataset
from .tasks_dir import TASKS_DIR

logger = logging.getLogger(__name__)

PICO_TASK_PREFIX = "pico_"
PALOMA_TINSY = "pico-lm/pretokenized-paloma-tinsy"
# `datasets` builders that read local files (a task using one with local data_files needs no Hub).
_FILE_BUILDERS = {"arrow", "csv", "json", "pandas", "parquet", "text", "imagefolder", "audiofolder"}
_MODEL_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
_COUNTS = {"sample_len", "sample_count"}  # result entries that are document counts, not scores
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class EvaluationError(ValueError):
    """A problem with the requested model or tasks, reported before any evaluation work."""


# --- tasks ----------------------------------------------------------------------------------------------


class _DropNotices(logging.Filter):
    """lm-eval warnings that do not apply here: `--metadata` for tasks with a `custom_dataset` loader (ours
    take none), and a caution about passing a loaded model (we load it ourselves, on one process)."""

    NOTICES = (
        "Custom kwargs can be passed to `--metadata`",
        "`pretrained` model kwarg is not of type `str`",
        "Passed an already-initialized model through `pretrained`",
    )

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(notice in message for notice in self.NOTICES)


def task_manager(include_path: str | Path | list[str | Path] | None = None, include_defaults: bool = True):
    """lm-eval's TaskManager over its own tasks (unless `include_defaults` is False) plus pico-hf's
    (`TASKS_DIR`, package data, by default)."""
    from lm_eval.tasks import TaskManager

    for name in ("lm_eval.api.task", "lm_eval.models.huggingface"):
        lm_eval_logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNotices) for f in lm_eval_logger.filters):
            lm_eval_logger.addFilter(_DropNotices())
    if include_path is None:
        include_path = TASKS_DIR
    if isinstance(include_path, list):
        include_path = [str(p) for p in include_path]
    return TaskManager(include_path=include_path, include_defaults=include_defaults)


def task_manager_for(names: list[str], include_path: str | Path | list[str | Path] | None = None):
    """A TaskManager that knows `names`: pico-hf's tasks alone when they suffice (indexing lm-eval's
    thousands of task files takes seconds), else lm-eval's as well."""
    pico_only = task_manager(include_path, include_defaults=False)
    known = pico_only.all_tasks
    if all(
        fnmatch.filter(known, name) if any(ch in name for ch in "*?[") else name in known for name in names
    ):
        return pico_only
    return task_manager(include_path)


def pico_task_names(manager) -> list[str]:
    """pico-hf's tasks and groups, without the groups' sub-tasks (`pico_blimp`, not its 67 tasks)."""
    children = {
        child
        for group in manager.all_groups
        for child in (manager.task_index[group].cfg or {}).get("task") or []
        if isinstance(child, str)
    }
    return [name for name in manager.all_tasks if name.startswith(PICO_TASK_PREFIX) and name not in children]


def _unknown_task(name: str, manager) -> EvaluationError:
    close = difflib.get_close_matches(name, manager.all_tasks, n=3, cutoff=0.6)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return EvaluationError(
        f"Unknown task '{name}'.{hint} pico-hf tasks: {', '.join(pico_task_names(manager)) or '(none found)'}; "
        f"lm-eval knows {len(manager.all_tasks)} tasks, groups and tags in all "
        "(`python eval/run.py --list` prints them)."
    )


def _hub_dataset(config: dict[str, Any]) -> str | None:
    """The Hub dataset a task config reads, or None when its data is local (or its loader is custom)."""
    if config.get("custom_dataset") or "class" in config:
        return None
    path = config.get("dataset_path")
    if not path:
        return None
    if path in _FILE_BUILDERS:
        files = json.dumps((config.get("dataset_kwargs") or {}).get("data_files", ""))
        return path if "://" in files else None
    return None if Path(str(path)).expanduser().exists() else str(path)


def _leaf_configs(name: str, manager, seen: set[str] | None = None) -> list[tuple[str, dict[str, Any]]]:
    """(task name, raw config) of every task a task, group or tag name stands for."""
    seen = set() if seen is None else seen
    if name in seen:
        return []
    seen.add(name)
    entry = manager.task_index.get(name)
    if entry is None:
        return []
    if name in manager.all_tags:
        return [leaf for child in sorted(entry.tags) for leaf in _leaf_configs(child, manager, seen)]
    if name in manager.all_groups:
        leaves = []
        for child in (entry.cfg or {}).get("task", []):
            if isinstance(child, dict):  # an inline task, possibly overriding a registered one
                base = manager.task_index.get(child.get("task", ""))
                leaves.append((child.get("task", name), {**((base.cfg or {}) if base else {}), **child}))
            else:
                leaves += _leaf_configs(child, manager, seen)
        return leaves
    return [(name, entry.cfg or {})]


def _tag_members(tag: str, manager) -> list[str] | None:
    """A tag's tasks with every complete group among them named as the group (lm-eval's tags hold tasks,
    not groups: the `pico` tag lists the 67 `pico_blimp_*` tasks, reported as `pico_blimp` and its mean);
    None when no group is complete in the tag."""
    members = sorted(manager.task_index[tag].tags)
    out, grouped = list(members), False
    for group in manager.all_groups:
        children = (manager.task_index[group].cfg or {}).get("task") or []
        if children and all(isinstance(c, str) for c in children) and set(children) <= set(out):
            out, grouped = [m for m in out if m not in children] + [group], True
    return sorted(out) if grouped else None


@dataclass
class TaskSelection:
    runnable: list[str]
    skipped: dict[str, str] = field(default_factory=dict)  # name -> one-line reason
    # Runnable tasks with few-shot examples (`few_shot_tasks`).
    few_shot: list[str] = field(default_factory=list)


def resolve_tasks(names: list[str], manager, hub_available: bool | None = None) -> TaskSelection:
    """Check task names (globs allowed) and set aside those that need an unreachable Hub."""
    if not names:
        raise EvaluationError("No tasks given")
    expanded: list[str] = []
    for name in names:
        if any(ch in name for ch in "*?["):
            matches = fnmatch.filter(manager.all_tasks, name)
            if not matches:
                raise _unknown_task(name, manager)
            expanded += [m for m in matches if m not in expanded]
        elif name not in manager.all_tasks:
            raise _unknown_task(name, manager)
        elif name in manager.all_tags and (members := _tag_members(name, manager)) is not None:
            expanded += [m for m in members if m not in expanded]
        elif name not in expanded:
            expanded.append(name)

    hub_available = hub_reachable() if hub_available is None else hub_available
    selection = TaskSelection(runnable=[])
    for name in expanded:
        leaves = _leaf_configs(name, manager)
        needs_hub = {task: dataset for task, config in leaves if (dataset := _hub_dataset(config))}
        if hub_available or not needs_hub:
            selection.runnable.append(name)
            continue
        if name in manager.all_tags and len(needs_hub) < len(
            leaves
        ):  # a tag is just a list: run what can run
            for task, _ in leaves:
                if task in needs_hub:
                    selection.skipped[task] = _skip_reason(needs_hub[task])
                elif task not in selection.runnable:
                    selection.runnable.append(task)
            continue
        datasets = sorted(set(needs_hub.values()))
        shown = ", ".join(datasets[:3]) + (f" and {len(datasets) - 3} more" if len(datasets) > 3 else "")
        selection.skipped[name] = _skip_reason(shown)
    selection.few_shot = few_shot_tasks(selection.runnable, manager)
    return selection


def few_shot_tasks(names: list[str], manager) -> list[str]:
    """The tasks among `names` (tasks, groups or tags) whose config asks for few-shot examples. lm-eval draws
    every document's examples from one generator per process, in document order, so a document scored by
    another process than in a 1-process run gets other examples: these tasks cannot be shared out exactly."""
    found: list[str] = []
    for name in names:
        for task, config in _leaf_configs(name, manager):
            if (config.get("num_fewshot") or 0) > 0 and task not in found:
                found.append(task)
    return found


def _skip_reason(dataset: str) -> str:
    why = "offline mode is on" if offline_requested() else "the Hub is unreachable"
    return f"needs the Hugging Face Hub dataset {dataset}, and {why}"


# --- model ----------------------------------------------------------------------------------------------


def _is_hub_id(name: str) -> bool:
    return not name.startswith((".", "/", "~")) and name.count("/") <= 1 and not name.endswith("/")


def load_model(
    name_or_path: str,
    device: str | None = None,
    dtype: str = "float32",
    tokenizer: str | None = None,
    trust_remote_code: bool = False,
):
    """(model in eval mode, tokenizer) from a checkpoint directory or Hub id, with clear errors for a path
    that is not a model, a checkpoint without tokenizer, and an unreachable Hub."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if dtype not in DTYPES:
        raise EvaluationError(f"Unknown dtype '{dtype}'; choose one of {', '.join(DTYPES)}")
    path = Path(name_or_path).expanduser()
    local = path.exists()
    if local:
        if not path.is_dir() or not (path / "config.json").is_file():
            raise EvaluationError(
                f"{path} is not a model: expected a checkpoint directory with config.json and weights "
                "(e.g. runs/<run>/checkpoints/step_N)"
            )
        if not any((path / name).is_file() for name in _MODEL_FILES):
            raise EvaluationError(
                f"{path} is not a model: it has config.json but no weights ({', '.join(_MODEL_FILES[::2])})"
            )
        if tokenizer is None and not any((path / name).is_file() for name in _TOKENIZER_FILES):
            raise EvaluationError(
                f"Checkpoint {path} has no tokenizer (no {' / '.join(_TOKENIZER_FILES[:2])}); pass one with "
                f"--tokenizer, e.g. --tokenizer {OLMO_TOKENIZER_ID} (pico's tokenizer, available offline)"
            )
    elif not _is_hub_id(name_or_path):
        raise EvaluationError(f"Model path {name_or_path} does not exist")
    elif not hub_reachable() and not offline_requested():
        raise EvaluationError(
            f"Model '{name_or_path}' is not a local directory and the Hugging Face Hub is unreachable "
            "(set HF_HUB_OFFLINE=1 to use a cached copy)"
        )

    source = str(path) if local else name_or_path
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            source, config=config, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError, KeyError) as error:
        where = "checkpoint" if local else "model (local cache or Hub)"
        raise EvaluationError(
            f"Could not load {where} '{source}' as a causal language model: {error}"
        ) from error
    try:
        processor = load_tokenizer(tokenizer or source)
    except (OSError, TypeError, ValueError) as error:
        raise EvaluationError(f"Could not load the tokenizer of '{tokenizer or source}': {error}") from error
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device).eval(), processor


# --- evaluation -----------------------------------------------------------------------------------------


@dataclass
class Report:
    """lm-eval's results plus what pico-hf adds: skipped tasks and the published-format perplexity."""

    results: dict[str, Any] | None
    skipped: dict[str, str]
    model: str
    paloma: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        out = dict(self.results or {})
        out["pico_hf"] = {"model": self.model, "skipped": self.skipped, "perplexity": self.paloma}
        return out

    def scores(self) -> dict[str, dict[str, float]]:
        """{task: {metric: value}} without stderr and aliases (e.g. {"pico_arc_easy": {"acc": 0.25, ...}})."""
        scores: dict[str, dict[str, float]] = {}
        for section in ("results", "groups"):
            for task, metrics in ((self.results or {}).get(section) or {}).items():
                for key, value in metrics.items():
                    metric, _, filter_name = key.partition(",")
                    if metric in _COUNTS or "_stderr" in metric or not isinstance(value, (int, float)):
                        continue
                    label = metric if filter_name in ("", "none") else f"{metric},{filter_name}"
                    scores.setdefault(task, {})[label] = float(value)
        if self.paloma is not None:
            scores[self.paloma["metric"]] = {"perplexity": self.paloma["mean_perplexity"]}
        return scores

    def markdown(self) -> str:
        from lm_eval.utils import make_table

        parts = [f"Model: `{self.model}`", ""]
        if self.results and self.results.get("results"):
            parts.append(make_table(self.results).rstrip())
            if self.results.get("groups"):
                parts += ["", make_table(self.results, "groups").rstrip()]
        if self.paloma is not None:
            p = self.paloma
            parts += [
                "",
                f"| {p['metric']} (pico-lm/perplexity) | Dataset | Texts | max_length | Value |",
                "|---|---|--:|--:|--:|",
                f"| mean over texts | {p['dataset']} | {p['num_texts']} | {p['max_length']} | {p['mean_perplexity']:.4f} |",
            ]
        if self.skipped:
            parts += ["", "Skipped:"] + [f"- {task}: {reason}" for task, reason in self.skipped.items()]
        return "\n".join(parts) + "\n"

    def write(self, output_dir: Path) -> tuple[Path, Path]:
        """`results.json` (lm-eval's results + `pico_hf`) and `results.md` in `output_dir`."""
        from lm_eval.utils import handle_non_serializable

        output_dir.mkdir(parents=True, exist_ok=True)
        json_path, md_path = output_dir / "results.json", output_dir / "results.md"
        json_path.write_text(json.dumps(self.to_dict(), indent=2, default=handle_non_serializable) + "\n")
        md_path.write_text(self.markdown())
        return json_path, md_path


def paloma_perplexity(
    model,
    tokenizer,
    dataset: str = PALOMA_TINSY,
    split: str = "val",
    max_length: int | None = None,
    batch_size: int = 16,
    limit: float | None = None,
) -> dict[str, Any]:
    """The published runs' `paloma` value (pico-lm/perplexity) on a dataset; Hub datasets fall back to the
    embedded held-out split when the Hub is unreachable, recorded then as `embedded_heldout_perplexity`
    (`metric`), never as `paloma`."""
    name = resolve_dataset(dataset)
    texts = load_texts(name, split, key="--paloma")
    if limit is not None:
        texts = texts[: int(limit) if limit >= 1 else math.ceil(limit * len(texts))]
    model_max = getattr(model.config, "max_position_embeddings", None) or 2048
    max_length = max_length or min(2048, model_max)
    result = compute_perplexity(model, tokenizer, texts, max_length=max_length, batch_size=batch_size)
    return {
        "metric": perplexity_metric_name(name),
        "dataset": name,
        "split": split,
        "num_texts": len(texts),
        "max_length": max_length,
        "mean_perplexity": result.mean_perplexity,
    }


@contextmanager
def _no_request_building_bars() -> Iterator[None]:
    """lm-eval draws an unlabelled bar per task while it builds the task's requests (`Task.build_all_requests`
    has no switch for it): 67 of them for `pico_blimp`. Quiet them for one evaluation; the requests' own bar
    stays."""
    from functools import partial

    import lm_eval.api.task as task_module
    from tqdm import tqdm

    original = getattr(task_module, "tqdm", None)
    if original is None:  # a later lm-eval without the module-level name: nothing to quiet
        yield
        return
    task_module.tqdm = partial(tqdm, disable=True)
    try:
        yield
    finally:
        task_module.tqdm = original


def _one_bar_hflm(hflm: type) -> type:
    """lm-eval's HFLM drawing one progress bar for rolling loglikelihoods (perplexity tasks): it draws one
    per batch of windows, dozens of "Running loglikelihood requests" bars for one task.

    It can also take part in data-parallel evaluation on a model it was handed (`share_with`): lm-eval's
    evaluator gives each rank its share of every task's documents and gathers through `all_gather`,
    `gather_object` and `barrier`, which HFLM only sets up for a model it loads itself under `accelerate
    launch`. Here they run on the process group the caller already has (torch.distributed), without an
    Accelerator: a second one would wrap, move or unwrap the live model."""
    import torch.distributed as dist
    from tqdm.auto import tqdm

    class OneBarHFLM(hflm):
        _windows_bar = None
        _requests_bar: bool | None = None  # loglikelihood's own bar setting, while its tokenizing bar is off

        def share_with(self, rank: int, world_size: int) -> None:
            """Evaluate only this process's share of the documents (rank `rank` of `world_size`)."""
            self._rank, self._world_size = rank, world_size

        def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
            if self.world_size <= 1:
                return tensor
            tensor = tensor.reshape(-1)  # as accelerate's gather: a 0-d tensor per rank gathers to a 1-d one
            parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
            dist.all_gather(parts, tensor)
            return torch.cat(parts)

        def barrier(self) -> None:
            if self.world_size > 1:
                dist.barrier()

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            self._requests_bar = not disable_tqdm
            try:  # no "Tokenizing inputs" bar before the requests' one
                return super().loglikelihood(requests, disable_tqdm=True)
            finally:
                self._requests_bar = None

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            self._windows_bar = tqdm(
                desc="Running loglikelihood_rolling requests",
                unit=" windows",
                disable=disable_tqdm or self.rank != 0,
            )
            try:
                return super().loglikelihood_rolling(requests, disable_tqdm=True)
            finally:
                self._windows_bar.close()
                self._windows_bar = None

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
            if self._windows_bar is None:
                if self._requests_bar is not None:
                    disable_tqdm = not self._requests_bar
                return super()._loglikelihood_tokens(
                    requests, disable_tqdm=disable_tqdm, override_bs=override_bs
                )
            result = super()._loglikelihood_tokens(requests, disable_tqdm=True, override_bs=override_bs)
            self._windows_bar.update(len(requests))
            return result

    return OneBarHFLM


def evaluate(
    model,
    tokenizer,
    tasks: list[str],
    manager=None,
    limit: float | None = None,
    batch_size: int = 8,
    num_fewshot: int | None = None,
    bootstrap_iters: int = 100_000,
    model_name: str | None = None,
    paloma: str | None = None,
    paloma_max_length: int | None = None,
    distributed: bool = False,
) -> Report:
    """Run lm-eval's `simple_evaluate` on a loaded model; Hub-backed tasks are skipped when the Hub is
    unreachable. `paloma` (a dataset) also computes the published runs' perplexity on it.

    `distributed`: every process of the initialized torch.distributed group calls this with the same
    arguments and scores its share of each task's documents (lm-eval's data-parallel evaluation); process 0's
    report holds the results of all documents, the other processes' reports hold none (`results` None).
    The model must be replicated (each process runs forward passes alone), the tasks zero-shot
    (`few_shot_tasks`) for the scores to equal a 1-process run's."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    manager = manager or task_manager_for(tasks)
    selection = resolve_tasks(tasks, manager)
    for task, reason in selection.skipped.items():
        logger.warning("Skipping %s: %s", task, reason)
    if not selection.runnable and paloma is None:
        raise EvaluationError(
            "Every requested task was skipped: " + "; ".join(f"{t} {r}" for t, r in selection.skipped.items())
        )
    name = model_name or getattr(model, "name_or_path", None) or type(model).__name__
    results = None
    if selection.runnable:
        lm = _one_bar_hflm(HFLM)(
            pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=batch_size
        )
        if distributed and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            lm.share_with(torch.distributed.get_rank(), torch.distributed.get_world_size())
        with _no_request_building_bars():
            results = simple_evaluate(
                model=lm,
                tasks=selection.runnable,
                num_fewshot=num_fewshot,
                limit=limit,
                bootstrap_iters=bootstrap_iters,
                task_manager=manager,
                log_samples=False,
            )
        if results is not None:  # None on every process but 0 of a distributed evaluation
            results["config"].update(
                model=name, model_class=type(model).__name__, batch_size=batch_size, device=str(lm.device)
            )
    paloma_result = None
    if paloma is not None:
        paloma_result = paloma_perplexity(
            model, tokenizer, paloma, max_length=paloma_max_length, batch_size=batch_size, limit=limit
        )
    return Report(results, selection.skipped, name, paloma_result)


def lm_eval_blimp_tasks(root: Path, uids: list[str]) -> Path:
    """lm-eval's own `blimp_<uid>` tasks reading the shipped BLiMP pairs: a copy of them in the Hub dataset
    `nyu-mll/blimp`'s layout (one parquet config per sub-dataset, split `train`) under `root`, and lm-eval's
    blimp task config pointed at it. Returns the task directory (for `task_manager`), so `pico_blimp_*` can be
    checked against, and timed beside, the reference tasks offline."""
    import lm_eval
    import pyarrow.parquet as pq

    from .tasks_dir import DATA_DIR

    hub = Path(root) / "nyu-mll-blimp"
    configs = []
    for uid in uids:
        (hub / uid).mkdir(parents=True)
        table = pq.read_table(DATA_DIR / "blimp.parquet", filters=[("UID", "==", uid)])
        pq.write_table(table, hub / uid / "train-00000-of-00001.parquet")
        configs.append(f"- config_name: {uid}\n  data_files:\n  - split: train\n    path: {uid}/train-*")
    (hub / "README.md").write_text("---\nconfigs:\n" + "\n".join(configs) + "\n---\n")
    template = Path(lm_eval.__file__).parent / "tasks" / "blimp" / "_template_yaml"
    tasks = Path(root) / "tasks"
    tasks.mkdir()
    for uid in uids:
        (tasks / f"{uid}.yaml").write_text(
            f"include: {template}\ntask: blimp_{uid}\ndataset_path: {hub}\ndataset_name: {uid}\n"
        )
    return tasks


__all__ = [
    "TASKS_DIR",
    "EvaluationError",
    "Report",
    "TaskSelection",
    "evaluate",
    "few_shot_tasks",
    "lm_eval_blimp_tasks",
    "load_model",
    "paloma_perplexity",
    "resolve_tasks",
    "task_manager",
    "task_manager_for",
]
