"""Learning-dynamics costs: capture during training, and metric computation on a checkpoint.

Two measurements, each printed as one JSON object:

overhead  Wall time of the demo run (recipes/configs/demo.yaml) with learning-dynamics capture and in-training
          metrics, against the same run with `checkpointing.learning_dynamics.layer_suffixes=[]`. The run is
          shortened (`--steps`, default 30) with the demo's checkpoint cadence ratio kept (150 steps, a
          checkpoint every 50: every steps/3). Runs alternate (base, LD / LD, base, ...) in one process, so
          drift in machine load hits both alike. Evaluation is off in both (`--with-eval` keeps it). The
          learning-dynamics time is broken down by phase (val forward/backward, writing states, metrics,
          train-split capture), and projected to the full 150-step demo from the measured per-step and
          per-checkpoint costs: a shortened run checkpoints more often per step than the demo, so its
          measured ratio overstates the demo's.
metrics   pico-hf's metrics library on a pico-decoder-small-shaped checkpoint (12 layers, d_model 384, 12 heads,
          4 kv heads, SwiGLU hidden 1536; random tensors; every metric on every data type it accepts, for
          `simple` components of the default layer suffixes and the `ov_circuit`) against a straightforward
          per-metric implementation that works like pico-analyze: components rebuilt for every metric with
          per-head Python loops, each metric decomposing its own matrices (`torch.svd`), CKA and PWCCA in
          NumPy matrix by matrix. Also the offline analysis end to end (`run_analysis`: reading the
          safetensors, computing, writing the JSON files) on the same states saved as a run.

val_capture  The step-0 `val` capture of pico-train's own demo config (configs/demo.yaml there: d_model 96,
          SwiGLU hidden 384, learning_dynamics.batch_size 16, the default 2048 context and eval data, which
          offline is the embedded held-out split): one forward and backward over the split, as
          `LearningDynamicsCallback._eval_states` runs it at every checkpoint. Prints the seconds, the real
          tokens and the tokens computed (rows padded to the longest of their sub-batch). Run it on an older
          checkout (PYTHONPATH=<checkout>) for the before/after comparison.

    python benchmarks/bench_dynamics.py [overhead|metrics|val_capture|all] [--steps 30] [--rounds 2]

On a busy machine pin every thread pool to the same count for stable numbers, e.g. `OMP_NUM_THREADS=2
MKL_NUM_THREADS=2 OPENBLAS_NUM_THREADS=2` (NumPy's BLAS reads these at import).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import math
import os
import statistics
import tempfile
import time
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the demo is offline: embedded corpus and tokenizer
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import torch
import yaml
from safetensors.torch import save_file

from pico_hf.learning_dynamics import ModelShape, RankDeficientWarning, compute_metrics

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "recipes" / "configs" / "demo.yaml"
DEMO_ANALYSIS = REPO / "recipes" / "configs" / "analysis" / "demo.yaml"
DEMO_STEPS, DEMO_SAVE_EVERY = 150, 50


# =================================================================================================================
# overhead: capture + in-training metrics vs the same run without
# =================================================================================================================


class PhaseTimer:
    """Wall time spent inside wrapped functions, by phase name (nested phases are counted in each)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    def wrap(self, owner: Any, name: str, phase: str) -> None:
        original = getattr(owner, name)

        @functools.wraps(original)
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds[phase] += time.perf_counter() - start
                self.calls[phase] += 1

        setattr(owner, name, timed)

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()


def instrument(timer: PhaseTimer) -> None:
    """Time the learning-dynamics phases and the checkpoints themselves (in every run)."""
    from pico_hf.learning_dynamics import callback
    from pico_hf.training import trainer

    timer.wrap(callback, "load_eval_rows", "ld_setup_load_eval_rows")
    timer.wrap(callback.LearningDynamicsCallback, "_eval_states", "ld_val_forward_backward")
    timer.wrap(callback, "save_states", "ld_write_states")
    timer.wrap(callback.LearningDynamicsCallback, "_finish", "ld_metrics")
    timer.wrap(callback.LearningDynamicsCallback, "on_checkpoint_next_step", "ld_train_split_total")
    timer.wrap(callback.LearningDynamicsCallback, "on_checkpoint", "ld_checkpoint_total")
    timer.wrap(trainer.PicoTrainer, "_save_checkpoint", "checkpoint_total")
    timer.wrap(trainer.PicoTrainer, "finish_pending_checkpoint", "checkpoint_pending_total")


