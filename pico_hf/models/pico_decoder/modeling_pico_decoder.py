"""pico-decoder: a LLaMA-style decoder (RMSNorm, interleaved RoPE, GQA, SwiGLU, no biases, untied
embeddings) as a native transformers model.

Blocks in reading order: norm -> rotary embedding -> SwiGLU -> attention -> decoder block -> pretrained
base -> model -> causal LM. Module names follow pico-train's `PicoDecoder`, so the published
`pico-lm/pico-decoder-*` checkpoints load as they are and learning-dynamics keys
(`layers.0.attention.v_proj`) mean the same thing.

This file is copied next to every saved checkpoint (`trust_remote_code` loading): it imports nothing from
`pico_hf`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.conversion_mapping import register_checkpoint_conversion_mapping
from transformers.core_model_loading import WeightRenaming
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, auto_docstring, can_return_tuple, logging
from transformers.utils.auto_docstring import HARDCODED_CONFIG_FOR_MODELS
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.import_utils import is_torchdynamo_compiling
from transformers.utils.output_capturing import capture_outputs

from .configuration_pico_decoder import PicoDecoderConfig

logger = logging.get_logger(__name__)

# `auto_docstring` finds a model's config by its folder name among transformers' own models; pico-decoder lives
# outside transformers, so its config is named here (otherwise every decorated class prints "Config not found").
HARDCODED_CONFIG_FOR_MODELS.setdefault("pico-decoder", "PicoDecoderConfig")

# The published checkpoints keep the output projection inside the decoder (`pico_decoder.de_embedding_proj`);
# here it is the causal-LM head. Loading renames the key and saving renames it back.
register_checkpoint_conversion_mapping(
    "PicoDecoderForCausalLM",
    [WeightRenaming(r"^pico_decoder\.de_embedding_proj\.", "de_embedding_proj.")],
    overwrite=True,
)


class PicoDecoderRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # Normalise in float32, cast back, then scale: the order pico-train uses.
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


def _on_host(tensor: torch.Tensor) -> bool:
    return tensor.device.type == "cpu"


def _raise_for_token_id(low: int, high: int, vocab_size: int) -> None:
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise ValueError(
            f"input_ids contains token id {bad}, outside the model's vocabulary "
            f"(vocab_size={vocab_size}, valid ids 0..{vocab_size - 1})."
        )


def check_vocab_range(input_ids: torch.Tensor, vocab_size: int) -> None:
    """ValueError naming the first offending id when `input_ids` leave 0..vocab_size-1 (one host read)."""
    if input_ids.numel() == 0:
        return
    _raise_for_token_id(*torch.stack(torch.aminmax(input_ids)).tolist(), vocab_size)


def check_input_range(
    input_ids: torch.Tensor | None, position_ids: torch.Tensor, vocab_size: int, max_seq_len: int
) -> None:
    """ValueError when `input_ids` leave 0..vocab_size-1 or `position_ids` reach `max_seq_len`, in one host read.

    The limit is on positions, not on the row length: a row packing several sequences (padding-free inputs,
    `position_ids` restarting at 0 for each) may be longer than `max_seq_len`."""
    if position_ids.numel() == 0:
        return
    extremes = [position_ids.max()]
    if input_ids is not None and input_ids.numel() > 0:
        extremes += [value.to(position_ids.dtype) for value in torch.aminmax(input_ids)]
    last_position, *id_range = torch.stack(extremes).tolist()
    if id_range:
        _raise_for_token_id(*id_range, vocab_size)
    if last_position >= max_seq_len:
        raise ValueError(
            f"Input reaches position {last_position}, beyond the model's max_seq_len ({max_seq_len}, positions "
            f"0..{max_seq_len - 1}); truncate it or process it in windows."
        )


class PicoDecoderRotaryEmbedding(nn.Module):
    """cos/sin tables for RoPE, computed per forward from `position_ids` (no table shared across models).

    The frequencies follow `config.rope_parameters`: pico's own for `rope_type="default"` (base
    `position_emb_theta`), transformers' `ROPE_INIT_FUNCTIONS` for the scaling types (`linear`, `yarn`,
    `longrope`, `llama3`, ...). Whatever the type, each frequency rotates an interleaved pair."""

    inv_freq: torch.Tensor
    original_inv_freq: torch.Tensor

    def __init__(self, config: PicoDecoderConfig) -> None:
        super().__init__()
        self.config = config
        self.max_seq_len_cached = config.max_seq_len
        self.original_max_seq_len = config.max_seq_len
        self.rope_type = config.rope_parameters["rope_type"]
        self.rope_init_fn: Callable = self.compute_default_rope_parameters
        if self.rope_type != "default":
            self.rope_init_fn = ROPE_INIT_FUNCTIONS[self.rope_type]
        inv_freq, self.attention_scaling = self.rope_init_fn(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("original_inv_freq", inv_freq.clone(), persistent=False)

    @staticmethod
    def compute_default_rope_parameters(
        config: PicoDecoderConfig, *args, **kwargs
    ) -> tuple[torch.Tensor, float]:
        """pico-train's frequencies, position_emb_theta ** (-2i / head_dim), and no scaling of cos/sin."""
        dim = config.head_dim
        return 1.0 / (config.position_emb_theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)), 1.0

    @torch.no_grad()
    @dynamic_rope_update  # `longrope` switches to its long factors past original_max_position_embeddings
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
        # Pico rotates interleaved pairs (2i, 2i+1), so each frequency covers two adjacent dims.
        emb = freqs.repeat_interleave(2, dim=-1)  # (B, T, head_dim)
        # Kept in float32 whatever the model dtype: pico-train rotates q/k in float32 (see below).
        return emb.cos() * self.attention_scaling, emb.sin() * self.attention_scaling


def rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...): multiplication by i on interleaved complex pairs."""
    x_even, x_odd = x[..., 0::2], x[..., 1::2]
    return torch.stack((-x_odd, x_even), dim=-1).flatten(-2)


def apply_rotary_pos_emb(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q and k (B, H, T, head_dim) by their positions, pico's interleaved-pair layout.

    The rotation runs in float32 and is cast back, as pico-train does: in bf16 this keeps logits
    equal to the reference's bf16 forward (rotating in bf16 moved them by ~0.02)."""
    cos, sin = cos.unsqueeze(unsqueeze_dim).float(), sin.unsqueeze(unsqueeze_dim).float()
    q32, k32 = q.float(), k.float()
    q_rot, k_rot = q32 * cos + rotate_pairs(q32) * sin, k32 * cos + rotate_pairs(k32) * sin
    return q_rot.to(q.dtype), k_rot.to(k.dtype)


class PicoDecoderSwiGLU(nn.Module):
    """`w_2(silu(w_0 x) * w_1 x)`."""

    def __init__(self, config: PicoDecoderConfig) -> None:
        super().__init__()
        self.w_0 = nn.Linear(config.d_model, config.activation_hidden_dim, bias=False)
        self.w_1 = nn.Linear(config.d_model, config.activation_hidden_dim, bias=False)
        self.w_2 = nn.Linear(config.activation_hidden_dim, config.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_2(F.silu(self.w_0(x)) * self.w_1(x))


def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, KV, T, hd) -> (B, KV * n_rep, T, hd), each KV head serving n_rep query heads."""
    batch, num_kv_heads, seq_len, head_dim = hidden_states.shape
    if n_rep == 1:
        return hidden_states
    hidden_states = hidden_states[:, :, None].expand(batch, num_kv_heads, n_rep, seq_len, head_dim)
    return hidden_states.reshape(batch, num_kv_heads * n_rep, seq_len, head_dim)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs: Unpack[TransformersKwargs],
) -> tuple[torch.Tensor, torch.Tensor]:
    key_states = repeat_kv(key, module.num_key_value_groups)
    value_states = repeat_kv(value, module.num_key_value_groups)

    attn_weights = torch.matmul(query, key_states.transpose(2, 3)) * scaling  # (B, H, T, S)
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = F.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = F.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value_states).transpose(1, 2).contiguous()  # (B, T, H, hd)
    return attn_output, attn_weights


class PicoDecoderAttention(nn.Module):
    """Grouped-query attention; the kernel comes from `config._attn_implementation` (eager, sdpa, flash, flex)."""

    def __init__(self, config: PicoDecoderConfig, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.attention_n_heads // config.attention_n_kv_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = True

        self.q_proj = nn.Linear(config.d_model, config.attention_n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.d_model, config.attention_n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.d_model, config.attention_n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(config.attention_n_heads * self.head_dim, config.d_model, bias=False)

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)

        query_states = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # (B, H, T, hd)
        key_states = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # (B, KV, T, hd)
        value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # (B, KV, T, hd)

        cos, sin = position_embeddings
        query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)

        if cache is not None:
            key_states, value_states = cache.update(key_states, value_states, self.layer_idx, kwargs=kwargs)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=0.0,
            scaling=self.scaling,
            **kwargs,
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()  # (B, T, d_model)
        return self.o_proj(attn_output), attn_weights


class PicoDecoderBlock(GradientCheckpointingLayer):
    """Pre-norm residual block: x + attention(norm(x)), then x + swiglu(norm(x))."""

    def __init__(self, config: PicoDecoderConfig, layer_idx: int) -> None:
        super().__init__()
        self.attention_norm = PicoDecoderRMSNorm(config.d_model, eps=config.norm_eps)
        self.attention = PicoDecoderAttention(config, layer_idx)
        self.swiglu_norm = PicoDecoderRMSNorm(config.d_model, eps=config.norm_eps)
        self.swiglu = PicoDecoderSwiGLU(config)

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        attn_output, _ = self.attention(
            self.attention_norm(hidden_states),
            position_embeddings=position_embeddings,
            attention_mask=attention_mask,
            cache=cache,
            **kwargs,
        )
        hidden_states = hidden_states + attn_output
        return hidden_states + self.swiglu(self.swiglu_norm(hidden_states))


@auto_docstring
class PicoDecoderPreTrainedModel(PreTrainedModel):
    config: PicoDecoderConfig
    config_class = PicoDecoderConfig
    base_model_prefix = "pico_decoder"
    supports_gradient_checkpointing = True
    _no_split_modules = ["PicoDecoderBlock"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _can_compile_fullgraph = True
    _supports_attention_backend = True
    _can_record_outputs = {"hidden_states": PicoDecoderBlock, "attentions": PicoDecoderAttention}

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """`PreTrainedModel.from_pretrained`, with its loading semantics (missing tensors are initialised,
        warned about and listed by `output_loading_info=True`; shape mismatches need
        `ignore_mismatched_sizes=True`), except that a checkpoint sharing no tensor with pico-decoder is an
        error rather than a model initialised from scratch."""
        wants_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        if info["unexpected_keys"] and len(info["missing_keys"]) >= len(model.state_dict()):
            source = args[0] if args else kwargs.get("pretrained_model_name_or_path")
            unexpected = sorted(info["unexpected_keys"])
            raise ValueError(
                f"Checkpoint {source} is not a pico-decoder checkpoint: none of its {len(unexpected)} tensor(s) "
                f"is one the model expects (it has e.g. {unexpected[:3]}; pico-decoder's are named like "
                "'pico_decoder.layers.0.attention.q_proj.weight'). A Llama checkpoint converts with "
                "`python -m pico_hf.convert from-llama`."
            )
        return (model, info) if wants_info else model

    def _init_weights(self, module: nn.Module) -> None:
        # PyTorch's default initialisation, as pico-train trains from it: Kaiming-uniform linears,
        # N(0, 1) embeddings, unit norms.
        if isinstance(module, nn.Linear):
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=1.0)
        elif isinstance(module, PicoDecoderRMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, PicoDecoderRotaryEmbedding):
            inv_freq, _ = module.rope_init_fn(module.config)
            init.copy_(module.inv_freq, inv_freq)
            init.copy_(module.original_inv_freq, inv_freq)


@auto_docstring(
    custom_intro="The decoder trunk: embeddings, blocks and the final norm (no output projection)."
)
class PicoDecoderModel(PicoDecoderPreTrainedModel):
    _keys_to_ignore_on_load_unexpected = [r"de_embedding_proj\.weight"]

    def __init__(self, config: PicoDecoderConfig) -> None:
        super().__init__(config)
        self.embedding_proj = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList([PicoDecoderBlock(config, i) for i in range(config.n_layers)])
        self.output_norm = PicoDecoderRMSNorm(config.d_model, eps=config.norm_eps)
        self.rotary_emb = PicoDecoderRotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embedding_proj

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embedding_proj = value

    def _check_inputs(
        self, input_ids: torch.LongTensor | None, position_ids: torch.LongTensor, cache: Cache | None
    ) -> None:
        """Clear errors for ids outside the vocabulary (instead of an IndexError or a device assert) and for
        positions beyond `max_seq_len`.

        Reading them back is a host sync on an accelerator, so there only cache-less forwards (a training
        batch, a plain forward) are checked; `generate` checks its prompt's ids once, and the tokens it feeds
        back come from the vocabulary."""
        if is_torchdynamo_compiling() or (cache is not None and not _on_host(position_ids)):
            return
        check_input_range(input_ids, position_ids, self.config.vocab_size, self.config.max_seq_len)

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @merge_with_config_defaults
    @capture_outputs
    @auto_docstring
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")

        # The mask sees only a cache the caller brought: a fresh one holds no past, and passing it would hide
        # packed sequences (padding-free inputs: no attention_mask, position_ids restarting) from the mask.
        past_cache = cache
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)

        if position_ids is None:
            tokens = input_ids if input_ids is not None else inputs_embeds
            past_seen_tokens = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(tokens.shape[1], device=tokens.device) + past_seen_tokens
            position_ids = position_ids.unsqueeze(0)

        self._check_inputs(input_ids, position_ids, past_cache)
        if inputs_embeds is None:
            inputs_embeds = self.embedding_proj(input_ids)  # (B, T, d_model)

        causal_mask = create_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            cache=past_cache,
            position_ids=position_ids,
        )

        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids=position_ids)
        for block in self.layers:
            hidden_states = block(
                hidden_states,
                position_embeddings=position_embeddings,
                attention_mask=causal_mask,
                cache=cache,
                position_ids=position_ids,
                **kwargs,
            )
        hidden_states = self.output_norm(hidden_states)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, cache=cache)


class LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of `hidden @ weight.T` against `labels`, a chunk of rows at a time.

    Full-vocabulary logits never exist for the whole batch: each chunk's float32 logits live only long
    enough to give that chunk's loss and its gradients, which are computed here in the forward pass and
    scaled by the incoming gradient in backward. Same three matmuls as the plain path, a fraction of the
    memory.
    """

    @staticmethod
    def forward(
        ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_size: int
    ) -> torch.Tensor:
        # hidden: (N, d), weight: (V, d), labels: (N,) with -100 marking ignored rows.
        need_hidden_grad, need_weight_grad = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        loss = torch.zeros((), device=hidden.device, dtype=torch.float32)
        grad_hidden = torch.empty_like(hidden) if need_hidden_grad else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_weight_grad else None
        for start in range(0, hidden.shape[0], chunk_size):
            h, y = hidden[start : start + chunk_size], labels[start : start + chunk_size]
            valid = (y != -100)[:, None]
            target = torch.where(valid.squeeze(1), y, 0)[:, None]
            logprobs = torch.log_softmax((h @ weight.T).float(), dim=-1)  # (n, V)
            loss -= (logprobs.gather(1, target) * valid).sum()
            if not (need_hidden_grad or need_weight_grad):
                continue
            # d(loss)/d(logits) = softmax - one_hot(target). Ignored rows are masked on the small (n, d) side.
            grad_logits = logprobs.exp_()
            grad_logits.scatter_add_(1, target, torch.full_like(target, -1.0, dtype=grad_logits.dtype))
            grad_logits = grad_logits.to(hidden.dtype)
            valid = valid.to(hidden.dtype)
            if need_hidden_grad:
                grad_hidden[start : start + chunk_size] = (grad_logits @ weight) * valid
            if need_weight_grad:
                if grad_weight.dtype == h.dtype:
                    grad_weight.addmm_(grad_logits.T, h * valid)
                else:  # low-precision weights: accumulate chunks in float32
                    grad_weight += grad_logits.T @ (h * valid)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_loss.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_loss).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None


