"""What `--jobs 2` saves on a whole study: the wall time of `recipes/study.py --quick` with `--jobs 1` (the
reference) and `--jobs 2`, side by side in this process, each in a fresh output folder (every run trained,
the report written: what a user waits for).

The default study is norm-eps, the smallest shipped quick study (4 runs of 40 steps of the demo model at 64
tokens, no training mode of its own). `--rounds R` alternates the two (1, 2, 1, 2, ...) so that a change in
the machine's load hits both; the load average and CPU count are printed with the times, since on a shared
machine they decide the ratio.

    python benchmarks/bench_study_jobs.py [--config recipes/configs/studies/norm-eps.yaml] [--rounds 1]

Prints one JSON object: seconds per round for each `--jobs`, their medians, and `speedup_jobs2`: the
`--jobs 1` median over the `--jobs 2` median.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STUDY_SCRIPT = REPO / "recipes" / "study.py"
NORM_EPS = REPO / "recipes" / "configs" / "studies" / "norm-eps.yaml"


def study_seconds(config: Path, jobs: int, root: Path) -> float:
    command = [sys.executable, str(STUDY_SCRIPT), "--config", str(config), "--quick", "--jobs", str(jobs)]
    command += ["--output_dir", str(root / f"jobs{jobs}")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"error: --jobs {jobs} failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=NORM_EPS)
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    seconds: dict[int, list[float]] = {1: [], 2: []}
    load = [os.getloadavg()[0]]
    for round_ in range(args.rounds):
        for jobs in (1, 2):
            with tempfile.TemporaryDirectory() as tmp:
                seconds[jobs].append(round(study_seconds(args.config, jobs, Path(tmp)), 1))
            load.append(os.getloadavg()[0])
            print(
                f"round {round_ + 1}: --jobs {jobs} took {seconds[jobs][-1]} s", file=sys.stderr, flush=True
            )
    medians = {jobs: statistics.median(s) for jobs, s in seconds.items()}
    print(
        json.dumps(
            {
                "study": str(
                    args.config.relative_to(REPO) if args.config.is_relative_to(REPO) else args.config
                ),
                "cpus": os.cpu_count(),
                "load_average_1min": [round(x, 2) for x in load],  # before, then after each study
                "seconds_jobs1": seconds[1],
                "seconds_jobs2": seconds[2],
                "median_jobs1": medians[1],
                "median_jobs2": medians[2],
                "speedup_jobs2": round(medians[1] / medians[2], 3),
            }
        )
    )


if __name__ == "__main__":
    main()
