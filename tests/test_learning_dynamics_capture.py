"""Learning-dynamics capture during training equals a direct recomputation, and leaves training untouched."""

import os
import subprocess

import datasets
import pytest
import torch
from conftest import (
    assert_world_size,
    make_pretokenized,
    make_word_tokenizer,
    tiny_training_overrides,
    train_command,
)
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from pico_hf.learning_dynamics.capture import find_layers, load_states, save_states
from pico_hf.training.config import load_config
from pico_hf.training.data import BatchLayout, PretokenizedStream
from pico_hf.training.run import run_training

LD = "learning_dynamics"


def ld_overrides(tmp_path, **extra):
    val = tmp_path / "val" / "val.parquet"
    if not val.exists():
        make_pretokenized(val, n_rows=10, row_length=17, seed=1)
    return tiny_training_overrides(
        tmp_path,
        **{
            "checkpointing.learning_dynamics.eval_data": str(val),
            "checkpointing.learning_dynamics.batch_size": 4,
            **extra,
        },
    )


def train(tmp_path, callbacks=None, **extra):
    config, notes = load_config(None, ld_overrides(tmp_path, **extra))
    run_training(config, notes, extra_callbacks=callbacks)
    return config


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("ld")
    return train(tmp_path)


def checkpoint(config, step):
    return config.run_dir / "checkpoints" / f"step_{step}"


def recompute(model, batches):
    """Forward + backward of the mean next-token loss over micro-batches, recording last-token layer outputs."""
    layers = find_layers(model, ["attention.v_proj", "attention.o_proj", "swiglu.w_2"])
    outputs = {name: [] for name in layers}
    handles = [
        module.register_forward_hook(lambda m, a, out, name=name: outputs[name].append(out.detach()))
        for name, module in layers.items()
    ]
    total = sum((targets != -100).sum() for _, targets, _ in batches)
    model.zero_grad()
    for inputs, targets, mask in batches:
        model(
            input_ids=inputs,
            attention_mask=mask,
            shift_labels=targets,
            skip_logits=True,
            num_items_in_batch=total,
        ).loss.backward()
    for handle in handles:
        handle.remove()
    activations = {name: torch.cat([chunk[:, -1] for chunk in chunks]) for name, chunks in outputs.items()}
    gradients = {name: module.weight.grad.clone() for name, module in layers.items()}
    weights = {name: module.weight.detach().clone() for name, module in layers.items()}
    return activations, weights, gradients


def test_files_in_every_checkpoint(run):
    for step in (0, 2, 4):
        names = {p.name for p in (checkpoint(run, step) / LD).iterdir()}
        assert names == {
            f"{split}_{kind}"
            for split in ("train", "val")
            for kind in ("activations.safetensors", "weights.safetensors", "gradients.safetensors", "data")
        }
    # The last checkpoint has no next optimizer step, so only the evaluation split (as in pico-train).
    assert {p.name.split("_")[0] for p in (checkpoint(run, 6) / LD).iterdir()} == {"val"}
    keys = load_file(checkpoint(run, 2) / LD / "train_weights.safetensors").keys()
    assert sorted(keys) == sorted(
        f"layers.{i}.{s}" for i in (0, 1) for s in ("attention.v_proj", "attention.o_proj", "swiglu.w_2")
    )


def test_train_states_are_those_of_the_next_optimizer_step(run):
    """Step N's `train` states: step N's weights, step N+1's batch, gradients before its update."""
    step = 2
    model = AutoModelForCausalLM.from_pretrained(checkpoint(run, step)).train()
    states = load_states(checkpoint(run, step) / LD, "train")

    stream = PretokenizedStream(
        run.data.dataset.name, run.model.max_seq_len, run.model.vocab_size, seed=run.training.seed
    )
    layout = BatchLayout(global_batch=8, gradient_accumulation_steps=2, num_processes=1, process_index=0)
    batch, _ = next(stream.batches(start=step * 8, batch_size=8))
    saved = datasets.load_from_disk(str(checkpoint(run, step) / LD / "train_data"))
    assert saved["input_ids"] == batch.tolist()  # the batch of optimizer step N+1

    micro = [(m[:, :-1], m[:, 1:], None) for m in layout.micro_batches(batch)]
    activations, weights, gradients = recompute(model, micro)
    for name in activations:
        assert torch.equal(states["activations"][name], activations[name]), (
            name
        )  # exactly: same kernels, same shapes
        assert torch.equal(states["weights"][name], weights[name]), name
        torch.testing.assert_close(states["gradients"][name], gradients[name], rtol=1e-5, atol=1e-7, msg=name)


def test_val_states_equal_a_direct_computation(run):
    step = 4
    model = AutoModelForCausalLM.from_pretrained(checkpoint(run, step)).eval()
    states = load_states(checkpoint(run, step) / LD, "val")
    rows = torch.tensor(datasets.load_from_disk(str(checkpoint(run, step) / LD / "val_data"))["input_ids"])
    assert rows.shape == (10, 17)
    # Sub-batches of 4 rows; the last one padded with repeated rows that carry no loss and are dropped.
    padded = torch.cat([rows, rows[:2]])
    batches = []
    for start in range(0, 12, 4):
        chunk = padded[start : start + 4]
        targets = chunk[:, 1:].clone()
        if start == 8:
            targets[2:] = -100
        batches.append((chunk[:, :-1], targets, torch.ones_like(chunk[:, :-1])))
    activations, _, gradients = recompute(model, batches)
    for name in activations:
        torch.testing.assert_close(
            states["activations"][name], activations[name][:10], rtol=1e-5, atol=1e-6, msg=name
        )
        torch.testing.assert_close(states["gradients"][name], gradients[name], rtol=1e-4, atol=1e-7, msg=name)


def test_val_rows_of_mixed_lengths_run_sorted_and_are_stored_in_their_order(tmp_path):
    """The `val` rows run longest first (sub-batches padded to rows of their own length); the stored
    activations are in the split's order and equal, as the gradients (the same mean over the split's tokens),
    each row run alone without padding."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    generator = torch.Generator().manual_seed(3)
    lengths = [5, 17, 9, 3, 17, 12, 6, 15, 4, 11]
    rows = [torch.randint(2, 100, (n,), generator=generator).tolist() for n in lengths]
    val = tmp_path / "mixed" / "val.parquet"
    val.parent.mkdir(parents=True)
    pq.write_table(pa.table({"input_ids": rows}), val)
    config = train(
        tmp_path, **{"checkpointing.learning_dynamics.eval_data": str(val), "training.max_steps": 2}
    )
    directory = checkpoint(config, 2) / LD
    saved = datasets.load_from_disk(str(directory / "val_data"))["input_ids"]
    assert [list(row) for row in saved] == rows  # the split's order
    states = load_states(directory, "val")
    model = AutoModelForCausalLM.from_pretrained(checkpoint(config, 2)).eval()
    alone = [(torch.tensor([row[:-1]]), torch.tensor([row[1:]]), None) for row in rows]
    activations, _, gradients = recompute(model, alone)
    for name in activations:
        torch.testing.assert_close(
            states["activations"][name], activations[name], rtol=1e-5, atol=1e-6, msg=name
        )
        torch.testing.assert_close(states["gradients"][name], gradients[name], rtol=1e-4, atol=1e-7, msg=name)


def test_capture_leaves_training_bitwise_unchanged(run, tmp_path):
    without = train(tmp_path / "off", **{"checkpointing.learning_dynamics.layer_suffixes": "[]"})
    assert not (checkpoint(without, 2) / LD).exists()
    for step in (2, 6):
        a, b = (
            load_file(checkpoint(without, step) / "model.safetensors"),
            load_file(checkpoint(run, step) / "model.safetensors"),
        )
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_resumed_run_captures_the_same_states(run, tmp_path):
    from test_training_run import StopAfter

    with pytest.raises(KeyboardInterrupt):
        train(tmp_path, callbacks=[StopAfter(3)])
    resumed = train(tmp_path)
    for split in ("train", "val"):
        a, b = load_states(checkpoint(resumed, 4) / LD, split), load_states(checkpoint(run, 4) / LD, split)
        for kind in a:
            assert all(torch.equal(a[kind][k], b[kind][k]) for k in a[kind]), (split, kind)


def test_pico_train_pt_files_load_with_prefixes_stripped(tmp_path):
    weights = {"_forward_module.layers.0.swiglu.w_2": torch.randn(4, 8)}
    torch.save(weights, tmp_path / "train_weights.pt")
    torch.save(
        {"_forward_module.module.layers.0.swiglu.w_2": torch.randn(3, 4)}, tmp_path / "train_activations.pt"
    )
    states = load_states(tmp_path, "train")
    assert set(states) == {"weights", "activations"}
    assert torch.equal(
        states["weights"]["layers.0.swiglu.w_2"], weights["_forward_module.layers.0.swiglu.w_2"]
    )
    assert list(states["activations"]) == ["layers.0.swiglu.w_2"]


def test_save_states_round_trip(tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(make_word_tokenizer(tmp_path / "tok"))
    acts, weights = (
        {"layers.0.attention.v_proj": torch.randn(2, 4)},
        {"layers.0.attention.v_proj": torch.randn(4, 8)},
    )
    save_states(tmp_path / LD, "val", acts, weights, None, [[2, 3, 4], [5, 6, 7]], tokenizer)
    assert {p.name for p in (tmp_path / LD).iterdir()} == {
        "val_activations.safetensors",
        "val_weights.safetensors",
        "val_data",
    }
    data = datasets.load_from_disk(str(tmp_path / LD / "val_data"))
    assert data["text"] == ["w2 w3 w4", "w5 w6 w7"]
    assert torch.equal(
        load_states(tmp_path / LD, "val")["activations"]["layers.0.attention.v_proj"],
        acts["layers.0.attention.v_proj"],
    )


@pytest.mark.slow
def test_two_process_capture_equals_one_process_capture(tmp_path):
    def launch(root, processes):
        overrides = ld_overrides(root)
        return subprocess.run(
            [*train_command(processes), *overrides],
            env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
            capture_output=True,
            text=True,
            timeout=600,
        )

    for root, processes in ((tmp_path / "one", 1), (tmp_path / "two", 2)):
        result = launch(root, processes)
        assert result.returncode == 0, result.stderr[-3000:]
        assert_world_size(result.stderr, processes)
    for step in (0, 2, 4):
        for split in ("train", "val"):
            one = load_states(tmp_path / "one" / "runs" / "tiny" / "checkpoints" / f"step_{step}" / LD, split)
            two = load_states(tmp_path / "two" / "runs" / "tiny" / "checkpoints" / f"step_{step}" / LD, split)
            for kind in ("activations", "weights", "gradients"):
                for name in one[kind]:
                    torch.testing.assert_close(
                        two[kind][name],
                        one[kind][name],
                        rtol=1e-4,
                        atol=1e-5,
                        msg=f"{step} {split} {kind} {name}",
                    )
    # Both runs capture the same global train batch, in the same order.
    data = [
        datasets.load_from_disk(str(tmp_path / r / "runs/tiny/checkpoints/step_2" / LD / "train_data"))[
            "input_ids"
        ][:]
        for r in ("one", "two")
    ]
    assert [list(row) for row in data[0]] == [list(row) for row in data[1]]
    assert len(data[0]) > 0


def test_pt_file_format_writes_pico_train_files_that_analysis_reads(run, tmp_path):
    """`file_format: pt` writes pico-train's `{split}_{type}.pt` (plain tensor dicts for `torch.load(...,
    weights_only=True)`, the original pico-analyze's input) holding the same states; the analysis reads them."""
    from pico_hf.learning_dynamics.analysis_config import parse_analysis_config
    from pico_hf.learning_dynamics.analysis_sources import LocalRun
    from pico_hf.learning_dynamics.analyze import run_analysis

    pt_run = train(tmp_path, **{"checkpointing.learning_dynamics.file_format": "pt"})
    for step in (0, 2, 4, 6):
        folder = checkpoint(pt_run, step) / LD
        names = {p.name for p in folder.iterdir()}
        assert not any(name.endswith(".safetensors") for name in names), names
        splits = ("val",) if step == 6 else ("train", "val")
        for split in splits:
            expected = load_states(checkpoint(run, step) / LD, split)
            for kind in ("activations", "weights", "gradients"):
                loaded = torch.load(folder / f"{split}_{kind}.pt", map_location="cpu", weights_only=True)
                assert type(loaded) is dict and set(loaded) == set(expected[kind])
                for name, tensor in loaded.items():
                    assert type(tensor) is torch.Tensor and torch.equal(tensor, expected[kind][name])
                    # saved alone, not as a view into a larger buffer
                    assert tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
    specs = [
        {
            "metric_name": "norm",
            "norm_type": "frobenius",
            "data_split": "train",
            "components": [
                {
                    "component_name": "simple",
                    "data_type": "weights",
                    "layer_suffixes": "swiglu.w_2",
                    "layers": [0, 1],
                }
            ],
        }
    ]
    results = [
        run_analysis(
            parse_analysis_config(
                {"analysis_name": name, "metrics": specs, "monitoring": {"output_dir": str(tmp_path / name)}}
            ),
            LocalRun(source.run_dir),
        ).results
        for name, source in (("pt", pt_run), ("safetensors", run))
    ]
    assert results[0] == results[1] and sorted(next(iter(results[0].values()))) == [0, 2, 4]


def test_both_file_formats_and_bad_value(tmp_path):
    acts = {"layers.0.attention.v_proj": torch.randn(6, 4)[::2]}  # a strided view
    save_states(tmp_path / LD, "train", acts, acts, None, file_format="both")
    assert {p.name for p in (tmp_path / LD).iterdir()} == {
        f"train_{kind}.{suffix}" for kind in ("activations", "weights") for suffix in ("safetensors", "pt")
    }
    from_pt = torch.load(tmp_path / LD / "train_weights.pt", weights_only=True)
    assert torch.equal(from_pt["layers.0.attention.v_proj"], acts["layers.0.attention.v_proj"])
    assert torch.equal(
        load_file(tmp_path / LD / "train_weights.safetensors")["layers.0.attention.v_proj"],
        from_pt["layers.0.attention.v_proj"],
    )
    with pytest.raises(ValueError, match="file_format must be one of"):
        save_states(tmp_path / "x", "train", acts, acts, None, file_format="npz")
    from pico_hf.training.config import ConfigError

    with pytest.raises(
        ConfigError,
        match=r"checkpointing.learning_dynamics.file_format must be one of \['safetensors', 'pt', 'both'\], got 'npz'",
    ):
        load_config(None, ld_overrides(tmp_path, **{"checkpointing.learning_dynamics.file_format": "npz"}))
