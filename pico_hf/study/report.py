"""A study's report, read from its runs' files only: tables, paired differences, plots, Markdown and HTML.

Each run contributes
- `logs/metrics.jsonl`: the training loss at every logged step (a resumed run logs some steps twice: the
  last line wins, it is the one the final weights come from) and tokens/s;
- `eval_results/step_N.json`: every numeric value (nested objects flattened as `a/b`), with the dataset
  named when the file has a `dataset` field (top-level values: it names the perplexity's texts);
- `analysis/step_N/<metric>_<split>.json`: each learning-dynamics result, per component (layer group);
- `study_timing.json`: the wall time of the study's training attempts.

For every quantity and step, each variant gets the mean and standard deviation over seeds, and the difference
from the baseline paired by seed: the mean of the per-seed differences with a Student-t confidence interval
(mean +/- t_{(1+c)/2, n-1} * sd / sqrt(n), over the seeds both have). One seed gives no interval.
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
import statistics
from collections.abc import Container, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from ..evaluation.heldout import HELDOUT_FILE, read_heldout_losses
from ..evaluation.results import read_eval_results
from . import stats
from .config import RunSpec, StudyConfig, dotted
from .crossrun import CrossRunValue, cross_run_dynamics
from .runner import ANALYSIS_DIR, FAILED, TIMING_FILE, RunOutcome
from .verdicts import (
    StepsToTarget,
    Verdict,
    compare_at_end,
    find_quantity,
    mark_exploratory,
    steps_to_target,
)

REPORT_MD = "report.md"
REPORT_HTML = "report.html"
SUMMARY_JSON = "summary.json"
PLOTS_DIR = "plots"
CONFIDENCE = 0.95
TRAIN_LOSS = "train/loss"
HELDOUT = "eval/heldout_loss"
# Logged series plotted beside the compared quantities: the schedule, the gradient and each mode's own values.
LOGGED_KEYS = ("learning_rate", "grad_norm")
LOGGED_PREFIXES = ("maml/", "relora/")
_STEP = re.compile(r"^step_(\d+)(?:\.json)?$")

Series = dict[int, float]  # step -> value


# --- reading one run ---------------------------------------------------------------------------------------


def read_training_log(run_dir: Path) -> tuple[Series, list[float], int]:
    """(loss by step, logged tokens/s values, tokens seen) from `logs/metrics.jsonl`."""
    loss: Series = {}
    speeds: dict[int, float] = {}
    tokens = 0
    path = run_dir / "logs" / "metrics.jsonl"
    if path.is_file():
        for line in path.read_text().splitlines():
            if not line.strip():
                continue
            entry = json.loads(line)
            step = int(entry.get("step", 0))
            if "loss" in entry:
                loss[step] = float(entry["loss"])
                if "tokens_per_second" in entry:
                    speeds[step] = float(entry["tokens_per_second"])
            tokens = max(tokens, int(entry.get("num_input_tokens_seen", 0) or 0))
    return dict(sorted(loss.items())), [speeds[s] for s in sorted(speeds)], tokens


def read_logged_series(run_dir: Path) -> dict[str, Series]:
    """The learning rate, grad norm, `maml/*` and `relora/*` values of `logs/metrics.jsonl` by step (the last
    line of a step wins, as for the loss)."""
    series: dict[str, Series] = {}
    path = run_dir / "logs" / "metrics.jsonl"
    if not path.is_file():
        return series
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        entry = json.loads(line)
        step = int(entry.get("step", 0))
        for key, value in entry.items():
            if (key in LOGGED_KEYS or key.startswith(LOGGED_PREFIXES)) and isinstance(value, (int, float)):
                series.setdefault(key, {})[step] = float(value)
    return {key: dict(sorted(by_step.items())) for key, by_step in sorted(series.items())}


def read_analysis(analysis_dir: Path) -> dict[str, dict[str, Series]]:
    """{result stem: {component key: {step: value}}} from `step_N/<stem>.json`; single heads left out."""
    results: dict[str, dict[str, Series]] = {}
    if not analysis_dir.is_dir():
        return results
    for step_dir in analysis_dir.iterdir():
        match = _STEP.match(step_dir.name)
        if not match or not step_dir.is_dir():
            continue
        for path in step_dir.glob("*.json"):
            for key, value in json.loads(path.read_text()).items():
                if ".heads." in key or not isinstance(value, (int, float)) or isinstance(value, bool):
                    continue
                results.setdefault(path.stem, {}).setdefault(key, {})[int(match[1])] = float(value)
    return {
        stem: {key: dict(sorted(s.items())) for key, s in sorted(by_key.items())}
        for stem, by_key in sorted(results.items())
    }


def read_wall_seconds(run_dir: Path) -> float | None:
    path = run_dir / TIMING_FILE
    if not path.is_file():
        return None
    return sum(attempt["seconds"] for attempt in json.loads(path.read_text())["attempts"])


@dataclass
class RunData:
    spec: RunSpec
    status: str
    loss: Series
    evals: dict[str, Series]
    datasets: dict[str, str]
    analysis: dict[str, dict[str, Series]]
    checkpoint_steps: list[int]
    tokens: int
    tokens_per_second: float | None  # median of the logged intervals
    wall_seconds: float | None
    heldout: Series = field(default_factory=dict)  # eval_heldout_loss by step
    logged: dict[str, Series] = field(default_factory=dict)  # learning rate, grad norm, maml/*, relora/*
    saved_config: dict[str, Any] | None = None  # the run's training_config.yaml: what it really trained with

    @property
    def tokens_per_step(self) -> int:
        config = self.spec.config
        return config.data.dataloader.batch_size * config.model.max_seq_len


def read_run(spec: RunSpec, status: str = "reused") -> RunData:
    run_dir = spec.run_dir
    loss, speeds, tokens = read_training_log(run_dir)
    evals, datasets = read_eval_results(run_dir / spec.config.checkpointing.evaluation.eval_results_dir)
    if "paloma" in evals and "paloma" not in datasets:  # files without a `dataset` field: the run's config
        datasets["paloma"] = spec.config.evaluation.paloma.dataset_name
    saved = run_dir / "training_config.yaml"
    checkpoints_dir = run_dir / spec.config.checkpointing.checkpoints_dir
    steps = sorted(
        int(m[1])
        for p in (checkpoints_dir.iterdir() if checkpoints_dir.is_dir() else [])
        if (m := _STEP.match(p.name)) and p.is_dir() and not p.is_symlink()
    )
    return RunData(
        spec=spec,
        status=status,
        loss=loss,
        evals=evals,
        datasets=datasets,
        analysis=read_analysis(run_dir / ANALYSIS_DIR),
        checkpoint_steps=steps,
        tokens=tokens,
        tokens_per_second=statistics.median(speeds) if speeds else None,
        wall_seconds=read_wall_seconds(run_dir),
        heldout=read_heldout_losses(
            run_dir / spec.config.checkpointing.evaluation.eval_results_dir / HELDOUT_FILE
        ),
        logged=read_logged_series(run_dir),
        saved_config=yaml.safe_load(saved.read_text()) if saved.is_file() else None,
    )


# --- statistics --------------------------------------------------------------------------------------------


def t_quantile(probability: float, dof: int) -> float:
    from scipy.stats import t

    return float(t.ppf(probability, dof))


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1); the deviation of one value is nan."""
    mean = sum(values) / len(values)
    std = statistics.stdev(values) if len(values) > 1 else math.nan
    return mean, std


