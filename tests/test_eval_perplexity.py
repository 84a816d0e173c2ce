"""Perplexity with pico-lm/perplexity semantics: the shared computation and the `evaluate` metric module."""

import logging
import math

import evaluate
import pytest
import torch
from conftest import REPO, olmo_vocab_config

from pico_hf import PicoDecoderForCausalLM
from pico_hf.evaluation.perplexity import (
    batch_perplexities,
    compute_perplexity,
    encode_texts,
    load_texts,
    resolve_dataset,
    text_perplexities,
)
from pico_hf.tokenization import load_tokenizer

METRIC_DIR = REPO / "eval" / "metrics" / "perplexity"
MAX_LENGTH = 48


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return PicoDecoderForCausalLM(olmo_vocab_config(d_model=32, activation_hidden_dim=64)).eval()


@pytest.fixture(scope="module")
def texts():
    # Real held-out documents of mixed lengths (some longer than MAX_LENGTH tokens, so truncation matters).
    return load_texts("embedded", "val", max_samples=11)


def direct_perplexities(model, tokenizer, texts, max_length):
    """Each text alone, no padding: exp(-mean log p(token_i | tokens_<i)) over tokens 2..n, in float64."""
    values = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_length]
        with torch.no_grad():
            logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].double(), dim=-1)
        token_logprobs = logprobs[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
        values.append(math.exp(-token_logprobs.mean().item()))
    return values


def test_texts_cover_padding_and_truncation(tokenizer, texts):
    lengths = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    assert min(lengths) < MAX_LENGTH < max(lengths)


def test_perplexity_equals_direct_computation_from_token_loglikelihoods(model, tokenizer, texts):
    result = compute_perplexity(model, tokenizer, texts, max_length=MAX_LENGTH, batch_size=4)
    expected = direct_perplexities(model, tokenizer, texts, MAX_LENGTH)
    assert result.perplexities == pytest.approx(expected, rel=1e-5)
    # The reported value is the unweighted mean of per-text perplexities, not exp of the corpus mean NLL.
    assert result.mean_perplexity == pytest.approx(sum(expected) / len(expected), rel=1e-5)


def test_evaluate_metric_module_matches(model, tokenizer, texts, tmp_path):
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    metric = evaluate.load(str(METRIC_DIR))
    # The arguments pico-train passes to pico-lm/perplexity.
    result = metric.compute(
        model_id=str(tmp_path / "model"),
        predictions=texts,
        add_start_token=False,
        max_length=MAX_LENGTH,
        batch_size=4,
        trust_remote_code=True,
        device="cpu",
    )
    expected = direct_perplexities(model, tokenizer, texts, MAX_LENGTH)
    assert sorted(result) == ["mean_perplexity", "perplexities"]
    assert result["perplexities"] == pytest.approx(expected, rel=1e-5)
    assert result["mean_perplexity"] == pytest.approx(sum(expected) / len(expected), rel=1e-5)
    # A loaded model works too.
    again = metric.compute(
        model_id=model,
        tokenizer=tokenizer,
        predictions=texts[:3],
        add_start_token=False,
        max_length=MAX_LENGTH,
    )
    assert again["perplexities"] == pytest.approx(expected[:3], rel=1e-5)


def test_evaluate_module_runs_without_pico_hf(model, tokenizer, texts, tmp_path):
    """The metric is a standalone `evaluate` module: in a process where pico_hf cannot be imported it loads a
    pico-hf checkpoint by its own code and gives pico_hf's values."""
    import json
    import os
    import subprocess
    import sys
    import textwrap

    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    (tmp_path / "texts.json").write_text(json.dumps(texts))
    hide_pico_hf = tmp_path / "no_pico_hf"
    hide_pico_hf.mkdir()
    (hide_pico_hf / "sitecustomize.py").write_text("import sys\nsys.modules['pico_hf'] = None\n")
    code = f"""
        import json, sys
        import evaluate
        metric = evaluate.load({str(METRIC_DIR)!r})
        result = metric.compute(
            model_id="model", predictions=json.load(open("texts.json")), add_start_token=False,
            max_length={MAX_LENGTH}, batch_size=4, trust_remote_code=True, device="cpu",
        )
        assert sys.modules.get("pico_hf") is None and not any(m.startswith("pico_hf.") for m in sys.modules)
        json.dump(result, open("result.json", "w"))
        """
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=tmp_path,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(hide_pico_hf)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    standalone = json.loads((tmp_path / "result.json").read_text())
    shared = compute_perplexity(model, tokenizer, texts, max_length=MAX_LENGTH, batch_size=4)
    assert standalone["perplexities"] == pytest.approx(shared.perplexities, rel=1e-6)
    assert standalone["mean_perplexity"] == pytest.approx(shared.mean_perplexity, rel=1e-6)


def test_batching_and_chunking_do_not_change_values(model, tokenizer, texts):
    one = compute_perplexity(model, tokenizer, texts, max_length=MAX_LENGTH, batch_size=1).perplexities
    many = compute_perplexity(model, tokenizer, texts, max_length=MAX_LENGTH, batch_size=7).perplexities
    # Row chunks of one text per forward (a tiny logits budget).
    ids = encode_texts(tokenizer, texts[:5], MAX_LENGTH)
    chunked = batch_perplexities(model, ids, pad_token_id=1, max_logits_elements=1)
    assert many == pytest.approx(one, rel=1e-5)
    assert chunked == pytest.approx(one[:5], rel=1e-5)


def test_shards_cover_every_text_with_equal_forward_counts(model, tokenizer, texts):
    ids = encode_texts(tokenizer, texts, MAX_LENGTH)
    full = text_perplexities(model, ids, batch_size=2, pad_token_id=1)
    forwards = []
    shards = {}
    for rank in range(3):
        calls = []
        handle = model.register_forward_hook(lambda *_, calls=calls: calls.append(1))
        try:
            shard = text_perplexities(
                model, ids, batch_size=2, pad_token_id=1, process_index=rank, num_processes=3
            )
        finally:
            handle.remove()
        forwards.append(len(calls))
        assert not shards.keys() & shard.keys()
        shards.update(shard)
    assert shards == full  # the same batches, dealt out: bitwise the same values
    assert sorted(full) == list(range(len(texts)))
    assert len(set(forwards)) == 1  # 11 texts in 6 batches over 3 processes: 2 forwards each


def test_truncation_and_start_token(tokenizer):
    ids = encode_texts(tokenizer, ["one two three four five six seven"], max_length=4)
    assert len(ids[0]) == 4
    tokenizer_with_bos = load_tokenizer()
    tokenizer_with_bos.bos_token = "<|endoftext|>"
    with_bos = encode_texts(
        tokenizer_with_bos, ["one two three four five six seven"], max_length=4, add_start_token=True
    )
    assert with_bos[0][0] == tokenizer_with_bos.bos_token_id and with_bos[0][1:] == ids[0][:3]


def test_errors(model, tokenizer):
    with pytest.raises(ValueError, match=r"Text 1 \('Hi'\) has 1 token\(s\); perplexity needs at least two"):
        encode_texts(tokenizer, ["Hello there, world.", "Hi"])
    with pytest.raises(ValueError, match=r"add_start_token=True needs a tokenizer with a bos token"):
        encode_texts(tokenizer, ["Hello there"], add_start_token=True)
    with pytest.raises(ValueError, match=r"max_length must be at least 2 tokens, got 1"):
        encode_texts(tokenizer, ["Hello there"], max_length=1)
    with pytest.raises(TypeError, match=r"sequence of strings, not a single string"):
        compute_perplexity(model, tokenizer, "Hello there")


def test_evaluation_texts(tmp_path, caplog):
    assert len(load_texts("embedded", "val")) == 201
    assert len(load_texts("embedded", "val", max_samples=5)) == 5
    with caplog.at_level(logging.WARNING):
        assert resolve_dataset("pico-lm/pretokenized-paloma-tinsy") == "embedded"  # offline in tests
    assert "unreachable: using the embedded held-out split instead" in caplog.text
    assert resolve_dataset("embedded") == "embedded"
    with pytest.raises(ValueError, match=r"has no 'text' column \(columns: \['input_ids'\]\)"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"input_ids": [[1, 2, 3]]}), tmp_path / "ids.parquet")
        load_texts(str(tmp_path / "ids.parquet"))
