"""GPU checks of pico-decoder on one CUDA device (run by benchmarks/gpu_check.sh). Prints one JSON object per check.

- `train`: bf16 mixed-precision training (fp32 weights, autocast, AdamW) at pico-decoder-small shapes, micro-batch
  `--batch` x 2048 tokens, sdpa attention: tokens/s over the steps after warm-up, and model FLOPs utilisation,
  (6 x non-embedding parameters + 6 x output projection + 12 x layers x d_model x context) FLOPs per token
  (the PaLM accounting: forward + backward, causal attention counted whole) over the device's dense bf16 peak
  (`--peak_tflops`, else a table of known devices);
- `attention`: logits of the same bf16 model and batch through `sdpa` and `flash_attention_2` (when the
  `flash_attn` package is installed) against `eager`: largest absolute difference and share of positions
  whose top-1 token agrees;
- `decode`: cached greedy decoding (prompt 32, 64 new tokens, batch 1 and 8, bf16, sdpa) of pico-decoder vs
  its exact `LlamaForCausalLM` conversion: tokens/s of each and whether they generate the same tokens.

    python benchmarks/gpu_check.py {train,attention,decode} [--steps 30] [--batch 8] [--peak_tflops 989]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time

import torch

from pico_hf import PicoDecoderConfig, PicoDecoderForCausalLM
from pico_hf.convert import pico_to_llama

# Dense bf16 tensor-core peaks (TFLOP/s, without sparsity), from the vendors' data sheets.
PEAK_TFLOPS = {
    "H100 SXM": 989.0,
    "H100 PCIe": 756.0,
    "H100": 989.0,
    "H200": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
}
CONTEXT = 2048


def peak_tflops(override: float | None) -> tuple[float | None, str]:
    name = torch.cuda.get_device_name()
    if override is not None:
        return override, name
    for key, value in PEAK_TFLOPS.items():  # most specific first
        if key in name:
            return value, name
    return None, name


def flops_per_token(config: PicoDecoderConfig, model: torch.nn.Module) -> float:
    embedding = model.get_input_embeddings().weight.numel()
    dense = sum(p.numel() for p in model.parameters()) - embedding  # includes the output projection
    return 6 * dense + 12 * config.n_layers * config.d_model * CONTEXT


def check_train(steps: int, batch: int, peak_override: float | None) -> dict:
    torch.manual_seed(0)
    config = PicoDecoderConfig.from_preset("small")
    model = PicoDecoderForCausalLM(config).cuda().train()
    model.set_attn_implementation("sdpa")
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=True)
    ids = torch.randint(0, config.vocab_size, (batch, CONTEXT + 1), device="cuda")
    times = []
    for _ in range(steps):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids[:, :-1], shift_labels=ids[:, 1:]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter())
    warmup = min(5, steps // 3)
    seconds = (times[-1] - times[warmup]) / (steps - 1 - warmup)
    tokens_per_s = batch * CONTEXT / seconds
    peak, device = peak_tflops(peak_override)
    achieved = tokens_per_s * flops_per_token(config, model) / 1e12
    return {
        "check": "train",
        "device": device,
        "shapes": "pico-decoder-small",
        "micro_batch": f"{batch} x {CONTEXT}",
        "precision": "bf16 autocast, fp32 weights",
        "seconds_per_step": round(seconds, 4),
        "tokens_per_s": round(tokens_per_s),
        "model_tflops": round(achieved, 1),
        "peak_tflops": peak,
        "mfu": round(achieved / peak, 4) if peak else None,
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "final_loss": round(loss.item(), 4),
    }


def check_attention(batch: int) -> dict:
    torch.manual_seed(0)
    config = PicoDecoderConfig.from_preset("small")
    model = PicoDecoderForCausalLM(config).cuda().to(torch.bfloat16).eval()
    ids = torch.randint(0, config.vocab_size, (batch, CONTEXT), device="cuda")
    implementations = ["eager", "sdpa"]
    if importlib.util.find_spec("flash_attn") is not None:
        implementations.append("flash_attention_2")
    logits = {}
    with torch.no_grad():
        for name in implementations:
            model.set_attn_implementation(name)
            logits[name] = model(input_ids=ids).logits.float()
    reference = logits["eager"]
    result: dict = {"check": "attention", "dtype": "bfloat16", "batch": f"{batch} x {CONTEXT}"}
    for name in implementations[1:]:
        result[name] = {
            "max_abs_diff_vs_eager": round((logits[name] - reference).abs().max().item(), 5),
            "top1_agreement": round(
                (logits[name].argmax(-1) == reference.argmax(-1)).float().mean().item(), 5
            ),
        }
    if "flash_attention_2" not in implementations:
        result["flash_attention_2"] = "flash_attn is not installed"
    return result


def check_decode() -> dict:
    torch.manual_seed(0)
    pico = PicoDecoderForCausalLM(PicoDecoderConfig.from_preset("small")).cuda().to(torch.bfloat16).eval()
    llama = pico_to_llama(pico)
    for model in (pico, llama):
        model.set_attn_implementation("sdpa")
    result: dict = {"check": "decode", "dtype": "bfloat16", "prompt": 32, "new_tokens": 64}
    for batch in (1, 8):
        prompt = torch.randint(2, pico.config.vocab_size, (batch, 32), device="cuda")
        outputs, speed = {}, {}
        for name, model in (("pico", pico), ("llama", llama), ("pico", pico), ("llama", llama)):  # 2nd: timed
            torch.cuda.synchronize()
            start = time.perf_counter()
            with torch.no_grad():
                outputs[name] = model.generate(
                    prompt, max_new_tokens=64, min_new_tokens=64, do_sample=False, pad_token_id=1
                )
            torch.cuda.synchronize()
            speed[name] = round(batch * 64 / (time.perf_counter() - start), 1)
        result[f"batch{batch}"] = {
            "tokens_per_s": speed,
            "ratio_pico_over_llama": round(speed["pico"] / speed["llama"], 3),
            "same_tokens": bool(torch.equal(outputs["pico"], outputs["llama"])),
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("check", choices=["train", "attention", "decode"])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--peak_tflops", type=float, default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("error: no CUDA device: these checks need a GPU")
    if args.check == "train":
        result = check_train(args.steps, args.batch, args.peak_tflops)
    elif args.check == "attention":
        result = check_attention(min(args.batch, 2))
    else:
        result = check_decode()
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