@dataclass(frozen=True)
class PairedDifference:
    mean: float
    low: float
    high: float
    n: int


def paired_difference(
    variant: Mapping[int, float], baseline: Mapping[int, float], confidence: float = CONFIDENCE
) -> PairedDifference | None:
    """variant - baseline over the seeds both have: mean and t-interval of the per-seed differences."""
    seeds = sorted(set(variant) & set(baseline))
    if not seeds:
        return None
    differences = [variant[s] - baseline[s] for s in seeds]
    mean, std = mean_std(differences)
    n = len(differences)
    if n < 2:
        return PairedDifference(mean, math.nan, math.nan, n)
    half = t_quantile((1 + confidence) / 2, n - 1) * std / math.sqrt(n)
    return PairedDifference(mean, mean - half, mean + half, n)


@dataclass
class Cell:
    """One quantity at one step for one variant: values by seed, their summary, the paired difference."""

    values: dict[int, float]
    mean: float
    std: float
    difference: PairedDifference | None = None
    p: float = math.nan  # paired t-test against the baseline
    q: float = math.nan  # Benjamini-Hochberg q-value among the exploratory comparisons


@dataclass
class Quantity:
    """A quantity compared across variants: {step: {variant: Cell}} and per-seed series for the plots."""

    name: str
    label: str
    kind: str  # "training", "evaluation" or "learning dynamics"
    series: dict[str, dict[int, Series]]  # variant -> seed -> step -> value
    table_steps: list[int]
    cells: dict[int, dict[str, Cell]] = field(default_factory=dict)


def compare(quantity: Quantity, baseline: str, confidence: float = CONFIDENCE) -> Quantity:
    for step in quantity.table_steps:
        row: dict[str, Cell] = {}
        for variant, by_seed in quantity.series.items():
            values = {seed: s[step] for seed, s in by_seed.items() if step in s}
            if values:
                mean, std = mean_std(list(values.values()))
                row[variant] = Cell(values, mean, std)
        base = row.get(baseline)
        for variant, cell in row.items():
            if variant != baseline and base is not None:
                cell.difference = paired_difference(cell.values, base.values, confidence)
                test = stats.paired_t(cell.values, base.values, confidence)
                cell.p = test.p if test is not None else math.nan
        if row:
            quantity.cells[step] = row
    return quantity


def build_quantities(study: StudyConfig, runs: Sequence[RunData]) -> list[Quantity]:
    """Training loss, every evaluation value and every learning-dynamics component, compared."""
    variants = list(study.variants)

    def collect(get) -> dict[str, dict[int, Series]]:
        series: dict[str, dict[int, Series]] = {v: {} for v in variants}
        for run in runs:
            values = get(run)
            if values:
                series[run.spec.variant][run.spec.seed] = values
        return {v: s for v, s in series.items() if s}

    checkpoint_steps = sorted({step for run in runs for step in run.checkpoint_steps})
    quantities = [
        Quantity(TRAIN_LOSS, "training loss", "training", collect(lambda r: r.loss), checkpoint_steps)
    ]
    heldout = collect(lambda r: r.heldout)
    heldout_steps = sorted({step for by_seed in heldout.values() for s in by_seed.values() for step in s})
    # The dense curve is kept for plots and steps-to-target; its tables show the checkpoints and the last step.
    shown = [step for step in heldout_steps if step in checkpoint_steps or step == heldout_steps[-1]]
    dataset = next((r.spec.config.evaluation.paloma.dataset_name for r in runs if r.heldout), None)
    quantities.append(Quantity(HELDOUT, f"heldout_loss ({dataset})", "evaluation", heldout, shown))
    eval_names = list(dict.fromkeys(name for run in runs for name in run.evals))
    for name in eval_names:
        dataset = next((run.datasets[name] for run in runs if name in run.datasets), None)
        series = collect(lambda r, n=name: r.evals.get(n))
        steps = sorted({step for by_seed in series.values() for s in by_seed.values() for step in s})
        label = f"{name} ({dataset})" if dataset else name
        quantities.append(Quantity(f"eval/{name}", label, "evaluation", series, steps))
    stems = list(dict.fromkeys(stem for run in runs for stem in run.analysis))
    for stem in stems:
        keys = list(dict.fromkeys(key for run in runs for key in run.analysis.get(stem, {})))
        for key in keys:
            series = collect(lambda r, s=stem, k=key: r.analysis.get(s, {}).get(k))
            steps = sorted({step for by_seed in series.values() for s in by_seed.values() for step in s})
            quantities.append(Quantity(f"{stem}/{key}", f"{stem}: {key}", "learning dynamics", series, steps))
    return [compare(q, study.baseline) for q in quantities if q.series]


