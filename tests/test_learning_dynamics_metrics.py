"""Learning-dynamics components and metrics: parity with pico-analyze's outputs, caching, errors."""

import json
import math
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from pico_hf.learning_dynamics import (
    METRIC_REGISTRY,
    ComponentSpec,
    MetricSpec,
    ModelShape,
    RankDeficientWarning,
    compute_metrics,
    extract_component,
    parse_metric_specs,
    register_metric,
)
from pico_hf.learning_dynamics.components import ComponentBatch, layer_prefix
from pico_hf.learning_dynamics.metrics import SingleCheckpointMetric, SingularValueCache

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "learning-dynamics-metrics"

OV_SUFFIXES = {"output_layer": "attention.o_proj", "value_layer": "attention.v_proj"}


def _component(name, data_type, suffixes, layers=(0, 1)):
    return {
        "component_name": name,
        "data_type": data_type,
        "layer_suffixes": suffixes,
        "layers": list(layers),
    }


@pytest.fixture(scope="module")
def fixture():
    assert FIXTURE.is_dir(), f"missing reference fixture {FIXTURE}"
    expected = json.loads((FIXTURE / "expected.json").read_text())
    states = {"source": {}, "target": {}}
    for name, tensor in load_file(FIXTURE / "states.safetensors").items():
        role, data_type, layer = name.split("/")
        states[role].setdefault(data_type, {})[layer] = tensor
    return expected, states


def _spec(entry):
    """The fixture's entry in pico-analyze's config format (`metric` is an accepted alias)."""
    return {key: value for key, value in entry.items() if key not in ("values", "target")}


def _expected_values(entry):
    merged = {}
    for component_values in entry["values"]:
        merged.update(component_values)
    return merged


N_SPECS = 9


@pytest.mark.parametrize("index", range(N_SPECS))
def test_parity_with_pico_analyze(fixture, index):
    expected, states = fixture
    assert len(expected["expected"]) == N_SPECS
    entry = expected["expected"][index]
    target = states["target"] if entry["target"] else None
    results = compute_metrics([_spec(entry)], states["source"], target, model_shape=expected["model"])
    ((name, values),) = results.items()
    want = _expected_values(entry)
    assert list(values) == list(want)  # same keys, in pico-analyze's order
    tolerance = 1e-3 if entry["metric"] == "pwcca" else 1e-4
    for key, value in want.items():
        assert abs(values[key] - value) <= tolerance * abs(value), (name, key, values[key], value)


def test_all_specs_in_one_call_keep_every_norm(fixture):
    expected, states = fixture
    entries = expected["expected"]
    results = compute_metrics(
        [_spec(e) for e in entries], states["source"], states["target"], model_shape=expected["model"]
    )
    assert list(results) == [
        "cka",
        "pwcca",
        "per",
        "condition_number",
        "gini",
        "hoyer",
        "norm_frobenius",
        "norm_nuclear",
        "norm_inf",
    ]
    for entry, (name, values) in zip(entries, results.items(), strict=True):
        want = _expected_values(entry)
        tolerance = 1e-3 if name == "pwcca" else 1e-4
        assert all(abs(values[k] - v) <= tolerance * abs(v) for k, v in want.items()), name
    # The same matrix under two norms: both kept, different values.
    key = "layers.0.ov_circuit.weights"
    assert results["norm_frobenius"][key] < results["norm_nuclear"][key]


def test_result_names_and_output_files():
    components = [_component("simple", "weights", "swiglu.w_2")]
    nuclear = MetricSpec.from_dict(
        {"metric_name": "norm", "norm_type": "nuclear", "data_split": "val", "components": components}
    )
    frobenius = MetricSpec.from_dict(
        {"metric_name": "norm", "norm_type": "frobenius", "data_split": "val", "components": components}
    )
    per = MetricSpec.from_dict({"metric_name": "per", "data_split": "train", "components": components})
    assert (nuclear.result_name, frobenius.result_name, per.result_name) == (
        "norm_nuclear",
        "norm_frobenius",
        "per",
    )
    assert (nuclear.output_filename, per.output_filename) == ("norm_nuclear_val.json", "per_train.json")
    assert len(parse_metric_specs([nuclear, frobenius, per])) == 3
    with pytest.raises(ValueError, match=r"both write 'per_train\.json'"):
        parse_metric_specs([per, per])


