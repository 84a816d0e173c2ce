"""Publishing runs to the Hub, against a loopback fake Hub: commits, order, contents, reading, failures."""

import hashlib
import io
import itertools
import json
import logging
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, StopAfter, tiny_training_overrides
from fake_hub import FakeHub, fake_hub, lfs_fake_hub, point_hub_client_at, running_fake_hub  # noqa: F401
from huggingface_hub import HfApi, ModelCard, snapshot_download
from safetensors.torch import load_file, save_file

from pico_hf.hub import commits, publish
from pico_hf.hub.callback import build_hub_callbacks
from pico_hf.hub.commits import (
    HubPublisher,
    HubPushError,
    HubSetupError,
    PlannedCommit,
    plan_checkpoint_commits,
)
from pico_hf.training.config import ConfigError, load_config
from pico_hf.training.run import run_training
from pico_hf.training.trainer import CheckpointContributor

REPO_ID = "fake-user/pico-tiny"
COLLECTION = "fake-user/pico-suite-0123456789"
BRANCH = "tiny"  # the run name in tiny_training_overrides
FINAL_TITLE = "Saving Final Model -- Step 6 (run branch 'tiny')"
LD_TITLE = re.compile(r"Saving Learning Dynamics Data \((\w+)\) -- Step (\d+)")  # what pico-analyze looks for


class HandMadeStates(CheckpointContributor):
    """Writes learning-dynamics and evaluation files where the real callbacks do, with contents that name the
    step: `{split}_{kind}.safetensors` (train and val; the last checkpoint has val only), `train_data/`,
    `metrics.json`, and `eval_results/step_N.json` in the run folder."""

    def on_checkpoint(self, args, state, control, checkpoint_dir, trainer=None, **kwargs):
        if not args.should_save:
            return
        step = state.global_step
        folder = checkpoint_dir / "learning_dynamics"
        folder.mkdir()
        for split in ["val"] if step >= state.max_steps else ["train", "val"]:
            for kind in ("activations", "weights", "gradients"):
                tensor = torch.full((2, 3), float(step) + (0.5 if split == "val" else 0.0))
                save_file({"layers.0.swiglu.w_2": tensor}, folder / f"{split}_{kind}.safetensors")
        if step < state.max_steps:
            (folder / "train_data").mkdir()
            (folder / "train_data" / "state.json").write_text(json.dumps({"step": step}))
        (folder / "metrics.json").write_text(json.dumps({"per": step}))
        results = trainer.run.run_dir / "eval_results"
        results.mkdir(exist_ok=True)
        (results / f"step_{step}.json").write_text(json.dumps({"paloma": 100.0 - step}))


def hub_overrides(tmp_path, **extra):
    return tiny_training_overrides(
        tmp_path,
        **{
            "checkpointing.save_to_hf": "true",
            "checkpointing.hf_checkpoint.repo_id": REPO_ID,
            "checkpointing.learning_dynamics.layer_suffixes": "[]",  # only the hand-made states
            **extra,
        },
    )


def expected_titles(steps, last):
    titles = []
    for step in steps:
        titles.append(f"Saving HF Model -- Step {step}")
        if step == 0:
            titles += ["Saving Tokenizer -- Step 0", "Saving Training Config -- Step 0"]
        titles += [f"Saving Fabric Checkpoint -- Step {step}", f"Saving Evaluation Results -- Step {step}"]
        splits = ["val"] if step == last else ["train", "val"]
        titles += [f"Saving Learning Dynamics Data ({split}) -- Step {step}" for split in splits]
    return titles


def local_files(folder, prefix):
    return {
        f"{prefix}{p.relative_to(folder).as_posix()}": p.read_bytes()
        for p in folder.rglob("*")
        if p.is_file()
    }


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("published")
    with running_fake_hub(tmp_path / "hf-cache") as hub:
        hub.add_collection(COLLECTION)
        config, notes = load_config(
            None, hub_overrides(tmp_path, **{"checkpointing.hf_checkpoint.collection_slug": COLLECTION})
        )
        run_training(config, notes, extra_callbacks=[HandMadeStates()])
        yield hub, config, tmp_path


def test_branch_holds_every_checkpoint_as_pico_train_commits(published):
    hub, _, _ = published
    assert hub.titles(REPO_ID, BRANCH) == ["initial commit", *expected_titles([0, 2, 4, 6], last=6)]
    # The run lives on its own branch; main gets the final model and its card, once the run is complete.
    assert hub.titles(REPO_ID, "main") == ["initial commit", FINAL_TITLE]
    assert [item["id"] for item in hub.collections[COLLECTION]["items"]] == [REPO_ID]
    # Nothing was pushed twice, and the writes carried the token.
    commit_posts = [r for r in hub.requests if r[0] == "POST" and "/commit/" in r[1]]
    assert len(commit_posts) == len(expected_titles([0, 2, 4, 6], last=6)) + 1
    assert hub.failed_requests() == []