# --- plots -------------------------------------------------------------------------------------------------


def variant_colours(variants: Sequence[str]) -> dict[str, tuple]:
    palette = colormaps["tab10"]
    return {variant: palette(i % 10) for i, variant in enumerate(variants)}


def _band(
    by_seed: Mapping[int, Series], steps: Sequence[int]
) -> tuple[list[float], list[float], list[float]]:
    """Mean over seeds and its 95% Student-t band at each step (no band where fewer than 2 seeds)."""
    means, lows, highs = [], [], []
    for step in steps:
        mean, low, high = stats.mean_interval([s[step] for s in by_seed.values() if step in s], CONFIDENCE)
        means.append(mean)
        lows.append(low if math.isfinite(low) else mean)
        highs.append(high if math.isfinite(high) else mean)
    return means, lows, highs


def _draw(ax, quantity: Quantity, colours: Mapping[str, tuple], x_label: str = "step") -> None:
    """Seeds as thin lines, the mean over seeds as a thick one in a shaded 95% band, one colour per variant."""
    for variant, by_seed in quantity.series.items():
        colour = colours[variant]
        for seed_series in by_seed.values():
            steps = sorted(seed_series)
            ax.plot(steps, [seed_series[s] for s in steps], color=colour, linewidth=0.7, alpha=0.4)
        steps = sorted({s for seed_series in by_seed.values() for s in seed_series})
        means, lows, highs = _band(by_seed, steps)
        ax.fill_between(steps, lows, highs, color=colour, alpha=0.18, linewidth=0)
        ax.plot(steps, means, color=colour, linewidth=2.2, marker="o" if len(steps) <= 25 else None, ms=3)
    values = [v for by_seed in quantity.series.values() for s in by_seed.values() for v in s.values()]
    finite = [v for v in values if math.isfinite(v)]
    if finite and min(finite) > 0 and max(finite) / min(finite) > 1e3:
        ax.set_yscale("log")
    if quantity.name.endswith("/acc"):  # an accuracy's band stays within what an accuracy can be
        ax.set_ylim(-0.02, 1.02)
    ax.grid(True, alpha=0.3)
    ax.set_xlabel(x_label)


def _draw_difference(
    ax, quantity: Quantity, baseline: str, colours: Mapping[str, tuple], x_label: str = "step"
) -> None:
    """Each variant's paired difference from the baseline (same seed, same step): mean, 95% band, zero line."""
    base = quantity.series.get(baseline, {})
    for variant, by_seed in quantity.series.items():
        if variant == baseline:
            continue
        # At the baseline's points, the variant's curve interpolated (the same points when budgets are equal).
        differences = {
            seed: {
                x: stats.interpolate(series, x) - value
                for x, value in base[seed].items()
                if math.isfinite(stats.interpolate(series, x))
            }
            for seed, series in by_seed.items()
            if seed in base
        }
        steps = sorted({s for series in differences.values() for s in series})
        if not steps:
            continue
        means, lows, highs = _band(differences, steps)
        ax.fill_between(steps, lows, highs, color=colours[variant], alpha=0.18, linewidth=0)
        ax.plot(steps, means, color=colours[variant], linewidth=1.8)
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.grid(True, alpha=0.3)
    ax.set_xlabel(x_label)
    ax.set_title(f"variant - {baseline} (paired by seed, 95% band)", fontsize="small")