def test_pwcca_is_deterministic_and_warns_on_rank_deficient_heads(fixture):
    expected, states = fixture
    # Per-head OV activations are [n_samples, d_model] with rank <= head_dim.
    spec = {"metric_name": "pwcca", "components": [_component("ov_circuit", "activations", OV_SUFFIXES)]}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = compute_metrics([spec], states["source"], states["target"], model_shape=expected["model"])
    messages = [str(w.message) for w in caught if issubclass(w.category, RankDeficientWarning)]
    assert any(m.startswith("pwcca on layers.0.ov_circuit.activations.heads.0, ") for m in messages), messages
    full = "pwcca on layers.0.ov_circuit.activations, layers.1.ov_circuit.activations: rank-deficient"
    assert any(m.startswith(full) for m in messages), messages
    assert {w.filename for w in caught} == {__file__}  # the warning points at the caller
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RankDeficientWarning)
        second = compute_metrics([spec], states["source"], states["target"], model_shape=expected["model"])
    assert first == second
    assert all(math.isfinite(value) for value in first["pwcca"].values())


def test_pwcca_full_rank_does_not_warn(fixture):
    _, states = fixture
    spec = {"metric_name": "pwcca", "components": [_component("simple", "activations", "attention.v_proj")]}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compute_metrics([spec], states["source"], states["target"])


def test_pwcca_needs_more_samples_than_neurons():
    torch.manual_seed(0)
    states = {"activations": {"layers.0.mlp": torch.randn(8, 16)}}
    spec = {"metric_name": "pwcca", "components": [_component("simple", "activations", "mlp", layers=[0])]}
    with pytest.warns(
        RankDeficientWarning, match=r"pwcca on layers\.0\.mlp\.activations: 8 samples for 16 neurons"
    ):
        results = compute_metrics([spec], states, states)
    assert math.isnan(results["pwcca"]["layers.0.mlp.activations"])


def test_pwcca_drops_constant_neurons():
    # A constant neuron has zero variance: dropped like in the SVCCA library, the rest still compared.
    torch.manual_seed(0)
    x = torch.randn(200, 6)
    x[:, 2] = 1.0
    y = x[:, [0, 1, 3, 4, 5]] @ torch.randn(5, 5)
    source = {"activations": {"layers.0.mlp": x}}
    target = {"activations": {"layers.0.mlp": torch.cat([y, torch.randn(200, 1)], dim=1)}}
    spec = {"metric_name": "pwcca", "components": [_component("simple", "activations", "mlp", layers=[0])]}
    value = compute_metrics([spec], source, target)["pwcca"]["layers.0.mlp.activations"]
    assert 0.9 < value <= 1.0 + 1e-9


def test_singular_values_are_computed_once_per_matrix(fixture, monkeypatch):
    expected, states = fixture
    calls = []
    svdvals = torch.linalg.svdvals

    def spy(matrices):
        calls.append(matrices.shape[0])
        return svdvals(matrices)

    monkeypatch.setattr(torch.linalg, "svdvals", spy)
    components = [
        _component("simple", "weights", "swiglu.w_2"),
        _component("ov_circuit", "weights", OV_SUFFIXES),
    ]
    specs = [
        {"metric_name": "per", "components": components},
        {"metric_name": "condition_number", "components": components},
        {"metric_name": "norm", "norm_type": "nuclear", "components": components},
    ]
    results = compute_metrics(specs, states["source"], model_shape=expected["model"])
    n_matrices = len(results["per"])  # 2 simple + 2 layers x (4 heads + full)
    assert n_matrices == 12
    assert sum(calls) == n_matrices  # every matrix decomposed once, shared by the three metrics
    assert len(calls) == 3  # batched: one call per same-shaped batch (simple, heads, full)


def test_singular_value_cache_keys_on_the_computation():
    cache = SingularValueCache()
    a = ComponentBatch(("m",), torch.diag(torch.tensor([3.0, 1.0]))[None], origin=("simple", "weights", "a"))
    b = ComponentBatch(("m",), torch.diag(torch.tensor([5.0, 2.0]))[None], origin=("simple", "weights", "b"))
    assert cache(a).tolist() == [[3.0, 1.0]]
    assert cache(b).tolist() == [[5.0, 2.0]]  # same key, different computation: not confused
    # A new tensor object for the same computation is served from the cache.
    again = ComponentBatch(("m",), torch.zeros(1, 2, 2), origin=("simple", "weights", "a"))
    assert cache(again).tolist() == [[3.0, 1.0]]


