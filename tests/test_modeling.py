"""pico-decoder as a transformers model: parity with the reference, caches, masks, losses, errors."""

import json
import re

import pytest
import torch
import torch.nn.functional as F
import transformers
from conftest import REFERENCE_CHECKPOINT, tiny_config
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, DynamicCache
from transformers.testing_utils import CaptureLogger

import pico_hf
from pico_hf import PicoDecoderConfig, PicoDecoderForCausalLM, PicoDecoderModel

EXPECTED = load_file(REFERENCE_CHECKPOINT / "expected.safetensors")


@pytest.fixture(scope="module")
def reference_model():
    return AutoModelForCausalLM.from_pretrained(REFERENCE_CHECKPOINT).eval()


# --- parity with the original pico-train model -------------------------------------------------------


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_logits_match_reference(attn_implementation):
    model = AutoModelForCausalLM.from_pretrained(
        REFERENCE_CHECKPOINT, attn_implementation=attn_implementation
    )
    assert isinstance(model, PicoDecoderForCausalLM)
    with torch.no_grad():
        logits = model(EXPECTED["input_ids"]).logits
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, EXPECTED["logits"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("use_cache", [True, False])
def test_greedy_generation_matches_reference(reference_model, use_cache):
    prompt = EXPECTED["input_ids"][:1, :5]
    generated = reference_model.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=use_cache)
    assert torch.equal(generated, EXPECTED["greedy_ids"])


def test_rope_is_per_instance():
    """The reference kept one RoPE table per process; here each model owns its frequencies."""
    a = PicoDecoderForCausalLM(tiny_config(position_emb_theta=10000.0)).eval()
    b = PicoDecoderForCausalLM(tiny_config(position_emb_theta=500.0, max_seq_len=16)).eval()
    b.load_state_dict(a.state_dict())
    ids = torch.randint(0, 128, (1, 12))
    with torch.no_grad():
        before = a(ids).logits
        assert not torch.allclose(before, b(ids).logits)
        PicoDecoderForCausalLM(tiny_config(position_emb_theta=3.0))  # a third model changes nothing
        torch.testing.assert_close(a(ids).logits, before, atol=0, rtol=0)


