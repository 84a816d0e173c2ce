"""Plots and a one-page report of a learning-dynamics analysis.

One PNG per result (`plots/<result_name>_<split>.png`): value against step, a line per component key. Keys
are coloured by layer and styled by component (line style), per-head OV lines are drawn thin and faint
behind the layer's full OV line, so a 12-layer, 12-head analysis stays readable. `report.md` and a
self-contained `report.html` (plots embedded) summarise the config, what was skipped, and the last step's
values. The run's evaluation results (`eval_results/step_N.json`: Paloma, lm-eval scores) are plotted
against step beside them, one PNG each (`plots/eval_<name>.png`), in an Evaluation section, and its training
curves (`logs/metrics.jsonl`: loss, learning rate, gradient norm, ...) in a Training section
(`plots/train_<name>.png`), for a local run and for a run read from the Hub alike.
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from .analysis_config import result_stem
from .analyze import AnalysisResult

PLOTS_DIR = "plots"
REPORT_MD = "report.md"
REPORT_HTML = "report.html"
# `layers.3.ov_circuit.weights.heads.5` -> prefix `layers.`, layer 3, component `ov_circuit.weights`, head 5.
_KEY = re.compile(r"^(?P<prefix>.*?)(?P<layer>\d+)\.(?P<component>.+?)(?:\.heads\.(?P<head>\d+))?$")
_LINE_STYLES = ("-", "--", ":", "-.")
_MARKERS = ("o", "s", "^", "D", "v", "P")
MAX_PLAIN_LEGEND = 10  # more lines than this: legend by layer colour and component style instead


@dataclass(frozen=True)
class ParsedKey:
    layer: int | None
    component: str
    head: int | None


def parse_key(key: str) -> ParsedKey:
    match = _KEY.match(key)
    if match is None:
        return ParsedKey(None, key, None)
    head = match["head"]
    return ParsedKey(int(match["layer"]), match["component"], None if head is None else int(head))


def _layer_colours(layers: Sequence[int]) -> dict[int, tuple]:
    if len(layers) <= 10:
        palette = colormaps["tab10"]
        return {layer: palette(i) for i, layer in enumerate(layers)}
    palette = colormaps["viridis"]
    return {layer: palette(i / max(len(layers) - 1, 1) * 0.92) for i, layer in enumerate(layers)}


def plot_result(
    stem: str, by_step: Mapping[int, Mapping[str, float]], path: Path, target: int | None = None
) -> Path:
    """Plot one result's values against step; returns the PNG's path. `target`: the step a comparative
    metric compares with, named in the title."""
    steps = sorted(by_step)
    keys = list(dict.fromkeys(key for step in steps for key in by_step[step]))
    parsed = {key: parse_key(key) for key in keys}
    layers = sorted({p.layer for p in parsed.values() if p.layer is not None})
    components = list(dict.fromkeys(p.component for p in parsed.values()))
    colours = _layer_colours(layers)
    styles = {
        c: (_LINE_STYLES[i % len(_LINE_STYLES)], _MARKERS[i % len(_MARKERS)])
        for i, c in enumerate(components)
    }
    few_steps = len(steps) <= 25

    # The Agg canvas directly, not pyplot: no global backend or figure state is touched.
    fig = Figure(figsize=(9, 4.8), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    labelled = [key for key in keys if parsed[key].head is None]
    plain_legend = len(labelled) <= MAX_PLAIN_LEGEND
    has_heads = False
    for index, key in enumerate(keys):
        info = parsed[key]
        values = [by_step[step].get(key, math.nan) for step in steps]
        colour = colours.get(info.layer, colormaps["tab10"](index % 10))
        style, marker = styles[info.component]
        if info.head is not None:
            has_heads = True
            ax.plot(steps, values, color=colour, linestyle=style, linewidth=0.6, alpha=0.35, zorder=1)
            continue
        label = key if plain_legend else None
        ax.plot(
            steps,
            values,
            color=colour,
            linestyle=style,
            linewidth=1.8,
            marker=marker if few_steps else None,
            markersize=3.5,
            label=label,
            zorder=2,
        )

    finite = [
        v for step in steps for v in by_step[step].values() if isinstance(v, float) and math.isfinite(v)
    ]
    # Condition numbers and norms can span decades: a log axis keeps every line visible.
    if finite and min(finite) > 0 and max(finite) / min(finite) > 1e3:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(stem.rsplit("_", 1)[0])
    title = stem if target is None else f"{stem}, compared with step {target}"
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if len(steps) == 1:
        ax.set_xticks(steps)

    handles: list[Line2D] = []
    if plain_legend:
        handles = list(ax.get_legend_handles_labels()[0])
    else:
        handles += [
            Line2D([], [], color=colours[layer], linewidth=2, label=f"layer {layer}") for layer in layers
        ]
        if len(components) > 1:
            handles += [Line2D([], [], color="black", linestyle=styles[c][0], label=c) for c in components]
    if has_heads:
        handles.append(Line2D([], [], color="grey", linewidth=0.6, alpha=0.6, label="single heads (thin)"))
    if handles:
        ax.legend(
            handles=handles,
            loc="upper left",
            bbox_to_anchor=(1.01, 1.0),
            fontsize="small",
            frameon=False,
            ncol=2 if len(handles) > 16 else 1,
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight", metadata={"Title": title})  # the title is readable from the file
    return path


def comparison_targets(result: AnalysisResult) -> dict[str, int]:
    """result stem -> the step its comparative metric (CKA, PWCCA) compares every step with."""
    return {
        result_stem(spec): spec.target_checkpoint
        for spec in result.config.metrics
        if spec.target_checkpoint is not None and spec.build().comparative
    }


def plot_results(result: AnalysisResult) -> dict[str, Path]:
    """A PNG per result under `<output_dir>/plots/`."""
    targets = comparison_targets(result)
    return {
        stem: plot_result(stem, by_step, result.output_dir / PLOTS_DIR / f"{stem}.png", targets.get(stem))
        for stem, by_step in result.results.items()
    }


def read_evaluations(run_dir: Path, results_dir: str = "eval_results") -> dict[str, dict[int, float]]:
    """{name: {step: value}} from a run's `eval_results/step_N.json` (nested scores as `task/metric`), a
    perplexity labelled with its dataset when the files name one (e.g. `paloma (pico-lm/pretokenized-paloma-tinsy)`)."""
    from ..evaluation.results import read_eval_results

    series, datasets = read_eval_results(Path(run_dir) / results_dir)
    # `dataset` names the perplexity's texts; an lm-eval task's scores (`task/metric`) name their task.
    return {
        (f"{name} ({datasets[name]})" if name in datasets and "/" not in name else name): s
        for name, s in series.items()
    }


def read_training_curves(metrics_file: Path) -> dict[str, dict[int, float]]:
    """{name: {step: value}} of every numeric value of the training log rows of `logs/metrics.jsonl` (those
    with a loss: loss, learning rate, gradient norm, tokens/s, ...); {} when the file does not exist."""
    curves: dict[str, dict[int, float]] = {}
    if not Path(metrics_file).is_file():
        return curves
    for line in Path(metrics_file).read_text().splitlines():
        row = json.loads(line) if line.strip() else {}
        if "loss" not in row:  # evaluation rows have their own section; the run's summary is one value
            continue
        for name, value in row.items():
            if (
                name not in ("step", "epoch")
                and isinstance(value, (int, float))
                and not isinstance(value, bool)
            ):
                curves.setdefault(name, {})[int(row["step"])] = float(value)
    return curves


def _eval_stem(name: str, prefix: str = "eval") -> str:
    return f"{prefix}_" + re.sub(r"[^A-Za-z0-9._-]+", "_", name.split(" (")[0]).strip("_")


def plot_evaluations(
    evaluations: Mapping[str, Mapping[int, float]], output_dir: Path, prefix: str = "eval"
) -> dict[str, Path]:
    """A PNG per evaluation value (or training curve, with prefix "train") under `<output_dir>/plots/`,
    keyed by its name."""
    return {
        name: plot_result(
            _eval_stem(name, prefix),
            {step: {name: value} for step, value in series.items()},
            output_dir / PLOTS_DIR / f"{_eval_stem(name, prefix)}.png",
        )
        for name, series in evaluations.items()
    }


# --- the report -------------------------------------------------------------------------------------------


def _format(value: float) -> str:
    return f"{value:.6g}" if isinstance(value, (int, float)) else str(value)


def last_step_rows(values: Mapping[str, float]) -> list[tuple[str, str]]:
    """Table rows of one step's values: single heads collapsed into one mean (min to max) row per layer."""
    rows: list[tuple[str, str]] = []
    heads: dict[str, list[float]] = {}
    for key, value in values.items():
        if parse_key(key).head is None:
            rows.append((key, _format(value)))
        else:
            heads.setdefault(key.rsplit(".heads.", 1)[0], []).append(value)
    for base, head_values in heads.items():
        finite = [v for v in head_values if math.isfinite(v)]
        summary = (
            f"mean {_format(sum(finite) / len(finite))} (min {_format(min(finite))}, max {_format(max(finite))})"
            if finite
            else "nan"
        )
        row = (f"{base}.heads.* ({len(head_values)} heads)", summary)
        position = next((i + 1 for i, (key, _) in enumerate(rows) if key == base), len(rows))
        rows.insert(position, row)
    return rows


