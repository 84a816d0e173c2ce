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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from ..evaluation.results import read_eval_results
from .config import RunSpec, StudyConfig
from .runner import ANALYSIS_DIR, TIMING_FILE, RunOutcome

REPORT_MD = "report.md"
REPORT_HTML = "report.html"
SUMMARY_JSON = "summary.json"
PLOTS_DIR = "plots"
CONFIDENCE = 0.95
TRAIN_LOSS = "train/loss"
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


def read_run(spec: RunSpec, status: str = "reused") -> RunData:
    run_dir = spec.run_dir
    loss, speeds, tokens = read_training_log(run_dir)
    evals, datasets = read_eval_results(run_dir / spec.config.checkpointing.evaluation.eval_results_dir)
    if "paloma" in evals and "paloma" not in datasets:  # files without a `dataset` field: the run's config
        datasets["paloma"] = spec.config.evaluation.paloma.dataset_name
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


def _draw(ax, quantity: Quantity, colours: Mapping[str, tuple]) -> None:
    """Seeds as thin lines, the mean over seeds as a thick one, one colour per variant."""
    for variant, by_seed in quantity.series.items():
        colour = colours[variant]
        for seed_series in by_seed.values():
            steps = sorted(seed_series)
            ax.plot(steps, [seed_series[s] for s in steps], color=colour, linewidth=0.7, alpha=0.4)
        steps = sorted({s for seed_series in by_seed.values() for s in seed_series})
        means = [statistics.fmean([ss[s] for ss in by_seed.values() if s in ss]) for s in steps]
        ax.plot(steps, means, color=colour, linewidth=2.2, marker="o" if len(steps) <= 25 else None, ms=3)
    values = [v for by_seed in quantity.series.values() for s in by_seed.values() for v in s.values()]
    finite = [v for v in values if math.isfinite(v)]
    if finite and min(finite) > 0 and max(finite) / min(finite) > 1e3:
        ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.set_xlabel("step")


def _legend(fig: Figure, variants: Sequence[str], colours: Mapping[str, tuple]) -> None:
    handles = [Line2D([], [], color=colours[v], linewidth=2.2, label=f"{v} (mean)") for v in variants]
    handles.append(Line2D([], [], color="grey", linewidth=0.7, alpha=0.6, label="single seeds"))
    fig.legend(handles=handles, loc="outside right upper", fontsize="small", frameon=False)


def plot_quantities(
    quantities: Sequence[Quantity], variants: Sequence[str], plots_dir: Path
) -> dict[str, Path]:
    """One PNG per training/evaluation quantity, and one per learning-dynamics result (a panel per component).
    Returns {plot title: path}."""
    colours = variant_colours(variants)
    plots_dir.mkdir(parents=True, exist_ok=True)
    groups: dict[str, list[Quantity]] = {}
    for quantity in quantities:
        group = quantity.name if quantity.kind != "learning dynamics" else quantity.name.split("/", 1)[0]
        groups.setdefault(group, []).append(quantity)
    paths = {}
    for group, members in groups.items():
        columns = min(len(members), 3)
        rows = math.ceil(len(members) / columns)
        fig = Figure(figsize=(4.2 * columns + 1.8, 3.2 * rows), dpi=100, layout="constrained")
        FigureCanvasAgg(fig)
        for index, quantity in enumerate(members):
            ax = fig.add_subplot(rows, columns, index + 1)
            _draw(ax, quantity, colours)
            title = quantity.label if len(members) == 1 else quantity.name.split("/", 1)[1]
            ax.set_title(title, fontsize="small")
        if len(members) > 1:
            fig.suptitle(group)
        _legend(fig, [v for v in variants if any(v in q.series for q in members)], colours)
        path = plots_dir / (re.sub(r"[^A-Za-z0-9._-]+", "_", group).strip("_") + ".png")
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
                ]
            )
    return rows


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
    return ["step", "variant", "seeds", "mean", "std", f"- baseline [{confidence:.0%} CI, paired]"]


