"""Configs that say what they do: TrainingArguments the pico config owns, W&B settings, data too small for a
batch, and the device that actually ran."""

import os
import re

import pytest
import torch
import yaml
from conftest import make_pretokenized, train

from pico_hf.training.arguments import check_training_arguments
from pico_hf.training.config import ConfigError, load_config
from pico_hf.training.run import apply_wandb_settings


@pytest.mark.parametrize(
    ("key", "use_instead"),
    [
        ("gradient_accumulation_steps", "training.optimization.gradient_accumulation_steps"),
        ("max_steps", "training.max_steps"),
        ("seed", "training.seed"),
        ("push_to_hub", "checkpointing.save_to_hf"),
        ("hub_model_id", "checkpointing.hf_checkpoint.repo_id"),
        ("output_dir", "checkpointing.runs_dir and checkpointing.run_name"),
    ],
)
def test_training_arguments_owned_by_the_pico_config(key, use_instead):
    with pytest.raises(ConfigError) as error:
        check_training_arguments({key: 1})
    assert (
        str(error.value) == f"'training_arguments.{key}' is set by the pico config: use {use_instead} instead"
    )


@pytest.mark.parametrize("key", ["save_total_limit", "ignore_data_skip", "dataloader_num_workers"])
def test_training_arguments_the_recipe_cannot_honour(key):
    with pytest.raises(ConfigError, match=rf"^'training_arguments.{key}' is not supported: "):
        check_training_arguments({key: 2})


def test_an_owned_training_argument_stops_the_run_before_it_starts(tmp_path):
    with pytest.raises(ConfigError, match=r"use training\.optimization\.gradient_accumulation_steps instead"):
        train(tmp_path, **{"training_arguments.gradient_accumulation_steps": 1})
    assert not (tmp_path / "runs" / "tiny" / "checkpoints").exists()


def test_other_training_arguments_apply(tmp_path):
    train(tmp_path, **{"training.max_steps": 2, "training_arguments.weight_decay": 0.5})
    args = torch.load(
        tmp_path / "runs" / "tiny" / "checkpoints" / "step_2" / "fabric_state" / "training_args.bin",
        weights_only=False,
    )
    assert args.weight_decay == 0.5


def test_wandb_project_and_entity_reach_wandb(monkeypatch):
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    monkeypatch.delenv("WANDB_ENTITY", raising=False)
    config, _ = load_config(
        None,
        ["monitoring.save_to_wandb=true", "monitoring.wandb.project=pico", "monitoring.wandb.entity=lab"],
    )
    apply_wandb_settings(config)
    # transformers' WandbCallback reads these when it starts the W&B run.
    assert (os.environ["WANDB_PROJECT"], os.environ["WANDB_ENTITY"]) == ("pico", "lab")


def test_a_dataset_smaller_than_one_global_batch_is_a_config_error(tmp_path):
    data = make_pretokenized(tmp_path / "small" / "train.parquet", n_rows=3, row_length=33)
    with pytest.raises(ConfigError) as error:
        train(tmp_path, **{"data.dataset.name": str(data)})
    assert str(error.value) == (
        f"Dataset '{data}' holds 6 sequences of 16 tokens, fewer than one global batch "
        "(data.dataloader.batch_size=8): lower the batch size or use a larger dataset"
    )
    assert not (tmp_path / "runs" / "tiny" / "checkpoints" / "step_0").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the notice on a machine without CUDA")
def test_cuda_asked_on_a_machine_without_it_records_what_ran(tmp_path, caplog):
    caplog.set_level("INFO", logger="pico_hf.training")
    overrides = {"training.max_steps": 1, "training.fabric.accelerator": "cuda"}
    train(tmp_path, **overrides, **{"training.fabric.precision": "bf16-mixed"})
    notices = [r.getMessage() for r in caplog.records if "CUDA is not available" in r.getMessage()]
    assert len(notices) == 1
    # One line: what ran instead, and how long a step takes here by a timed forward pass.
    assert re.fullmatch(
        r"Note: training.fabric asks for cuda / bf16-mixed but CUDA is not available: training on cpu / 32-true; "
        r"timed forward passes put a step of 128 tokens at about [\d.]+ s here, the 1 steps at about [\d.]+ s",
        notices[0],
    ), notices[0]
    saved = yaml.safe_load((tmp_path / "runs" / "tiny" / "training_config.yaml").read_text())
    assert saved["training"]["fabric"] == {
        "accelerator": "cpu",
        "precision": "32-true",
        "num_devices": 1,
        "num_nodes": 1,
    }