def _ov_reference(data_type, states, shape):
    """The OV circuit per head, head by head, from pico-analyze's definitions."""
    n_heads, n_kv, hd = shape.attention_n_heads, shape.attention_n_kv_heads, shape.head_dim
    weights, grads = states["weights"], states.get("gradients", {})
    w_v, w_o = weights["layers.0.attention.v_proj"], weights["layers.0.attention.o_proj"]
    heads = []
    for h in range(n_heads):
        k = h // (n_heads // n_kv)
        v_rows, o_cols = slice(k * hd, (k + 1) * hd), slice(h * hd, (h + 1) * hd)
        if data_type == "weights":
            heads.append(w_v[v_rows] @ w_o[:, o_cols])
        elif data_type == "activations":
            heads.append(states["activations"]["layers.0.attention.v_proj"][:, v_rows] @ w_o[:, o_cols].T)
        else:
            dw_v, dw_o = grads["layers.0.attention.v_proj"], grads["layers.0.attention.o_proj"]
            heads.append(w_o[:, o_cols] @ dw_v[v_rows] + dw_o[:, o_cols] @ w_v[v_rows])
    return heads


@pytest.mark.parametrize("data_type", ["weights", "activations", "gradients"])
def test_ov_circuit_matches_per_head_definition(data_type):
    torch.manual_seed(0)
    shape = ModelShape(d_model=24, attention_n_heads=6, attention_n_kv_heads=2)
    kv_dim = shape.attention_n_kv_heads * shape.head_dim
    states = {
        "weights": {
            "layers.0.attention.v_proj": torch.randn(kv_dim, 24),
            "layers.0.attention.o_proj": torch.randn(24, 24),
        },
        "gradients": {
            "layers.0.attention.v_proj": torch.randn(kv_dim, 24),
            "layers.0.attention.o_proj": torch.randn(24, 24),
        },
        "activations": {"layers.0.attention.v_proj": torch.randn(10, kv_dim)},
    }
    data = extract_component(_component("ov_circuit", data_type, OV_SUFFIXES, layers=[0]), states, shape)
    tensors = data.tensors()
    heads = _ov_reference(data_type, states, shape)
    assert list(tensors) == [f"layers.0.ov_circuit.{data_type}.heads.{h}" for h in range(6)] + [
        f"layers.0.ov_circuit.{data_type}"
    ]
    for h, head in enumerate(heads):
        torch.testing.assert_close(tensors[f"layers.0.ov_circuit.{data_type}.heads.{h}"], head)
    torch.testing.assert_close(tensors[f"layers.0.ov_circuit.{data_type}"], torch.cat(heads, dim=1))


def test_simple_component_keys_prefix_and_dtype():
    states = {
        "activations": {f"model.layers.{i}.mlp": torch.ones(4, 3, dtype=torch.bfloat16) for i in range(12)}
    }
    assert layer_prefix(list(states["activations"])) == "model.layers."
    data = extract_component(_component("simple", "activations", "mlp", layers=[10, 11]), states)
    assert data.keys == ("model.layers.10.mlp.activations", "model.layers.11.mlp.activations")
    assert (
        data.batches[0].data.dtype == torch.float32
    )  # bfloat16 activations are upcast for the linear algebra


def test_registering_a_metric_is_one_class(fixture, monkeypatch):
    _, states = fixture

    class MaxSingularValue(SingleCheckpointMetric):
        name = "max_singular_value"

        def compute(self, batch, singular_values):
            return singular_values(batch)[:, 0]

    monkeypatch.setitem(METRIC_REGISTRY, MaxSingularValue.name, MaxSingularValue)
    register_metric(MaxSingularValue)
    spec = {
        "metric_name": "max_singular_value",
        "components": [_component("simple", "weights", "swiglu.w_2")],
    }
    results = compute_metrics([spec], states["source"])
    weight = states["source"]["weights"]["layers.0.swiglu.w_2"]
    assert results["max_singular_value"]["layers.0.swiglu.w_2.weights"] == pytest.approx(
        torch.linalg.matrix_norm(weight, ord=2).item(), rel=1e-5
    )


# -----------------
# Errors
# -----------------


