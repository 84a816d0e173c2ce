"""MAML pretraining (pico_hf.training.maml): meta gradients against independent autograd computations, the
paper's and SMLMT episodes, the inner loop learning on separable features, the group schedule, each micro-batch's
loss and the logged loss, layout independence, config errors, and end-to-end runs (resume, checkpoints, learning
dynamics, 2 processes)."""

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
    free_port,
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
    MAMLObjective,
    adapt_and_query,
    build_head,
    is_meta_group,
    is_meta_step,
    sample_episode,
    sample_paper_episode,
)
from pico_hf.training.modes.maml import MAMLConfig

# --- the meta gradient -------------------------------------------------------------------------------------


def head_and_episode(n_way=3, d=6, hidden=5, layers=2, seed=0):
    """A head and an episode whose query features come from a tiny differentiable 'backbone' (a matrix B)."""
    config = MAMLConfig(objective="smlmt", n_way=n_way, head_hidden_dim=hidden, head_num_layers=layers)
    head = build_head(d, config, vocab_size=100, seed=seed)
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


def test_paper_head_scores_classes_at_their_token_ids_and_adapts_only_their_rows():
    """A vocabulary head restricted to the class rows is the full head's logits gathered at the class ids: the
    query loss and every gradient equal those of SGD on the whole head."""
    config = MAMLConfig(n_way=3, head_hidden_dim=5, head_num_layers=2)
    head = build_head(6, config, vocab_size=20, seed=0)
    assert head.layers[-1].weight.shape == (20, 5)
    generator = torch.Generator().manual_seed(1)
    support, query = torch.randn(6, 6, generator=generator), torch.randn(3, 6, generator=generator)
    labels = torch.arange(3).repeat_interleave(2)
    classes = torch.tensor([17, 4, 9])
    result = adapt_and_query(head, support, labels, query, torch.arange(3), 4, 0.5, classes=classes)
    result.query_loss.backward()
    actual = [p.grad.clone() for p in head.parameters()]
    # By hand: SGD on every tensor of the head, logits of the whole vocabulary gathered at the class ids.
    adapted = {k: v.detach().clone() for k, v in head.named_parameters()}
    for _ in range(4):
        leaves = {k: v.requires_grad_() for k, v in adapted.items()}
        loss = F.cross_entropy(by_hand_forward(leaves, support)[:, classes], labels)
        grads = torch.autograd.grad(loss, list(leaves.values()))
        adapted = {k: (v - 0.5 * g).detach() for (k, v), g in zip(leaves.items(), grads, strict=True)}
    leaves = {k: v.requires_grad_() for k, v in adapted.items()}
    query_loss = F.cross_entropy(by_hand_forward(leaves, query)[:, classes], torch.arange(3))
    expected = torch.autograd.grad(query_loss, list(leaves.values()))
    assert result.query_loss.item() == pytest.approx(query_loss.item(), rel=1e-6)
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e)
    others = torch.ones(20, dtype=torch.bool)
    others[classes] = False
    assert not actual[-2][others].any() and actual[-2][classes].abs().sum() > 0  # only class rows learn


# --- the inner loop learns -----------------------------------------------------------------------------------


def separable_episode(n_way, k_shot, d, seed):
    """Features of N classes around random unit-variance means with noise of std 0.5: separable by a linear map."""
    generator = torch.Generator().manual_seed(seed)
    means = torch.randn(n_way, d, generator=generator)
    support_labels = torch.arange(n_way).repeat_interleave(k_shot)
    query_labels = torch.arange(n_way)
    noise = lambda n: 0.5 * torch.randn(n, d, generator=generator)  # noqa: E731
    support = means[support_labels] + noise(len(support_labels))
    query = means[query_labels] + noise(len(query_labels))
    return support, support_labels, query, query_labels