@auto_docstring(
    custom_intro="pico-decoder with its (untied) output projection; logits are float32, as in pico-train."
)
class PicoDecoderForCausalLM(PicoDecoderPreTrainedModel, GenerationMixin):
    _tp_plan = {"de_embedding_proj": "colwise_gather_output"}
    _pp_plan = {"de_embedding_proj": (["hidden_states"], ["logits"])}
    # Logits per chunk of the training loss: 32 MiB of float32 (166 rows at the OLMo vocab size) keeps the
    # peak low and, on CPU, measured faster than larger chunks.
    loss_chunk_elements = 2**23

    def __init__(self, config: PicoDecoderConfig) -> None:
        super().__init__(config)
        self.pico_decoder = PicoDecoderModel(config)
        self.de_embedding_proj = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self) -> nn.Linear:
        return self.de_embedding_proj

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        self.de_embedding_proj = new_embeddings

    def generate(self, inputs: torch.Tensor | None = None, *args, **kwargs):
        """GenerationMixin's `generate`, with the prompt's ids checked once (decoding steps skip the check)."""
        ids = inputs if inputs is not None else kwargs.get("input_ids")
        if isinstance(ids, torch.Tensor) and not ids.is_floating_point() and not is_torchdynamo_compiling():
            check_vocab_range(ids, self.config.vocab_size)
        return super().generate(inputs, *args, **kwargs)

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @can_return_tuple
    @auto_docstring
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        skip_logits: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> CausalLMOutputWithPast:
        r"""
        labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
            Next-token targets, aligned with `input_ids` (shifted inside); `-100` is ignored. The loss is the
            mean over target tokens, or their sum over `num_items_in_batch` when the Trainer passes it.
        shift_labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*, via kwargs):
            Targets already aligned with next-token predictions (position t predicts `shift_labels[:, t]`), so the
            last position is trained too; takes precedence over `labels`.
        skip_logits (`bool`, *optional*):
            Compute the loss without materialising full-vocabulary logits (chunked; `logits` is `None`).
            Defaults to `True` in training mode when `labels` are given, `False` otherwise or under tensor
            parallelism (where `True` is an error: the head's weight is sharded by `_tp_plan`).
        """
        shift_labels = kwargs.pop("shift_labels", None)
        outputs: BaseModelOutputWithPast = self.pico_decoder(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state  # (B, T, d_model)

        has_targets = labels is not None or shift_labels is not None
        # The chunked loss multiplies by the head's weight directly, so the head's `_tp_plan` entry (a vocabulary
        # shard per rank, gathered on output) never runs: under tensor parallelism the loss goes through the head.
        tensor_parallel = (self.tp_size or 1) > 1
        if skip_logits is None:
            skip_logits = self.training and has_targets and not tensor_parallel
        elif skip_logits and has_targets and tensor_parallel:
            raise ValueError(
                f"skip_logits=True (the chunked loss) cannot run under tensor parallelism (tp_size={self.tp_size}): "
                "it reads de_embedding_proj.weight, which each rank holds only a vocabulary shard of. Leave "
                "skip_logits unset to compute the loss from the gathered logits."
            )
        # The fused loss reads the head's weight directly, so it needs a plain Linear (not a PEFT/quantised one).
        if skip_logits and has_targets and type(self.de_embedding_proj) is nn.Linear:
            if shift_labels is None:
                shift_labels = F.pad(labels, (0, 1), value=-100)[..., 1:]
            loss = self.chunked_loss(hidden_states, shift_labels, kwargs.get("num_items_in_batch"))
            logits = None
        else:
            slice_indices = (
                slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
            )
            logits = self.de_embedding_proj(hidden_states[:, slice_indices, :]).float()  # (B, T', V)
            loss = None
            if has_targets:
                loss = self.loss_function(
                    logits=logits,
                    labels=labels,
                    vocab_size=self.config.vocab_size,
                    shift_labels=shift_labels,
                    **kwargs,
                )

        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )

    def chunked_loss(
        self,
        hidden_states: torch.Tensor,
        shift_labels: torch.LongTensor,
        num_items_in_batch: int | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Next-token cross-entropy of (B, T) already-shifted targets without materialising (B, T, V) logits."""
        shift_labels = shift_labels.to(hidden_states.device)
        hidden = hidden_states.reshape(-1, hidden_states.shape[-1])
        weight = self.de_embedding_proj.weight
        chunk_size = max(1, self.loss_chunk_elements // weight.shape[0])
        loss_sum = LinearCrossEntropy.apply(hidden, weight, shift_labels.reshape(-1), chunk_size)
        if num_items_in_batch is None:
            num_items_in_batch = (shift_labels != -100).sum()
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss_sum.device)
        return loss_sum / num_items_in_batch


__all__ = ["PicoDecoderForCausalLM", "PicoDecoderModel", "PicoDecoderPreTrainedModel"]
