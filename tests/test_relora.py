"""ReLoRA (training.relora): merge-and-reinit, moment pruning, the jagged cosine, checkpoints, resume, learning
dynamics, and the config errors; each checked against an independent computation."""

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import (
    REPO,
    StopAfter,
    assert_bitwise_equal,
    assert_world_size,
    final_weights,
    tiny_config,
    tiny_training_overrides,
    train,
    train_command,
)
from safetensors.torch import load_file
from transformers import TrainerCallback

import pico_hf  # noqa: F401  (registers the Auto classes)
from pico_hf import PicoDecoderForCausalLM
from pico_hf.training.config import ConfigError, load_config
from pico_hf.training.modes.relora import ReLoRAConfig
from pico_hf.training.relora import (
    jagged_cosine,
    lora_layers,
    merge_and_reinit,
    prune_lora_moments,
    wrap_model,
)

# Resets after steps 3 and 6 of an 8-step tiny run (warmup 2 steps, re-warmup 1 step), checkpoints every 2.
RELORA = {
    "training.max_steps": 8,
    "training.relora.enabled": "true",
    "training.relora.r": 2,
    "training.relora.reset_frequency": 3,
    "training.relora.restart_warmup_steps": 1,
}


def wrapped_model(r=2, dropout=0.0, **relora):
    model = PicoDecoderForCausalLM(tiny_config())
    return wrap_model(model, ReLoRAConfig(enabled=True, r=r, lora_dropout=dropout, **relora))


