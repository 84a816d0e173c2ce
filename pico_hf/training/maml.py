"""MAML pretraining: language modelling mixed with first-order MAML on episodes made from the training text.

Pico's meta-learning mode (Africa et al. 2025, "Learning Dynamics of Meta-Learning in Small Model Pretraining",
after Bansal et al. 2020's Subset Masked Language Modelling Tasks). The global batch is cut into fixed groups of
`episode_sequences` sequences; each group is either a language-modelling group or one meta episode, so what a
step trains on does not depend on how the batch is split across processes and accumulation steps.

`objective: paper` (pico-maml-train's `src/training/trainer.py`, without its defects; docs/maml.md lists each
difference):

- Each group is a meta episode with probability `hybrid_ratio`, a pure function of (seed, step, group).
- Episode: `k_shot` support positions per sequence (never position 0, which has no context); the classes are
  `n_way` of the distinct tokens at those positions, drawn at random. A support position whose token is not a
  class is left out; each sequence's query is a position holding a class token (never a support position).
  Support and query positions are replaced by the mask token. Too few distinct tokens: the group trains as LM.
- The head is an MLP ending in vocabulary logits; a class is scored by the logit of its own token id, so what the
  head learns carries over from episode to episode. A meta group trains on its query cross-entropy only.

`objective: smlmt` (Bansal et al. 2020): a share `hybrid_ratio` of optimizer steps are meta steps, every group of
a meta step one N-way K-shot episode: N token types occurring K+Q times in the group, every occurrence masked,
class i = the i-th drawn type (a fresh label order), an N-output head; the loss adds `lm_loss_weight` x the
masked group's LM loss.

For both, one forward of the backbone on the masked group; a position's features are the final hidden state
there (the model is causal: it sees the context and the mask). Inner loop: `inner_steps` SGD steps of size
`inner_lr` on the support cross-entropy, functionally, on the support features detached from the backbone. Outer
loss: the query cross-entropy through the adapted head, back into the head and the backbone; first order uses the
straight-through form (the adapted head's value, the pre-adaptation head's gradient), `first_order: false` goes
through the unrolled inner loop. The head's own parameters are never modified by the inner loop.

The head is training state: in the optimizer and in each checkpoint's state folder (`maml_head.safetensors`),
never in `model.safetensors`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ..configuration import ConfigError
from .modes.maml import MAML, MAMLConfig

logger = logging.getLogger("pico_hf.training")

HEAD_NAME = "maml_head.safetensors"
STATE_NAME = "maml_state.json"
# Independent RNG streams per use.
_SCHEDULE_STREAM, _EPISODE_STREAM, _HEAD_STREAM, _GROUP_STREAM = 0x5343, 0x4550, 0x4844, 0x4752


def check_episodes_possible(maml: MAMLConfig, micro_batch: int, seq_len: int) -> None:
    """Before step 1: groups tile the micro-batch, and an episode can be made from a group at all."""
    group = maml.episode_sequences
    if micro_batch % group:
        raise ConfigError(
            f"training.maml.episode_sequences ({group}) must divide the micro-batch of {micro_batch} sequences "
            "(data.dataloader.batch_size / (training.optimization.gradient_accumulation_steps x processes)): "
            "episodes are made on whole groups of sequences"
        )
    if maml.objective == "paper":
        if maml.k_shot + 1 > seq_len - 1:
            raise ConfigError(
                f"training.maml.k_shot ({maml.k_shot}) support positions and a query position do not fit in "
                f"the {seq_len - 1} positions 1..{seq_len - 1} of a {seq_len}-token sequence"
            )
        if maml.n_way > group * maml.k_shot:
            raise ConfigError(
                f"training.maml.n_way ({maml.n_way}) exceeds the episode_sequences ({group}) x k_shot "
                f"({maml.k_shot}) support positions of an episode: no episode could ever be made"
            )
        return
    per_class = maml.k_shot + maml.n_query
    most = group * seq_len // per_class
    if maml.n_way > most:
        raise ConfigError(
            f"training.maml.n_way ({maml.n_way}) x (k_shot + n_query) ({per_class}) exceeds the {group} x "
            f"{seq_len} tokens of an episode (training.maml.episode_sequences): no episode could ever be made "
            f"(at most {most} classes)"
        )


def is_meta_step(seed: int, step: int, hybrid_ratio: float) -> bool:
    """smlmt: whether optimizer step `step` (0-based) is a meta step, a pure function of (seed, step)."""
    return bool(np.random.default_rng([seed, _SCHEDULE_STREAM, step]).random() < hybrid_ratio)


def is_meta_group(seed: int, step: int, group: int, hybrid_ratio: float) -> bool:
    """paper: whether group `group` of step `step`'s global batch is a meta episode, a pure function of
    (seed, step, group): every process knows every group's choice without a broadcast."""
    return bool(np.random.default_rng([seed, _GROUP_STREAM, step, group]).random() < hybrid_ratio)