@pytest.mark.parametrize(
    "rope_parameters",
    [
        {"rope_type": "linear", "factor": 2.0},
        {
            "rope_type": "longrope",
            "short_factor": [1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 1.7],
            "long_factor": [1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5],
            "original_max_position_embeddings": 16,
        },
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    ],
    ids=lambda rope: rope["rope_type"],
)
def test_rope_scaling_types_match_llama_with_the_same_rope_parameters(rope_parameters):
    """`rope_parameters` scales pico's interleaved RoPE exactly as transformers scales Llama's: the converted
    Llama (the same frequencies on half-split pairs) gives the same logits, past the original context too."""
    from pico_hf.convert import pico_to_llama

    config = tiny_config(max_seq_len=64, position_emb_theta=500.0, rope_parameters=dict(rope_parameters))
    assert config.rope_parameters["rope_theta"] == 500.0
    model = PicoDecoderForCausalLM(config).eval()
    plain = PicoDecoderForCausalLM(tiny_config(max_seq_len=64, position_emb_theta=500.0)).eval()
    plain.load_state_dict(model.state_dict())
    llama = pico_to_llama(model).eval()
    assert llama.config.rope_parameters == config.rope_parameters
    ids = torch.randint(0, 128, (2, 40))  # beyond the 16 original positions of longrope, yarn and llama3
    with torch.no_grad():
        logits = model(ids).logits
        torch.testing.assert_close(logits, llama(ids).logits, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(logits, plain(ids).logits, atol=1e-3)  # the scaling changed something


# --- config ---------------------------------------------------------------------------------------------


def test_config_keeps_pico_keys_and_exposes_standard_names(tmp_path):
    config = AutoConfig.from_pretrained(REFERENCE_CHECKPOINT)
    assert isinstance(config, PicoDecoderConfig)
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (64, 2, 4)
    assert (config.num_key_value_heads, config.intermediate_size, config.head_dim) == (2, 160, 16)
    assert (config.rms_norm_eps, config.rope_theta, config.max_position_embeddings) == (1e-6, 10000.0, 64)
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    original = json.loads((REFERENCE_CHECKPOINT / "config.json").read_text())
    pico_keys = [
        "d_model",
        "n_layers",
        "attention_n_heads",
        "attention_n_kv_heads",
        "activation_hidden_dim",
        "norm_eps",
        "position_emb_theta",
        "vocab_size",
        "max_seq_len",
        "batch_size",
    ]
    assert {k: saved[k] for k in pico_keys} == {k: original[k] for k in pico_keys}
    assert saved["model_type"] == "pico_decoder"
    assert not {"hidden_size", "num_hidden_layers", "rope_theta"} & saved.keys()


def test_config_tolerates_unknown_keys_and_legacy_model_type(tmp_path):
    raw = json.loads((REFERENCE_CHECKPOINT / "config.json").read_text())
    raw.update(model_type="pico", some_future_key={"nested": 1})
    (tmp_path / "config.json").write_text(json.dumps(raw))
    config = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(config, PicoDecoderConfig)
    assert config.some_future_key == {"nested": 1}
    assert config.d_model == 64


def test_rope_parameters_keep_position_emb_theta_as_the_base(tmp_path):
    plain = tiny_config(position_emb_theta=500.0)
    assert plain.rope_parameters == {"rope_type": "default", "rope_theta": 500.0}
    plain.save_pretrained(tmp_path)
    assert "rope_parameters" not in json.loads((tmp_path / "config.json").read_text())  # the published format

    scaled = tiny_config(position_emb_theta=500.0, rope_parameters={"rope_type": "linear", "factor": 2.0})
    scaled.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["position_emb_theta"] == 500.0
    assert saved["rope_parameters"] == {"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0}
    assert PicoDecoderConfig.from_pretrained(tmp_path).rope_parameters == saved["rope_parameters"]

    with pytest.raises(ValueError) as error:
        tiny_config(rope_parameters={"rope_type": "default", "rope_theta": 5.0})
    assert str(error.value) == (
        "rope_parameters['rope_theta'] (5.0) disagrees with position_emb_theta (10000.0), pico's key for the "
        "RoPE base: set position_emb_theta instead."
    )
    with pytest.raises(ValueError, match=r"partial_rotary_factor'\] must be 1\.0: .* got 0\.5"):
        tiny_config(rope_parameters={"rope_type": "default", "partial_rotary_factor": 0.5})
    with pytest.raises(
        KeyError, match=r"Missing required keys in `rope_parameters` for 'rope_type'='linear'"
    ):
        tiny_config(rope_parameters={"rope_type": "linear"})
    with pytest.raises(ValueError) as error:
        tiny_config(rope_parameters={"rope_type": "dynamic", "factor": 2.0})
    assert str(error.value) == (
        "rope_parameters['rope_type'] 'dynamic' rescales RoPE only for positions past max_seq_len (64), which "
        "pico-decoder refuses: raise max_seq_len and use 'linear', 'yarn', 'longrope' or 'llama3' with "
        "original_max_position_embeddings instead."
    )


@pytest.mark.parametrize(
    ("preset", "n_params"),
    [("tiny", 11.3e6), ("small", 64.6e6), ("medium", 181.1e6), ("large", 569.8e6)],
)
def test_presets_match_published_sizes(preset, n_params):
    config = PicoDecoderConfig.from_preset(preset)
    assert (config.n_layers, config.attention_n_heads, config.attention_n_kv_heads) == (12, 12, 4)
    assert config.activation_hidden_dim == 4 * config.d_model
    assert (config.vocab_size, config.max_seq_len, config.eos_token_id) == (50304, 2048, 50279)
    with torch.device("meta"):
        model = PicoDecoderForCausalLM(config)
    assert round(model.num_parameters() / 1e6, 1) == n_params / 1e6


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (
            dict(d_model=100, attention_n_heads=12),
            r"d_model \(100\) must be divisible by attention_n_heads \(12\)",
        ),
        (
            dict(attention_n_heads=12, attention_n_kv_heads=5),
            r"attention_n_heads \(12\) must be divisible by",
        ),
        (dict(d_model=36, attention_n_heads=12, attention_n_kv_heads=4), r"head dim .* must be even"),
        (dict(n_layers=0), r"n_layers must be positive"),
    ],
)
def test_invalid_shapes_fail_at_construction(fields, message):
    with pytest.raises(ValueError, match=message):
        PicoDecoderConfig(**fields)


def test_unknown_preset_lists_choices():
    with pytest.raises(ValueError, match=r"Unknown pico-decoder preset 'huge'.*'tiny'"):
        PicoDecoderConfig.from_preset("huge")


# --- checkpoint format ---------------------------------------------------------------------------------


