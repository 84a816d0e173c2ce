"""MAML pretraining: ordinary next-token steps mixed with first-order MAML steps on SMLMT episodes.

Pico's meta-learning mode (Africa et al. 2025, "Learning Dynamics of Meta-Learning in Small Model Pretraining",
after Bansal et al. 2020's Subset Masked Language Modelling Tasks). A share `hybrid_ratio` of optimizer steps are
meta steps; on a meta step every micro-batch becomes one N-way K-shot episode:

- Episode: among the token types that occur at least K+Q times in the micro-batch (the mask token excluded),
  N are drawn at random; their order is the random label permutation (class i = the i-th drawn type). Every
  occurrence of the N types is replaced by the mask token (so the model never sees an unmasked copy of a class
  it must recognise), and for each type K+Q of its positions are drawn: the first K are its support, the last Q
  its query. A query's label is therefore always one of the episode's classes.
- One forward of the backbone on the masked micro-batch; the features of a position are the model's final
  hidden state there (it sees the context before the mask and the mask itself, as the model is causal).
- Inner loop: a small MLP head (`head_num_layers` layers, `head_hidden_dim` wide, N outputs) takes
  `inner_steps` SGD steps of size `inner_lr` on the support cross-entropy, functionally
  (`torch.func.functional_call`), on the support features detached from the backbone.
- Outer loss: the query cross-entropy through the adapted head, back into the head and the backbone. First order
  uses the straight-through form (the adapted head's value, the pre-adaptation head's gradient); with
  `first_order: false` the gradient goes through the unrolled inner loop. The head's own parameters are never
  modified by the inner loop, so it is "restored" after each episode by construction.

The head is training state: its parameters are in the optimizer and saved in each checkpoint's state folder
(`maml_head.safetensors`), never in `model.safetensors`. Which optimizer steps are meta steps, and each
episode, are pure functions of (seed, step[, micro-batch index in the global batch]): the same on every process,
for any process count, and after a resume.
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
from torch.func import functional_call
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ..configuration import ConfigError
from .modes.maml import MAML, MAMLConfig

logger = logging.getLogger("pico_hf.training")

HEAD_NAME = "maml_head.safetensors"
STATE_NAME = "maml_state.json"
_SCHEDULE_STREAM, _EPISODE_STREAM, _HEAD_STREAM = 0x5343, 0x4550, 0x4844  # independent RNG streams per use


def check_episodes_possible(maml: MAMLConfig, micro_batch: int, seq_len: int) -> None:
    """A micro-batch of `micro_batch` x `seq_len` tokens can hold at most tokens / (K+Q) classes."""
    per_class = maml.k_shot + maml.n_query
    most = micro_batch * seq_len // per_class
    if maml.n_way > most:
        raise ConfigError(
            f"training.maml.n_way ({maml.n_way}) x (k_shot + n_query) ({per_class}) exceeds the {micro_batch} x "
            f"{seq_len} tokens of a micro-batch: no episode could ever be made (at most {most} classes)"
        )


def is_meta_step(seed: int, step: int, hybrid_ratio: float) -> bool:
    """Whether optimizer step `step` (0-based) is a meta step: a pure function of (seed, step)."""
    return bool(np.random.default_rng([seed, _SCHEDULE_STREAM, step]).random() < hybrid_ratio)


@dataclass
class Episode:
    input_ids: torch.Tensor  # (B, T) with every occurrence of the episode's types masked
    support: torch.Tensor  # (N*K,) flat positions into B*T
    support_labels: torch.Tensor  # (N*K,)
    query: torch.Tensor  # (N*Q,)
    query_labels: torch.Tensor  # (N*Q,)
    token_types: torch.Tensor  # (N,) the original token of each class


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
    """An SMLMT episode from a (B, T) micro-batch, or None when fewer than N types occur K+Q times.

    Deterministic in (seed, step, index): `index` is the micro-batch's place in the step's global batch."""
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

    def tensor(array: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.ascontiguousarray(array), dtype=torch.long, device=device)

    return Episode(
        input_ids=tensor(masked).reshape(input_ids.shape),
        support=tensor(np.concatenate(support)),
        support_labels=tensor(np.repeat(np.arange(n_way), k_shot)),
        query=tensor(np.concatenate(query)),
        query_labels=tensor(np.repeat(np.arange(n_way), n_query)),
        token_types=tensor(chosen),
    )


def build_head(d_model: int, config: MAMLConfig, seed: int) -> nn.Sequential:
    """The episode classifier: `head_num_layers` linear layers with ReLU between, d_model -> ... -> n_way.
    Initialised from its own generator, so adding it changes no other random draw of the run."""
    dims = [d_model] + [config.head_hidden_dim] * (config.head_num_layers - 1) + [config.n_way]
    layers: list[nn.Module] = []
    for i in range(config.head_num_layers):
        layers.append(nn.Linear(dims[i], dims[i + 1]))
        if i < config.head_num_layers - 1:
            layers.append(nn.ReLU())
    head = nn.Sequential(*layers)
    generator = torch.Generator().manual_seed(
        int(np.random.default_rng([seed, _HEAD_STREAM]).integers(2**62))
    )
    with torch.no_grad():
        for layer in head:
            if isinstance(layer, nn.Linear):
                bound = 1 / layer.in_features**0.5  # nn.Linear's own default range
                layer.weight.uniform_(-bound, bound, generator=generator)
                layer.bias.uniform_(-bound, bound, generator=generator)
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
    head: nn.Module,
    support_features: torch.Tensor,
    support_labels: torch.Tensor,
    query_features: torch.Tensor,
    query_labels: torch.Tensor,
    inner_steps: int,
    inner_lr: float,
    first_order: bool = True,
) -> EpisodeResult:
    """The MAML inner loop on the head and the outer (query) loss. `support_features` should be detached."""
    params = dict(head.named_parameters())
    # First order: adapt copies cut from the head, then pass the query through head + (adapted - head).detach():
    # the adapted value with the gradient of the pre-adaptation head (straight-through).
    fast = {k: v.detach().requires_grad_() for k, v in params.items()} if first_order else dict(params)
    inner_losses = []
    for _ in range(inner_steps):
        loss = F.cross_entropy(functional_call(head, fast, (support_features,)), support_labels)
        inner_losses.append(loss.detach())
        grads = torch.autograd.grad(loss, list(fast.values()), create_graph=not first_order)
        fast = {k: v - inner_lr * g for (k, v), g in zip(fast.items(), grads, strict=True)}
    if first_order:
        fast = {k: params[k] + (v - params[k]).detach() for k, v in fast.items()}
    query_logits = functional_call(head, fast, (query_features,))
    query_loss = F.cross_entropy(query_logits, query_labels)
    with torch.no_grad():
        support_logits = functional_call(head, fast, (support_features,))
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
    """The meta-learning side of a run: the head, the step schedule, the meta loss and what is logged."""

    STATS = (
        "support_loss",
        "support_accuracy",
        "query_loss",
        "query_accuracy",
        "inner_loss_first",
        "inner_loss_last",
    )

    def __init__(self, config: MAMLConfig, d_model: int, mask_token: int, seed: int) -> None:
        self.config = config
        self.mask_token = mask_token
        self.seed = seed
        self.head = build_head(d_model, config, seed)
        self.meta = False  # the current optimizer step's type
        self.step = 0
        self.micro_step = 0
        self.counts = {"meta_steps": 0, "lm_steps": 0, "fallback_micro_batches": 0}
        self._sums: dict[str, float] = {}
        self._episodes = 0

    # --- schedule -----------------------------------------------------------------------------------------

    def begin_step(self, step: int) -> None:
        self.step, self.micro_step = step, 0
        self.meta = is_meta_step(self.seed, step, self.config.hybrid_ratio)
        self.counts["meta_steps" if self.meta else "lm_steps"] += 1

    # --- the meta loss ------------------------------------------------------------------------------------

    def episode_for(self, input_ids: torch.Tensor, process_index: int, num_processes: int) -> Episode | None:
        # The micro-batch's index in the global batch (BatchLayout's order): the same episode for any layout
        # that gives the same micro-batch.
        index = self.micro_step * num_processes + process_index
        self.micro_step += 1
        c = self.config
        episode = sample_episode(
            input_ids, c.n_way, c.k_shot, c.n_query, self.mask_token, self.seed, self.step, index
        )
        if episode is None:
            self.counts["fallback_micro_batches"] += 1
            logger.warning(
                "MAML step %d: micro-batch %d has fewer than n_way=%d token types occurring k_shot+n_query=%d "
                "times; it trains as a language-modelling micro-batch",
                self.step,
                index,
                c.n_way,
                c.k_shot + c.n_query,
            )
        return episode

    def meta_loss(self, model: nn.Module, inputs: dict[str, Any], episode: Episode) -> torch.Tensor:
        """One backbone forward on the masked micro-batch, the inner loop on its detached support features, and
        the query loss + `lm_loss_weight` x the LM loss of the masked micro-batch (its gradient; its value is
        that LM loss)."""
        c = self.config
        # The LM loss of the masked micro-batch is always computed (times lm_loss_weight, which may be 0): it
        # keeps every model parameter in the graph, so DDP without `find_unused_parameters` never waits for a
        # gradient that does not come, and the forward sees the same inputs as an LM step's (learning-dynamics
        # capture records them).
        outputs = model(
            input_ids=episode.input_ids, shift_labels=inputs["shift_labels"], output_hidden_states=True
        )
        features = outputs.hidden_states[-1]  # (B, T, d_model), the final (normed) hidden state
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
            )
        for key in self.STATS:
            value = result.query_loss.item() if key == "query_loss" else getattr(result, key)
            self._sums[key] = self._sums.get(key, 0.0) + value
        self._episodes += 1
        total = result.query_loss + c.lm_loss_weight * outputs.loss
        # The gradient of the meta objective, the value of the LM loss: the logged `loss` stays a language-modelling
        # loss on every step, comparable with a baseline run (the meta objective is logged as maml/query_loss).
        return total - total.detach() + outputs.loss.detach()

    # --- optimizer, gradients, checkpoints and logs -------------------------------------------------------

    def sync_head_gradients(self) -> None:
        """Before a meta step's update: every process's head gradient becomes their mean (the head is not in
        the DDP-wrapped model). Missing gradients (fallback micro-batches) count as zeros on every process."""
        if not self.meta:
            return
        for p in self.head.parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            for p in self.head.parameters():
                dist.all_reduce(p.grad)
                p.grad /= dist.get_world_size()

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
        with torch.no_grad():
            for name, value in self.head.state_dict().items():
                value.copy_(weights[name])
        self.counts = json.loads(counts.read_text())

    def pop_logs(self) -> dict[str, float]:
        logs: dict[str, float] = {f"maml/{k}": v for k, v in self.counts.items()}
        if self._episodes:
            logs.update({f"maml/{k}": round(v / self._episodes, 4) for k, v in self._sums.items()})
        self._sums, self._episodes = {}, 0
        return logs


class MAMLCallback(TrainerCallback):
    """Chooses each optimizer step's type, averages the head's gradient across processes and adds `maml/*`
    values to every training log (process 0's episodes)."""

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

    def on_log(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, logs=None, **kwargs
    ):
        if logs is not None and "loss" in logs:
            logs.update(self.objective.pop_logs())


class MAMLMode(MAML):
    """Meta steps on their schedule: the objective's head trains in the model's optimizer and is saved with
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
        self.objective = MAMLObjective(maml, config.model.d_model, mask_token, config.training.seed)
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
        if not self.objective.meta:
            return None
        args = self.trainer.args
        episode = self.objective.episode_for(inputs["input_ids"], args.process_index, args.world_size)
        if episode is None:
            return None
        return self.objective.meta_loss(model, inputs, episode)  # a mean over this micro-batch's episode

    def save_state(self, state_dir: Path) -> None:
        self.objective.save(state_dir)

    def resume(
        self, state_dir: Path, model: nn.Module, weights: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        self.objective.load(state_dir)
        return weights
