"""What a user sees and what the run records: interrupts as one line, the log file as a copy of the console."""

import os
import re
import signal
import subprocess
import time

import pytest
from conftest import tiny_training_overrides, train_command


def start(tmp_path, *extra):
    overrides = tiny_training_overrides(
        tmp_path, **{"training.max_steps": 400, "checkpointing.save_every_n_steps": 3}
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "warning"}
    command = [*train_command(), *overrides, *extra]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupt_ends_with_one_line_and_status_130(tmp_path, signum):
    checkpoints = tmp_path / "runs" / "tiny" / "checkpoints"
    process = start(tmp_path)
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None and not (checkpoints / "step_3").exists():
        time.sleep(0.01)
    assert process.poll() is None, process.stdout.read()
    process.send_signal(signum)
    output = process.communicate(timeout=120)[0]
    assert process.returncode == 130, output
    assert "Traceback" not in output and "KeyboardInterrupt" not in output
    last = output.strip().split("\n")[-1]
    pattern = r"Interrupted at step (\d+); the last checkpoint is step_(\d+); run the same command to resume"
    match = re.fullmatch(pattern, last)
    assert match, last
    step, saved = int(match[1]), int(match[2])
    assert saved <= step and saved % 3 == 0
    assert not list(checkpoints.glob(".*.tmp")), "a half-written checkpoint was left"
    assert os.readlink(checkpoints / "latest") == f"step_{saved}"
    (log,) = (tmp_path / "runs" / "tiny" / "logs").glob("log_*.log")
    assert log.read_text().rstrip().endswith(last)

    resumed = start(tmp_path, "training.max_steps=6")
    output = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, output
    assert f"Resuming from {checkpoints / f'step_{saved}'}" in output or saved >= 6


