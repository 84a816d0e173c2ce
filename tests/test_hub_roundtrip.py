"""A demo-like run pushed to the fake Hub and read back as a user would: the run branch and `main` carry the
cards, the model-index results and pico-train's commit titles; `recipes/analyze.py --repo_id --branch` (in a
fresh process, HF_ENDPOINT set) analyses the branch, and `python -m pico_hf.hub.publish --analysis` puts its
plots on the branch and `main`, where the card shows them."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO, make_pretokenized, tiny_training_overrides
from fake_hub import fake_hub, running_fake_hub  # noqa: F401
from huggingface_hub import HfApi, ModelCard, hf_hub_download
from test_eval_callback import evaluation_overrides

from pico_hf.hub import publish
from pico_hf.hub.cards import read_analysis
from pico_hf.learning_dynamics.report import read_training_curves
from pico_hf.training.config import ConfigError, load_config
from pico_hf.training.run import run_training

# The fixture trains, analyses in a fresh process (torch import) and publishes: about 25 s on 2 CPU cores.
SLOW = pytest.mark.slow
# pico-train stores the learning-dynamics datasets (.arrow) in the model repo on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:It seems that you are about to commit a data file")
REPO_ID = "fake-user/pico-roundtrip"
BRANCH = "tiny"
STEPS = [0, 2, 4, 6]
FINAL_TITLE = "Saving Final Model -- Step 6 (run branch 'tiny')"
ANALYSIS = "roundtrip-analysis"
ANALYSIS_TITLE = f"Saving Analysis ({ANALYSIS}) -- Step 6"
METRICS = [  # one per kind of data the run captured, on its two layers
    {
        "metric_name": "cka",
        "target_checkpoint": 6,
        "data_split": "val",
        "components": [
            {
                "component_name": "simple",
                "data_type": "activations",
                "layer_suffixes": "swiglu.w_2",
                "layers": [0, 1],
            }
        ],
    },
    {
        "metric_name": "norm",
        "norm_type": "frobenius",
        "data_split": "val",
        "components": [
            {
                "component_name": "ov_circuit",
                "data_type": "weights",
                "layer_suffixes": {"output_layer": "attention.o_proj", "value_layer": "attention.v_proj"},
                "layers": [0, 1],
            }
        ],
    },
]


@pytest.fixture(scope="module")
def pushed(tmp_path_factory):
    """Train with pushing on (evaluation and learning dynamics at every checkpoint), analyse the branch from
    the Hub in a fresh process, then publish the analysis."""
    tmp_path = tmp_path_factory.mktemp("roundtrip")
    val = make_pretokenized(tmp_path / "val" / "val.parquet", n_rows=40, row_length=17, seed=1)
    overrides = tiny_training_overrides(
        tmp_path,
        **{
            "checkpointing.save_to_hf": "true",
            "checkpointing.hf_checkpoint.repo_id": REPO_ID,
            "checkpointing.learning_dynamics.eval_data": str(val),
            "checkpointing.learning_dynamics.batch_size": 8,
            **evaluation_overrides(tmp_path),
        },
    )
    with running_fake_hub(tmp_path / "hf-cache") as hub:
        config, notes = load_config(None, overrides)
        run_training(config, notes)
        analysis_config = tmp_path / "analysis.yaml"
        out = tmp_path / "analysis_results"
        analysis_config.write_text(
            yaml.safe_dump(
                {"analysis_name": ANALYSIS, "metrics": METRICS, "monitoring": {"output_dir": str(out)}},
                sort_keys=False,
            )
        )
        env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_ENDPOINT")}
        analysed = subprocess.run(
            [
                sys.executable,
                str(REPO / "recipes" / "analyze.py"),
                "--config",
                str(analysis_config),
                "--repo_id",
                REPO_ID,
                "--branch",
                BRANCH,
            ],
            env={**env, **hub.client_env(tmp_path / "analysis-cache")},
            capture_output=True,
            text=True,
            timeout=300,
        )
        titles_before = {b: hub.titles(REPO_ID, b) for b in (BRANCH, "main")}
        printed = io.StringIO()
        publish.publish_run(config.run_dir, analysis=out / ANALYSIS, out=printed)
        yield hub, config, analysed, out / ANALYSIS, titles_before, printed.getvalue()


def eval_values(run_dir, step):
    return json.loads((run_dir / "eval_results" / f"step_{step}.json").read_text())


@SLOW
def test_branch_and_main_carry_pico_train_titles_cards_and_model_index(pushed):
    _, config, _, _, titles_before, _ = pushed
    branch = titles_before[BRANCH]
    for step in STEPS:
        assert f"Saving HF Model -- Step {step}" in branch
        assert f"Saving Fabric Checkpoint -- Step {step}" in branch
        assert f"Saving Evaluation Results -- Step {step}" in branch
        assert f"Saving Learning Dynamics Data (val) -- Step {step}" in branch
    assert branch[:4] == [
        "initial commit",
        "Saving HF Model -- Step 0",
        "Saving Tokenizer -- Step 0",
        "Saving Training Config -- Step 0",
    ]
    assert titles_before["main"] == ["initial commit", FINAL_TITLE]
    api = HfApi()
    commits = {c.title: c.commit_id for c in api.list_repo_commits(REPO_ID, revision=BRANCH)}
    for step in STEPS:  # each model commit's card, read back at that commit, holds that step's results
        path = hf_hub_download(REPO_ID, "README.md", revision=commits[f"Saving HF Model -- Step {step}"])
        card = ModelCard.load(path)
        [result] = card.data.eval_results
        # Local texts: named by their file, with no Hub id.
        assert (result.metric_name, result.dataset_name, result.dataset_type) == (
            "paloma",
            Path(config.evaluation.paloma.dataset_name).name,
            "local",
        )
        assert result.metric_value == round(eval_values(config.run_dir, step)["paloma"], 4)
        card.validate()  # against the fake Hub's validate-yaml, model-index schema included
    main_card = ModelCard.load(REPO_ID)  # main: the final model and its card
    assert main_card.data.eval_results[0].metric_value == round(eval_values(config.run_dir, 6)["paloma"], 4)
    assert main_card.data.library_name == "transformers" and main_card.data.license == "apache-2.0"


@SLOW
def test_analyze_reads_the_branch_from_the_hub(pushed):
    _, config, analysed, folder, _, _ = pushed
    assert analysed.returncode == 0, analysed.stderr
    assert analysed.stdout.strip().endswith(ANALYSIS)
    analysis = read_analysis(folder)
    assert analysis.steps == tuple(STEPS)
    names = [p.name for p in analysis.plots]
    assert [n for n in names if not n.startswith(("eval_", "train_"))] == [
        "cka_val.png",
        "norm_frobenius_val.png",
    ]
    # The run's curves and evaluations come from what the branch's commits carry, as from a local run.
    assert {"eval_paloma.png", "train_loss.png", "train_learning_rate.png", "train_grad_norm.png"} <= set(
        names
    )
    report = (folder / "report.md").read_text()
    curves = read_training_curves(config.run_dir / "logs" / "metrics.jsonl")
    assert sorted(curves["loss"]) == [1, 2, 3, 4, 5, 6]
    assert "## Evaluation" in report and "## Training" in report
    assert (
        f"### loss\n\n![loss](plots/train_loss.png)\n\n6 logged steps, {curves['loss'][6]:.6g} at step 6."
        in report
    )
    cka = json.loads((folder / "step_6" / "cka_val.json").read_text())
    assert cka and all(value == pytest.approx(1.0, abs=1e-4) for value in cka.values())  # the target itself


@SLOW
def test_the_analysis_plots_are_published_and_shown_by_the_cards(pushed):
    hub, config, _, folder, titles_before, printed = pushed
    assert hub.titles(REPO_ID, BRANCH) == [*titles_before[BRANCH], ANALYSIS_TITLE]
    assert hub.titles(REPO_ID, "main") == ["initial commit", FINAL_TITLE, ANALYSIS_TITLE]
    assert f"On 'main': {ANALYSIS_TITLE}  (pushed -> " in printed
    final_card = (config.run_dir / "checkpoints" / "step_6" / "README.md").read_bytes()
    for revision in (BRANCH, "main"):
        files = hub.files(REPO_ID, revision)
        for local in folder.rglob("*"):
            if local.is_file():
                assert (
                    files[f"analysis/{ANALYSIS}/{local.relative_to(folder).as_posix()}"] == local.read_bytes()
                )
        assert files["README.md"] == final_card
        card = ModelCard.load(hf_hub_download(REPO_ID, "README.md", revision=revision))
        for stem in ("cka_val", "norm_frobenius_val"):
            link = f"![{stem}](analysis/{ANALYSIS}/plots/{stem}.png)"
            assert link in card.text
        assert f"analysis `{ANALYSIS}` of this run (steps 0, 2, 4, 6)" in card.text
        assert f"[`analysis/{ANALYSIS}/report.md`](analysis/{ANALYSIS}/report.md)" in card.text
        card.validate()
    # main still holds the final model beside the analysis; none of the run's history.
    files = hub.files(REPO_ID, "main")
    assert (
        files["model.safetensors"]
        == (config.run_dir / "checkpoints" / "step_6" / "model.safetensors").read_bytes()
    )
    assert not any(name.startswith(("fabric_state/", "learning_dynamics/")) for name in files)
    # Publishing again pushes nothing.
    again = io.StringIO()
    assert publish.publish_run(config.run_dir, analysis=folder, out=again) == []
    assert hub.titles(REPO_ID, "main") == ["initial commit", FINAL_TITLE, ANALYSIS_TITLE]
    assert f"On '{BRANCH}': {ANALYSIS_TITLE}  (already there)" in again.getvalue()


def test_an_analysis_without_plots_is_refused_naming_the_folder(tmp_path, capsys):
    (tmp_path / "bare" / "step_0").mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"bare holds no plots \(plots/\*\.png\): run recipes/analyze.py"):
        read_analysis(tmp_path / "bare")
    with pytest.raises(ConfigError, match=r"missing is not an analysis folder"):
        read_analysis(tmp_path / "missing")
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints" / "step_0").mkdir(parents=True)
    (run_dir / "checkpoints" / "step_0" / "config.json").write_text("{}")
    code = publish.main([str(run_dir), "--repo_id", "a/b", "--analysis", str(tmp_path / "bare"), "--dry-run"])
    assert code == 2 and "bare holds no plots" in capsys.readouterr().err