@dataclass
class Episode:
    input_ids: torch.Tensor  # (S, T) the group's sequences with the episode's positions (or types) masked
    support: torch.Tensor  # (n_support,) flat positions into S*T
    support_labels: torch.Tensor  # (n_support,) class indices
    query: torch.Tensor  # (n_query,)
    query_labels: torch.Tensor  # (n_query,)
    classes: torch.Tensor  # (N,) the token of each class


def _long(array: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.as_tensor(np.ascontiguousarray(array), dtype=torch.long, device=device)


def sample_paper_episode(
    input_ids: torch.Tensor, n_way: int, k_shot: int, mask_token: int, seed: int, step: int, group: int
) -> Episode | None:
    """pico-maml-train's episode from a (S, T) group, or None when its support positions hold fewer than N
    distinct tokens (other than the mask token). Deterministic in (seed, step, group)."""
    rng = np.random.default_rng([seed, _EPISODE_STREAM, step, group])
    ids = input_ids.cpu().numpy()
    sequences, length = ids.shape
    # K support positions per sequence among 1..T-1 (position 0 has no context to recognise a token from).
    support_positions = np.stack(
        [rng.choice(np.arange(1, length), size=k_shot, replace=False) for _ in range(sequences)]
    )
    support_tokens = np.take_along_axis(ids, support_positions, axis=1)
    candidates = np.unique(support_tokens[support_tokens != mask_token])  # sorted: a fixed order to draw from
    if len(candidates) < n_way:
        return None
    classes = rng.choice(candidates, size=n_way, replace=False)
    label_of = {int(token): label for label, token in enumerate(classes)}
    support, support_labels, query, query_labels = [], [], [], []
    masked = ids.copy()
    for row in range(sequences):
        masked[row, support_positions[row]] = mask_token
        for position, token in zip(support_positions[row], support_tokens[row], strict=True):
            if int(token) in label_of:  # a support token outside the N classes is left out
                support.append(row * length + position)
                support_labels.append(label_of[int(token)])
        free = np.ones(length, dtype=bool)
        free[0] = False
        free[support_positions[row]] = False
        eligible = np.flatnonzero(free & np.isin(ids[row], classes))
        if len(eligible):  # the query's token is always one of the classes
            position = int(rng.choice(eligible))
            masked[row, position] = mask_token
            query.append(row * length + position)
            query_labels.append(label_of[int(ids[row, position])])
    if not query:
        return None
    device = input_ids.device
    return Episode(
        input_ids=_long(masked, device),
        support=_long(np.array(support), device),
        support_labels=_long(np.array(support_labels), device),
        query=_long(np.array(query), device),
        query_labels=_long(np.array(query_labels), device),
        classes=_long(classes, device),
    )


def sample_episode(
    input_ids: torch.Tensor,
    n_way: int,
    k_shot: int,
    n_query: int,
    mask_token: int,
    seed: int,
    step: int,
    index: int,
) -> Episode | None:
    """An SMLMT episode from a (S, T) group, or None when fewer than N types occur K+Q times.

    Deterministic in (seed, step, index): `index` is the group's place in the step's global batch."""
    rng = np.random.default_rng([seed, _EPISODE_STREAM, step, index])
    flat = input_ids.reshape(-1).cpu().numpy()
    types, counts = np.unique(flat, return_counts=True)  # sorted types: a fixed order to draw from
    candidates = types[(counts >= k_shot + n_query) & (types != mask_token)]
    if len(candidates) < n_way:
        return None
    chosen = rng.choice(candidates, size=n_way, replace=False)  # class i = chosen[i]: the label permutation
    support, query = [], []
    for token in chosen:
        positions = rng.choice(np.flatnonzero(flat == token), size=k_shot + n_query, replace=False)
        support.append(positions[:k_shot])
        query.append(positions[k_shot:])
    masked = np.where(np.isin(flat, chosen), mask_token, flat)
    device = input_ids.device
    return Episode(
        input_ids=_long(masked, device).reshape(input_ids.shape),
        support=_long(np.concatenate(support), device),
        support_labels=_long(np.repeat(np.arange(n_way), k_shot), device),
        query=_long(np.concatenate(query), device),
        query_labels=_long(np.repeat(np.arange(n_way), n_query), device),
        classes=_long(chosen, device),
    )


def head_forward(params: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The head as a function of its (weight, bias) pairs: linear layers with ReLU between."""
    for i in range(0, len(params), 2):
        x = F.linear(x, params[i], params[i + 1])
        if i + 2 < len(params):
            x = F.relu(x)
    return x


class EpisodeHead(nn.Module):
    """The episode classifier: `head_num_layers` linear layers with ReLU between, d_model -> ... -> outputs
    (paper: the vocabulary, a class scored at its token id; smlmt: the N labels)."""

    def __init__(self, dims: list[int]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(dims[i], dims[i + 1]) for i in range(len(dims) - 1))

    def episode_parameters(self, classes: torch.Tensor | None = None) -> list[torch.Tensor]:
        """The tensors an episode adapts: every layer's weight and bias, the last layer's rows at `classes` only
        (the other rows score no class of the episode, so their gradient would be zero)."""
        params = [t for layer in self.layers[:-1] for t in (layer.weight, layer.bias)]
        last = self.layers[-1]
        if classes is None:
            return [*params, last.weight, last.bias]
        return [*params, last.weight[classes], last.bias[classes]]

    def forward(self, x: torch.Tensor, classes: torch.Tensor | None = None) -> torch.Tensor:
        return head_forward(self.episode_parameters(classes), x)


def build_head(d_model: int, config: MAMLConfig, vocab_size: int, seed: int) -> EpisodeHead:
    """The head, initialised from its own generator (adding it changes no other random draw of the run).
    `head_init: xavier`: xavier-uniform weights as pico-maml-train (biases keep nn.Linear's range); `default`:
    nn.Linear's own U(+-1/sqrt(fan_in)) for both."""
    outputs = vocab_size if config.objective == "paper" else config.n_way
    head = EpisodeHead([d_model] + [config.head_hidden_dim] * (config.head_num_layers - 1) + [outputs])
    generator = torch.Generator().manual_seed(
        int(np.random.default_rng([seed, _HEAD_STREAM]).integers(2**62))
    )
    with torch.no_grad():
        for layer in head.layers:
            bias_bound = weight_bound = 1 / layer.in_features**0.5
            if config.head_init == "xavier":
                weight_bound = (6 / (layer.in_features + layer.out_features)) ** 0.5
            layer.weight.uniform_(-weight_bound, weight_bound, generator=generator)
            layer.bias.uniform_(-bias_bound, bias_bound, generator=generator)
    return head


@dataclass
class EpisodeResult:
    query_loss: torch.Tensor  # the outer loss, differentiable into the head and the query features
    query_accuracy: float
    support_loss: float  # after adaptation
    support_accuracy: float
    inner_loss_first: float
    inner_loss_last: float


def adapt_and_query(
    head: EpisodeHead,
    support_features: torch.Tensor,
    support_labels: torch.Tensor,
    query_features: torch.Tensor,
    query_labels: torch.Tensor,
    inner_steps: int,
    inner_lr: float,
    first_order: bool = True,
    classes: torch.Tensor | None = None,
) -> EpisodeResult:
    """The MAML inner loop on the head and the outer (query) loss. `support_features` should be detached;
    `classes`: the class token ids of a vocabulary head (paper), None for an N-output head (smlmt)."""
    params = head.episode_parameters(classes)
    # First order: adapt copies cut from the head, then pass the query through head + (adapted - head).detach():
    # the adapted value with the gradient of the pre-adaptation head (straight-through).
    fast = [p.detach().requires_grad_() for p in params] if first_order else list(params)
    inner_losses = []
    for _ in range(inner_steps):
        loss = F.cross_entropy(head_forward(fast, support_features), support_labels)
        inner_losses.append(loss.detach())
        grads = torch.autograd.grad(loss, fast, create_graph=not first_order)
        fast = [v - inner_lr * g for v, g in zip(fast, grads, strict=True)]
    if first_order:
        fast = [p + (v - p).detach() for p, v in zip(params, fast, strict=True)]
    query_logits = head_forward(fast, query_features)
    query_loss = F.cross_entropy(query_logits, query_labels)
    with torch.no_grad():
        support_logits = head_forward(fast, support_features)
        support_loss = F.cross_entropy(support_logits, support_labels)
        first = inner_losses[0] if inner_losses else support_loss
        last = inner_losses[-1] if inner_losses else support_loss
        return EpisodeResult(
            query_loss=query_loss,
            query_accuracy=(query_logits.argmax(-1) == query_labels).float().mean().item(),
            support_loss=support_loss.item(),
            support_accuracy=(support_logits.argmax(-1) == support_labels).float().mean().item(),
            inner_loss_first=first.item(),
            inner_loss_last=last.item(),
        )


class MAMLObjective:
    """The meta-learning side of a run: the head, the group schedule, each micro-batch's loss and the logs."""

    STATS = (
        "support_loss",
        "support_accuracy",
        "query_loss",
        "query_accuracy",
        "inner_loss_first",
        "inner_loss_last",
    )
    # What each step adds up on each process and sums over processes: the LM loss of its LM groups, their count,
    # the fallback groups, the episodes, and each statistic summed over episodes.
    _TOTALS = ("lm_loss", "lm_groups", "fallback_groups", "episodes", *STATS)

    def __init__(
        self,
        config: MAMLConfig,
        d_model: int,
        vocab_size: int,
        mask_token: int,
        seed: int,
        global_batch: int,
    ) -> None:
        self.config = config
        self.mask_token = mask_token
        self.seed = seed
        self.groups_per_step = global_batch // config.episode_sequences
        self.head = build_head(d_model, config, vocab_size, seed)
        self.step = 0
        self.micro_step = 0
        self.meta_groups: list[bool] = []  # the current step's choice for each group of its global batch
        self.counts = {"meta_groups": 0, "lm_groups": 0, "fallback_groups": 0}
        self._step_totals = dict.fromkeys(self._TOTALS, 0.0)  # this process, this step (lm_loss: a tensor)
        self._log_totals = dict.fromkeys(self._TOTALS, 0.0)  # every process, since the last log

    # --- schedule -----------------------------------------------------------------------------------------

    def begin_step(self, step: int) -> None:
        self.step, self.micro_step = step, 0
        c = self.config
        if c.objective == "paper":
            self.meta_groups = [
                is_meta_group(self.seed, step, g, c.hybrid_ratio) for g in range(self.groups_per_step)
            ]
        else:
            self.meta_groups = [is_meta_step(self.seed, step, c.hybrid_ratio)] * self.groups_per_step
        self.counts["meta_groups"] += sum(self.meta_groups)
        self.counts["lm_groups"] += self.groups_per_step - sum(self.meta_groups)

    # --- the loss -----------------------------------------------------------------------------------------

    def _episode(self, input_ids: torch.Tensor, group: int) -> Episode | None:
        c = self.config
        if c.objective == "paper":
            episode = sample_paper_episode(
                input_ids, c.n_way, c.k_shot, self.mask_token, self.seed, self.step, group
            )
        else:
            episode = sample_episode(
                input_ids, c.n_way, c.k_shot, c.n_query, self.mask_token, self.seed, self.step, group
            )
        if episode is None:
            self._step_totals["fallback_groups"] += 1
            need = (
                f"fewer than n_way={c.n_way} distinct tokens at its support positions"
                if c.objective == "paper"
                else f"fewer than n_way={c.n_way} token types occurring k_shot+n_query={c.k_shot + c.n_query} times"
            )
            logger.warning(
                "MAML step %d: group %d has %s; it trains as a language-modelling group",
                self.step,
                group,
                need,
            )
        return episode

    def micro_batch_loss(
        self, model: nn.Module, inputs: dict[str, Any], process_index: int, num_processes: int
    ) -> torch.Tensor:
        """The mean over the micro-batch's groups of each group's loss: an LM group's mean next-token loss, a meta
        group's query loss (+ `lm_loss_weight` x its masked LM loss for smlmt). Every group weighs the same in
        the step's gradient whatever the layout.

        One forward per group, meta or LM: every process makes as many forwards per micro-batch (DDP broadcasts
        buffers and FSDP gathers weights at each), and a group's computation is the same in any layout."""
        input_ids, targets = inputs["input_ids"], inputs["shift_labels"]
        size = self.config.episode_sequences
        groups = input_ids.shape[0] // size
        # The micro-batch's place in the global batch (BatchLayout's order), then its groups'.
        first = (self.micro_step * num_processes + process_index) * groups
        self.micro_step += 1
        total = torch.zeros((), device=input_ids.device)
        trained_lm = False
        for j in range(groups):
            rows = slice(j * size, (j + 1) * size)
            episode = self._episode(input_ids[rows], first + j) if self.meta_groups[first + j] else None
            if episode is None:
                loss = model(input_ids=input_ids[rows], shift_labels=targets[rows]).loss
                total = total + loss
                self._step_totals["lm_loss"] = self._step_totals["lm_loss"] + loss.detach()
                self._step_totals["lm_groups"] += 1
                trained_lm = True
            else:
                total = total + self._meta_loss(model, episode, targets[rows])
        if not trained_lm and self.config.objective == "paper":
            # DDP (without find_unused_parameters) waits for a gradient of every parameter: a zero one for the
            # output layer, which no query loss reaches.
            unwrapped = model.module if hasattr(model, "module") else model
            total = total + 0.0 * sum(p.sum() for p in unwrapped.get_output_embeddings().parameters())
        return total / groups

    def _meta_loss(self, model: nn.Module, episode: Episode, targets: torch.Tensor) -> torch.Tensor:
        """One backbone forward on the masked group, the inner loop on the detached support features, and the
        query loss (+ `lm_loss_weight` x the masked group's LM loss for smlmt)."""
        c = self.config
        # The forward gets the targets: learning-dynamics capture records the rows the model trained on, and the
        # smlmt objective trains on the masked group's LM loss (the paper objective leaves it out).
        outputs = model(input_ids=episode.input_ids, shift_labels=targets, output_hidden_states=True)
        features = outputs.hidden_states[-1]  # (S, T, d_model), the final (normed) hidden state
        features = features.reshape(-1, features.shape[-1]).float()
        with torch.autocast(features.device.type, enabled=False):  # the small head adapts in float32
            result = adapt_and_query(
                self.head,
                features[episode.support].detach(),
                episode.support_labels,
                features[episode.query],
                episode.query_labels,
                c.inner_steps,
                c.inner_lr,
                c.first_order,
                classes=episode.classes if c.objective == "paper" else None,
            )
        for key in self.STATS:
            value = result.query_loss.item() if key == "query_loss" else getattr(result, key)
            self._step_totals[key] += value
        self._step_totals["episodes"] += 1
        if c.objective == "smlmt":
            return result.query_loss + c.lm_loss_weight * outputs.loss
        return result.query_loss

    # --- optimizer, gradients, checkpoints and logs -------------------------------------------------------

    def sync_head_gradients(self) -> None:
        """Before the update of a step with meta groups: every process's head gradient becomes their mean (the
        head is not in the DDP-wrapped model). Missing gradients count as zeros on every process."""
        if not any(self.meta_groups):
            return
        for p in self.head.parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            for p in self.head.parameters():
                dist.all_reduce(p.grad)
                p.grad /= dist.get_world_size()

    def end_step(self, device: torch.device) -> None:
        """Sum the step's totals over processes (every process calls this once per step)."""
        totals = torch.tensor([float(self._step_totals[k]) for k in self._TOTALS], dtype=torch.float64)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            moved = totals.to(device)
            dist.all_reduce(moved)
            totals = moved.cpu()
        for key, value in zip(self._TOTALS, totals.tolist(), strict=True):
            self._log_totals[key] += value
        self.counts["fallback_groups"] += int(totals[self._TOTALS.index("fallback_groups")])
        self._step_totals = dict.fromkeys(self._TOTALS, 0.0)

    def save(self, state_dir: Path) -> None:
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in self.head.state_dict().items()},
            state_dir / HEAD_NAME,
        )
        (state_dir / STATE_NAME).write_text(json.dumps(self.counts))

    def load(self, state_dir: Path) -> None:
        head, counts = state_dir / HEAD_NAME, state_dir / STATE_NAME
        if not head.is_file():
            raise ConfigError(
                f"{state_dir} has no {HEAD_NAME}: it was not written by a run with training.maml.enabled"
            )
        weights = load_file(head)
        expected = {k: tuple(v.shape) for k, v in self.head.state_dict().items()}
        found = {k: tuple(v.shape) for k, v in weights.items()}
        if found != expected:
            raise ConfigError(
                f"{head} holds a head of other shapes ({found}) than training.maml makes ({expected}): the "
                "checkpoint was written with another training.maml.objective, n_way or head size"
            )
        with torch.no_grad():
            for name, value in self.head.state_dict().items():
                value.copy_(weights[name])
        self.counts = json.loads(counts.read_text())

    def update_log(self, logs: dict[str, float]) -> None:
        """A training log line: `loss` becomes the mean LM loss of the LM groups since the last log (absent when
        there were none), and the `maml/*` counts and per-episode means (over every process's episodes)."""
        totals = self._log_totals
        if totals["lm_groups"]:  # replaced in place: `loss` keeps its position in the line
            logs["loss"] = round(totals["lm_loss"] / totals["lm_groups"], 4)
        else:
            logs.pop("loss", None)
        logs.update({f"maml/{k}": v for k, v in self.counts.items()})
        if totals["episodes"]:
            logs.update({f"maml/{k}": round(totals[k] / totals["episodes"], 4) for k in self.STATS})
        self._log_totals = dict.fromkeys(self._TOTALS, 0.0)


class MAMLCallback(TrainerCallback):
    """Chooses each step's meta groups, averages the head's gradient across processes and sums the step's
    totals over processes."""

    def __init__(self, objective: MAMLObjective) -> None:
        self.objective = objective

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ):
        self.objective.begin_step(state.global_step)

    def on_pre_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ):
        self.objective.sync_head_gradients()

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ):
        self.objective.head.zero_grad(set_to_none=True)  # the Trainer zeroes the model's gradients only
        self.objective.end_step(args.device)


