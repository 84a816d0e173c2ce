"""Exact conversion between pico-decoder and transformers' `LlamaForCausalLM`.

The two architectures are the same function up to naming and one layout choice: pico rotates interleaved
pairs of head dimensions (2i, 2i+1) while Llama rotates halves (i, i + head_dim/2). Permuting the rows of
each head's q and k projections maps one onto the other, so logits agree to float precision.

    python -m pico_hf.convert to-llama  pico-lm/pico-decoder-small  out/llama-small
    python -m pico_hf.convert from-llama out/llama-small            out/pico-small
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
from transformers.initialization import no_init_weights

from .models.pico_decoder import PicoDecoderConfig, PicoDecoderForCausalLM

# pico name -> Llama name, per layer and for the rest of the model.
_LAYER_NAMES = {
    "attention.q_proj": "self_attn.q_proj",
    "attention.k_proj": "self_attn.k_proj",
    "attention.v_proj": "self_attn.v_proj",
    "attention.o_proj": "self_attn.o_proj",
    "attention_norm": "input_layernorm",
    "swiglu_norm": "post_attention_layernorm",
    "swiglu.w_0": "mlp.gate_proj",
    "swiglu.w_1": "mlp.up_proj",
    "swiglu.w_2": "mlp.down_proj",
}
_MODEL_NAMES = {
    "pico_decoder.embedding_proj": "model.embed_tokens",
    "pico_decoder.output_norm": "model.norm",
    "de_embedding_proj": "lm_head",
}


def interleaved_to_half(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder each head's output rows from pairs (2i, 2i+1) to halves (i, i + head_dim/2)."""
    out_dim, in_dim = weight.shape
    head_dim = out_dim // n_heads
    return weight.view(n_heads, head_dim // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def half_to_interleaved(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of `interleaved_to_half`."""
    out_dim, in_dim = weight.shape
    head_dim = out_dim // n_heads
    return weight.view(n_heads, 2, head_dim // 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def pico_config_to_llama(config: PicoDecoderConfig) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.d_model,
        intermediate_size=config.activation_hidden_dim,
        num_hidden_layers=config.n_layers,
        num_attention_heads=config.attention_n_heads,
        num_key_value_heads=config.attention_n_kv_heads,
        hidden_act="silu",
        max_position_embeddings=config.max_seq_len,
        rms_norm_eps=config.norm_eps,
        rope_parameters=dict(config.rope_parameters),  # the same frequencies; only the pairing differs
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )


def llama_config_to_pico(config: LlamaConfig) -> PicoDecoderConfig:
    """The pico config of a Llama model, refusing the Llama features pico-decoder does not have."""
    rope = dict(getattr(config, "rope_parameters", None) or {})
    unsupported = {
        "attention_bias": config.attention_bias,
        "mlp_bias": config.mlp_bias,
        "hidden_act != silu": config.hidden_act != "silu",
        f"partial_rotary_factor={rope.get('partial_rotary_factor')}": rope.get("partial_rotary_factor", 1.0)
        != 1.0,
        "head_dim != hidden_size / num_attention_heads": config.head_dim
        != config.hidden_size // config.num_attention_heads,
    }
    found = [name for name, present in unsupported.items() if present]
    if found:
        raise ValueError(
            f"This Llama model cannot be expressed as a pico-decoder: it uses {', '.join(found)}."
        )
    return PicoDecoderConfig(
        d_model=config.hidden_size,
        n_layers=config.num_hidden_layers,
        vocab_size=config.vocab_size,
        attention_n_heads=config.num_attention_heads,
        attention_n_kv_heads=config.num_key_value_heads,
        activation_hidden_dim=config.intermediate_size,
        norm_eps=config.rms_norm_eps,
        position_emb_theta=float(rope.get("rope_theta", 10000.0)),
        rope_parameters=rope or None,
        max_seq_len=config.max_position_embeddings,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )


def _name_map(n_layers: int) -> dict[str, str]:
    names = {f"{pico}.weight": f"{llama}.weight" for pico, llama in _MODEL_NAMES.items()}
    for i in range(n_layers):
        for pico, llama in _LAYER_NAMES.items():
            names[f"pico_decoder.layers.{i}.{pico}.weight"] = f"model.layers.{i}.{llama}.weight"
    return names


def pico_state_dict_to_llama(
    state_dict: dict[str, torch.Tensor], config: PicoDecoderConfig
) -> dict[str, torch.Tensor]:
    converted = {}
    for pico_name, llama_name in _name_map(config.n_layers).items():
        tensor = state_dict[pico_name]
        if pico_name.endswith("attention.q_proj.weight"):
            tensor = interleaved_to_half(tensor, config.attention_n_heads)
        elif pico_name.endswith("attention.k_proj.weight"):
            tensor = interleaved_to_half(tensor, config.attention_n_kv_heads)
        converted[llama_name] = tensor.contiguous()
    return converted


def llama_state_dict_to_pico(
    state_dict: dict[str, torch.Tensor], config: PicoDecoderConfig
) -> dict[str, torch.Tensor]:
    converted = {}
    for pico_name, llama_name in _name_map(config.n_layers).items():
        if llama_name == "lm_head.weight" and llama_name not in state_dict:
            llama_name = "model.embed_tokens.weight"  # tied Llama: pico keeps an untied copy
        tensor = state_dict[llama_name]
        if pico_name.endswith("attention.q_proj.weight"):
            tensor = half_to_interleaved(tensor, config.attention_n_heads)
        elif pico_name.endswith("attention.k_proj.weight"):
            tensor = half_to_interleaved(tensor, config.attention_n_kv_heads)
        converted[pico_name] = tensor.contiguous()
    return converted


def pico_to_llama(model: PicoDecoderForCausalLM) -> LlamaForCausalLM:
    """A `LlamaForCausalLM` computing the same logits as `model`."""
    with no_init_weights():
        llama = LlamaForCausalLM(pico_config_to_llama(model.config))
    llama.load_state_dict(pico_state_dict_to_llama(model.state_dict(), model.config))
    return llama.to(device=model.device, dtype=model.dtype).eval()


def llama_to_pico(model: LlamaForCausalLM) -> PicoDecoderForCausalLM:
    """A `PicoDecoderForCausalLM` computing the same logits as `model`."""
    pico_config = llama_config_to_pico(model.config)
    with no_init_weights():
        pico = PicoDecoderForCausalLM(pico_config)
    pico.load_state_dict(llama_state_dict_to_pico(model.state_dict(), pico_config))
    return pico.to(device=model.device, dtype=model.dtype).eval()


def _copy_tokenizer(source: str, destination: Path) -> None:
    """Carry the tokenizer along when the source has one."""
    with contextlib.suppress(OSError, ValueError):
        AutoTokenizer.from_pretrained(source).save_pretrained(destination)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m pico_hf.convert",
        description="Convert between pico-decoder and LlamaForCausalLM checkpoints.",
    )
    parser.add_argument("direction", choices=["to-llama", "from-llama"])
    parser.add_argument("source", help="checkpoint directory or Hub id")
    parser.add_argument("destination", type=Path, help="output directory")
    args = parser.parse_args(argv)

    if args.destination.exists() and any(args.destination.iterdir()):
        parser.error(f"destination {args.destination} exists and is not empty")
    tmp = args.destination.with_name(args.destination.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if args.direction == "to-llama":
        converted = pico_to_llama(PicoDecoderForCausalLM.from_pretrained(args.source))
    else:
        converted = llama_to_pico(LlamaForCausalLM.from_pretrained(args.source))
    converted.save_pretrained(tmp)
    _copy_tokenizer(args.source, tmp)
    if args.direction == "to-llama":  # a Llama export is a model of its own: it gets a card saying what it is
        from .hub.cards import CARD_FILE, llama_export_card

        llama_export_card(args.source, args.destination, converted).save(tmp / CARD_FILE)
    # Written whole or not at all: a failed conversion leaves no half-written destination.
    if args.destination.exists():
        args.destination.rmdir()
    tmp.rename(args.destination)
    print(f"Wrote {type(converted).__name__} to {args.destination}")


if __name__ == "__main__":
    main()
