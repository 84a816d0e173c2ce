"""The multi-process path: launch settings, FSDP2 on CPU processes, per-process data reads."""

import pytest
from conftest import tiny_training_overrides

from pico_hf.training.config import load_config
from pico_hf.training.run import training_arguments
from pico_hf.training.trainer import RunLayout


@pytest.mark.parametrize("launcher_precision", ["bf16", "fp16"])
def test_the_pico_config_decides_the_precision(tmp_path, monkeypatch, launcher_precision):
    """An accelerate config's `mixed_precision` (e.g. ddp.yaml's bf16) does not autocast a `32-true` run."""
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", launcher_precision)
    config, _ = load_config(None, tiny_training_overrides(tmp_path))
    args = training_arguments(config, RunLayout(config.run_dir))
    assert args.mixed_precision == "no"
    config, _ = load_config(None, tiny_training_overrides(tmp_path, **{"training_arguments.bf16": "true"}))
    assert training_arguments(config, RunLayout(config.run_dir)).mixed_precision == "bf16"
