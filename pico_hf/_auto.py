"""pico-decoder in transformers' Auto classes, without importing transformers or torch at `import pico_hf`.

`import pico_hf` must stay fast (the recipes parse and validate their arguments before any heavy import), yet
`AutoConfig` / `AutoModel` / `AutoModelForCausalLM` must know pico-decoder afterwards. So once transformers'
Auto mappings exist (now, or when transformers loads them), they register pico-decoder on their first use:
by then no import is half-done, and the model classes can be imported safely.
"""

from __future__ import annotations

import importlib.abc
import sys
from typing import Any

_CONFIG_AUTO = "transformers.models.auto.configuration_auto"
_MODELING_AUTO = "transformers.models.auto.modeling_auto"
_MAPPINGS = {
    _CONFIG_AUTO: ["CONFIG_MAPPING"],
    _MODELING_AUTO: ["MODEL_MAPPING", "MODEL_FOR_CAUSAL_LM_MAPPING"],
}
_FIRST_USE = ("__getitem__", "__contains__", "__iter__", "__len__", "keys", "values", "items", "get")
_waiting: list[Any] = []  # mappings that still register on their first use
_registered = False


def register() -> None:
    """Register pico-decoder with the Auto classes (idempotent)."""
    global _registered
    if _registered:
        return
    _registered = True
    # Imported before the mappings are unhooked: an import reached while the model module is itself still
    # importing fails, and the next use of a mapping must then try again.
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from .models.pico_decoder import PicoDecoderConfig, PicoDecoderForCausalLM, PicoDecoderModel

    for mapping in _waiting:  # back to the plain class first: registering reads the mappings
        mapping.__class__ = mapping.__class__.__bases__[0]
    _waiting.clear()
    AutoConfig.register("pico_decoder", PicoDecoderConfig, exist_ok=True)
    # Early pico-lm step-0 commits were saved with `model_type: "pico"`: read them as pico_decoder configs.
    CONFIG_MAPPING.register("pico", PicoDecoderConfig, exist_ok=True)
    AutoModel.register(PicoDecoderConfig, PicoDecoderModel, exist_ok=True)
    AutoModelForCausalLM.register(PicoDecoderConfig, PicoDecoderForCausalLM, exist_ok=True)


def _register_on_first_use(mapping: Any) -> None:
    base = type(mapping)

    def first_use(name: str):
        def method(self, *args: Any, **kwargs: Any) -> Any:
            try:
                register()
            except ImportError:  # reached while transformers is still importing: try again on the next use
                global _registered
                _registered = False
            return getattr(base, name)(self, *args, **kwargs)

        return method

    methods = {name: first_use(name) for name in _FIRST_USE if hasattr(base, name)}
    mapping.__class__ = type(base.__name__, (base,), methods)
    _waiting.append(mapping)


def _loaded(module: Any) -> None:
    if not _registered:
        for name in _MAPPINGS[module.__name__]:
            _register_on_first_use(getattr(module, name))


class _Loader(importlib.abc.Loader):
    def __init__(self, loader: Any) -> None:
        self.loader = loader

    def create_module(self, spec: Any) -> Any:
        return self.loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self.loader.exec_module(module)
        _loaded(module)


class _Finder(importlib.abc.MetaPathFinder):
    """Finds nothing itself: wraps the loader of the two Auto modules to run `_loaded` after them."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname not in _MAPPINGS:
            return None
        for finder in sys.meta_path:
            if finder is not self and hasattr(finder, "find_spec"):
                spec = finder.find_spec(fullname, path, target)
                if spec is not None:
                    spec.loader = _Loader(spec.loader)
                    return spec
        return None


def install() -> None:
    pending = False
    for name in _MAPPINGS:
        if name in sys.modules:
            _loaded(sys.modules[name])
        else:
            pending = True
    if pending and not any(isinstance(finder, _Finder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