def train_lora(model, steps, seed):
    """A few AdamW steps on random tokens, so the adapters hold real, non-zero updates."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for _ in range(steps):
        ids = torch.randint(0, 128, (2, 16), generator=generator)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return optimizer


# --- wrapping and merge-and-reinit --------------------------------------------------------------------------


def test_wrapping_adapts_projections_and_keeps_the_rest_full_rank():
    model = wrapped_model()
    layers = lora_layers(model)
    assert sorted(name.rsplit(".", 1)[-1] for name in layers) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "w_0", "w_1", "w_2"] * 2
    )
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "pico_decoder.embedding_proj.weight" in trainable
    assert "de_embedding_proj.weight" in trainable
    norms = [n for n, _ in model.named_parameters() if "norm" in n]
    assert norms and set(norms) <= trainable
    assert not any(".base_layer." in n for n in trainable)
    for layer in layers.values():  # A is random (never zero at wrap time), B zero
        assert layer.lora_A["default"].weight.abs().sum() > 0
        assert layer.lora_B["default"].weight.abs().sum() == 0


def test_merge_and_reinit_keeps_logits_and_parameter_identity():
    model = wrapped_model()
    train_lora(model, steps=3, seed=0)
    model.eval()
    ids = torch.randint(0, 128, (2, 16))
    before = model(input_ids=ids).logits
    params = {name: p for name, p in model.named_parameters()}
    old_a = {n: p.detach().clone() for n, p in params.items() if ".lora_A." in n}
    assert any(p.abs().sum() > 0 for n, p in params.items() if ".lora_B." in n)

    merge_and_reinit(model, seed=1)

    torch.testing.assert_close(model(input_ids=ids).logits, before, atol=1e-5, rtol=0)
    assert all(p is params[name] for name, p in model.named_parameters())  # same Parameter objects
    for name, p in model.named_parameters():
        if ".lora_B." in name:
            assert p.abs().sum() == 0
        if ".lora_A." in name:
            assert not torch.equal(p, old_a[name])


def test_resets_grow_the_rank_of_the_update_past_r():
    r, name = 2, "pico_decoder.layers.0.swiglu.w_2"
    model = wrapped_model(r=r)
    layer = lora_layers(model)[name]
    start = layer.get_base_layer().weight.detach().clone()
    effective = lambda: layer.get_base_layer().weight + layer.get_delta_weight("default")  # noqa: E731

    train_lora(model, steps=4, seed=0)
    assert torch.linalg.matrix_rank(effective().detach() - start) <= r  # one cycle: rank at most r
    for k in range(3):
        merge_and_reinit(model, seed=k)
        train_lora(model, steps=4, seed=k + 1)
    assert torch.linalg.matrix_rank(effective().detach() - start) > r


# --- optimizer reset ----------------------------------------------------------------------------------------


def optimizer_with_state():
    model = wrapped_model()
    optimizer = train_lora(model, steps=2, seed=0)
    lora = [p for n, p in model.named_parameters() if ".lora_" in n]
    other = [p for n, p in model.named_parameters() if p.requires_grad and ".lora_" not in n]
    return optimizer, lora, other


def test_random_pruning_zeroes_the_ratio_of_lora_moments_only():
    optimizer, lora, other = optimizer_with_state()
    other_before = {id(p): {k: v.clone() for k, v in optimizer.state[p].items()} for p in other}
    fraction = prune_lora_moments(optimizer, lora, "random", 0.7, seed=0)
    moments = torch.cat([optimizer.state[p][k].flatten() for p in lora for k in ("exp_avg", "exp_avg_sq")])
    assert fraction == pytest.approx(0.7, abs=0.02)
    assert (moments == 0).float().mean().item() == pytest.approx(fraction, abs=1e-3)
    for p in other:  # every other parameter's state is bitwise unchanged
        for key, value in other_before[id(p)].items():
            assert torch.equal(optimizer.state[p][key], value)


def test_magnitude_pruning_zeroes_the_smallest_entries():
    optimizer, lora, _ = optimizer_with_state()
    before = {(id(p), k): optimizer.state[p][k].clone() for p in lora for k in ("exp_avg", "exp_avg_sq")}
    fraction = prune_lora_moments(optimizer, lora, "magnitude", 0.9, seed=0)
    assert fraction == pytest.approx(0.9, abs=0.01)
    for p in lora:
        for key in ("exp_avg", "exp_avg_sq"):
            old, new = before[(id(p), key)].flatten(), optimizer.state[p][key].flatten()
            zeroed = new == 0
            assert zeroed.sum() == int(0.9 * old.numel())
            assert old[zeroed].abs().max() <= old[~zeroed].abs().min()  # the smallest ones went
            assert torch.equal(new[~zeroed], old[~zeroed])


# --- the schedule -------------------------------------------------------------------------------------------


def test_jagged_cosine_at_the_turning_points():
    settings = dict(
        max_steps=100, warmup_steps=10, reset_frequency=30, restart_warmup_steps=5, min_lr_ratio=0.1
    )

    def cosine(step):  # the global cosine, from the end of warmup (1.0) to 0.1 at step 100
        return 0.1 + 0.9 * (1 + math.cos(math.pi * (step - 10) / 90)) / 2

    lr = lambda step, **kw: jagged_cosine(step, **{**settings, **kw})  # noqa: E731
    assert lr(5) == pytest.approx(0.5)
    assert lr(10) == pytest.approx(1.0)  # warmup end
    assert lr(29) == pytest.approx(cosine(29))  # just before the first reset
    assert lr(30) == 0.0  # just after it: re-warmup from 0 ...
    assert lr(32) == pytest.approx(2 / 5 * cosine(35))
    assert lr(35) == pytest.approx(cosine(35))  # ... to the cosine at the re-warmup's end
    assert lr(62) == pytest.approx(2 / 5 * cosine(65))
    assert lr(99) == pytest.approx(cosine(99))  # the last step
    assert cosine(100) == pytest.approx(0.1)
    # A warm start of 20 full-rank steps: LoRA starts at step 20 with no re-warmup, resets at 50 and 80.
    assert lr(20, warm_start_steps=20) == pytest.approx(cosine(20))
    assert lr(30, warm_start_steps=20) == pytest.approx(cosine(30))
    assert lr(51, warm_start_steps=20) == pytest.approx(1 / 5 * cosine(55))


# --- config errors ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"training.relora.r": 0}, "training.relora.r must be at least 1, got 0"),
        ({"training.relora.restart_warmup_steps": 3}, r"reset_frequency \(3\) must be greater than"),
        ({"training.relora.optimizer_reset_ratio": 1.0}, r"optimizer_reset_ratio must be in \[0, 1\)"),
        ({"training.relora.optimizer_reset": "zero"}, "optimizer_reset must be one of"),
        ({"training.relora.min_lr_ratio": 0}, "min_lr_ratio must be in"),
        ({"training.relora.lora_dropout": 1}, "lora_dropout must be in"),
        ({"training.relora.warm_start_steps": -1}, "warm_start_steps must not be negative, got -1"),
        ({"training.optimization.lr_warmup_steps": 4}, "lr_warmup_steps .* must end by the first reset"),
        ({"training.maml.enabled": "true"}, "training.relora and training.maml cannot both be enabled"),
        (
            {"training.relora.rank": 2},
            "Unknown config key 'training.relora.rank'; did you mean 'training.relora.r'",
        ),
    ],
)
def test_inconsistent_values_are_config_errors(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, tiny_training_overrides(tmp_path, **{**RELORA, **overrides}))


PEFT_MISSING = 'training.relora.enabled needs peft, which is not installed: pip install "pico-hf[relora]"'


def test_relora_without_peft_is_a_config_error_naming_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # as if peft were not installed
    with pytest.raises(ConfigError) as error:
        load_config(None, tiny_training_overrides(tmp_path, **RELORA))
    assert str(error.value) == PEFT_MISSING
    config, _ = load_config(None, tiny_training_overrides(tmp_path))  # ReLoRA off: no peft needed
    assert not config.training.relora.enabled


def test_relora_without_peft_fails_at_the_command_line_before_anything_runs(tmp_path):
    from conftest import TRAIN_SCRIPT

    hide_peft = tmp_path / "no_peft"
    hide_peft.mkdir()
    (hide_peft / "sitecustomize.py").write_text("import sys\nsys.modules['peft'] = None\n")
    result = subprocess.run(
        [sys.executable, str(TRAIN_SCRIPT), *tiny_training_overrides(tmp_path, **RELORA)],
        env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(hide_peft)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1] == f"error: {PEFT_MISSING}"
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists()


def test_peft_is_the_relora_extra_and_the_dev_extra_includes_it():
    from packaging.requirements import Requirement

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert not any(Requirement(r).name == "peft" for r in project["dependencies"])
    assert [Requirement(r).name for r in project["optional-dependencies"]["relora"]] == ["peft"]
    (own,) = [
        Requirement(r) for r in project["optional-dependencies"]["dev"] if Requirement(r).name == "pico-hf"
    ]
    assert own.extras == {"relora"}


def test_the_relora_demo_shortened_names_the_warm_start_value_that_fits(tmp_path):
    """`relora-demo.yaml training.max_steps=20`: its 25-step warm start no longer fits; one line says which key
    to set to what, exit 2, no traceback; with that value the config loads."""
    demo = REPO / "recipes" / "configs" / "relora-demo.yaml"
    result = subprocess.run(
        [
            *train_command(),
            "--config",
            str(demo),
            "training.max_steps=20",
            f"checkpointing.runs_dir={tmp_path}",
        ],
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == (
        "error: training.relora.warm_start_steps (25) must end before training.max_steps (20): set "
        "training.relora.warm_start_steps=19 or lower, or raise training.max_steps\n"
    )
    config, _ = load_config(demo, ["training.max_steps=20", "training.relora.warm_start_steps=3"])
    assert (config.training.max_steps, config.training.relora.warm_start_steps) == (20, 3)


def test_target_modules_that_match_nothing_fail_before_training(tmp_path):
    with pytest.raises(ConfigError, match=r"training.relora.target_modules \['qkv'\] match no module"):
        train(tmp_path, **RELORA, **{"training.relora.target_modules": "[qkv]"})
    assert not list((tmp_path / "runs" / "tiny" / "checkpoints").glob("step_*"))


# --- training runs ------------------------------------------------------------------------------------------


class RecordLogits(TrainerCallback):
    """The in-training (wrapped) model's logits on fixed tokens at each checkpoint."""

    def __init__(self):
        self.ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
        self.logits = {}

    def on_save(self, args, state, control, model=None, **kwargs):
        was_training = model.training
        model.eval()
        with torch.no_grad():
            self.logits[state.global_step] = model(input_ids=self.ids).logits
        model.train(was_training)