def plot_logged_series(runs: Sequence[RunData], variants: Sequence[str], plots_dir: Path) -> Path | None:
    """Learning rate, grad norm and each training mode's own series (`maml/*`, `relora/*`), a panel each."""
    keys = list(dict.fromkeys(key for run in runs for key in run.logged))
    if not keys:
        return None
    colours = variant_colours(variants)
    columns = min(len(keys), 3)
    rows = math.ceil(len(keys) / columns)
    fig = Figure(figsize=(4.2 * columns + 1.8, 3.0 * rows), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    for index, key in enumerate(keys):
        ax = fig.add_subplot(rows, columns, index + 1)
        for run in runs:
            series = run.logged.get(key)
            if series:
                steps = sorted(series)
                ax.plot(steps, [series[s] for s in steps], color=colours[run.spec.variant], linewidth=1.0)
        ax.set_title(key, fontsize="small")
        ax.grid(True, alpha=0.3)
        ax.set_xlabel("step")
    handles = [Line2D([], [], color=colours[v], linewidth=1.5, label=v) for v in variants]
    fig.legend(handles=handles, loc="outside right upper", fontsize="small", frameon=False)
    path = plots_dir / "training_series.png"
    fig.savefig(path)
    return path


def _legend(fig: Figure, variants: Sequence[str], colours: Mapping[str, tuple]) -> None:
    handles = [Line2D([], [], color=colours[v], linewidth=2.2, label=f"{v} (mean)") for v in variants]
    handles.append(Line2D([], [], color="grey", linewidth=0.7, alpha=0.6, label="single seeds"))
    fig.legend(handles=handles, loc="outside right upper", fontsize="small", frameon=False)


def in_tokens(quantities: Sequence[Quantity], runs: Sequence[RunData]) -> list[Quantity]:
    """The quantities with each series' steps turned into the tokens its run had trained on by then."""
    per_step = {(r.spec.variant, r.spec.seed): r.tokens_per_step for r in runs}
    return [
        Quantity(
            q.name,
            q.label,
            q.kind,
            {
                variant: {
                    seed: {step * per_step[(variant, seed)]: v for step, v in series.items()}
                    for seed, series in by_seed.items()
                }
                for variant, by_seed in q.series.items()
            },
            q.table_steps,
        )
        for q in quantities
    ]


def plot_group(quantity: Quantity, names: Container[str]) -> str:
    """The figure a quantity is drawn in: a learning-dynamics result's components share one (a panel each), so
    do an evaluation group's sub-tasks (`eval/blimp_<uid>/acc` beside `eval/blimp/acc`: 67 panels in one
    figure, not 67 figures); anything else has its own."""
    if quantity.kind == "learning dynamics":
        return quantity.name.split("/", 1)[0]
    match = re.fullmatch(r"eval/([^/]+)/([^/]+)", quantity.name)
    if quantity.kind == "evaluation" and match:
        task, metric = match.groups()
        parts = task.split("_")
        for cut in range(1, len(parts)):  # the top group: blimp, not the sub-task blimp_wh_vs_that_no_gap
            group = "_".join(parts[:cut])
            if f"eval/{group}/{metric}" in names:
                return f"eval/{group}_*/{metric}"
    return quantity.name


def plot_quantities(
    quantities: Sequence[Quantity],
    variants: Sequence[str],
    plots_dir: Path,
    baseline: str | None = None,
    x_label: str = "step",
) -> dict[str, Path]:
    """One PNG per training/evaluation quantity (with a panel of the paired difference from the baseline), one
    per learning-dynamics result (a panel per component) and one per evaluation group's sub-tasks (a panel
    each). Returns {plot group (`plot_group`): path}."""
    colours = variant_colours(variants)
    plots_dir.mkdir(parents=True, exist_ok=True)
    names = {quantity.name for quantity in quantities}
    groups: dict[str, list[Quantity]] = {}
    for quantity in quantities:
        groups.setdefault(plot_group(quantity, names), []).append(quantity)
    paths = {}
    for group, members in groups.items():
        with_difference = len(members) == 1 and baseline in members[0].series and len(members[0].series) > 1
        many = len(members) > 12  # sub-tasks: small panels, many to a row
        columns = 2 if with_difference else min(len(members), 8 if many else 3)
        rows = 1 if with_difference else math.ceil(len(members) / columns)
        width, height = (2.6, 2.1) if many else (4.2, 3.2)
        fig = Figure(
            figsize=(width * columns + 1.8, height * rows), dpi=100 if not many else 70, layout="constrained"
        )
        FigureCanvasAgg(fig)
        if with_difference:
            assert baseline is not None
            _draw_difference(fig.add_subplot(1, 2, 2), members[0], baseline, colours, x_label)
        for index, quantity in enumerate(members):
            ax = fig.add_subplot(rows, columns, index + 1)
            _draw(ax, quantity, colours, x_label)
            if len(members) == 1:
                title = quantity.label
            elif quantity.kind == "learning dynamics":
                title = quantity.name.split("/", 1)[1]
            else:  # a sub-task: its name less the group's
                title = quantity.name.split("/")[1].removeprefix(group.split("/")[1].removesuffix("*"))
            ax.set_title(title, fontsize="small" if not many else "x-small")
            if many:
                ax.tick_params(labelsize="x-small")
                ax.set_xlabel("")
        if len(members) > 1:
            fig.suptitle(group)
        _legend(fig, [v for v in variants if any(v in q.series for q in members)], colours)
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", group.replace("*", "subtasks")).strip("_")
        path = plots_dir / f"{stem}.png"
        fig.savefig(path)
        paths[group] = path
    return paths


# --- the report --------------------------------------------------------------------------------------------


def _num(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.5g}"


def _difference(cell: Cell, baseline: str, variant: str) -> str:
    if variant == baseline:
        return "(baseline)"
    d = cell.difference
    if d is None:
        return "-"
    if d.n < 2:
        return f"{_num(d.mean)} (1 seed, no interval)"
    return f"{_num(d.mean)} [{_num(d.low)}, {_num(d.high)}]"


def quantity_rows(quantity: Quantity, baseline: str) -> list[list[str]]:
    rows = []
    for step, row in quantity.cells.items():
        for variant, cell in row.items():
            rows.append(
                [
                    str(step),
                    variant,
                    str(len(cell.values)),
                    _num(cell.mean),
                    _num(cell.std),
                    _difference(cell, baseline, variant),
                    _p(cell.p),
                    _p(cell.q),
                ]
            )
    return rows


def _p(value: float) -> str:
    if math.isnan(value):
        return "-"
    return f"{value:.2g}" if value >= 1e-4 else f"{value:.1e}"


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _html_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _run_rows(runs: Sequence[RunData]) -> list[list[str]]:
    rows = []
    for run in runs:
        final = max(run.loss) if run.loss else None
        rows.append(
            [
                run.spec.variant,
                str(run.spec.seed),
                run.status,
                str(max(run.checkpoint_steps) if run.checkpoint_steps else "-"),
                _num(run.loss[final]) if final is not None else "-",
                _num(run.wall_seconds),
                str(run.tokens),
                _num(run.tokens_per_second),
                str(run.spec.run_dir),
            ]
        )
    return rows


def _variant_rows(study: StudyConfig, runs: Sequence[RunData]) -> list[list[str]]:
    rows = []
    for variant, overrides in study.variants.items():
        mine = [r for r in runs if r.spec.variant == variant]
        walls = [r.wall_seconds for r in mine if r.wall_seconds is not None]
        speeds = [r.tokens_per_second for r in mine if r.tokens_per_second is not None]
        rows.append(
            [
                variant + (" (baseline)" if variant == study.baseline else ""),
                " ".join(overrides) or "(the base config)",
                str(len(mine)),
                _num(statistics.fmean(walls)) if walls else "-",
                _num(statistics.fmean(speeds)) if speeds else "-",
            ]
        )
    return rows


RUN_HEADER = ["variant", "seed", "status", "last step", "final loss", "wall s", "tokens", "tokens/s", "run"]
VARIANT_HEADER = ["variant", "overrides", "runs", "mean wall s", "mean tokens/s"]


def _shown_path(path: Path) -> str:
    """Relative to the working directory when under it (the report reads the same on any machine)."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _table_header(confidence: float) -> list[str]:
    return [
        "step",
        "variant",
        "seeds",
        "mean",
        "std",
        f"- baseline [{confidence:.0%} CI, paired]",
        "p",
        "q (BH)",
    ]


VERDICT_HEADER = [
    "variant",
    "metric",
    "at",
    "reference mean",
    "variant mean",
    "difference",
    "relative",
    "95% CI",
    "p",
    "p (Holm)",
    "verdict",
]
POWER_HEADER = [
    "variant",
    "metric",
    "seeds",
    "paired sd",
    "detectable at 80% power",
    "seeds to detect the difference",
]
TARGET_HEADER = ["variant", "metric", "target", "steps (tokens) per seed", "speed-up [95% CI]", "reached"]


def _compared(v: Verdict, baseline: str) -> str:
    """The variant, or `variant vs reference` for a contrast."""
    return v.variant if v.reference == baseline else f"{v.variant} vs {v.reference}"


def _verdict_rows(verdicts: Sequence[Verdict], baseline: str) -> list[list[str]]:
    return [
        [
            _compared(v, baseline),
            v.metric,
            f"step {v.step}" if v.step is not None else f"{v.tokens} tokens",
            _num(v.baseline_mean),
            _num(v.variant_mean),
            _num(v.difference),
            f"{v.relative:+.2%}" if math.isfinite(v.relative) else "-",
            f"[{_num(v.ci[0])}, {_num(v.ci[1])}]",
            _p(v.p),
            _p(v.p_holm),
            f"**{v.verdict}**",
        ]
        for v in verdicts
    ]


def _power_rows(verdicts: Sequence[Verdict], baseline: str) -> list[list[str]]:
    return [
        [
            _compared(v, baseline),
            v.metric,
            str(v.seeds),
            _num(v.sd),
            _num(v.minimum_detectable),
            str(v.seeds_needed)
            if v.seeds_needed is not None
            else f"more than {stats.MAX_SEEDS} (or no spread)",
        ]
        for v in verdicts
    ]


def _target_rows(targets: Sequence[StepsToTarget]) -> list[list[str]]:
    rows = []
    for t in targets:
        per_seed = ", ".join(
            f"{seed}: "
            + (f"{step:.4g} ({step * t.tokens_per_step:.4g})" if step is not None else "not reached")
            for seed, step in t.variant_steps.items()
        )
        ratio = f"{_num(t.ratio)} [{_num(t.ci[0])}, {_num(t.ci[1])}]" if t.reached_seeds else "not reached"
        rows.append([t.variant, t.metric, _num(t.target), per_seed, ratio, f"{t.reached_seeds}/{t.seeds}"])
    return rows


def config_rows(study: StudyConfig, runs: Sequence[RunData]) -> tuple[list[str], list[list[str]]]:
    """Each key the study, a variant or --quick sets, as each run's `training_config.yaml` has it."""
    header = ["key", *[run.spec.name for run in runs]]
    rows = []
    for key in study.set_keys():
        row = [key]
        for run in runs:
            if run.saved_config is None:
                row.append("(not trained)")
                continue
            try:
                row.append(json.dumps(dotted(run.saved_config, key)))
            except KeyError:
                row.append("(absent)")
        rows.append(row)
    return header, rows


def idle_modes(runs: Sequence[RunData]) -> list[str]:
    """Runs whose training mode did nothing: ReLoRA that never merged, MAML that trained no meta group."""
    flags = []
    for run in runs:
        config = run.saved_config
        if config is None:
            continue
        training = config.get("training", {})
        if training.get("relora", {}).get("enabled") and not run.logged.get("relora/resets"):
            relora = training["relora"]
            flags.append(
                f"{run.spec.name}: ReLoRA never merged in {training['max_steps']} steps (warm start "
                f"{relora.get('warm_start_steps')}, a merge every {relora.get('reset_frequency')} steps): "
                "it trained as LoRA adapters, not ReLoRA"
            )
        if training.get("maml", {}).get("enabled"):
            # Running counts since step 0: the last logged value is the run's total. A chosen meta group whose
            # sequences hold too few distinct tokens for an episode falls back to language modelling.
            chosen = max(run.logged.get("maml/meta_groups", {0: 0.0}).values())
            fell_back = max(run.logged.get("maml/fallback_groups", {0: 0.0}).values())
            if chosen - fell_back <= 0:
                flags.append(
                    f"{run.spec.name}: MAML trained no meta group ({chosen:.0f} chosen, {fell_back:.0f} fell back "
                    "to language modelling): it trained as the baseline does"
                )
    return flags


CROSS_HEADER = ["component", "step", "variant", "seeds", "mean [95% CI over seeds]"]


def cross_run_quantities(values: Sequence[CrossRunValue]) -> list[Quantity]:
    """The cross-run values as quantities (variant -> seed -> step -> value), one per metric and component."""
    by_name: dict[str, dict[str, dict[int, Series]]] = {}
    for v in values:
        series = by_name.setdefault(f"cross_{v.metric}/{v.component}", {})
        series.setdefault(v.variant, {}).setdefault(v.seed, {})[v.step] = v.value
    quantities = []
    for name, series in by_name.items():
        steps = sorted({step for by_seed in series.values() for s in by_seed.values() for step in s})
        quantities.append(Quantity(name, name, "learning dynamics", series, steps))
    return quantities


def cross_run_rows(quantities: Sequence[Quantity]) -> list[list[str]]:
    rows = []
    for quantity in quantities:
        for step in quantity.table_steps:
            for variant, by_seed in quantity.series.items():
                values = [s[step] for s in by_seed.values() if step in s]
                mean, low, high = stats.mean_interval(values)
                interval = f" [{_num(low)}, {_num(high)}]" if len(values) > 1 else ""
                component = quantity.name.split("/", 1)[1]
                rows.append([component, str(step), variant, str(len(values)), _num(mean) + interval])
    return rows


@dataclass
class Conclusions:
    """What the report says first: verdicts, power, steps-to-target, runs to distrust, failures."""

    verdicts: list[Verdict]
    missing_primary: list[str]
    targets: list[StepsToTarget]
    idle: list[str]
    failures: list[RunOutcome]
    exploratory: tuple[int, int, int]  # intervals, those excluding 0, those with q < 0.05


def conclude(
    study: StudyConfig,
    runs: Sequence[RunData],
    quantities: Sequence[Quantity],
    failures: Sequence[RunOutcome],
) -> Conclusions:
    verdicts, missing = compare_at_end(study, quantities, runs)
    names = {m: q.name for m in study.primary if (q := find_quantity(m, quantities)) is not None}
    return Conclusions(
        verdicts=verdicts,
        missing_primary=missing,
        targets=steps_to_target(study, quantities, runs),
        idle=idle_modes(runs),
        failures=list(failures),
        exploratory=mark_exploratory(quantities, verdicts, names),
    )


def summary_dict(
    study: StudyConfig,
    runs: Sequence[RunData],
    quantities: Sequence[Quantity],
    confidence: float,
    conclusions: Conclusions | None = None,
) -> dict[str, Any]:
    def cell(c: Cell) -> dict[str, Any]:
        out: dict[str, Any] = {
            "values": {str(s): v for s, v in c.values.items()},
            "mean": c.mean,
            "std": c.std,
        }
        if c.difference is not None:
            out["difference"] = {**vars(c.difference), "p": c.p, "q": c.q}
        return out

    status = {o.spec.name: o for o in (conclusions.failures if conclusions else [])}
    summary: dict[str, Any] = {
        "study": study.describe(),
        "confidence": confidence,
    }
    if conclusions is not None:
        summary["verdicts"] = [v.summary() for v in conclusions.verdicts]
        summary["steps_to_target"] = [t.summary() for t in conclusions.targets]
        summary["idle_modes"] = conclusions.idle
        summary["failures"] = [
            {"run": o.spec.name, "exit_status": o.exit_status, "log_tail": o.log_tail}
            for o in conclusions.failures
        ]
    summary["runs"] = [
        {
            "variant": r.spec.variant,
            "seed": r.spec.seed,
            "status": r.status,
            "run_dir": str(r.spec.run_dir),
            "overrides": list(r.spec.overrides),
            "wall_seconds": r.wall_seconds,
            "tokens": r.tokens,
            "tokens_per_second": r.tokens_per_second,
            **({"exit_status": status[r.spec.name].exit_status} if r.spec.name in status else {}),
        }
        for r in runs
    ]
    summary["quantities"] = {
        q.name: {
            "label": q.label,
            "kind": q.kind,
            "steps": {str(step): {v: cell(c) for v, c in row.items()} for step, row in q.cells.items()},
        }
        for q in quantities
    }
    return summary


def headline(study: StudyConfig, conclusions: Conclusions) -> list[tuple[str, str]]:
    """What the reader must know before any number: (kind, sentence) pairs."""
    lines = []
    for outcome in conclusions.failures:
        lines.append(
            (
                "failure",
                f"Run {outcome.spec.name} failed (exit status {outcome.exit_status}); its cells are empty.",
            )
        )
    for flag in conclusions.idle:
        lines.append(("flag", flag))
    if len(study.seeds) < stats.MIN_SEEDS:
        lines.append(
            (
                "power",
                f"With {len(study.seeds)} seed(s) no verdict is possible: a paired comparison needs at least "
                f"{stats.MIN_SEEDS} seeds (`--seeds {stats.MIN_SEEDS}` trains only the missing ones).",
            )
        )
    for metric in conclusions.missing_primary:
        lines.append(("missing", f"Primary metric {metric!r}: no run logged it, so it has no verdict."))
    return lines


def _verdict_explanation(study: StudyConfig, confidence: float) -> str:
    where = (
        "at the most tokens every compared run trained on (each seed's curve interpolated there)"
        if study.allow_unequal_budget
        else "at the last step"
    )
    contrasts = (
        " and of each contrast (`variant vs reference`: "
        + ", ".join(f"{v} vs {r}" for v, r in study.contrasts)
        + ")"
        if study.contrasts
        else ""
    )
    return (
        f"Each primary metric ({', '.join(study.primary)}) of each variant against the baseline{contrasts} "
        f"{where}: the per-seed difference (variant - reference, the baseline unless named, paired by seed), its "
        f"{confidence:.0%} Student-t interval, the paired t-test's p and Holm's adjustment over every comparison "
        "x primary metric. "
        "`better`/`worse`: Holm-adjusted p < 0.05 in the metric's known direction (losses and perplexities "
        "lower, accuracies higher); `differs`: p < 0.05 for a metric with no direction; `too few seeds`: "
        f"fewer than {stats.MIN_SEEDS}."
    )


def _exploratory_sentence(counts: tuple[int, int, int], confidence: float) -> str:
    intervals, excluding, significant = counts
    chance = (1 - confidence) * intervals
    return (
        f"Exploratory: {excluding} of {intervals} intervals below exclude 0, where chance alone would give about "
        f"{chance:.1f} ({1 - confidence:.0%} of them) if no variant changed anything; {significant} have a "
        "Benjamini-Hochberg q below 0.05. Read them as leads for the next study, not as findings."
    )


def strict_json(value: Any) -> Any:
    """`value` with every non-finite float (an interval over one seed, a p outside a family) as None: JSON has
    no NaN, and strict readers (a browser's JSON.parse, jq) reject Python's."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [strict_json(v) for v in value]
    return value


def write_study_report(
    study: StudyConfig,
    outcomes: Sequence[RunOutcome] | None = None,
    warnings: Sequence[str] = (),
    confidence: float = CONFIDENCE,
) -> tuple[Path, Path]:
    """Read every run's files and write `report.md`, `report.html` (self-contained), `summary.json` and
    `plots/` into the study folder."""
    out = study.study_dir
    out.mkdir(parents=True, exist_ok=True)
    status = {o.spec.name: o.status for o in outcomes or []}
    failures = [o for o in outcomes or [] if o.status == FAILED]
    runs = [read_run(spec, status.get(spec.name, "reused")) for spec in study.runs]
    quantities = build_quantities(study, runs)
    conclusions = conclude(study, runs, quantities, failures)
    variants = list(study.variants)
    if study.allow_unequal_budget:  # runs of different budgets side by side: by tokens trained on
        plots = plot_quantities(
            in_tokens(quantities, runs), variants, out / PLOTS_DIR, study.baseline, "tokens"
        )
    else:
        plots = plot_quantities(quantities, variants, out / PLOTS_DIR, study.baseline)
    series_plot = plot_logged_series(runs, variants, out / PLOTS_DIR)
    if series_plot is not None:
        plots["training series"] = series_plot
    cross_values, cross_warnings = cross_run_dynamics(study, skip=[o.spec.name for o in failures])
    warnings = [*warnings, *cross_warnings]
    cross = cross_run_quantities(cross_values)
    plots.update(plot_quantities(cross, variants, out / PLOTS_DIR))
    for stale in set((out / PLOTS_DIR).glob("*.png")) - set(plots.values()):  # an earlier report's figures
        stale.unlink()
    summary = summary_dict(study, runs, quantities, confidence, conclusions)
    summary["cross_run"] = [v.summary() for v in cross_values]
    (out / SUMMARY_JSON).write_text(json.dumps(strict_json(summary), indent=1, allow_nan=False))

    header = _table_header(confidence)
    overview = [
        ("base config", _shown_path(study.base_config)),
        ("variants", ", ".join(variants) + f" (baseline: {study.baseline})"),
        ("seeds", ", ".join(map(str, study.seeds))),
        ("primary", ", ".join(study.primary)),
        ("common overrides", " ".join(study.overrides) or "none"),
        ("--quick overrides (applied last)", " ".join(study.quick_overrides) or "none"),
        ("evaluation", " ".join(study.evaluation) or "the base config's"),
        ("generated", datetime.now().strftime("%Y-%m-%d %H:%M:%S")),
    ]
    explanation = (
        "Each table gives, per checkpoint step and variant, the mean and standard deviation over seeds, and "
        "the variant's difference from the baseline paired by seed (same seed: same initial weights and "
        f"data order): the mean per-seed difference and its {confidence:.0%} Student-t interval, the paired "
        "t-test's p and its Benjamini-Hochberg q over every exploratory comparison."
    )
    sections = [
        ("Training loss", "training"),
        ("Evaluation", "evaluation"),
        ("Learning dynamics", "learning dynamics"),
    ]
    notes = headline(study, conclusions)
    verdict_rows = _verdict_rows(conclusions.verdicts, study.baseline)
    config_header, config_table = config_rows(study, runs)

    md = [f"# Study: {study.name}", ""]
    md += [f"- **{kind}**: {sentence}" for kind, sentence in notes]
    md += ["", "## Verdicts", "", _verdict_explanation(study, confidence), ""]
    md += [_md_table(VERDICT_HEADER, verdict_rows) if verdict_rows else "No comparison.", ""]
    if conclusions.verdicts:
        md += [
            "### Power",
            "",
            _md_table(POWER_HEADER, _power_rows(conclusions.verdicts, study.baseline)),
            "",
        ]
    if conclusions.targets:
        md += [
            "### Steps to the baseline's final value",
            "",
            "Per seed, the first step (and tokens) at which the variant's curve reaches the baseline's final value "
            "(linear between measured steps), and the speed-up: the baseline's steps to that value over the "
            "variant's, mean and 95% interval over the seeds that reached it.",
            "",
            _md_table(TARGET_HEADER, _target_rows(conclusions.targets)),
            "",
        ]
    for outcome in failures:
        md += [f"### Failed: {outcome.spec.name} (exit status {outcome.exit_status})", "", "```text"]
        md += [*outcome.log_tail, "```", ""]
    md += ["## Configuration", ""]
    md += [f"- **{k}**: {v}" for k, v in overview]
    md += ["", "## Variants", "", _md_table(VARIANT_HEADER, _variant_rows(study, runs)), ""]
    md += ["## Runs", "", _md_table(RUN_HEADER, _run_rows(runs)), ""]
    md += [
        "Resolved configs: `<run>/training_config.yaml`. Wall time: the study's training processes, start-up "
        "included; tokens/s: median over the logged intervals.",
        "",
        "### Effective configuration",
        "",
        "Every key the study, a variant or `--quick` sets, as each run's `training_config.yaml` holds it.",
        "",
        _md_table(config_header, config_table),
        "",
    ]
    if warnings:
        md += ["## Warnings", "", *[f"- {w}" for w in warnings], ""]
    md += [
        "## Exploratory",
        "",
        _exploratory_sentence(conclusions.exploratory, confidence),
        "",
        explanation,
        "",
    ]

    body_html = []
    names = {q.name for q in quantities}
    for title, kind in sections:
        members = [q for q in quantities if q.kind == kind]
        if not members:
            continue
        md += [f"### {title}", ""]
        body_html.append(f"<h3>{html.escape(title)}</h3>")
        shown: set[str] = set()
        for quantity in members:
            group = plot_group(quantity, names)
            if group in plots and group not in shown:
                shown.add(group)
                md += [f"![{group}]({plots[group].relative_to(out).as_posix()})", ""]
                encoded = base64.b64encode(plots[group].read_bytes()).decode()
                body_html.append(f'<img alt="{html.escape(group)}" src="data:image/png;base64,{encoded}">')
            rows = quantity_rows(quantity, study.baseline)
            md += [f"#### {quantity.label}", "", _md_table(header, rows), ""]
            body_html.append(f"<h4>{html.escape(quantity.label)}</h4>" + _html_table(header, rows))
    if cross:
        cross_text = (
            "The study's comparative metrics between each variant's activations and the baseline's of the same "
            "seed, at the same step, on the same `val` data (1: the baseline's representation)."
        )
        md += ["## Cross-run learning dynamics", "", cross_text, ""]
        body_html.append(f"<h2>Cross-run learning dynamics</h2><p>{html.escape(cross_text)}</p>")
        for group in dict.fromkeys(q.name.split("/", 1)[0] for q in cross):
            members = [q for q in cross if q.name.split("/", 1)[0] == group]
            rows = cross_run_rows(members)
            md += [f"### {group}", "", f"![{group}]({plots[group].relative_to(out).as_posix()})", ""]
            md += [_md_table(CROSS_HEADER, rows), ""]
            encoded = base64.b64encode(plots[group].read_bytes()).decode()
            body_html.append(
                f"<h3>{html.escape(group)}</h3>"
                f'<img alt="{html.escape(group)}" src="data:image/png;base64,{encoded}">'
                + _html_table(CROSS_HEADER, rows)
            )
    if series_plot is not None:
        md += [
            "### Training series",
            "",
            f"![training series]({series_plot.relative_to(out).as_posix()})",
            "",
        ]
        encoded = base64.b64encode(series_plot.read_bytes()).decode()
        body_html.append(
            f'<h3>Training series</h3><img alt="training series" src="data:image/png;base64,{encoded}">'
        )
    md_path = out / REPORT_MD
    md_path.write_text("\n".join(md) + "\n")

    configs = "".join(
        f"<details><summary>{html.escape(run.spec.name)}</summary><pre>"
        + html.escape((run.spec.run_dir / "training_config.yaml").read_text())
        + "</pre></details>"
        for run in runs
        if (run.spec.run_dir / "training_config.yaml").is_file()
    )
    warnings_html = (
        "<h2>Warnings</h2><ul>" + "".join(f"<li>{html.escape(w)}</li>" for w in warnings) + "</ul>"
        if warnings
        else ""
    )
    notes_html = "".join(f"<li><b>{html.escape(k)}</b>: {html.escape(v)}</li>" for k, v in notes)
    verdicts_html = (
        _html_table(VERDICT_HEADER, [[c.strip("*") for c in row] for row in verdict_rows])
        if verdict_rows
        else "<p>No comparison.</p>"
    )
    power_html = (
        "<h3>Power</h3>" + _html_table(POWER_HEADER, _power_rows(conclusions.verdicts, study.baseline))
        if conclusions.verdicts
        else ""
    )
    targets_html = (
        "<h3>Steps to the baseline's final value</h3>"
        + _html_table(TARGET_HEADER, _target_rows(conclusions.targets))
        if conclusions.targets
        else ""
    )
    failures_html = "".join(
        f"<h3>Failed: {html.escape(o.spec.name)} (exit status {o.exit_status})</h3><pre>"
        + html.escape("\n".join(o.log_tail))
        + "</pre>"
        for o in failures
    )
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Study: {html.escape(study.name)}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 1200px; margin: 2em auto; padding: 0 1em; color: #222; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.88em; }}
th, td {{ border: 1px solid #ccc; padding: 0.2em 0.55em; text-align: left; }}
th {{ background: #f3f3f3; }}
img {{ max-width: 100%; }}
pre {{ font-size: 0.8em; background: #f7f7f7; padding: 0.5em; }}
</style></head><body>
<h1>Study: {html.escape(study.name)}</h1>
<ul>{notes_html}</ul>
<h2>Verdicts</h2><p>{html.escape(_verdict_explanation(study, confidence))}</p>{verdicts_html}
{power_html}{targets_html}{failures_html}
<h2>Configuration</h2>
<ul>{"".join(f"<li><b>{html.escape(k)}</b>: {html.escape(v)}</li>" for k, v in overview)}</ul>
<h2>Variants</h2>{_html_table(VARIANT_HEADER, _variant_rows(study, runs))}
<h2>Runs</h2>{_html_table(RUN_HEADER, _run_rows(runs))}
<p>Wall time: the study's training processes, start-up included; tokens/s: median over the logged intervals.</p>
<h3>Effective configuration</h3>{_html_table(config_header, config_table)}
<h3>Resolved configs</h3>{configs}
{warnings_html}
<h2>Exploratory</h2><p>{html.escape(_exploratory_sentence(conclusions.exploratory, confidence))}</p>
<p>{html.escape(explanation)}</p>
{"".join(body_html)}
</body></html>
"""
    html_path = out / REPORT_HTML
    html_path.write_text(page)
    return md_path, html_path


__all__ = [
    "PairedDifference",
    "Quantity",
    "RunData",
    "build_quantities",
    "mean_std",
    "paired_difference",
    "read_analysis",
    "read_eval_results",
    "read_run",
    "read_training_log",
    "write_study_report",
]
