"""Training config: pico-train files load unchanged, overrides, unknown keys, value checks."""

import textwrap

import pytest
import yaml
from conftest import REPO

from pico_hf.training.config import ConfigError, PicoTrainingConfig, describe_sections, load_config

# pico-train's configs/demo.yaml, verbatim.
PICO_TRAIN_DEMO = """\
# Demo config file
data:
  dataloader:
    batch_size: 32

checkpointing:
  run_name: "pico-decoder-demo-1"
  save_every_n_steps: 50

  save_to_hf: true
  hf_checkpoint:
    repo_id: "pico-lm/demo"

  learning_dynamics:
    batch_size: 16

model:
    d_model: 96
    activation_hidden_dim: 384

evaluation:
  paloma:
    batch_size: 32

monitoring:

  save_to_wandb: true
  wandb:
    project: "pico-demo"
    entity: "pico-lm"

  logging:
    log_every_n_steps: 10

training:
  max_steps: 100

  optimization:
    lr: 0.001
    lr_warmup_steps: 30

    gradient_accumulation_steps: 2

  fabric:
    num_devices: 1
"""


def write(tmp_path, text, name="config.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_pico_train_demo_config_loads_unchanged(tmp_path):
    config, notes = load_config(write(tmp_path, PICO_TRAIN_DEMO))
    assert config.data.dataloader.batch_size == 32
    assert config.model.d_model == 96 and config.model.n_layers == 12  # default kept
    assert config.training.optimization.lr == 0.001
    assert config.training.optimization.gradient_accumulation_steps == 2
    assert config.checkpointing.hf_checkpoint.repo_id == "pico-lm/demo"
    assert config.checkpointing.learning_dynamics.layer_suffixes == [
        "attention.v_proj",
        "attention.o_proj",
        "swiglu.w_2",
    ]
    assert config.monitoring.wandb.project == "pico-demo"
    assert notes == [
        "training.fabric.num_devices: the process count comes from `accelerate launch --num_processes`."
    ]


def test_defaults_are_pico_trains():
    config = PicoTrainingConfig()
    assert config.data.dataset.name == "pico-lm/pretokenized-dolma"
    assert config.data.dataloader.batch_size == 1024
    assert config.data.tokenizer.name == "allenai/OLMo-7B-0724-hf"
    assert (config.training.max_steps, config.training.optimization.lr) == (200_000, 3e-4)
    assert config.training.optimization.lr_warmup_steps == 2500
    assert config.training.optimization.gradient_accumulation_steps == 128
    assert config.training.fabric.precision == "bf16-mixed"
    assert config.checkpointing.save_every_n_steps == 1000
    assert config.checkpointing.training.auto_resume is True
    assert config.evaluation.paloma.dataset_name == "pico-lm/pretokenized-paloma-tinsy"
    assert config.monitoring.logging.log_every_n_steps == 100


@pytest.mark.parametrize("name", ["tiny", "small", "medium", "large"])
def test_published_run_configs(name):
    config, _ = load_config(REPO / "recipes" / "configs" / f"pico-decoder-{name}.yaml")
    assert config.checkpointing.run_name == f"pico-decoder-{name}"
    assert config.data.dataset.name == "pico-lm/pretokenized-dolma"
    assert config.data.dataloader.batch_size == 1024 and config.model.max_seq_len == 2048
    assert config.training.max_steps == 200_000 and config.training.optimization.lr == 3e-4
    assert config.training.optimization.lr_warmup_steps == 2500
    assert config.training.fabric.precision == "bf16-mixed"
    assert config.checkpointing.save_every_n_steps == 1000
    d_model = {"tiny": 96, "small": 384, "medium": 768, "large": 1536}[name]
    assert (config.model.d_model, config.model.activation_hidden_dim) == (d_model, 4 * d_model)


def test_dotted_overrides_are_typed(tmp_path):
    config, _ = load_config(
        write(tmp_path, PICO_TRAIN_DEMO),
        [
            "training.max_steps=50",
            "training.optimization.lr=3e-4",
            "checkpointing.run_name=x",
            "checkpointing.learning_dynamics.layer_suffixes=[swiglu.w_2]",
            "training_arguments.optim=sgd",
        ],
    )
    assert config.training.max_steps == 50
    assert config.training.optimization.lr == pytest.approx(3e-4)
    assert config.checkpointing.run_name == "x"
    assert config.checkpointing.learning_dynamics.layer_suffixes == ["swiglu.w_2"]
    assert config.training_arguments == {"optim": "sgd"}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["training.optimization.lrr=1"],
            r"Unknown config key 'training.optimization.lrr'; did you mean 'training.optimization.lr'\?",
        ),
        (["trainng.max_steps=1"], r"Unknown config key 'trainng'; did you mean 'training'\?"),
        (["checkpointing.save_every_n_step=5"], r"did you mean 'checkpointing.save_every_n_steps'\?"),
        (["training.max_steps=ten"], r"'training.max_steps' must be an integer, got 'ten'"),
        (["training.max_steps=0"], r"training.max_steps must be positive, got 0"),
        (["training.fabric.precision=fp8"], r"training.fabric.precision must be one of"),
        (["training.optimization.optimizer=sgd"], r"optimizer must be 'adamw', got 'sgd'"),
        (
            ["checkpointing.save_to_hf=true"],
            r"save_to_hf is true but checkpointing.hf_checkpoint.repo_id is empty",
        ),
        (["max_steps"], r"Override 'max_steps' must look like section.key=value"),
    ],
)
def test_bad_keys_and_values_name_the_problem(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.n_layers=2"], r"metrics\[0\] \(cka\): layers \[11\] do not exist in a model of 2 layers"),
        (
            ["checkpointing.learning_dynamics.layer_suffixes=[attention.v_proj]"],
            r"metrics\[0\] \(cka\): \['attention.o_proj'\] is not captured; add it to layer_suffixes",
        ),
        (
            ["checkpointing.learning_dynamics.eval_data=null"],
            r"metrics\[0\] \(cka\): data_split 'val' is not captured \(captured: \['train'\]\)",
        ),
        (
            [
                "checkpointing.learning_dynamics.metrics=[{metric_name: ckaa, data_split: val, components: []}]"
            ],
            r"checkpointing.learning_dynamics.metrics: unknown metric 'ckaa'",
        ),
    ],
)
def test_learning_dynamics_metrics_must_read_what_the_run_captures(overrides, message):
    """Caught when the config loads, not at the first checkpoint."""
    with pytest.raises(ConfigError, match=message):
        load_config(REPO / "recipes" / "configs" / "demo.yaml", overrides)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match=r"Config file .*nope.yaml does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_resolved_config_round_trips(tmp_path):
    config, _ = load_config(write(tmp_path, PICO_TRAIN_DEMO))
    config.save_yaml(tmp_path / "training_config.yaml")
    saved = yaml.safe_load((tmp_path / "training_config.yaml").read_text())
    assert saved["model"]["d_model"] == 96 and saved["checkpointing"]["run_name"] == "pico-decoder-demo-1"
    reloaded, _ = load_config(tmp_path / "training_config.yaml")
    assert reloaded == config


