"""MAML pretraining's cost: a meta step vs an LM step, and a hybrid run vs a baseline run.

The MAML demo config (recipes/configs/maml-demo.yaml: demo model and data, one group of 8 sequences a step,
16-way episodes with 4 support positions per sequence, 10 inner steps; `--objective smlmt` for Bansal et al.'s
episodes) trained by PicoTrainer in one process, with and without `training.maml`, alternating rounds; the first
steps of each run are warm-up. Prints one JSON object:

- meta_vs_lm_step: median wall time of a meta step (every group a meta episode) / of an LM step (none) in the same
  hybrid run (goal < 1.3; `meta_vs_lm_step_mean` is the same with means);
- hybrid_vs_baseline: tokens/s of the hybrid run / tokens/s of the baseline run.

    python benchmarks/bench_maml.py [--steps 20] [--rounds 2] [--objective paper|smlmt]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from statistics import mean, median

import torch
from transformers import TrainerCallback, set_seed

from pico_hf.training.config import load_config
from pico_hf.training.maml import is_meta_group, is_meta_step
from pico_hf.training.run import build_job

CONFIG = Path(__file__).resolve().parents[1] / "recipes" / "configs" / "maml-demo.yaml"
WARMUP_STEPS = 2


class StepTimes(TrainerCallback):
    """Wall time of each optimizer step, from its first micro-batch to the end of its update."""

    def __init__(self) -> None:
        self.durations: dict[int, float] = {}

    def on_step_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.durations[state.global_step - 1] = time.perf_counter() - self.start


def run(steps: int, runs_dir: str, maml: bool, objective: str) -> dict[int, float]:
    config, _ = load_config(
        CONFIG,
        [
            f"training.max_steps={steps}",
            f"training.maml.enabled={str(maml).lower()}",
            f"training.maml.objective={objective}",
            f"checkpointing.runs_dir={runs_dir}",
            f"checkpointing.save_every_n_steps={steps * 10}",
            "checkpointing.learning_dynamics.layer_suffixes=[]",
            "checkpointing.learning_dynamics.metrics=[]",
            "evaluation.metrics=[]",
            "monitoring.logging.log_every_n_steps=1000",
            "training_arguments.disable_tqdm=true",
        ],
    )
    timer = StepTimes()
    job = build_job(config, extra_callbacks=[timer])
    set_seed(config.training.seed)
    job.trainer.train()
    return {step: t for step, t in timer.durations.items() if step >= WARMUP_STEPS}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--objective", choices=["paper", "smlmt"], default="paper")
    args = parser.parse_args()

    config, _ = load_config(CONFIG)
    seed, ratio = config.training.seed, config.training.maml.hybrid_ratio
    groups = config.data.dataloader.batch_size // config.training.maml.episode_sequences

    def meta_groups(step: int) -> list[bool]:
        if args.objective == "smlmt":
            return [is_meta_step(seed, step, ratio)] * groups
        return [is_meta_group(seed, step, g, ratio) for g in range(groups)]

    tokens_per_step = config.data.dataloader.batch_size * config.model.max_seq_len
    meta, lm, hybrid_rates, baseline_rates = [], [], [], []
    for round_idx in range(args.rounds):
        for maml in [True, False] if round_idx % 2 == 0 else [False, True]:
            with tempfile.TemporaryDirectory() as runs_dir:
                durations = run(args.steps, runs_dir, maml, args.objective)
            rate = tokens_per_step * len(durations) / sum(durations.values())
            if maml:
                hybrid_rates.append(rate)
                for step, seconds in durations.items():
                    if all(meta_groups(step)):
                        meta.append(seconds)
                    elif not any(meta_groups(step)):
                        lm.append(seconds)
            else:
                baseline_rates.append(rate)

    meta_step, lm_step = median(meta), median(lm)
    hybrid, baseline = max(hybrid_rates), max(baseline_rates)
    print(
        json.dumps(
            {
                "objective": args.objective,
                "threads": torch.get_num_threads(),
                "steps_timed": {"meta": len(meta), "lm": len(lm)},
                "median_step_seconds": {"meta": round(meta_step, 4), "lm": round(lm_step, 4)},
                "mean_step_seconds": {"meta": round(mean(meta), 4), "lm": round(mean(lm), 4)},
                "meta_vs_lm_step": round(meta_step / lm_step, 3),
                "meta_vs_lm_step_mean": round(mean(meta) / mean(lm), 3),
                "tokens_per_second": {"hybrid": round(hybrid, 1), "baseline": round(baseline, 1)},
                "hybrid_vs_baseline": round(hybrid / baseline, 3),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