class MAMLMode(MAML):
    """Meta groups on their schedule: the objective's head trains in the model's optimizer and is saved with
    each checkpoint's state."""

    section: MAMLConfig

    def prepare_model(
        self, model: nn.Module, *, tokenizer: Any, micro_batch: int, world_size: int
    ) -> nn.Module:
        """The objective, checked against the tokenizer and the micro-batch before step 1."""
        config, maml = self.config, self.section
        mask_token = maml.mask_token if maml.mask_token is not None else tokenizer.pad_token_id
        if mask_token is None:
            raise ConfigError(
                f"training.maml.mask_token is null and tokenizer '{config.data.tokenizer.name}' has no pad token: "
                "set training.maml.mask_token to a reserved id"
            )
        check_episodes_possible(maml, micro_batch, config.model.max_seq_len)
        self.objective = MAMLObjective(
            maml,
            config.model.d_model,
            config.model.vocab_size,
            mask_token,
            config.training.seed,
            global_batch=config.data.dataloader.batch_size,
        )
        return model

    def callbacks(self) -> list[TrainerCallback]:
        return [MAMLCallback(self.objective)]

    def attach(self, trainer: Any) -> None:
        super().attach(trainer)
        self.objective.head.to(trainer.args.device)

    def create_optimizer(
        self, model: nn.Module, create: Callable[[], torch.optim.Optimizer]
    ) -> torch.optim.Optimizer:
        optimizer = create()
        # The meta head trains with the model, in the same optimizer.
        optimizer.add_param_group(
            {"params": list(self.objective.head.parameters()), "weight_decay": self.trainer.args.weight_decay}
        )
        return optimizer

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor | None:
        args = self.trainer.args
        return self.objective.micro_batch_loss(model, inputs, args.process_index, args.world_size)

    def update_training_log(self, logs: dict[str, float]) -> None:
        self.objective.update_log(logs)

    def save_state(self, state_dir: Path) -> None:
        self.objective.save(state_dir)

    def resume(
        self, state_dir: Path, model: nn.Module, weights: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        self.objective.load(state_dir)
        return weights
