"""ReLoRA vs full-rank training at the same shapes (the relora-demo config, learning dynamics and evaluation off).

Both runs go through PicoTrainer (`build_job`), alternating rounds in one process, timed over steady-state steps
of the LoRA phase (no warm start, no reset inside the timed steps). Prints one JSON object:

- relora_vs_full_rank_tokens_per_second: training tokens/s, ReLoRA / full-rank;
- relora_vs_full_rank_optimizer_state_bytes: bytes of the AdamW moments after training, ReLoRA / full-rank
  (whole model; `..._adapted_projections_...`: only the wrapped projections', LoRA A and B vs full weights);
- merge_pause_share_of_cycle: one merge-and-reinit plus moment pruning, as a share of a reset cycle
  (`reset_frequency` steps of the config at the measured step time; goal < 1%).

    python benchmarks/bench_relora.py [--config recipes/configs/relora-demo.yaml] [--steps 12] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from transformers import TrainerCallback, set_seed

from pico_hf.training.config import load_config
from pico_hf.training.modes.relora import ReLoRAConfig
from pico_hf.training.relora import merge_and_reinit, prune_lora_moments
from pico_hf.training.run import build_job

CONFIG = Path(__file__).resolve().parents[1] / "recipes" / "configs" / "relora-demo.yaml"
WARMUP_STEPS = 2
TARGETS = ReLoRAConfig().target_modules


class StepTimes(TrainerCallback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter())


def optimizer_state_bytes(trainer, projections_only: bool = False) -> int:
    """Bytes of the AdamW moments: of every parameter, or only of the adapted projections' (LoRA A and B for
    ReLoRA, the projection weights for full-rank)."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    total = 0
    for name, param in model.named_parameters():
        if projections_only and not any(f".{target}." in name for target in TARGETS):
            continue
        state = trainer.optimizer.state.get(param, {})
        total += sum(t.numel() * t.element_size() for t in state.values() if torch.is_tensor(t) and t.dim())
    return total


def train(config) -> tuple[float, float, object]:
    """(tokens/s, seconds per step) over steady-state steps, and the trainer."""
    timer = StepTimes()
    job = build_job(config, extra_callbacks=[timer])
    job.trainer.args.disable_tqdm = True
    job.trainer.train()
    steady = timer.times[WARMUP_STEPS - 1 :]
    seconds_per_step = (steady[-1] - steady[0]) / (len(steady) - 1)
    tokens_per_step = config.data.dataloader.batch_size * config.model.max_seq_len
    return tokens_per_step / seconds_per_step, seconds_per_step, job.trainer


def merge_pause_seconds(trainer, repeats: int = 5) -> float:
    relora = trainer.mode.section
    model = trainer.accelerator.unwrap_model(trainer.model)
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        merge_and_reinit(model, seed=i)
        prune_lora_moments(
            trainer.optimizer,
            trainer.mode.lora_parameters(),
            relora.optimizer_reset,
            relora.reset_ratio,
            seed=i,
        )
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", type=Path, default=CONFIG)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    reset_frequency = load_config(args.config)[0].training.relora.reset_frequency
    results: dict[str, list[float]] = {"relora": [], "full_rank": []}
    step_seconds: dict[str, list[float]] = {"relora": [], "full_rank": []}
    state_bytes: dict[str, int] = {}
    projection_bytes: dict[str, int] = {}
    pauses: list[float] = []
    for round_idx in range(args.rounds):
        order = ["relora", "full_rank"] if round_idx % 2 == 0 else ["full_rank", "relora"]
        for name in order:
            with tempfile.TemporaryDirectory() as runs:
                config, _ = load_config(
                    args.config,
                    [
                        f"training.max_steps={args.steps}",
                        f"training.relora.enabled={name == 'relora'}",
                        "training.relora.warm_start_steps=0",
                        f"training.relora.reset_frequency={args.steps * 10}",  # no reset while timing
                        f"checkpointing.runs_dir={runs}",
                        f"checkpointing.save_every_n_steps={args.steps * 10}",
                        "checkpointing.learning_dynamics.layer_suffixes=[]",
                        "checkpointing.learning_dynamics.metrics=[]",
                        "evaluation.metrics=[]",
                        "monitoring.logging.log_every_n_steps=1000",
                    ],
                )
                set_seed(config.training.seed)
                tokens_per_second, seconds_per_step, trainer = train(config)
                results[name].append(tokens_per_second)
                step_seconds[name].append(seconds_per_step)
                state_bytes[name] = optimizer_state_bytes(trainer)
                projection_bytes[name] = optimizer_state_bytes(trainer, projections_only=True)
                if name == "relora":
                    pauses.append(merge_pause_seconds(trainer))

    relora, full = max(results["relora"]), max(results["full_rank"])
    pause, step = min(pauses), min(step_seconds["relora"])
    print(
        json.dumps(
            {
                "threads": torch.get_num_threads(),
                "config": str(args.config),
                "tokens_per_second": {"relora": round(relora, 1), "full_rank": round(full, 1)},
                "optimizer_state_bytes": state_bytes,
                "adapted_projections_optimizer_state_bytes": projection_bytes,
                "merge_pause_seconds": round(pause, 4),
                "reset_cycle_seconds": round(reset_frequency * step, 2),
                "relora_vs_full_rank_tokens_per_second": round(relora / full, 3),
                "relora_vs_full_rank_optimizer_state_bytes": round(
                    state_bytes["relora"] / state_bytes["full_rank"], 3
                ),
                "relora_vs_full_rank_adapted_projections_state_bytes": round(
                    projection_bytes["relora"] / projection_bytes["full_rank"], 3
                ),
                "merge_pause_share_of_cycle": round(pause / (reset_frequency * step), 5),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
