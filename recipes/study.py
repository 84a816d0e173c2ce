"""Run a study: every variant of a base training config x every seed, trained under identical conditions
(same data order and initial weights per seed, same evaluation), analysed, and compared in one report.

    python recipes/study.py --config recipes/configs/studies/norm-eps.yaml
    python recipes/study.py --config recipes/configs/studies/norm-eps.yaml --quick     # a few minutes on CPU
    python recipes/study.py --config my-idea.yaml --seeds 3     # on a finished study: trains only the new seeds
    python recipes/study.py --config my-idea.yaml --jobs 2      # two runs at once, each with half the threads
    accelerate launch recipes/study.py --config ...     # each run trains on every process launched

Writes `studies/<name>/` (`<name>-quick` with --quick): `runs/<variant>_seed<seed>/` (pico-train run folders,
each with its analysis in `analysis/`), `report.md`, a self-contained `report.html`, `summary.json` and
`plots/`. Runs already finished are reused untouched; an interrupted run resumes from its latest checkpoint.
A run that fails does not stop the others; the report lists it (exit status, last lines of its output).
Exit status: 0 done, 1 a run failed (the report is written all the same), 2 a bad study config (nothing
trained).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pico_hf.configuration import ConfigError, error_lines
from pico_hf.study import StudyError, load_study_config, run_study, write_study_report
from pico_hf.study.runner import FAILED, is_main_process

TRAIN_SCRIPT = Path(__file__).resolve().parent / "train.py"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", type=Path, required=True, help="study config (YAML)")
    parser.add_argument("--seeds", type=int, help="number of seeds (the study's first N, continued if more)")
    parser.add_argument("--quick", action="store_true", help="the study's quick form (its `quick` section)")
    parser.add_argument(
        "--output_dir", type=Path, default=Path("studies"), help="where studies go (studies/)"
    )
    parser.add_argument(
        "--report_only", action="store_true", help="only rewrite the report from the runs' files"
    )
    parser.add_argument("--jobs", type=int, default=1, help="runs trained at once (each its own process)")
    parser.add_argument(
        "--in_process", action="store_true", help="train in this process instead of one train.py per run"
    )
    args = parser.parse_args(argv)
    try:
        study = load_study_config(args.config, seeds=args.seeds, quick=args.quick, output_dir=args.output_dir)
        outcomes, warnings = [], []
        if not args.report_only:
            outcomes, warnings = run_study(
                study, TRAIN_SCRIPT, in_process=args.in_process or None, jobs=args.jobs
            )
        if is_main_process():
            md, html = write_study_report(study, outcomes, warnings)
            print(f"Study {study.name}: {len(study.runs)} runs; report: {md} and {html}")
        from pico_hf.training.run import end_process_group

        end_process_group()
        failed = [o for o in outcomes if o.status == FAILED]
        if failed:
            names = ", ".join(f"{o.spec.name} (exit status {o.exit_status})" for o in failed)
            print(f"error: {len(failed)} run(s) failed: {names}; see the report", file=sys.stderr)
            return 1
    except ConfigError as error:
        print(error_lines(error), file=sys.stderr)
        return 2
    except StudyError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