def _components_summary(spec) -> str:
    parts = []
    for component in spec.components:
        suffixes = component.layer_suffixes
        if not isinstance(suffixes, str):
            suffixes = ", ".join(f"{role}={suffix}" for role, suffix in suffixes)
        layers = list(component.layers)
        parts.append(f"{component.component_name} {component.data_type} [{suffixes}] layers {layers}")
    return "; ".join(parts)


def _config_rows(result: AnalysisResult) -> list[list[str]]:
    rows = []
    for spec in result.config.metrics:
        options = ", ".join(f"{k}={v}" for k, v in spec.options.items()) or "-"
        target = "-" if spec.target_checkpoint is None else str(spec.target_checkpoint)
        rows.append(
            [
                result_stem(spec),
                spec.metric_name,
                options,
                str(spec.data_split),
                target,
                _components_summary(spec),
            ]
        )
    return rows


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    def cell(text: str) -> str:
        return str(text).replace("|", "\\|")

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _html_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def write_report(
    result: AnalysisResult,
    plots: Mapping[str, Path] | None = None,
    evaluations: Mapping[str, Mapping[int, float]] | None = None,
    curves: Mapping[str, Mapping[int, float]] | None = None,
) -> tuple[Path, Path]:
    """Write `report.md` and `report.html` into the analysis folder (plots made if not given); `evaluations`
    ({name: {step: value}}, see `read_evaluations`) adds an Evaluation section, `curves` (see
    `read_training_curves`) a Training section."""
    plots = dict(plots) if plots is not None else plot_results(result)
    evaluations = dict(evaluations or {})
    eval_plots = plot_evaluations(evaluations, result.output_dir) if evaluations else {}
    curves = dict(curves or {})
    curve_plots = plot_evaluations(curves, result.output_dir, prefix="train") if curves else {}
    out = result.output_dir
    name = out.name
    steps = result.steps
    config_header = ["result", "metric", "options", "split", "target step", "components"]
    config_rows = _config_rows(result)
    skipped = [s.describe() for s in result.skipped]
    generated = datetime.now().strftime("%Y-%m-%d %H:%M:%S")
    summary = [
        ("source", result.source),
        ("steps analysed", ", ".join(map(str, steps))),
        (
            "steps requested",
            "every step found" if result.config.steps is None else ", ".join(map(str, result.config.steps)),
        ),
        ("generated", generated),
    ]

    md = [f"# Learning-dynamics analysis: {name}", ""]
    md += [f"- **{label}**: {value}" for label, value in summary]
    md += ["", "## Configuration", "", _md_table(config_header, config_rows), ""]
    if skipped or result.notes:
        md += ["## Warnings", ""]
        md += [f"- {line}" for line in skipped + result.notes]
        md.append("")
    md += ["## Results", ""]
    html_sections = []
    targets = comparison_targets(result)
    for stem, by_step in result.results.items():
        last = max(by_step)
        rows = last_step_rows(by_step[last])
        # A comparative value is against its target step: at the target itself it is 1 by definition.
        header = ["component", "value" if stem not in targets else f"value vs step {targets[stem]}"]
        md += [f"### {stem}", ""]
        if stem in plots:
            md += [f"![{stem}]({plots[stem].relative_to(out).as_posix()})", ""]
        md += [f"Values at step {last}:", "", _md_table(header, rows), ""]
        image = ""
        if stem in plots:
            encoded = base64.b64encode(plots[stem].read_bytes()).decode()
            image = f'<img alt="{html.escape(stem)}" src="data:image/png;base64,{encoded}">'
        html_sections.append(
            f"<h3>{html.escape(stem)}</h3>{image}<p>Values at step {last}:</p>" + _html_table(header, rows)
        )
    if evaluations:
        md += ["## Evaluation", ""]
        html_sections.append("<h2>Evaluation</h2>")
    for name, series in evaluations.items():
        rows = [[str(step), _format(value)] for step, value in sorted(series.items())]
        path = eval_plots[name]
        md += [f"### {name}", "", f"![{name}]({path.relative_to(out).as_posix()})", ""]
        md += [_md_table(["step", "value"], rows), ""]
        encoded = base64.b64encode(path.read_bytes()).decode()
        html_sections.append(
            f'<h3>{html.escape(name)}</h3><img alt="{html.escape(name)}" src="data:image/png;base64,{encoded}">'
            + _html_table(["step", "value"], rows)
        )
    if curves:
        md += ["## Training", ""]
        html_sections.append("<h2>Training</h2>")
    for name, series in curves.items():
        path = curve_plots[name]
        last = max(series)
        md += [f"### {name}", "", f"![{name}]({path.relative_to(out).as_posix()})", ""]
        md += [f"{len(series)} logged steps, {_format(series[last])} at step {last}.", ""]
        encoded = base64.b64encode(path.read_bytes()).decode()
        html_sections.append(
            f'<h3>{html.escape(name)}</h3><img alt="{html.escape(name)}" src="data:image/png;base64,{encoded}">'
            f"<p>{len(series)} logged steps, {html.escape(_format(series[last]))} at step {last}.</p>"
        )
    md_path = out / REPORT_MD
    md_path.write_text("\n".join(md) + "\n")

    warnings_html = ""
    if skipped or result.notes:
        items = "".join(f"<li>{html.escape(line)}</li>" for line in skipped + result.notes)
        warnings_html = f"<h2>Warnings</h2><ul>{items}</ul>"
    summary_html = "".join(f"<li><b>{html.escape(k)}</b>: {html.escape(v)}</li>" for k, v in summary)
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(name)}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }}
th, td {{ border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }}
th {{ background: #f3f3f3; }}
img {{ max-width: 100%; }}
</style></head><body>
<h1>Learning-dynamics analysis: {html.escape(name)}</h1>
<ul>{summary_html}</ul>
<h2>Configuration</h2>{_html_table(config_header, config_rows)}
{warnings_html}
<h2>Results</h2>
{"".join(html_sections)}
</body></html>
"""
    html_path = out / REPORT_HTML
    html_path.write_text(page)
    return md_path, html_path


__all__ = [
    "last_step_rows",
    "parse_key",
    "plot_evaluations",
    "plot_result",
    "plot_results",
    "read_evaluations",
    "read_training_curves",
    "write_report",
]