def test_the_log_file_copies_the_console(tmp_path):
    result = subprocess.run(
        [*train_command(), *tiny_training_overrides(tmp_path, **{"training.max_steps": 4})],
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    (log,) = (tmp_path / "runs" / "tiny" / "logs").glob("log_*.log")
    logged = [line[20:] for line in log.read_text().splitlines()]  # without the time stamp
    assert all(
        re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d ", line) for line in log.read_text().splitlines() if line
    )
    console = [
        line.rsplit("\r", 1)[-1]
        for line in (result.stdout + result.stderr).splitlines()
        if line.rsplit("\r", 1)[-1].strip()
    ]
    for line in console:
        if "%|" not in line:  # progress-bar states are the only lines left out
            assert line in logged, line
    assert not any("%|" in line for line in logged)
    losses = [line for line in logged if "'loss'" in line]
    assert len(losses) == 4
    assert any(line.startswith("Training tiny") for line in logged)
    assert any(line.startswith("Finished 4 steps") for line in logged)


def test_a_crash_leaves_its_traceback_in_the_log(tmp_path):
    from conftest import train

    class Crash(Exception):
        pass

    from transformers import TrainerCallback

    class CrashAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                raise Crash("disk on fire")

    with pytest.raises(Crash):
        train(tmp_path, callbacks=[CrashAt()])
    (log,) = (tmp_path / "runs" / "tiny" / "logs").glob("log_*.log")
    text = log.read_text()
    assert "Traceback (most recent call last):" in text
    assert text.rstrip().endswith("Crash: disk on fire")


@pytest.mark.parametrize(
    "override, message",
    [
        ("training.optimization.lr=-1", "error: training.optimization.lr must be positive, got -1.0"),
        (
            "data.dataset.name=/nowhere/data.parquet",
            "error: data.dataset.name: dataset path /nowhere/data.parquet does not exist",
        ),
    ],
)
def test_a_failed_start_says_why_before_the_banner_and_creates_nothing(tmp_path, override, message):
    result = subprocess.run(
        [*train_command(), *tiny_training_overrides(tmp_path), override],
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    assert result.stderr.strip().split("\n")[-1] == message
    assert "Training tiny" not in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists()


def test_a_bad_model_shape_is_one_error_line_like_any_bad_value(tmp_path):
    result = subprocess.run(
        [*train_command(), *tiny_training_overrides(tmp_path), "model.d_model=97"],
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == "error: model.d_model (97) must be divisible by model.attention_n_heads (4)\n"
    assert not (tmp_path / "runs").exists()


def test_every_problem_of_a_pico_train_config_offline_is_reported_before_step_1(tmp_path):
    """pico-train's demo.yaml offline without wandb: the Hub push, W&B, the training data and the
    learning-dynamics eval set are four problems, named together, each with the key that fixes it."""
    import importlib.util

    from test_training_config import PICO_TRAIN_DEMO

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed")
    config = tmp_path / "demo.yaml"
    config.write_text(PICO_TRAIN_DEMO)
    result = subprocess.run(
        [*train_command(), "--config", str(config), f"checkpointing.runs_dir={tmp_path / 'runs'}"],
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    expected = [
        "error: monitoring.save_to_wandb is true but the wandb package is not installed: pip install wandb, or "
        "set monitoring.save_to_wandb=false",
        "error: checkpointing.save_to_hf is true but Hugging Face Hub access is switched off (HF_HUB_OFFLINE or "
        "TRANSFORMERS_OFFLINE is set): unset it, or set checkpointing.save_to_hf=false and push the run later "
        "with `python -m pico_hf.hub.publish`",
        "error: data.dataset.name: dataset 'pico-lm/pretokenized-dolma' is neither a local path nor a reachable "
        "Hub dataset (",
        "error: checkpointing.learning_dynamics.eval_data: dataset 'pico-lm/pretokenized-paloma-tinsy' is "
        "neither a local path nor a reachable Hub dataset (",
    ]
    assert len(errors) == len(expected)
    for line, start in zip(errors, expected, strict=True):
        assert line.startswith(start)
    assert errors[2].endswith("Offline, use data.dataset.name=embedded or a local path.")
    assert errors[3].endswith(
        "Offline, use checkpointing.learning_dynamics.eval_data=embedded or a local path."
    )
    assert result.stderr.rstrip().endswith(
        errors[-1]
    )  # the errors are the last lines: nothing ran after them
    assert not (tmp_path / "runs").exists()


def test_the_summary_reads_the_first_and_the_last_step(tmp_path):
    from conftest import train

    from pico_hf.training.run import format_summary

    summary, _ = train(tmp_path, **{"training.max_steps": 2, "monitoring.logging.log_every_n_steps": 10})
    assert summary["first_loss"][0] == 1 and summary["final_loss"][0] == 2
    assert "(step 1) -> " in format_summary(summary) and "(step 2)" in format_summary(summary)


def test_help_shows_the_values_that_would_run_and_where_they_come_from(tmp_path):
    import sys

    from conftest import TRAIN_SCRIPT

    config = tmp_path / "mine.yaml"
    config.write_text("model:\n  d_model: 48\ntraining:\n  max_steps: 7\n")
    help_text = subprocess.run(
        [sys.executable, str(TRAIN_SCRIPT), "--config", str(config), "training.max_steps=9", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "  model.d_model = 48    <- mine.yaml\n" in help_text
    assert "  training.max_steps = 9    <- command line\n" in help_text
    assert "  model.n_layers = 12\n" in help_text  # pico-train's default, unmarked
    demo = subprocess.run(
        [sys.executable, str(TRAIN_SCRIPT), "--help"], capture_output=True, text=True
    ).stdout
    assert (
        "  model.d_model = 96    <- demo.yaml\n" in demo
        and "  training.max_steps = 150    <- demo.yaml" in demo
    )


def test_parsing_and_config_errors_import_nothing_heavy():
    import sys

    from conftest import TRAIN_SCRIPT

    probe = (
        "import runpy, sys; sys.argv = ['train.py', 'model.d_modl=3']\n"
        f"try:\n    runpy.run_path({str(TRAIN_SCRIPT)!r}, run_name='__main__')\n"
        "except SystemExit as exit:\n    assert exit.code == 2\n"
        "heavy = [m for m in ('torch', 'transformers', 'datasets', 'lm_eval') if m in sys.modules]\n"
        "print(heavy)\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
    assert "did you mean 'model.d_model'" in result.stderr
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, pico_hf; print([m for m in ('torch', 'transformers') if m in sys.modules])",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.strip() == "[]"