@pytest.fixture(scope="module")
def relora_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("relora")
    eval_data = tmp_path / "data" / "train.parquet"  # made by tiny_training_overrides
    logits = RecordLogits()
    summary, config = train(
        tmp_path,
        callbacks=[logits],
        **RELORA,
        **{
            "checkpointing.learning_dynamics.eval_data": str(eval_data),
            "checkpointing.learning_dynamics.eval_max_samples": 4,
        },
    )
    return summary, config, logits, tmp_path


def metrics_lines(config):
    return [json.loads(line) for line in (config.logs_dir / "metrics.jsonl").read_text().splitlines()]


def test_run_resets_and_logs_them(relora_run):
    _, config, _, _ = relora_run
    lines = metrics_lines(config)
    resets = [line for line in lines if "relora/resets" in line]
    assert [(r["step"], r["relora/resets"]) for r in resets] == [(3, 1), (6, 2)]
    assert all(r["relora/fraction_zeroed"] == pytest.approx(0.999, abs=0.01) for r in resets)
    assert all(r["relora/lr"] == 0.0 for r in resets)
    # The rate each step trained with is the jagged cosine: warmup over 2 steps, re-warmup of 1 step after
    # each reset, cosine to 0.1 * lr at step 8.
    rates = [line["learning_rate"] for line in lines if "loss" in line]
    expected = [
        0.01
        * jagged_cosine(
            s, max_steps=8, warmup_steps=2, reset_frequency=3, restart_warmup_steps=1, min_lr_ratio=0.1
        )
        for s in range(8)
    ]
    assert rates == pytest.approx(expected)
    assert rates[3] == rates[6] == 0.0


