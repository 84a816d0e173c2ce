"""Training modes (pico_hf.training.modes): a mode defined in this file alone trains, checkpoints and resumes."""

import json
import os
from dataclasses import dataclass

import pytest
import yaml
from conftest import StopAfter, assert_bitwise_equal, final_weights, train
from transformers import TrainerCallback

from pico_hf.training.config import ConfigError, describe_sections, load_config
from pico_hf.training.modes import TrainingMode, register_mode, registered_modes, unregister_mode

TOY_STATE = "toy_state.json"


@dataclass
class ToyConfig:
    enabled: bool = False
    loss_scale: float = 3.0  # the mode trains on this multiple of the language-modelling loss
    lr_factor: float = 0.5  # the learning rate is constant: training.optimization.lr x lr_factor


class ToyLog(TrainerCallback):
    def __init__(self, mode):
        self.mode = mode

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and "loss" in logs:
            logs["toy/micro_batches"] = self.mode.micro_batches


class ToyMode(TrainingMode):
    """Counts the micro-batches it computed the loss of: training state that a resume must restore."""

    key = "toy"
    config_class = ToyConfig

    @classmethod
    def check_config(cls, section, config):
        return (
            []
            if section.loss_scale > 0
            else [f"training.toy.loss_scale must be positive, got {section.loss_scale}"]
        )

    def prepare_model(self, model, *, tokenizer, micro_batch, world_size):
        self.micro_batches = 0
        return model

    def callbacks(self):
        return [ToyLog(self)]

    def lr_multiplier(self, num_training_steps):
        return lambda step: self.section.lr_factor

    def compute_loss(self, model, inputs):
        self.micro_batches += 1
        return model(**inputs).loss * self.section.loss_scale

    def save_state(self, state_dir):
        (state_dir / TOY_STATE).write_text(json.dumps({"micro_batches": self.micro_batches}))

    def resume(self, state_dir, model, weights):
        self.micro_batches = json.loads((state_dir / TOY_STATE).read_text())["micro_batches"]
        return weights


@pytest.fixture(autouse=True)
def toy_mode():
    """The toy mode is registered while this file's tests run only: a mode registered at import would add its
    section to every config made later in the same process (another file's runs would not match their saved
    configs)."""
    register_mode(ToyMode)
    yield ToyMode
    unregister_mode(ToyMode.key)


TOY = {"training.toy.enabled": "true", "training.max_steps": 4}


def metrics(run_dir):
    lines = (run_dir / "logs" / "metrics.jsonl").read_text().splitlines()
    return [row for row in map(json.loads, lines) if "loss" in row]


def test_a_mode_registers_its_config_section(tmp_path):
    assert list(registered_modes())[:2] == ["relora", "maml"] and registered_modes()["toy"] is ToyMode
    config, _ = load_config(None, ["training.toy.enabled=true", "training.toy.lr_factor=0.25"])
    assert config.training.toy == ToyConfig(enabled=True, lr_factor=0.25)
    assert load_config(None)[0].training.toy == ToyConfig()  # off by default
    assert "  training.toy.loss_scale = 3.0\n" in describe_sections() + "\n"
    assert config.to_dict()["training"]["toy"] == {"enabled": True, "loss_scale": 3.0, "lr_factor": 0.25}
    config.save_yaml(tmp_path / "config.yaml")
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["training"]["toy"]["lr_factor"] == 0.25
    assert config != load_config(None, ["training.toy.enabled=true"])[0]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["training.toy.enabled=true", "training.toy.loss_scale=0"], "training.toy.loss_scale must be positive, got 0.0"),
        (["training.toy.loss_scal=2"], "Unknown config key 'training.toy.loss_scal'; did you mean 'training.toy.loss_scale'?"),
        (["training.toy.enabled=true", "training.maml.enabled=true"],
         "training.maml and training.toy cannot both be enabled: choose one research mode"),
    ],
)  # fmt: skip
def test_a_modes_config_errors_name_its_keys(overrides, message):
    with pytest.raises(ConfigError) as error:
        load_config(None, overrides)
    assert str(error.value) == message


def test_a_key_belongs_to_one_mode():
    class Other(TrainingMode):
        key = "toy"
        config_class = ToyConfig

    with pytest.raises(TypeError, match=r"training\.toy is already the section of ToyMode"):
        register_mode(Other)
    with pytest.raises(TypeError, match="config_class must be a dataclass with an `enabled` field"):
        register_mode(type("NoConfig", (TrainingMode,), {"key": "none", "config_class": dict}))


def test_a_mode_trains_checkpoints_and_resumes(tmp_path):
    plain, _ = train(tmp_path / "plain", **{"training.max_steps": 1})
    _, config = train(tmp_path / "toy", **TOY)
    rows = metrics(config.run_dir)
    # The loss hook: step 1 (the same initial model and batch as the plain run's) trains on 3 x its loss.
    assert rows[0]["loss"] == pytest.approx(3.0 * plain["first_loss"][1], rel=1e-5)
    # The schedule hook: a constant 0.5 x lr (the Trainer's own would warm up from 0).
    assert [row["learning_rate"] for row in rows] == [0.005] * 4
    # The series it logs, and the state each checkpoint saves: two micro-batches a step.
    assert [row["toy/micro_batches"] for row in rows] == [2, 4, 6, 8]
    for step in (0, 2, 4):
        state = config.checkpoints_dir / f"step_{step}" / "fabric_state" / TOY_STATE
        assert json.loads(state.read_text()) == {"micro_batches": 2 * step}

    killed = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):  # killed after step 3: resumes from step 2
        train(killed, callbacks=[StopAfter(3)], **TOY)
    resumed, _ = train(killed, **TOY)
    assert resumed["resumed_from"].endswith("step_2")
    assert [row["toy/micro_batches"] for row in metrics(killed / "runs" / "tiny")] == [2, 4, 6, 8]
    assert_bitwise_equal(final_weights(killed / "runs" / "tiny"), final_weights(config.run_dir))
    assert os.readlink(killed / "runs" / "tiny" / "checkpoints" / "latest") == "step_4"
