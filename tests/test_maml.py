"""MAML pretraining (pico_hf.training.maml): meta gradients against independent autograd computations, SMLMT
episodes, the step schedule, config errors, and end-to-end runs (resume, checkpoints, learning dynamics)."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import (
    REPO,
    StopAfter,
    assert_bitwise_equal,
    final_weights,
    make_pretokenized,
    tiny_training_overrides,
    train,
)
from datasets import load_from_disk
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import pico_hf  # noqa: F401  (registers the Auto classes)
from pico_hf.training.config import ConfigError, load_config
from pico_hf.training.maml import (
    HEAD_NAME,
    adapt_and_query,
    build_head,
    is_meta_step,
    sample_episode,
)
from pico_hf.training.modes.maml import MAMLConfig

# --- the meta gradient -------------------------------------------------------------------------------------


def head_and_episode(n_way=3, d=6, hidden=5, layers=2, seed=0):
    """A head and an episode whose query features come from a tiny differentiable 'backbone' (a matrix B)."""
    head = build_head(d, MAMLConfig(n_way=n_way, head_hidden_dim=hidden, head_num_layers=layers), seed)
    generator = torch.Generator().manual_seed(seed)
    support = torch.randn(n_way * 2, d, generator=generator)
    support_labels = torch.arange(n_way).repeat_interleave(2)
    raw_query = torch.randn(n_way, d, generator=generator)
    backbone = torch.randn(d, d, generator=generator).requires_grad_()
    query_labels = torch.arange(n_way)
    return head, support, support_labels, raw_query, backbone, query_labels


def by_hand_forward(params, x):
    """The head (Linear, ReLU, Linear, ...) written out, independent of nn.Sequential and functional_call."""
    weights = [params[k] for k in params if k.endswith("weight")]
    biases = [params[k] for k in params if k.endswith("bias")]
    for i, (w, b) in enumerate(zip(weights, biases, strict=True)):
        x = x @ w.T + b
        if i < len(weights) - 1:
            x = x.clamp(min=0)
    return x


def meta_gradients(head, support, support_labels, raw_query, backbone, query_labels, steps, lr, first_order):
    head.zero_grad()
    backbone.grad = None
    result = adapt_and_query(
        head, support, support_labels, raw_query @ backbone, query_labels, steps, lr, first_order
    )
    result.query_loss.backward()
    return [p.grad.clone() for p in head.parameters()], backbone.grad.clone(), result


def test_inner_lr_zero_gives_the_plain_query_gradient():
    head, support, support_labels, raw_query, backbone, query_labels = head_and_episode()
    for first_order in (True, False):
        head_grads, backbone_grad, _ = meta_gradients(
            head, support, support_labels, raw_query, backbone, query_labels, 5, 0.0, first_order
        )
        plain = F.cross_entropy(
            by_hand_forward(dict(head.named_parameters()), raw_query @ backbone), query_labels
        )
        expected = torch.autograd.grad(plain, [*head.parameters(), backbone])
        for actual, wanted in zip([*head_grads, backbone_grad], expected, strict=True):
            torch.testing.assert_close(actual, wanted)


def test_first_order_gradient_is_the_straight_through_definition():
    head, support, support_labels, raw_query, backbone, query_labels = head_and_episode()
    steps, lr = 4, 0.5
    before = {k: v.detach().clone() for k, v in head.named_parameters()}
    head_grads, backbone_grad, result = meta_gradients(
        head, support, support_labels, raw_query, backbone, query_labels, steps, lr, first_order=True
    )
    # By hand: SGD on copies of the head, then the query gradient w.r.t. the adapted weights (as leaves) is the
    # head's gradient, and the backbone's gradient is taken through the adapted head.
    adapted = {k: v.detach().clone() for k, v in head.named_parameters()}
    first_loss = None
    for _ in range(steps):
        leaves = {k: v.requires_grad_() for k, v in adapted.items()}
        loss = F.cross_entropy(by_hand_forward(leaves, support), support_labels)
        first_loss = loss.item() if first_loss is None else first_loss
        grads = torch.autograd.grad(loss, list(leaves.values()))
        adapted = {k: (v - lr * g).detach() for (k, v), g in zip(leaves.items(), grads, strict=True)}
    leaves = {k: v.requires_grad_() for k, v in adapted.items()}
    query = F.cross_entropy(by_hand_forward(leaves, raw_query @ backbone), query_labels)
    expected = torch.autograd.grad(query, [*leaves.values(), backbone])
    for actual, wanted in zip([*head_grads, backbone_grad], expected, strict=True):
        torch.testing.assert_close(actual, wanted)
    assert result.query_loss.item() == pytest.approx(query.item(), rel=1e-6)
    assert result.inner_loss_first == pytest.approx(first_loss, rel=1e-6)
    # Adaptation fits the support: the loss after it is below the first inner step's.
    assert result.support_loss < result.inner_loss_first
    # The head itself is untouched by the inner loop (restored after the episode by construction).
    assert_bitwise_equal({k: v.detach() for k, v in head.named_parameters()}, before)


def test_second_order_gradient_goes_through_the_unrolled_inner_loop():
    head, support, support_labels, raw_query, backbone, query_labels = head_and_episode()
    steps, lr = 3, 0.5
    head_grads, backbone_grad, _ = meta_gradients(
        head, support, support_labels, raw_query, backbone, query_labels, steps, lr, first_order=False
    )
    params = dict(head.named_parameters())
    fast = dict(params)
    for _ in range(steps):
        loss = F.cross_entropy(by_hand_forward(fast, support), support_labels)
        grads = torch.autograd.grad(loss, list(fast.values()), create_graph=True)
        fast = {k: v - lr * g for (k, v), g in zip(fast.items(), grads, strict=True)}
    query = F.cross_entropy(by_hand_forward(fast, raw_query @ backbone), query_labels)
    expected = torch.autograd.grad(query, [*params.values(), backbone])
    for actual, wanted in zip([*head_grads, backbone_grad], expected, strict=True):
        torch.testing.assert_close(actual, wanted)
    # Second order differs from first order (the check above is not vacuous).
    first_grads, _, _ = meta_gradients(
        head, support, support_labels, raw_query, backbone, query_labels, steps, lr, first_order=True
    )
    assert not torch.allclose(first_grads[0], head_grads[0])


def test_meta_loss_reports_the_lm_loss_and_trains_on_the_meta_objective():
    from conftest import tiny_config

    from pico_hf import PicoDecoderForCausalLM
    from pico_hf.training.maml import MAMLObjective

    model = PicoDecoderForCausalLM(tiny_config(d_model=32, n_layers=1, attention_n_heads=4)).train()
    config = MAMLConfig(n_way=3, k_shot=2, n_query=1, inner_steps=2, inner_lr=0.5, head_hidden_dim=8,
                        head_num_layers=2, lm_loss_weight=0.5)  # fmt: skip
    objective = MAMLObjective(config, d_model=32, mask_token=1, seed=0)
    rows = torch.randint(2, 10, (2, 17), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": rows[:, :-1], "shift_labels": rows[:, 1:]}
    episode = sample_episode(inputs["input_ids"], 3, 2, 1, mask_token=1, seed=0, step=0, index=0)
    loss = objective.meta_loss(model, inputs, episode)
    loss.backward()
    actual = [p.grad.clone() for p in [*model.parameters(), *objective.head.parameters()]]

    model.zero_grad()
    objective.head.zero_grad()
    outputs = model(
        input_ids=episode.input_ids, shift_labels=inputs["shift_labels"], output_hidden_states=True
    )
    features = outputs.hidden_states[-1].reshape(-1, 32)
    query = adapt_and_query(
        objective.head, features[episode.support].detach(), episode.support_labels, features[episode.query],
        episode.query_labels, 2, 0.5,
    ).query_loss  # fmt: skip
    assert loss.item() == pytest.approx(outputs.loss.item(), rel=1e-6)  # the value: the LM loss
    (query + 0.5 * outputs.loss).backward()  # the gradient: the meta objective
    expected = [p.grad for p in [*model.parameters(), *objective.head.parameters()]]
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e)


# --- episodes ----------------------------------------------------------------------------------------------


def test_episode_properties():
    generator = torch.Generator().manual_seed(3)
    input_ids = torch.randint(2, 14, (4, 16), generator=generator)
    n_way, k_shot, n_query, mask = 5, 3, 2, 1
    episode = sample_episode(input_ids, n_way, k_shot, n_query, mask, seed=7, step=4, index=1)
    flat, masked = input_ids.reshape(-1), episode.input_ids.reshape(-1)
    assert episode.support.shape == (n_way * k_shot,) and episode.query.shape == (n_way * n_query,)
    assert episode.support_labels.min() >= 0 and episode.support_labels.max() < n_way
    assert set(episode.query_labels.tolist()) <= set(episode.support_labels.tolist())
    assert sorted(episode.support_labels.tolist()) == sorted(list(range(n_way)) * k_shot)
    # Each support/query position holds its class's token in the original batch.
    for positions, labels in (
        (episode.support, episode.support_labels),
        (episode.query, episode.query_labels),
    ):
        assert torch.equal(flat[positions], episode.token_types[labels])
    assert len(set(episode.support.tolist()) | set(episode.query.tolist())) == n_way * (k_shot + n_query)
    # Every occurrence of the episode's token types is masked, nothing else is changed.
    chosen = torch.isin(flat, episode.token_types)
    assert torch.equal(masked[chosen], torch.full_like(masked[chosen], mask))
    assert torch.equal(masked[~chosen], flat[~chosen])
    # The same seed, step and micro-batch index give the same episode; another step another one.
    again = sample_episode(input_ids, n_way, k_shot, n_query, mask, seed=7, step=4, index=1)
    other = sample_episode(input_ids, n_way, k_shot, n_query, mask, seed=7, step=5, index=1)
    for name in ("input_ids", "support", "query", "token_types"):
        assert torch.equal(getattr(again, name), getattr(episode, name))
    assert not torch.equal(other.support, episode.support)


def test_episode_needs_n_way_types_occurring_k_plus_q_times():
    input_ids = torch.tensor([[5, 5, 5, 6, 6, 6, 7, 7, 1, 1, 1, 1]])
    assert (
        sample_episode(input_ids, 3, 2, 1, mask_token=1, seed=0, step=0, index=0) is None
    )  # 7 twice, 1 is mask
    episode = sample_episode(input_ids, 2, 2, 1, mask_token=1, seed=0, step=0, index=0)
    assert sorted(episode.token_types.tolist()) == [5, 6]


# --- the schedule ------------------------------------------------------------------------------------------


def test_schedule_is_a_pure_function_of_seed_and_step():
    schedule = [is_meta_step(42, step, 0.5) for step in range(2000)]
    assert schedule == [is_meta_step(42, step, 0.5) for step in range(2000)]
    assert 0.45 < sum(schedule) / len(schedule) < 0.55
    assert schedule != [is_meta_step(43, step, 0.5) for step in range(2000)]
    assert not any(is_meta_step(42, step, 0.0) for step in range(200))
    assert all(is_meta_step(42, step, 1.0) for step in range(200))


# --- config errors -----------------------------------------------------------------------------------------

MAML = {
    "training.maml.enabled": "true",
    "training.maml.n_way": 3,
    "training.maml.k_shot": 2,
    "training.maml.n_query": 1,
    "training.maml.inner_steps": 3,
    "training.maml.inner_lr": 0.1,
    "training.maml.head_hidden_dim": 8,
    "training.maml.head_num_layers": 2,
}


def small_vocab_data(tmp_path):
    """Token ids 2..11 only, so every micro-batch can make an episode."""
    make_pretokenized(tmp_path / "data" / "train.parquet", n_rows=48, row_length=33, vocab_size=12)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"training.maml.hybrid_ratio": 1.5}, "training.maml.hybrid_ratio must be between 0 and 1, got 1.5"),
        ({"training.maml.k_shot": 0}, "training.maml.k_shot must be at least 1, got 0"),
        ({"training.maml.n_way": 1}, "training.maml.n_way must be at least 2, got 1"),
        ({"training.maml.inner_lr": -0.1}, "training.maml.inner_lr must be non-negative"),
        ({"training.maml.mask_token": 500}, "training.maml.mask_token (500) is not a token id below 128"),
        (
            {"training.maml.n_way": 200},
            "training.maml.n_way (200) must be smaller than model.vocab_size (128)",
        ),
        ({"training.maml.nway": 3}, "did you mean 'training.maml.n_way'?"),
    ],
)
def test_config_errors(tmp_path, change, message):
    with pytest.raises(ConfigError) as error:
        load_config(None, tiny_training_overrides(tmp_path, **{**MAML, **change}))
    assert message in str(error.value)


def test_n_way_beyond_the_micro_batch_is_an_error_before_step_1(tmp_path):
    # Micro-batch: 8 / 2 accumulation = 4 sequences of 16 tokens = 64 tokens: at most 21 classes of 3.
    with pytest.raises(
        ConfigError, match=r"n_way \(22\) x \(k_shot \+ n_query\) \(3\) exceeds the 4 x 16 tokens"
    ):
        train(tmp_path, **{**MAML, "training.maml.n_way": 22})
    assert not (tmp_path / "runs" / "tiny" / "checkpoints" / "step_0").exists()


def test_micro_batches_without_an_episode_fall_back_to_lm_and_are_counted(tmp_path, caplog):
    # Random ids over ~100 types in 64 tokens: 20 types occurring 3 times never happen.
    summary, config = train(
        tmp_path, **{**MAML, "training.maml.n_way": 20, "training.maml.hybrid_ratio": 1.0}
    )
    assert summary["steps"] == 6
    logs = [json.loads(line) for line in (config.logs_dir / "metrics.jsonl").read_text().splitlines()]
    last = [entry for entry in logs if "loss" in entry][-1]
    assert last["maml/meta_steps"] == 6 and last["maml/lm_steps"] == 0
    assert last["maml/fallback_micro_batches"] == 12  # 6 steps x 2 micro-batches
    assert "trains as a language-modelling micro-batch" in caplog.text


def test_second_order_and_every_step_meta_trains_end_to_end(tmp_path):
    small_vocab_data(tmp_path)
    overrides = {**MAML, "training.maml.first_order": "false", "training.maml.hybrid_ratio": 1.0}
    summary, config = train(tmp_path, **overrides, **{"training.max_steps": 2})
    last = maml_metrics(config.run_dir)[-1]
    assert summary["steps"] == 2 and last["maml/meta_steps"] == 2 and last["maml/lm_steps"] == 0
    heads = [
        load_file(config.run_dir / "checkpoints" / f"step_{s}" / "fabric_state" / HEAD_NAME) for s in (0, 2)
    ]
    assert not torch.equal(heads[0]["2.weight"], heads[1]["2.weight"])


def test_resuming_a_run_without_a_head_names_the_file(tmp_path):
    small_vocab_data(tmp_path)
    train(tmp_path, **{"training.max_steps": 2})
    with pytest.raises(ConfigError, match=r"has no maml_head\.safetensors: it was not written by a run with"):
        train(tmp_path, **MAML, **{"training.max_steps": 4})


# --- end to end --------------------------------------------------------------------------------------------


def maml_metrics(run_dir):
    lines = (run_dir / "logs" / "metrics.jsonl").read_text().splitlines()
    return [entry for entry in map(json.loads, lines) if "loss" in entry]


@pytest.fixture(scope="module")
def maml_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("maml")
    small_vocab_data(tmp_path)
    val = make_pretokenized(tmp_path / "val" / "val.parquet", n_rows=16, row_length=17, vocab_size=12, seed=1)
    summary, config = train(tmp_path, **MAML, **{"checkpointing.learning_dynamics.eval_data": str(val)})
    return summary, config, tmp_path


def test_run_logs_meta_and_lm_steps(maml_run):
    summary, config, _ = maml_run
    assert summary["steps"] == 6
    logs = maml_metrics(config.run_dir)
    schedule = [is_meta_step(42, step, 0.5) for step in range(6)]
    assert any(schedule) and not all(schedule)  # both kinds occur in this run
    for entry in logs:
        done = schedule[: entry["step"]]
        assert (entry["maml/meta_steps"], entry["maml/lm_steps"]) == (sum(done), len(done) - sum(done))
        assert entry["maml/fallback_micro_batches"] == 0
        meta_logged = "maml/query_loss" in entry
        assert (
            meta_logged == schedule[entry["step"] - 1]
        )  # logged every step: per-episode values of meta steps
        if meta_logged:
            for key in ("support", "query"):
                assert 0 <= entry[f"maml/{key}_accuracy"] <= 1 and entry[f"maml/{key}_loss"] > 0
            assert entry["maml/inner_loss_last"] < entry["maml/inner_loss_first"]


def test_checkpoint_is_a_plain_pico_decoder_and_the_head_is_training_state(maml_run, tmp_path):
    _, config, _ = maml_run
    _, baseline = train(tmp_path, **{"training.max_steps": 2})
    for step in (0, 2, 4, 6):
        step_dir = config.run_dir / "checkpoints" / f"step_{step}"
        keys = set(load_file(step_dir / "model.safetensors"))
        assert keys == set(load_file(baseline.run_dir / "checkpoints" / "step_2" / "model.safetensors"))
        _, info = AutoModelForCausalLM.from_pretrained(step_dir, output_loading_info=True)
        assert not any(info.values()), info  # no missing or unexpected keys
        head = load_file(step_dir / "fabric_state" / HEAD_NAME)
        assert set(head) == {"0.weight", "0.bias", "2.weight", "2.bias"} and head["2.weight"].shape == (3, 8)
    # Learning dynamics: the step after checkpoint 4 is a meta step, after checkpoint 2 an LM step; the `train`
    # split records the micro-batches the model saw (masked with the pad token, id 0, on meta steps).
    assert [is_meta_step(42, step, 0.5) for step in (2, 4)] == [False, True]
    ids = {}
    for step in (2, 4):
        rows = load_from_disk(
            config.run_dir / "checkpoints" / f"step_{step}" / "learning_dynamics" / "train_data"
        )
        ids[step] = torch.tensor(rows["input_ids"])
    assert not (ids[2] == 0).any() and (ids[4] == 0).any()
    # The head trains: its weights at step 6 differ from its initialisation.
    first = load_file(config.run_dir / "checkpoints" / "step_0" / "fabric_state" / HEAD_NAME)
    last = load_file(config.run_dir / "checkpoints" / "step_6" / "fabric_state" / HEAD_NAME)
    assert not torch.equal(first["0.weight"], last["0.weight"])


def test_resume_is_bitwise_identical_with_the_same_schedule(maml_run, tmp_path):
    _, config, _ = maml_run
    small_vocab_data(tmp_path)
    val = make_pretokenized(tmp_path / "val" / "val.parquet", n_rows=16, row_length=17, vocab_size=12, seed=1)
    overrides = {**MAML, "checkpointing.learning_dynamics.eval_data": str(val)}
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path, callbacks=[StopAfter(3)], **overrides)
    summary, resumed = train(tmp_path, **overrides)
    assert summary["resumed_from"].endswith("step_2")
    assert_bitwise_equal(final_weights(resumed.run_dir), final_weights(config.run_dir))
    head = lambda run: load_file(run / "checkpoints" / "latest" / "fabric_state" / HEAD_NAME)  # noqa: E731
    assert_bitwise_equal(head(resumed.run_dir), head(config.run_dir))
    # The resumed run's logs from step 3 on equal the uninterrupted run's, schedule counts included.
    after = lambda run: [e for e in maml_metrics(run) if e["step"] > 2]  # noqa: E731
    drop = ("tokens_per_second", "train_runtime", "train_tokens_per_second", "epoch")
    clean = lambda entries: [{k: v for k, v in e.items() if k not in drop} for e in entries]  # noqa: E731
    assert clean(after(resumed.run_dir))[-4:] == clean(after(config.run_dir))


def _load_analyze_cli():
    spec = importlib.util.spec_from_file_location("analyze_cli", REPO / "recipes" / "analyze.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_learning_dynamics_analyse_with_the_baseline_analysis_config(maml_run, tmp_path):
    _, config, _ = maml_run
    # recipes/configs/analysis/demo.yaml, the baseline's analysis, with this run's layers and steps.
    analysis = yaml.safe_load((REPO / "recipes" / "configs" / "analysis" / "demo.yaml").read_text())
    analysis["steps"] = {"start": 0, "end": 6, "step": 2}
    analysis["monitoring"] = {"output_dir": str(tmp_path / "out")}
    for metric in analysis["metrics"]:
        if "target_checkpoint" in metric:
            metric["target_checkpoint"] = 6
        for component in metric["components"]:
            component["layers"] = [0, 1]
    path = tmp_path / "analysis.yaml"
    path.write_text(yaml.safe_dump(analysis))
    cli = _load_analyze_cli()
    assert cli.main(["--config", str(path), "--run_path", str(config.run_dir), "--no_report"]) == 0
    out = tmp_path / "out" / analysis["analysis_name"]
    expected = {f"{m['metric_name']}_{m['data_split']}" for m in analysis["metrics"]}
    expected = {("norm_nuclear_val" if e == "norm_val" else e) for e in expected}
    for step in (0, 2, 4):  # the last checkpoint has no `train` split
        results = {p.stem: json.loads(p.read_text()) for p in (out / f"step_{step}").glob("*.json")}
        assert set(results) == expected, step
        assert all(isinstance(v, float) for values in results.values() for v in values.values())


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
    """torchrun with 2 CPU processes (1 accumulation step) vs 1 process (2 accumulation steps): the same
    micro-batches, so the same episodes; losses and weights agree within float tolerance."""
    small_vocab_data(tmp_path)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    script = str(REPO / "recipes" / "train.py")
    runs = {}
    for processes in (1, 2):
        root = tmp_path / f"p{processes}"
        overrides = tiny_training_overrides(
            tmp_path,
            **MAML,
            **{
                "training.optimization.gradient_accumulation_steps": 3 - processes,
                "checkpointing.runs_dir": str(root),
                "checkpointing.save_every_n_steps": 3,
            },
        )
        launcher = [sys.executable, script] if processes == 1 else [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517", script
        ]  # fmt: skip
        result = subprocess.run([*launcher, *overrides], env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[processes] = root / "tiny"
    (log,) = (runs[2] / "logs").glob("log_*.log")
    assert "global batch 8 = 2 processes x 1 accumulation x 4" in log.read_text()
    one, two = maml_metrics(runs[1]), maml_metrics(runs[2])
    assert [e["maml/meta_steps"] for e in two] == [e["maml/meta_steps"] for e in one]
    assert 0 < one[-1]["maml/meta_steps"] < 6 and one[-1]["maml/fallback_micro_batches"] == 0
    torch.testing.assert_close(
        torch.tensor([e["loss"] for e in two]), torch.tensor([e["loss"] for e in one]), rtol=1e-4, atol=1e-4
    )
    for name, value in final_weights(runs[1]).items():
        torch.testing.assert_close(final_weights(runs[2])[name], value, rtol=1e-3, atol=1e-4, msg=name)
    head = lambda run: load_file(run / "checkpoints" / "latest" / "fabric_state" / HEAD_NAME)  # noqa: E731
    for name, value in head(runs[1]).items():
        torch.testing.assert_close(head(runs[2])[name], value, rtol=1e-3, atol=1e-4, msg=name)


def test_maml_configs_load():
    for name in ("maml-demo", "pico-maml-tiny", "pico-maml-small"):
        config, _ = load_config(REPO / "recipes" / "configs" / f"{name}.yaml")
        assert config.training.maml.enabled, name