def test_checkpoints_are_plain_pico_checkpoints_with_the_in_training_logits(relora_run):
    _, config, logits, _ = relora_run
    assert sorted(logits.logits) == [2, 4, 6, 8]
    for step in logits.logits:
        weights = load_file(config.checkpoints_dir / f"step_{step}" / "model.safetensors")
        assert not any("lora" in k or "base_layer" in k for k in weights)
    # Loaded with plain transformers in a fresh interpreter where peft is not installed (hidden from imports).
    torch.save(logits.ids, config.run_dir / "ids.pt")
    script = (
        "import sys, torch\n"
        "import importlib.machinery\n"
        "class Hide(importlib.machinery.PathFinder):\n"
        "    @classmethod\n"
        "    def find_spec(cls, name, path=None, target=None):\n"
        "        if name == 'peft' or name.startswith('peft.'): raise ModuleNotFoundError(name)\n"
        "        return None\n"
        "sys.meta_path.insert(0, Hide)\n"
        "import importlib.util\n"
        "_find = importlib.util.find_spec\n"
        "importlib.util.find_spec = lambda name, *a: None if name == 'peft' else _find(name, *a)\n"
        "from transformers import AutoModelForCausalLM\n"
        "ids = torch.load(sys.argv[1])\n"
        "for step_dir in sys.argv[2:]:\n"
        "    model = AutoModelForCausalLM.from_pretrained(step_dir, trust_remote_code=True).eval()\n"
        "    with torch.no_grad(): torch.save(model(input_ids=ids).logits, step_dir + '.logits.pt')\n"
        "assert 'peft' not in sys.modules\n"
    )
    step_dirs = [str(config.checkpoints_dir / f"step_{step}") for step in sorted(logits.logits)]
    result = subprocess.run(
        [sys.executable, "-c", script, str(config.run_dir / "ids.pt"), *step_dirs],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr
    for step, step_dir in zip(sorted(logits.logits), step_dirs, strict=True):
        torch.testing.assert_close(
            torch.load(step_dir + ".logits.pt"), logits.logits[step], atol=1e-5, rtol=1e-5
        )


def test_learning_dynamics_are_those_of_the_effective_weights(relora_run):
    """Weights: the merged checkpoint's. `val` gradients: those of a full-rank model with those weights,
    computed here with plain autograd on the same rows."""
    _, config, _, _ = relora_run
    step_dir = config.checkpoints_dir / "step_4"  # mid-cycle: the adapters hold a non-zero update
    ld = step_dir / "learning_dynamics"
    weights, gradients = (
        load_file(ld / "val_weights.safetensors"),
        load_file(ld / "val_gradients.safetensors"),
    )
    assert sorted(weights) == [
        f"layers.{i}.{s}" for i in (0, 1) for s in ("attention.o_proj", "attention.v_proj", "swiglu.w_2")
    ]
    merged = load_file(step_dir / "model.safetensors")
    for name, weight in weights.items():
        assert torch.equal(weight, merged[f"pico_decoder.{name}.weight"])

    plain = PicoDecoderForCausalLM.from_pretrained(step_dir).eval()
    rows = torch.tensor(load_file_rows(ld / "val_data"))
    logits = plain(input_ids=rows[:, :-1]).logits
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), rows[:, 1:].flatten())
    loss.backward()
    for name, gradient in gradients.items():
        expected = plain.get_submodule(f"pico_decoder.{name}").weight.grad
        torch.testing.assert_close(gradient, expected, atol=1e-6, rtol=1e-4)
    train_gradients = load_file(ld / "train_gradients.safetensors")
    assert sorted(train_gradients) == sorted(gradients) and all(
        g.abs().sum() > 0 for g in train_gradients.values()
    )


def load_file_rows(path):
    import datasets

    return datasets.load_from_disk(str(path))["input_ids"]


def test_capture_does_not_change_training(relora_run, tmp_path):
    _, config, _, _ = relora_run
    train(tmp_path, **RELORA, **{"checkpointing.learning_dynamics.layer_suffixes": "[]"})
    assert_bitwise_equal(final_weights(tmp_path / "runs" / "tiny"), final_weights(config.run_dir))


def test_resume_mid_cycle_is_bitwise_identical(relora_run, tmp_path):
    _, config, _, _ = relora_run
    overrides = {
        **RELORA,
        "checkpointing.learning_dynamics.eval_data": str(tmp_path / "data" / "train.parquet"),
        "checkpointing.learning_dynamics.eval_max_samples": 4,
    }
    with pytest.raises(KeyboardInterrupt):  # killed after step 5: the last checkpoint (4) is mid-cycle
        train(tmp_path, callbacks=[StopAfter(5)], **overrides)
    assert os.readlink(tmp_path / "runs" / "tiny" / "checkpoints" / "latest") == "step_4"
    summary, _ = train(tmp_path, **overrides)
    assert summary["resumed_from"].endswith("step_4")
    assert_bitwise_equal(final_weights(tmp_path / "runs" / "tiny"), final_weights(config.run_dir))


