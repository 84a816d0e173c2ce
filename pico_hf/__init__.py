"""pico-hf: the Pico small-language-model research framework on the Hugging Face stack.

Importing the package registers pico-decoder with transformers' Auto classes, so

    import pico_hf
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained("pico-lm/pico-decoder-small")

loads the published checkpoints with no `trust_remote_code`. The import itself is light (no torch, no
transformers): the classes load on first use, and the Auto classes learn pico-decoder when first used.
"""

from typing import Any

from ._auto import install

__version__ = "0.1.0"
__all__ = ["PRESETS", "PicoDecoderConfig", "PicoDecoderForCausalLM", "PicoDecoderModel", "__version__"]

install()


def __getattr__(name: str) -> Any:
    if name in __all__:
        from .models import pico_decoder

        return getattr(pico_decoder, name)
    raise AttributeError(f"module 'pico_hf' has no attribute '{name}'")
