"""Studies: config errors before training, reuse and resume of runs, report numbers from the runs' files, the
paired difference and its interval against scipy, and the shipped quick study end to end."""

import hashlib
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, assert_bitwise_equal, final_weights
from scipy import stats

from pico_hf.study import StudyError, load_study_config, run_state, run_study, write_study_report
from pico_hf.study.config import take_seeds
from pico_hf.study.report import (
    Quantity,
    RunData,
    idle_modes,
    mean_std,
    paired_difference,
    plot_group,
    plot_quantities,
    read_eval_results,
    read_logged_series,
    read_training_log,
)
from pico_hf.training.config import ConfigError
from pico_hf.training.maml import MAMLObjective
from pico_hf.training.modes.maml import MAMLConfig

STUDY_SCRIPT = REPO / "recipes" / "study.py"

# A seconds-long model on the embedded corpus (OLMo tokenizer), with learning dynamics and evaluation.
TINY_BASE = {
    "data": {"dataset": {"name": "embedded"}, "dataloader": {"batch_size": 4}},
    "model": {
        "d_model": 16,
        "n_layers": 2,
        "attention_n_heads": 2,
        "attention_n_kv_heads": 1,
        "activation_hidden_dim": 32,
        "max_seq_len": 32,
    },
    "training": {
        "max_steps": 4,
        "optimization": {"lr": 0.01, "lr_warmup_steps": 1, "gradient_accumulation_steps": 1},
        "fabric": {"accelerator": "cpu", "precision": "32-true"},
    },
    "checkpointing": {
        "save_every_n_steps": 2,
        "learning_dynamics": {
            "layer_suffixes": ["swiglu.w_2"],
            "eval_data": "embedded",
            "eval_max_samples": 4,
            "batch_size": 4,
        },
    },
    "evaluation": {"metrics": []},
    "monitoring": {"logging": {"log_every_n_steps": 1}},
    "training_arguments": {"disable_tqdm": True},
}
TINY_ANALYSIS = {
    "metrics": [
        {
            "metric_name": "cka",
            "target_checkpoint": "final",
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
            "metric_name": "per",
            "data_split": "val",
            "components": [
                {
                    "component_name": "simple",
                    "data_type": data_type,
                    "layer_suffixes": "swiglu.w_2",
                    "layers": [0, 1],
                }
                for data_type in ("weights", "gradients")
            ],
        },
    ]
}


def write_study(tmp_path, **changes):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(TINY_BASE))
    study = {
        "name": "tiny",
        "base_config": "base.yaml",
        "variants": {"baseline": {}, "eps": {"model.norm_eps": 0.01}},
        "seeds": 2,
        "evaluation": {
            "metrics": ["paloma"],
            "paloma": {"dataset_name": "embedded", "max_samples": 4, "max_length": 32},
            "heldout_max_samples": 4,
        },
        "analysis": TINY_ANALYSIS,
    }
    study.update(changes)
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


def load(tmp_path, **changes):
    return load_study_config(write_study(tmp_path, **changes), output_dir=tmp_path / "studies")


# --- config errors, before anything trains -----------------------------------------------------------------


@pytest.mark.parametrize(
    "changes, message",
    [
        (
            {"variants": {"baseline": {}, "typo": {"model.norm_epz": 0.01}}},
            "variant 'typo' (seed 0): Unknown config key 'model.norm_epz'; did you mean 'model.norm_eps'?",
        ),
        (
            {"variants": {"baseline": {}, "bad": ["model.norm_eps"]}},
            "Override 'model.norm_eps' must look like section.key=value",
        ),
        (
            {"variants": {"baseline": {}, "bad": {"model.n_layers": "two"}}},
            "variant 'bad' (seed 0): 'model.n_layers' must be an integer, got 'two'",
        ),
        ({"seeds": 0}, "seeds must be at least 1, got 0"),
        ({"seeds": [1, 1]}, "seeds has repeated seeds: [1, 1]"),
        (
            {"variants": {"baseline": {}, "x": {"training.seed": 3}}},
            "variants.x: 'training.seed' cannot be set here (the study sets it from `seeds`)",
        ),
        (
            {"variants": {"baseline": {}, "x": {"data.dataloader.batch_size": 8}}},
            "variants.x: 'data.dataloader.batch_size' cannot be set here (every variant trains on the same data",
        ),
        (
            {"variants": {"baseline": {}, "x": {"evaluation.metrics": []}}},
            "variants.x: 'evaluation.metrics' cannot be set here",
        ),
        ({"baseline": "nope"}, "baseline 'nope' is not one of the variants ['baseline', 'eps']"),
        ({"variants": {}}, "variants must be a non-empty mapping"),
        ({"evaluation": {"metrics": ["pico_arc_esay"]}}, "evaluation.metrics: Unknown task 'pico_arc_esay'"),
        (
            {"analysis": {"metrics": [{"metric_name": "nope", "data_split": "val"}]}},
            "analysis: metrics[0] (nope)",
        ),
        ({"colour": "red"}, "unknown key(s) ['colour']"),
        (
            {"variants": {"baseline": {}, "long": {"training.max_steps": 8}}},
            "variant 'long': training.max_steps=8 changes the training budget (the baseline 'baseline' has 4); "
            "set `allow_unequal_budget: true` to compare at equal tokens",
        ),
        (
            {"variants": {"baseline": {}, "wide": {"model.max_seq_len": 64}}},
            "variant 'wide': model.max_seq_len=64 changes the training budget",
        ),
        ({"primary": []}, "primary must be a non-empty list of quantity names, got []"),
        ({"contrasts": {"eps": "baseline"}}, "contrasts must be a list of [variant, reference] pairs"),
        ({"contrasts": [["eps"]]}, "contrasts[0] must be a [variant, reference] pair of names, got ['eps']"),
        (
            {"contrasts": [["eps", "nope"]]},
            "contrasts[0] names 'nope', not one of the variants ['baseline', 'eps']",
        ),
        ({"contrasts": [["eps", "eps"]]}, "contrasts[0] compares 'eps' with itself"),
        (
            {
                "variants": {
                    "baseline": {},
                    "eps": {"model.norm_eps": 0.02},
                    "tiny": {"model.norm_eps": 0.5},
                },
                "contrasts": [["eps", "tiny"], ["eps", "tiny"]],
            },
            "contrasts[1] repeats [eps, tiny]",
        ),
        (
            {"contrasts": [["eps", "baseline"]]},
            "contrasts[0]: every variant is already compared with the baseline 'baseline'",
        ),
        (
            {"contrasts": [["baseline", "eps"]]},
            "contrasts[0]: every variant is already compared with the baseline 'baseline'",
        ),
        ({"allow_unequal_budget": "yes"}, "allow_unequal_budget must be true or false, got 'yes'"),
        (
            {"evaluation": {"metrics": [], "heldout_every_n_steps": 0}},
            "evaluation.heldout_every_n_steps must be a positive integer or null, got 0",
        ),
    ],
)
def test_config_errors_name_the_problem(tmp_path, changes, message):
    with pytest.raises(ConfigError) as error:
        load(tmp_path, **changes)
    assert message in str(error.value)
    assert str(tmp_path / "study.yaml") in str(error.value)


