"""The examples of README.md and docs/ run as written, with small overrides (fewer steps, a local checkpoint for a
Hub id), so the documentation cannot drift from the code. Each example is read from its page: a changed
example is what runs, and a removed one fails here until this file follows."""

import ast
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO

pytestmark = pytest.mark.slow

RUN = "runs/pico-decoder-demo"  # where the README's main job writes, relative to the working directory
STEPS = 2  # the demo's 150 steps, shortened
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def block(page: str, lang: str, containing: str) -> str:
    """The one fenced `lang` block of `page` that contains `containing`."""
    blocks = re.findall(rf"```{lang}\n(.*?)```", (REPO / page).read_text(), re.S)
    found = [b for b in blocks if containing in b]
    assert len(found) == 1, f"{page} has {len(found)} {lang} blocks with {containing!r}"
    return found[0]


def command_line(page: str, lang: str, containing: str) -> list[str]:
    """The command of `page` that contains `containing` (continued lines joined, `$ ` and comments dropped)."""
    text = block(page, lang, containing).replace("\\\n", " ")
    line = next(line for line in text.splitlines() if containing in line)
    return shlex.split(line.removeprefix("$ "), comments=True)


def run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """A documented command from `cwd`: `python` is this interpreter, recipes/ and eval/ the checkout's."""
    argv = [sys.executable if a == "python" else a for a in argv]
    argv = [str(REPO / a) if a.startswith(("recipes/", "eval/")) else a for a in argv]
    return subprocess.run(argv, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The main job, `python recipes/train.py` (the demo), for 2 steps."""
    work = tmp_path_factory.mktemp("docs")
    argv = command_line("docs/training.md", "bash", "# the demo")
    assert argv == ["python", "recipes/train.py"]
    argv += [f"training.max_steps={STEPS}", f"checkpointing.save_every_n_steps={STEPS}"]
    result = run(argv, work)
    assert result.returncode == 0, result.stderr[-3000:]
    return work, result.stderr + result.stdout


def test_the_main_job_writes_the_documented_run_layout(demo):
    work, output = demo
    assert f"Finished {STEPS} steps" in output and f"run:         {RUN}" in output
    run_dir = work / RUN
    layout = block("README.md", "text", "training_config.yaml            the resolved config")
    checkpoint = run_dir / "checkpoints" / f"step_{STEPS}"
    files = ["config.json", "model.safetensors", "generation_config.json", "configuration_pico_decoder.py",
             "modeling_pico_decoder.py", "tokenizer.json", "tokenizer_config.json"]  # fmt: skip
    for name in files:  # the README's tree names them, and the checkpoint has them
        assert name in layout and (checkpoint / name).is_file(), name
    assert "fabric_state/" in layout and (checkpoint / "fabric_state" / "data_position.json").is_file()
    # Both splits at step 0; the last checkpoint has no next step, so no `train` split (docs/learning-dynamics.md).
    for step, splits in ((0, ("train", "val")), (STEPS, ("val",))):
        dynamics = run_dir / "checkpoints" / f"step_{step}" / "learning_dynamics"
        expected = {
            f"{split}_{kind}.safetensors"
            for split in splits
            for kind in ("activations", "weights", "gradients")
        }
        assert {p.name for p in dynamics.iterdir()} == expected | {f"{split}_data" for split in splits} | {
            "metrics.json"
        }
    assert os.readlink(run_dir / "checkpoints" / "latest") == f"step_{STEPS}"
    assert (run_dir / "training_config.yaml").is_file() and (run_dir / "logs" / "metrics.jsonl").is_file()
    results = json.loads((run_dir / "eval_results" / f"step_{STEPS}.json").read_text())
    assert set(results) == {"embedded_heldout_perplexity", "dataset"} and results["dataset"] == "embedded"


def test_the_readme_analysis_command(demo):
    work, _ = demo
    argv = command_line("README.md", "bash", "python recipes/analyze.py")
    config = argv.index("--config") + 1
    analysis = yaml.safe_load((REPO / argv[config]).read_text())
    analysis["steps"] = [0, STEPS]  # the demo config analyses steps 0 to 150
    for metric in analysis["metrics"]:
        if "target_checkpoint" in metric:
            metric["target_checkpoint"] = STEPS
    (work / "analysis.yaml").write_text(yaml.safe_dump(analysis))
    argv[config] = str(work / "analysis.yaml")
    result = run(argv, work)
    assert result.returncode == 0, result.stderr[-3000:]
    out = work / analysis["monitoring"]["output_dir"] / analysis["analysis_name"]
    assert (out / "step_0" / "per_train.json").is_file() and (
        out / f"step_{STEPS}" / "norm_nuclear_val.json"
    ).is_file()
    assert (out / "report.md").is_file()


def test_the_readme_loading_example(demo):
    work, _ = demo
    code = block("README.md", "python", "AutoModelForCausalLM.from_pretrained")
    code = code.replace(
        '"pico-lm/pico-decoder-small"', f'"{RUN}/checkpoints/step_{STEPS}"'
    )  # the local folder
    code += "\nprint(type(model).__name__, len(tokenizer))\n"
    result = run(["python", "-c", code], work)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["PicoDecoderForCausalLM", "50280"]


def test_the_readme_lm_eval_command(demo):
    work, _ = demo
    argv = command_line("README.md", "bash", "lm_eval --model hf")
    argv = [a.replace("step_150", f"step_{STEPS}") for a in argv]
    include = argv.index("--include_path") + 1  # "$(python -m pico_hf.evaluation.tasks_dir)"
    tasks_dir = run(["python", "-m", "pico_hf.evaluation.tasks_dir"], work).stdout.strip()
    assert argv[include] == "$(python -m pico_hf.evaluation.tasks_dir)" and Path(tasks_dir).is_dir()
    argv[include] = tasks_dir
    argv[argv.index("--limit") + 1] = "4"
    argv[0] = str(Path(sys.executable).with_name("lm_eval"))
    result = run(argv, work)
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"\|pico_arc_easy\s*\|", result.stdout) and re.search(
        r"\|pico_paloma\s*\|", result.stdout
    )


def test_the_learning_dynamics_example(demo):
    work, _ = demo
    code = block("docs/learning-dynamics.md", "python", "compute_metrics([spec], states)")
    code = code.replace("step_100", f"step_{STEPS}")
    result = run(["python", "-c", code], work)
    assert result.returncode == 0, result.stderr[-3000:]
    values = ast.literal_eval(result.stdout)  # the printed {component: value}
    assert sorted(values) == ["layers.0.swiglu.w_2.weights", "layers.11.swiglu.w_2.weights"]
    assert all(0 < v <= 1 for v in values.values())


def test_the_model_page_examples(demo, tmp_path):
    work, _ = demo
    code = block("docs/model.md", "python", 'pipeline("text-generation"')
    code = code.replace('"pico-lm/pico-decoder-small"', f'"{RUN}/checkpoints/step_{STEPS}"')
    code = code.replace("max_new_tokens=20", "max_new_tokens=4")
    result = run(["python", "-c", code], work)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "'generated_text': 'Once upon a time" in result.stdout
    code = block("docs/model.md", "python", "from_preset") + "\nprint(model.num_parameters())\n"
    result = run(["python", "-c", code], work)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{int(result.stdout) / 1e6:.1f}M" == "64.6M"  # the comment's "small 64.6M"
    conversion = block("docs/model.md", "console", "python -m pico_hf.convert to-llama")
    for line in conversion.splitlines():
        if line.startswith("$ "):
            argv = [a.replace("step_150", f"step_{STEPS}") for a in shlex.split(line[2:], comments=True)]
            result = run(argv, work)
            assert result.returncode == 0, result.stderr[-3000:]
    assert (work / "out" / "pico-demo" / "model.safetensors").is_file()


def test_the_hub_dry_run(demo):
    work, _ = demo
    argv = command_line("docs/hub.md", "console", "--repo_id my-user/pico-decoder-demo --dry-run")
    result = run(argv, work)
    assert result.returncode == 0, result.stderr[-3000:]
    documented = block("docs/hub.md", "console", "--repo_id my-user/pico-decoder-demo --dry-run").splitlines()
    assert result.stdout.splitlines()[0].split(" commits ")[1] == documented[1].split(" commits ")[1]
    titles = [line.split("  (")[0].strip() for line in result.stdout.splitlines()[1:4]]
    assert titles == [line.split("  (")[0].strip() for line in documented[2:5]]


@pytest.mark.parametrize("containing", ["training.optimisation.lr=1e-3", "gradient_accumulation_steps=1"])
def test_the_documented_config_errors(containing, tmp_path):
    console = block("docs/training.md", "console", containing).splitlines()
    result = run(shlex.split(console[0].removeprefix("$ ")), tmp_path)
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1] == console[1]


def test_the_training_mode_example():
    code = block("docs/development.md", "python", "@register_mode")
    code += (
        "\nfrom pico_hf.training.config import load_config\n"
        "config, _ = load_config(None, ['training.scaled_loss.enabled=true'])\n"
        "print(config.training.scaled_loss)\n"
    )
    result = run(["python", "-c", code], REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "ScaledLossConfig(enabled=True, scale=2.0)"
