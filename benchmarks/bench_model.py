"""pico-decoder vs transformers' LlamaForCausalLM at identical shapes and weights, side by side.

Both models are built at pico-decoder-small shapes (fp32, same device and thread count), the Llama one by
exact conversion, and measured interleaved in one process so machine noise hits both alike. Prints one JSON
object of ratios (pico / Llama):

- train_tokens_per_s: forward + backward with labels, batch 4 x 256 (higher is better, goal >= 1.0);
- generate_tokens_per_s_batch{1,8}: cached greedy decoding, prompt 32, 64 new tokens (goal >= 1.0);
- train_peak_memory: peak memory of a training step at 2048 tokens (lower is better, goal <= 0.6).

    python benchmarks/bench_model.py [--preset small] [--repeats 5] [--device cpu]
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from collections.abc import Callable

import torch

from pico_hf import PicoDecoderConfig, PicoDecoderForCausalLM
from pico_hf.convert import pico_to_llama


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def interleaved_times(
    fns: dict[str, Callable[[], None]], repeats: int, device: torch.device
) -> dict[str, float]:
    """Median seconds per call; the order alternates every round so neither side always runs first."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for name in names:  # warm-up
        fns[name]()
    for round_idx in range(repeats):
        for name in names if round_idx % 2 == 0 else reversed(names):
            synchronize(device)
            start = time.perf_counter()
            fns[name]()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def training_step(model: torch.nn.Module, ids: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()

    return step


def generation(model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int) -> Callable[[], None]:
    def run() -> None:
        with torch.no_grad():
            out = model.generate(
                prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=1
            )
        assert out.shape[1] == prompt.shape[1] + new_tokens

    return run


def peak_training_memory(model: torch.nn.Module, ids: torch.Tensor, device: torch.device) -> int:
    """Peak bytes held during one forward + backward: parameters, gradients, activations and temporaries."""
    model.zero_grad(set_to_none=True)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        training_step(model, ids)()
        return torch.cuda.max_memory_allocated()
    from torch.distributed._tools.mem_tracker import MemTracker

    tracker = MemTracker()
    tracker.track_external(model)
    with tracker:
        training_step(model, ids)()
    return tracker.get_tracker_snapshot("peak")[device]["Total"]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="small", choices=["tiny", "small", "medium", "large"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)

    pico = PicoDecoderForCausalLM(PicoDecoderConfig.from_preset(args.preset)).to(device=device, dtype=dtype)
    llama = pico_to_llama(pico)
    for model in (pico, llama):
        model.set_attn_implementation("sdpa")
    vocab = pico.config.vocab_size
    results: dict[str, object] = {
        "preset": args.preset,
        "device": str(device),
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
    }

    # Training step: forward + backward with labels, batch 4 x 256.
    pico.train(), llama.train()
    ids = torch.randint(0, vocab, (4, 256), device=device)
    t = interleaved_times(
        {"pico": training_step(pico, ids), "llama": training_step(llama, ids)}, args.repeats, device
    )
    results["train_tokens_per_s"] = {name: ids.numel() / s for name, s in t.items()}
    results["train_ratio"] = t["llama"] / t["pico"]

    # Cached greedy generation: prompt 32, 64 new tokens.
    pico.eval(), llama.eval()
    for batch in (1, 8):
        prompt = torch.randint(2, vocab, (batch, 32), device=device)
        t = interleaved_times(
            {"pico": generation(pico, prompt, 64), "llama": generation(llama, prompt, 64)},
            args.repeats,
            device,
        )
        results[f"generate_tokens_per_s_batch{batch}"] = {name: batch * 64 / s for name, s in t.items()}
        results[f"generate_ratio_batch{batch}"] = t["llama"] / t["pico"]

    # Peak memory of a training step at 2048 tokens.
    pico.train(), llama.train()
    ids = torch.randint(0, vocab, (1, 2048), device=device)
    memory = {
        "pico": peak_training_memory(pico, ids, device),
        "llama": peak_training_memory(llama, ids, device),
    }
    results["train_peak_memory_mib"] = {name: round(b / 2**20, 1) for name, b in memory.items()}
    results["train_peak_memory_ratio"] = memory["pico"] / memory["llama"]

    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