def _norm_spec(**overrides):
    spec = {
        "metric_name": "norm",
        "norm_type": "frobenius",
        "components": [_component("simple", "weights", "swiglu.w_2")],
    }
    spec.update(overrides)
    return spec


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            _norm_spec(metric_name="rank"),
            r"unknown metric 'rank'; valid metrics: \['cka', 'condition_number', 'gini'",
        ),
        (
            _norm_spec(norm_type=None),
            r"metric 'norm' needs norm_type in \['frobenius', 'nuclear', 'inf'\], got None",
        ),
        (_norm_spec(norm_type="spectral"), r"needs norm_type in .* got 'spectral'"),
        (_norm_spec(step=3), r"unknown key 'step' in spec of metric 'norm'; valid keys"),
        (_norm_spec(components=[]), r"metric 'norm' spec has no components"),
        (
            _norm_spec(components=[_component("attention", "weights", "attention.v_proj")]),
            r"unknown component_name 'attention'; valid component names: \['ov_circuit', 'simple'\]",
        ),
        (
            _norm_spec(components=[{**_component("simple", "weights", "x"), "component_type": "simple"}]),
            r"unknown component key\(s\) \['component_type'\]",
        ),
        (
            _norm_spec(components=[_component("simple", "biases", "swiglu.w_2")]),
            r"component 'simple' does not support data_type 'biases'",
        ),
        (
            _norm_spec(components=[_component("ov_circuit", "weights", {"value_layer": "attention.v_proj"})]),
            r"component 'ov_circuit' needs layer_suffixes with exactly \['output_layer', 'value_layer'\]",
        ),
        (
            {"metric_name": "per", "components": [_component("simple", "activations", "swiglu.w_2")]},
            r"metric 'per' does not support data_type 'activations'.*supported: weights, gradients",
        ),
    ],
)
def test_bad_specs_are_named(spec, message):
    with pytest.raises(ValueError, match=message):
        MetricSpec.from_dict(spec)


def test_missing_layer_is_named(fixture):
    _, states = fixture
    spec = _norm_spec(components=[_component("simple", "weights", "swiglu.w_2", layers=[0, 5])])
    with pytest.raises(
        ValueError, match=r"weights have no layer 'layers\.5\.swiglu\.w_2' \(available: layers\.0\."
    ):
        compute_metrics([spec], states["source"])
    with pytest.raises(ValueError, match=r"states have no 'gradients' entry \(have: \['weights'\]\)"):
        compute_metrics(
            [_norm_spec(components=[_component("simple", "gradients", "swiglu.w_2")])],
            {"weights": states["source"]["weights"]},
        )


def test_shape_mismatches_are_named(fixture):
    _, states = fixture
    ov_spec = _norm_spec(components=[_component("ov_circuit", "weights", OV_SUFFIXES)])
    wrong = {"d_model": 64, "attention_n_heads": 4, "attention_n_kv_heads": 4}
    with pytest.raises(
        ValueError, match=r"weights of layer 0 'attention\.v_proj' has shape \(32, 64\), expected \(64, 64\)"
    ):
        compute_metrics([ov_spec], states["source"], model_shape=wrong)
    with pytest.raises(ValueError, match="needs the model shape"):
        compute_metrics([ov_spec], states["source"])
    cka = {"metric_name": "cka", "components": [_component("simple", "activations", "swiglu.w_2")]}
    short_target = {"activations": {k: v[:100] for k, v in states["target"]["activations"].items()}}
    with pytest.raises(
        ValueError,
        match=r"'layers\.0\.swiglu\.w_2\.activations': source has shape \(300, 64\), target \(100, 64\)",
    ):
        compute_metrics([cka], states["source"], short_target)
    with pytest.raises(ValueError, match="pass target_states"):
        compute_metrics([cka], states["source"])
    with pytest.raises(ValueError, match=r"d_model .* must be divisible by attention_n_heads"):
        ModelShape(d_model=10, attention_n_heads=4, attention_n_kv_heads=2)


def test_duplicate_result_names_are_rejected(fixture):
    _, states = fixture
    with pytest.raises(ValueError, match=r"share the result name\(s\) \['norm_frobenius'\]"):
        compute_metrics([_norm_spec(), _norm_spec()], states["source"])


def test_component_spec_round_trip():
    spec = ComponentSpec.from_dict(_component("ov_circuit", "weights", OV_SUFFIXES))
    assert spec.layer_suffixes == (("output_layer", "attention.o_proj"), ("value_layer", "attention.v_proj"))
    assert spec.suffix_map == OV_SUFFIXES
    assert spec == ComponentSpec.from_dict(
        _component("ov_circuit", "weights", dict(reversed(OV_SUFFIXES.items())))
    )


def test_model_shape_from_configs():
    expected = ModelShape(d_model=384, attention_n_heads=12, attention_n_kv_heads=4)
    fields = {"d_model": 384, "attention_n_heads": 12, "attention_n_kv_heads": 4, "n_layers": 12}
    assert ModelShape.from_config(SimpleNamespace(**fields)) == expected  # e.g. PicoDecoderConfig
    assert ModelShape.from_config({"model": fields}) == expected  # a pico training config
    assert expected.head_dim == 32
    with pytest.raises(ValueError, match="model config lacks attention_n_kv_heads"):
        ModelShape.from_config({"d_model": 384, "attention_n_heads": 12})