def in_training_metrics(config) -> list[dict]:
    """The metrics the demo computes at each checkpoint (its `learning_dynamics.metrics`, else the demo analysis'),
    comparing with the previous checkpoint. Comparisons run on `simple` components: the tracker keeps only the
    compared data type of the previous checkpoint, and OV comparisons need its weights too."""
    metrics = (
        config.checkpointing.learning_dynamics.metrics or yaml.safe_load(DEMO_ANALYSIS.read_text())["metrics"]
    )
    trackable = []
    for metric in metrics:
        metric = {k: v for k, v in metric.items() if k != "target_checkpoint"}
        if metric["metric_name"] in ("cka", "pwcca"):
            metric["components"] = [
                {**c, "component_name": "simple", "layer_suffixes": "attention.o_proj"}
                if c["component_name"] == "ov_circuit"
                else c
                for c in metric["components"]
            ]
        trackable.append(metric)
    return trackable


def run_once(
    steps: int, with_ld: bool, with_eval: bool, runs_dir: Path, name: str, timer: PhaseTimer
) -> dict:
    from pico_hf.training.config import load_config
    from pico_hf.training.run import build_job

    overrides = [
        f"training.max_steps={steps}",
        f"checkpointing.save_every_n_steps={max(1, steps * DEMO_SAVE_EVERY // DEMO_STEPS)}",
        f"checkpointing.runs_dir={runs_dir}",
        f"checkpointing.run_name={name}",
        "monitoring.logging.log_every_n_steps=1000",
    ]
    if not with_eval:
        overrides.append("evaluation.metrics=[]")
    config, _ = load_config(DEMO, overrides)
    config.training_arguments["disable_tqdm"] = True
    if with_ld:
        config.checkpointing.learning_dynamics.metrics = in_training_metrics(config)
    else:
        config.checkpointing.learning_dynamics.layer_suffixes = []

    timer.reset()
    start = time.perf_counter()
    job = build_job(config)  # setup: model, data, and for LD the evaluation rows
    setup = time.perf_counter() - start
    job.trainer.train()
    total = time.perf_counter() - start
    checkpoints = timer.seconds["checkpoint_total"] + timer.seconds["checkpoint_pending_total"]
    return {
        "total_s": total,
        "setup_s": setup,
        "checkpoint_s": checkpoints,
        "n_checkpoints": timer.calls["checkpoint_total"],
        "phases": {phase: round(seconds, 3) for phase, seconds in timer.seconds.items()},
    }


