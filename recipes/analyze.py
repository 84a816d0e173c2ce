"""Analyse the learning dynamics of a training run, offline: pico-analyze's job, with its config format.

    python recipes/analyze.py --config recipes/configs/analysis/demo.yaml --run_path runs/pico-decoder-demo
    python recipes/analyze.py --config recipes/configs/analysis/pico-decoder-ov.yaml \\
        --repo_id pico-lm/pico-decoder-tiny --branch pico-decoder-tiny-1

Writes `<output_dir>/<analysis_name>/step_<N>/<metric>_<split>.json`, `analysis.log`, a PNG per metric under
`plots/` and `report.md` / `report.html` (with a local run's evaluation results, `eval_results/step_N.json`,
plotted against step beside the metrics); an existing analysis of the same name is replaced only with
`--overwrite`. A local run may come from pico-hf or from the original pico-train
(`.pt` files). Exit status: 0 when something was analysed (missing steps are warnings), 1 when nothing could
be (or the run cannot be read), 2 for a bad config.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--config", "--config_path", dest="config", type=Path, required=True, help="analysis config (YAML)"
    )
    where = parser.add_argument_group("the run (one of)")
    where.add_argument("--run_path", type=Path, help="a local run directory, e.g. runs/pico-decoder-demo")
    where.add_argument("--repo_id", help="a Hub model repo, e.g. pico-lm/pico-decoder-tiny (with --branch)")
    where.add_argument("--branch", help="the Hub branch holding the run's commits, e.g. pico-decoder-tiny-1")
    parser.add_argument("--no_report", action="store_true", help="skip the plots and report")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing analysis of the same name (else refused)",
    )
    args = parser.parse_args(argv)
    if args.run_path is not None and (args.repo_id or args.branch):
        parser.error("give either --run_path or --repo_id with --branch, not both")
    if args.run_path is None and not (args.repo_id and args.branch):
        parser.error("give --run_path, or both --repo_id and --branch")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Heavy imports (torch, the metrics, matplotlib) once the arguments are known to be good.
    from rich.console import Console
    from rich.logging import RichHandler
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.text import Text

    from pico_hf.learning_dynamics.analysis_config import load_analysis_config
    from pico_hf.learning_dynamics.analysis_sources import AnalysisError, CheckpointSource, HubRun, LocalRun
    from pico_hf.learning_dynamics.analyze import LOG_DATE_FORMAT, LOG_FORMAT, run_analysis
    from pico_hf.learning_dynamics.report import (
        plot_results,
        read_evaluations,
        read_training_curves,
        write_report,
    )
    from pico_hf.training.config import ConfigError

    console = Console(stderr=True)
    if console.is_terminal:
        handler: logging.Handler = RichHandler(
            console=console, show_path=False, markup=False, log_time_format="[%X]"
        )
    else:  # piped or captured: whole lines, pico-analyze's format
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(LOG_FORMAT, datefmt=LOG_DATE_FORMAT))
    handler.setLevel(logging.INFO)
    logger = logging.getLogger("pico_hf.analyze")
    logger.addHandler(handler)
    propagate, logger.propagate = logger.propagate, False  # one console line per message

    def progress(steps: Iterable[int], total: int) -> Iterator[int]:
        columns = (
            TextColumn("[progress.description]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
        )
        with Progress(*columns, console=console, transient=True, disable=not console.is_terminal) as bar:
            task = bar.add_task("analysing", total=total)
            for step in steps:
                bar.update(task, description=f"step {step}")
                yield step
                bar.advance(task)

    try:
        config = load_analysis_config(args.config)
        source: CheckpointSource = (
            LocalRun(args.run_path) if args.run_path is not None else HubRun(args.repo_id, args.branch)
        )
        result = run_analysis(config, source, progress=progress, overwrite=args.overwrite)
    except (ConfigError, AnalysisError) as error:
        console.print(Text.assemble(("error: ", "bold red"), str(error)), soft_wrap=True)
        return 2 if isinstance(error, ConfigError) else 1
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate

    if not args.no_report:
        plots = plot_results(result)
        # The run's evaluation results and training curves beside the analysis: a local run's own files, or
        # what the branch's commits carry.
        eval_dir, logs_dir = source.record_dirs()
        try:
            records = source.run_records()
        except AnalysisError as error:
            console.print(Text.assemble(("error: ", "bold red"), str(error)), soft_wrap=True)
            return 1
        evaluations = read_evaluations(records, eval_dir)
        curves = read_training_curves(records / logs_dir / "metrics.jsonl")
        md, html = write_report(result, plots, evaluations, curves)
        console.print(f"Report: {md.name} and {html.name}, plots in plots/", soft_wrap=True)
    print(result.output_dir)  # the one line on stdout: where everything is
    return 0


if __name__ == "__main__":
    sys.exit(main())