def test_help_lists_every_section():
    text = describe_sections()
    for key in [
        "data.dataset.name",
        "model.d_model",
        "training.optimization.lr",
        "evaluation.paloma.batch_size",
        "monitoring.logging.log_every_n_steps",
        "checkpointing.learning_dynamics.layer_suffixes",
    ]:
        assert key in text


@pytest.mark.parametrize(
    ("overrides", "problems"),
    [
        (["model.d_model=97"], ["model.d_model (97) must be divisible by model.attention_n_heads (12)"]),
        (
            ["model.d_model=36"],
            [
                "RoPE rotates pairs of dimensions, so the head dim model.d_model / model.attention_n_heads "
                "(36 / 12 = 3) must be even"
            ],
        ),
        (
            ["model.attention_n_kv_heads=5", "model.n_layers=0"],
            ["model.n_layers must be positive, got 0"],
        ),
        (
            ["model.attention_n_kv_heads=5"],
            ["model.attention_n_heads (12) must be divisible by model.attention_n_kv_heads (5)"],
        ),
        (
            ["model.d_model=97", "training.optimization.lr=-1", "training.max_steps=0"],
            [
                "training.max_steps must be positive, got 0",
                "training.optimization.lr must be positive, got -1.0",
                "model.d_model (97) must be divisible by model.attention_n_heads (12)",
            ],
        ),
    ],
)
def test_model_shapes_are_checked_with_the_other_values_all_reported_at_once(overrides, problems):
    with pytest.raises(ConfigError) as error:
        load_config(None, overrides)
    assert error.value.problems == problems


@pytest.mark.parametrize(
    "model",
    [
        {"d_model": 97},
        {"d_model": 36},
        {"d_model": 48, "attention_n_heads": 6, "attention_n_kv_heads": 4},
        {"n_layers": 0},
        {"vocab_size": -1},
        {"attention_n_kv_heads": 0},
        {"d_model": 64, "attention_n_heads": 8, "attention_n_kv_heads": 2},
        {},
    ],
)
def test_the_config_shape_checks_agree_with_the_model_config(model):
    """`model_shape_problems` repeats `PicoDecoderConfig.check_shapes` (which travels as remote code)."""
    from pico_hf.models.pico_decoder import PicoDecoderConfig
    from pico_hf.training.config import ModelConfig, model_shape_problems

    section = ModelConfig(**model)
    fields = {k: v for k, v in vars(section).items() if k != "model_type"}
    try:
        PicoDecoderConfig(**fields)
        model_accepts = True
    except ValueError:
        model_accepts = False
    assert (model_shape_problems(section) == []) == model_accepts