def test_each_commit_holds_that_checkpoints_files(published):
    hub, config, _ = published
    run_dir = config.run_dir
    for step in (0, 2, 4, 6):
        step_dir = run_dir / "checkpoints" / f"step_{step}"
        model = {
            name: (step_dir / name).read_bytes()
            for name in (
                "config.json",
                "model.safetensors",
                "generation_config.json",
                "configuration_pico_decoder.py",
                "modeling_pico_decoder.py",
            )
        }
        at_model = hub.commit_by_title(REPO_ID, BRANCH, f"Saving HF Model -- Step {step}").files
        assert {name: at_model[name] for name in model} == model
        at_fabric = hub.commit_by_title(REPO_ID, BRANCH, f"Saving Fabric Checkpoint -- Step {step}").files
        fabric = local_files(step_dir / "fabric_state", "fabric_state/")
        assert {"fabric_state/optimizer.pt", "fabric_state/trainer_state.json"} <= fabric.keys()
        assert {name: at_fabric[name] for name in fabric} == fabric
        at_eval = hub.commit_by_title(REPO_ID, BRANCH, f"Saving Evaluation Results -- Step {step}").files
        assert sorted(n for n in at_eval if n.startswith("eval_results/")) == [
            f"eval_results/step_{s}.json" for s in (0, 2, 4, 6) if s <= step
        ]
        at_val = hub.commit_by_title(
            REPO_ID, BRANCH, f"Saving Learning Dynamics Data (val) -- Step {step}"
        ).files
        dynamics = local_files(step_dir / "learning_dynamics", "learning_dynamics/")
        assert {name: at_val[name] for name in dynamics} == dynamics  # metrics.json rides with the last split
        if step < 6:
            at_train = hub.commit_by_title(
                REPO_ID, BRANCH, f"Saving Learning Dynamics Data (train) -- Step {step}"
            ).files
            train = {n: d for n, d in dynamics.items() if n.startswith("learning_dynamics/train_")}
            assert {name: at_train[name] for name in train} == train
        if step == 0:  # train is pushed before val
            assert not any(n.startswith("learning_dynamics/val_") for n in at_train)

    # Step 0's extra commits; the tokenizer is not part of the model commits.
    step_0 = run_dir / "checkpoints" / "step_0"
    assert "tokenizer.json" not in hub.commit_by_title(REPO_ID, BRANCH, "Saving HF Model -- Step 0").files
    tokenizer = hub.commit_by_title(REPO_ID, BRANCH, "Saving Tokenizer -- Step 0").files
    assert tokenizer["tokenizer.json"] == (step_0 / "tokenizer.json").read_bytes()
    assert tokenizer["tokenizer_config.json"] == (step_0 / "tokenizer_config.json").read_bytes()
    training_config = hub.commit_by_title(REPO_ID, BRANCH, "Saving Training Config -- Step 0").files
    assert training_config["training_config.yaml"] == (run_dir / "training_config.yaml").read_bytes()

    # Each commit changes only what it is about.
    commits = hub.commits(REPO_ID, BRANCH)
    for before, after in itertools.pairwise(commits):
        changed = {p for p in after.files if before.files.get(p) != after.files[p]}
        if after.title.startswith("Saving HF Model"):  # the model, its card, and the curves up to its step
            assert all(
                ("/" not in p and not p.startswith("tokenizer")) or p.startswith("logs/") for p in changed
            ), after.title
        elif after.title.startswith("Saving Fabric"):
            assert all(p.startswith("fabric_state/") for p in changed), after.title
        elif after.title.startswith("Saving Evaluation"):
            assert all(p.startswith("eval_results/") for p in changed), after.title
        elif match := LD_TITLE.fullmatch(after.title):
            split = match[1]
            assert all(
                p.startswith(f"learning_dynamics/{split}_") or p == "learning_dynamics/metrics.json"
                for p in changed
            ), after.title


def test_snapshot_at_a_learning_dynamics_commit_is_that_step(published, tmp_path):
    _, config, _ = published
    commits = {
        (m[1], int(m[2])): c.commit_id
        for c in HfApi().list_repo_commits(REPO_ID, revision=BRANCH)
        if (m := LD_TITLE.fullmatch(c.title))
    }
    assert sorted(commits) == sorted(
        [("train", 0), ("train", 2), ("train", 4), ("val", 0), ("val", 2), ("val", 4), ("val", 6)]
    )
    snapshot = snapshot_download(REPO_ID, revision=commits[("train", 2)], cache_dir=tmp_path / "cache")
    step_2 = config.run_dir / "checkpoints" / "step_2"
    weights = load_file(f"{snapshot}/learning_dynamics/train_weights.safetensors")
    torch.testing.assert_close(weights["layers.0.swiglu.w_2"], torch.full((2, 3), 2.0))
    for name in ("config.json", "model.safetensors", "learning_dynamics/train_gradients.safetensors"):
        assert (step_2 / name).read_bytes() == Path(snapshot, name).read_bytes(), name