def test_warm_start_steps_train_full_rank_then_lora(tmp_path):
    _, config = train(tmp_path, **RELORA, **{"training.relora.warm_start_steps": 2})
    resets = [line["step"] for line in metrics_lines(config) if "relora/resets" in line]
    assert resets == [5]  # warm start 2 steps, then a reset every 3
    steps = {s: load_file(config.checkpoints_dir / f"step_{s}" / "model.safetensors") for s in (0, 2, 4)}
    key = "pico_decoder.layers.0.swiglu.w_2.weight"
    # Full rank during the warm start: the update to a wrapped module has full rank ...
    assert torch.linalg.matrix_rank(steps[2][key] - steps[0][key]) > 2
    # ... then rank at most r within the first LoRA cycle.
    assert torch.linalg.matrix_rank(steps[4][key] - steps[2][key]) <= 2


def test_resume_inside_the_warm_start_is_bitwise_identical(tmp_path):
    overrides = {**RELORA, "training.relora.warm_start_steps": 3}
    _, reference = train(tmp_path / "reference", **overrides)
    with pytest.raises(KeyboardInterrupt):  # the last checkpoint (2) is inside the full-rank warm start
        train(tmp_path / "killed", callbacks=[StopAfter(3)], **overrides)
    summary, _ = train(tmp_path / "killed", **overrides)
    assert summary["resumed_from"].endswith("step_2")
    assert_bitwise_equal(
        final_weights(tmp_path / "killed" / "runs" / "tiny"), final_weights(reference.run_dir)
    )


class RecordBatches(TrainerCallback):
    """The input ids of every training micro-batch, by the optimizer step it belongs to."""

    def __init__(self):
        self.batches = {}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        def record(module, module_args, module_kwargs):
            if module.training:
                self.batches.setdefault(state.global_step, []).append(module_kwargs["input_ids"].clone())

        model.register_forward_pre_hook(record, with_kwargs=True)


def test_warm_start_checkpoint_continues_its_steps_data_and_schedule(tmp_path):
    # The warm start: a full-rank run whose step-4 checkpoint the ReLoRA run continues, to step 8 in all.
    source_batches = RecordBatches()
    _, source = train(tmp_path / "source", callbacks=[source_batches], **{"training.max_steps": 8})
    warm_start = source.checkpoints_dir / "step_4"
    batches = RecordBatches()
    summary, warm = train(
        tmp_path / "warm",
        callbacks=[batches],
        **{**RELORA, "training.relora.warm_start_checkpoint": str(warm_start)},
    )
    # Steps 5..8 (0-based 4..7) only, each on the batch the full-rank run would have trained on next.
    assert sorted(batches.batches) == [4, 5, 6, 7]
    for step, micro_batches in batches.batches.items():
        assert len(micro_batches) == len(source_batches.batches[step]) == 2
        for mine, theirs in zip(micro_batches, source_batches.batches[step], strict=True):
            assert torch.equal(mine, theirs), step
    # The run starts with a checkpoint of the warm start's weights, at its step.
    assert summary["steps"] == 8 and summary["checkpoints"] == ["step_4", "step_6", "step_8"]
    assert_bitwise_equal(
        load_file(warm.checkpoints_dir / "step_4" / "model.safetensors"),
        load_file(warm_start / "model.safetensors"),
    )
    # The jagged cosine carries on at step 4 (no warmup from 0), the first reset 3 steps later.
    lines = metrics_lines(warm)
    assert [(line["step"], line["relora/resets"]) for line in lines if "relora/resets" in line] == [(7, 1)]
    rates = [(line["step"], line["learning_rate"]) for line in lines if "loss" in line]
    schedule = dict(max_steps=8, warmup_steps=2, reset_frequency=3, restart_warmup_steps=1, min_lr_ratio=0.1)
    assert [step for step, _ in rates] == [5, 6, 7, 8]
    expected = [0.01 * jagged_cosine(s, warm_start_steps=4, **schedule) for s in range(4, 8)]
    assert [rate for _, rate in rates] == pytest.approx(expected)
    assert (
        rates[0][1] == pytest.approx(0.01 * jagged_cosine(4, **schedule)) and rates[0][1] > 0 == rates[3][1]
    )


