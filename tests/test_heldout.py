"""The held-out curve: eval_heldout_loss at step 0, every N steps and the last step, equal to the loss of the
saved checkpoints computed offline, logged like any evaluation value, and the same after a resume and on two
processes."""

import json
import math
import os
import subprocess

import pytest
import torch
import torch.nn.functional as F
from conftest import StopAfter, assert_bitwise_equal, assert_world_size, final_weights, train, train_command
from conftest import tiny_training_overrides as training_overrides
from test_eval_callback import eval_texts
from transformers import AutoModelForCausalLM, AutoTokenizer

from pico_hf.evaluation.heldout import HELDOUT_FILE, read_heldout_losses
from pico_hf.evaluation.perplexity import encode_texts, load_texts
from pico_hf.training.config import ConfigError, load_config

MAX_LENGTH = 12


def heldout_overrides(tmp_path, **extra):
    return {
        "evaluation.heldout_every_n_steps": 4,
        "evaluation.heldout_max_samples": 7,
        "evaluation.paloma.dataset_name": str(eval_texts(tmp_path)),
        "evaluation.paloma.max_length": MAX_LENGTH,
        "evaluation.paloma.batch_size": 3,
        **extra,
    }


@pytest.fixture(scope="module")
def heldout_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("heldout")
    _, config = train(tmp_path, **heldout_overrides(tmp_path))
    return config, tmp_path


def offline_loss(checkpoint, dataset):
    """Mean next-token NLL over every predicted token, one text at a time (no batching, no padding)."""
    model = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    total, count = 0.0, 0
    with torch.no_grad():
        for ids in encode_texts(tokenizer, load_texts(dataset, "val", 7), MAX_LENGTH):
            ids = torch.tensor([ids])
            logits = model(input_ids=ids).logits[0, :-1]
            total += F.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
            count += ids.shape[1] - 1
    return total / count


def test_the_curve_is_measured_logged_and_kept(heldout_run):
    config, tmp_path = heldout_run
    path = config.run_dir / "eval_results" / HELDOUT_FILE
    saved = json.loads(path.read_text())
    assert saved["dataset"] == str(eval_texts(tmp_path)) and saved["split"] == "val"
    assert saved["texts"] == 7 and saved["max_length"] == MAX_LENGTH
    losses = read_heldout_losses(path)
    assert sorted(losses) == [0, 4, 6]  # step 0, every 4 steps, and the last step (6)
    for step in (0, 6):  # the checkpoints the run kept (every 2 steps)
        assert losses[step] == pytest.approx(
            offline_loss(config.checkpoints_dir / f"step_{step}", saved["dataset"]), rel=1e-5
        )
    assert losses[0] == pytest.approx(math.log(128), rel=0.05)  # an untrained model: about uniform
    logged = [json.loads(line) for line in (config.logs_dir / "metrics.jsonl").read_text().splitlines()]
    curve = {entry["step"]: entry["eval_heldout_loss"] for entry in logged if "eval_heldout_loss" in entry}
    assert curve == losses
    assert [entry["step"] for entry in logged if "loss" in entry] == [
        1,
        2,
        3,
        4,
        5,
        6,
    ]  # training logs intact
    log_file = next(config.logs_dir.glob("log_*.log")).read_text()
    for step in (0, 4, 6):  # as the console shows them, step 0 (measured before the progress bar exists) too
        assert log_file.count(f"'eval_heldout_loss': '{losses[step]:.4g}'") == 1


def test_resumed_run_measures_the_same_curve_and_trains_the_same(heldout_run, tmp_path):
    config, _ = heldout_run
    overrides = heldout_overrides(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path, callbacks=[StopAfter(5)], **overrides)
    resumed_dir = tmp_path / "runs" / "tiny"
    assert os.readlink(resumed_dir / "checkpoints" / "latest") == "step_4"
    train(tmp_path, **overrides)
    assert_bitwise_equal(final_weights(resumed_dir), final_weights(config.run_dir))
    assert read_heldout_losses(resumed_dir / "eval_results" / HELDOUT_FILE) == read_heldout_losses(
        config.run_dir / "eval_results" / HELDOUT_FILE
    )
    # Measuring the curve leaves training exactly as it is without it.
    _, plain = train(tmp_path / "plain")
    assert_bitwise_equal(final_weights(plain.run_dir), final_weights(config.run_dir))


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        (
            "evaluation.heldout_every_n_steps",
            0,
            "evaluation.heldout_every_n_steps must be a positive integer or null, got 0",
        ),
        (
            "evaluation.heldout_max_samples",
            -1,
            "evaluation.heldout_max_samples must be a positive integer or null, got -1",
        ),
        (
            "evaluation.paloma.max_length",
            99,
            "evaluation.paloma.max_length (99) is longer than model.max_seq_len (16)",
        ),
    ],
)
def test_bad_settings_are_errors_before_training(tmp_path, key, value, message):
    from pico_hf.training.run import run_training

    config, notes = load_config(
        None, training_overrides(tmp_path, **heldout_overrides(tmp_path, **{key: value}))
    )
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        run_training(config, notes)
    assert not (tmp_path / "runs" / "tiny").exists()


@pytest.mark.slow
def test_two_processes_measure_the_same_curve(heldout_run, tmp_path):
    config, _ = heldout_run
    overrides = training_overrides(tmp_path, **heldout_overrides(tmp_path))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [*train_command(2), *overrides], env=env, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert_world_size(result.stderr, 2)
    two = read_heldout_losses(tmp_path / "runs" / "tiny" / "eval_results" / HELDOUT_FILE)
    one = read_heldout_losses(config.run_dir / "eval_results" / HELDOUT_FILE)
    assert two.keys() == one.keys() == {0, 4, 6}
    assert two[0] == one[0]  # the same weights, the same batches: the same value
    for step in one:  # two processes train with a different reduction order: close, not bitwise
        assert two[step] == pytest.approx(one[step], rel=1e-4), step
