from .configuration_pico_decoder import PRESETS, PicoDecoderConfig
from .modeling_pico_decoder import PicoDecoderForCausalLM, PicoDecoderModel, PicoDecoderPreTrainedModel

__all__ = [
    "PRESETS",
    "PicoDecoderConfig",
    "PicoDecoderForCausalLM",
    "PicoDecoderModel",
    "PicoDecoderPreTrainedModel",
]

# Saved checkpoints carry `auto_map` and these classes' source, so processes that never import pico_hf
# (e.g. `lm_eval --model hf ... trust_remote_code=True`) can load them.
PicoDecoderConfig.register_for_auto_class()
PicoDecoderModel.register_for_auto_class("AutoModel")
PicoDecoderForCausalLM.register_for_auto_class("AutoModelForCausalLM")
