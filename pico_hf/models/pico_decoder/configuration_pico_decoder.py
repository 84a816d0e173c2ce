"""pico-decoder configuration.

The saved field names are pico's own (`d_model`, `n_layers`, ...), so a config written here is a valid
`pico-lm/pico-decoder-*` config; the standard transformers names (`hidden_size`, ...) are aliases through
`attribute_map`, so generic tooling (caches, generation, PEFT, accelerate, lm-eval) works unchanged.
`position_emb_theta` stays the RoPE base; transformers' `rope_parameters` adds its scaling types and is saved
only when it asks for more than pico's plain RoPE.

This file and `modeling_pico_decoder.py` are copied next to every saved checkpoint (`trust_remote_code`
loading), so they import nothing from `pico_hf`.
"""

from __future__ import annotations

from typing import Any

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

# The published pico-decoder suite: 12 layers, 12 heads, 4 KV heads, FFN 4x, OLMo vocab padded to 50304.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"d_model": 96, "activation_hidden_dim": 384},
    "small": {"d_model": 384, "activation_hidden_dim": 1536},
    "medium": {"d_model": 768, "activation_hidden_dim": 3072},
    "large": {"d_model": 1536, "activation_hidden_dim": 6144},
}


@strict(accept_kwargs=True)
class PicoDecoderConfig(PreTrainedConfig):
    r"""Configuration of a pico-decoder: a LLaMA-style decoder (RMSNorm, interleaved RoPE, GQA, SwiGLU, no
    biases, untied embeddings).

    Named presets reproduce the published models:

    ```python
    >>> config = PicoDecoderConfig.small()  # pico-lm/pico-decoder-small, 64.6M parameters
    >>> config.hidden_size, config.num_key_value_heads
    (384, 4)
    ```
    """

    model_type = "pico_decoder"
    attribute_map = {
        "hidden_size": "d_model",
        "num_hidden_layers": "n_layers",
        "num_attention_heads": "attention_n_heads",
        "num_key_value_heads": "attention_n_kv_heads",
        "intermediate_size": "activation_hidden_dim",
        "rms_norm_eps": "norm_eps",
        "rope_theta": "position_emb_theta",
        "max_position_embeddings": "max_seq_len",
    }
    keys_to_ignore_at_inference = ["cache"]
    base_model_tp_plan = {
        "layers.*.attention.q_proj": "colwise",
        "layers.*.attention.k_proj": "colwise",
        "layers.*.attention.v_proj": "colwise",
        "layers.*.attention.o_proj": "rowwise",
        "layers.*.swiglu.w_0": "colwise",
        "layers.*.swiglu.w_1": "colwise",
        "layers.*.swiglu.w_2": "rowwise",
    }
    base_model_fsdp_plan = {
        "embedding_proj": "free_full_weight",
        "layers.*": "free_full_weight",
        "output_norm": "keep_full_weight",
    }

    # pico-train's ModelConfig defaults (pico-decoder-medium shapes).
    d_model: int = 768
    n_layers: int = 12
    vocab_size: int = 50304
    attention_n_heads: int = 12
    attention_n_kv_heads: int | None = 4
    activation_hidden_dim: int = 3072
    norm_eps: float = 1e-6
    position_emb_theta: float = 10000.0
    max_seq_len: int = 2048
    rope_parameters: dict[str, Any] | None = None
    batch_size: int | None = None
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs: Any) -> None:
        if self.attention_n_kv_heads is None:
            self.attention_n_kv_heads = self.attention_n_heads
        if isinstance(self.position_emb_theta, int):
            self.position_emb_theta = float(self.position_emb_theta)
        self.check_shapes()
        # The RoPE base is pico's key: `rope_parameters` takes it from `position_emb_theta` and may not disagree.
        theta_given = (self.rope_parameters or {}).get("rope_theta")
        if theta_given is not None and float(theta_given) != self.position_emb_theta:
            raise ValueError(
                f"rope_parameters['rope_theta'] ({theta_given}) disagrees with position_emb_theta "
                f"({self.position_emb_theta}), pico's key for the RoPE base: set position_emb_theta instead."
            )
        super().__post_init__(**kwargs)
        if self.rope_parameters["rope_type"] == "dynamic":
            raise ValueError(
                f"rope_parameters['rope_type'] 'dynamic' rescales RoPE only for positions past max_seq_len "
                f"({self.max_seq_len}), which pico-decoder refuses: raise max_seq_len and use 'linear', 'yarn', "
                "'longrope' or 'llama3' with original_max_position_embeddings instead."
            )
        if self.rope_parameters.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError(
                f"rope_parameters['partial_rotary_factor'] must be 1.0: pico-decoder rotates the whole head, got "
                f"{self.rope_parameters['partial_rotary_factor']}."
            )

    def check_shapes(self) -> None:
        """Shape constraints, checked at construction so a bad config never reaches a forward pass."""
        for name in (
            "d_model",
            "n_layers",
            "vocab_size",
            "attention_n_heads",
            "attention_n_kv_heads",
            "activation_hidden_dim",
            "max_seq_len",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}.")
        if self.d_model % self.attention_n_heads != 0:
            raise ValueError(
                f"d_model ({self.d_model}) must be divisible by attention_n_heads ({self.attention_n_heads})."
            )
        if self.attention_n_heads % self.attention_n_kv_heads != 0:
            raise ValueError(
                f"attention_n_heads ({self.attention_n_heads}) must be divisible by attention_n_kv_heads "
                f"({self.attention_n_kv_heads})."
            )
        if self.head_dim % 2 != 0:
            raise ValueError(
                f"RoPE rotates pairs of dimensions, so the head dim d_model / attention_n_heads "
                f"({self.d_model} / {self.attention_n_heads} = {self.head_dim}) must be even."
            )

    @property
    def head_dim(self) -> int:
        return self.d_model // self.attention_n_heads

    def to_dict(self) -> dict[str, Any]:
        # Plain RoPE is fully described by `position_emb_theta`: keep config.json in the published format.
        output = super().to_dict()
        if output.get("rope_parameters") == {"rope_type": "default", "rope_theta": self.position_emb_theta}:
            del output["rope_parameters"]
        return output

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> PicoDecoderConfig:
        """The config of a published pico-decoder size (`tiny`, `small`, `medium`, `large`)."""
        if name not in PRESETS:
            raise ValueError(f"Unknown pico-decoder preset {name!r}; choose one of {sorted(PRESETS)}.")
        # OLMo tokenizer ids: eos `<|endoftext|>` = 50279, pad `<|padding|>` = 1.
        return cls(**{"eos_token_id": 50279, "pad_token_id": 1, **PRESETS[name], **overrides})

    @classmethod
    def tiny(cls, **overrides: Any) -> PicoDecoderConfig:
        return cls.from_preset("tiny", **overrides)

    @classmethod
    def small(cls, **overrides: Any) -> PicoDecoderConfig:
        return cls.from_preset("small", **overrides)

    @classmethod
    def medium(cls, **overrides: Any) -> PicoDecoderConfig:
        return cls.from_preset("medium", **overrides)

    @classmethod
    def large(cls, **overrides: Any) -> PicoDecoderConfig:
        return cls.from_preset("large", **overrides)


__all__ = ["PRESETS", "PicoDecoderConfig"]