def test_a_fresh_process_reads_the_run_through_hf_endpoint(published, tmp_path):
    """What an analysis tool does: HF_ENDPOINT set before huggingface_hub is imported, no patching."""
    hub, config, _ = published
    code = textwrap.dedent(
        f"""
        import re
        from huggingface_hub import HfApi, hf_hub_download, snapshot_download
        commits = HfApi().list_repo_commits("{REPO_ID}", revision="{BRANCH}")
        title = "Saving Learning Dynamics Data (val) -- Step 4"
        step_4 = next(c.commit_id for c in commits if c.title == title)
        path = snapshot_download("{REPO_ID}", revision=step_4, allow_patterns=["learning_dynamics/*"])
        print(open(path + "/learning_dynamics/metrics.json").read())
        print(open(hf_hub_download("{REPO_ID}", "training_config.yaml", revision="{BRANCH}")).read()[:9])
        """
    )
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_ENDPOINT")}
    result = subprocess.run(
        [sys.executable, "-c", code],
        env={**env, **hub.client_env(tmp_path / "cache")},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    metrics, config_head = result.stdout.splitlines()
    assert json.loads(metrics) == {"per": 4}
    assert config_head == (config.run_dir / "training_config.yaml").read_text()[:9]


def test_the_run_comes_back_through_xet_and_a_second_push_uploads_no_xorb(published, tmp_path):
    hub, config, _ = published
    start = len(hub.requests)
    snapshot = Path(snapshot_download(REPO_ID, revision=BRANCH, cache_dir=tmp_path / "cache"))
    downloaded = {
        p.relative_to(snapshot).as_posix(): p.read_bytes() for p in snapshot.rglob("*") if p.is_file()
    }
    head = hub.commits(REPO_ID, BRANCH)[-1]
    assert downloaded == dict(head.files)
    step_6 = config.run_dir / "checkpoints" / "step_6"
    for name in ("model.safetensors", "fabric_state/optimizer.pt", "README.md"):
        assert downloaded[name] == (step_6 / name).read_bytes(), name
    # Stored files come from the CAS (a reconstruction each, then xorb ranges), never from /resolve.
    requests = hub.requests[start:]
    reconstructed = {path.rsplit("/", 1)[1] for _, path, _ in requests if "/cas/v1/reconstructions/" in path}
    assert reconstructed == {
        hub.xet_hashes[hashlib.sha256(head.files[path]).hexdigest()] for path in head.lfs
    }
    assert not [
        path
        for method, path, _ in requests
        if method == "GET"
        and "/resolve/" in path
        and path.split("/resolve/", 1)[1].split("/", 1)[1] in head.lfs
    ]
    assert any("/cas/xorb-data/" in path for _, path, _ in requests)
    # The same files pushed again (the run to a second branch): shards only, no xorb data goes up again.
    start = len(hub.requests)
    initial = hub.commits(REPO_ID, BRANCH)[0].oid
    HfApi().create_branch(REPO_ID, branch="tiny-again", revision=initial)
    publish.publish_run(config.run_dir, REPO_ID, branch="tiny-again", main=False, out=io.StringIO())
    assert hub.titles(REPO_ID, "tiny-again") == hub.titles(REPO_ID, BRANCH)
    assert hub.files(REPO_ID, "tiny-again") == dict(head.files)
    pushed = [path for method, path, _ in hub.requests[start:] if method == "POST"]
    assert "/cas/v1/shards" in pushed and not [path for path in pushed if "/cas/v1/xorbs/" in path]


def test_resumed_run_appends_only_new_commits(published):
    hub, _, tmp_path = published
    before = hub.titles(REPO_ID, BRANCH)
    resumed, notes = load_config(
        None, hub_overrides(tmp_path, **{"training.max_steps": 8, "checkpointing.save_every_n_steps": 4})
    )
    run_training(resumed, notes, extra_callbacks=[HandMadeStates()])
    assert hub.titles(REPO_ID, BRANCH) == before + expected_titles([8], last=8)


# --- refusing early -----------------------------------------------------------------------------------------


def test_offline_run_is_refused_before_training(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config, notes = load_config(None, hub_overrides(tmp_path))
    # Found with the other config problems before training, and reported with them.
    with pytest.raises(ConfigError, match=r"save_to_hf is true but .*HF_HUB_OFFLINE") as raised:
        run_training(config, notes)
    assert len(raised.value.problems) == 1
    assert not (config.run_dir / "checkpoints" / "step_0").exists()


def test_unreachable_endpoint_and_missing_token_are_refused(tmp_path, monkeypatch):
    config, _ = load_config(None, hub_overrides(tmp_path))
    with FakeHub() as stopped:
        pass  # a port nobody listens on any more
    with (
        point_hub_client_at(stopped, tmp_path / "cache"),
        pytest.raises(HubSetupError, match=r"Hub at http://127\.0\.0\.1:\d+ cannot be reached"),
    ):
        build_hub_callbacks(config, None)
    with FakeHub() as hub, point_hub_client_at(hub, tmp_path / "cache"):
        monkeypatch.setattr(commits, "get_token", lambda: None)
        with pytest.raises(HubSetupError, match="no Hugging Face token"):
            build_hub_callbacks(config, None)


def test_repo_that_cannot_be_created_stops_the_run_before_training(fake_hub, tmp_path):  # noqa: F811
    fake_hub.fail("/api/repos/create", status=403, message="You don't have the rights to create a model here")
    config, notes = load_config(None, hub_overrides(tmp_path))
    with pytest.raises(HubSetupError, match=rf"Could not set up the Hub repo .*{REPO_ID}.*rights to create"):
        run_training(config, notes)
    assert not (config.run_dir / "checkpoints" / "step_2").exists()


# --- failures during the run ------------------------------------------------------------------------------


def test_failed_push_is_reported_training_goes_on_and_the_cli_completes_it(
    fake_hub,  # noqa: F811
    tmp_path,
    monkeypatch,
    caplog,
    capsys,
):
    monkeypatch.setattr(commits, "RETRY_DELAYS", (0.0, 0.0))
    rule = fake_hub.fail(
        "/commit/", commit_title=r"^Saving Fabric Checkpoint -- Step 2$", message="Hub is down"
    )
    config, notes = load_config(None, hub_overrides(tmp_path, **{"training.max_steps": 4}))
    with (
        caplog.at_level(logging.INFO, logger="pico_hf.training"),
        pytest.raises(HubPushError, match=r"from step 2 'Saving Fabric Checkpoint -- Step 2' on") as raised,
    ):
        run_training(config, notes, extra_callbacks=[HandMadeStates()])
    command = f"python -m pico_hf.hub.publish {config.run_dir} --repo_id {REPO_ID} --branch {BRANCH}"
    assert str(raised.value).endswith(command) and raised.value.command == command
    # The run still ends with its summary, which counts the pushes and names what is left and how to push it.
    [summary] = [r.getMessage() for r in caplog.records if "Finished 4 steps" in r.getMessage()]
    hub_line = summary.splitlines()[-1]
    assert re.fullmatch(
        rf"  hub: +\d+ commits pushed, \d+ retries; \d+ NOT pushed, finish with: {re.escape(command)}",
        hub_line,
    ), hub_line
    assert int(re.search(r"(\d+) retries", hub_line)[1]) >= 4
    assert any(
        "step 2, commit 'Saving Fabric Checkpoint -- Step 2'" in r.getMessage()
        and "Hub is down" in r.getMessage()
        for r in caplog.records
    )
    assert rule.hits >= 6  # three attempts at the checkpoint, three more at the end (maybe at step 4 too)
    # Training finished; the branch stops cleanly before the failed commit.
    assert (config.run_dir / "checkpoints" / "step_4").is_dir()
    full = expected_titles([0, 2, 4], last=4)
    assert hub_titles_without_initial(fake_hub) == full[: full.index("Saving Fabric Checkpoint -- Step 2")]

    fake_hub.clear_failures()
    assert publish.main([str(config.run_dir), "--repo_id", REPO_ID]) == 0
    assert hub_titles_without_initial(fake_hub) == full
    out = capsys.readouterr().out
    assert "skip  Saving HF Model -- Step 2  (already on the branch)" in out
    assert "push  Saving Fabric Checkpoint -- Step 2" in out
    # Pushed late, the step-2 evaluation commit still shows the folder as it was at step 2.
    at_eval = fake_hub.commit_by_title(REPO_ID, BRANCH, "Saving Evaluation Results -- Step 2").files
    assert sorted(n for n in at_eval if n.startswith("eval_results/")) == [
        "eval_results/step_0.json",
        "eval_results/step_2.json",
    ]
    # Running it again finds nothing to do.
    assert publish.main([str(config.run_dir), "--repo_id", REPO_ID]) == 0
    assert hub_titles_without_initial(fake_hub) == full


def hub_titles_without_initial(hub):
    return hub.titles(REPO_ID, BRANCH)[1:]


def test_pushes_run_in_the_background_in_order(fake_hub, tmp_path):  # noqa: F811
    fake_hub.delay("/commit/", 0.3)
    files = []
    for i in range(4):
        path = tmp_path / f"file_{i}.txt"
        path.write_text(str(i))
        files.append(PlannedCommit(i, f"commit {i}", ((path, "data.txt"),)))
    publisher = HubPublisher(REPO_ID, "run", api=HfApi())
    publisher.prepare()
    start = time.perf_counter()
    for commit in files:
        publisher.submit([commit])
    assert time.perf_counter() - start < 0.25  # queued, not pushed: the caller is not held up
    publisher.finish()
    assert fake_hub.titles(REPO_ID, "run") == [
        "initial commit",
        "commit 0",
        "commit 1",
        "commit 2",
        "commit 3",
    ]
    assert fake_hub.files(REPO_ID, "run")["data.txt"] == b"3"


# --- what is pushed, from hand-made folders ---------------------------------------------------------------


def make_checkpoint(run_dir, step, dynamics=(), extra=()):
    step_dir = run_dir / "checkpoints" / f"step_{step}"
    (step_dir / "fabric_state").mkdir(parents=True)
    (step_dir / "fabric_state" / "checkpoint.pt").write_bytes(b"state")
    for name in (
        "config.json",
        "model.safetensors",
        "pico_decoder.py",
        "tokenizer.json",
        "special_tokens_map.json",
    ):
        (step_dir / name).write_text(name)
    (step_dir / ".hidden").write_text("x")
    for name in dynamics:
        path = step_dir / "learning_dynamics" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(name)
    for name in extra:
        (step_dir / name).write_text(name)
    return step_dir


def test_plan_splits_metrics_and_names(tmp_path):
    run_dir = tmp_path / "run"
    make_checkpoint(
        run_dir,
        0,
        dynamics=[
            "val_activations.pt",  # pico-train's own file names work too
            "train_weights.pt",
            "zz_extra_weights.safetensors",
            "train_data/data-00000-of-00001.arrow",
            "train_data/state.json",
            "metrics.json",
        ],
    )
    (run_dir / "training_config.yaml").write_text("checkpointing: {run_name: run}\n")
    plan = plan_checkpoint_commits(run_dir, 0)
    summary = [(c.title, sorted(p for _, p in c.files)) for c in plan]
    assert summary == [
        ("Saving HF Model -- Step 0", ["config.json", "model.safetensors", "pico_decoder.py"]),
        ("Saving Tokenizer -- Step 0", ["special_tokens_map.json", "tokenizer.json"]),
        ("Saving Training Config -- Step 0", ["training_config.yaml"]),
        ("Saving Fabric Checkpoint -- Step 0", ["fabric_state/checkpoint.pt"]),
        (
            "Saving Learning Dynamics Data (train) -- Step 0",
            [
                "learning_dynamics/train_data/data-00000-of-00001.arrow",
                "learning_dynamics/train_data/state.json",
                "learning_dynamics/train_weights.pt",
            ],
        ),
        ("Saving Learning Dynamics Data (val) -- Step 0", ["learning_dynamics/val_activations.pt"]),
        (
            "Saving Learning Dynamics Data (zz_extra) -- Step 0",
            ["learning_dynamics/metrics.json", "learning_dynamics/zz_extra_weights.safetensors"],
        ),
    ]
    # Later steps: no tokenizer or config commits; nothing for folders that are absent.
    make_checkpoint(run_dir, 3)
    assert [c.title for c in plan_checkpoint_commits(run_dir, 3)] == [
        "Saving HF Model -- Step 3",
        "Saving Fabric Checkpoint -- Step 3",
    ]
    with pytest.raises(FileNotFoundError, match="step_5 is not a complete checkpoint"):
        plan_checkpoint_commits(run_dir, 5)


def test_cli_dry_run_lists_commits_in_step_order(tmp_path, capsys):
    run_dir = tmp_path / "my-run"
    for step in (10, 0, 5):
        make_checkpoint(run_dir, step, dynamics=["val_weights.safetensors"])
    (run_dir / "checkpoints" / "step_7").mkdir()  # incomplete: skipped
    assert publish.main([str(run_dir), "--repo_id", "me/x", "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"Would push 10 commits from {run_dir} to me/x (branch 'my-run'):"
    assert lines[-1] == "and on 'main': Saving Final Model -- Step 10 (run branch 'my-run')  (5 files)"
    assert [line.split("  (")[0].strip() for line in lines[1:-1]] == [
        "Saving HF Model -- Step 0",
        "Saving Tokenizer -- Step 0",
        "Saving Fabric Checkpoint -- Step 0",
        "Saving Learning Dynamics Data (val) -- Step 0",
        "Saving HF Model -- Step 5",
        "Saving Fabric Checkpoint -- Step 5",
        "Saving Learning Dynamics Data (val) -- Step 5",
        "Saving HF Model -- Step 10",
        "Saving Fabric Checkpoint -- Step 10",
        "Saving Learning Dynamics Data (val) -- Step 10",
    ]
    assert publish.main([str(run_dir), "--dry-run"]) == 2  # no repo id anywhere
    assert "pass --repo_id" in capsys.readouterr().err
    assert publish.main([str(run_dir), "--repo_id", "me/x", "--steps", "3"]) == 2
    assert "No checkpoint for step(s) [3]" in capsys.readouterr().err


def test_cli_needs_the_hub(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    make_checkpoint(tmp_path / "run", 0)
    assert publish.main([str(tmp_path / "run"), "--repo_id", "me/x"]) == 2
    assert "HF_HUB_OFFLINE" in capsys.readouterr().err


@pytest.mark.slow  # a fresh interpreter imports torch and transformers
def test_module_runs_as_a_script(tmp_path):
    make_checkpoint(tmp_path / "run", 0)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pico_hf.hub.publish",
            str(tmp_path / "run"),
            "--repo_id",
            "me/x",
            "--dry-run",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "Saving HF Model -- Step 0" in result.stdout


# --- cards, main, the LFS path, concurrent writers ----------------------------------------------------------


def test_each_model_commit_carries_the_card_and_main_holds_the_final_model(published, tmp_path):
    hub, config, _ = published
    run_dir = config.run_dir
    for step in (0, 2, 4, 6):
        at_model = hub.commit_by_title(REPO_ID, BRANCH, f"Saving HF Model -- Step {step}").files
        local = (run_dir / "checkpoints" / f"step_{step}" / "README.md").read_bytes()
        assert at_model["README.md"] == local
        card = ModelCard(local.decode())
        [index] = card.data.eval_results
        assert (index.metric_name, index.metric_value) == ("paloma", 100.0 - step)  # HandMadeStates' value
        assert index.dataset_name == config.evaluation.paloma.dataset_name  # the file names no dataset
        assert f"| {step} | 6 | {step * 8 * 16:,} |" in card.text  # step, of, tokens seen
        assert (
            f'revision="{BRANCH}"' in card.text and "learning_dynamics/val_weights.safetensors" in card.text
        )
        card.validate()  # the Hub's metadata validation, model-index included
    # main: the final checkpoint's model, tokenizer and card, nothing of the history.
    final = hub.files(REPO_ID, "main")
    last = commits.checkpoint_steps(run_dir)[-1]  # 6, or 8 once the resumed run has run
    assert hub.titles(REPO_ID, "main")[-1] == f"Saving Final Model -- Step {last} (run branch 'tiny')"
    final_dir = run_dir / "checkpoints" / f"step_{last}"
    for name in ("README.md", "model.safetensors", "config.json", "tokenizer.json"):
        assert final[name] == (final_dir / name).read_bytes(), name
    assert not any(name.startswith(("fabric_state/", "learning_dynamics/")) for name in final)
    # Read back as a user would: the native loader from main.
    from transformers import AutoModelForCausalLM

    import pico_hf  # noqa: F401

    model = AutoModelForCausalLM.from_pretrained(REPO_ID, cache_dir=tmp_path / "cache")
    local = AutoModelForCausalLM.from_pretrained(final_dir).state_dict()
    loaded = model.state_dict()
    assert sorted(local) == sorted(loaded)
    for name, tensor in local.items():
        torch.testing.assert_close(loaded[name], tensor, rtol=0, atol=0)


def test_weights_travel_the_xet_path_and_the_token_is_never_written(published):
    hub, config, _ = published
    head = hub.commits(REPO_ID, BRANCH)[-1]
    assert {"model.safetensors", "fabric_state/optimizer.pt"} <= head.lfs
    assert {"config.json", "README.md", "training_config.yaml"}.isdisjoint(head.lfs)
    # Through Xet, as on the Hub: xorbs and shards to the CAS, nothing through the LFS batch API.
    xorbs = [path for method, path, _ in hub.requests if method == "POST" and "/cas/v1/xorbs/" in path]
    shards = [path for method, path, status in hub.requests if path == "/cas/v1/shards" and status == 200]
    assert xorbs and shards
    assert not [path for _, path, _ in hub.requests if "/info/lfs/" in path or path == "/lfs-verify"]
    tree = HfApi().list_repo_tree(REPO_ID, revision=BRANCH, recursive=True)
    stored = {entry.path: entry for entry in tree if entry.path.endswith(("json", "safetensors"))}
    assert all(entry.lfs is None for path, entry in stored.items() if path.endswith("json"))  # regular
    weights = [entry for path, entry in stored.items() if path.endswith("safetensors")]
    assert weights and all(entry.lfs is not None and entry.xet_hash for entry in weights)  # in Xet
    # The token: in no local file of the run (logs, config, cards) and in no file of any commit.
    token = hub.token.encode()
    for path in config.run_dir.rglob("*"):
        if path.is_file():
            assert token not in path.read_bytes(), path
    for revision in (BRANCH, "main"):
        for commit in hub.commits(REPO_ID, revision):
            assert commit.title.encode().find(token) == -1
            assert all(token not in data for data in commit.files.values()), commit.title


def test_weights_travel_the_lfs_path_on_a_hub_without_xet(lfs_fake_hub, tmp_path):  # noqa: F811
    weights = tmp_path / "model.safetensors"
    save_file({"w": torch.arange(1000.0)}, weights)
    publisher = HubPublisher(REPO_ID, "run", api=HfApi())
    publisher.prepare()
    publisher.push(PlannedCommit(1, "Saving HF Model -- Step 1", ((weights, "model.safetensors"),)))
    head = lfs_fake_hub.commits(REPO_ID, "run")[-1]
    assert head.lfs == {"model.safetensors"} and head.files["model.safetensors"] == weights.read_bytes()
    paths = [path for _, path, _ in lfs_fake_hub.requests]
    assert any(path.endswith(".git/info/lfs/objects/batch") for path in paths) and "/lfs-verify" in paths
    assert not [path for path in paths if "xet" in path or path.startswith("/cas/")]


def test_hub_pushes_draw_no_progress_bars(published):
    # Background uploads must not interleave huggingface_hub's per-file bars with the training bar.
    from huggingface_hub.utils import are_progress_bars_disabled

    assert are_progress_bars_disabled()


def test_a_failure_in_the_middle_of_an_lfs_upload_is_retried(lfs_fake_hub, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setattr(commits, "RETRY_DELAYS", (0.0, 0.0))
    weights = tmp_path / "model.safetensors"
    save_file({"w": torch.arange(1000.0)}, weights)
    lfs_fake_hub.fail("/lfs-verify", status=400, message="verify failed", times=1)  # uploaded, not verified
    publisher = HubPublisher(REPO_ID, "run", api=HfApi())
    publisher.prepare()
    oid = publisher.push(PlannedCommit(1, "Saving HF Model -- Step 1", ((weights, "model.safetensors"),)))
    assert publisher.retries == 1
    assert lfs_fake_hub.titles(REPO_ID, "run") == ["initial commit", "Saving HF Model -- Step 1"]
    head = lfs_fake_hub.commits(REPO_ID, "run")[-1]
    assert head.oid == oid and head.files["model.safetensors"] == weights.read_bytes()
    assert head.lfs == {"model.safetensors"}
    puts = [r for r in lfs_fake_hub.requests if r[0] == "PUT"]
    assert len(puts) == 2  # the object went up again after the failed verification


def test_a_failure_in_the_middle_of_a_xet_upload_is_retried(fake_hub, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setattr(commits, "RETRY_DELAYS", (0.0, 0.0))
    weights = tmp_path / "model.safetensors"
    save_file({"w": torch.arange(100_000.0)}, weights)
    fake_hub.fail("/cas/v1/shards", status=400, message="shard refused", times=1)  # xorbs up, shard not
    publisher = HubPublisher(REPO_ID, "run", api=HfApi())
    publisher.prepare()
    oid = publisher.push(PlannedCommit(1, "Saving HF Model -- Step 1", ((weights, "model.safetensors"),)))
    assert publisher.retries == 1
    head = fake_hub.commits(REPO_ID, "run")[-1]
    assert head.oid == oid and head.files["model.safetensors"] == weights.read_bytes()
    assert head.lfs == {"model.safetensors"}
    shards = [status for method, path, status in fake_hub.requests if path == "/cas/v1/shards"]
    assert shards == [400, 200]


def test_a_concurrent_writer_is_never_overwritten(fake_hub, tmp_path):  # noqa: F811
    note = tmp_path / "note.txt"
    note.write_text("mine")
    publisher = HubPublisher(REPO_ID, "run", api=HfApi())
    publisher.prepare()
    HfApi().upload_file(path_or_fileobj=b"theirs", path_in_repo="other.txt", repo_id=REPO_ID, revision="run")
    with pytest.raises(HubPushError, match="changed by another writer"):
        publisher.push(PlannedCommit(1, "Saving HF Model -- Step 1", ((note, "note.txt"),)))
    assert fake_hub.files(REPO_ID, "run")["other.txt"] == b"theirs"
    assert "note.txt" not in fake_hub.files(REPO_ID, "run")
    assert 412 in {status for _, path, status in fake_hub.requests if "/commit/" in path}
    # A new publisher starts from the new head (create_branch(exist_ok=True) keeps the branch) and pushes.
    again = HubPublisher(REPO_ID, "run", api=HfApi())
    again.prepare()
    again.push(PlannedCommit(1, "Saving HF Model -- Step 1", ((note, "note.txt"),)))
    assert fake_hub.files(REPO_ID, "run")["other.txt"] == b"theirs"
    assert fake_hub.files(REPO_ID, "run")["note.txt"] == b"mine"


def test_reachability_probe_goes_through_the_configured_proxy(monkeypatch):
    """huggingface_hub's HTTP client honours HTTP(S)_PROXY; a raw socket to the endpoint would not."""
    from huggingface_hub import close_session, constants

    from pico_hf import hub_access as hub_module

    with FakeHub() as proxy:
        for name in ("NO_PROXY", "no_proxy", "HF_HUB_OFFLINE"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "ENDPOINT", "http://hub.invalid")  # resolvable only by the proxy
        monkeypatch.setenv("HTTP_PROXY", proxy.url)
        close_session()  # the shared client reads the proxy settings when it is created
        try:
            assert hub_module.hub_reachable(timeout=5)
            deadline = time.monotonic() + 5  # the fake logs a request just after answering it
            while ("HEAD", "/", 200) not in proxy.requests and time.monotonic() < deadline:
                time.sleep(0.05)
            assert ("HEAD", "/", 200) in proxy.requests  # asked through the proxy
            monkeypatch.delenv("HTTP_PROXY")
            close_session()
            monkeypatch.setattr(constants, "ENDPOINT", "http://hub2.invalid")
            assert not hub_module.hub_reachable(timeout=5)
        finally:
            close_session()


class WaitsForTheWeightsOnTheHub(CheckpointContributor):
    """A slow contributor (like evaluation): waits, while the checkpoint is still open, until its weights are
    on the Hub, and records for each step whether they got there before the checkpoint was complete."""

    def __init__(self, hub):
        self.hub, self.early = hub, {}

    def on_checkpoint(self, args, state, control, checkpoint_dir, **kwargs):
        import hashlib

        oid = hashlib.sha256((checkpoint_dir / "model.safetensors").read_bytes()).hexdigest()
        deadline = time.monotonic() + 30
        while oid not in self.hub.lfs_objects and time.monotonic() < deadline:
            time.sleep(0.05)
        self.early[state.global_step] = (
            oid in self.hub.lfs_objects and checkpoint_dir.name != f"step_{state.global_step}"
        )


def test_weights_upload_while_the_checkpoint_is_still_being_completed(fake_hub, tmp_path):  # noqa: F811
    waiting = WaitsForTheWeightsOnTheHub(fake_hub)
    config, notes = load_config(None, hub_overrides(tmp_path))
    run_training(config, notes, extra_callbacks=[waiting])
    # Every checkpoint's weights (and optimizer state) are on the Hub before the checkpoint is complete, and
    # the commits do not upload them again.
    assert waiting.early == {0: True, 2: True, 4: True, 6: True}
    assert hub_titles_without_initial(fake_hub)[-1] == "Saving Fabric Checkpoint -- Step 6"
    xorbs = [path for method, path, _ in fake_hub.requests if method == "POST" and "/cas/v1/xorbs/" in path]
    assert xorbs and len(xorbs) == len(set(xorbs))
    for step in (2, 4, 6):
        files = fake_hub.commit_by_title(REPO_ID, BRANCH, f"Saving HF Model -- Step {step}").files
        weights = config.run_dir / "checkpoints" / f"step_{step}" / "model.safetensors"
        assert files["model.safetensors"] == weights.read_bytes()


def test_pico_train_pt_learning_dynamics_are_pushed_and_analysed_from_the_hub(tmp_path):
    """With `file_format: pt` the pushed run holds pico-train's `{split}_{type}.pt` files, in pico-train's
    commits, loadable with `weights_only=True` and analysed from the Hub."""
    from pico_hf.learning_dynamics.analysis_config import parse_analysis_config
    from pico_hf.learning_dynamics.analysis_sources import HubRun, LocalRun
    from pico_hf.learning_dynamics.analyze import run_analysis

    with running_fake_hub(tmp_path / "hf-cache") as hub:
        from conftest import make_pretokenized

        val = make_pretokenized(tmp_path / "val" / "val.parquet", n_rows=6, row_length=17, seed=1)
        overrides = hub_overrides(
            tmp_path,
            **{
                "checkpointing.learning_dynamics.file_format": "pt",
                "checkpointing.learning_dynamics.eval_data": str(val),
            },
        )
        overrides.remove("checkpointing.learning_dynamics.layer_suffixes=[]")  # the real capture
        config, notes = load_config(None, overrides)
        run_training(config, notes)
        for step in (0, 2, 4, 6):
            local = local_files(
                config.run_dir / "checkpoints" / f"step_{step}" / "learning_dynamics", "learning_dynamics/"
            )
            for split in ("train", "val") if step < 6 else ("val",):
                title = f"Saving Learning Dynamics Data ({split}) -- Step {step}"
                pushed = hub.commit_by_title(REPO_ID, BRANCH, title).files
                names = {
                    f"learning_dynamics/{split}_{kind}.pt" for kind in ("activations", "weights", "gradients")
                }
                assert names <= local.keys() and {n: pushed[n] for n in names} == {n: local[n] for n in names}
                assert not any(
                    n.endswith(".safetensors") for n in pushed if n.startswith("learning_dynamics/")
                )
        train_2 = next(
            c.commit_id
            for c in HfApi().list_repo_commits(REPO_ID, revision=BRANCH)
            if c.title == "Saving Learning Dynamics Data (train) -- Step 2"
        )
        snapshot = snapshot_download(REPO_ID, revision=train_2, cache_dir=tmp_path / "cache")
        weights = torch.load(
            f"{snapshot}/learning_dynamics/train_weights.pt", map_location="cpu", weights_only=True
        )
        assert "layers.1.swiglu.w_2" in weights
        specs = [
            {
                "metric_name": "norm",
                "norm_type": "frobenius",
                "data_split": "val",
                "components": [
                    {
                        "component_name": "simple",
                        "data_type": "weights",
                        "layer_suffixes": "swiglu.w_2",
                        "layers": [0, 1],
                    }
                ],
            }
        ]
        results = [
            run_analysis(
                parse_analysis_config(
                    {
                        "analysis_name": name,
                        "metrics": specs,
                        "monitoring": {"output_dir": str(tmp_path / name)},
                    }
                ),
                source,
            ).results
            for name, source in (
                ("hub", HubRun(REPO_ID, BRANCH, cache_dir=tmp_path / "cache")),
                ("local", LocalRun(config.run_dir)),
            )
        ]
        assert results[0] == results[1] and sorted(next(iter(results[0].values()))) == [0, 2, 4, 6]


def test_early_uploads_hand_paths_to_the_xet_path_and_never_fall_back(fake_hub, tmp_path):  # noqa: F811
    from concurrent.futures import wait

    from huggingface_hub import CommitOperationAdd

    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    hub_logger = logging.getLogger("huggingface_hub")
    hub_logger.addHandler(handler)
    try:
        checkpoints = tmp_path / "checkpoints"
        open_dir = checkpoints / ".step_1.tmp"
        open_dir.mkdir(parents=True)
        save_file({"w": torch.arange(100_000.0)}, open_dir / "model.safetensors")
        publisher = HubPublisher(REPO_ID, "run", api=HfApi())
        publisher.prepare()
        publisher.upload_early([(open_dir / "model.safetensors", "model.safetensors")], checkpoints)
        (open_dir).rename(checkpoints / "step_1")  # the checkpoint is published while it may still upload
        wait(publisher._futures)
        weights = (checkpoints / "step_1" / "model.safetensors").read_bytes()
        assert [r.getMessage() for r in records] == []  # no "Falling back to HTTP upload"
        assert hashlib.sha256(weights).hexdigest() in fake_hub.xet_hashes  # it went up through Xet
        assert sorted(p.name for p in checkpoints.iterdir()) == ["step_1"]  # the staging links are gone
        xorbs_before = [r for r in fake_hub.requests if "/cas/v1/xorbs/" in r[1]]
        publisher.push(
            PlannedCommit(
                1,
                "Saving HF Model -- Step 1",
                ((checkpoints / "step_1" / "model.safetensors", "model.safetensors"),),
            )
        )
        assert [r for r in fake_hub.requests if "/cas/v1/xorbs/" in r[1]] == xorbs_before  # nothing again
        assert fake_hub.files(REPO_ID, "run")["model.safetensors"] == weights
        # What the early uploads used to hand over, an open file, is what makes huggingface_hub fall back.
        other = tmp_path / "other.safetensors"
        save_file({"v": torch.ones(10)}, other)
        with other.open("rb") as handle:
            HfApi().preupload_lfs_files(
                REPO_ID, [CommitOperationAdd("other.safetensors", handle)], revision="run"
            )
        assert ["Falling back to HTTP upload" in r.getMessage() for r in records] == [True]
    finally:
        hub_logger.removeHandler(handler)


def tensorboard_steps(events: bytes) -> list[int]:
    """The step of every event of a TensorBoard event file (TFRecord framing around Event protos)."""
    from tensorboard.compat.proto.event_pb2 import Event

    steps, offset = [], 0
    while offset < len(events):
        length = int.from_bytes(events[offset : offset + 8], "little")
        steps.append(Event.FromString(events[offset + 12 : offset + 12 + length]).step)
        offset += 12 + length + 4
    return steps


@pytest.mark.slow
def test_the_branch_carries_the_curves_up_to_each_step_across_a_kill_and_resume(fake_hub, tmp_path):  # noqa: F811
    overrides = hub_overrides(tmp_path)
    config, notes = load_config(None, overrides)
    with pytest.raises(KeyboardInterrupt):  # killed after step 5 was logged: step 4 is the last checkpoint
        run_training(config, notes, extra_callbacks=[HandMadeStates(), StopAfter(5)])
    deadline = time.monotonic() + 60  # the killed run's last pushes finish in the background
    while "Saving Learning Dynamics Data (val) -- Step 4" not in fake_hub.titles(REPO_ID, BRANCH):
        assert time.monotonic() < deadline, fake_hub.titles(REPO_ID, BRANCH)
        time.sleep(0.1)
    resumed, notes = load_config(None, overrides)
    run_training(resumed, notes, extra_callbacks=[HandMadeStates()])

    logs = config.run_dir / "logs"
    local = (logs / "metrics.jsonl").read_text()
    rows = [json.loads(line) for line in local.splitlines()]
    assert [row["step"] for row in rows if "loss" in row] == [1, 2, 3, 4, 5, 6]  # step 5 once, not twice
    event_files = sorted(p.relative_to(logs).as_posix() for p in (logs / "tensorboard").rglob("events.*"))
    assert len(event_files) == 2  # one per attempt
    for step in (0, 2, 4, 6):
        files = fake_hub.commit_by_title(REPO_ID, BRANCH, f"Saving HF Model -- Step {step}").files
        up_to = "".join(
            line + "\n" for line, row in zip(local.splitlines(), rows, strict=True) if row["step"] <= step
        )
        assert files.get("logs/metrics.jsonl", b"").decode() == up_to, step  # none before the first log
        pushed_events = sorted(
            name.removeprefix("logs/") for name in files if name.startswith("logs/tensorboard/")
        )
        assert pushed_events == (event_files if step == 6 else event_files[:1]), step
        for name in pushed_events:
            assert all(s <= step for s in tensorboard_steps(files[f"logs/{name}"])), (step, name)
    # At the last step the branch holds the local files themselves (the run's summary row included).
    head = fake_hub.files(REPO_ID, BRANCH)
    assert head["logs/metrics.jsonl"].decode() == local and "train_runtime" in rows[-1]
    for name in event_files:
        assert head[f"logs/{name}"] == (logs / name).read_bytes()


def test_the_cas_refuses_shards_it_cannot_rebuild(fake_hub):  # noqa: F811
    import struct

    from fake_xet import BOOKEND, SHARD_MAGIC
    from huggingface_hub import constants, get_session

    HfApi().create_repo(REPO_ID)
    auth = {"Authorization": f"Bearer {fake_hub.token}"}
    token = get_session().get(f"{constants.ENDPOINT}/api/models/{REPO_ID}/xet-write-token/main", headers=auth)
    cas, xet = (
        token.headers["X-Xet-Cas-Url"],
        {"Authorization": f"Bearer {token.headers['X-Xet-Access-Token']}"},
    )
    assert get_session().post(f"{cas}/v1/shards", content=b"shard").status_code == 401  # no Xet token

    def shard(xorb: bytes) -> bytes:  # one file of one term: chunks [0, 1) of `xorb`, 10 bytes
        header = SHARD_MAGIC + struct.pack("<QQ", 2, 0)
        file = b"\x01" * 32 + struct.pack("<IIQ", 0, 1, 0) + xorb + struct.pack("<4I", 0, 10, 0, 1)
        bookend = BOOKEND + bytes(16)
        return header + file + bookend + bookend  # no xorb of its own: the file names one already stored

    refused = get_session().post(f"{cas}/v1/shards", content=b"not a shard", headers=xet)
    assert (refused.status_code, refused.json()["error"]) == (
        400,
        "Invalid shard: not a Xet shard (wrong magic number)",
    )
    refused = get_session().post(f"{cas}/v1/shards", content=shard(b"\x02" * 32), headers=xet)
    assert refused.status_code == 400
    assert refused.json()["error"] == f"Invalid shard: xorb {'02' * 32} is unknown to this CAS"
    assert fake_hub.cas.files == {} and fake_hub.xet_hashes == {}
