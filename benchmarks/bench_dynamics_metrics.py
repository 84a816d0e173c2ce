"""Time pico-hf's learning-dynamics metrics against a straightforward per-metric implementation.

The states have the shape of a pico-decoder-small checkpoint (12 layers, d_model 384, 12 heads, 4 kv
heads, SwiGLU hidden 1536; random tensors). The metric set is every metric on every data type it accepts,
for `simple` components of `attention.v_proj`, `attention.o_proj`, `swiglu.w_2` and the `ov_circuit`.

The baseline works like pico-analyze: components rebuilt for every metric with per-head Python loops,
each metric decomposing its own matrices (`torch.svd`), CKA and PWCCA in NumPy matrix by matrix. Both
run in one process, interleaved; one JSON line reports the median times and their ratio.

    python benchmarks/bench_dynamics_metrics.py [--n-samples 512] [--repeats 3] [--threads 1]

On a busy machine, pin every thread pool to the same count for stable numbers, e.g.
`OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1` (NumPy's BLAS reads these at import).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
import warnings

import numpy as np
import torch

from pico_hf.learning_dynamics import ModelShape, RankDeficientWarning, compute_metrics

SHAPE = ModelShape(d_model=384, attention_n_heads=12, attention_n_kv_heads=4)
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
    kv_dim = SHAPE.attention_n_kv_heads * SHAPE.head_dim
    d = SHAPE.d_model
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


def default_metric_specs(n_layers: int) -> list[dict]:
    layers = list(range(n_layers))
    specs = []
    for metric, data_types in METRIC_DATA_TYPES.items():
        components = [
            {"component_name": name, "data_type": data_type, "layer_suffixes": suffixes, "layers": layers}
            for data_type in data_types
            for name, suffixes in [*(("simple", s) for s in SUFFIXES), ("ov_circuit", OV_SUFFIXES)]
        ]
        options = [{"norm_type": t} for t in ("frobenius", "nuclear", "inf")] if metric == "norm" else [{}]
        specs.extend(
            {"metric_name": metric, "data_split": "val", "components": components, **o} for o in options
        )
    return specs


# -----------------
# Baseline: one metric at a time, one matrix at a time
# -----------------


def _baseline_components(component: dict, states: dict) -> dict[str, torch.Tensor]:
    data_type, layers = component["data_type"], component["layers"]
    if component["component_name"] == "simple":
        suffix = component["layer_suffixes"]
        return {f"layers.{i}.{suffix}.{data_type}": states[data_type][f"layers.{i}.{suffix}"] for i in layers}
    n_heads, n_kv, hd = SHAPE.attention_n_heads, SHAPE.attention_n_kv_heads, SHAPE.head_dim
    out = {}
    for i in layers:
        w_v, w_o = (
            states["weights"][f"layers.{i}.attention.v_proj"],
            states["weights"][f"layers.{i}.attention.o_proj"],
        )
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


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n-layers", type=int, default=12)
    parser.add_argument("--n-samples", type=int, default=512, help="activation samples (PWCCA needs > 384)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    source, target = build_states(args.n_layers, args.n_samples, args.seed)
    specs = default_metric_specs(args.n_layers)
    warnings.simplefilter("ignore", RankDeficientWarning)  # per-head OV activations are rank-deficient
    ours_times, baseline_times = [], []
    with torch.no_grad():
        for repeat in range(args.repeats):
            # Interleaved, alternating which goes first, so drift in machine load hits both alike.
            for which in ("ours", "baseline") if repeat % 2 == 0 else ("baseline", "ours"):
                start = time.perf_counter()
                if which == "ours":
                    ours = compute_metrics(specs, source, target, model_shape=SHAPE)
                    ours_times.append(time.perf_counter() - start)
                else:
                    baseline = baseline_metrics(specs, source, target)
                    baseline_times.append(time.perf_counter() - start)

    ours_s, baseline_s = statistics.median(ours_times), statistics.median(baseline_times)
    difference, where = max_relative_difference(ours, baseline)
    print(
        json.dumps(
            {
                "benchmark": "learning_dynamics_metrics",
                "model": {"n_layers": args.n_layers, **vars(SHAPE), "ffn_dim": FFN_DIM},
                "n_samples": args.n_samples,
                "n_values": sum(len(values) for values in ours.values()),
                "repeats": args.repeats,
                "torch_threads": torch.get_num_threads(),
                "ours_s": round(ours_s, 3),
                "baseline_s": round(baseline_s, 3),
                "speedup": round(baseline_s / ours_s, 2),
                "max_rel_diff": float(f"{difference:.3g}"),
                "max_rel_diff_at": where,
            }
        )
    )


if __name__ == "__main__":
    main()
