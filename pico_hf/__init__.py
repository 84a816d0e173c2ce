"""pico-hf: the Pico small-language-model research framework on the Hugging Face stack.

Importing the package registers pico-decoder with transformers' Auto classes, so

    import pico_hf
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained("pico-lm/pico-decoder-small")

loads the published checkpoints with no `trust_remote_code`.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from .models.pico_decoder import PRESETS, PicoDecoderConfig, PicoDecoderForCausalLM, PicoDecoderModel

__version__ = "0.1.0"

AutoConfig.register("pico_decoder", PicoDecoderConfig, exist_ok=True)
# Early pico-lm step-0 commits were saved with `model_type: "pico"`: read them as pico_decoder configs.
CONFIG_MAPPING.register("pico", PicoDecoderConfig, exist_ok=True)
AutoModel.register(PicoDecoderConfig, PicoDecoderModel, exist_ok=True)
AutoModelForCausalLM.register(PicoDecoderConfig, PicoDecoderForCausalLM, exist_ok=True)

# Saved checkpoints carry `auto_map` and these classes' source, so processes that never import pico_hf
# (e.g. `lm_eval --model hf ... trust_remote_code=True`) can load them.
PicoDecoderConfig.register_for_auto_class()
PicoDecoderModel.register_for_auto_class("AutoModel")
PicoDecoderForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = ["PRESETS", "PicoDecoderConfig", "PicoDecoderForCausalLM", "PicoDecoderModel", "__version__"]