def test_save_writes_the_published_format(reference_model, tmp_path):
    reference_model.save_pretrained(tmp_path)
    saved, original = (
        load_file(tmp_path / "model.safetensors"),
        load_file(REFERENCE_CHECKPOINT / "model.safetensors"),
    )
    assert saved.keys() == original.keys()
    for name, tensor in original.items():
        assert torch.equal(saved[name], tensor), name
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_pico_decoder.PicoDecoderConfig",
        "AutoModelForCausalLM": "modeling_pico_decoder.PicoDecoderForCausalLM",
    }
    assert (tmp_path / "modeling_pico_decoder.py").is_file()
    assert (tmp_path / "configuration_pico_decoder.py").is_file()

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded(EXPECTED["input_ids"]).logits, EXPECTED["logits"], atol=1e-5, rtol=0
        )


def test_base_model_loads_from_causal_lm_checkpoint():
    base = AutoModel.from_pretrained(REFERENCE_CHECKPOINT)
    assert isinstance(base, PicoDecoderModel)
    reference = load_file(REFERENCE_CHECKPOINT / "model.safetensors")
    assert torch.equal(base.embedding_proj.weight, reference["pico_decoder.embedding_proj.weight"])


def _reference_state_dict() -> dict[str, torch.Tensor]:
    """The reference checkpoint under the model's own names (the head sits outside `pico_decoder.` here)."""
    published = load_file(REFERENCE_CHECKPOINT / "model.safetensors")
    return {
        name.replace("pico_decoder.de_embedding_proj", "de_embedding_proj"): t
        for name, t in published.items()
    }


def _loading_report(load):
    """(result of `load()`, the warnings transformers logged while loading)."""
    logger = transformers.logging.get_logger("transformers.modeling_utils")
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_warning()
    try:
        with CaptureLogger(logger) as captured:
            result = load()
    finally:
        transformers.logging.set_verbosity(verbosity)
    return result, captured.out


def test_missing_tensors_are_initialised_warned_and_reported(reference_model, tmp_path):
    """As transformers loads any model: tensors the checkpoint lacks are initialised, logged and listed."""
    reference_model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "n_layers": 3}))
    (model, info), log = _loading_report(
        lambda: AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    )
    layer_2 = [f"pico_decoder.layers.2.{name}" for name, _ in model.pico_decoder.layers[2].named_parameters()]
    assert len(layer_2) == 9
    assert info["missing_keys"] == set(layer_2)
    assert info["unexpected_keys"] == set() and info["mismatched_keys"] == set()
    assert all(re.search(rf"^{re.escape(key)} +\| MISSING", log, re.M) for key in layer_2), log
    loaded = model.state_dict()
    for name, tensor in _reference_state_dict().items():
        assert torch.equal(loaded[name], tensor), name
    # Initialised as a fresh model is (unit norms), not left empty.
    assert torch.equal(model.pico_decoder.layers[2].attention_norm.weight, torch.ones(64))
    assert isinstance(AutoModelForCausalLM.from_pretrained(tmp_path), PicoDecoderForCausalLM)


def test_head_is_initialised_on_a_base_model_checkpoint(tmp_path):
    """A base model's checkpoint gives the causal LM its trunk; the head is reported missing."""
    trunk = PicoDecoderModel(tiny_config())
    trunk.save_pretrained(tmp_path)
    assert not any(k.startswith("pico_decoder.") for k in load_file(tmp_path / "model.safetensors"))
    model, info = PicoDecoderForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert info["missing_keys"] == {"de_embedding_proj.weight"}
    for name, tensor in trunk.state_dict().items():
        assert torch.equal(model.pico_decoder.state_dict()[name], tensor), name


@pytest.mark.parametrize("model_class", [PicoDecoderModel, PicoDecoderForCausalLM])
def test_checkpoint_without_tensors_reports_every_parameter_missing(model_class, tmp_path):
    """Exactly the parameters are reported: no more (the non-persistent RoPE buffers), no fewer."""
    model_class(tiny_config()).save_pretrained(tmp_path)
    save_file({}, tmp_path / "model.safetensors")
    model, info = model_class.from_pretrained(tmp_path, output_loading_info=True)
    assert info["missing_keys"] == {name for name, _ in model.named_parameters()}
    assert info["missing_keys"] == set(model.state_dict())


def test_shape_mismatches_follow_ignore_mismatched_sizes(reference_model, tmp_path):
    reference_model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "activation_hidden_dim": 96}))
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        AutoModelForCausalLM.from_pretrained(tmp_path)
    model, info = AutoModelForCausalLM.from_pretrained(
        tmp_path, ignore_mismatched_sizes=True, output_loading_info=True
    )
    swiglu = {
        (f"pico_decoder.layers.{i}.swiglu.{w}.weight", torch.Size(old), torch.Size(new))
        for i in range(2)
        for w, old, new in [
            ("w_0", (160, 64), (96, 64)),
            ("w_1", (160, 64), (96, 64)),
            ("w_2", (64, 160), (64, 96)),
        ]
    }
    assert info["mismatched_keys"] == swiglu
    assert info["missing_keys"] == set()
    reference = _reference_state_dict()
    kept = reference.keys() - {name for name, _, _ in swiglu}
    assert len(kept) == 21 - 6
    assert all(torch.equal(model.state_dict()[name], reference[name]) for name in kept)