def bench_overhead(steps: int, rounds: int, with_eval: bool, runs_dir: Path | None = None) -> dict:
    logging.getLogger("pico_hf").setLevel(logging.WARNING)
    timer = PhaseTimer()
    instrument(timer)
    base_runs, ld_runs = [], []
    with tempfile.TemporaryDirectory(prefix="bench-dynamics-") as tmp:
        runs = runs_dir if runs_dir is not None else Path(tmp)
        for round_index in range(rounds):
            order = (False, True) if round_index % 2 == 0 else (True, False)
            for with_ld in order:
                name = f"{'ld' if with_ld else 'base'}-{round_index}"
                result = run_once(steps, with_ld, with_eval, runs, name, timer)
                (ld_runs if with_ld else base_runs).append(result)

    ratios = [ld["total_s"] / base["total_s"] for ld, base in zip(ld_runs, base_runs, strict=True)]
    base_s = statistics.median(r["total_s"] for r in base_runs)
    ld_s = statistics.median(r["total_s"] for r in ld_runs)
    n_checkpoints = ld_runs[0]["n_checkpoints"]

    # Per-step and per-checkpoint costs, to project the full demo (150 steps, checkpoints at 0/50/100/150).
    base_step_s = statistics.median(
        (r["total_s"] - r["setup_s"] - r["checkpoint_s"]) / steps for r in base_runs
    )
    base_checkpoint_s = statistics.median(r["checkpoint_s"] / r["n_checkpoints"] for r in base_runs)
    base_setup_s = statistics.median(r["setup_s"] for r in base_runs)
    ld_extra_setup_s = statistics.median(r["setup_s"] for r in ld_runs) - base_setup_s
    ld_extra_step_s = (
        statistics.median((r["total_s"] - r["setup_s"] - r["checkpoint_s"]) / steps for r in ld_runs)
        - base_step_s
    )
    ld_extra_checkpoint_s = (
        statistics.median(r["checkpoint_s"] / r["n_checkpoints"] for r in ld_runs) - base_checkpoint_s
    )
    demo_checkpoints = DEMO_STEPS // DEMO_SAVE_EVERY + 1
    demo_base = base_setup_s + DEMO_STEPS * base_step_s + demo_checkpoints * base_checkpoint_s
    demo_extra = ld_extra_setup_s + DEMO_STEPS * ld_extra_step_s + demo_checkpoints * ld_extra_checkpoint_s
    phases = {
        phase: round(statistics.median(r["phases"].get(phase, 0.0) for r in ld_runs) / n_checkpoints, 3)
        for phase in sorted(ld_runs[0]["phases"])
        if phase.startswith("ld_") and phase != "ld_setup_load_eval_rows"
    }
    return {
        "benchmark": "learning_dynamics_overhead",
        "config": "recipes/configs/demo.yaml",
        "steps": steps,
        "save_every_n_steps": max(1, steps * DEMO_SAVE_EVERY // DEMO_STEPS),
        "checkpoints": n_checkpoints,
        "evaluation": with_eval,
        "rounds": rounds,
        "torch_threads": torch.get_num_threads(),
        "base_s": round(base_s, 2),
        "ld_s": round(ld_s, 2),
        "ratio": round(statistics.median(ratios), 3),
        "ratios": [round(r, 3) for r in ratios],
        "goal_ratio": 1.10,
        "per_step_train_s": round(base_step_s, 3),
        "per_checkpoint_base_s": round(base_checkpoint_s, 3),
        "ld_extra_per_checkpoint_s": round(ld_extra_checkpoint_s, 3),
        "ld_extra_per_step_s": round(ld_extra_step_s, 4),
        "ld_extra_setup_s": round(ld_extra_setup_s, 3),
        "ld_phase_s_per_checkpoint": phases,
        "projected_demo_ratio": round((demo_base + demo_extra) / demo_base, 3),
    }


# =================================================================================================================
# metrics: the library vs a straightforward per-metric implementation
# =================================================================================================================

SMALL = ModelShape(d_model=384, attention_n_heads=12, attention_n_kv_heads=4)
FFN_DIM = 1536
SUFFIXES = ("attention.v_proj", "attention.o_proj", "swiglu.w_2")
OV_SUFFIXES = {"output_layer": "attention.o_proj", "value_layer": "attention.v_proj"}
METRIC_DATA_TYPES = {
    "cka": ("activations",),
    "pwcca": ("activations",),
    "per": ("weights", "gradients"),
    "condition_number": ("weights", "activations", "gradients"),
    "gini": ("weights", "activations", "gradients"),
    "hoyer": ("weights", "activations", "gradients"),
    "norm": ("weights", "activations", "gradients"),
}


def build_states(n_layers: int, n_samples: int, seed: int) -> tuple[dict, dict]:
    """Source and target states; the target is the source plus noise, like a later checkpoint."""
    generator = torch.Generator().manual_seed(seed)
    kv_dim = SMALL.attention_n_kv_heads * SMALL.head_dim
    d = SMALL.d_model
    shapes = {
        "weights": {"attention.v_proj": (kv_dim, d), "attention.o_proj": (d, d), "swiglu.w_2": (d, FFN_DIM)},
        "activations": {
            "attention.v_proj": (n_samples, kv_dim),
            "attention.o_proj": (n_samples, d),
            "swiglu.w_2": (n_samples, d),
        },
    }
    shapes["gradients"] = shapes["weights"]

    def sample(shape, scale):
        return torch.randn(shape, generator=generator) * scale

    source, target = {}, {}
    for data_type, suffix_shapes in shapes.items():
        scale = 1e-3 if data_type == "gradients" else 0.05
        source[data_type], target[data_type] = {}, {}
        for layer in range(n_layers):
            for suffix, shape in suffix_shapes.items():
                name = f"layers.{layer}.{suffix}"
                source[data_type][name] = sample(shape, scale)
                target[data_type][name] = source[data_type][name] + sample(shape, scale / 2)
    return source, target


def default_metric_specs(n_layers: int, target_checkpoint: int | None = None) -> list[dict]:
    layers = list(range(n_layers))
    specs = []
    for metric, data_types in METRIC_DATA_TYPES.items():
        components = [
            {"component_name": name, "data_type": data_type, "layer_suffixes": suffixes, "layers": layers}
            for data_type in data_types
            for name, suffixes in [*(("simple", s) for s in SUFFIXES), ("ov_circuit", OV_SUFFIXES)]
        ]
        options = [{"norm_type": t} for t in ("frobenius", "nuclear", "inf")] if metric == "norm" else [{}]
        target = (
            {"target_checkpoint": target_checkpoint}
            if metric in ("cka", "pwcca") and target_checkpoint
            else {}
        )
        specs.extend(
            {"metric_name": metric, "data_split": "val", "components": components, **o, **target}
            for o in options
        )
    return specs


def _baseline_components(component: dict, states: dict) -> dict[str, torch.Tensor]:
    data_type, layers = component["data_type"], component["layers"]
    if component["component_name"] == "simple":
        suffix = component["layer_suffixes"]
        return {f"layers.{i}.{suffix}.{data_type}": states[data_type][f"layers.{i}.{suffix}"] for i in layers}
    n_heads, n_kv, hd = SMALL.attention_n_heads, SMALL.attention_n_kv_heads, SMALL.head_dim
    out = {}
    for i in layers:
        w_v = states["weights"][f"layers.{i}.attention.v_proj"]
        w_o = states["weights"][f"layers.{i}.attention.o_proj"]
        heads = []
        for h in range(n_heads):
            k = h // (n_heads // n_kv)
            v_rows, o_cols = slice(k * hd, (k + 1) * hd), slice(h * hd, (h + 1) * hd)
            if data_type == "weights":
                head = w_v[v_rows, :] @ w_o[:, o_cols]
            elif data_type == "activations":
                head = states["activations"][f"layers.{i}.attention.v_proj"][:, v_rows] @ w_o[:, o_cols].T
            else:
                dw_v = states["gradients"][f"layers.{i}.attention.v_proj"]
                dw_o = states["gradients"][f"layers.{i}.attention.o_proj"]
                head = w_o[:, o_cols] @ dw_v[v_rows, :] + dw_o[:, o_cols] @ w_v[v_rows, :]
            out[f"layers.{i}.ov_circuit.{data_type}.heads.{h}"] = head
            heads.append(head)
        out[f"layers.{i}.ov_circuit.{data_type}"] = torch.cat(heads, dim=1)
    return out


def _baseline_cka(x: np.ndarray, y: np.ndarray) -> float:
    x = x - x.mean(0, keepdims=True)
    y = y - y.mean(0, keepdims=True)
    return float(np.linalg.norm(x.T @ y) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)))


