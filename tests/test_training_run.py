"""End-to-end training: run layout, logging, exact resume, multi-process equivalence, input errors."""

import json
import os
import signal
import subprocess
import time

import pytest
import torch
import yaml
from conftest import (
    StopAfter,
    assert_bitwise_equal,
    assert_world_size,
    final_weights,
    make_pretokenized,
    make_word_tokenizer,
    tiny_training_overrides,
    train,
    train_command,
)
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import pico_hf  # noqa: F401  (registers the Auto classes)
from pico_hf.training.config import ConfigError


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("finished")
    summary, config = train(tmp_path)
    return summary, config, tmp_path


def test_run_layout(finished_run):
    summary, config, _ = finished_run
    run_dir = config.run_dir
    assert summary["steps"] == 6
    assert summary["checkpoints"] == ["step_0", "step_2", "step_4", "step_6"]
    checkpoints = run_dir / "checkpoints"
    assert os.readlink(checkpoints / "latest") == "step_6"
    assert not list(checkpoints.glob(".*"))  # no temporary or stale folders left behind
    for step in (0, 2, 4, 6):
        step_dir = checkpoints / f"step_{step}"
        names = {p.name for p in step_dir.iterdir()}
        assert {
            "config.json",
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json",
            "modeling_pico_decoder.py",
            "configuration_pico_decoder.py",
            "fabric_state",
        } <= names
        assert "training_args.bin" not in names  # training state stays in fabric_state/
        state = {p.name for p in (step_dir / "fabric_state").iterdir()}
        assert {
            "optimizer.pt",
            "scheduler.pt",
            "rng_state.pth",
            "trainer_state.json",
            "data_position.json",
            "training_args.bin",
        } <= state
        position = json.loads((step_dir / "fabric_state" / "data_position.json").read_text())
        assert position == {"step": step, "sequence": step * 8}
        assert json.loads((step_dir / "config.json").read_text())["d_model"] == 32
        keys = load_file(step_dir / "model.safetensors").keys()
        assert (
            "pico_decoder.de_embedding_proj.weight" in keys
            and "pico_decoder.layers.1.swiglu.w_2.weight" in keys
        )
    resolved = yaml.safe_load((run_dir / "training_config.yaml").read_text())
    assert resolved["training"]["max_steps"] == 6 and resolved["model"]["d_model"] == 32
    assert list((run_dir / "logs").glob("log_*.log"))
    assert list((run_dir / "logs" / "tensorboard").glob("events.out.tfevents.*"))


def test_every_checkpoint_loads_with_auto_classes(finished_run):
    _, config, _ = finished_run
    ids = torch.randint(2, 100, (1, 10))
    logits = []
    for step in (0, 6):
        step_dir = config.run_dir / "checkpoints" / f"step_{step}"
        model = AutoModelForCausalLM.from_pretrained(step_dir)
        tokenizer = AutoTokenizer.from_pretrained(step_dir)
        assert tokenizer.eos_token == "<|endoftext|>"
        with torch.no_grad():
            logits.append(model(ids).logits)
    assert not torch.allclose(logits[0], logits[1])  # training changed the model


def test_logs_have_pico_train_quantities(finished_run):
    _, config, _ = finished_run
    lines = [
        json.loads(line) for line in (config.run_dir / "logs" / "metrics.jsonl").read_text().splitlines()
    ]
    training = [line for line in lines if "loss" in line]
    assert [line["step"] for line in training] == [1, 2, 3, 4, 5, 6]
    for line in training:
        assert {
            "loss",
            "learning_rate",
            "grad_norm",
            "inf_or_nan_count",
            "num_input_tokens_seen",
        } <= line.keys()
        assert line["inf_or_nan_count"] == 0
    assert all("tokens_per_second" in line for line in training[1:])
    assert training[-1]["num_input_tokens_seen"] == 6 * 8 * 16
    # The rate each step trained with: linear warmup from 0 over 2 steps to 0.01, then linear decay to 0 at step 6.
    assert [round(line["learning_rate"], 6) for line in training] == [0.0, 0.005, 0.01, 0.0075, 0.005, 0.0025]
    assert training[-1]["loss"] < training[0]["loss"]


def test_resume_is_bitwise_identical(finished_run, tmp_path):
    _, config, _ = finished_run
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path, callbacks=[StopAfter(3)])
    assert os.readlink(tmp_path / "runs" / "tiny" / "checkpoints" / "latest") == "step_2"
    summary, _ = train(tmp_path)
    assert summary["resumed_from"].endswith("step_2")
    assert_bitwise_equal(final_weights(tmp_path / "runs" / "tiny"), final_weights(config.run_dir))


# --- bad input: a clear error before the first step, nothing written over --------------------------------


def expect_config_error(tmp_path, message, **overrides):
    with pytest.raises(ConfigError, match=message):
        train(tmp_path, **overrides)
    assert not (tmp_path / "runs" / "tiny" / "checkpoints" / "step_0").exists()


def test_missing_data_path(tmp_path):
    expect_config_error(
        tmp_path,
        r"^data.dataset.name: dataset path .*nowhere.parquet does not exist$",
        **{"data.dataset.name": str(tmp_path / "nowhere.parquet")},
    )


def test_wrong_column_name(tmp_path):
    data = make_pretokenized(tmp_path / "other" / "x.parquet", 8, 17, column="tokens")
    expect_config_error(
        tmp_path, r"has no 'input_ids' column \(columns: \['tokens'\]\)", **{"data.dataset.name": str(data)}
    )