def test_a_checkpoint_that_is_not_a_pico_decoder_is_an_error(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    llama = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    LlamaForCausalLM(llama).save_pretrained(tmp_path)
    tiny_config().save_pretrained(tmp_path)  # a pico config over Llama's tensors
    message = (
        f"Checkpoint {tmp_path} is not a pico-decoder checkpoint: none of its 21 tensor(s) is one the model "
        "expects (it has e.g. ['lm_head.weight', 'model.embed_tokens.weight', 'model.layers.0.input_layernorm.weight']; "
        "pico-decoder's are named like 'pico_decoder.layers.0.attention.q_proj.weight'). A Llama checkpoint "
        "converts with `python -m pico_hf.convert from-llama`."
    )
    for model_class in (AutoModelForCausalLM, AutoModel):
        with pytest.raises(ValueError) as error:
            model_class.from_pretrained(tmp_path)
        assert str(error.value) == message


# --- inputs, caches, masks -----------------------------------------------------------------------------


def test_bad_inputs_get_clear_errors():
    model = PicoDecoderForCausalLM(tiny_config()).eval()
    with pytest.raises(ValueError, match=r"token id 128, outside the model's vocabulary \(vocab_size=128"):
        model(torch.tensor([[1, 128]]))
    with pytest.raises(ValueError, match=r"token id -3"):
        model(torch.tensor([[-3, 1]]))
    with pytest.raises(
        ValueError,
        match=r"^Input reaches position 64, beyond the model's max_seq_len \(64, positions 0\.\.63\); truncate",
    ):
        model(torch.ones(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match=r"^Input reaches position 69, beyond the model's max_seq_len \(64"):
        model(torch.ones(1, 10, dtype=torch.long), position_ids=torch.arange(60, 70)[None])
    with pytest.raises(ValueError, match=r"^Input reaches position 64, beyond"):  # the cache's tokens count
        cache = DynamicCache(config=model.config)
        model(torch.ones(1, 60, dtype=torch.long), cache=cache, use_cache=True)
        model(torch.ones(1, 5, dtype=torch.long), cache=cache, use_cache=True)


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_one_token_cached_decoding_matches_full_forward(n_kv_heads, attn_implementation):
    config = tiny_config(attention_n_kv_heads=n_kv_heads)
    config._attn_implementation = attn_implementation
    model = PicoDecoderForCausalLM(config).eval()
    ids = torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        full = model(ids).logits
        cache = DynamicCache(config=config)
        prefix = model(ids[:, :6], cache=cache, use_cache=True)
        steps = [prefix.logits]
        for t in range(6, 10):  # one token at a time: the case the reference crashed on
            steps.append(model(ids[:, t : t + 1], cache=cache, use_cache=True).logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_eager_and_sdpa_agree():
    config = tiny_config()
    eager = PicoDecoderForCausalLM(config).eval()
    sdpa = PicoDecoderForCausalLM(config).eval()
    sdpa.load_state_dict(eager.state_dict())
    eager.set_attn_implementation("eager")
    sdpa.set_attn_implementation("sdpa")
    ids = torch.randint(0, 128, (2, 20))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    with torch.no_grad():
        torch.testing.assert_close(
            eager(ids, attention_mask=mask).logits, sdpa(ids, attention_mask=mask).logits
        )


def test_padded_rows_match_unpadded_rows():
    model = PicoDecoderForCausalLM(tiny_config()).eval()
    short, long = torch.randint(1, 128, (1, 6)), torch.randint(1, 128, (1, 9))
    left_padded = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.long), short], 1), long])
    mask = torch.ones_like(left_padded)
    mask[0, :3] = 0
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        batched = model(left_padded, attention_mask=mask, position_ids=position_ids).logits
        torch.testing.assert_close(batched[0, 3:], model(short).logits[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(batched[1], model(long).logits[0], atol=1e-5, rtol=1e-5)
        right_padded = torch.cat([short, torch.zeros(1, 3, dtype=torch.long)], 1)
        right = model(right_padded, attention_mask=(right_padded != 0).long() | (torch.arange(9) < 6)).logits
        torch.testing.assert_close(right[0, :6], model(short).logits[0], atol=1e-5, rtol=1e-5)


def _packing_example(max_seq_len: int = 16) -> list[list[int]]:
    """Sequences of 3..16 tokens, 13 of them: each fits max_seq_len, their concatenation is far longer."""
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(3, max_seq_len + 1, (13,), generator=generator).tolist()
    return [torch.randint(1, 128, (n,), generator=generator).tolist() for n in lengths]


def _padded_batch(sequences: list[list[int]]) -> dict[str, torch.Tensor]:
    """Right-padded rows with their attention mask, and labels -100 on the padding."""
    width = max(len(ids) for ids in sequences)
    input_ids = torch.zeros(len(sequences), width, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, ids in enumerate(sequences):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_packed_padding_free_row_gives_the_padded_batch_logits(attn_implementation):
    """One row packing 13 sequences (DataCollatorWithFlattening: no attention mask, position_ids restarting at
    each sequence) is longer than max_seq_len, yet every position is within it: the logits of each sequence's
    tokens are the padded batch's."""
    from transformers import DataCollatorWithFlattening

    model = PicoDecoderForCausalLM(tiny_config(max_seq_len=16)).eval()
    model.set_attn_implementation(attn_implementation)
    sequences = _packing_example()
    packed = DataCollatorWithFlattening(return_tensors="pt")([{"input_ids": ids} for ids in sequences])
    assert packed.keys() == {"input_ids", "labels", "position_ids"}
    assert packed["input_ids"].shape[1] > 4 * model.config.max_seq_len
    padded = _padded_batch(sequences)
    with torch.no_grad():
        packed_logits = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"]).logits
        padded_logits = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits
    real_tokens = padded["attention_mask"].bool()
    torch.testing.assert_close(packed_logits[0], padded_logits[real_tokens], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("chunked", [True, False], ids=["chunked_loss", "logits_loss"])
def test_flattened_batch_trains_with_the_padded_batch_loss(chunked):
    """DataCollatorWithFlattening's batch gives the padded batch's loss and gradients: no prediction crosses from
    one packed sequence into the next."""
    from transformers import DataCollatorWithFlattening

    model = PicoDecoderForCausalLM(tiny_config(max_seq_len=16)).train()
    sequences = _packing_example()
    packed = DataCollatorWithFlattening(return_tensors="pt")([{"input_ids": ids} for ids in sequences])
    padded = _padded_batch(sequences)

    def loss_and_grads(batch):
        model.zero_grad()
        loss = model(**batch, skip_logits=chunked).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    packed_loss, packed_grads = loss_and_grads(packed)
    padded_loss, padded_grads = loss_and_grads(padded)
    expected = sum(len(ids) - 1 for ids in sequences)  # each sequence's tokens after its first
    assert int((packed["labels"] != -100).sum()) == expected
    torch.testing.assert_close(packed_loss, padded_loss, atol=1e-6, rtol=1e-5)
    for name, grad in padded_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, atol=1e-6, rtol=1e-5, msg=name)


def test_trainer_on_flattened_batches_follows_the_padded_run(tmp_path):
    """transformers' Trainer with DataCollatorWithFlattening logs the padded batches' losses and ends at their
    weights (the Trainer's token count `num_items_in_batch` agrees too: both count each sequence's tokens after
    its first)."""
    from datasets import Dataset
    from transformers import DataCollatorWithFlattening, Trainer, TrainingArguments

    dataset = Dataset.from_dict({"input_ids": _packing_example()})

    def run(collator, name):
        torch.manual_seed(0)
        model = PicoDecoderForCausalLM(tiny_config(max_seq_len=16))
        args = TrainingArguments(
            output_dir=str(tmp_path / name),
            per_device_train_batch_size=4,
            max_steps=3,
            learning_rate=1e-2,
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            seed=0,
        )
        trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator)
        trainer.train()
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        return losses, model.state_dict()

    flattened_losses, flattened_weights = run(DataCollatorWithFlattening(return_tensors="pt"), "flattened")
    padded_losses, padded_weights = run(
        lambda rows: _padded_batch([row["input_ids"] for row in rows]), "padded"
    )
    assert len(padded_losses) == 3
    assert flattened_losses == pytest.approx(padded_losses, rel=1e-5)
    for name, weight in padded_weights.items():
        # Adam divides by the gradients' scale, so float noise in near-zero gradients moves weights ~1e-5.
        torch.testing.assert_close(flattened_weights[name], weight, atol=1e-4, rtol=1e-4, msg=name)


@pytest.mark.parametrize("cache_implementation", ["dynamic", "static"])
def test_left_padded_batched_generation_equals_one_by_one(cache_implementation):
    model = PicoDecoderForCausalLM(tiny_config()).eval()
    prompts = [torch.randint(1, 128, (n,)) for n in (7, 3, 5)]
    width = max(len(p) for p in prompts)
    ids = torch.stack([F.pad(p, (width - len(p), 0), value=0) for p in prompts])
    mask = torch.stack([F.pad(torch.ones_like(p), (width - len(p), 0)) for p in prompts])
    kwargs = dict(max_new_tokens=8, do_sample=False, cache_implementation=cache_implementation)
    batched = model.generate(ids, attention_mask=mask, **kwargs)
    for row, prompt in enumerate(prompts):
        alone = model.generate(prompt[None], **kwargs)
        assert torch.equal(batched[row, width:], alone[0, len(prompt) :]), row


def test_hidden_states_and_tuple_outputs(reference_model):
    ids = EXPECTED["input_ids"]
    with torch.no_grad():
        out = reference_model(ids, output_hidden_states=True)
        as_tuple = reference_model(ids, return_dict=False)
    assert len(out.hidden_states) == reference_model.config.n_layers + 1
    assert all(h.shape == (3, 17, 64) for h in out.hidden_states)
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[0], out.logits)


def _pico_train_forward(
    weights: dict, config: dict, input_ids: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """pico-train's forward pass, written out from its source: weights in `dtype`, RMSNorm in float32,
    RoPE as a complex multiply in float32 (`queries.float()` ... `.type_as(queries)`), sdpa with an
    additive causal mask, float32 logits."""
    w = {k.removeprefix("pico_decoder."): v.to(dtype) for k, v in weights.items()}
    n_heads, n_kv, d_model = config["attention_n_heads"], config["attention_n_kv_heads"], config["d_model"]
    head_dim, eps = d_model // n_heads, config["norm_eps"]
    batch, seq_len = input_ids.shape
    freqs = 1.0 / (
        config["position_emb_theta"] ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim)
    )
    freqs_cis = torch.polar(
        torch.ones(seq_len, head_dim // 2), torch.outer(torch.arange(seq_len).float(), freqs)
    )

    def rms_norm(x, weight):
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * weight

    def rope(x):
        x_ = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(x_ * freqs_cis[None, :, None, :]).flatten(3).type_as(x)

    mask = torch.triu(torch.full((seq_len, seq_len), float("-inf")), diagonal=1).to(dtype)
    h = F.embedding(input_ids, w["embedding_proj.weight"])
    for i in range(config["n_layers"]):
        p = f"layers.{i}."
        x = rms_norm(h, w[p + "attention_norm.weight"])
        q = F.linear(x, w[p + "attention.q_proj.weight"]).view(batch, seq_len, n_heads, head_dim)
        k = F.linear(x, w[p + "attention.k_proj.weight"]).view(batch, seq_len, n_kv, head_dim)
        v = F.linear(x, w[p + "attention.v_proj.weight"]).view(batch, seq_len, n_kv, head_dim)
        q, k = rope(q), rope(k)
        k, v = (t.repeat_interleave(n_heads // n_kv, dim=2) for t in (k, v))
        q, k, v = (t.transpose(1, 2).contiguous() for t in (q, k, v))
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        h = h + F.linear(attn.transpose(1, 2).reshape(batch, seq_len, -1), w[p + "attention.o_proj.weight"])
        x = rms_norm(h, w[p + "swiglu_norm.weight"])
        swiglu = F.silu(F.linear(x, w[p + "swiglu.w_0.weight"])) * F.linear(x, w[p + "swiglu.w_1.weight"])
        h = h + F.linear(swiglu, w[p + "swiglu.w_2.weight"])
    return F.linear(rms_norm(h, w["output_norm.weight"]), w["de_embedding_proj.weight"]).float()


def test_reference_forward_reproduces_fixture():
    """The written-out pico-train forward is itself checked against the fixture in float32."""
    weights = load_file(REFERENCE_CHECKPOINT / "model.safetensors")
    config = json.loads((REFERENCE_CHECKPOINT / "config.json").read_text())
    logits = _pico_train_forward(weights, config, EXPECTED["input_ids"], torch.float32)
    torch.testing.assert_close(logits, EXPECTED["logits"], atol=1e-5, rtol=0)


def test_half_precision_matches_reference_bf16():
    """In bf16, q/k are rotated in float32 as pico-train does, so with sdpa (the default kernel, as in
    pico-train) the logits equal its bf16 forward bit for bit (rotating in bf16 moved them by 0.024)."""
    model = AutoModelForCausalLM.from_pretrained(
        REFERENCE_CHECKPOINT, dtype=torch.bfloat16, attn_implementation="sdpa"
    )
    assert model.pico_decoder.layers[0].attention.q_proj.weight.dtype == torch.bfloat16
    with torch.no_grad():
        logits = model(EXPECTED["input_ids"]).logits
    assert logits.dtype == torch.float32  # as pico-train returns them
    weights = load_file(REFERENCE_CHECKPOINT / "model.safetensors")
    config = json.loads((REFERENCE_CHECKPOINT / "config.json").read_text())
    reference_bf16 = _pico_train_forward(weights, config, EXPECTED["input_ids"], torch.bfloat16)
    torch.testing.assert_close(logits, reference_bf16, atol=0, rtol=0)


# --- training-side behaviour ---------------------------------------------------------------------------


def _reference_loss(logits, labels, num_items=None):
    shift_logits, shift_labels = logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1)
    total = F.cross_entropy(shift_logits.float(), shift_labels, ignore_index=-100, reduction="sum")
    return total / (num_items if num_items is not None else (shift_labels != -100).sum())


@pytest.mark.parametrize("chunk_elements", [2**24, 128 * 5])  # one chunk; several chunks with a ragged tail
@pytest.mark.parametrize("num_items", [None, 37])
def test_chunked_loss_equals_full_logits_loss(monkeypatch, chunk_elements, num_items):
    monkeypatch.setattr(PicoDecoderForCausalLM, "loss_chunk_elements", chunk_elements)
    model = PicoDecoderForCausalLM(tiny_config()).train()
    ids = torch.randint(0, 128, (3, 13))
    labels = ids.clone()
    labels[0, :4] = -100
    labels[2, 7:] = -100
    kwargs = {} if num_items is None else {"num_items_in_batch": torch.tensor(num_items)}

    chunked = model(ids, labels=labels, **kwargs)
    assert chunked.logits is None  # not materialised in training mode
    chunked.loss.backward()
    chunked_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    logits = model(ids, skip_logits=False).logits
    expected = _reference_loss(logits, labels, num_items)
    expected.backward()
    torch.testing.assert_close(chunked.loss, expected, atol=1e-6, rtol=1e-5)
    for name, param in model.named_parameters():
        torch.testing.assert_close(chunked_grads[name], param.grad, atol=1e-6, rtol=1e-5, msg=name)

    with torch.no_grad():
        evaluated = model.eval()(ids, labels=labels, **kwargs)
    assert evaluated.logits.shape == (3, 13, 128)
    torch.testing.assert_close(evaluated.loss, expected.detach(), atol=1e-6, rtol=1e-5)


def test_chunked_loss_gives_way_to_the_head_under_tensor_parallelism(monkeypatch):
    """The chunked loss reads the head's weight, which `_tp_plan` shards by vocabulary: under tensor parallelism
    the training loss goes through the head module, and asking for the chunked loss is an error."""
    model = PicoDecoderForCausalLM(tiny_config()).train()
    ids = torch.randint(0, 128, (2, 9))
    chunked = model(ids, labels=ids)
    monkeypatch.setattr(model, "_tp_size", 2, raising=False)
    through_head = model(ids, labels=ids)
    assert chunked.logits is None and through_head.logits.shape == (2, 9, 128)
    torch.testing.assert_close(through_head.loss, chunked.loss, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError) as error:
        model(ids, labels=ids, skip_logits=True)
    assert str(error.value) == (
        "skip_logits=True (the chunked loss) cannot run under tensor parallelism (tp_size=2): it reads "
        "de_embedding_proj.weight, which each rank holds only a vocabulary shard of. Leave skip_logits unset to "
        "compute the loss from the gathered logits."
    )


def test_gradient_checkpointing_gives_the_same_gradients():
    model = PicoDecoderForCausalLM(tiny_config()).train()
    ids = torch.randint(0, 128, (2, 16))

    def grads():
        model.zero_grad()
        model(ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = grads()
    model.activation_checkpointing_enable()
    assert model.pico_decoder.layers[0].gradient_checkpointing
    checkpointed = grads()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)


def test_peft_lora_on_attention_and_swiglu():
    from peft import LoraConfig, get_peft_model

    model = PicoDecoderForCausalLM(tiny_config())
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "w_0", "w_1", "w_2"]
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=targets, init_lora_weights=False))
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert len(trainable) == 2 * len(targets) * 2  # A and B, per target, per layer
    ids = torch.randint(0, 128, (2, 8))
    peft_model.train()
    peft_model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for n, p in peft_model.named_parameters() if n in trainable)
    peft_model.eval()
    with torch.no_grad():
        adapted = peft_model(input_ids=ids).logits
        merged = peft_model.merge_and_unload()(ids).logits
    torch.testing.assert_close(adapted, merged, atol=1e-5, rtol=1e-5)