def _baseline_pwcca(x: np.ndarray, y: np.ndarray, epsilon: float = 1e-6) -> float:
    acts1, acts2 = x.T, y.T  # neurons x samples
    if acts1.shape[0] >= acts1.shape[1]:
        return math.nan  # the SVCCA library needs more samples than neurons
    n1 = acts1.shape[0]
    cov = np.cov(acts1, acts2)
    sxx, sxy, syy = cov[:n1, :n1], cov[:n1, n1:], cov[n1:, n1:]
    x_max, y_max = np.abs(sxx).max(), np.abs(syy).max()
    sxx, syy, sxy = sxx / x_max, syy / y_max, sxy / np.sqrt(x_max * y_max)

    def invsqrt(matrix):
        w, v = np.linalg.eigh(np.linalg.pinv(matrix + epsilon * np.eye(len(matrix))))
        return v @ np.diag(np.sqrt(np.clip(w, 0, None))) @ v.T

    u, s, _ = np.linalg.svd(invsqrt(sxx) @ sxy @ invsqrt(syy))
    means = acts1.mean(1, keepdims=True)
    q, _ = np.linalg.qr((u.T @ (acts1 - means) + means).T)
    weights = np.abs(q.T @ acts1.T).sum(1)
    return float(np.sum(weights / weights.sum() * np.abs(s)))


