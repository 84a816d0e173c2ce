"""Offline learning-dynamics analysis (recipes/analyze.py): pico-analyze's configs and layout, on runs trained
here, on pico-train-format runs, and on runs read back from a (fake) Hub."""

import hashlib
import importlib.util
import io
import json
import logging
import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, make_pretokenized, tiny_training_overrides
from fake_hub import fake_hub  # noqa: F401
from PIL import Image

from pico_hf.learning_dynamics import compute_metrics, parse_metric_specs
from pico_hf.learning_dynamics.analysis_config import load_analysis_config, parse_analysis_config, parse_steps
from pico_hf.learning_dynamics.analysis_sources import AnalysisError, LocalRun
from pico_hf.learning_dynamics.analyze import run_analysis
from pico_hf.learning_dynamics.capture import load_states
from pico_hf.learning_dynamics.report import last_step_rows, parse_key, plot_result, read_training_curves
from pico_hf.training.config import ConfigError, load_config
from pico_hf.training.run import run_training

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
LAYERS = [0, 1]
OV = {"output_layer": "attention.o_proj", "value_layer": "attention.v_proj"}
SHAPE = {"d_model": 32, "attention_n_heads": 4, "attention_n_kv_heads": 2}  # tiny_training_overrides' model


def _load_cli():
    spec = importlib.util.spec_from_file_location("analyze_cli", REPO / "recipes" / "analyze.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CLI = _load_cli()


def simple(data_type, suffix="swiglu.w_2"):
    return {"component_name": "simple", "data_type": data_type, "layer_suffixes": suffix, "layers": LAYERS}


def ov(data_type):
    return {"component_name": "ov_circuit", "data_type": data_type, "layer_suffixes": OV, "layers": LAYERS}


# Every metric, both splits, simple and OV components, a comparative target, two norms of one split.
METRICS = [
    {"metric_name": "cka", "target_checkpoint": 6, "data_split": "val", "components": [ov("activations")]},
    {
        "metric_name": "pwcca",
        "target_checkpoint": 6,
        "data_split": "val",
        "components": [simple("activations")],
    },
    {"metric_name": "per", "data_split": "train", "components": [simple("gradients"), ov("weights")]},
    {
        "metric_name": "condition_number",
        "data_split": "val",
        "components": [simple("weights", "attention.v_proj")],
    },
    {"metric_name": "gini", "data_split": "val", "components": [ov("gradients")]},
    {"metric_name": "hoyer", "data_split": "train", "components": [simple("gradients")]},
    {"metric_name": "norm", "norm_type": "nuclear", "data_split": "val", "components": [ov("weights")]},
    {"metric_name": "norm", "norm_type": "frobenius", "data_split": "val", "components": [ov("weights")]},
]
STEMS = [
    "cka_val",
    "pwcca_val",
    "per_train",
    "condition_number_val",
    "gini_val",
    "hoyer_train",
    "norm_nuclear_val",
    "norm_frobenius_val",
]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A 6-step run with learning dynamics at steps 0, 2, 4, 6 (no `train` split at the last one)."""
    tmp_path = tmp_path_factory.mktemp("analyze-run")
    val = make_pretokenized(tmp_path / "val" / "val.parquet", n_rows=40, row_length=17, seed=1)
    overrides = tiny_training_overrides(
        tmp_path,
        **{
            "checkpointing.learning_dynamics.eval_data": str(val),
            "checkpointing.learning_dynamics.batch_size": 8,
        },
    )
    config, notes = load_config(None, overrides)
    run_training(config, notes)
    return config.run_dir


def write_config(path: Path, output_dir: Path, metrics=None, steps=None, name="analysis", **extra) -> Path:
    config = {
        "analysis_name": name,
        "metrics": metrics or METRICS,
        "monitoring": {"output_dir": str(output_dir)},
    }
    if steps is not None:
        config["steps"] = steps
    config.update(extra)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def analyse(tmp_path, *location, name="analysis", report=False, **config_args):
    """Run the CLI in this process; returns (exit code, analysis folder)."""
    config = write_config(tmp_path / f"{name}.yaml", tmp_path / "out", name=name, **config_args)
    code = CLI.main(["--config", str(config), *map(str, location), *([] if report else ["--no_report"])])
    return code, tmp_path / "out" / name


def read_results(folder: Path) -> dict[int, dict[str, dict]]:
    return {
        int(step_dir.name.removeprefix("step_")): {
            p.stem: json.loads(p.read_text()) for p in step_dir.glob("*.json")
        }
        for step_dir in folder.glob("step_*")
    }


def expected_results(run_dir: Path, step: int) -> dict[str, dict]:
    """compute_metrics on the saved states, split by split (what the analysis must have written)."""
    ld = lambda s: run_dir / "checkpoints" / f"step_{s}" / "learning_dynamics"  # noqa: E731
    expected = {}
    for spec in parse_metric_specs(METRICS):
        source = load_states(ld(step), spec.data_split)
        if not source:
            continue
        target = load_states(ld(spec.target_checkpoint), spec.data_split) if spec.target_checkpoint else None
        values = compute_metrics([spec], source, target, model_shape=SHAPE)[spec.result_name]
        expected[spec.output_filename.removesuffix(".json")] = values
    return expected


def assert_same_values(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for stem, values in expected.items():
        assert list(actual[stem]) == list(values), stem  # same keys, same (pico-analyze's) order
        for key, value in values.items():
            assert actual[stem][key] == pytest.approx(value, rel=1e-5, abs=1e-7, nan_ok=True), (stem, key)


# --- local runs --------------------------------------------------------------------------------------------


def test_cli_writes_pico_analyze_layout_with_values_of_compute_metrics(trained_run, tmp_path, capsys):
    code, out = analyse(tmp_path, "--run_path", trained_run, steps={"start": 0, "end": 6, "step": 2})
    assert code == 0
    results = read_results(out)
    assert sorted(results) == [0, 2, 4, 6]
    for step in (0, 2, 4):
        assert sorted(results[step]) == sorted(STEMS)
    # The last checkpoint has no train split: its train metrics are skipped, the rest analysed.
    assert sorted(results[6]) == sorted(s for s in STEMS if not s.endswith("_train"))
    for step, by_stem in results.items():
        assert_same_values(by_stem, expected_results(trained_run, step))
    # Comparative metrics against the target itself: CKA is 1.
    assert all(v == pytest.approx(1.0, abs=1e-5) for v in results[6]["cka_val"].values())
    # One flat {component_key: value} per file, pico-analyze's keys.
    assert list(results[2]["gini_val"]) == [
        *(f"layers.0.ov_circuit.gradients.heads.{h}" for h in range(4)),
        "layers.0.ov_circuit.gradients",
        *(f"layers.1.ov_circuit.gradients.heads.{h}" for h in range(4)),
        "layers.1.ov_circuit.gradients",
    ]
    assert list(results[2]["per_train"])[:2] == [
        "layers.0.swiglu.w_2.gradients",
        "layers.1.swiglu.w_2.gradients",
    ]
    log = (out / "analysis.log").read_text()
    assert "step 6, split 'train': per_train, hoyer_train not computed" in log
    assert " - pico_hf.analyze - WARNING - " in log  # pico-analyze's log line format
    assert "per_train, hoyer_train not computed" in capsys.readouterr().err


def test_two_norms_of_one_split_are_kept_apart(trained_run, tmp_path):
    code, out = analyse(tmp_path, "--run_path", trained_run, steps=[4])
    assert code == 0
    nuclear = json.loads((out / "step_4" / "norm_nuclear_val.json").read_text())
    frobenius = json.loads((out / "step_4" / "norm_frobenius_val.json").read_text())
    assert nuclear.keys() == frobenius.keys()
    # Nuclear >= Frobenius, strictly for matrices of rank > 1.
    assert all(nuclear[key] > frobenius[key] * 1.01 for key in nuclear)


@pytest.mark.parametrize(
    ("steps", "expected"),
    [([4, 2], [2, 4]), ({"start": 2, "end": 6, "step": 4}, [2, 6]), (None, [0, 2, 4, 6])],
    ids=["list", "range", "every-step"],
)
def test_steps_as_list_range_or_every_step(trained_run, tmp_path, steps, expected):
    metrics = [m for m in METRICS if m["data_split"] == "val"]
    code, out = analyse(tmp_path, "--run_path", trained_run, metrics=metrics, steps=steps)
    assert code == 0
    assert sorted(read_results(out)) == expected


def test_step_range_includes_end_and_never_overshoots():
    assert parse_steps({"start": 0, "end": 100, "step": 50}) == (0, 50, 100)
    assert parse_steps({"start": 0, "end": 100, "step": 30}) == (0, 30, 60, 90)
    assert parse_steps([5, 0, 5]) == (0, 5)
    with pytest.raises(ConfigError, match="steps range lacks \\['step'\\]"):
        parse_steps({"start": 0, "end": 10})


def test_missing_steps_are_named_and_the_rest_analysed(trained_run, tmp_path, capsys):
    code, out = analyse(tmp_path, "--run_path", trained_run, steps=[2, 3, 4], report=True)
    assert code == 0
    assert sorted(read_results(out)) == [2, 4]
    err = capsys.readouterr().err
    assert "step 3, split 'val': cka_val, pwcca_val, condition_number_val, gini_val, norm_nuclear_val" in err
    assert "step 3, split 'train': per_train, hoyer_train not computed (no 'train' learning dynamics" in err
    report = (out / "report.md").read_text()
    assert "step 3, split 'val'" in report


def test_missing_target_skips_only_the_comparative_metrics(trained_run, tmp_path, capsys):
    metrics = [{**m, "target_checkpoint": 5} if "target_checkpoint" in m else m for m in METRICS]
    code, out = analyse(tmp_path, "--run_path", trained_run, metrics=metrics, steps=[2])
    assert code == 0
    assert sorted(read_results(out)[2]) == sorted(set(STEMS) - {"cka_val", "pwcca_val"})
    assert "every step, split 'val': cka_val, pwcca_val not computed (target checkpoint step 5" in (
        capsys.readouterr().err
    )


def test_nothing_to_analyse_exits_non_zero_with_a_message(trained_run, tmp_path, capsys):
    code, _ = analyse(tmp_path, "--run_path", trained_run, steps=[1, 3])
    assert code == 1
    err = capsys.readouterr().err
    assert "Nothing could be analysed in run" in err
    assert "step 1, split 'val'" in err

    assert CLI.main(["--config", str(tmp_path / "analysis.yaml"), "--run_path", str(tmp_path / "nope")]) == 1
    assert "Run path" in capsys.readouterr().err


def test_missing_data_type_skips_the_metrics_that_need_it(trained_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run, symlinks=True)
    (run / "checkpoints" / "step_2" / "learning_dynamics" / "val_gradients.safetensors").unlink()
    code, out = analyse(tmp_path, "--run_path", run, steps=[2])
    assert code == 0
    assert "gini_val" not in read_results(out)[2]  # OV gradients
    assert "norm_nuclear_val" in read_results(out)[2]
    assert (
        "step 2, split 'val': gini_val not computed (states have no 'gradients' entry"
        in capsys.readouterr().err
    )


def test_unreadable_states_skip_that_step_with_the_file_named(trained_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run, symlinks=True)
    ld = run / "checkpoints" / "step_2" / "learning_dynamics"
    (ld / "val_weights.safetensors").write_bytes(b"not a safetensors file")
    # A pickle that is not a plain dict of tensors: refused by weights_only loading, never executed.
    (ld / "train_gradients.safetensors").unlink()
    torch.save({"layers.0.swiglu.w_2": Path("x")}, ld / "train_gradients.pt")
    code, out = analyse(tmp_path, "--run_path", run, steps=[2, 4])
    assert code == 0
    assert sorted(read_results(out)) == [4]
    err = " ".join(capsys.readouterr().err.split())
    assert f"cannot read {ld / 'val_weights.safetensors'}" in err
    assert f"cannot read {ld / 'train_gradients.pt'}" in err


# --- config errors -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"metricz": []},
            "Unknown key(s) ['metricz']; valid keys: ['analysis_name', 'metrics', 'steps', 'monitoring']",
        ),
        (
            {"monitoring": {"output_dir": "x", "save_to_wandb": False, "color": 1}},
            "Unknown key(s) ['color'] in monitoring",
        ),
        ({"monitoring": {"wandb": {"team": "x"}}}, "Unknown key(s) ['team'] in monitoring.wandb"),
        ({"steps": {"start": 0, "stop": 4, "step": 2}}, "Unknown key(s) ['stop'] in steps"),
        ({"steps": "all"}, "steps must be a list of integers or a {start, end, step} range"),
        (
            {"metrics": [{**METRICS[0], "target": 4}]},
            "metrics[0] (cka): unknown key 'target' in spec of metric 'cka'",
        ),
        (
            {"metrics": [{"data_split": "val", "components": []}]},
            "metric_name must be specified for each metric",
        ),
        ({"metrics": [{**METRICS[0], "metric_name": "ckaa"}]}, "unknown metric 'ckaa'"),
        (
            {"metrics": [{**METRICS[0], "target_checkpoint": None}]},
            "cka compares against a target checkpoint",
        ),
        ({"metrics": [{**METRICS[2], "data_split": None}]}, "metrics[0] (per): data_split must be set"),
        ({"metrics": [METRICS[6], METRICS[6]]}, "both write 'norm_nuclear_val.json'"),
        (
            {"metrics": [{**METRICS[0], "components": [{**ov("activations"), "layer_suffix": "x"}]}]},
            "unknown component key(s) ['layer_suffix']",
        ),
    ],
)
def test_config_errors_name_the_problem(tmp_path, change, message, capsys):
    config = {"analysis_name": "a", "metrics": METRICS, "steps": [0], **change}
    with pytest.raises(ConfigError) as error:
        parse_analysis_config(config)
    assert message in str(error.value)
    # Through the CLI: exit status 2 and the message, with the file name.
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    assert CLI.main(["--config", str(path), "--run_path", str(tmp_path)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert str(path) in err
    assert " ".join(message.split()) in err


def test_pico_analyze_configs_load(tmp_path):
    """pico-analyze's demo config (wandb and Pico Labs settings included) and the shipped configs."""
    demo = {
        "analysis_name": "pico-decoder-demo-1-analysis",
        "metrics": [METRICS[0], METRICS[2]],
        "steps": {"start": 0, "end": 100, "step": 50},
        "monitoring": {
            "output_dir": "analysis_results",
            "save_to_wandb": True,
            "wandb": {"entity": "pico-lm", "project": "pico-demo"},
            "save_to_picolabs": False,
            "pico_report": {"lab_hash": "", "experiment_name": ""},
        },
    }
    config = parse_analysis_config(demo)
    assert config.steps == (0, 50, 100)
    assert config.monitoring.save_to_wandb and config.monitoring.wandb.project == "pico-demo"
    shipped = sorted((REPO / "recipes" / "configs" / "analysis").glob("*.yaml"))
    assert [p.name for p in shipped] == ["demo.yaml", "pico-decoder-ov.yaml"]
    for path in shipped:
        assert load_analysis_config(path).metrics


def test_wandb_setting_without_wandb_installed_is_a_config_error(trained_run, tmp_path, capsys):
    """As in training: one `error:` line naming the package and the key, exit 2, nothing written."""
    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed")
    monitoring = {"output_dir": str(tmp_path / "out"), "save_to_wandb": True, "wandb": {"project": "p"}}
    config = write_config(tmp_path / "w.yaml", tmp_path / "out", steps=[2], monitoring=monitoring)
    assert CLI.main(["--config", str(config), "--run_path", str(trained_run), "--no_report"]) == 2
    err = capsys.readouterr().err
    assert " ".join(err.split()) == (
        "error: monitoring.save_to_wandb is true but the wandb package is not installed: pip install wandb, "
        "or set monitoring.save_to_wandb=false"
    )
    assert not (tmp_path / "out").exists()


# --- pico-train runs ---------------------------------------------------------------------------------------


def make_pico_train_run(trained_run: Path, destination: Path, prefix: str) -> Path:
    """The trained run's states as pico-train wrote them: pickled dicts in `.pt` files, keys under the Fabric
    wrapper's prefix, beside a pico-train training_config.yaml (and nothing else pico-analyze reads)."""
    for step_dir in sorted((trained_run / "checkpoints").glob("step_*")):
        if step_dir.is_symlink():
            continue
        target = destination / "checkpoints" / step_dir.name / "learning_dynamics"
        target.mkdir(parents=True)
        for split in ("train", "val"):
            for data_type, tensors in load_states(step_dir / "learning_dynamics", split).items():
                torch.save(
                    {f"{prefix}{k}": v for k, v in tensors.items()}, target / f"{split}_{data_type}.pt"
                )
    config = yaml.safe_load((trained_run / "training_config.yaml").read_text())
    pico_train_config = {
        "model": {
            "d_model": config["model"]["d_model"],
            "n_layers": 2,
            "attention_n_heads": 4,
            "attention_n_kv_heads": 2,
        },
        "checkpointing": {
            "run_name": "pico-train-run",
            "learning_dynamics": {"layer_suffixes": ["swiglu.w_2"]},
        },
    }
    (destination / "training_config.yaml").write_text(yaml.safe_dump(pico_train_config))
    return destination


@pytest.mark.parametrize(
    "prefix", ["_forward_module.", "_forward_module.module."], ids=["fabric", "deepspeed"]
)
def test_pico_train_run_gives_the_same_results(trained_run, tmp_path, prefix):
    run = make_pico_train_run(trained_run, tmp_path / "pico-train-run", prefix)
    assert not list(run.rglob("*.safetensors"))
    code, ours = analyse(tmp_path, "--run_path", trained_run, steps=[0, 4], name="ours")
    assert code == 0
    code, theirs = analyse(tmp_path, "--run_path", run, steps=[0, 4], name="theirs")
    assert code == 0
    assert read_results(theirs) == read_results(ours)  # keys without the wrapper prefix, identical values


# --- the Hub -----------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:It seems that you are about to commit a data file")
def test_hub_run_is_found_from_commit_titles_and_matches_the_local_analysis(
    trained_run,
    tmp_path,
    fake_hub,  # noqa: F811
):
    from pico_hf.hub.publish import publish_run

    publish_run(trained_run, repo_id="fake-user/pico-tiny", branch="tiny", out=io.StringIO())
    titles = fake_hub.titles("fake-user/pico-tiny", "tiny")
    assert "Saving Learning Dynamics Data (val) -- Step 6" in titles
    first = len(fake_hub.requests)

    code, hub = analyse(tmp_path, "--repo_id", "fake-user/pico-tiny", "--branch", "tiny", name="hub")
    assert code == 0
    code, local = analyse(tmp_path, "--run_path", trained_run, name="local")
    assert code == 0
    hub_results = read_results(hub)
    assert sorted(hub_results) == [0, 2, 4, 6]  # no `steps`: every step of the branch's commit titles
    assert hub_results == read_results(local)

    # Only the states the metrics read were downloaded: no samples, no model, no per-checkpoint metrics.
    # Stored files come from the CAS (a reconstruction per file, named by its Xet hash), the rest by path.
    paths_of = {}
    for commit in fake_hub.commits("fake-user/pico-tiny", "tiny"):
        for path in commit.lfs:
            sha256 = hashlib.sha256(commit.files[path]).hexdigest()
            paths_of.setdefault(fake_hub.xet_hashes[sha256], set()).add(path)
    downloaded = set()
    for _, path, _ in fake_hub.requests[first:]:
        if "/resolve/" in path:
            downloaded.add(path.split("/resolve/", 1)[1].split("/", 1)[1])
        elif "/cas/v1/reconstructions/" in path:
            downloaded |= paths_of[path.rsplit("/", 1)[1]]
    assert downloaded == {
        "training_config.yaml",
        *(
            f"learning_dynamics/{split}_{kind}.safetensors"
            for split in ("train", "val")
            for kind in ("activations", "weights", "gradients")
        ),
    } - {"learning_dynamics/train_activations.safetensors"}


def test_hub_mode_refuses_offline(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = write_config(tmp_path / "a.yaml", tmp_path / "out")
    assert CLI.main(["--config", str(config), "--repo_id", "a/b", "--branch", "c"]) == 1
    assert "Hub access is switched off" in capsys.readouterr().err


def test_cli_needs_one_run_location(tmp_path, capsys):
    config = write_config(tmp_path / "a.yaml", tmp_path / "out")
    for location in (
        [],
        ["--repo_id", "a/b"],
        ["--run_path", str(tmp_path), "--repo_id", "a/b", "--branch", "c"],
    ):
        with pytest.raises(SystemExit) as exit_info:
            CLI.main(["--config", str(config), *location])
        assert exit_info.value.code == 2


# --- plots and report --------------------------------------------------------------------------------------


def assert_png(path: Path, min_bytes: int = 5000) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    assert len(data) > min_bytes, (path, len(data))
    with Image.open(path) as image:
        assert image.width > 400 and image.height > 300


def test_report_and_plots(trained_run, tmp_path):
    code, out = analyse(tmp_path, "--run_path", trained_run, steps=[0, 2, 4, 6], report=True)
    assert code == 0
    for stem in STEMS:
        assert_png(out / "plots" / f"{stem}.png")
    md = (out / "report.md").read_text()
    for stem in STEMS:
        assert f"![{stem}](plots/{stem}.png)" in md
    assert f"- **source**: run {trained_run}" in md
    assert "| norm_nuclear_val | norm | norm_type=nuclear | val | - |" in md
    assert "Values at step 6:" in md and "Values at step 4:" in md  # train splits end at step 4
    # CKA compares every step with step 6: its plot and its table say so (at step 6 itself it is 1).
    cka = md[md.index("### cka_val") :].split("\n### ", 1)[0]
    assert "| component | value vs step 6 |" in cka
    assert "| component | value |" in md[md.index("### norm_nuclear_val") :]
    with Image.open(out / "plots" / "cka_val.png") as image:
        assert image.info["Title"] == "cka_val, compared with step 6"
    with Image.open(out / "plots" / "norm_nuclear_val.png") as image:
        assert image.info["Title"] == "norm_nuclear_val"
    last = json.loads((out / "step_6" / "norm_frobenius_val.json").read_text())
    assert f"| layers.1.ov_circuit.weights | {last['layers.1.ov_circuit.weights']:.6g} |" in md
    # The run's training curves (logs/metrics.jsonl), one plot each.
    curves = read_training_curves(trained_run / "logs" / "metrics.jsonl")
    assert {"loss", "learning_rate", "grad_norm"} <= curves.keys()
    assert f"### loss\n\n![loss](plots/train_loss.png)\n\n{len(curves['loss'])} logged steps" in md
    assert_png(out / "plots" / "train_loss.png")
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == len(STEMS) + len(curves)  # self-contained


def test_report_plots_the_runs_evaluation_results_against_step(trained_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained_run, run, symlinks=True)
    results = run / "eval_results"
    results.mkdir()
    for step, perplexity, acc in [(0, 900.0, 0.2), (2, 450.0, 0.25), (4, 300.5, 0.5)]:
        values = {
            "embedded_heldout_perplexity": perplexity,
            "dataset": "embedded",
            "pico_arc_easy": {"acc": acc},
        }
        (results / f"step_{step}.json").write_text(json.dumps(values))
    code, out = analyse(tmp_path, "--run_path", run, steps=[0, 2, 4], report=True)
    assert code == 0
    assert_png(out / "plots" / "eval_embedded_heldout_perplexity.png")
    assert_png(out / "plots" / "eval_pico_arc_easy_acc.png")
    md = (out / "report.md").read_text()
    section = md[md.index("## Evaluation") :]
    assert "### embedded_heldout_perplexity (embedded)" in section
    assert "![embedded_heldout_perplexity (embedded)](plots/eval_embedded_heldout_perplexity.png)" in section
    assert "| 0 | 900 |\n| 2 | 450 |\n| 4 | 300.5 |" in section
    assert "### pico_arc_easy/acc\n" in section and "| 4 | 0.5 |" in section
    html = (out / "report.html").read_text()
    curves = read_training_curves(trained_run / "logs" / "metrics.jsonl")
    assert html.count("data:image/png;base64,") == len(STEMS) + 2 + len(curves)
    # A run without eval_results/ has no Evaluation section.
    (tmp_path / "plain").mkdir()
    code, out = analyse(tmp_path / "plain", "--run_path", trained_run, steps=[0], report=True)
    assert code == 0 and "## Evaluation" not in (out / "report.md").read_text()


def test_plot_of_many_layers_and_heads(tmp_path):
    """A pico-decoder-sized OV result: 12 layers x (12 heads + the full circuit), 11 steps."""
    series = {
        step: {
            key: 1.0 + 0.01 * step * (layer + 1) + 0.001 * head
            for layer in range(12)
            for head in range(13)
            for key in [f"layers.{layer}.ov_circuit.weights" + ("" if head == 12 else f".heads.{head}")]
        }
        for step in range(0, 55, 5)
    }
    assert_png(plot_result("per_val", series, tmp_path / "per_val.png"))
    rows = last_step_rows(series[50])
    assert len(rows) == 24  # per layer: the full circuit and one summary row for its heads
    assert rows[1][0] == "layers.0.ov_circuit.weights.heads.* (12 heads)"
    assert parse_key("layers.3.ov_circuit.weights.heads.5").layer == 3


def test_library_logs_warnings_to_the_analysis_log(trained_run, tmp_path, caplog):
    config = parse_analysis_config(
        {
            "analysis_name": "lib",
            "metrics": METRICS,
            "steps": [4, 5],
            "monitoring": {"output_dir": str(tmp_path)},
        }
    )
    with caplog.at_level(logging.WARNING, logger="pico_hf.analyze"):
        result = run_analysis(config, LocalRun(trained_run))
    assert result.steps == [4]
    assert [s.step for s in result.skipped] == [5, 5]
    assert "step 5, split 'val'" in caplog.text
    assert not math.isnan(result.results["cka_val"][4]["layers.0.ov_circuit.activations"])
    with pytest.raises(AnalysisError, match="Nothing could be analysed"):
        run_analysis(
            parse_analysis_config(
                {**{"metrics": METRICS, "steps": [7]}, "monitoring": {"output_dir": str(tmp_path)}}
            ),
            LocalRun(trained_run),
        )


# --- a new analysis never mixes with an old one; suffix typos are config errors; one summary per kind ----


def test_an_existing_analysis_is_replaced_only_with_overwrite(trained_run, tmp_path, capsys):
    code, out = analyse(tmp_path, "--run_path", trained_run, steps=[2, 4])
    assert code == 0 and sorted(read_results(out)) == [2, 4]
    (out / "stale.txt").write_text("from an older analysis")
    code, _ = analyse(tmp_path, "--run_path", trained_run, steps=[4])
    assert code == 1
    assert f"{out} already holds an analysis; pass --overwrite to replace it" in capsys.readouterr().err
    assert sorted(read_results(out)) == [2, 4] and (out / "stale.txt").exists()  # refused: untouched
    config = write_config(tmp_path / "again.yaml", tmp_path / "out", steps=[4])
    assert (
        CLI.main(["--config", str(config), "--run_path", str(trained_run), "--no_report", "--overwrite"]) == 0
    )
    assert sorted(read_results(out)) == [4] and not (out / "stale.txt").exists()
    assert capsys.readouterr().out.strip().splitlines() == [str(out)]  # the folder, once


def test_a_suffix_that_matches_no_module_is_a_config_error(trained_run, tmp_path, capsys):
    metrics = [
        {"metric_name": "hoyer", "data_split": "train", "components": [simple("gradients", "swiglu.w2")]}
    ]
    code, _ = analyse(tmp_path, "--run_path", trained_run, metrics=metrics, steps=[2, 4])
    assert code == 2
    err = capsys.readouterr().err
    assert "metric hoyer_train: layer_suffixes 'swiglu.w2' matches no module of the run; did you mean " in err
    assert "'swiglu.w_2'" in err and "attention.v_proj" in err
    assert err.count("not computed") == 0


def test_the_console_summary_is_per_component_kind(trained_run, tmp_path, capsys):
    metrics = [
        {"metric_name": "norm", "norm_type": "nuclear", "data_split": "val", "components": [ov("weights")]}
    ]
    code, out = analyse(tmp_path, "--run_path", trained_run, metrics=metrics, steps=[2])
    assert code == 0
    values = read_results(out)[2]["norm_nuclear_val"]
    heads = [v for k, v in values.items() if ".heads." in k]
    whole = [v for k, v in values.items() if ".heads." not in k]
    line = next(line for line in capsys.readouterr().err.splitlines() if "step 2:" in line)
    assert f"norm_nuclear_val ov_circuit.weights.heads mean {sum(heads) / len(heads):.4g}" in line
    assert f"norm_nuclear_val ov_circuit.weights mean {sum(whole) / len(whole):.4g}" in line