def test_torch_compile_fullgraph():
    model = PicoDecoderForCausalLM(tiny_config()).eval()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids).logits, model(ids).logits)


def test_text_generation_pipeline():
    from transformers import pipeline

    from pico_hf.tokenization import load_tokenizer

    tokenizer = load_tokenizer()
    model = PicoDecoderForCausalLM(tiny_config(vocab_size=50304, pad_token_id=1, eos_token_id=50279)).eval()
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    prompts = ["The cat", "Once upon a time there"]
    out = generator(prompts, max_new_tokens=5, do_sample=False)
    assert [o[0]["generated_text"][: len(p)] for o, p in zip(out, prompts, strict=True)] == prompts
    prompt_ids = tokenizer("The cat", return_tensors="pt").input_ids
    direct = model.generate(prompt_ids, max_new_tokens=5, do_sample=False)
    assert out[0][0]["generated_text"] == tokenizer.decode(direct[0])


def test_package_registers_auto_classes():
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    assert CONFIG_MAPPING["pico_decoder"] is PicoDecoderConfig
    assert isinstance(AutoModelForCausalLM.from_config(tiny_config()), PicoDecoderForCausalLM)
    assert isinstance(AutoModel.from_config(tiny_config()), PicoDecoderModel)
    assert pico_hf.__version__


