"""Starting a run again: a finished run does nothing, a resumed run's logs have one row per step, runs never
mix (changed settings, auto_resume off, two trainings at once), leftovers of a killed run are cleaned up."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml
from conftest import bad_row_overrides, make_pretokenized, train
from test_training_run import StopAfter

from pico_hf.training.config import ConfigError
from pico_hf.training.rundir import RunLock


def tree(root):
    """Every file under `root` with its size and modification time."""
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def metrics_rows(run_dir):
    return [json.loads(line) for line in (run_dir / "logs" / "metrics.jsonl").read_text().splitlines()]


def test_a_finished_run_started_again_does_nothing(tmp_path, capsys):
    train(tmp_path, **{"training.max_steps": 2})
    run_dir = tmp_path / "runs" / "tiny"
    before = tree(run_dir)
    capsys.readouterr()
    summary, _ = train(tmp_path, **{"training.max_steps": 2})
    assert capsys.readouterr().out == "Run 'tiny' is complete (step 2 of 2). Nothing to do.\n"
    assert summary["complete"] and summary["steps"] == 2
    assert tree(run_dir) == before  # nothing written, no step_3
    # A longer max_steps continues the run.
    summary, _ = train(tmp_path, **{"training.max_steps": 4})
    assert summary["steps"] == 4 and summary["resumed_from"].endswith("step_2")


def test_metrics_have_one_row_per_step_after_a_resume(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path, callbacks=[StopAfter(3)])  # logs step 3, then dies; the checkpoint is step_2
    train(tmp_path)
    rows = [row for row in metrics_rows(tmp_path / "runs" / "tiny") if "loss" in row]
    assert [row["step"] for row in rows] == [1, 2, 3, 4, 5, 6]
    # epoch is the share of the dataset consumed: 8 sequences a step of 96 (48 rows of 2 windows).
    assert [row["epoch"] for row in rows] == [round(step * 8 / 96, 4) for step in range(1, 7)]


def test_auto_resume_off_refuses_an_existing_run(tmp_path):
    train(tmp_path, **{"training.max_steps": 2})
    run_dir = tmp_path / "runs" / "tiny"
    before = tree(run_dir)
    with pytest.raises(ConfigError) as error:
        train(tmp_path, **{"training.max_steps": 2, "checkpointing.training.auto_resume": "false"})
    message = str(error.value)
    assert f"Run directory {run_dir} already holds run 'tiny'" in message
    assert "another checkpointing.run_name" in message and f"delete {run_dir}" in message
    assert tree(run_dir) == before


def test_resuming_with_a_changed_model_is_one_error(tmp_path):
    train(tmp_path, **{"training.max_steps": 2})
    run_dir = tmp_path / "runs" / "tiny"
    before = tree(run_dir)
    with pytest.raises(ConfigError) as error:
        train(tmp_path, **{"training.max_steps": 4, "model.d_model": 48, "training.seed": 7})
    assert str(error.value) == (
        f"Cannot resume run 'tiny' in {run_dir}: its training_config.yaml differs in model.d_model (32 -> 48), "
        f"training.seed (42 -> 7). Start a new run with another checkpointing.run_name, or delete {run_dir} "
        "to start over with these settings"
    )
    assert tree(run_dir) == before


def test_a_run_made_before_the_seeded_order_resumes_only_in_its_stored_order(tmp_path):
    train(tmp_path, **{"training.max_steps": 2, "data.dataloader.shuffle": "false"})
    saved = tmp_path / "runs" / "tiny" / "training_config.yaml"
    config = yaml.safe_load(saved.read_text())
    del config["data"]["dataloader"]["shuffle"]  # as written before the key existed
    saved.write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError, match=r"differs in data\.dataloader\.shuffle \(False -> True\)"):
        train(tmp_path, **{"training.max_steps": 3})
    summary, _ = train(tmp_path, **{"training.max_steps": 3, "data.dataloader.shuffle": "false"})
    assert summary["resumed_from"].endswith("step_2")


def test_resume_cleans_leftovers_and_rewrites_the_config_whole(tmp_path):
    train(tmp_path, **{"training.max_steps": 2})
    checkpoints = tmp_path / "runs" / "tiny" / "checkpoints"
    (checkpoints / ".step_2.old").mkdir()  # a killed run was replacing step_2
    (checkpoints / ".step_2.old" / "model.safetensors").write_text("partial")
    train(tmp_path, **{"training.max_steps": 4})
    assert not list(checkpoints.glob(".*"))
    run_dir = tmp_path / "runs" / "tiny"
    assert [p.name for p in run_dir.glob(".*")] == []  # no temporary config file left
    assert yaml.safe_load((run_dir / "training_config.yaml").read_text())["training"]["max_steps"] == 4


def test_a_run_directory_in_use_is_refused(tmp_path):
    run_dir = tmp_path / "runs" / "tiny"
    run_dir.mkdir(parents=True)
    lock = RunLock(run_dir).acquire()
    try:
        with pytest.raises(ConfigError, match=rf"in use by pid {os.getpid()} on host \S+ \(lock"):
            train(tmp_path)
    finally:
        lock.release()
    assert not (run_dir / "checkpoints" / "step_0").exists()


def test_a_killed_runs_lock_does_not_block_its_resume(tmp_path):
    run_dir = tmp_path / "runs" / "tiny"
    run_dir.mkdir(parents=True)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pico_hf.training.rundir import RunLock; "
            "lock = RunLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(600)",
            str(run_dir),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(ConfigError, match=rf"in use by pid {holder.pid} "):
        train(tmp_path, **{"training.max_steps": 2})
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    time.sleep(0.1)
    summary, _ = train(tmp_path, **{"training.max_steps": 2})
    assert summary["steps"] == 2
    assert f"pid {os.getpid()} " in (run_dir / "run.lock").read_text()


@pytest.mark.parametrize(
    "shuffle, stopped_after",
    [("false", 7), ("true", 0)],  # shuffled: the bad row's block (here all 48 rows) is read before step 1
)
def test_a_bad_streamed_row_stops_the_run_after_a_clean_checkpoint(tmp_path, shuffle, stopped_after):
    from pico_hf.training.data import DataError
    from pico_hf.training.rundir import RunLayout

    overrides, rows = bad_row_overrides(tmp_path, shuffle)
    data = rows.parent
    with pytest.raises(DataError) as error:
        train(tmp_path, **overrides)
    run_dir = tmp_path / "runs" / "tiny"
    assert str(error.value) == (
        f"Row 6 of shard {rows} (dataset '{data}') holds token id 500, outside the model's vocabulary of 128 "
        f"(model.vocab_size). Training stopped after step {stopped_after} (checkpoint: "
        f"{run_dir}/checkpoints/step_{stopped_after}); fix or replace the data and start the run again to resume"
    )
    checkpoints = run_dir / "checkpoints"
    expected = ["step_0", "step_3", "step_6", "step_7"] if stopped_after == 7 else ["step_0"]
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", *expected]
    assert RunLayout(run_dir).latest_checkpoint() == checkpoints / f"step_{stopped_after}"
    position = json.loads(
        (checkpoints / f"step_{stopped_after}" / "fabric_state" / "data_position.json").read_text()
    )
    assert position["sequence"] == stopped_after * 8


def test_streamed_data_is_checked_before_step_1(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = tmp_path / "strings" / "train.parquet"
    data.parent.mkdir()
    pq.write_table(pa.table({"input_ids": [["a"] * 33] * 48}), data)
    with pytest.raises(
        ConfigError, match=r"column 'input_ids' is List\(Value\('string'\)\), not a list of integer"
    ):
        train(tmp_path, **{"data.dataset.name": str(data), "data.dataset.streaming": "true"})
    # Local shards' row counts come from their footers: a stream too short for one global batch is refused too.
    small = make_pretokenized(tmp_path / "small" / "train.parquet", n_rows=3, row_length=33)
    with pytest.raises(ConfigError, match="holds 6 sequences of 16 tokens, fewer than one global batch"):
        train(tmp_path, **{"data.dataset.name": str(small), "data.dataset.streaming": "true"})
    assert not (tmp_path / "runs" / "tiny" / "checkpoints" / "step_0").exists()


def test_a_max_steps_below_the_current_step_is_an_error_naming_it(tmp_path):
    train(tmp_path, **{"training.max_steps": 4})
    run_dir = tmp_path / "runs" / "tiny"
    before = tree(run_dir)
    with pytest.raises(ConfigError) as error:
        train(tmp_path, **{"training.max_steps": 2})
    assert str(error.value) == (
        "training.max_steps=2 is below the run's current step 4 (its latest checkpoint is step_4): set "
        "training.max_steps=4 or more to keep this run, or use another checkpointing.run_name"
    )
    assert tree(run_dir) == before


def test_resuming_with_another_schedule_names_the_change_and_the_learning_rate_jump(tmp_path, caplog):
    caplog.set_level("INFO", logger="pico_hf.training")

    def notes():
        found = [r.getMessage() for r in caplog.records if "learning-rate schedule" in r.getMessage()]
        caplog.clear()
        return found

    with pytest.raises(KeyboardInterrupt):
        train(tmp_path, callbacks=[StopAfter(5)], **{"training.max_steps": 12})  # checkpoint step_4
    assert notes() == []
    with pytest.raises(KeyboardInterrupt):  # the same schedule: nothing to say
        train(tmp_path, callbacks=[StopAfter(5)], **{"training.max_steps": 12})
    assert notes() == []
    # lr 0.01, 2 warmup steps, then linear decay to 0 at max_steps: step N trains with 0.01 * (max_steps -
    # N + 1) / (max_steps - 2). Step 5 keeps the rate the checkpoint's optimizer holds (12 steps: 0.008); step
    # 6 has 0.007 under 12 steps and 0.0025 under 6.
    summary, _ = train(tmp_path, **{"training.max_steps": 6})
    assert notes() == [
        "Note: resuming after step 4 with training.max_steps 12 -> 6: the learning-rate schedule is recomputed, "
        "the rate of step 6 goes from 0.007 to 0.0025"
    ]
    rows = metrics_rows(tmp_path / "runs" / "tiny")
    logged = {row["step"]: row["learning_rate"] for row in rows if "loss" in row}
    assert (logged[5], logged[6]) == (pytest.approx(0.008), pytest.approx(0.0025))  # as the log shows them
    assert summary["steps"] == 6