def test_warm_start_checkpoint_errors(tmp_path):
    _, source = train(tmp_path / "source", **{"training.max_steps": 4})
    key = "training.relora.warm_start_checkpoint"
    with pytest.raises(ConfigError, match=rf"{key} '.*missing' is not a training checkpoint .*data_position"):
        train(tmp_path / "a", **RELORA, **{key: str(tmp_path / "missing")})
    with pytest.raises(
        ConfigError, match=r"training.max_steps \(4\) must be greater than the step of .*step_4' \(4\)"
    ):
        train(
            tmp_path / "b", **{**RELORA, "training.max_steps": 4, key: str(source.checkpoints_dir / "step_4")}
        )
    with pytest.raises(ConfigError, match=r"global batch of 8 sequences, this run with 4 \(data.dataloader"):
        train(
            tmp_path / "c",
            **{**RELORA, "data.dataloader.batch_size": 4, key: str(source.checkpoints_dir / "step_2")},
        )


def test_deepspeed_is_refused_before_the_first_step(tmp_path):
    """An accelerate DeepSpeed launch sets ACCELERATE_USE_DEEPSPEED; a ReLoRA run stops with one error line."""
    from conftest import train_command

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "ACCELERATE_USE_DEEPSPEED": "true"}
    result = subprocess.run(
        [*train_command(), *tiny_training_overrides(tmp_path, **RELORA)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    assert result.stderr.strip().split("\n")[-1] == (
        "error: training.relora cannot run under DeepSpeed: ZeRO keeps the optimizer state in flat partitions, "
        "not keyed by parameter, so the LoRA moments could not be pruned at a reset (it would silently do "
        "nothing). Launch with recipes/accelerate/fsdp.yaml or ddp.yaml"
    )
    assert "Traceback" not in result.stderr and not (tmp_path / "runs").exists()


# --- the schedule control: full rank on ReLoRA's schedule -----------------------------------------------------


def test_full_rank_runs_follow_the_jagged_cosine_without_adapters(relora_run, tmp_path):
    _, relora_config, _, _ = relora_run
    schedule = {
        "training.max_steps": 8,
        "training.optimization.reset_frequency": 3,
        "training.optimization.restart_warmup_steps": 1,
    }
    _, config = train(tmp_path, **{**schedule, "training.optimization.lr_scheduler": "jagged_cosine"})

    def rates(config):
        return [(line["step"], line["learning_rate"]) for line in metrics_lines(config) if "loss" in line]

    assert rates(config) == rates(relora_config)  # the ReLoRA run's schedule, step for step
    assert not any("relora/resets" in line for line in metrics_lines(config))
    # No adapters: each cycle's update to a projection is full rank (a LoRA cycle's is rank r = 2 at most).
    weights = {s: load_file(config.checkpoints_dir / f"step_{s}" / "model.safetensors") for s in (4, 6)}
    key = "pico_decoder.layers.0.swiglu.w_2.weight"
    assert torch.linalg.matrix_rank(weights[6][key] - weights[4][key]) > 2


def test_cosine_is_one_warmup_and_one_cosine(tmp_path):
    _, config = train(
        tmp_path,
        **{"training.optimization.lr_scheduler": "cosine", "training.optimization.min_lr_ratio": 0.2},
    )
    rates = [line["learning_rate"] for line in metrics_lines(config) if "loss" in line]
    cosine = [0.01 * (0.2 + 0.8 * (1 + math.cos(math.pi * (s - 2) / 4)) / 2) for s in range(2, 6)]
    assert rates == pytest.approx([0.0, 0.005, *cosine])


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            {"training.optimization.lr_scheduler": "step"},
            "training.optimization.lr_scheduler must be one of ['linear_with_warmup', 'cosine', 'jagged_cosine'], "
            "got 'step'",
        ),
        (
            {"training.optimization.min_lr_ratio": 0.2},
            "training.optimization.min_lr_ratio is set but lr_scheduler 'linear_with_warmup' does not use it (it is "
            "a key of cosine and jagged_cosine)",
        ),
        (
            {"training.optimization.lr_scheduler": "cosine", "training.optimization.reset_frequency": 3},
            "training.optimization.reset_frequency is set but lr_scheduler 'cosine' does not use it (it is a key of "
            "jagged_cosine)",
        ),
        (
            {"training.optimization.lr_scheduler": "jagged_cosine", "training.optimization.reset_frequency": 3,
             "training.optimization.restart_warmup_steps": 3},
            "training.optimization.reset_frequency (3) must be greater than "
            "training.optimization.restart_warmup_steps (3)",
        ),
        (
            {"training.optimization.lr_scheduler": "jagged_cosine", "training.optimization.warm_start_steps": 6},
            "training.optimization.warm_start_steps (6) must end before training.max_steps (6): set "
            "training.optimization.warm_start_steps=5 or lower, or raise training.max_steps",
        ),
        (
            {"training.optimization.lr_scheduler": "jagged_cosine", "training.optimization.reset_frequency": 1,
             "training.optimization.restart_warmup_steps": 0},
            "training.optimization.lr_warmup_steps (2) must end by the first reset, at step 1 "
            "(training.optimization.warm_start_steps + reset_frequency)",
        ),
        (
            {**RELORA, "training.optimization.lr_scheduler": "jagged_cosine"},
            "training.optimization.lr_scheduler 'jagged_cosine' cannot be combined with training.relora, which "
            "follows its own jagged cosine (training.relora.reset_frequency, restart_warmup_steps, min_lr_ratio): "
            "leave lr_scheduler at 'linear_with_warmup'",
        ),
    ],
)  # fmt: skip
def test_schedule_keys_are_checked(tmp_path, overrides, message):
    with pytest.raises(ConfigError) as error:
        load_config(None, tiny_training_overrides(tmp_path, **overrides))
    assert str(error.value) == message


