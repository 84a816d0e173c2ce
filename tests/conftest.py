import os

# Tests never touch the network: set before huggingface_hub is imported anywhere.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import re
import sys
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"  # made with the original Pico code; see fixtures/README.md
REFERENCE_CHECKPOINT = FIXTURES / "pico-decoder-reference"


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)


def tiny_config(**overrides):
    from pico_hf import PicoDecoderConfig

    values = dict(
        d_model=64,
        n_layers=2,
        attention_n_heads=4,
        attention_n_kv_heads=2,
        activation_hidden_dim=128,
        vocab_size=128,
        max_seq_len=64,
        pad_token_id=0,
    )
    values.update(overrides)
    return PicoDecoderConfig(**values)


def olmo_vocab_config(**overrides):
    """`tiny_config` with the OLMo tokenizer's vocabulary and special tokens (for the shipped tokenizer)."""
    return tiny_config(**{"vocab_size": 50304, "pad_token_id": 1, "eos_token_id": 50279, **overrides})


def make_word_tokenizer(path, vocab_size=100):
    """A small fast tokenizer (word level, ids 0..vocab_size-1) saved as a transformers tokenizer directory."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<|padding|>": 0, "<|endoftext|>": 1, **{f"w{i}": i for i in range(2, vocab_size)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<|padding|>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|endoftext|>", pad_token="<|padding|>"
    )
    tokenizer.save_pretrained(path)
    return path


def make_pretokenized(path, n_rows, row_length, vocab_size=100, seed=0, column="input_ids"):
    """A parquet file of random token rows in the pico-lm/pretokenized-dolma layout."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    generator = torch.Generator().manual_seed(seed)
    rows = torch.randint(2, vocab_size, (n_rows, row_length), generator=generator).tolist()
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({column: rows}), path)
    return path


def bad_row_overrides(tmp_path, shuffle):
    """Overrides for streamed data in two shards of 24 rows of 33 tokens, where row 6 of the second (row 30 of
    the stream, read by step 8 in the stored order) holds token id 500, beyond the vocabulary of 128. Returns
    (overrides, the bad shard)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = tmp_path / "shards"
    make_pretokenized(data / "part-0.parquet", n_rows=24, row_length=33)
    rows = make_pretokenized(data / "part-1.parquet", n_rows=24, row_length=33, seed=1)
    table = pq.read_table(rows).to_pylist()
    table[6]["input_ids"][3] = 500
    pq.write_table(pa.Table.from_pylist(table), rows)
    overrides = {
        "data.dataset.name": str(data),
        "data.dataset.streaming": "true",
        "data.dataloader.shuffle": shuffle,
        "training.max_steps": 12,
        "checkpointing.save_every_n_steps": 3,
    }
    return overrides, rows


def tiny_training_overrides(tmp_path, **extra):
    """Dotted overrides for a seconds-long CPU training run on synthetic data."""
    tokenizer = tmp_path / "tokenizer"
    if not tokenizer.exists():
        make_word_tokenizer(tokenizer)
    data = tmp_path / "data" / "train.parquet"
    if not data.exists():
        make_pretokenized(data, n_rows=48, row_length=33)
    values = {
        "data.dataset.name": str(data),
        "data.tokenizer.name": str(tokenizer),
        "data.tokenizer.vocab_size": 128,
        "data.dataloader.batch_size": 8,
        "model.d_model": 32,
        "model.n_layers": 2,
        "model.attention_n_heads": 4,
        "model.attention_n_kv_heads": 2,
        "model.activation_hidden_dim": 64,
        "model.vocab_size": 128,
        "model.max_seq_len": 16,
        "training.max_steps": 6,
        "training.optimization.lr": 0.01,
        "training.optimization.lr_warmup_steps": 2,
        "training.optimization.gradient_accumulation_steps": 2,
        "training.fabric.accelerator": "cpu",
        "training.fabric.precision": "32-true",
        "checkpointing.runs_dir": str(tmp_path / "runs"),
        "checkpointing.run_name": "tiny",
        "checkpointing.save_every_n_steps": 2,
        "checkpointing.learning_dynamics.eval_data": "null",
        "checkpointing.learning_dynamics.metrics": "[]",
        "evaluation.metrics": "[]",
        "monitoring.logging.log_every_n_steps": 1,
        **extra,
    }
    return [f"{key}={value}" for key, value in values.items()]


TRAIN_SCRIPT = REPO / "recipes" / "train.py"


def free_port() -> int:
    """A free local TCP port for a multi-process run's rendezvous (concurrent runs must not share one)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def train_command(processes: int = 1, accelerate_config: str = "cpu") -> list[str]:
    """`recipes/train.py` in a fresh interpreter: plain Python, or `accelerate launch` with one of
    `recipes/accelerate/*.yaml` on `processes` CPU processes (the README's commands)."""
    if processes == 1:
        return [sys.executable, str(TRAIN_SCRIPT)]
    config = REPO / "recipes" / "accelerate" / f"{accelerate_config}.yaml"
    launch = ["-m", "accelerate.commands.launch", "--config_file", str(config)]
    launch += ["--num_processes", str(processes), "--main_process_port", str(free_port())]
    return [sys.executable, *launch, str(TRAIN_SCRIPT)]


def assert_world_size(output: str, processes: int) -> None:
    """The run really had `processes` processes: its first log line says how the global batch splits."""
    found = re.findall(r"global batch \d+ = (\d+) process(?:es)? x", output)
    assert found, "no 'global batch N = P process(es) x ...' line in the run's output:\n" + output[-3000:]
    assert [int(p) for p in found] == [processes] * len(found), found


def train(tmp_path, callbacks=None, **overrides):
    """A tiny training run in this process; returns (run_training's result, the config)."""
    from pico_hf.training.config import load_config
    from pico_hf.training.run import run_training

    config, notes = load_config(None, tiny_training_overrides(tmp_path, **overrides))
    return run_training(config, notes, extra_callbacks=callbacks), config


def final_weights(run_dir):
    from safetensors.torch import load_file

    return load_file(run_dir / "checkpoints" / "latest" / "model.safetensors")


def assert_bitwise_equal(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


class StopAfter(TrainerCallback):
    """Ends a run abruptly after a given step, as a crash would (no final checkpoint)."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt
