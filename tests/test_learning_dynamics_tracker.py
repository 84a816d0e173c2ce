"""Learning-dynamics metrics during training: written and logged per checkpoint, equal to offline computation."""

import json

import pytest
from conftest import make_pretokenized, tiny_training_overrides

from pico_hf.learning_dynamics import compute_metrics
from pico_hf.learning_dynamics.capture import load_states
from pico_hf.learning_dynamics.tracker import MetricsTracker
from pico_hf.training.config import load_config
from pico_hf.training.run import run_training

V_PROJ = {
    "component_name": "simple",
    "data_type": "activations",
    "layer_suffixes": "attention.v_proj",
    "layers": [0, 1],
}
OV = {"value_layer": "attention.v_proj", "output_layer": "attention.o_proj"}
METRICS = [
    {
        "metric_name": "per",
        "data_split": "train",
        "components": [
            {
                "component_name": "simple",
                "data_type": "weights",
                "layer_suffixes": "swiglu.w_2",
                "layers": [0, 1],
            }
        ],
    },
    {"metric_name": "cka", "data_split": "val", "components": [V_PROJ]},
    {"metric_name": "cka", "data_split": "train", "target_checkpoint": 2, "components": [V_PROJ]},
    {
        "metric_name": "norm",
        "norm_type": "frobenius",
        "data_split": "val",
        "components": [
            {"component_name": "ov_circuit", "data_type": "weights", "layer_suffixes": OV, "layers": [0, 1]}
        ],
    },
    {
        "metric_name": "norm",
        "norm_type": "nuclear",
        "data_split": "val",
        "components": [
            {
                "component_name": "simple",
                "data_type": "gradients",
                "layer_suffixes": "swiglu.w_2",
                "layers": [1],
            }
        ],
    },
]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("metrics")
    val = make_pretokenized(tmp_path / "val" / "val.parquet", n_rows=10, row_length=17, seed=1)
    config, notes = load_config(
        None,
        tiny_training_overrides(
            tmp_path,
            **{
                "checkpointing.learning_dynamics.eval_data": str(val),
                "checkpointing.learning_dynamics.batch_size": 4,
                "checkpointing.learning_dynamics.metrics": json.dumps(METRICS),
            },
        ),
    )
    run_training(config, notes)
    return config


def ld_dir(config, step):
    return config.run_dir / "checkpoints" / f"step_{step}" / "learning_dynamics"


def saved_metrics(config, step):
    return json.loads((ld_dir(config, step) / "metrics.json").read_text())


def test_metrics_written_per_checkpoint(run):
    assert set(saved_metrics(run, 0)) == {
        "per_train",
        "norm_frobenius_val",
        "norm_nuclear_val",
    }  # nothing to compare yet
    assert set(saved_metrics(run, 2)) == {
        "per_train",
        "cka_val",
        "cka_train",
        "norm_frobenius_val",
        "norm_nuclear_val",
    }
    assert set(saved_metrics(run, 6)) == {
        "cka_val",
        "norm_frobenius_val",
        "norm_nuclear_val",
    }  # no train split at the end
    assert set(saved_metrics(run, 2)["norm_frobenius_val"]) == {
        f"layers.{layer}.ov_circuit.weights{head}"
        for layer in (0, 1)
        for head in ["", ".heads.0", ".heads.1", ".heads.2", ".heads.3"]
    }


def test_metrics_equal_offline_computation(run):
    by_name = {"per_train": METRICS[0], "norm_frobenius_val": METRICS[3], "norm_nuclear_val": METRICS[4]}
    for name, spec in by_name.items():
        split = spec["data_split"]
        offline = compute_metrics([spec], load_states(ld_dir(run, 4), split), model_shape=run.model)
        assert saved_metrics(run, 4)[name] == pytest.approx(next(iter(offline.values())), rel=1e-6)
    # Comparative: against the previous checkpoint by default, against a fixed step when configured.
    cka_previous = compute_metrics(
        [METRICS[1]], load_states(ld_dir(run, 4), "val"), load_states(ld_dir(run, 2), "val")
    )
    assert saved_metrics(run, 4)["cka_val"] == pytest.approx(cka_previous["cka"], rel=1e-6)
    cka_fixed = compute_metrics(
        [METRICS[2]], load_states(ld_dir(run, 4), "train"), load_states(ld_dir(run, 2), "train")
    )
    assert saved_metrics(run, 4)["cka_train"] == pytest.approx(cka_fixed["cka"], rel=1e-6)
    assert saved_metrics(run, 2)["cka_train"] == pytest.approx({k: 1.0 for k in cka_fixed["cka"]}, rel=1e-5)