def inner_loop_accuracy(
    objective, head_init="xavier", seeds=range(5), n_way=16, k_shot=4, d=96, vocab_size=1000
):
    """Mean query accuracy after the inner loop at the defaults of `objective` (inner_steps, inner_lr, the head),
    and before it, a fresh head per seed; the paper's head scores N random token ids of the vocabulary."""
    config = MAMLConfig(objective=objective, n_way=n_way, k_shot=k_shot, head_init=head_init)
    accuracies, before = [], []
    for seed in seeds:
        head = build_head(d, config, vocab_size, seed)
        support, support_labels, query, query_labels = separable_episode(n_way, k_shot, d, seed)
        classes = None
        if objective == "paper":
            classes = torch.randperm(vocab_size, generator=torch.Generator().manual_seed(seed))[:n_way]
        args = (head, support, support_labels, query, query_labels)
        accuracies.append(
            adapt_and_query(*args, config.inner_steps, config.inner_lr, classes=classes).query_accuracy
        )
        before.append(adapt_and_query(*args, 0, config.inner_lr, classes=classes).query_accuracy)
    return sum(accuracies) / len(accuracies), sum(before) / len(before)


@pytest.mark.parametrize("objective", ["paper", "smlmt"])
def test_inner_loop_learns_separable_features_at_the_default_settings(objective):
    # 16-way 4-shot, d 96, 5 seeds (docs/maml.md quotes these values): chance is 1/16 = 0.0625.
    after, before = inner_loop_accuracy(objective)
    assert after >= 0.75, (after, before)
    assert before <= 0.2, before  # an unadapted head does not already know the classes
    # nn.Linear's default init adapts far less in the same 10 steps: the xavier init is what makes it learn.
    default_init, _ = inner_loop_accuracy(objective, head_init="default")
    assert default_init <= after - 0.4, (default_init, after)
    head = build_head(96, MAMLConfig(objective=objective, head_init="default"), vocab_size=1000, seed=0)
    assert head.layers[0].weight.abs().max() <= 1 / 96**0.5  # nn.Linear's own U(+-1/sqrt(fan_in))
    head = build_head(96, MAMLConfig(objective=objective), vocab_size=1000, seed=0)
    assert head.layers[0].weight.abs().max() > 1 / 96**0.5  # xavier: U(+-sqrt(6 / (96 + 128)))


# --- episodes ----------------------------------------------------------------------------------------------