def test_rows_of_the_wrong_length(tmp_path):
    data = make_pretokenized(tmp_path / "other" / "x.parquet", 8, 20)
    expect_config_error(
        tmp_path,
        r"has 20 tokens; rows must hold k \* max_seq_len \+ 1 tokens \(max_seq_len=16",
        **{"data.dataset.name": str(data)},
    )


def test_rows_of_mixed_lengths(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "mixed.parquet"
    pq.write_table(pa.table({"input_ids": [[3] * 17, [3] * 17, [3] * 33]}), path)
    expect_config_error(tmp_path, r"differ in length: .* row 2 has 33", **{"data.dataset.name": str(path)})


def test_token_ids_beyond_the_vocabulary(tmp_path):
    data = make_pretokenized(tmp_path / "other" / "x.parquet", 8, 17, vocab_size=300)
    expect_config_error(
        tmp_path,
        r"holds token id \d+, outside the model's vocabulary of 128",
        **{"data.dataset.name": str(data)},
    )


def test_tokenizer_larger_than_the_model_vocabulary(tmp_path):
    make_word_tokenizer(tmp_path / "big_tokenizer", vocab_size=200)
    expect_config_error(
        tmp_path,
        r"has 200 tokens but model.vocab_size is 128",
        **{"data.tokenizer.name": str(tmp_path / "big_tokenizer")},
    )


def test_batch_not_divisible_by_accumulation_and_processes(tmp_path):
    expect_config_error(
        tmp_path,
        r"batch_size \(6\) must be divisible by .*gradient_accumulation_steps \(4\) x processes \(1\) = 4",
        **{"data.dataloader.batch_size": 6, "training.optimization.gradient_accumulation_steps": 4},
    )


def test_unwritable_run_directory(tmp_path):
    blocker = tmp_path / "runs_file"
    blocker.write_text("a file where the runs folder should be")
    expect_config_error(
        tmp_path,
        r"Run directory .*runs_file/tiny is not writable",
        **{"checkpointing.runs_dir": str(blocker)},
    )
    assert blocker.read_text() == "a file where the runs folder should be"


def test_unknown_training_argument(tmp_path):
    expect_config_error(
        tmp_path,
        r"'training_arguments.lerning_rate': not a TrainingArguments field; did you mean 'learning_rate'",
        **{"training_arguments.lerning_rate": 1},
    )


# --- processes: SIGKILL at any moment, and several processes -----------------------------------------------


def launch(tmp_path, *extra, processes=1):
    overrides = tiny_training_overrides(
        tmp_path, **{"training.max_steps": 12, "checkpointing.save_every_n_steps": 3}
    )
    command = [*train_command(processes), *overrides, *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
@pytest.mark.parametrize("kill_when", ["checkpoint_being_written", "between_checkpoints"])
def test_sigkill_and_restart_gives_the_same_final_weights(tmp_path, kill_when):
    reference = launch(tmp_path / "reference")
    assert reference.wait(timeout=600) == 0, reference.stdout.read()

    checkpoints = tmp_path / "killed" / "runs" / "tiny" / "checkpoints"
    process = launch(tmp_path / "killed")
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        if kill_when == "checkpoint_being_written" and (checkpoints / ".step_6.tmp").exists():
            break
        if kill_when == "between_checkpoints" and (checkpoints / "step_6").exists():
            time.sleep(
                0.02
            )  # into step 7: a tiny run reaches its last checkpoint within a fraction of a second
            break
        time.sleep(0.002)
    assert process.poll() is None, "the run finished before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()

    restarted = launch(tmp_path / "killed")
    output = restarted.communicate(timeout=600)[0]
    assert restarted.returncode == 0, output
    assert "Resuming from" in output
    assert_bitwise_equal(
        final_weights(tmp_path / "killed" / "runs" / "tiny"),
        final_weights(tmp_path / "reference" / "runs" / "tiny"),
    )


@pytest.mark.slow
def test_two_processes_reproduce_the_single_process_run(tmp_path):
    single, double = launch(tmp_path / "one"), launch(tmp_path / "two", processes=2)
    for process, processes in ((single, 1), (double, 2)):
        output = process.communicate(timeout=600)[0]
        assert process.returncode == 0, output
        assert_world_size(output, processes)

    def losses(root):
        lines = (root / "runs" / "tiny" / "logs" / "metrics.jsonl").read_text().splitlines()
        return [json.loads(line)["loss"] for line in lines if "loss" in json.loads(line)]

    assert len(losses(tmp_path / "one")) == 12
    torch.testing.assert_close(
        torch.tensor(losses(tmp_path / "two")), torch.tensor(losses(tmp_path / "one")), rtol=1e-5, atol=1e-5
    )
    one, two = (
        final_weights(tmp_path / "one" / "runs" / "tiny"),
        final_weights(tmp_path / "two" / "runs" / "tiny"),
    )
    for name in one:  # the same global batches; only the gradient reduction order differs
        torch.testing.assert_close(two[name], one[name], rtol=0, atol=2e-5, msg=name)


@pytest.mark.slow
def test_demo_config_end_to_end(tmp_path):
    result = subprocess.run(
        [
            *train_command(),
            "training.max_steps=4",
            "checkpointing.save_every_n_steps=2",
            "monitoring.logging.log_every_n_steps=1",
            f"checkpointing.runs_dir={tmp_path}",
            "data.dataloader.batch_size=4",
        ],
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr
    assert "Finished 4 steps" in result.stderr
    checkpoint = tmp_path / "pico-decoder-demo" / "checkpoints" / "step_4"
    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    assert model.config.d_model == 96 and model.config.vocab_size == 50304
    assert AutoTokenizer.from_pretrained(checkpoint).eos_token_id == 50279