def test_warm_start_checkpoint_missing_tensors_is_a_config_error(tmp_path):
    """from_pretrained would initialise the tensors a checkpoint lacks; starting or resuming a run refuses it."""
    from pico_hf.training.relora import load_warm_start

    source = tmp_path / "short"
    PicoDecoderForCausalLM(tiny_config(n_layers=1)).save_pretrained(source)
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "n_layers": 2}))
    with pytest.raises(ConfigError) as error:
        load_warm_start(PicoDecoderForCausalLM(tiny_config()), str(source))
    assert str(error.value) == (
        f"training.relora.warm_start_checkpoint '{source}' cannot be loaded: Checkpoint {source} lacks 9 "
        "tensor(s) the model needs, e.g. ['pico_decoder.layers.1.attention.k_proj.weight', "
        "'pico_decoder.layers.1.attention.o_proj.weight', 'pico_decoder.layers.1.attention.q_proj.weight']: its "
        "weights file does not match its config.json"
    )


def test_analyze_compares_a_relora_run_and_a_baseline(relora_run, tmp_path):
    _, config, _, _ = relora_run
    baseline, _ = train(
        tmp_path / "baseline",
        **{
            "training.max_steps": 8,
            "checkpointing.learning_dynamics.eval_data": str(
                tmp_path / "baseline" / "data" / "train.parquet"
            ),
        },
    )
    spec = importlib.util.spec_from_file_location("analyze_cli", REPO / "recipes" / "analyze.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    analysis = {
        "analysis_name": "compare",
        "steps": {"start": 0, "end": 8, "step": 2},
        "metrics": [
            {
                "metric_name": "per",
                "data_split": "train",
                "components": [
                    {
                        "component_name": "simple",
                        "data_type": "gradients",
                        "layer_suffixes": "swiglu.w_2",
                        "layers": [0, 1],
                    }
                ],
            },
            {
                "metric_name": "condition_number",
                "data_split": "val",
                "components": [
                    {
                        "component_name": "simple",
                        "data_type": "weights",
                        "layer_suffixes": "attention.o_proj",
                        "layers": [0, 1],
                    }
                ],
            },
        ],
        "monitoring": {"output_dir": str(tmp_path / "out")},
    }
    path = tmp_path / "analysis.yaml"
    path.write_text(yaml.safe_dump(analysis))
    results = {}
    for name, run_dir in (("relora", config.run_dir), ("baseline", baseline["run_dir"])):
        analysis["monitoring"]["output_dir"] = str(tmp_path / name)
        path.write_text(yaml.safe_dump(analysis))
        assert cli.main(["--config", str(path), "--run_path", str(run_dir), "--no_report"]) == 0
        results[name] = json.loads((tmp_path / name / "compare" / "step_4" / "per_train.json").read_text())
    assert (
        list(results["relora"])
        == list(results["baseline"])
        == ["layers.0.swiglu.w_2.gradients", "layers.1.swiglu.w_2.gradients"]
    )