def test_paper_episode_properties():
    generator = torch.Generator().manual_seed(3)
    input_ids = torch.randint(2, 14, (4, 16), generator=generator)
    n_way, k_shot, mask = 5, 3, 1
    episode = sample_paper_episode(input_ids, n_way, k_shot, mask, seed=7, step=4, group=1)
    flat, masked = input_ids.reshape(-1), episode.input_ids.reshape(-1)
    support, query = episode.support.tolist(), episode.query.tolist()
    # N classes, all among the support tokens; every support and query position holds its class's token.
    assert len(set(episode.classes.tolist())) == n_way
    for positions, labels in (
        (episode.support, episode.support_labels),
        (episode.query, episode.query_labels),
    ):
        assert torch.equal(flat[positions], episode.classes[labels])
    assert set(episode.support_labels.tolist()) == set(range(n_way))
    # One query per sequence, never at a support position nor at position 0; at most K supports per sequence.
    assert sorted(q // 16 for q in query) == [0, 1, 2, 3] and not set(query) & set(support)
    assert all(p % 16 != 0 for p in support + query)
    assert all(sum(p // 16 == row for p in support) <= k_shot for row in range(4))
    # The masked positions: each sequence's K support positions (kept or left out) and its query, nothing else.
    changed = (masked != flat).nonzero().flatten().tolist()
    assert set(support + query) <= set(changed) and torch.equal(
        masked[changed], torch.full((len(changed),), mask)
    )
    assert len(changed) <= 4 * (k_shot + 1)
    again = sample_paper_episode(input_ids, n_way, k_shot, mask, seed=7, step=4, group=1)
    other = sample_paper_episode(input_ids, n_way, k_shot, mask, seed=7, step=4, group=2)
    for name in ("input_ids", "support", "query", "classes"):
        assert torch.equal(getattr(again, name), getattr(episode, name))
    assert not torch.equal(other.input_ids, episode.input_ids)


def test_paper_episode_leaves_out_other_tokens_and_never_pads_classes():
    # Two sequences of 3 distinct tokens each, K = every position but 0: 4 distinct support tokens.
    input_ids = torch.tensor([[9, 2, 3, 2, 3], [9, 4, 5, 4, 5]])
    assert sample_paper_episode(input_ids, 5, 3, mask_token=1, seed=0, step=0, group=0) is None
    formed = 0
    for seed in range(20):
        episode = sample_paper_episode(input_ids, 2, 3, mask_token=1, seed=seed, step=0, group=0)
        if episode is None:  # e.g. the one free position of each sequence holds no class token
            continue
        formed += 1
        flat = input_ids.reshape(-1)
        classes = set(episode.classes.tolist())
        assert set(flat[episode.support].tolist()) <= classes  # no label clamped to a class
        # The support positions (masked, not queries) whose token is not a class are left out.
        masked = set((episode.input_ids.reshape(-1) != flat).nonzero().flatten().tolist()) - set(
            episode.query.tolist()
        )
        assert len(masked) == 6 and len(episode.support) == sum(flat[p].item() in classes for p in masked) < 6
        assert set(flat[episode.query].tolist()) <= classes
    assert formed >= 5, formed
    # The mask token is never a class, and a sequence whose free positions hold no class has no query: here
    # either fewer than 2 classes or no query at all, so never an episode.
    ids = torch.tensor([[9, 1, 1, 1, 2], [9, 1, 1, 3, 1]])
    assert sample_paper_episode(ids, 2, 3, mask_token=1, seed=0, step=0, group=0) is None


def test_smlmt_episode_properties():
    generator = torch.Generator().manual_seed(3)
    input_ids = torch.randint(2, 14, (4, 16), generator=generator)
    n_way, k_shot, n_query, mask = 5, 3, 2, 1
    episode = sample_episode(input_ids, n_way, k_shot, n_query, mask, seed=7, step=4, index=1)
    flat, masked = input_ids.reshape(-1), episode.input_ids.reshape(-1)
    assert episode.support.shape == (n_way * k_shot,) and episode.query.shape == (n_way * n_query,)
    assert sorted(episode.support_labels.tolist()) == sorted(list(range(n_way)) * k_shot)
    for positions, labels in (
        (episode.support, episode.support_labels),
        (episode.query, episode.query_labels),
    ):
        assert torch.equal(flat[positions], episode.classes[labels])
    assert len(set(episode.support.tolist()) | set(episode.query.tolist())) == n_way * (k_shot + n_query)
    # Every occurrence of the episode's token types is masked, nothing else is changed.
    chosen = torch.isin(flat, episode.classes)
    assert torch.equal(masked[chosen], torch.full_like(masked[chosen], mask))
    assert torch.equal(masked[~chosen], flat[~chosen])
    again = sample_episode(input_ids, n_way, k_shot, n_query, mask, seed=7, step=4, index=1)
    other = sample_episode(input_ids, n_way, k_shot, n_query, mask, seed=7, step=5, index=1)
    for name in ("input_ids", "support", "query", "classes"):
        assert torch.equal(getattr(again, name), getattr(episode, name))
    assert not torch.equal(other.support, episode.support)


def test_smlmt_episode_needs_n_way_types_occurring_k_plus_q_times():
    input_ids = torch.tensor([[5, 5, 5, 6, 6, 6, 7, 7, 1, 1, 1, 1]])
    assert (
        sample_episode(input_ids, 3, 2, 1, mask_token=1, seed=0, step=0, index=0) is None
    )  # 7 twice, 1 mask
    episode = sample_episode(input_ids, 2, 2, 1, mask_token=1, seed=0, step=0, index=0)
    assert sorted(episode.classes.tolist()) == [5, 6]


# --- the schedule ------------------------------------------------------------------------------------------


def test_schedule_is_a_pure_function_of_seed_step_and_group():
    schedule = [is_meta_step(42, step, 0.5) for step in range(2000)]
    assert schedule == [is_meta_step(42, step, 0.5) for step in range(2000)]
    assert 0.45 < sum(schedule) / len(schedule) < 0.55
    assert schedule != [is_meta_step(43, step, 0.5) for step in range(2000)]
    groups = [[is_meta_group(42, step, g, 0.5) for g in range(8)] for step in range(250)]
    assert groups == [[is_meta_group(42, step, g, 0.5) for g in range(8)] for step in range(250)]
    assert 0.45 < sum(map(sum, groups)) / 2000 < 0.55
    assert any(0 < sum(row) < 8 for row in groups)  # groups of one step differ: the choice is per group
    for ratio, expected in ((0.0, False), (1.0, True)):
        assert all(is_meta_step(42, s, ratio) == expected for s in range(200))
        assert all(is_meta_group(42, s, g, ratio) == expected for s in range(50) for g in range(4))


# --- each micro-batch's loss, the logged loss, layout independence -----------------------------------------


def tiny_objective(objective="paper", global_batch=8, **changes):
    from conftest import tiny_config

    from pico_hf import PicoDecoderForCausalLM

    torch.manual_seed(0)
    model = PicoDecoderForCausalLM(tiny_config(d_model=32, n_layers=1, attention_n_heads=4)).train()
    config = MAMLConfig(objective=objective, episode_sequences=2, n_way=3, k_shot=3, n_query=1, inner_steps=2,
                        inner_lr=0.5, head_hidden_dim=8, head_num_layers=2, lm_loss_weight=0.5, **changes)  # fmt: skip
    maml = MAMLObjective(config, d_model=32, vocab_size=128, mask_token=1, seed=0, global_batch=global_batch)
    rows = torch.randint(2, 12, (global_batch, 17), generator=torch.Generator().manual_seed(0))
    return model, maml, {"input_ids": rows[:, :-1], "shift_labels": rows[:, 1:]}


def test_paper_micro_batch_trains_query_loss_of_meta_groups_and_lm_loss_of_the_others():
    model, maml, inputs = tiny_objective(global_batch=4)
    maml.begin_step(0)
    maml.meta_groups = [True, False]
    loss = maml.micro_batch_loss(model, inputs, process_index=0, num_processes=1)
    loss.backward()
    actual = [p.grad.clone() for p in [*model.parameters(), *maml.head.parameters()]]
    model.zero_grad()
    maml.head.zero_grad()
    episode = sample_paper_episode(inputs["input_ids"][:2], 3, 3, 1, seed=0, step=0, group=0)
    features = model(input_ids=episode.input_ids, output_hidden_states=True).hidden_states[-1].reshape(-1, 32)
    query = adapt_and_query(maml.head, features[episode.support].detach(), episode.support_labels,
                            features[episode.query], episode.query_labels, 2, 0.5, classes=episode.classes)  # fmt: skip
    lm = model(input_ids=inputs["input_ids"][2:], shift_labels=inputs["shift_labels"][2:]).loss
    expected_loss = (query.query_loss + lm) / 2  # the query loss only: no LM loss of the masked group
    expected_loss.backward()
    assert loss.item() == pytest.approx(expected_loss.item(), rel=1e-5)
    for a, e in zip(actual, [p.grad for p in [*model.parameters(), *maml.head.parameters()]], strict=True):
        torch.testing.assert_close(a, e)
    # The logged loss: the LM group's loss only; the meta group in maml/query_loss.
    maml.end_step(torch.device("cpu"))
    logs = {"loss": 123.0}
    maml.update_log(logs)
    assert logs["loss"] == pytest.approx(lm.item(), abs=1e-4)
    assert logs["maml/query_loss"] == pytest.approx(query.query_loss.item(), abs=1e-4)
    assert (logs["maml/meta_groups"], logs["maml/lm_groups"], logs["maml/fallback_groups"]) == (1, 1, 0)


def test_smlmt_micro_batch_adds_the_weighted_masked_lm_loss():
    model, maml, inputs = tiny_objective("smlmt", global_batch=2)
    maml.begin_step(0)
    maml.meta_groups = [True]
    loss = maml.micro_batch_loss(model, inputs, process_index=0, num_processes=1)
    episode = sample_episode(inputs["input_ids"], 3, 3, 1, 1, seed=0, step=0, index=0)
    outputs = model(
        input_ids=episode.input_ids, shift_labels=inputs["shift_labels"], output_hidden_states=True
    )
    features = outputs.hidden_states[-1].reshape(-1, 32)
    query = adapt_and_query(maml.head, features[episode.support].detach(), episode.support_labels,
                            features[episode.query], episode.query_labels, 2, 0.5).query_loss  # fmt: skip
    assert loss.item() == pytest.approx((query + 0.5 * outputs.loss).item(), rel=1e-5)
    maml.end_step(torch.device("cpu"))
    logs = {"loss": 123.0}
    maml.update_log(logs)
    assert "loss" not in logs  # no LM group in the interval: no language-modelling loss to log


@pytest.mark.parametrize("objective", ["paper", "smlmt"])
def test_the_step_gradient_is_the_same_for_every_layout(objective):
    """1 process x 1 micro-batch of 8, 1 process x 2 of 4, 2 processes x 1 of 4 (simulated: the mean of their
    gradients, as DDP makes it): the same groups, episodes and gradient."""
    model, maml, inputs = tiny_objective(objective, hybrid_ratio=0.5)
    step = next(s for s in range(50) if 0 < sum(is_meta_group(0, s, g, 0.5) for g in range(4)) < 4)
    if objective == "smlmt":
        step = next(s for s in range(50) if is_meta_step(0, s, 0.5))

    def gradient(parts, processes):
        model.zero_grad()
        maml.head.zero_grad()
        maml.begin_step(step)
        per = 8 // (parts * processes)
        for process in range(processes):
            maml.micro_step = 0
            for part in range(parts):
                start = (part * processes + process) * per
                micro = {k: v[start : start + per] for k, v in inputs.items()}
                (maml.micro_batch_loss(model, micro, process, processes) / (parts * processes)).backward()
        assert maml._step_totals["episodes"] > 0 and maml._step_totals["fallback_groups"] == 0
        maml.end_step(torch.device("cpu"))
        return [p.grad.clone() for p in [*model.parameters(), *maml.head.parameters()]]

    one = gradient(1, 1)
    for parts, processes in ((2, 1), (1, 2)):
        for a, b in zip(gradient(parts, processes), one, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# --- config errors -----------------------------------------------------------------------------------------

MAML = {
    "training.maml.enabled": "true",
    "training.maml.episode_sequences": 2,
    "training.maml.n_way": 3,
    "training.maml.k_shot": 3,
    "training.maml.n_query": 1,
    "training.maml.inner_steps": 3,
    "training.maml.inner_lr": 0.1,
    "training.maml.head_hidden_dim": 8,
    "training.maml.head_num_layers": 2,
}


def small_vocab_data(tmp_path, vocab_size=12):
    """Token ids 2..vocab_size-1 only, so every group can make an episode (of 3 classes)."""
    make_pretokenized(tmp_path / "data" / "train.parquet", n_rows=48, row_length=33, vocab_size=vocab_size)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"training.maml.hybrid_ratio": 1.5}, "training.maml.hybrid_ratio must be between 0 and 1, got 1.5"),
        ({"training.maml.k_shot": 0}, "training.maml.k_shot must be at least 1, got 0"),
        ({"training.maml.n_way": 1}, "training.maml.n_way must be at least 2, got 1"),
        ({"training.maml.episode_sequences": 0}, "training.maml.episode_sequences must be at least 1, got 0"),
        ({"training.maml.inner_lr": -0.1}, "training.maml.inner_lr must be non-negative"),
        ({"training.maml.mask_token": 500}, "training.maml.mask_token (500) is not a token id below 128"),
        (
            {"training.maml.n_way": 200},
            "training.maml.n_way (200) must be smaller than model.vocab_size (128)",
        ),
        (
            {"training.maml.objective": "bansal"},
            "training.maml.objective must be one of paper, smlmt, got 'bansal'",
        ),
        (
            {"training.maml.head_init": "zeros"},
            "training.maml.head_init must be one of xavier, default, got 'zeros'",
        ),
        ({"training.maml.nway": 3}, "did you mean 'training.maml.n_way'?"),
    ],
)
def test_config_errors(tmp_path, change, message):
    with pytest.raises(ConfigError) as error:
        load_config(None, tiny_training_overrides(tmp_path, **{**MAML, **change}))
    assert message in str(error.value)