def summary_dict(
    study: StudyConfig, runs: Sequence[RunData], quantities: Sequence[Quantity], confidence: float
) -> dict[str, Any]:
    def cell(c: Cell) -> dict[str, Any]:
        out: dict[str, Any] = {
            "values": {str(s): v for s, v in c.values.items()},
            "mean": c.mean,
            "std": c.std,
        }
        if c.difference is not None:
            out["difference"] = vars(c.difference)
        return out

    return {
        "study": study.describe(),
        "confidence": confidence,
        "runs": [
            {
                "variant": r.spec.variant,
                "seed": r.spec.seed,
                "status": r.status,
                "run_dir": str(r.spec.run_dir),
                "overrides": list(r.spec.overrides),
                "wall_seconds": r.wall_seconds,
                "tokens": r.tokens,
                "tokens_per_second": r.tokens_per_second,
            }
            for r in runs
        ],
        "quantities": {
            q.name: {
                "label": q.label,
                "kind": q.kind,
                "steps": {str(step): {v: cell(c) for v, c in row.items()} for step, row in q.cells.items()},
            }
            for q in quantities
        },
    }


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
    runs = [read_run(spec, status.get(spec.name, "reused")) for spec in study.runs]
    quantities = build_quantities(study, runs)
    variants = list(study.variants)
    plots = plot_quantities(quantities, variants, out / PLOTS_DIR)
    (out / SUMMARY_JSON).write_text(json.dumps(summary_dict(study, runs, quantities, confidence), indent=1))

    header = _table_header(confidence)
    overview = [
        ("base config", _shown_path(study.base_config)),
        ("variants", ", ".join(variants) + f" (baseline: {study.baseline})"),
        ("seeds", ", ".join(map(str, study.seeds))),
        ("common overrides", " ".join(study.overrides) or "none"),
        ("evaluation", " ".join(study.evaluation) or "the base config's"),
        ("generated", datetime.now().strftime("%Y-%m-%d %H:%M:%S")),
    ]
    explanation = (
        "Each table gives, per checkpoint step and variant, the mean and standard deviation over seeds, and "
        "the variant's difference from the baseline paired by seed (same seed: same initial weights and "
        f"data order): the mean per-seed difference and its {confidence:.0%} Student-t interval."
    )
    sections = [
        ("Training loss", "training"),
        ("Evaluation", "evaluation"),
        ("Learning dynamics", "learning dynamics"),
    ]

    md = [f"# Study: {study.name}", ""]
    md += [f"- **{k}**: {v}" for k, v in overview]
    md += ["", "## Variants", "", _md_table(VARIANT_HEADER, _variant_rows(study, runs)), ""]
    md += ["## Runs", "", _md_table(RUN_HEADER, _run_rows(runs)), ""]
    md += [
        "Resolved configs: `<run>/training_config.yaml`. Wall time: the study's training processes, start-up "
        "included; tokens/s: median over the logged intervals.",
        "",
    ]
    if warnings:
        md += ["## Warnings", "", *[f"- {w}" for w in warnings], ""]
    md += [explanation, ""]

    body_html = []
    for title, kind in sections:
        members = [q for q in quantities if q.kind == kind]
        if not members:
            continue
        md += [f"## {title}", ""]
        body_html.append(f"<h2>{html.escape(title)}</h2>")
        shown: set[str] = set()
        for quantity in members:
            group = quantity.name if kind != "learning dynamics" else quantity.name.split("/", 1)[0]
            if group in plots and group not in shown:
                shown.add(group)
                md += [f"![{group}]({plots[group].relative_to(out).as_posix()})", ""]
                encoded = base64.b64encode(plots[group].read_bytes()).decode()
                body_html.append(f'<img alt="{html.escape(group)}" src="data:image/png;base64,{encoded}">')
            rows = quantity_rows(quantity, study.baseline)
            md += [f"### {quantity.label}", "", _md_table(header, rows), ""]
            body_html.append(f"<h3>{html.escape(quantity.label)}</h3>" + _html_table(header, rows))
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
<ul>{"".join(f"<li><b>{html.escape(k)}</b>: {html.escape(v)}</li>" for k, v in overview)}</ul>
<h2>Variants</h2>{_html_table(VARIANT_HEADER, _variant_rows(study, runs))}
<h2>Runs</h2>{_html_table(RUN_HEADER, _run_rows(runs))}
<p>Wall time: the study's training processes, start-up included; tokens/s: median over the logged intervals.</p>
<h3>Resolved configs</h3>{configs}
{warnings_html}
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