def test_input_checks_read_back_once_per_generate_off_the_host(monkeypatch):
    """On an accelerator, checking ids and positions is a host sync: decoding steps skip it, `generate` checks
    its prompt's ids once, and a training batch (no cache) is checked, ids and positions in one read; on CPU every
    forward is checked with the same messages."""
    from pico_hf.models.pico_decoder import modeling_pico_decoder as modeling

    calls = []
    check_ids, check_inputs = modeling.check_vocab_range, modeling.check_input_range
    monkeypatch.setattr(
        modeling, "check_vocab_range", lambda ids, *args: (calls.append(ids.shape), check_ids(ids, *args))
    )
    monkeypatch.setattr(
        modeling, "check_input_range", lambda ids, *args: (calls.append(ids.shape), check_inputs(ids, *args))
    )
    model = PicoDecoderForCausalLM(tiny_config()).eval()
    prompt = torch.tensor([[1, 2, 3]])
    on_cpu = model.generate(prompt, max_new_tokens=6, do_sample=False)
    assert len(calls) == 1 + 6  # the prompt in generate, then every forward

    calls.clear()
    monkeypatch.setattr(modeling, "_on_host", lambda tensor: False)  # as for a CUDA tensor
    assert torch.equal(model.generate(prompt, max_new_tokens=6, do_sample=False), on_cpu)
    assert calls == [(1, 3)]  # the prompt only: no read-back per decoding step
    with pytest.raises(ValueError, match=r"token id 128, outside the model's vocabulary \(vocab_size=128"):
        model.generate(torch.tensor([[1, 128]]), max_new_tokens=2)
    calls.clear()
    model.train()
    model(prompt, labels=prompt)  # a training batch: checked once
    assert calls == [(1, 3)]
    with pytest.raises(ValueError, match=r"^Input reaches position 64, beyond the model's max_seq_len \(64"):
        model(prompt, position_ids=torch.tensor([[0, 1, 64]]), labels=prompt)


