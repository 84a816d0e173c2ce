"""A plain (non-editable) `pip install` of pico-hf carries the `pico_*` lm-eval tasks and their offline data:
`eval/run.py`, `lm_eval --include_path` and the in-training evaluation find them from outside the checkout."""

import json
import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, olmo_vocab_config, tiny_training_overrides

from pico_hf import PicoDecoderForCausalLM
from pico_hf.tokenization import load_tokenizer

TASKS = "pico_paloma,pico_arc_easy,pico_blimp_adjunct_island"
# What a checkout has but an installed package must not need (nor ship).
NOT_SHIPPED = (".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "runs", "tests", "benchmarks")


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A fresh venv with `pip install --no-deps` of a copy of the checkout; its dependencies come from this
    interpreter's site-packages through a `.pth` line (which adds the folder but runs none of its `.pth`
    files, so the editable install of the checkout is not seen)."""
    root = tmp_path_factory.mktemp("install")
    source = root / "source"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(*NOT_SHIPPED))
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    venv_site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    with open(os.path.join(venv_site, "dependencies.pth"), "w") as pth:
        pth.write("\n".join(site.getsitepackages()) + "\n")
    # Built by this interpreter's setuptools (the `dev` extra), offline: no build isolation, no index.
    install = [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps"]
    install += ["--no-index"]
    result = subprocess.run(
        [*install, "--no-build-isolation", "--no-cache-dir", str(source)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    shutil.rmtree(source)  # nothing may read the copy it was installed from
    return python


def run(python, *args, cwd):
    result = subprocess.run(
        [str(python), *args],
        capture_output=True, text=True, timeout=900, cwd=cwd,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": ""},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result.stdout


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    config = olmo_vocab_config(
        d_model=16, n_layers=1, attention_n_heads=2, attention_n_kv_heads=1, activation_hidden_dim=32,
        max_seq_len=128,
    )  # fmt: skip
    path = tmp_path_factory.mktemp("ckpt") / "pico"
    PicoDecoderForCausalLM(config).eval().save_pretrained(path)
    load_tokenizer().save_pretrained(path)
    return path


@pytest.mark.slow
def test_installed_package_ships_the_tasks(installed, tmp_path):
    venv = installed.parents[1]
    package = run(installed, "-c", "import pico_hf; print(pico_hf.__file__)", cwd=tmp_path).strip()
    assert package.startswith(str(venv)), package
    tasks_dir = run(installed, "-m", "pico_hf.evaluation.tasks_dir", cwd=tmp_path).strip()
    assert tasks_dir.startswith(str(venv)), tasks_dir
    shipped = sorted(str(path.relative_to(tasks_dir)) for path in Path(tasks_dir).rglob("*"))
    ours = sorted(
        str(path.relative_to(REPO / "pico_hf" / "evaluation" / "tasks"))
        for path in (REPO / "pico_hf" / "evaluation" / "tasks").rglob("*")
        if "__pycache__" not in path.parts
    )
    assert [name for name in shipped if "__pycache__" not in name] == ours
    data = sorted(path.name for path in (REPO / "pico_hf" / "evaluation" / "data").iterdir())
    assert data == ["NOTICE", "arc_easy_validation.parquet", "blimp.parquet", "hellaswag_validation.parquet"]
    for name in data:
        shipped_file = Path(tasks_dir).parent / "data" / name
        assert shipped_file.read_bytes() == (REPO / "pico_hf" / "evaluation" / "data" / name).read_bytes()


@pytest.mark.slow
def test_run_script_and_lm_eval_find_the_installed_tasks(installed, checkpoint, tmp_path):
    """eval/run.py copied out of the checkout, and lm-eval's own command line with `--include_path` set to
    the installed tasks, score the same numbers (from a directory outside the repository)."""
    script = tmp_path / "elsewhere" / "run.py"
    script.parent.mkdir()
    shutil.copy(REPO / "eval" / "run.py", script)
    out = tmp_path / "run_out"
    run(installed, str(script), "--model", str(checkpoint), "--tasks", TASKS, "--limit", "3",
        "--device", "cpu", "--bootstrap_iters", "0", "--output", str(out), cwd=tmp_path)  # fmt: skip
    ours = json.loads((out / "results.json").read_text())["results"]
    assert set(TASKS.split(",")) <= ours.keys()

    tasks_dir = run(installed, "-m", "pico_hf.evaluation.tasks_dir", cwd=tmp_path).strip()
    run(installed, "-m", "lm_eval", "--model", "hf",
        "--model_args", f"pretrained={checkpoint},trust_remote_code=True", "--include_path", tasks_dir,
        "--tasks", TASKS, "--limit", "3", "--device", "cpu",
        "--output_path", str(tmp_path / "lm_eval_out"), cwd=tmp_path)  # fmt: skip
    (written,) = (tmp_path / "lm_eval_out").rglob("results_*.json")
    theirs = json.loads(written.read_text())["results"]
    for task in TASKS.split(","):
        metrics = [key for key in theirs[task] if key.endswith(",none") and "stderr" not in key]
        assert metrics, theirs[task]
        for key in metrics:
            assert theirs[task][key] == pytest.approx(ours[task][key], rel=1e-5), (task, key)


@pytest.mark.slow
def test_training_evaluation_runs_from_the_installed_package(installed, tmp_path):
    """The in-training evaluation (`evaluation.metrics: [paloma]` on the embedded held-out split) with
    recipes/ copied out of the checkout."""
    shutil.copytree(REPO / "recipes", tmp_path / "elsewhere", ignore=shutil.ignore_patterns("__pycache__"))
    script = tmp_path / "elsewhere" / "train.py"
    overrides = tiny_training_overrides(
        tmp_path,
        **{
            "evaluation.metrics": "[paloma]",
            "evaluation.paloma.dataset_name": "embedded",
            "evaluation.paloma.max_samples": 4,
            "evaluation.paloma.max_length": 16,
        },
    )
    run(installed, str(script), *overrides, cwd=tmp_path)
    results = tmp_path / "runs" / "tiny" / "eval_results"
    assert sorted(path.name for path in results.iterdir()) == [f"step_{n}.json" for n in (0, 2, 4, 6)]
    # The embedded split is recorded under its own name, never as Paloma.
    final = json.loads((results / "step_6.json").read_text())
    assert set(final) == {"embedded_heldout_perplexity", "dataset"} and final["dataset"] == "embedded"
    assert final["embedded_heldout_perplexity"] > 1
