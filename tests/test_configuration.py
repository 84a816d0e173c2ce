"""The shared config mechanism (pico_hf.configuration): dataclasses from mappings, with key paths in errors."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest

from pico_hf.configuration import (
    ConfigError,
    all_keys,
    apply_overrides,
    check_keys,
    coerce,
    from_dict,
    leaf_keys,
    load_yaml,
    parse_override,
    unknown_keys_listed,
)
from pico_hf.learning_dynamics import analysis_config
from pico_hf.training import config as training_config


@dataclass
class Optim:
    lr: float = 3e-4
    warmup: int = 10
    nesterov: bool = False


@dataclass
class Train:
    optim: Optim = field(default_factory=Optim)
    max_steps: int = 100
    name: str | None = None
    suffixes: list[str] = field(default_factory=lambda: ["a"])
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Root:
    train: Train = field(default_factory=Train)
    report: Mapping[str, Any] = field(default_factory=dict)
    tag: str = "x"


def test_builds_nested_dataclasses_with_coercion_and_defaults():
    config = from_dict(
        Root,
        {"train": {"optim": {"lr": "1e-3", "warmup": 5.0}, "suffixes": "b", "extra": {"k": 1}}, "tag": 7},
    )
    assert config.train.optim == Optim(lr=1e-3, warmup=5, nesterov=False)
    assert isinstance(config.train.optim.warmup, int)
    assert config.train.suffixes == ["b"]  # a lone string is a one-item list
    assert config.train.extra == {"k": 1} and config.tag == "7"
    assert config.train.max_steps == 100 and config.train.name is None
    assert from_dict(Root, {"train": None}) == Root()  # a null section: its defaults


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"train": {"max_steps": "ten"}}, "'train.max_steps' must be an integer, got 'ten'"),
        ({"train": {"max_steps": 2.5}}, "'train.max_steps' must be an integer, got 2.5"),
        ({"train": {"max_steps": True}}, "'train.max_steps' must be an integer, got True"),
        ({"train": {"optim": {"lr": "fast"}}}, "'train.optim.lr' must be a number, got 'fast'"),
        (
            {"train": {"optim": {"nesterov": "yes"}}},
            "'train.optim.nesterov' must be true or false, got 'yes'",
        ),
        ({"train": {"suffixes": ["a", None]}}, "'train.suffixes[1]' must be a string, got None"),
        ({"train": {"extra": [1]}}, "'train.extra' must be a mapping, got [1]"),
        ({"train": {"optim": 3}}, "'train.optim' must be a mapping, got 3"),
        ({"train": {"name": [1]}}, "'train.name' must be a string, got [1]"),
        (
            {"train": {"optim": {"lrr": 1}}},
            "Unknown config key 'train.optim.lrr'; did you mean 'train.optim.lr'?",
        ),
        ({"trian": {}}, "Unknown config key 'trian'; did you mean 'train'?"),
        # No close sibling: the closest key anywhere in the config.
        ({"optim": {"lr": 1}}, "Unknown config key 'optim'; did you mean 'train.optim'?"),
        (
            {"train": {"qqqqqqqq": 1}},
            "Unknown config key 'train.qqqqqqqq'; valid keys here: optim, max_steps, name, suffixes, extra",
        ),
    ],
)
def test_errors_name_the_dotted_key(values, message):
    with pytest.raises(ConfigError) as error:
        from_dict(Root, values)
    assert str(error.value).startswith(message)


def test_visit_sees_every_given_key_in_order():
    seen: list[str] = []
    from_dict(Root, {"tag": "y", "train": {"optim": {"lr": 1}, "max_steps": 3}}, visit=seen.append)
    assert seen == ["tag", "train", "train.optim", "train.optim.lr", "train.max_steps"]


def test_listed_unknown_keys_and_null_as_default():
    with pytest.raises(ConfigError) as error:
        from_dict(Root, {"train": {"optim": {"lrr": 1, "nesterof": True}}}, unknown=unknown_keys_listed)
    assert str(error.value) == (
        "Unknown key(s) ['lrr', 'nesterof'] in train.optim; valid keys: ['lr', 'warmup', 'nesterov']; "
        "did you mean 'lr' for 'lrr', 'nesterov' for 'nesterof'?"
    )
    config = from_dict(Root, {"tag": None, "train": {"name": None, "max_steps": None}}, none_is_default=True)
    assert config == Root()
    with pytest.raises(ConfigError, match="'tag' must be a string, got None"):
        from_dict(Root, {"tag": None})


def test_check_keys_lists_every_unknown_key():
    check_keys("steps", {"start": 0}, ("start", "end"))
    with pytest.raises(ConfigError) as error:
        check_keys("", {"colour": 1, "zz": 2}, ["color", "name"], lead="unknown")
    assert str(error.value) == (
        "unknown key(s) ['colour', 'zz']; valid keys: ['color', 'name']; did you mean 'color' for 'colour'?"
    )


def test_overrides_are_yaml_values_at_dotted_paths():
    assert parse_override("a.b=1.0e-3") == ("a.b", 1e-3)
    assert parse_override("a.b=1e-3") == ("a.b", "1e-3")  # YAML 1.1: a string, which `coerce` makes a float
    assert parse_override("a.b=[x, y]") == ("a.b", ["x", "y"])
    assert parse_override("a.b= ") == ("a.b", "")
    assert parse_override("a.b=c=d") == ("a.b", "c=d")
    tree = apply_overrides({"a": {"c": 1}}, ["a.b.d=2", "e=null", "a.b.d=3"])
    assert tree == {"a": {"c": 1, "b": {"d": 3}}, "e": None}
    assert sorted(leaf_keys(tree)) == ["a.b.d", "a.c", "e"]
    with pytest.raises(ConfigError, match=r"Override 'x' must look like section\.key=value"):
        parse_override("x")
    with pytest.raises(ConfigError, match=r"Override 'a\.c\.d' goes through 'c', which is not a section"):
        apply_overrides({"a": {"c": 1}}, ["a.c.d=1"])


def test_coerce_unions_try_each_type():
    assert coerce(None, int | None, "k") is None
    assert coerce("3", int | None, "k") == 3
    assert coerce(True, bool | None, "k") is True
    with pytest.raises(ConfigError, match="'k' must be true or false, got 'x'"):
        coerce("x", bool | None, "k")


def test_every_caller_uses_this_mechanism():
    """pico-train's, pico-analyze's and the study configs raise one error type and share override parsing."""
    from pico_hf.study import config as study_config

    assert (
        training_config.ConfigError is analysis_config.ConfigError is study_config.ConfigError is ConfigError
    )
    assert training_config.parse_override is study_config.parse_override is parse_override
    assert "training.optimization.lr" in all_keys(training_config.PicoTrainingConfig)
    with pytest.raises(ConfigError, match=r"Unknown key\(s\) \['colr'\] in monitoring.wandb"):
        analysis_config._parse_monitoring({"wandb": {"colr": 1}})
    # pico-analyze's nulls stand for the defaults.
    monitoring = analysis_config._parse_monitoring(
        {"output_dir": None, "save_to_wandb": None, "wandb": {"project": "p"}}
    )
    assert monitoring.output_dir == "analysis_results" and monitoring.save_to_wandb is False
    assert monitoring.wandb == analysis_config.WandbSettings(entity=None, project="p")
    assert analysis_config._parse_monitoring({"output_dir": ""}).output_dir == "analysis_results"


def test_config_files_missing_or_not_yaml_are_config_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {d_model: 8\n")
    for load in (
        lambda p: training_config.load_config(p),
        analysis_config.load_analysis_config,
    ):
        with pytest.raises(ConfigError, match=re.escape(f"{bad} is not valid YAML")):
            load(bad)
    with pytest.raises(ConfigError, match=r"Analysis config .*nope\.yaml does not exist"):
        load_yaml(tmp_path / "nope.yaml", "Analysis config")
    (tmp_path / "ok.yaml").write_text("a: [1, 2]\n")
    assert load_yaml(tmp_path / "ok.yaml", "Config file") == {"a": [1, 2]}


def test_metric_and_component_keys_suggest_the_closest():
    from pico_hf.learning_dynamics.components import ComponentSpec
    from pico_hf.learning_dynamics.metrics import MetricSpec

    component = {
        "component_name": "weights",
        "layer_suffix": "swiglu.w_2",
        "layers": [0],
        "data_type": "weights",
    }
    with pytest.raises(
        ConfigError, match=r"unknown component key\(s\) \['layer_suffix'\].*'layer_suffixes'\?"
    ):
        ComponentSpec.from_dict(component)
    with pytest.raises(ValueError, match=r"unknown key 'norm_typ' in spec of metric 'norm'.*'norm_type'\?"):
        MetricSpec.from_dict({"metric_name": "norm", "norm_typ": "nuclear", "components": [component]})
