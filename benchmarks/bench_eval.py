"""Evaluation speed and cost: lm-eval throughput of pico-decoder vs its Llama conversion, and the share of
training time that evaluating every checkpoint costs at the demo config.

1. `lm_eval`: documents per second through lm-eval (`simple_evaluate`, tasks already loaded) for a
   pico-decoder checkpoint and its `LlamaForCausalLM` conversion (`python -m pico_hf.convert to-llama`), on
   the same tasks and documents, measured interleaved in one process so machine noise hits both alike.
   `ratio_pico_over_llama` is the median of the per-round ratios; goal: >= 0.95. The checkpoint is
   `--model`, or by default the demo config's model (pico-decoder-tiny shapes, the demo's context, random
   weights, OLMo tokenizer).
2. `blimp`: BLiMP documents per second of pico-hf's `pico_blimp_*` tasks (the shipped pairs) vs lm-eval's own
   `blimp_*` tasks on the same model, the same sub-datasets and the same pairs, interleaved as in 1.
   lm-eval's tasks read the Hub dataset `nyu-mll/blimp`; offline, they read a local copy in the Hub
   dataset's layout written from pico_hf/evaluation/data/blimp.parquet (as tests/test_eval_tasks.py does).
   `ratio_pico_over_lm_eval`: median of the per-round ratios of evaluation time (tasks already loaded);
   `load_s`: median seconds to load each side's tasks; `ratio_with_loading`: the same ratio over loading plus
   evaluation (what every in-training evaluation pays). Goal: >= 1.0.
2b. `blimp_scorer` (`--blimp_scorer`): BLiMP documents (pairs) per second of the batched scorer behind the
   `blimp` metric (`pico_hf.evaluation.blimp`, one forward per length-sorted batch of `--scorer_batch_size`
   sentences) vs lm-eval's own `blimp_*` tasks (at each of `--lm_eval_batch_sizes`, tasks already loaded) on
   the same model, all 67 sub-datasets, the first `--scorer_pairs` pairs of each, interleaved as in 1.
   `ratio_scorer_over_lm_eval`: median of the per-round ratios of evaluation time against lm-eval's fastest
   batch size (`lm_eval_fastest`); `same_scores`: the 67 per-sub-task accuracies are equal. Goal: >= 4.
   `ratio_bound`: lm-eval's time over the head floor's (`head_floor_s`: the output projection and log-softmax
   of every distinct context, `distinct_contexts`, alone, timed in the same rounds), the most any scorer that
   keeps lm-eval's float32 arithmetic over the whole vocabulary could reach on this machine.
3. `in_training_evaluation`: a short run of recipes/configs/demo.yaml (learning dynamics off, to isolate
   evaluation) with evaluation on, checkpointing every 2 steps so training steps and evaluations alternate
   closely. The share is projected onto the demo's schedule (150 steps, 4 checkpoints): evaluations x
   seconds per evaluation over steps x seconds per step, for the demo's evaluation settings and, with
   `--max_samples N` (0: every text), for `evaluation.paloma.max_samples=N`. Goal: <= 10%.
   `--metrics paloma,pico_blimp --lm_eval_limit 100` prices those settings instead
   (`evaluation.metrics`, `evaluation.lm_eval.limit` documents per sub-task). Goal: <= 15%.
   `--metrics paloma,blimp --blimp_pairs 20` prices the held-out perplexity and the batched BLiMP at 20 pairs
   per sub-task (`evaluation.blimp.max_pairs_per_task`). Goal: <= 25%.

4. `data_parallel` (`--data_parallel`): lm-eval tasks at a checkpoint (`EvaluationCallback.lm_eval`, as
   `evaluation.metrics` runs them) on 2 real processes (`torchrun --nproc_per_node 2`, gloo, the threads
   torchrun gives each: OMP_NUM_THREADS=1 unless set), every process sharing each task's documents out
   (lm-eval's data-parallel evaluation) vs process 0 scoring them all while the other waits, interleaved.
   `ratio_data_parallel_over_process_zero`: the median of the per-round ratios of wall time per evaluation
   (< 1: sharing out is faster); `same_scores`: both give the same scores (process 0 alone is a 1-process
   evaluation). `--dp_tasks`, `--dp_limit` (documents per task), `--repeats`.

Prints one JSON object.

    python benchmarks/bench_eval.py [--model DIR] [--tasks pico_paloma,pico_arc_easy,pico_hellaswag]
        [--limit 20] [--repeats 3] [--train_steps 8] [--save_every 2] [--max_samples N] [--device cpu]
        [--blimp_uids all|UID,UID] [--blimp_limit 50] [--metrics paloma] [--lm_eval_limit N]
        [--skip_lm_eval] [--skip_blimp] [--skip_training] [--blimp_pairs 20]
        [--blimp_scorer] [--scorer_pairs 20] [--scorer_batch_size 128] [--lm_eval_batch_sizes 8,32]
        [--data_parallel] [--dp_tasks pico_arc_easy,pico_blimp] [--dp_limit 10]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import datasets
import torch
import torch.nn.functional as F
import transformers
from transformers import TrainerCallback

from pico_hf import PicoDecoderConfig, PicoDecoderForCausalLM
from pico_hf.convert import main as convert
from pico_hf.evaluation.blimp import MAX_LOGITS_ELEMENTS
from pico_hf.evaluation.callback import EvaluationCallback, build_evaluation_callbacks, isolated_evaluation
from pico_hf.evaluation.harness import (
    lm_eval_blimp_tasks,
    load_model,
    resolve_tasks,
    task_manager,
    task_manager_for,
)
from pico_hf.evaluation.tasks_dir import TASKS_DIR
from pico_hf.tokenization import load_tokenizer
from pico_hf.training.config import load_config
from pico_hf.training.run import build_job
from pico_hf.training.rundir import RunLayout

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "recipes" / "configs" / "demo.yaml"


def make_checkpoint(directory: Path) -> Path:
    """The demo config's model (pico-decoder-tiny shapes, the demo's context) with random weights and the OLMo
    tokenizer, saved as a checkpoint; throughput does not depend on the weights."""
    demo, _ = load_config(DEMO_CONFIG)
    torch.manual_seed(0)
    config = PicoDecoderConfig.tiny(max_seq_len=demo.model.max_seq_len)
    PicoDecoderForCausalLM(config).save_pretrained(directory)
    load_tokenizer().save_pretrained(directory)
    return directory


def lm_eval_throughput(
    model_dir: str, tasks: list[str], limit: int, repeats: int, batch_size: int, device: str
) -> dict[str, Any]:
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    with tempfile.TemporaryDirectory() as tmp:
        llama_dir = Path(tmp) / "llama"
        convert(["to-llama", model_dir, str(llama_dir)])
        models = {
            "pico": load_model(model_dir, device=device),
            "llama": load_model(str(llama_dir), device=device),
        }
    manager = task_manager()
    lms = {
        name: HFLM(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=batch_size)
        for name, (model, tokenizer) in models.items()
    }

    def run(name: str) -> tuple[float, int, dict[str, Any]]:
        loaded = list(manager.load(tasks)["tasks"].values())  # data loading stays outside the timing
        start = time.perf_counter()
        results = simple_evaluate(
            model=lms[name],
            tasks=loaded,
            limit=limit,
            bootstrap_iters=0,
            task_manager=manager,
            log_samples=False,
        )
        seconds = time.perf_counter() - start
        documents = sum(counts["effective"] for counts in results["n-samples"].values())
        return seconds, documents, results["results"]

    seconds: dict[str, list[float]] = {name: [] for name in lms}
    documents, scores = 0, {}
    for name in lms:  # warm-up
        run(name)
    for round_index in range(repeats):
        for name in lms if round_index % 2 == 0 else reversed(list(lms)):
            elapsed, documents, scores[name] = run(name)
            seconds[name].append(elapsed)
    docs_per_s = {name: documents / statistics.median(times) for name, times in seconds.items()}
    # Each round runs both back to back, so its ratio cancels slow drifts in machine load.
    round_ratios = [llama / pico for pico, llama in zip(seconds["pico"], seconds["llama"], strict=True)]
    same = all(
        abs(scores["pico"][task][key] - scores["llama"][task][key])
        <= 1e-4 * max(1.0, abs(scores["pico"][task][key]))
        for task in scores["pico"]
        for key in scores["pico"][task]
        if isinstance(scores["pico"][task][key], float)
    )
    return {
        "model": model_dir,
        "tasks": tasks,
        "documents": documents,
        "batch_size": batch_size,
        "docs_per_s": {name: round(value, 2) for name, value in docs_per_s.items()},
        "ratio_pico_over_llama": round(statistics.median(round_ratios), 3),
        "round_ratios": [round(r, 3) for r in round_ratios],
        "same_scores": same,
    }


def blimp_throughput(
    model_dir: str, uids: list[str], limit: int, repeats: int, batch_size: int, device: str
) -> dict[str, Any]:
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    model, tokenizer = load_model(model_dir, device=device)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=batch_size)
    names = {"pico": [f"pico_blimp_{uid}" for uid in uids], "lm_eval": [f"blimp_{uid}" for uid in uids]}
    with tempfile.TemporaryDirectory() as tmp:
        manager = task_manager([TASKS_DIR, lm_eval_blimp_tasks(Path(tmp), uids)], include_defaults=False)
        load_s: dict[str, list[float]] = {name: [] for name in names}
        seconds: dict[str, list[float]] = {name: [] for name in names}
        scores: dict[str, dict[str, Any]] = {}
        documents = 0

        def run(side: str) -> float:
            nonlocal documents
            start = time.perf_counter()
            loaded = list(manager.load(names[side])["tasks"].values())
            load_s[side].append(time.perf_counter() - start)
            start = time.perf_counter()
            results = simple_evaluate(
                model=lm,
                tasks=loaded,
                limit=limit,
                bootstrap_iters=0,
                task_manager=manager,
                log_samples=False,
            )
            elapsed = time.perf_counter() - start
            documents = sum(counts["effective"] for counts in results["n-samples"].values())
            scores[side] = {
                task.removeprefix("pico_").removeprefix("blimp_"): values["acc,none"]
                for task, values in results["results"].items()
            }
            return elapsed

        for side in names:  # warm-up (and the `datasets` cache of the Hub copy)
            run(side)
        for round_index in range(repeats):
            for side in names if round_index % 2 == 0 else reversed(list(names)):
                seconds[side].append(run(side))
    docs_per_s = {side: documents / statistics.median(times) for side, times in seconds.items()}
    round_ratios = [ref / ours for ours, ref in zip(seconds["pico"], seconds["lm_eval"], strict=True)]
    # What a run pays per evaluation: loading the tasks (pico: the shipped parquet; lm-eval: `datasets`) too.
    total = {side: [a + b for a, b in zip(load_s[side][1:], seconds[side], strict=True)] for side in names}
    total_ratios = [ref / ours for ours, ref in zip(total["pico"], total["lm_eval"], strict=True)]
    return {
        "model": model_dir,
        "sub_datasets": len(uids),
        "documents": documents,
        "batch_size": batch_size,
        "docs_per_s": {side: round(value, 2) for side, value in docs_per_s.items()},
        "load_s": {side: round(statistics.median(times), 3) for side, times in load_s.items()},
        "ratio_pico_over_lm_eval": round(statistics.median(round_ratios), 3),
        "round_ratios": [round(r, 3) for r in round_ratios],
        "ratio_with_loading": round(statistics.median(total_ratios), 3),
        "same_scores": scores["pico"] == scores["lm_eval"],
        "goal": "ratio_pico_over_lm_eval >= 1.0",
    }


def blimp_scorer_throughput(
    model_dir: str,
    pairs_per_task: int,
    repeats: int,
    lm_eval_batch_sizes: list[int],
    scorer_batch_size: int,
    device: str,
) -> dict[str, Any]:
    """The batched scorer vs lm-eval's blimp tasks at each of `lm_eval_batch_sizes`, interleaved (each round
    runs every side once, in a rotated order); the ratio is taken against lm-eval's fastest batch size."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    from pico_hf.evaluation.blimp import blimp_scores, load_blimp_pairs

    model, tokenizer = load_model(model_dir, device=device)
    pairs = load_blimp_pairs(tokenizer, pairs_per_task)
    # The floor under any scorer that keeps lm-eval's float32 arithmetic: each distinct context (over all
    # sentences, a pair's shared opening words once) projected onto the vocabulary and log-softmaxed, as the
    # scorer chunks it; random features of the model's width, the decoder left out.
    head = model.get_output_embeddings()
    contexts = len({tuple(s[: end + 1]) for s in pairs.sentences for end in range(len(s) - 1)})
    features = torch.randn(contexts, head.in_features, device=head.weight.device, dtype=head.weight.dtype)
    chunk = max(1, MAX_LOGITS_ELEMENTS // head.out_features)

    def head_floor() -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            for first in range(0, contexts, chunk):
                F.log_softmax(head(features[first : first + chunk]).float(), dim=-1)
        return time.perf_counter() - start

    lms = {
        f"lm_eval_batch_{size}": HFLM(
            pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=size
        )
        for size in lm_eval_batch_sizes
    }
    sides = ["scorer", "head_floor", *lms]
    seconds: dict[str, list[float]] = {side: [] for side in sides}
    scores: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        manager = task_manager([lm_eval_blimp_tasks(Path(tmp), pairs.tasks)], include_defaults=False)
        names = [f"blimp_{uid}" for uid in pairs.tasks]

        def run(side: str) -> float:
            if side == "head_floor":
                return head_floor()
            if side == "scorer":
                start = time.perf_counter()
                with isolated_evaluation(model):
                    result = blimp_scores(model, pairs, scorer_batch_size)
                elapsed = time.perf_counter() - start
                scores[side] = {name: result[name]["acc"] for name in names}
                return elapsed
            loaded = list(manager.load(names)["tasks"].values())  # data loading stays outside the timing
            start = time.perf_counter()
            results = simple_evaluate(
                model=lms[side],
                tasks=loaded,
                limit=pairs_per_task,
                bootstrap_iters=0,
                task_manager=manager,
                log_samples=False,
            )
            elapsed = time.perf_counter() - start
            scores[side] = {name: results["results"][name]["acc,none"] for name in names}
            return elapsed

        run("scorer")  # warm-up: first-time allocations
        for round_index in range(repeats):
            shift = round_index % len(sides)
            for side in sides[shift:] + sides[:shift]:
                seconds[side].append(run(side))
    median_s = {side: statistics.median(times) for side, times in seconds.items()}
    docs_per_s = {side: pairs.num_pairs / median_s[side] for side in ["scorer", *lms]}
    fastest = min(lms, key=median_s.__getitem__)
    round_ratios = [ref / ours for ours, ref in zip(seconds["scorer"], seconds[fastest], strict=True)]
    bounds = [ref / floor for floor, ref in zip(seconds["head_floor"], seconds[fastest], strict=True)]
    return {
        "model": model_dir,
        "sub_datasets": len(pairs.tasks),
        "documents": pairs.num_pairs,
        "tokens": sum(len(ids) for ids in pairs.sentences),
        "scorer_batch_size": scorer_batch_size,
        "docs_per_s": {side: round(value, 2) for side, value in docs_per_s.items()},
        "lm_eval_fastest": fastest,
        "ratio_scorer_over_lm_eval": round(statistics.median(round_ratios), 3),
        "round_ratios": [round(r, 3) for r in round_ratios],
        "same_scores": all(scores[side] == scores["scorer"] for side in lms),
        "goal": "ratio_scorer_over_lm_eval >= 4",
        # lm-eval's time over the head floor's: no exact float32 scorer can exceed this ratio.
        "distinct_contexts": contexts,
        "head_floor_s": round(median_s["head_floor"], 3),
        "ratio_bound": round(statistics.median(bounds), 3),
        "round_bounds": [round(b, 3) for b in bounds],
    }


class StepTimer(TrainerCallback):
    """Seconds of every optimizer step (forward, backward and update; checkpoints excluded)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.seconds.append(time.perf_counter() - self._start)


def in_training_cost(
    train_steps: int,
    save_every: int,
    max_samples: int | None,
    metrics: list[str] | None = None,
    lm_eval_limit: float | None = None,
    blimp_pairs: int | None = None,
) -> dict[str, Any]:
    """Evaluation time per checkpoint against training time per step, in one demo run.

    The run checkpoints every `save_every` steps, so training steps and evaluations alternate closely and
    machine noise hits both alike. At every checkpoint the demo's own evaluation runs, and, when `max_samples`
    is given, a second one with `evaluation.paloma.max_samples` set to it (0: every text; written elsewhere),
    so one run prices both settings. `metrics` and `lm_eval_limit` replace the demo's `evaluation.metrics`
    (`[paloma]`) and set `evaluation.lm_eval.limit`."""
    metrics = metrics or ["paloma"]
    demo, _ = load_config(DEMO_CONFIG)
    schedule_steps = demo.training.max_steps
    every = demo.checkpointing.save_every_n_steps
    evaluations = 1 + schedule_steps // every + (1 if schedule_steps % every else 0)  # step 0 .. the last
    overrides = [
        f"training.max_steps={train_steps}",
        f"checkpointing.save_every_n_steps={save_every}",
        "checkpointing.learning_dynamics.layer_suffixes=[]",
        "checkpointing.learning_dynamics.metrics=[]",
        f"evaluation.metrics=[{','.join(metrics)}]",
        *([f"evaluation.lm_eval.limit={lm_eval_limit}"] if lm_eval_limit is not None else []),
        *([f"evaluation.blimp.max_pairs_per_task={blimp_pairs}"] if blimp_pairs is not None else []),
    ]
    with tempfile.TemporaryDirectory() as tmp:
        config, _ = load_config(DEMO_CONFIG, [f"checkpointing.runs_dir={tmp}", *overrides])
        timer = StepTimer()
        extra: list[TrainerCallback] = [timer]
        if max_samples is not None:
            capped_config, _ = load_config(
                DEMO_CONFIG,
                [
                    f"checkpointing.runs_dir={tmp}/capped",
                    *overrides,
                    f"evaluation.paloma.max_samples={max_samples or 'null'}",
                ],
            )
            extra += build_evaluation_callbacks(capped_config, RunLayout(capped_config.run_dir))
        job = build_job(config, extra_callbacks=extra)
        job.trainer.train()
        callbacks = [c for c in job.trainer.callback_handler.callbacks if isinstance(c, EvaluationCallback)]
    step_s = statistics.median(timer.seconds[1:] or timer.seconds)  # the first step pays one-time costs

    def cost(callback: EvaluationCallback) -> dict[str, Any]:
        eval_s = statistics.median(seconds for _, seconds in callback.timings)
        return {
            "texts": len(callback.token_ids),
            "tokens": sum(len(ids) for ids in callback.token_ids),
            "seconds_per_evaluation": round(eval_s, 3),
            "share_of_training_time": round(evaluations * eval_s / (schedule_steps * step_s), 4),
        }

    paloma = config.evaluation.paloma
    return {
        "config": str(DEMO_CONFIG.relative_to(REPO)),
        "metrics": metrics,
        "lm_eval_limit": lm_eval_limit,
        **({"blimp_pairs_per_task": blimp_pairs} if "blimp" in metrics else {}),
        "dataset": callbacks[0].dataset_name,
        "max_length": paloma.max_length,
        "batch_size": paloma.batch_size,
        "measured_steps": len(timer.seconds),
        "measured_evaluations": len(callbacks[0].timings),
        "seconds_per_step": round(step_s, 3),
        "demo_schedule": {"steps": schedule_steps, "evaluations": evaluations},
        "demo": {"max_samples": paloma.max_samples, **cost(callbacks[0])},
        **({f"max_samples_{max_samples or 'all'}": cost(callbacks[1])} if max_samples is not None else {}),
        "goal": f"share_of_training_time <= {_share_goal(metrics)}",
    }


def _share_goal(metrics: list[str]) -> float:
    if metrics == ["paloma"]:
        return 0.10
    return 0.25 if "blimp" in metrics else 0.15


DP_MARKER = "data_parallel_result: "


def data_parallel_cost(tasks: list[str], limit: int, repeats: int, batch_size: int) -> dict[str, Any]:
    """Launch this script's `data_parallel_worker` on 2 processes with torchrun and return its measurement."""
    import socket

    with socket.socket() as probe:  # a free rendezvous port
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
        __file__, "--data_parallel_worker", "--dp_tasks", ",".join(tasks), "--dp_limit", str(limit),
        "--repeats", str(repeats), "--batch_size", str(batch_size),
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    lines = [line for line in result.stdout.splitlines() if line.startswith(DP_MARKER)]
    if result.returncode != 0 or not lines:
        raise RuntimeError(
            f"the 2-process measurement failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
        )
    return json.loads(lines[-1][len(DP_MARKER) :])


def data_parallel_worker(tasks: list[str], limit: int, repeats: int, batch_size: int) -> None:
    """One of the torchrun processes: the demo model (random weights, the same on both), then rounds of both
    strategies of `EvaluationCallback.lm_eval`, alternating which goes first."""
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    demo, _ = load_config(DEMO_CONFIG)
    torch.manual_seed(0)
    model = PicoDecoderForCausalLM(PicoDecoderConfig.tiny(max_seq_len=demo.model.max_seq_len))
    runnable = resolve_tasks(tasks, task_manager_for(tasks)).runnable
    with tempfile.TemporaryDirectory() as tmp:
        callback = EvaluationCallback(
            runnable, [], Path(tmp), batch_size, tasks=runnable, tokenizer=load_tokenizer(),
            lm_eval_limit=limit, lm_eval_batch_size=batch_size,
        )  # fmt: skip
    args = SimpleNamespace(process_index=rank, world_size=world_size)
    strategies = {"data_parallel": True, "process_zero": False}

    cpu: dict[str, list[float]] = {name: [] for name in strategies}

    def run(name: str) -> tuple[float, dict[str, Any]]:
        callback.lm_eval_data_parallel = strategies[name]
        dist.barrier()
        start, start_cpu = time.perf_counter(), time.process_time()
        with isolated_evaluation(model):
            scores = callback.lm_eval(model, args)  # ends with a broadcast every process waits for
        cpu[name].append(time.process_time() - start_cpu)
        return time.perf_counter() - start, scores

    for name in strategies:  # warm-up: first-time imports and allocations
        run(name)
    seconds: dict[str, list[float]] = {name: [] for name in strategies}
    scores: dict[str, Any] = {}
    for round_index in range(repeats):
        for name in strategies if round_index % 2 == 0 else reversed(list(strategies)):
            elapsed, scores[name] = run(name)
            seconds[name].append(elapsed)
    threads, cpu_seconds = [None] * world_size, [None] * world_size
    dist.all_gather_object(threads, torch.get_num_threads())
    dist.all_gather_object(cpu_seconds, {name: statistics.median(t[1:]) for name, t in cpu.items()})
    if rank == 0:
        ratios = [dp / p0 for dp, p0 in zip(seconds["data_parallel"], seconds["process_zero"], strict=True)]
        print(DP_MARKER + json.dumps({
            "processes": world_size,
            "threads_per_process": threads,
            "tasks": tasks,
            "limit": limit,
            "batch_size": batch_size,
            "seconds_per_evaluation": {name: round(statistics.median(t), 3) for name, t in seconds.items()},
            "ratio_data_parallel_over_process_zero": round(statistics.median(ratios), 3),
            "round_ratios": [round(r, 3) for r in ratios],
            # CPU seconds each process spent per evaluation: how the work splits, apart from machine load
            "cpu_seconds_per_process": {
                name: [round(c[name], 3) for c in cpu_seconds] for name in strategies
            },
            "same_scores": scores["data_parallel"] == scores["process_zero"],
        }), flush=True)  # fmt: skip
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="pico checkpoint directory (default: the demo model, random weights)")
    parser.add_argument("--tasks", default="pico_paloma,pico_arc_easy,pico_hellaswag")
    parser.add_argument("--limit", type=int, default=20, help="documents per task (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument(
        "--train_steps", type=int, default=8, help="steps of the demo run (default: %(default)s)"
    )
    parser.add_argument(
        "--save_every", type=int, default=2, help="its checkpoint interval (default: %(default)s)"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--max_samples",
        type=int,
        default=None,
        help="also price evaluation.paloma.max_samples=N (0: every text)",
    )
    parser.add_argument(
        "--blimp_uids", default="all", help="BLiMP sub-datasets of the blimp comparison, comma-separated"
    )
    parser.add_argument(
        "--blimp_limit", type=int, default=50, help="pairs per sub-dataset (default: %(default)s)"
    )
    parser.add_argument(
        "--metrics", default="paloma", help="evaluation.metrics of the demo run, comma-separated"
    )
    parser.add_argument(
        "--lm_eval_limit", type=float, default=None, help="evaluation.lm_eval.limit of the demo run"
    )
    parser.add_argument(
        "--skip_lm_eval", action="store_true", help="skip the pico vs Llama lm-eval comparison"
    )
    parser.add_argument("--skip_blimp", action="store_true", help="skip the pico_blimp vs blimp comparison")
    parser.add_argument("--skip_training", action="store_true", help="skip in-training evaluation")
    parser.add_argument(
        "--blimp_pairs", type=int, default=20, help="evaluation.blimp.max_pairs_per_task of the demo run"
    )
    parser.add_argument(
        "--blimp_scorer", action="store_true", help="also time the batched BLiMP scorer vs lm-eval's blimp"
    )
    parser.add_argument("--scorer_pairs", type=int, default=20, help="pairs per sub-task of --blimp_scorer")
    parser.add_argument("--scorer_batch_size", type=int, default=128, help="sentences per scorer forward")
    parser.add_argument(
        "--lm_eval_batch_sizes",
        default="8,32",
        help="lm-eval batch sizes --blimp_scorer compares against (its fastest counts)",
    )
    parser.add_argument(
        "--data_parallel",
        action="store_true",
        help="also time lm-eval tasks on 2 processes: shared out vs on process 0 alone",
    )
    parser.add_argument("--dp_tasks", default="pico_arc_easy,pico_blimp", help="tasks of --data_parallel")
    parser.add_argument(
        "--dp_limit",
        type=int,
        default=10,
        help="documents per task of --data_parallel (default: %(default)s)",
    )
    parser.add_argument("--data_parallel_worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    dp_tasks = [t.strip() for t in args.dp_tasks.split(",") if t.strip()]
    if args.data_parallel_worker:
        data_parallel_worker(dp_tasks, args.dp_limit, args.repeats, args.batch_size)
        return

    results: dict[str, Any] = {"device": args.device, "threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as tmp:
        if not (args.skip_lm_eval and args.skip_blimp) or args.blimp_scorer:
            model_dir = args.model or str(make_checkpoint(Path(tmp) / "pico-decoder-demo"))
        if not args.skip_lm_eval:
            tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
            results["lm_eval"] = lm_eval_throughput(
                model_dir, tasks, args.limit, args.repeats, args.batch_size, args.device
            )
        if not args.skip_blimp:
            uids = [path.stem for path in sorted((TASKS_DIR / "blimp").glob("[a-z]*.yaml"))]
            if args.blimp_uids != "all":
                uids = [u.strip() for u in args.blimp_uids.split(",") if u.strip()]
            results["blimp"] = blimp_throughput(
                model_dir, uids, args.blimp_limit, args.repeats, args.batch_size, args.device
            )
        if args.blimp_scorer:
            results["blimp_scorer"] = blimp_scorer_throughput(
                model_dir,
                args.scorer_pairs,
                args.repeats,
                [int(size) for size in args.lm_eval_batch_sizes.split(",")],
                args.scorer_batch_size,
                args.device,
            )
    if not args.skip_training:
        metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
        results["in_training_evaluation"] = in_training_cost(
            args.train_steps, args.save_every, args.max_samples, metrics, args.lm_eval_limit, args.blimp_pairs
        )
    if args.data_parallel:
        results["data_parallel"] = data_parallel_cost(dp_tasks, args.dp_limit, args.repeats, args.batch_size)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