def test_recipe_reports_config_errors_before_training(tmp_path, capsys):
    sys.path.insert(0, str(STUDY_SCRIPT.parent))
    try:
        import study as recipe
    finally:
        sys.path.pop(0)
    path = write_study(tmp_path)
    assert recipe.main(["--config", str(path), "--seeds", "0", "--output_dir", str(tmp_path / "out")]) == 2
    assert "error: --seeds must be at least 1, got 0" in capsys.readouterr().err
    path = write_study(tmp_path, variants={"baseline": {}, "eps": {}, "typo": {"model.norm_epz": 1}})
    assert recipe.main(["--config", str(path), "--output_dir", str(tmp_path / "out")]) == 2
    assert "Unknown config key 'model.norm_epz'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing trained, nothing written


def test_quick_overrides_apply_last_and_unequal_budgets_may_be_allowed(tmp_path):
    quick = {"overrides": {"model.norm_eps": 0.5, "training.max_steps": 2}}
    path = write_study(tmp_path, quick=quick)
    study = load_study_config(path, quick=True, output_dir=tmp_path / "studies")
    # The variant sets norm_eps 0.01, --quick 0.5: the quick run trains with --quick's value.
    assert {run.config.model.norm_eps for run in study.runs} == {0.5}
    assert study.quick_overrides == ("model.norm_eps=0.5", "training.max_steps=2")
    assert study.set_keys() == [
        "evaluation.metrics",
        "evaluation.paloma.dataset_name",
        "evaluation.paloma.max_samples",
        "evaluation.paloma.max_length",
        "evaluation.heldout_max_samples",
        "evaluation.heldout_every_n_steps",
        "model.norm_eps",
        "training.max_steps",
    ]
    # Every study logs the shared held-out curve, every 10 steps unless it says otherwise.
    assert {run.config.evaluation.heldout_every_n_steps for run in study.runs} == {10}
    own = load(tmp_path, evaluation={"metrics": [], "heldout_every_n_steps": 3, "paloma": {"max_length": 32}})
    assert own.runs[0].config.evaluation.heldout_every_n_steps == 3
    unequal = load(
        tmp_path,
        allow_unequal_budget=True,
        variants={"baseline": {}, "big": {"data.dataloader.batch_size": 8, "training.max_steps": 2}},
    )
    assert unequal.allow_unequal_budget and unequal.runs[2].config.data.dataloader.batch_size == 8
    assert load(tmp_path).primary == ("eval_heldout_loss",)


def test_runs_seeds_and_overrides(tmp_path):
    study = load(tmp_path, seeds=[7, 3])
    assert [run.name for run in study.runs] == ["baseline_seed7", "baseline_seed3", "eps_seed7", "eps_seed3"]
    eps = study.runs[2]
    assert eps.config.model.norm_eps == 0.01 and eps.config.training.seed == 7
    assert study.runs[0].config.model.norm_eps == 1e-6
    assert eps.run_dir == tmp_path / "studies" / "tiny" / "runs" / "eps_seed7"
    # Identical evaluation for every run, from the study's `evaluation` section.
    assert {tuple(r.config.evaluation.metrics) for r in study.runs} == {("paloma",)}
    assert {r.config.evaluation.paloma.max_samples for r in study.runs} == {4}
    assert take_seeds([7, 3], 1) == [7] and take_seeds([7, 3], 4) == [7, 3, 8, 9]
    assert load_study_config(write_study(tmp_path), seeds=3).seeds == (0, 1, 2)
    # A training mode is one more variant: its keys are checked like any other.
    maml = load(tmp_path, variants={"baseline": {}, "maml": {"training.maml.enabled": True}}).runs[2]
    assert maml.config.training.maml.enabled and maml.variant == "maml"
    # The analysis' `final` target is each run's last step.
    cka = study.analysis_for(eps).metrics[0]
    assert cka.target_checkpoint == 4


# --- statistics ---------------------------------------------------------------------------------------------


def test_paired_difference_matches_scipy_and_the_formula():
    baseline = {0: 3.10, 1: 3.40, 2: 2.95, 3: 3.22}
    variant = {0: 3.00, 1: 3.41, 2: 2.70, 3: 3.05, 9: 100.0}  # seed 9 has no baseline: not paired
    result = paired_difference(variant, baseline, confidence=0.9)
    differences = [variant[s] - baseline[s] for s in range(4)]
    interval = stats.ttest_rel(
        [variant[s] for s in range(4)], [baseline[s] for s in range(4)]
    ).confidence_interval(0.9)
    assert result.n == 4
    assert result.mean == pytest.approx(sum(differences) / 4)
    assert (result.low, result.high) == pytest.approx((interval.low, interval.high))
    # By hand: t_{0.95, 3} = 2.353363434801823.
    mean = sum(differences) / 4
    sd = math.sqrt(sum((d - mean) ** 2 for d in differences) / 3)
    assert result.high - mean == pytest.approx(2.353363434801823 * sd / 2)
    one = paired_difference({0: 2.0}, {0: 1.5})
    assert one.mean == 0.5 and one.n == 1 and math.isnan(one.low)
    assert paired_difference({1: 2.0}, {0: 1.5}) is None
    mean, std = mean_std([1.0, 2.0, 4.0])
    assert (mean, std) == pytest.approx((7 / 3, stats.tstd([1.0, 2.0, 4.0])))


