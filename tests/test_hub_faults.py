"""End to end against a faulty Hub: `recipes/train.py` pushes while the fake Hub answers 500s, refuses
connections and answers slowly. Training never waits on the network, the run ends with its summary and the
one command that completes the push, and that command leaves every checkpoint on the branch exactly once."""

import os
import shlex
import subprocess
import threading
import time
from collections import Counter

import pytest
from conftest import REPO, tiny_training_overrides, train_command
from fake_hub import running_fake_hub

from pico_hf.hub import publish
from pico_hf.hub.commits import checkpoint_steps, final_model_commit, plan_checkpoint_commits

REPO_ID = "fake-user/pico-faults"
BRANCH = "tiny"


@pytest.mark.slow
def test_training_against_a_faulty_hub_loses_nothing(tmp_path):
    with running_fake_hub(tmp_path / "hf-cache") as hub:
        hub.latency_s = 0.05
        hub.delay("/commit/", 1.5)  # every commit answers slowly
        hub.fail("/preupload/", status=500, times=2)  # transient 500s (retried by huggingface_hub)
        hub.fail("/commit/", status=500, times=2, commit_title=r"^Saving HF Model -- Step 2$")  # our retries
        # ... and one commit that keeps failing until the end of the run.
        hub.fail("/commit/", status=500, commit_title=r"^Saving Fabric Checkpoint -- Step 6$")

        seen: dict[str, float] = {}  # commit title -> wall time it was first on the branch
        done = threading.Event()

        def watch() -> None:
            refused = False
            while not done.is_set():
                try:
                    titles = hub.titles(REPO_ID, BRANCH)
                except KeyError:  # no repo or branch yet
                    titles = []
                for title in titles:
                    seen.setdefault(title, time.time())
                if not refused and "Saving HF Model -- Step 0" in seen:
                    refused = True  # the Hub goes away for a while mid-run
                    hub.refuse_connections()
                    time.sleep(2.0)
                    hub.accept_connections()
                time.sleep(0.05)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        overrides = tiny_training_overrides(
            tmp_path,
            **{
                "training.max_steps": 8,
                "checkpointing.save_to_hf": "true",
                "checkpointing.hf_checkpoint.repo_id": REPO_ID,
            },
        )
        env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_ENDPOINT")}
        env.update(hub.client_env(tmp_path / "cache"), OMP_NUM_THREADS="1")
        result = subprocess.run(
            [*train_command(), *overrides],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=600,
        )
        done.set()
        watcher.join()
        output = result.stdout
        run_dir = tmp_path / "runs" / BRANCH

        # The run failed only at its last push: it ends with the summary, then the completing command.
        assert result.returncode == 1, output[-3000:]
        lines = [line for line in output.splitlines() if line.strip()]
        command = f"python -m pico_hf.hub.publish {run_dir} --repo_id {REPO_ID} --branch {BRANCH}"
        assert lines[-1] == command
        assert "Finished 8 steps" in output and "Traceback" not in output
        [hub_line] = [line for line in lines if line.strip().startswith("hub:")]
        words = hub_line.split()  # hub: N commits pushed, M retries; K NOT pushed, finish with: ...
        pushed, retries = int(words[1]), int(words[4])
        assert pushed > 0 and retries >= 4, hub_line  # 2 for step 2's model, 2+ for step 6's fabric state
        assert f"NOT pushed, finish with: {command}" in hub_line

        # Training did not wait on the slow Hub: the last checkpoint was on disk before step 4 was pushed.
        finished = (run_dir / "checkpoints" / "step_8" / "config.json").stat().st_mtime
        assert finished < seen["Saving HF Model -- Step 4"], (finished, seen)

        # The command completes the upload: every planned commit is on the branch, exactly once, with the
        # local files; main holds the final model.
        hub.clear_failures()
        assert publish.main(shlex.split(command)[3:]) == 0
        steps = checkpoint_steps(run_dir)
        assert steps == [0, 2, 4, 6, 8]
        plan = [c for step in steps for c in plan_checkpoint_commits(run_dir, step)]
        titles = hub.titles(REPO_ID, BRANCH)
        assert Counter(titles).most_common(1)[0][1] == 1, titles  # no commit duplicated
        assert titles[1:] == [c.title for c in plan]
        for commit in plan:
            files = hub.commit_by_title(REPO_ID, BRANCH, commit.title).files
            for local, in_repo in commit.files:  # the run's curves up to the step are given as bytes
                expected = local if isinstance(local, bytes) else local.read_bytes()
                assert files[in_repo] == expected, (commit.title, in_repo)
        final = final_model_commit(run_dir, 8, BRANCH)
        assert hub.titles(REPO_ID, "main")[-1] == final.title
        main_files = hub.files(REPO_ID, "main")
        assert all(main_files[in_repo] == local.read_bytes() for local, in_repo in final.files)
