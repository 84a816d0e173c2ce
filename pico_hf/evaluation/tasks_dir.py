"""Where pico-hf's lm-eval task configs and their offline data are: package data of `pico_hf`, so a plain
`pip install` has them as well as a source checkout.

    lm_eval --model hf --model_args pretrained=DIR --tasks pico_arc_easy \\
        --include_path "$(python -m pico_hf.evaluation.tasks_dir)"

Light on purpose (no torch, no lm-eval): `eval/run.py --help` and the shell line above import it.
"""

from __future__ import annotations

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent / "tasks"  # the `include_path` of lm-eval's TaskManager
DATA_DIR = Path(__file__).resolve().parent / "data"  # HellaSwag, ARC-Easy and BLiMP copies (see its NOTICE)

if __name__ == "__main__":
    print(TASKS_DIR)