def test_metrics_are_logged_as_curves(run):
    lines = [json.loads(line) for line in (run.run_dir / "logs" / "metrics.jsonl").read_text().splitlines()]
    logged = {line["step"]: line for line in lines if any(k.startswith("learning_dynamics/") for k in line)}
    assert sorted(logged) == [0, 2, 4, 6]
    assert logged[4]["learning_dynamics/cka_val/layers.1.attention.v_proj.activations"] == pytest.approx(
        saved_metrics(run, 4)["cka_val"]["layers.1.attention.v_proj.activations"]
    )


def test_tracker_keeps_only_needed_states(run):
    tracker = MetricsTracker.from_config(METRICS, run.model)
    for step in (0, 2, 4):
        tracker.update(step, ld_dir(run, step))
    # The previous checkpoint's val activations, and the fixed target's train activations; nothing else.
    assert set(tracker._kept) == {("val", 4), ("train", 2)}
    assert all(set(states) == {"activations"} for states in tracker._kept.values())


def test_specs_without_split_are_rejected(run):
    with pytest.raises(ValueError, match=r"need a data_split"):
        MetricsTracker.from_config([{k: v for k, v in METRICS[0].items() if k != "data_split"}], run.model)


def test_comparative_ov_metric_keeps_the_weights_its_target_needs(run):
    """An OV circuit of activations is built through W_O: the kept target states must include the weights."""
    spec = {
        "metric_name": "cka",
        "data_split": "val",
        "components": [
            {
                "component_name": "ov_circuit",
                "data_type": "activations",
                "layer_suffixes": OV,
                "layers": [0, 1],
            }
        ],
    }
    tracker = MetricsTracker.from_config([spec], run.model)
    assert tracker.update(0, ld_dir(run, 0)) == {}  # nothing earlier to compare with
    results = tracker.update(2, ld_dir(run, 2))
    assert set(tracker._kept) == {("val", 2)}
    assert set(tracker._kept[("val", 2)]) == {"activations", "weights"}
    expected = compute_metrics(
        [spec], load_states(ld_dir(run, 2), "val"), load_states(ld_dir(run, 0), "val"), model_shape=run.model
    )["cka"]
    assert results["cka_val"] == pytest.approx(expected)
    assert "layers.1.ov_circuit.activations.heads.0" in results["cka_val"]


def metrics_run(tmp_path, callbacks=None):
    val = make_pretokenized(tmp_path / "val" / "val.parquet", n_rows=10, row_length=17, seed=1)
    overrides = {
        "training.max_steps": 8,
        "checkpointing.learning_dynamics.eval_data": str(val),
        "checkpointing.learning_dynamics.batch_size": 4,
        "checkpointing.learning_dynamics.metrics": json.dumps(METRICS),
    }
    config, notes = load_config(None, tiny_training_overrides(tmp_path, **overrides))
    run_training(config, notes, extra_callbacks=callbacks)
    return config


def test_a_resumed_run_computes_the_same_metrics(tmp_path, caplog):
    """Killed after step 5 (latest: step_4, past the fixed target step 2) and restarted: every later
    checkpoint's metrics equal an uninterrupted run's, comparisons reading earlier states from disk."""
    from test_training_run import StopAfter

    reference = metrics_run(tmp_path / "reference")
    with pytest.raises(KeyboardInterrupt):
        metrics_run(tmp_path / "resumed", callbacks=[StopAfter(5)])
    caplog.set_level("INFO", logger="pico_hf.learning_dynamics")
    resumed = metrics_run(tmp_path / "resumed")
    assert not [r for r in caplog.records if "Skipping" in r.getMessage()]
    assert set(saved_metrics(resumed, 6)) == {
        "per_train",
        "cka_val",
        "cka_train",
        "norm_frobenius_val",
        "norm_nuclear_val",
    }
    for step in (6, 8):
        assert saved_metrics(resumed, step) == saved_metrics(reference, step), step  # bitwise resume


def test_a_missing_target_is_named_truthfully(run, caplog):
    caplog.set_level("INFO", logger="pico_hf.learning_dynamics")
    tracker = MetricsTracker.from_config([{**METRICS[1], "target_checkpoint": 3}], run.model)
    tracker.update(2, ld_dir(run, 2))
    tracker.update(4, ld_dir(run, 4))  # step 3 was no checkpoint
    assert [r.getMessage() for r in caplog.records] == [
        "Skipping cka_val at step 2: step 3 has not been reached to compare with"
    ]
    tracker = MetricsTracker.from_config([{**METRICS[1], "target_checkpoint": 3}], run.model)
    caplog.clear()
    tracker.update(4, ld_dir(run, 4))
    assert [r.getMessage() for r in caplog.records] == [
        "Skipping cka_val at step 4: no learning-dynamics states were saved at step 3 to compare with"
    ]