def _baseline_metric(spec: dict, matrix: torch.Tensor, target: torch.Tensor | None) -> float:
    name = spec["metric_name"]
    if name == "per":
        s = torch.svd(matrix).S
        p = s / s.sum()
        return (torch.exp(-torch.sum(p * torch.log(p))) / len(s)).item()
    if name == "condition_number":
        s = torch.svd(matrix).S
        return (s.max() / s.min()).item()
    if name == "norm":
        p = {"frobenius": "fro", "nuclear": "nuc", "inf": float("inf")}[spec["norm_type"]]
        return torch.norm(matrix, p=p).item()
    if name == "gini":
        x, _ = torch.sort(matrix.flatten().abs())
        n = x.shape[0]
        index = torch.arange(1, n + 1, dtype=x.dtype)
        return (((2 * index - n - 1) * x).sum() / (n * x.sum())).item()
    if name == "hoyer":
        n = matrix.numel()
        ratio = torch.norm(matrix, p=1).item() / torch.norm(matrix, p=2).item()
        return (math.sqrt(n) - ratio) / (math.sqrt(n) - 1)
    x, y = matrix.float().numpy(), target.float().numpy()
    return _baseline_cka(x, y) if name == "cka" else _baseline_pwcca(x, y)


def baseline_metrics(specs: list[dict], source: dict, target: dict) -> dict[str, dict[str, float]]:
    results = {}
    for spec in specs:
        comparative = spec["metric_name"] in ("cka", "pwcca")
        values = {}
        for component in spec["components"]:
            source_matrices = _baseline_components(component, source)
            target_matrices = _baseline_components(component, target) if comparative else {}
            for key, matrix in source_matrices.items():
                values[key] = _baseline_metric(spec, matrix, target_matrices.get(key))
        name = spec["metric_name"] + (f"_{spec['norm_type']}" if "norm_type" in spec else "")
        results[name] = values
    return results


def max_relative_difference(ours: dict, baseline: dict) -> tuple[float, str]:
    """Largest relative difference over comparable values, and where it is."""
    worst, where = 0.0, ""
    for name, values in baseline.items():
        for key, value in values.items():
            # Values of rank-deficient matrices are ill-conditioned, not comparable: PWCCA of OV activations
            # and condition numbers beyond what float32 singular values resolve.
            ill_conditioned = (name == "pwcca" and "ov_circuit" in key) or (
                name == "condition_number" and value > 1e4
            )
            if ill_conditioned or math.isnan(value):
                continue
            difference = abs(ours[name][key] - value) / max(abs(value), 1e-12)
            if difference > worst:
                worst, where = difference, f"{name} {key}"
    return worst, where