@pytest.mark.slow
def test_two_processes_reproduce_the_single_process_run(tmp_path):
    """torchrun with 2 CPU processes vs 1: same losses, resets, merged weights and learning dynamics (LoRA
    dropout off: its masks depend on how the batch is split across processes)."""
    from conftest import TRAIN_SCRIPT

    def launch(root, processes):
        overrides = tiny_training_overrides(
            root,
            **{
                **RELORA,
                "training.relora.lora_dropout": 0.0,
                "checkpointing.learning_dynamics.eval_data": str(root / "data" / "train.parquet"),
                "checkpointing.learning_dynamics.eval_max_samples": 4,
            },
        )
        launcher = [sys.executable]
        if processes > 1:
            launcher += [
                "-m",
                "torch.distributed.run",
                "--nproc_per_node",
                str(processes),
                "--master_port",
                "29547",
            ]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        result = subprocess.run(
            [*launcher, str(TRAIN_SCRIPT), *overrides], capture_output=True, text=True, env=env, timeout=600
        )
        assert result.returncode == 0, result.stderr[-3000:]
        assert_world_size(result.stderr + result.stdout, processes)
        return root / "runs" / "tiny"

    one, two = launch(tmp_path / "one", 1), launch(tmp_path / "two", 2)

    def logged(run_dir, key):
        lines = [json.loads(line) for line in (run_dir / "logs" / "metrics.jsonl").read_text().splitlines()]
        return [(line["step"], line[key]) for line in lines if key in line]

    assert logged(two, "relora/resets") == logged(one, "relora/resets") == [(3, 1), (6, 2)]
    torch.testing.assert_close(
        torch.tensor([v for _, v in logged(two, "loss")]),
        torch.tensor([v for _, v in logged(one, "loss")]),
        rtol=1e-4,
        atol=1e-4,
    )
    for name, weight in final_weights(one).items():
        torch.testing.assert_close(final_weights(two)[name], weight, rtol=1e-3, atol=1e-4, msg=name)
    for split in ("train", "val"):
        name = f"{split}_gradients.safetensors"
        expected = load_file(one / "checkpoints" / "step_4" / "learning_dynamics" / name)
        for layer, gradient in load_file(two / "checkpoints" / "step_4" / "learning_dynamics" / name).items():
            torch.testing.assert_close(
                gradient, expected[layer], rtol=1e-3, atol=1e-5, msg=f"{split} {layer}"
            )


@pytest.mark.slow
def test_fsdp2_on_two_processes_merges_prunes_saves_and_resumes_like_one_process(tmp_path):
    """recipes/accelerate/fsdp.yaml on 2 CPU processes (tests/fsdp_on_cpu.py), killed after step 5 and resumed
    from step 4, against one process: each reset merges into the sharded base weights and prunes the sharded
    moments as one process does, and every checkpoint holds the whole merged weights, ReLoRA state and learning
    dynamics."""
    from conftest import train_command

    def launch(root, processes, **env):
        overrides = tiny_training_overrides(root, **{**RELORA, "training.relora.lora_dropout": 0.0})
        command = train_command(processes, accelerate_config="fsdp")
        if processes > 1:
            command.insert(-1, str(REPO / "tests" / "fsdp_on_cpu.py"))
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **env}
        return subprocess.run([*command, *overrides], env=env, capture_output=True, text=True, timeout=600)

    one = launch(tmp_path / "one", 1)
    assert one.returncode == 0, one.stderr[-3000:]
    killed = launch(tmp_path / "fsdp", 2, PICO_TEST_SIGKILL_AFTER_STEP="5")
    assert killed.returncode != 0 and "Finished" not in killed.stderr
    assert_world_size(killed.stderr, 2)
    checkpoints = tmp_path / "fsdp" / "runs" / "tiny" / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("step_*")) == ["step_0", "step_2", "step_4"]
    resumed = launch(tmp_path / "fsdp", 2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Resuming from {checkpoints / 'step_4'}" in resumed.stderr

    def resets(root):
        lines = (root / "runs" / "tiny" / "logs" / "metrics.jsonl").read_text().splitlines()
        return [
            (line["step"], line["relora/resets"])
            for line in map(json.loads, lines)
            if "relora/resets" in line
        ]

    assert resets(tmp_path / "fsdp") == resets(tmp_path / "one") == [(3, 1), (6, 2)]
    reference = tmp_path / "one" / "runs" / "tiny" / "checkpoints"
    for step in (2, 4, 6, 8):
        for name in ("model.safetensors", "fabric_state/relora_state.safetensors"):
            sharded, whole = (
                load_file(checkpoints / f"step_{step}" / name),
                load_file(reference / f"step_{step}" / name),
            )
            assert sharded.keys() == whole.keys(), (step, name)
            for key, value in whole.items():  # the same global batches; only the reduction order differs
                torch.testing.assert_close(sharded[key], value, rtol=0, atol=1e-5, msg=f"{step} {name} {key}")
        if step < 8:  # learning dynamics of the effective weights, from the gathered adapters
            for kind in ("weights", "gradients", "activations"):
                name = f"learning_dynamics/train_{kind}.safetensors"
                sharded, whole = (load_file(d / f"step_{step}" / name) for d in (checkpoints, reference))
                assert sharded.keys() == whole.keys()
                for key, value in whole.items():
                    torch.testing.assert_close(
                        sharded[key], value, rtol=1e-4, atol=1e-6, msg=f"{step} {kind} {key}"
                    )


@pytest.mark.parametrize("name", ["relora-demo", "pico-relora-tiny", "pico-relora-small"])
def test_shipped_configs_load_with_relora_on(name):
    config, _ = load_config(REPO / "recipes" / "configs" / f"{name}.yaml")
    assert config.training.relora.enabled and config.training.relora.r == 16
    assert config.checkpointing.run_name == name.replace("relora-demo", "pico-relora-demo")