def test_a_capture_that_cannot_fit_in_memory_is_refused_up_front(tmp_path):
    from pico_hf.training.run import check_capture_fits

    config, _ = load_config(None, [])
    with pytest.raises(ConfigError) as error:
        check_capture_fits(config, needed=3 * 2**30, available=4 * 2**30)
    assert str(error.value) == (
        "Learning-dynamics capture would hold about 3.0 GiB per checkpoint (the `train` split keeps the whole "
        "global batch), more than half of this machine's 4.0 GiB. Shrink data.dataloader.batch_size or "
        "checkpointing.learning_dynamics.layer_suffixes, or turn capture off with "
        "checkpointing.learning_dynamics.layer_suffixes=[]"
    )
    check_capture_fits(config, needed=2 * 2**30, available=4 * 2**30)


def test_capture_size_counts_the_whole_global_batch():
    from pico_hf.models.pico_decoder import PicoDecoderConfig, PicoDecoderForCausalLM
    from pico_hf.training.run import capture_bytes

    config, _ = load_config(None, ["data.dataloader.batch_size=1024", "model.max_seq_len=2048"])
    model = PicoDecoderForCausalLM(
        PicoDecoderConfig(
            d_model=32,
            n_layers=2,
            attention_n_heads=4,
            attention_n_kv_heads=2,
            activation_hidden_dim=64,
            vocab_size=128,
            max_seq_len=2048,
        )
    )
    # ids: 1024 x 2049 int64, twice; per layer v_proj (16 outputs), o_proj (32), w_2 (32) rows, twice.
    ids, rows = 1024 * 2049 * 8 * 2, 1024 * 2 * (16 + 32 + 32) * 4 * 2
    weights = 2 * (32 * 16 + 32 * 32 + 64 * 32) * 4 * 2
    assert capture_bytes(config, model, num_processes=1) == ids + rows + weights


def test_tokens_per_step_before_step_1_and_a_duration_estimate_after_it(tmp_path, caplog, capsys):
    caplog.set_level("INFO", logger="pico_hf.training")
    train(tmp_path, **{"training.max_steps": 3})
    (banner,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Training tiny")]
    assert banner.endswith("global batch 8 = 1 process x 2 accumulation x 4, 128 tokens per step")
    estimates = [line for line in capsys.readouterr().err.splitlines() if line.startswith("Step ")]
    assert len(estimates) == 1
    assert re.fullmatch(
        r"Step 1 took [\d.]+ s: the 2 steps left take about [\d.]+ s at that pace \(checkpoints and evaluation "
        r"not counted\)",
        estimates[0],
    ), estimates[0]


def test_a_gpu_sized_config_on_cpu_gets_one_line_saying_so():
    from pico_hf.training.run import cpu_estimate

    config, _ = load_config(None, ["data.dataloader.batch_size=32", "training.max_steps=100"])
    # pico-train's demo: 32 sequences of 2048 tokens a step; a probe measuring 3.5 minutes a step on CPU.
    assert cpu_estimate(config, 210.0) == (
        "this config is sized for a GPU: timed forward passes put a step of 65,536 tokens at about 4 min here, "
        "the 100 steps at about 5.8 h; for a CPU run lower data.dataloader.batch_size, model.max_seq_len or "
        "training.max_steps"
    )
    assert cpu_estimate(config, 0.5) == (
        "timed forward passes put a step of 65,536 tokens at about 0.5 s here, the 100 steps at about 50 s"
    )


def test_the_timed_probe_leaves_weights_gradients_and_random_state_alone():
    from pico_hf.models.pico_decoder import PicoDecoderConfig, PicoDecoderForCausalLM
    from pico_hf.training.run import probe_step_seconds

    shape = dict(d_model=32, n_layers=2, vocab_size=128, attention_n_heads=4, attention_n_kv_heads=2)
    config, _ = load_config(None, [f"model.{key}={value}" for key, value in shape.items()])
    model = PicoDecoderForCausalLM(PicoDecoderConfig(**shape)).train()
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    rng = torch.get_rng_state()
    assert probe_step_seconds(model, config, micro_batch=4) > 0
    assert model.training and torch.equal(torch.get_rng_state(), rng)
    for name, parameter in model.named_parameters():
        assert parameter.grad is None and torch.equal(parameter, weights[name])
