from .configuration_pico_decoder import PRESETS, PicoDecoderConfig
from .modeling_pico_decoder import PicoDecoderForCausalLM, PicoDecoderModel, PicoDecoderPreTrainedModel

__all__ = [
    "PRESETS",
    "PicoDecoderConfig",
    "PicoDecoderForCausalLM",
    "PicoDecoderModel",
    "PicoDecoderPreTrainedModel",
]
