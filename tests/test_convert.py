"""Exact conversion to and from transformers' LlamaForCausalLM."""

import subprocess
import sys

import pytest
import torch
from conftest import REFERENCE_CHECKPOINT, tiny_config
from huggingface_hub import ModelCard
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from pico_hf import PicoDecoderForCausalLM
from pico_hf.convert import half_to_interleaved, interleaved_to_half, llama_to_pico, pico_to_llama

EXPECTED = load_file(REFERENCE_CHECKPOINT / "expected.safetensors")


def test_row_permutations_are_inverse():
    weight = torch.randn(64, 8)
    half = interleaved_to_half(weight, n_heads=4)
    assert not torch.equal(half, weight)
    assert torch.equal(half_to_interleaved(half, n_heads=4), weight)
    # Within a head, interleaved row 2i+1 is the partner of row 2i; in Llama's layout it sits head_dim/2 later.
    assert torch.equal(half[1], weight[2]) and torch.equal(half[8], weight[1])


def test_pico_to_llama_to_pico_is_exact():
    pico = PicoDecoderForCausalLM.from_pretrained(REFERENCE_CHECKPOINT).eval()
    llama = pico_to_llama(pico)
    assert isinstance(llama, LlamaForCausalLM)
    with torch.no_grad():
        torch.testing.assert_close(llama(EXPECTED["input_ids"]).logits, EXPECTED["logits"], atol=1e-5, rtol=0)
        back = llama_to_pico(llama)
        torch.testing.assert_close(back(EXPECTED["input_ids"]).logits, EXPECTED["logits"], atol=1e-5, rtol=0)
    for name, tensor in pico.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name


@pytest.mark.parametrize("n_kv_heads", [4, 1])
def test_llama_to_pico_matches_llama(n_kv_heads):
    llama_config = LlamaConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=112,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=n_kv_heads,
        max_position_embeddings=64,
        rope_parameters={"rope_type": "default", "rope_theta": 500.0},
    )
    llama = LlamaForCausalLM(llama_config).eval()
    pico = llama_to_pico(llama)
    assert pico.config.position_emb_theta == 500.0
    ids = torch.randint(0, 96, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(pico(ids).logits, llama(ids).logits, atol=1e-5, rtol=1e-5)
        prompt = ids[:1, :6]
        assert torch.equal(
            pico.generate(prompt, max_new_tokens=10, do_sample=False),
            llama.generate(prompt, max_new_tokens=10, do_sample=False),
        )


def test_llama_features_pico_lacks_are_refused():
    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=32,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            attention_bias=True,
        )
    )
    with pytest.raises(ValueError, match="cannot be expressed as a pico-decoder: it uses attention_bias"):
        llama_to_pico(llama)


def test_cli_round_trip(tmp_path):
    def convert(*args):
        return subprocess.run(
            [sys.executable, "-m", "pico_hf.convert", *map(str, args)],
            capture_output=True,
            text=True,
            timeout=300,
        )

    to_llama = convert("to-llama", REFERENCE_CHECKPOINT, tmp_path / "llama")
    assert to_llama.returncode == 0, to_llama.stderr
    assert "Wrote LlamaForCausalLM" in to_llama.stdout
    # The export is a model of its own: its card names it, its source, and loads it with transformers alone.
    card = ModelCard.load(tmp_path / "llama" / "README.md")
    assert card.text.lstrip().startswith("# llama\n")
    assert f"pico-decoder checkpoint `{REFERENCE_CHECKPOINT}`" in card.text
    assert f'AutoModelForCausalLM.from_pretrained("{(tmp_path / "llama").as_posix()}")' in card.text
    assert "trust_remote_code" not in card.text
    assert card.data.library_name == "transformers" and "llama" in card.data.tags
    assert card.data.base_model is None  # a local source is no Hub model to link
    assert convert("from-llama", tmp_path / "llama", tmp_path / "pico").returncode == 0
    original, round_trip = (
        load_file(REFERENCE_CHECKPOINT / "model.safetensors"),
        load_file(tmp_path / "pico" / "model.safetensors"),
    )
    assert original.keys() == round_trip.keys()
    assert all(torch.equal(original[k], round_trip[k]) for k in original)

    refused = convert("to-llama", REFERENCE_CHECKPOINT, tmp_path / "llama")  # destination not empty
    assert refused.returncode == 2
    assert "exists and is not empty" in refused.stderr


def test_tiny_gqa_model_round_trips_through_llama():
    pico = PicoDecoderForCausalLM(tiny_config(attention_n_kv_heads=1)).eval()
    ids = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(pico_to_llama(pico)(ids).logits, pico(ids).logits, atol=1e-5, rtol=1e-5)