def test_readers_take_any_numeric_key_and_the_last_logged_loss(tmp_path):
    results = tmp_path / "eval_results"
    results.mkdir()
    (results / "step_0.json").write_text(json.dumps({"paloma": 12.5, "dataset": "embedded"}))
    (results / "step_10.json").write_text(
        json.dumps({"paloma": 9.0, "blimp": {"acc": 0.61, "note": "x"}, "dataset": "embedded", "ok": True})
    )
    (results / ".step_20.json.tmp").write_text("{")
    series, datasets = read_eval_results(results)
    assert series == {"blimp/acc": {10: 0.61}, "paloma": {0: 12.5, 10: 9.0}}
    assert datasets == {"paloma": "embedded"}  # an lm-eval task's scores are named by their task
    logs = tmp_path / "logs"
    logs.mkdir()
    lines = [
        {"step": 1, "loss": 5.0, "num_input_tokens_seen": 8},
        {"step": 2, "loss": 4.0, "tokens_per_second": 100.0, "num_input_tokens_seen": 16},
        {"step": 2, "eval/paloma": 3.0},
        {"step": 2, "loss": 4.5, "tokens_per_second": 300.0, "num_input_tokens_seen": 16},  # after a resume
    ]
    (logs / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert read_training_log(tmp_path) == ({1: 5.0, 2: 4.5}, [300.0], 16)


def logged_run(tmp_path, spec, training, lines):
    """A RunData read back from a `logs/metrics.jsonl` of `lines`, its saved config's `training` section given."""
    run_dir = tmp_path / spec.name
    (run_dir / "logs").mkdir(parents=True)
    (run_dir / "logs" / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return RunData(spec, "trained", {}, {}, {}, {}, [], 0, None, None,
                   logged=read_logged_series(run_dir), saved_config={"training": training})  # fmt: skip


def maml_log_lines(hybrid_ratio, fall_back=False):
    """The training log lines of 4 steps of 2 groups, as MAMLObjective writes them (each step a log line)."""
    config = MAMLConfig(objective="paper", episode_sequences=2, n_way=3, k_shot=3, hybrid_ratio=hybrid_ratio)
    maml = MAMLObjective(config, d_model=8, vocab_size=32, mask_token=1, seed=0, global_batch=4)
    lines = []
    for step in range(4):
        maml.begin_step(step)
        if fall_back:  # one token in every sequence: no group has the 3 distinct tokens of an episode
            for group, chosen in enumerate(maml.meta_groups):
                assert chosen and maml._episode(torch.full((2, 16), 5), group) is None
        maml.end_step(torch.device("cpu"))
        logs = {"loss": 3.0}
        maml.update_log(logs)
        lines.append({"step": step + 1, **logs})
    return lines


def test_idle_modes_flag_relora_without_merge_and_maml_without_meta_group(tmp_path):
    runs = load(tmp_path).runs
    relora = {"max_steps": 40, "relora": {"enabled": True, "warm_start_steps": 10, "reset_frequency": 50}}
    merged = [{"step": 20, "loss": 3.0}, {"step": 20, "relora/resets": 1, "relora/fraction_zeroed": 0.99}]
    maml = {"max_steps": 4, "maml": {"enabled": True}}
    assert idle_modes([logged_run(tmp_path / "a", runs[0], relora, merged)]) == []
    assert idle_modes([logged_run(tmp_path / "b", runs[0], relora, merged[:1])]) == [
        "baseline_seed0: ReLoRA never merged in 40 steps (warm start 10, a merge every 50 steps): it trained as "
        "LoRA adapters, not ReLoRA"
    ]
    some_meta = maml_log_lines(0.5)
    assert 0 < some_meta[-1]["maml/meta_groups"] < 8  # the seed chooses some groups of the 8, not all
    assert idle_modes([logged_run(tmp_path / "c", runs[1], maml, some_meta)]) == []
    assert idle_modes([logged_run(tmp_path / "d", runs[1], maml, maml_log_lines(0.0))]) == [
        "baseline_seed1: MAML trained no meta group (0 chosen, 0 fell back to language modelling): it trained as "
        "the baseline does"
    ]
    assert idle_modes([logged_run(tmp_path / "e", runs[1], maml, maml_log_lines(1.0, fall_back=True))]) == [
        "baseline_seed1: MAML trained no meta group (8 chosen, 8 fell back to language modelling): it trained as "
        "the baseline does"
    ]
    # Neither mode enabled (the baseline), or no saved config (a run that never started): nothing to flag.
    assert (
        idle_modes([logged_run(tmp_path / "f", runs[0], {"max_steps": 4}, [{"step": 1, "loss": 3.0}])]) == []
    )


# --- a tiny real study: reuse, resume, and the report ------------------------------------------------------


def snapshot(root: Path) -> dict[str, tuple[str, int]]:
    """Every file under root: its content hash and modification time."""
    return {
        str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    tmp_path = tmp_path_factory.mktemp("study")
    study = load(tmp_path)
    lines = []
    outcomes, warnings = run_study(study, in_process=True, log=lines.append)
    md, html = write_study_report(study, outcomes, warnings)
    return study, outcomes, warnings, lines, md, html


def test_every_run_trained_with_the_same_data_order_per_seed(tiny_study):
    study, outcomes, warnings, lines, _, _ = tiny_study
    assert [o.status for o in outcomes] == ["trained"] * 4
    assert [line.split(": ")[1] for line in lines[:4]] == [
        "training -> " + str(s.run_dir) for s in study.runs
    ]
    assert warnings == []
    assert all(run_state(spec) == "done" for spec in study.runs)
    for spec in study.runs:
        saved = yaml.safe_load((spec.run_dir / "training_config.yaml").read_text())
        assert saved["training"]["seed"] == spec.seed
        assert saved["model"]["norm_eps"] == (0.01 if spec.variant == "eps" else 1e-6)
        assert sorted(p.name for p in (spec.run_dir / "analysis").glob("step_*")) == [
            "step_0",
            "step_2",
            "step_4",
        ]
    # Same seed: same initial weights and data for both variants (the step-0 checkpoint is identical except
    # for the norm's epsilon, which is not a weight), different seeds: different.
    from safetensors.torch import load_file

    def step0(name):
        return load_file(study.runs_dir / name / "checkpoints" / "step_0" / "model.safetensors")

    assert_bitwise_equal(step0("baseline_seed0"), step0("eps_seed0"))
    a, b = step0("baseline_seed0"), step0("baseline_seed1")
    assert any(not (a[k] == b[k]).all() for k in a)


def _table(md: str, title: str) -> list[list[str]]:
    """The rows of the first Markdown table under `### title`."""
    blocks = md.split(f"### {title}\n", 1)[1].strip("\n").split("\n\n")
    section = next(block for block in blocks if block.startswith("|"))
    return [[c.strip() for c in line.strip("|").split("|")] for line in section.splitlines()[2:]]


@pytest.mark.filterwarnings("ignore:Precision loss occurred")  # scipy, on seeds that agree to float precision
def test_report_numbers_are_the_runs_files(tiny_study):
    study, _, _, _, md_path, html_path = tiny_study
    md = md_path.read_text()
    summary = json.loads((study.study_dir / "summary.json").read_text())

    # Independent readers: the files as written by training and analysis.
    def eval_value(spec, step):
        return json.loads((spec.run_dir / "eval_results" / f"step_{step}.json").read_text())[
            "embedded_heldout_perplexity"
        ]

    def analysis_value(spec, step, stem, key):
        return json.loads((spec.run_dir / "analysis" / f"step_{step}" / f"{stem}.json").read_text())[key]

    def loss_value(spec, step):
        lines = (spec.run_dir / "logs" / "metrics.jsonl").read_text().splitlines()
        return [
            json.loads(x)["loss"]
            for x in lines
            if json.loads(x).get("step") == step and "loss" in json.loads(x)
        ][-1]

    readers = {
        "eval/embedded_heldout_perplexity": eval_value,
        "train/loss": loss_value,
        "cka_val/layers.1.swiglu.w_2.activations": lambda s, n: analysis_value(
            s, n, "cka_val", "layers.1.swiglu.w_2.activations"
        ),
        "per_val/layers.0.swiglu.w_2.gradients": lambda s, n: analysis_value(
            s, n, "per_val", "layers.0.swiglu.w_2.gradients"
        ),
    }
    titles = {
        "eval/embedded_heldout_perplexity": "embedded_heldout_perplexity (embedded)",
        "train/loss": "training loss",
        "cka_val/layers.1.swiglu.w_2.activations": "cka_val: layers.1.swiglu.w_2.activations",
        "per_val/layers.0.swiglu.w_2.gradients": "per_val: layers.0.swiglu.w_2.gradients",
    }
    for name, read in readers.items():
        quantity = summary["quantities"][name]
        steps = [0, 2, 4] if name != "train/loss" else [2, 4]
        assert sorted(map(int, quantity["steps"])) == steps, name
        rows = _table(md, titles[name])
        assert len(rows) == len(steps) * 2
        for step in steps:
            by_variant = {
                v: {s.seed: read(s, step) for s in study.runs if s.variant == v} for v in ("baseline", "eps")
            }
            for variant, values in by_variant.items():
                cell = quantity["steps"][str(step)][variant]
                assert cell["values"] == {str(seed): value for seed, value in values.items()}
                mean = sum(values.values()) / 2
                std = stats.tstd(list(values.values()))
                assert cell["mean"] == pytest.approx(mean) and cell["std"] == pytest.approx(std)
                row = next(r for r in rows if r[0] == str(step) and r[1] == variant)
                assert row[2:5] == ["2", f"{mean:.5g}", f"{std:.5g}"]
            differences = [by_variant["eps"][s] - by_variant["baseline"][s] for s in (0, 1)]
            interval = stats.ttest_rel(
                [by_variant["eps"][s] for s in (0, 1)], [by_variant["baseline"][s] for s in (0, 1)]
            ).confidence_interval(0.95)
            difference = quantity["steps"][str(step)]["eps"]["difference"]
            assert difference["mean"] == pytest.approx(sum(differences) / 2)
            if differences[0] != differences[1]:
                assert (difference["low"], difference["high"]) == pytest.approx((interval.low, interval.high))
            row = next(r for r in rows if r[0] == str(step) and r[1] == "eps")
            assert row[5].startswith(f"{sum(differences) / 2:.5g} [")

    # The verdict table comes first; with 2 seeds it says that no verdict is possible.
    assert md.index("## Verdicts") < md.index("## Configuration") < md.index("## Exploratory")
    assert "- **power**: With 2 seed(s) no verdict is possible" in md.split("## Verdicts")[0]

    def heldout(spec):
        return json.loads((spec.run_dir / "eval_results" / "heldout_loss.json").read_text())

    assert heldout(study.runs[0])["loss"].keys() == {"0", "4"}  # step 0 and the last step (every 10)
    assert heldout(study.runs[0])["texts"] == 4 and heldout(study.runs[0])["dataset"] == "embedded"
    (verdict,) = summary["verdicts"]
    base = [heldout(s)["loss"]["4"] for s in study.runs[:2]]
    mine = [heldout(s)["loss"]["4"] for s in study.runs[2:]]
    reference = stats.ttest_rel(mine, base)
    assert verdict["variant"] == "eps" and verdict["metric"] == "eval_heldout_loss" and verdict["step"] == 4
    assert verdict["baseline_mean"] == pytest.approx(sum(base) / 2)
    assert verdict["variant_mean"] == pytest.approx(sum(mine) / 2)
    assert verdict["p"] == pytest.approx(reference.pvalue) and verdict["p_holm"] == verdict["p"]
    assert verdict["verdict"] == "too few seeds"
    (row,) = _table(md.replace("## Verdicts", "### Verdicts"), "Verdicts")
    assert row[:5] == ["eps", "eval_heldout_loss", "step 4", f"{sum(base) / 2:.5g}", f"{sum(mine) / 2:.5g}"]
    assert row[-1] == "**too few seeds**"
    # The configuration table: each run's effective values, from its training_config.yaml.
    config_table = _table(md, "Effective configuration")
    norm = next(r for r in config_table if r[0] == "model.norm_eps")
    assert norm[1:] == ["1e-06", "1e-06", "0.01", "0.01"]
    heldout_row = next(r for r in config_table if r[0] == "evaluation.heldout_every_n_steps")
    assert heldout_row[1:] == ["10"] * 4
    assert "Exploratory: " in md and " intervals below exclude 0, where chance alone would give about " in md

    # Wall time and tokens/s per run come from study_timing.json and metrics.jsonl.
    for run in summary["runs"]:
        timing = json.loads((Path(run["run_dir"]) / "study_timing.json").read_text())
        assert run["wall_seconds"] == pytest.approx(sum(a["seconds"] for a in timing["attempts"]))
        assert run["tokens"] == 4 * 4 * 32

    # Structure: sections, plots and a self-contained page.
    for heading in ("## Variants", "## Runs", "## Training loss", "## Evaluation", "## Learning dynamics"):
        assert heading in md
    plots = sorted(p.name for p in (study.study_dir / "plots").glob("*.png"))
    assert plots == [
        "cka_val.png",
        "cross_cka_val.png",  # the variant's activations against the baseline's
        "eval_embedded_heldout_perplexity.png",
        "eval_heldout_loss.png",
        "per_val.png",
        "train_loss.png",
        "training_series.png",  # learning rate and grad norm
    ]
    page = html_path.read_text()
    assert page.count('src="data:image/png;base64,') == 7

    # Cross-run CKA: each eps run's stored activations against its seed's baseline run's, by hand.
    from pico_hf.learning_dynamics.analysis_sources import LocalRun

    def linear_cka(x, y):
        x, y = x - x.mean(0), y - y.mean(0)
        return float((x.T @ y).norm() ** 2 / ((x.T @ x).norm() * (y.T @ y).norm()))

    cross = {(c["seed"], c["step"], c["component"]): c["value"] for c in summary["cross_run"]}
    assert {c["metric"] for c in summary["cross_run"]} == {"cka_val"}
    assert {c["variant"] for c in summary["cross_run"]} == {"eps"}
    for seed in (0, 1):
        for step in (0, 2, 4):
            mine = LocalRun(study.runs_dir / f"eps_seed{seed}").load(step, "val", ["activations"])[
                "activations"
            ]
            base = LocalRun(study.runs_dir / f"baseline_seed{seed}").load(step, "val", ["activations"])[
                "activations"
            ]
            for layer in (0, 1):
                name = next(k for k in mine if f"layers.{layer}.swiglu.w_2" in k)
                expected = linear_cka(mine[name].double(), base[name].double())
                assert cross[(seed, step, f"layers.{layer}.swiglu.w_2.activations")] == pytest.approx(
                    expected, rel=1e-5
                )
    assert "## Cross-run learning dynamics" in md
    assert not re.search(r'(src|href)="(?!data:)', page)
    assert page.count("<details><summary>") == 4  # every run's resolved config


def test_finished_study_is_reused_bitwise(tiny_study):
    study = tiny_study[0]
    before = snapshot(study.runs_dir)
    lines = []
    outcomes, _ = run_study(study, in_process=True, log=lines.append)
    assert [o.status for o in outcomes] == ["reused"] * 4
    assert all("done, reused" in line for line in lines)
    assert snapshot(study.runs_dir) == before


def test_report_only_rewrites_the_report_from_the_files(tiny_study, capsys):
    study = tiny_study[0]
    sys.path.insert(0, str(STUDY_SCRIPT.parent))
    try:
        import study as recipe
    finally:
        sys.path.pop(0)
    before = snapshot(study.runs_dir)
    summary = json.loads((study.study_dir / "summary.json").read_text())
    (study.study_dir / "summary.json").unlink()
    argv = ["--config", str(study.path), "--output_dir", str(study.output_dir), "--report_only"]
    assert recipe.main(argv) == 0
    assert "Study tiny: 4 runs; report:" in capsys.readouterr().out
    assert json.loads((study.study_dir / "summary.json").read_text())["quantities"] == summary["quantities"]
    assert snapshot(study.runs_dir) == before


def test_interrupted_study_resumes_the_unfinished_run_only(tiny_study, tmp_path):
    import shutil

    study = tiny_study[0]
    copy = tmp_path / "studies"
    shutil.copytree(study.study_dir.parent, copy, symlinks=True)
    study = load_study_config(study.path, output_dir=copy)
    reference = final_weights(study.runs[3].run_dir)
    # eps_seed1 killed after its step-2 checkpoint: the last checkpoint and evaluation never written.
    run_dir = study.runs[3].run_dir
    shutil.rmtree(run_dir / "checkpoints" / "step_4")
    shutil.rmtree(run_dir / "analysis")
    (run_dir / "eval_results" / "step_4.json").unlink()
    (run_dir / "checkpoints" / "latest").unlink()
    (run_dir / "checkpoints" / "latest").symlink_to("step_2")
    assert run_state(study.runs[3]) == "partial"
    others = {spec.name: snapshot(spec.run_dir) for spec in study.runs[:3]}

    lines = []
    outcomes, _ = run_study(study, in_process=True, log=lines.append)
    assert [o.status for o in outcomes] == ["reused", "reused", "reused", "resumed"]
    assert "resuming from" in lines[3] and lines[3].endswith("eps_seed1")
    for spec in study.runs[:3]:
        assert snapshot(spec.run_dir) == others[spec.name]
    assert_bitwise_equal(final_weights(run_dir), reference)  # resumed exactly
    heldout = run_dir / "eval_results" / "heldout_loss.json"
    original = tiny_study[0].runs[3].run_dir / "eval_results" / "heldout_loss.json"
    assert heldout.read_text() == original.read_text()  # the held-out curve too, to the last digit
    attempts = json.loads((run_dir / "study_timing.json").read_text())["attempts"]
    assert attempts[-1]["resumed_from"].endswith("step_2") and attempts[-1]["completed"]
    assert (run_dir / "analysis" / "step_4").is_dir()


def test_a_run_folder_from_another_config_is_an_error(tiny_study, tmp_path):
    import shutil

    study = tiny_study[0]
    copy = tmp_path / "studies"
    shutil.copytree(study.study_dir.parent, copy, symlinks=True)
    path = write_study(tmp_path, variants={"baseline": {}, "eps": {"model.norm_eps": 0.02}})
    changed = load_study_config(path, output_dir=copy)
    with pytest.raises(
        StudyError, match=r"eps_seed0 was trained with a different config .* variant 'eps', seed 0"
    ):
        run_study(changed, in_process=True, log=lambda line: None)


def test_an_evaluation_groups_sub_tasks_share_one_figure(tmp_path):
    def quantity(name: str, kind: str = "evaluation") -> Quantity:
        series = {v: {s: {0: 0.5 + s / 10, 10: 0.6 + s / 10} for s in (0, 1)} for v in ("baseline", "v")}
        return Quantity(name, name, kind, series, [0, 10])

    quantities = [
        quantity("eval/blimp/acc"),
        quantity("eval/blimp_wh_vs_that_no_gap/acc"),
        quantity("eval/blimp_wh_vs_that_no_gap_long_distance/acc"),  # its name extends a sub-task's
        quantity("eval/embedded_heldout_perplexity"),
        quantity("eval/heldout_loss"),
        quantity("cka_val/layers.0.mlp", "learning dynamics"),
        quantity("cka_val/layers.11.mlp", "learning dynamics"),
    ]
    names = {q.name for q in quantities}
    assert [plot_group(q, names) for q in quantities] == [
        "eval/blimp/acc",
        "eval/blimp_*/acc",
        "eval/blimp_*/acc",
        "eval/embedded_heldout_perplexity",
        "eval/heldout_loss",
        "cka_val",
        "cka_val",
    ]
    (tmp_path / "plots").mkdir()
    paths = plot_quantities(quantities, ["baseline", "v"], tmp_path / "plots", "baseline")
    assert {group: path.name for group, path in paths.items()} == {
        "eval/blimp/acc": "eval_blimp_acc.png",
        "eval/blimp_*/acc": "eval_blimp_subtasks_acc.png",
        "eval/embedded_heldout_perplexity": "eval_embedded_heldout_perplexity.png",
        "eval/heldout_loss": "eval_heldout_loss.png",
        "cka_val": "cka_val.png",
    }
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == sorted(p.name for p in paths.values())


# --- the shipped quick study, end to end -------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    ("study", "variants"),
    [
        ("norm-eps", ["eps-1"]),
        ("relora-vs-baseline", ["relora", "full-rank-jagged"]),
        ("maml-vs-baseline", ["maml"]),
    ],
)
def test_shipped_quick_studies_end_to_end(tmp_path, study, variants):
    config = REPO / "recipes" / "configs" / "studies" / f"{study}.yaml"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(STUDY_SCRIPT), "--config", str(config), "--quick", "--output_dir", "out"]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    study_dir = tmp_path / "out" / f"{study}-quick"
    md = (study_dir / "report.md").read_text()
    summary = json.loads((study_dir / "summary.json").read_text())
    assert [(r["variant"], r["seed"]) for r in summary["runs"]] == [
        (variant, seed) for variant in ["baseline", *variants] for seed in (0, 1)
    ]
    kinds = {q["kind"] for q in summary["quantities"].values()}
    assert kinds == {"training", "evaluation", "learning dynamics"}
    stems = {
        name.split("/")[0] for name, q in summary["quantities"].items() if q["kind"] == "learning dynamics"
    }
    assert stems == {"cka_val", "per_train", "condition_number_train", "gini_val", "hoyer_val"}
    # Every number: the runs' files, read here independently.
    checked = 0
    for name, quantity in summary["quantities"].items():
        for step, row in quantity["steps"].items():
            for shown, cell in row.items():
                for seed, value in cell["values"].items():
                    run_dir = study_dir / "runs" / f"{shown}_seed{seed}"
                    if name == "train/loss":
                        lines = [
                            json.loads(x)
                            for x in (run_dir / "logs" / "metrics.jsonl").read_text().splitlines()
                        ]
                        expected = [x["loss"] for x in lines if x["step"] == int(step) and "loss" in x][-1]
                    elif name == "eval/heldout_loss":
                        path = run_dir / "eval_results" / "heldout_loss.json"
                        expected = json.loads(path.read_text())["loss"][step]
                    elif name.startswith("eval/"):  # nested values as a/b: BLiMP's {"blimp": {"acc": ...}}
                        expected = json.loads((run_dir / "eval_results" / f"step_{step}.json").read_text())
                        for part in name[5:].split("/"):
                            expected = expected[part]
                    else:
                        stem, key = name.split("/", 1)
                        expected = json.loads(
                            (run_dir / "analysis" / f"step_{step}" / f"{stem}.json").read_text()
                        )[key]
                    assert value == expected, (name, step, shown, seed)
                    checked += 1
                mean = sum(cell["values"].values()) / len(cell["values"])
                assert cell["mean"] == pytest.approx(mean)
                assert f"| {step} | {shown} | 2 | {mean:.5g} |" in md
    assert checked > 100
    # --quick's settings win over the variant's own: every run trained with them, and ReLoRA merged.
    study_config = load_study_config(config, quick=True, output_dir=tmp_path / "out")
    for spec in study_config.runs:
        saved = yaml.safe_load((spec.run_dir / "training_config.yaml").read_text())
        for override in study_config.quick_overrides:
            key, value = override.split("=", 1)
            node = saved
            for part in key.split("."):
                node = node[part]
            assert node == yaml.safe_load(value), (spec.name, key)
    assert summary["idle_modes"] == []
    if "relora" in variants:
        for seed in (0, 1):
            logged = (study_dir / "runs" / f"relora_seed{seed}" / "logs" / "metrics.jsonl").read_text()
            assert '"relora/resets": 2' in logged  # merges after steps 20 and 35
    if "maml" in variants:
        for seed in (0, 1):
            run_dir = study_dir / "runs" / f"maml_seed{seed}"
            saved = yaml.safe_load((run_dir / "training_config.yaml").read_text())
            assert saved["training"]["maml"]["objective"] == "paper"
            lines = [json.loads(x) for x in (run_dir / "logs" / "metrics.jsonl").read_text().splitlines()]
            last = [x for x in lines if "maml/meta_groups" in x][-1]
            # One group a step, chosen about every other step; --quick's 8-way episodes never fall back.
            assert last["step"] == 40 and last["maml/meta_groups"] >= 10 and last["maml/fallback_groups"] == 0
    page = (study_dir / "report.html").read_text()
    plots = len(list((study_dir / "plots").glob("*.png")))
    assert page.count('src="data:image/png;base64,') == plots >= 7  # loss, evaluation, five dynamics metrics


@pytest.mark.slow
def test_two_process_launch_trains_each_run_on_both_processes(tmp_path):
    path = write_study(tmp_path, seeds=1)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(STUDY_SCRIPT)]
    command = [*launch, "--config", str(path), "--output_dir", str(tmp_path / "out")]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert output.count("= 2 processes x 1 accumulation x 2") == 2  # both runs, in the launched world
    assert output.count("[1/2] baseline_seed0: training") == 1  # the main process speaks for the study
    summary = json.loads((tmp_path / "out" / "tiny" / "summary.json").read_text())
    assert [r["status"] for r in summary["runs"]] == ["trained", "trained"]
    assert "eps" in summary["quantities"]["eval/embedded_heldout_perplexity"]["steps"]["4"]
    assert (
        tmp_path / "out" / "tiny" / "runs" / "eps_seed0" / "analysis" / "step_4" / "per_val.json"
    ).is_file()