def test_model_classes_carry_transformers_docstrings_and_import_silently():
    """`@auto_docstring` documents every argument as for transformers' own models, and importing the model
    prints nothing (auto_docstring prints an error line for a model whose config it cannot find)."""
    import subprocess
    import sys

    forward_doc = PicoDecoderForCausalLM.forward.__doc__
    for argument in (
        "input_ids (`torch.LongTensor`",
        "cache (`Cache`",
        "logits_to_keep",
        "skip_logits (`bool`",
    ):
        assert argument in forward_doc, argument
    assert "[`PicoDecoderConfig`]" in PicoDecoderForCausalLM.__doc__
    assert "The decoder trunk" in PicoDecoderModel.__doc__
    imported = subprocess.run(
        [sys.executable, "-c", "import pico_hf.models.pico_decoder.modeling_pico_decoder"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout == ""


def test_declared_transformers_range_is_the_tested_one():
    """The model imports names transformers 5.0 lacks: the declared range starts at the tested minor version."""
    import importlib.metadata

    from conftest import REPO
    from packaging.requirements import Requirement

    (line,) = re.findall(r'^\s*"(transformers[^"]*)"', (REPO / "pyproject.toml").read_text(), re.M)
    spec = Requirement(line).specifier
    installed = importlib.metadata.version("transformers")
    assert installed in spec and "5.0.0" not in spec and "6.0.0" not in spec