@pytest.mark.parametrize(
    "change, message",
    [
        # Micro-batch: 8 / 2 accumulation = 4 sequences: groups of 3 do not tile it.
        (
            {"training.maml.episode_sequences": 3},
            r"training.maml.episode_sequences \(3\) must divide the micro-batch of 4 sequences",
        ),
        (
            {"training.maml.n_way": 7},
            r"training.maml.n_way \(7\) exceeds the episode_sequences \(2\) x k_shot \(3\) support positions",
        ),
        (
            {"training.maml.k_shot": 15},
            r"training.maml.k_shot \(15\) support positions and a query position do not fit in the 15 positions",
        ),
        (
            {"training.maml.objective": "smlmt", "training.maml.n_way": 9},
            r"n_way \(9\) x \(k_shot \+ n_query\) \(4\) exceeds the 2 x 16 tokens of an episode",
        ),
    ],
)
def test_episode_layout_errors_come_before_step_1(tmp_path, change, message):
    with pytest.raises(ConfigError, match=message):
        train(tmp_path, **{**MAML, **change})
    assert not (tmp_path / "runs" / "tiny" / "checkpoints" / "step_0").exists()


def test_groups_without_an_episode_fall_back_to_lm_and_are_counted(tmp_path, caplog):
    small_vocab_data(tmp_path, vocab_size=4)  # ids 2 and 3 only: never 3 distinct support tokens
    summary, config = train(tmp_path, **{**MAML, "training.maml.hybrid_ratio": 1.0})
    assert summary["steps"] == 6
    last = maml_metrics(config.run_dir)[-1]
    assert (last["maml/meta_groups"], last["maml/lm_groups"], last["maml/fallback_groups"]) == (24, 0, 24)
    assert "loss" in last and "maml/query_loss" not in last  # every group trained as LM
    assert "trains as a language-modelling group" in caplog.text