@pytest.mark.parametrize(
    "study", sorted(p.stem for p in (REPO / "recipes" / "configs" / "studies").glob("*.yaml"))
)
def test_shipped_study_configs_build_every_run(study, tmp_path):
    path = REPO / "recipes" / "configs" / "studies" / f"{study}.yaml"
    forms = [False] if study.endswith("-tiny") else [False, True]  # the GPU-sized studies have no quick form
    for quick in forms:
        config = load_study_config(path, quick=quick, output_dir=tmp_path)
        variants = {run.variant for run in config.runs}
        arms = 3 if study.startswith("relora-vs-baseline") else 2  # + full rank on ReLoRA's schedule
        # Pico's case studies run 4 seeds (their --quick forms 2): enough for a verdict, not only a hint.
        seeds = 4 if study in ("relora-vs-baseline", "maml-vs-baseline") and not quick else 2
        assert len(variants) == arms and len(config.runs) == seeds * arms, config.runs
        for run in config.runs:
            mode = run.config.training.relora.enabled or run.config.training.maml.enabled
            assert mode == (run.variant not in ("baseline", "full-rank-jagged")) or study == "norm-eps"
            relora = run.config.training.relora
            if quick and relora.enabled:  # --quick's schedule, not the variant's: the quick runs merge
                from pico_hf.training.relora import is_reset_step

                assert (relora.reset_frequency, relora.warm_start_steps) == (15, 5)
                steps = run.config.training.max_steps
                resets = [
                    s
                    for s in range(1, steps + 1)
                    if is_reset_step(
                        s,
                        lora_start=relora.warm_start_steps,
                        reset_frequency=relora.reset_frequency,
                        max_steps=steps,
                    )
                ]
                assert resets == [20, 35]
        if arms == 3:  # the schedule control re-warms at the ReLoRA arm's steps, in the quick form too
            assert config.contrasts == (("relora", "full-rank-jagged"),)
            (relora, *_), (control, *_) = (
                [run.config.training for run in config.runs if run.variant == v]
                for v in ("relora", "full-rank-jagged")
            )
            assert control.optimization.lr_scheduler == "jagged_cosine"
            schedule = control.optimization.jagged_schedule(control.relora)
            assert schedule == {key: getattr(relora.relora, key) for key in schedule}


