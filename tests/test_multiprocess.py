"""The multi-process path: launch settings, FSDP2 on CPU processes, per-process data reads."""

import json
import os
import subprocess

import pytest
import torch
from conftest import (
    REPO,
    assert_bitwise_equal,
    assert_world_size,
    bad_row_overrides,
    make_pretokenized,
    tiny_training_overrides,
    train,
    train_command,
)
from safetensors.torch import load_file

from pico_hf.learning_dynamics.capture import load_states
from pico_hf.training.config import ConfigError, load_config
from pico_hf.training.run import training_arguments
from pico_hf.training.rundir import RunLayout

LD = "learning_dynamics"


@pytest.mark.parametrize("launcher_precision", ["bf16", "fp16"])
def test_the_pico_config_decides_the_precision(tmp_path, monkeypatch, launcher_precision):
    """An accelerate config's `mixed_precision` (e.g. ddp.yaml's bf16) does not autocast a `32-true` run."""
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", launcher_precision)
    config, _ = load_config(None, tiny_training_overrides(tmp_path))
    args = training_arguments(config, RunLayout(config.run_dir))
    assert args.mixed_precision == "no"


def test_fsdp_that_accelerate_cannot_run_is_an_error(tmp_path, monkeypatch):
    """On CPU accelerate turns an FSDP launch into plain data parallel; the run stops instead of pretending."""
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(
        ConfigError, match=r"The accelerate config asks for FSDP, but accelerate .* on cpu as "
    ):
        train(tmp_path)
    assert not (tmp_path / "runs" / "tiny" / "checkpoints" / "step_0").exists()


# --- FSDP2 on two CPU processes --------------------------------------------------------------------------

FSDP_METRICS = (
    "[{metric_name: per, data_split: val, components: [{component_name: simple, data_type: gradients, "
    "layer_suffixes: swiglu.w_2, layers: [0, 1]}]}, {metric_name: cka, data_split: train, components: "
    "[{component_name: simple, data_type: activations, layer_suffixes: attention.v_proj, layers: [0, 1]}]}]"
)


def fsdp_overrides(root):
    val = root / "val" / "val.parquet"
    make_pretokenized(val, n_rows=10, row_length=17, seed=1)
    return tiny_training_overrides(
        root,
        **{
            "training.max_steps": 8,
            "checkpointing.learning_dynamics.eval_data": str(val),
            "checkpointing.learning_dynamics.batch_size": 4,
            "checkpointing.learning_dynamics.metrics": FSDP_METRICS,
        },
    )


def launch_fsdp(root, **env):
    """`recipes/accelerate/fsdp.yaml` on 2 CPU processes, through tests/fsdp_on_cpu.py (see there why)."""
    command = train_command(2, accelerate_config="fsdp")
    command.insert(-1, str(REPO / "tests" / "fsdp_on_cpu.py"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **env}
    return subprocess.run(
        [*command, *fsdp_overrides(root)], env=env, capture_output=True, text=True, timeout=600
    )


@pytest.mark.slow
def test_fsdp2_on_two_processes_trains_resumes_and_captures_like_one_process(tmp_path):
    one = subprocess.run(
        [*train_command(1), *fsdp_overrides(tmp_path / "one")],
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    killed = launch_fsdp(tmp_path / "fsdp", PICO_TEST_SIGKILL_AFTER_STEP="5")
    assert killed.returncode != 0 and "Finished" not in killed.stderr
    assert_world_size(killed.stderr, 2)
    checkpoints = tmp_path / "fsdp" / "runs" / "tiny" / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("step_*")) == ["step_0", "step_2", "step_4"]
    resumed = launch_fsdp(tmp_path / "fsdp")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_world_size(resumed.stderr, 2)
    assert f"Resuming from {checkpoints / 'step_4'}" in resumed.stderr

    reference = tmp_path / "one" / "runs" / "tiny" / "checkpoints"
    for step in (0, 2, 4, 6, 8):
        # Each checkpoint is a plain pico-lm checkpoint: the model's own class and code, pico's tensor names.
        plain, sharded = reference / f"step_{step}", checkpoints / f"step_{step}"
        assert sorted(p.name for p in sharded.iterdir()) == sorted(p.name for p in plain.iterdir())
        assert (
            json.loads((sharded / "config.json").read_text())["auto_map"]
            == json.loads((plain / "config.json").read_text())["auto_map"]
        )
        weights, expected = load_file(sharded / "model.safetensors"), load_file(plain / "model.safetensors")
        assert weights.keys() == expected.keys()
        for name in expected:  # the same global batches; only the reduction order differs
            torch.testing.assert_close(weights[name], expected[name], rtol=0, atol=1e-5, msg=name)
        # Learning dynamics: whole (gathered) weights and gradients, the same values as one process.
        for split in ("train", "val") if step < 8 else ("val",):
            mine, theirs = (load_states(d / LD, split) for d in (sharded, plain))
            for kind in ("activations", "weights", "gradients"):
                assert mine[kind].keys() == theirs[kind].keys()
                for name, value in theirs[kind].items():
                    assert mine[kind][name].shape == value.shape, (step, split, kind, name)
                    torch.testing.assert_close(
                        mine[kind][name], value, rtol=1e-4, atol=1e-6, msg=f"{step} {split} {kind} {name}"
                    )
        metrics = [json.loads((d / LD / "metrics.json").read_text()) for d in (sharded, plain)]
        assert metrics[0].keys() == metrics[1].keys() and "per_val" in metrics[0]
        for metric, values in metrics[0].items():
            assert values.keys() == metrics[1][metric].keys()
            for key, value in values.items():
                assert value == pytest.approx(metrics[1][metric][key], rel=1e-4), (step, metric, key)


# --- per-process data reads ------------------------------------------------------------------------------


def launch_counting_reads(root, processes, streaming=False, **env):
    """`recipes/train.py` on `processes` CPU processes through tests/data_reads.py, which records each
    process's reads from storage in root/reads/rank<N>.json. Returns the finished run's records and log (a
    run killed by PICO_TEST_SIGKILL_AFTER_STEP: no records)."""
    command = train_command(processes)
    command.insert(-1 if processes > 1 else 1, str(REPO / "tests" / "data_reads.py"))
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "PICO_TEST_READS_DIR": str(root / "reads"),
        **env,
    }
    overrides = tiny_training_overrides(
        root,
        **{
            "training.max_steps": 8,
            "checkpointing.save_every_n_steps": 4,
            "data.dataset.streaming": str(streaming).lower(),
        },
    )
    result = subprocess.run([*command, *overrides], env=env, capture_output=True, text=True, timeout=600)
    assert_world_size(result.stderr, processes)
    if "PICO_TEST_SIGKILL_AFTER_STEP" in env:
        assert result.returncode != 0 and "Finished" not in result.stderr
        return None, result.stderr
    assert result.returncode == 0, result.stderr[-3000:]
    reads = [json.loads((root / "reads" / f"rank{rank}.json").read_text()) for rank in range(processes)]
    return reads, result.stderr