def test_second_order_and_every_group_meta_trains_end_to_end(tmp_path):
    small_vocab_data(tmp_path)
    overrides = {**MAML, "training.maml.first_order": "false", "training.maml.hybrid_ratio": 1.0}
    summary, config = train(tmp_path, **overrides, **{"training.max_steps": 2})
    logs = maml_metrics(config.run_dir)
    assert summary["steps"] == 2 and (logs[-1]["maml/meta_groups"], logs[-1]["maml/lm_groups"]) == (8, 0)
    assert not any("loss" in entry for entry in logs)  # no LM group: no language-modelling loss logged
    heads = [
        load_file(config.run_dir / "checkpoints" / f"step_{s}" / "fabric_state" / HEAD_NAME) for s in (0, 2)
    ]
    assert not torch.equal(heads[0]["layers.1.weight"], heads[1]["layers.1.weight"])


def test_resuming_a_run_without_a_head_names_the_file(tmp_path):
    small_vocab_data(tmp_path)
    train(tmp_path, **{"training.max_steps": 2})
    with pytest.raises(ConfigError, match=r"has no maml_head\.safetensors: it was not written by a run with"):
        train(tmp_path, **MAML, **{"training.max_steps": 4})


def test_resuming_with_another_objective_names_the_head_shapes(tmp_path):
    small_vocab_data(tmp_path)
    train(tmp_path, **MAML, **{"training.maml.objective": "smlmt", "training.max_steps": 2})
    with pytest.raises(ConfigError, match=r"holds a head of other shapes .* another training.maml.objective"):
        train(tmp_path, **MAML, **{"training.max_steps": 4})


