"""Loading by Hub id from an offline cache, and remote-code loading in a process without pico_hf."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import torch
from conftest import REFERENCE_CHECKPOINT, tiny_config
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from pico_hf import PicoDecoderForCausalLM

EXPECTED = load_file(REFERENCE_CHECKPOINT / "expected.safetensors")


def lay_into_hub_cache(cache_dir, repo_id, files_dir, revision="main"):
    """Place a checkpoint in a huggingface_hub cache exactly as a download would (refs + snapshot)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = cache_dir / f"models--{repo_id.replace('/', '--')}"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / revision).write_text(commit)
    shutil.copytree(files_dir, repo_dir / "snapshots" / commit)


def run_python(code, tmp_path, **env):
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=tmp_path,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_published_model_loads_by_hub_id_offline(tmp_path):
    lay_into_hub_cache(tmp_path / "hub", "pico-lm/pico-decoder-small", REFERENCE_CHECKPOINT)
    out = run_python(
        f"""
        import torch, pico_hf
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained("pico-lm/pico-decoder-small")
        expected = load_file("{REFERENCE_CHECKPOINT / "expected.safetensors"}")
        with torch.no_grad():
            err = (model(expected["input_ids"]).logits - expected["logits"]).abs().max().item()
        print(type(model).__name__, err)
        """,
        tmp_path,
        HF_HUB_CACHE=str(tmp_path / "hub"),
    )
    name, err = out.split()
    assert name == "PicoDecoderForCausalLM"
    assert float(err) < 1e-5


def test_saved_checkpoint_loads_with_remote_code_without_pico_hf(tmp_path):
    model = AutoModelForCausalLM.from_pretrained(REFERENCE_CHECKPOINT)
    model.save_pretrained(tmp_path / "ckpt")
    torch.save(EXPECTED["input_ids"], tmp_path / "ids.pt")
    # A scaled RoPE too: the copied code reads rope_parameters on its own.
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}
    scaled = PicoDecoderForCausalLM(tiny_config(rope_parameters=yarn)).eval()
    scaled.save_pretrained(tmp_path / "scaled")
    ids = torch.randint(0, 128, (2, 40))
    torch.save(ids, tmp_path / "scaled_ids.pt")
    out = run_python(
        """
        import sys, torch
        from transformers import AutoModelForCausalLM
        with torch.no_grad():
            for name, ids in [("ckpt", "ids.pt"), ("scaled", "scaled_ids.pt")]:
                model = AutoModelForCausalLM.from_pretrained(name, trust_remote_code=True)
                torch.save(model(torch.load(ids)).logits, f"{name}_logits.pt")
        print(type(model).__module__.split(".")[0], "pico_hf" in sys.modules)
        """,
        tmp_path,
    )
    assert out.split() == ["transformers_modules", "False"]
    torch.testing.assert_close(torch.load(tmp_path / "ckpt_logits.pt"), EXPECTED["logits"], atol=1e-5, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(torch.load(tmp_path / "scaled_logits.pt"), scaled(ids).logits)
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["model_type"] == "pico_decoder"