def latest_weights(root):
    return load_file(root / "runs" / "tiny" / "checkpoints" / "latest" / "model.safetensors")


@pytest.mark.slow
def test_each_of_two_processes_reads_half_the_sequences_and_trains_like_one(tmp_path):
    (one,), _ = launch_counting_reads(tmp_path / "one", 1)
    two, _ = launch_counting_reads(tmp_path / "two", 2)
    assert one["sequences_read"] == 8 * 8  # 8 steps of 8 sequences, read once
    for reads in two:
        assert reads["sequences_read"] == one["sequences_read"] // 2
        assert reads["tokens_read"] == one["tokens_read"] // 2
    # Between them, the two read exactly the one process's sequences (the seeded order), none twice.
    assert sorted(two[0]["sequence_ids"] + two[1]["sequence_ids"]) == sorted(one["sequence_ids"])
    assert not set(two[0]["sequence_ids"]) & set(two[1]["sequence_ids"])
    single, double = latest_weights(tmp_path / "one"), latest_weights(tmp_path / "two")
    for name in single:  # the same global batches; only the gradient reduction order differs
        torch.testing.assert_close(double[name], single[name], rtol=0, atol=2e-5, msg=name)


@pytest.mark.slow
def test_a_stream_is_read_by_process_0_alone_and_resumes_bitwise(tmp_path):
    """Streamed data on two processes: process 0 reads what one process reads and dispatches; process 1 reads
    nothing. Killed after step 5 and resumed from step 4, the run ends bitwise where the uninterrupted one does."""
    (one,), _ = launch_counting_reads(tmp_path / "one", 1, streaming=True)
    two, _ = launch_counting_reads(tmp_path / "two", 2, streaming=True)
    assert one["tokens_read"] == 48 * 33  # the data's one shuffle block (48 rows of 33 tokens), read once
    assert two[0]["tokens_read"] == one["tokens_read"] and two[1]["tokens_read"] == 0
    single, double = latest_weights(tmp_path / "one"), latest_weights(tmp_path / "two")
    for name in single:
        torch.testing.assert_close(double[name], single[name], rtol=0, atol=2e-5, msg=name)

    launch_counting_reads(tmp_path / "killed", 2, streaming=True, PICO_TEST_SIGKILL_AFTER_STEP="5")
    resumed, log = launch_counting_reads(tmp_path / "killed", 2, streaming=True)
    assert f"Resuming from {tmp_path / 'killed' / 'runs' / 'tiny' / 'checkpoints' / 'step_4'}" in log
    assert resumed[1]["tokens_read"] == 0
    assert_bitwise_equal(latest_weights(tmp_path / "killed"), double)


@pytest.mark.slow
def test_a_bad_streamed_row_stops_both_processes_after_a_clean_checkpoint(tmp_path):
    """Process 0 finds the bad row; both processes stop at the same step, after checkpointing the steps done."""
    overrides, rows = bad_row_overrides(tmp_path, shuffle="false")
    data = rows.parent
    result = subprocess.run(
        [*train_command(2), *tiny_training_overrides(tmp_path, **overrides)],
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode != 0
    assert_world_size(result.stderr, 2)
    checkpoints = tmp_path / "runs" / "tiny" / "checkpoints"
    message = (
        f"error: Row 6 of shard {rows} (dataset '{data}') holds token id 500, outside the model's vocabulary of "
        f"128 (model.vocab_size). Training stopped after step 7 (checkpoint: {checkpoints / 'step_7'}); fix or "
        "replace the data and start the run again to resume"
    )
    assert result.stderr.count(message) == 2, result.stderr[-3000:]  # each process says why it stopped
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step_0", "step_3", "step_6", "step_7"]
    position = json.loads((checkpoints / "step_7" / "fabric_state" / "data_position.json").read_text())
    assert position["sequence"] == 7 * 8