# --- end to end --------------------------------------------------------------------------------------------


def maml_metrics(run_dir):
    """The training log lines (a line without an LM group has no `loss`)."""
    lines = (run_dir / "logs" / "metrics.jsonl").read_text().splitlines()
    return [entry for entry in map(json.loads, lines) if "maml/meta_groups" in entry]


def meta_groups_of(step, objective):
    if objective == "paper":
        return [is_meta_group(42, step, g, 0.5) for g in range(4)]
    return [is_meta_step(42, step, 0.5)] * 4


@pytest.fixture(scope="module", params=["paper", "smlmt"])
def maml_run(request, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp(f"maml-{request.param}")
    small_vocab_data(tmp_path)
    val = make_pretokenized(tmp_path / "val" / "val.parquet", n_rows=16, row_length=17, vocab_size=12, seed=1)
    overrides = {
        **MAML,
        "training.maml.objective": request.param,
        "checkpointing.learning_dynamics.eval_data": str(val),
    }
    summary, config = train(tmp_path, **overrides)
    return summary, config, overrides, request.param


def test_run_logs_meta_and_lm_groups(maml_run):
    summary, config, _, objective = maml_run
    assert summary["steps"] == 6
    logs = maml_metrics(config.run_dir)
    assert [entry["step"] for entry in logs] == [1, 2, 3, 4, 5, 6]
    schedule = [meta_groups_of(step, objective) for step in range(6)]
    assert any(map(any, schedule)) and not all(map(all, schedule))  # both kinds occur in this run
    for entry in logs:
        done = [meta for step in schedule[: entry["step"]] for meta in step]
        assert (entry["maml/meta_groups"], entry["maml/lm_groups"]) == (sum(done), len(done) - sum(done))
        assert entry["maml/fallback_groups"] == 0
        this_step = schedule[entry["step"] - 1]
        assert ("maml/query_loss" in entry) == any(this_step)  # per-episode values of this step's episodes
        assert ("loss" in entry) == (not all(this_step))  # the LM loss of this step's LM groups only
        if any(this_step):
            for key in ("support", "query"):
                assert 0 <= entry[f"maml/{key}_accuracy"] <= 1 and entry[f"maml/{key}_loss"] > 0
            assert entry["maml/inner_loss_last"] < entry["maml/inner_loss_first"]


def test_checkpoint_is_a_plain_pico_decoder_and_the_head_is_training_state(maml_run, tmp_path):
    _, config, _, objective = maml_run
    _, baseline = train(tmp_path, **{"training.max_steps": 2})
    outputs = 128 if objective == "paper" else 3  # the vocabulary, or the N labels
    for step in (0, 2, 4, 6):
        step_dir = config.run_dir / "checkpoints" / f"step_{step}"
        keys = set(load_file(step_dir / "model.safetensors"))
        assert keys == set(load_file(baseline.run_dir / "checkpoints" / "step_2" / "model.safetensors"))
        _, info = AutoModelForCausalLM.from_pretrained(step_dir, output_loading_info=True)
        assert not any(info.values()), info  # no missing or unexpected keys
        head = load_file(step_dir / "fabric_state" / HEAD_NAME)
        assert set(head) == {"layers.0.weight", "layers.0.bias", "layers.1.weight", "layers.1.bias"}
        assert head["layers.1.weight"].shape == (outputs, 8)
    # Learning dynamics: the `train` split records the rows the model trained on, a meta group's masked with the
    # pad token (id 0, absent from the data): 2 rows per meta group of the step after the checkpoint.
    for step in (0, 2, 4):
        rows = load_from_disk(
            config.run_dir / "checkpoints" / f"step_{step}" / "learning_dynamics" / "train_data"
        )
        ids = torch.tensor(rows["input_ids"])
        assert ids.shape == (8, 17)
        assert int((ids == 0).any(dim=1).sum()) == 2 * sum(meta_groups_of(step, objective)), step
    # The head trains: its weights at step 6 differ from its initialisation.
    first = load_file(config.run_dir / "checkpoints" / "step_0" / "fabric_state" / HEAD_NAME)
    last = load_file(config.run_dir / "checkpoints" / "step_6" / "fabric_state" / HEAD_NAME)
    assert not torch.equal(first["layers.0.weight"], last["layers.0.weight"])


def test_resume_is_bitwise_identical_with_the_same_schedule(maml_run, tmp_path):
    _, config, overrides, _ = maml_run
    small_vocab_data(tmp_path)
    make_pretokenized(tmp_path / "val" / "val.parquet", n_rows=16, row_length=17, vocab_size=12, seed=1)
    overrides = {
        **overrides,
        "checkpointing.learning_dynamics.eval_data": str(tmp_path / "val" / "val.parquet"),
    }
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
    _, config, _, _ = maml_run
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
@pytest.mark.parametrize("objective", ["paper", "smlmt"])
def test_every_layout_of_the_global_batch_trains_the_same(tmp_path, objective):
    """recipes/train.py with the same global batch of 8 as 1 process x 1 micro-batch of 8, 1 process x 2 of 4
    and (torchrun) 2 CPU processes x 1 of 4: the same groups, so the same episodes, logs and weights (float
    tolerance)."""
    small_vocab_data(tmp_path)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    script = str(REPO / "recipes" / "train.py")
    runs = {}
    for processes, accumulation in ((1, 1), (1, 2), (2, 1)):
        root = tmp_path / f"p{processes}a{accumulation}"
        overrides = tiny_training_overrides(
            tmp_path,
            **MAML,
            **{
                "training.maml.objective": objective,
                "training.optimization.gradient_accumulation_steps": accumulation,
                "checkpointing.runs_dir": str(root),
                "checkpointing.save_every_n_steps": 3,
            },
        )
        launcher = [sys.executable, script] if processes == 1 else [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
            str(free_port()), script,
        ]  # fmt: skip
        result = subprocess.run([*launcher, *overrides], env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        (log,) = (root / "tiny" / "logs").glob("log_*.log")
        assert f"global batch 8 = {processes} process" in log.read_text()
        runs[processes, accumulation] = root / "tiny"
    reference = runs[1, 1]
    one = maml_metrics(reference)
    assert 0 < one[-1]["maml/meta_groups"] < 24 and one[-1]["maml/fallback_groups"] == 0
    head = lambda run: load_file(run / "checkpoints" / "latest" / "fabric_state" / HEAD_NAME)  # noqa: E731
    for layout in ((1, 2), (2, 1)):
        other = maml_metrics(runs[layout])
        for key in ("maml/meta_groups", "maml/lm_groups", "maml/fallback_groups"):
            assert [e[key] for e in other] == [e[key] for e in one], (layout, key)
        for key in ("loss", "maml/query_loss", "maml/query_accuracy", "maml/inner_loss_last"):
            assert [key in e for e in other] == [key in e for e in one], (layout, key)
            torch.testing.assert_close(
                torch.tensor([e[key] for e in other if key in e]),
                torch.tensor([e[key] for e in one if key in e]),
                rtol=1e-3,
                atol=1e-3,
                msg=f"{layout} {key}",
            )
        for name, value in final_weights(reference).items():
            torch.testing.assert_close(
                final_weights(runs[layout])[name], value, rtol=1e-3, atol=1e-4, msg=name
            )
        for name, value in head(reference).items():
            torch.testing.assert_close(head(runs[layout])[name], value, rtol=1e-3, atol=1e-4, msg=name)


def test_maml_configs_load():
    names = ["maml-demo", "pico-maml-tiny", "pico-maml-small"]
    for name in names:
        config, _ = load_config(REPO / "recipes" / "configs" / f"{name}.yaml")
        assert config.training.maml.enabled and config.training.maml.objective == "paper", name
    for path in sorted((REPO / "recipes" / "configs" / "studies").glob("maml-vs-baseline*.yaml")):
        assert "objective: paper" in path.read_text(), path