def save_as_run(run_dir: Path, source: dict, target: dict) -> None:
    """The states as a two-checkpoint pico-hf run (val split at steps 0 and 1) for the analysis pipeline."""
    for step, states in ((0, source), (1, target)):
        folder = run_dir / "checkpoints" / f"step_{step}" / "learning_dynamics"
        folder.mkdir(parents=True)
        for data_type, tensors in states.items():
            save_file(
                {k: v.contiguous() for k, v in tensors.items()}, folder / f"val_{data_type}.safetensors"
            )
    (run_dir / "training_config.yaml").write_text(
        yaml.safe_dump({"model": vars(SMALL) | {"n_layers": 12}, "checkpointing": {"run_name": "bench"}})
    )


def _same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


def bench_metrics(n_layers: int, n_samples: int, repeats: int, seed: int) -> dict:
    from pico_hf.learning_dynamics.analysis_config import parse_analysis_config
    from pico_hf.learning_dynamics.analysis_sources import LocalRun
    from pico_hf.learning_dynamics.analyze import run_analysis

    source, target = build_states(n_layers, n_samples, seed)
    specs = default_metric_specs(n_layers)
    warnings.simplefilter("ignore", RankDeficientWarning)  # per-head OV activations are rank-deficient
    logging.getLogger("pico_hf.analyze").propagate = False  # analysis.log only
    times: dict[str, list[float]] = {"ours": [], "baseline": [], "analysis": []}
    with tempfile.TemporaryDirectory(prefix="bench-dynamics-") as tmp:
        save_as_run(Path(tmp) / "run", source, target)
        analysis = parse_analysis_config(
            {
                "analysis_name": "bench",
                "metrics": default_metric_specs(n_layers, target_checkpoint=1),
                "steps": [0],
                "monitoring": {"output_dir": str(Path(tmp) / "out")},
            }
        )
        with torch.no_grad():
            for repeat in range(repeats):
                # Interleaved, rotating which goes first, so drift in machine load hits all alike.
                order = ["ours", "baseline", "analysis"]
                for which in order[repeat % 3 :] + order[: repeat % 3]:
                    start = time.perf_counter()
                    if which == "ours":
                        ours = compute_metrics(specs, source, target, model_shape=SMALL)
                    elif which == "baseline":
                        baseline = baseline_metrics(specs, source, target)
                    else:
                        analysed = run_analysis(analysis, LocalRun(Path(tmp) / "run"))
                    times[which].append(time.perf_counter() - start)

    ours_s, baseline_s, analysis_s = (statistics.median(times[k]) for k in ("ours", "baseline", "analysis"))
    difference, where = max_relative_difference(ours, baseline)
    analysis_matches = all(
        _same(analysed.results[f"{name}_val"][0][key], value)
        for name, values in ours.items()
        for key, value in values.items()
    )
    return {
        "benchmark": "learning_dynamics_metrics",
        "model": {"n_layers": n_layers, **vars(SMALL), "ffn_dim": FFN_DIM},
        "n_samples": n_samples,
        "n_values": sum(len(values) for values in ours.values()),
        "repeats": repeats,
        "torch_threads": torch.get_num_threads(),
        "ours_s": round(ours_s, 3),
        "baseline_s": round(baseline_s, 3),
        "speedup": round(baseline_s / ours_s, 2),
        "analysis_end_to_end_s": round(analysis_s, 3),
        "times_s": {which: [round(t, 2) for t in ts] for which, ts in times.items()},
        "analysis_matches_library": analysis_matches,
        "max_rel_diff": float(f"{difference:.3g}"),
        "max_rel_diff_at": where,
    }


PICO_TRAIN_DEMO = [  # pico-train's configs/demo.yaml, in pico-hf's keys (Hub and W&B settings left out)
    "data.dataset.name=embedded",  # offline: the training data is not read here, only checked
    "checkpointing.learning_dynamics.eval_data=embedded",  # offline stand-in for paloma-tinsy's val split
    "data.dataloader.batch_size=32",
    "checkpointing.save_every_n_steps=50",
    "checkpointing.learning_dynamics.batch_size=16",
    "model.d_model=96",
    "model.activation_hidden_dim=384",
    "evaluation.paloma.batch_size=32",
    "training.max_steps=100",
    "training.optimization.lr=0.001",
    "training.optimization.lr_warmup_steps=30",
    "training.optimization.gradient_accumulation_steps=2",
    "training.fabric.accelerator=cpu",
]


