"""PicoTrainer vs a bare PyTorch training loop, and the data pipeline vs what training consumes.

Same model (demo shapes), same data, optimizer, schedule and batch; measured in one process, alternating
rounds, over steady-state steps (the first steps of each round are warm-up). Prints one JSON object:

- trainer_vs_bare_loop: PicoTrainer tokens/s / bare loop tokens/s, each from the median step time of a
  round, the median over rounds of the per-round ratios (goal >= 0.97);
- data_vs_training: data pipeline tokens/s / training tokens/s (goal >= 20);
- reads_per_process_2_vs_1: tokens each process reads from storage when 2 processes (real ones, over gloo)
  train vs when 1 does, over the same steps, for memory-mapped data (each process reads its own sequences) and
  for streamed data (process 0 reads, then dispatches).

    python benchmarks/bench_train.py [--steps 12] [--rounds 2] [--reads-only]
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import TrainerCallback, get_linear_schedule_with_warmup, set_seed

from pico_hf.assets import CORPUS_DIR
from pico_hf.tokenization import load_tokenizer
from pico_hf.training.config import load_config
from pico_hf.training.data import BatchLayout, PretokenizedStream, TrainingSequences, training_sequences
from pico_hf.training.run import build_job, build_model

DEMO = Path(__file__).resolve().parents[1] / "recipes" / "configs" / "demo.yaml"
WARMUP_STEPS = 2


class StepTimes(TrainerCallback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter())


def trainer_tokens_per_second(config, tokens_per_step: int) -> float:
    timer = StepTimes()
    job = build_job(config, extra_callbacks=[timer])
    job.trainer.args.disable_tqdm = True
    job.trainer.train()
    return tokens_per_step / median_step_seconds(timer.times)


def bare_loop_tokens_per_second(config, steps: int) -> float:
    tokenizer = load_tokenizer(config.data.tokenizer.name)
    model = build_model(config, tokenizer).train()
    optimization = config.training.optimization
    optimizer = torch.optim.AdamW(model.parameters(), lr=optimization.lr, weight_decay=0.01)
    scheduler = get_linear_schedule_with_warmup(
        optimizer, optimization.lr_warmup_steps, config.training.max_steps
    )
    stream = open_stream(config)
    layout = BatchLayout(config.data.dataloader.batch_size, optimization.gradient_accumulation_steps, 1, 0)
    batches = iter(TrainingSequences(stream, layout))
    times = []
    for _ in range(steps):
        micro_batches = [next(batches) for _ in range(optimization.gradient_accumulation_steps)]
        total = sum(batch["shift_labels"].numel() for batch in micro_batches)
        for batch in micro_batches:
            model(**batch, num_items_in_batch=total).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))  # the Trainer computes the norm too
        optimizer.step()
        scheduler.step()
        model.zero_grad(set_to_none=True)
        times.append(time.perf_counter())
    tokens_per_step = config.data.dataloader.batch_size * config.model.max_seq_len
    return tokens_per_step / median_step_seconds(times)


def median_step_seconds(step_end_times: list[float]) -> float:
    """The median time between consecutive step ends after the warm-up steps: one slow step (the machine's
    noise, a log line) moves it less than it moves the mean over the span."""
    steady = step_end_times[WARMUP_STEPS - 1 :]
    return statistics.median(later - earlier for earlier, later in itertools.pairwise(steady))


def open_stream(config, name: str | None = None, streaming: bool | None = None) -> PretokenizedStream:
    model, seed = config.model, config.training.seed if config.data.dataloader.shuffle else None
    return PretokenizedStream(
        name or config.data.dataset.name, model.max_seq_len, model.vocab_size, streaming, seed=seed
    )


def _count_reads(rank, processes, init_file, config, steps, streaming, result_dir) -> None:
    """One of `processes` processes: the tokens it reads from storage to train `steps` optimizer steps."""
    import torch.distributed as dist

    if processes > 1:
        dist.init_process_group("gloo", f"file://{init_file}", rank=rank, world_size=processes)
    # The embedded corpus's parquet files, memory-mapped or streamed: the same data and order either way.
    stream = open_stream(config, str(CORPUS_DIR / "train" / "*.parquet"), streaming)
    layout = BatchLayout(
        config.data.dataloader.batch_size,
        config.training.optimization.gradient_accumulation_steps,
        processes,
        rank,
    )
    batches = iter(training_sequences(stream, layout))  # as the trainer builds them
    for _ in range(steps * layout.gradient_accumulation_steps):
        next(batches)
    (result_dir / f"rank{rank}").write_text(str(stream.tokens_read))
    if processes > 1:
        dist.destroy_process_group()


def tokens_read_per_process(config, processes: int, steps: int, streaming: bool) -> list[int]:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as folder:
        result_dir = Path(folder)
        arguments = (processes, result_dir / "init", config, steps, streaming, result_dir)
        mp.spawn(_count_reads, arguments, nprocs=processes)
        return [int((result_dir / f"rank{rank}").read_text()) for rank in range(processes)]


def read_volume(config, steps: int) -> dict[str, dict]:
    result = {}
    for kind, streaming in (("memory_mapped", False), ("streamed", True)):
        one = tokens_read_per_process(config, 1, steps, streaming)[0]
        two = tokens_read_per_process(config, 2, steps, streaming)
        result[kind] = {
            "tokens_read_1_process": one,
            "tokens_read_per_process_of_2": two,
            "ratio_per_process": [round(reads / one, 3) for reads in two],
            "ratio_all_processes": round(sum(two) / one, 3),
        }
    return result


def data_tokens_per_second(config, steps: int) -> float:
    stream = open_stream(config)
    layout = BatchLayout(
        config.data.dataloader.batch_size, config.training.optimization.gradient_accumulation_steps, 1, 0
    )
    batches = iter(TrainingSequences(stream, layout))
    count = steps * layout.gradient_accumulation_steps
    start = time.perf_counter()
    tokens = sum(next(batches)["input_ids"].numel() for _ in range(count))
    return tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--reads-only", action="store_true", help="only the per-process read volume")
    args = parser.parse_args()
    if args.reads_only:
        config, _ = load_config(DEMO, [])
        reads = read_volume(config, steps=50)
        print(json.dumps({"reads_per_process_2_vs_1": reads}, indent=2))
        return

    results: dict[str, list[float]] = {"trainer": [], "bare_loop": []}
    for round_idx in range(args.rounds):
        with tempfile.TemporaryDirectory() as runs:
            config, _ = load_config(
                DEMO,
                [
                    f"training.max_steps={args.steps}",
                    f"checkpointing.runs_dir={runs}",
                    f"checkpointing.save_every_n_steps={args.steps * 10}",
                    "checkpointing.learning_dynamics.layer_suffixes=[]",
                    "checkpointing.learning_dynamics.metrics=[]",
                    "evaluation.metrics=[]",
                    "monitoring.logging.log_every_n_steps=1000",
                ],
            )
            tokens_per_step = config.data.dataloader.batch_size * config.model.max_seq_len
            order = ["trainer", "bare_loop"] if round_idx % 2 == 0 else ["bare_loop", "trainer"]
            for name in order:
                set_seed(config.training.seed)
                if name == "trainer":
                    results[name].append(trainer_tokens_per_second(config, tokens_per_step))
                else:
                    results[name].append(bare_loop_tokens_per_second(config, args.steps))

    # Each round runs both back to back, so its ratio cancels slow drifts in the machine's load.
    round_ratios = [t / b for t, b in zip(results["trainer"], results["bare_loop"], strict=True)]
    trainer, bare = statistics.median(results["trainer"]), statistics.median(results["bare_loop"])
    data = data_tokens_per_second(config, steps=50)
    reads = read_volume(config, steps=50)
    print(
        json.dumps(
            {
                "threads": torch.get_num_threads(),
                "tokens_per_second": {
                    "pico_trainer": round(trainer, 1),
                    "bare_loop": round(bare, 1),
                    "data_pipeline": round(data),
                },
                "trainer_vs_bare_loop": round(statistics.median(round_ratios), 3),
                "round_ratios": [round(r, 3) for r in round_ratios],
                "data_vs_training": round(data / trainer, 1),
                "reads_per_process_2_vs_1": {kind: r["ratio_per_process"] for kind, r in reads.items()},
                "reads": reads,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