# --- verdicts of a real study: no effect, a strong effect, too few seeds, a failed run ----------------------


@pytest.mark.slow
def test_verdicts_of_a_small_study(tmp_path):
    """Baseline, a variant that changes nothing the model sees, and a 10x lower learning rate: over 3 seeds the
    first is `no detectable difference` on the held-out loss, the second `worse`; with 2 seeds both are
    `too few seeds`. A variant that fails at run time leaves the others to finish and is reported."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    base = {
        **TINY_BASE,
        "training": {**TINY_BASE["training"], "max_steps": 8},
        "checkpointing": {"save_every_n_steps": 8, "learning_dynamics": {"layer_suffixes": []}},
    }
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    study_file = tmp_path / "study.yaml"
    study_file.write_text(
        yaml.safe_dump(
            {
                "name": "lr",
                "base_config": "base.yaml",
                "variants": {
                    "baseline": {},
                    "same": {"monitoring.logging.log_every_n_steps": 2},
                    "slow-lr": {"training.optimization.lr": 0.001},
                    "broken": {"model.vocab_size": 1000},  # passes the config checks, not the run's start
                },
                "seeds": 2,
                "contrasts": [["slow-lr", "same"]],  # a verdict of one variant against another
                "evaluation": {
                    "metrics": [],
                    "heldout_every_n_steps": 2,
                    "heldout_max_samples": 8,
                    "paloma": {"dataset_name": "embedded", "max_length": 32},
                },
            },
            sort_keys=False,
        )
    )
    output = tmp_path / "studies"
    two = load_study_config(study_file, output_dir=output)
    outcomes, _ = run_study(two, in_process=True, log=lambda line: None)
    assert [o.status for o in outcomes] == ["trained"] * 6 + ["failed"] * 2
    assert outcomes[-1].exit_status == 1
    assert any("model.vocab_size" in line for line in outcomes[-1].log_tail)
    write_study_report(two, outcomes)

    def reject(constant: str) -> None:
        raise AssertionError(f"summary.json holds {constant}, which JSON does not allow")

    summary = json.loads((two.study_dir / "summary.json").read_text(), parse_constant=reject)
    assert [(v["variant"], v["reference"], v["verdict"]) for v in summary["verdicts"]] == [
        ("same", "baseline", "too few seeds"),
        ("slow-lr", "baseline", "too few seeds"),
        ("slow-lr", "same", "too few seeds"),
    ]
    assert [f["run"] for f in summary["failures"]] == ["broken_seed0", "broken_seed1"]
    md = (two.study_dir / "report.md").read_text()
    assert "- **failure**: Run broken_seed0 failed (exit status 1); its cells are empty." in md
    assert "### Failed: broken_seed1 (exit status 1)" in md

    # --seeds 3 on the finished study trains only the third seed.
    three = load_study_config(study_file, seeds=3, output_dir=output)
    lines = []
    outcomes, _ = run_study(three, in_process=True, log=lines.append)
    statuses = {o.spec.name: o.status for o in outcomes}
    assert [name for name, status in statuses.items() if status == "trained"] == [
        "baseline_seed2",
        "same_seed2",
        "slow-lr_seed2",
    ]
    assert statuses["baseline_seed0"] == statuses["slow-lr_seed1"] == "reused"
    stale = three.study_dir / "plots" / "eval_gone.png"  # a figure the new report no longer draws
    stale.write_bytes(b"")
    write_study_report(three, outcomes)
    assert not stale.exists() and (three.study_dir / "plots" / "train_loss.png").is_file()
    summary = json.loads((three.study_dir / "summary.json").read_text())
    verdicts = {v["variant"]: v for v in summary["verdicts"] if v["reference"] == "baseline"}
    contrast = summary["verdicts"][-1]
    assert verdicts["same"]["verdict"] == "no detectable difference" and verdicts["same"]["difference"] == 0
    assert verdicts["slow-lr"]["verdict"] == "worse", verdicts["slow-lr"]
    # Holm over all three comparisons, the contrast included: the smallest p times 3, the next times 2, ...
    ps = sorted(v["p"] for v in summary["verdicts"])
    expected = [min(1.0, p * (3 - i)) for i, p in enumerate(ps)]
    expected = [max(expected[: i + 1]) for i in range(3)]
    assert sorted(v["p_holm"] for v in summary["verdicts"]) == pytest.approx(expected)
    # slow-lr against `same` (which trains as the baseline does) is slow-lr against the baseline.
    assert contrast["variant"] == "slow-lr" and contrast["reference"] == "same"
    assert contrast["difference"] == pytest.approx(verdicts["slow-lr"]["difference"])
    assert contrast["verdict"] == "worse"
    md = (three.study_dir / "report.md").read_text()
    assert "| slow-lr vs same | eval_heldout_loss | step 8 |" in md
    losses = {
        spec.name: json.loads((spec.run_dir / "eval_results" / "heldout_loss.json").read_text())["loss"]["8"]
        for spec in three.runs
        if spec.variant != "broken"
    }
    reference = stats.ttest_rel(
        [losses[f"slow-lr_seed{s}"] for s in range(3)], [losses[f"baseline_seed{s}"] for s in range(3)]
    )
    assert verdicts["slow-lr"]["p"] == pytest.approx(reference.pvalue)
    # Steps to the baseline's final value: the slow learner does not get there in 8 steps.
    targets = {t["variant"]: t for t in summary["steps_to_target"]}
    assert targets["slow-lr"]["reached_seeds"] == 0 and targets["same"]["ratio"] == pytest.approx(1.0)


@pytest.mark.slow
def test_two_jobs_give_the_numbers_of_one(tmp_path):
    """`--jobs 2` trains two runs at once (each a process with half the threads): summary.json's numbers are
    bitwise those of `--jobs 1`."""
    path = write_study(tmp_path, seeds=1, analysis=None)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // 2))}
    summaries = {}
    for jobs in (1, 2):
        command = [sys.executable, str(STUDY_SCRIPT), "--config", str(path), "--jobs", str(jobs)]
        command += ["--output_dir", str(tmp_path / f"jobs{jobs}")]
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        if jobs == 2:  # both runs' output, each line named
            assert "[baseline_seed0] " in result.stdout and "[eps_seed0] " in result.stdout
        summaries[jobs] = json.loads((tmp_path / f"jobs{jobs}" / "tiny" / "summary.json").read_text())
    assert summaries[2]["quantities"] == summaries[1]["quantities"]
    assert summaries[2]["verdicts"] == summaries[1]["verdicts"]


def test_jobs_with_in_process_training_is_an_error(tmp_path, capsys):
    sys.path.insert(0, str(STUDY_SCRIPT.parent))
    try:
        import study as recipe
    finally:
        sys.path.pop(0)
    path = write_study(tmp_path)
    argv = ["--config", str(path), "--output_dir", str(tmp_path / "out"), "--jobs", "2", "--in_process"]
    assert recipe.main(argv) == 2
    assert capsys.readouterr().err == (
        "error: --jobs runs each run in a process of its own: it cannot be combined with --in_process or a "
        "multi-process launch (where every process trains each run)\n"
    )
    assert recipe.main([*argv[:-2], "0"]) == 2
    assert "error: --jobs must be at least 1, got 0" in capsys.readouterr().err


@pytest.mark.slow
def test_a_killed_two_job_study_resumes_both_runs(tmp_path):
    """The whole `--jobs 2` study killed (SIGKILL) while both runs train; started again, both resume from
    their latest checkpoints and the study completes."""
    import signal
    import time

    base = {**TINY_BASE, "training": {**TINY_BASE["training"], "max_steps": 40}}
    base["checkpointing"] = {**TINY_BASE["checkpointing"], "learning_dynamics": {"layer_suffixes": []}}
    path = write_study(tmp_path, seeds=1, analysis=None)
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))  # in place of the TINY_BASE write_study wrote
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(STUDY_SCRIPT), "--config", str(path), "--jobs", "2"]
    command += ["--output_dir", str(tmp_path / "out")]
    runs = tmp_path / "out" / "tiny" / "runs"
    study = subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.monotonic() + 600
    while not all(
        (runs / name / "checkpoints" / "step_4").is_dir() for name in ("baseline_seed0", "eps_seed0")
    ):
        assert study.poll() is None and time.monotonic() < deadline, (
            "the study ended before it could be killed"
        )
        time.sleep(0.2)
    os.killpg(study.pid, signal.SIGKILL)
    study.wait()
    for name in ("baseline_seed0", "eps_seed0"):
        assert not (runs / name / "checkpoints" / "step_40").exists()

    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert re.search(r"\[1/2\] baseline_seed0: resuming from .*step_\d+ ->", result.stdout)
    assert re.search(r"\[2/2\] eps_seed0: resuming from .*step_\d+ ->", result.stdout)
    summary = json.loads((tmp_path / "out" / "tiny" / "summary.json").read_text())
    assert [r["status"] for r in summary["runs"]] == ["resumed", "resumed"]
    assert all(
        run_state(spec) == "done" for spec in load_study_config(path, output_dir=tmp_path / "out").runs
    )