def bench_val_capture(repeats: int) -> dict:
    """Seconds of the `val` capture at step 0 of pico-train's demo config; see the module docstring."""
    from types import SimpleNamespace

    from accelerate import Accelerator

    from pico_hf.learning_dynamics.callback import build_learning_dynamics_callbacks
    from pico_hf.tokenization import load_tokenizer
    from pico_hf.training.config import load_config
    from pico_hf.training.run import build_model
    from pico_hf.training.rundir import RunLayout

    with tempfile.TemporaryDirectory() as tmp:
        config, _ = load_config(None, [f"checkpointing.runs_dir={tmp}", *PICO_TRAIN_DEMO])
        (callback,) = build_learning_dynamics_callbacks(config, RunLayout(config.run_dir))
    model = build_model(config, load_tokenizer(config.data.tokenizer.name)).train()  # the step-0 weights
    args = SimpleNamespace(device=torch.device("cpu"))
    callback.on_train_begin(args, None, None, model=model)
    trainer = SimpleNamespace(
        accelerator=Accelerator(cpu=True),
        args=args,
        autocast_smart_context_manager=contextlib.nullcontext,
    )
    rows = callback.eval_rows
    batch = callback.eval_batch_size
    lengths = [len(row) - 1 for row in rows]

    def computed(padded: list[int]) -> int:  # token positions of the sub-batches, each padded to its longest
        return sum(
            max(padded[i : i + batch]) * len(padded[i : i + batch]) for i in range(0, len(padded), batch)
        )

    count = -(-len(lengths) // batch) * batch  # rows padded to whole sub-batches, as the capture pads them
    shortest_last = sorted(lengths, reverse=True)

    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        callback._eval_states(model, trainer)
        seconds.append(time.perf_counter() - start)
    return {
        "config": "pico-train configs/demo.yaml",
        "eval_data": config.checkpointing.learning_dynamics.eval_data,
        "rows": len(rows),
        "batch_size": batch,
        "real_tokens": sum(lengths),
        "computed_tokens": {
            "stored_order": computed([lengths[i % len(lengths)] for i in range(count)]),
            "longest_first": computed([shortest_last[min(i, len(lengths) - 1)] for i in range(count)]),
        },
        "seconds": [round(s, 2) for s in seconds],
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "which", nargs="?", choices=("overhead", "metrics", "val_capture", "all"), default="all"
    )
    parser.add_argument("--steps", type=int, default=30, help="overhead: training steps (demo: 150)")
    parser.add_argument("--rounds", type=int, default=2, help="overhead: (base, LD) pairs, order alternating")
    parser.add_argument(
        "--with-eval", action="store_true", help="overhead: keep the demo's Paloma evaluation"
    )
    parser.add_argument(
        "--runs-dir", type=Path, default=None, help="overhead: keep the runs here (default: a temp dir)"
    )
    parser.add_argument("--n-layers", type=int, default=12)
    parser.add_argument(
        "--n-samples", type=int, default=512, help="metrics: activation samples (PWCCA needs > 384)"
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="metrics: timed repeats of each implementation"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.which in ("metrics", "all"):
        print(json.dumps(bench_metrics(args.n_layers, args.n_samples, args.repeats, args.seed)), flush=True)
    if args.which == "val_capture":
        print(json.dumps(bench_val_capture(args.repeats)), flush=True)
    if args.which in ("overhead", "all"):
        print(json.dumps(bench_overhead(args.steps, args.rounds, args.with_eval, args.runs_dir)), flush=True)


if __name__ == "__main__":
    main()
