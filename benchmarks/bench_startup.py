"""How long a user waits for `--help` and for a config error: the recipes parse and validate before any heavy
import (torch, transformers, datasets, lm-eval). Each command runs in a fresh interpreter, best of `--repeats`
(the machine is shared, so the best run is the one least disturbed). Prints one JSON object: seconds per
command, and `slowest` (goal < 1.5).

    python benchmarks/bench_startup.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMMANDS = {
    "train.py --help": ["recipes/train.py", "--help"],
    "train.py unknown key": ["recipes/train.py", "model.d_modl=64"],
    "train.py bad value": ["recipes/train.py", "training.optimization.lr=-1"],
    "analyze.py --help": ["recipes/analyze.py", "--help"],
    "eval/run.py --help": ["eval/run.py", "--help"],
    "import pico_hf": ["-c", "import pico_hf"],
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    seconds = {}
    for name, command in COMMANDS.items():
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            subprocess.run([sys.executable, *command], cwd=REPO, env=env, capture_output=True, check=False)
            times.append(time.perf_counter() - start)
        seconds[name] = round(min(times), 2)
    print(json.dumps({"seconds": seconds, "slowest": max(seconds.values()), "goal": "< 1.5"}, indent=2))


if __name__ == "__main__":
    main()
