"""What the held-out curve costs at the demo config with a study's default (`evaluation.heldout_every_n_steps:
10`, `heldout_max_samples: 16`, texts cut at the demo's 128 tokens; `--max_samples N` prices N texts).

Two short runs of recipes/configs/demo.yaml in this process (learning dynamics, checkpoint evaluation and
intermediate checkpoints off, to isolate the curve): one without the curve (the reference), one with it. For
each, the median seconds per training step (the held-out measurement excluded), and for the second the median
seconds per measurement. `share`: measurements x seconds each over steps x seconds per step, projected onto the
demo's 150 steps (16 measurements: step 0, every 10th, the last); goal <= 5%. `ratio_wall_with_over_without`:
the two runs' wall times side by side (noisier: it includes start-up and machine noise).

    python benchmarks/bench_heldout.py [--steps 20] [--max_samples 16] [--skip_reference]

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from transformers import TrainerCallback

from pico_hf.evaluation.heldout import HeldoutLossCallback
from pico_hf.training.config import load_config
from pico_hf.training.run import run_training

DEMO = Path(__file__).resolve().parents[1] / "recipes" / "configs" / "demo.yaml"
DEMO_STEPS = 150


class StepTimer(TrainerCallback):
    def __init__(self) -> None:
        self.starts: dict[int, float] = {}
        self.seconds: list[float] = []

    def on_step_begin(self, args, state, control, **kwargs):
        self.starts[state.global_step] = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        # Extra callbacks come after the held-out one: a step that measures the curve includes it; the median
        # over steps leaves those out.
        self.seconds.append(time.perf_counter() - self.starts[state.global_step - 1])


def run(steps: int, heldout: bool, root: Path, max_samples: int = 16) -> dict[str, float]:
    overrides = [
        f"training.max_steps={steps}",
        "checkpointing.learning_dynamics.layer_suffixes=[]",
        "checkpointing.learning_dynamics.metrics=[]",
        "evaluation.metrics=[]",
        f"checkpointing.save_every_n_steps={steps}",
        f"checkpointing.runs_dir={root}",
        f"checkpointing.run_name={'with' if heldout else 'without'}",
        "training_arguments.disable_tqdm=true",
    ]
    if heldout:
        overrides += ["evaluation.heldout_every_n_steps=10", f"evaluation.heldout_max_samples={max_samples}"]
    config, notes = load_config(DEMO, overrides)
    timer = StepTimer()
    captured: list[HeldoutLossCallback] = []

    start = time.perf_counter()
    import pico_hf.training.run as run_module

    original = run_module.build_heldout_callbacks

    def capturing(*args, **kwargs):
        callbacks = original(*args, **kwargs)
        captured.extend(callbacks)
        return callbacks

    run_module.build_heldout_callbacks = capturing
    try:
        run_training(config, notes, extra_callbacks=[timer])
    finally:
        run_module.build_heldout_callbacks = original
    wall = time.perf_counter() - start
    measured = [seconds for _, seconds in captured[0].timings] if captured else []
    return {
        "wall_s": round(wall, 2),
        "step_s": statistics.median(timer.seconds[1:]),  # the first step warms up
        "measurement_s": statistics.median(measured) if measured else 0.0,
        "measurements": len(measured),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--max_samples", type=int, default=16)
    parser.add_argument("--skip_reference", action="store_true", help="only the run with the curve")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        without = None if args.skip_reference else run(args.steps, False, Path(tmp))
        with_curve = run(args.steps, True, Path(tmp), args.max_samples)
    measurements = DEMO_STEPS // 10 + 1
    share = measurements * with_curve["measurement_s"] / (DEMO_STEPS * with_curve["step_s"])
    print(
        json.dumps(
            {
                "steps": args.steps,
                "max_samples": args.max_samples,
                "without": without,
                "with": with_curve,
                "share": round(share, 4),
                "goal": 0.05,
                **(
                    {
                        "ratio_step_with_over_without": round(with_curve["step_s"] / without["step_s"], 3),
                        "ratio_wall_with_over_without": round(with_curve["wall_s"] / without["wall_s"], 3),
                    }
                    if without
                    else {}
                ),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
