"""Tokenizer loading with an offline fallback to the embedded OLMo tokenizer.

Pico models are trained with the OLMo GPT-NeoX tokenizer (`allenai/OLMo-7B-0724-hf`). A copy of it ships
in `pico_hf/assets/tokenizer`, so `load_tokenizer()` works on machines that cannot reach the Hub.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from .assets import TOKENIZER_DIR
from .hub_access import hub_reachable

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

logger = logging.getLogger(__name__)

OLMO_TOKENIZER_ID = "allenai/OLMo-7B-0724-hf"


def _require_fast(tokenizer: object, source: str) -> PreTrainedTokenizerFast:
    from transformers import PreTrainedTokenizerFast

    if not isinstance(tokenizer, PreTrainedTokenizerFast):
        raise TypeError(
            f"Tokenizer {source!r} loaded as {type(tokenizer).__name__}, which is not a fast (Rust-backed) "
            "tokenizer; pico-hf needs a tokenizer.json-based tokenizer."
        )
    return tokenizer


def load_tokenizer(name_or_path: str = OLMO_TOKENIZER_ID) -> PreTrainedTokenizerFast:
    """Load a fast tokenizer by Hub id or local directory.

    When `name_or_path` is the OLMo id and the Hub cannot provide it (offline mode, no network, no cached
    copy), the embedded copy in `pico_hf.assets.TOKENIZER_DIR` is used instead. Any other name that cannot
    be loaded raises an `OSError` naming it. When the Hub is unreachable (offline mode, or its endpoint does
    not answer) only local files are consulted, so an offline machine never waits on Hub retries.
    """
    from transformers import AutoTokenizer  # here, not at import: the recipes parse their arguments first

    local_path = Path(name_or_path).expanduser()
    if local_path.is_dir():
        try:
            tokenizer = AutoTokenizer.from_pretrained(local_path)
        except (OSError, ValueError) as error:
            raise OSError(
                f"Could not load a tokenizer from the local directory {str(local_path)!r}: {error}"
            ) from error
        return _require_fast(tokenizer, str(local_path))

    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, local_files_only=not hub_reachable())
    except (OSError, ValueError) as error:
        if name_or_path != OLMO_TOKENIZER_ID:
            raise OSError(
                f"Could not load tokenizer {name_or_path!r}: it is not a local directory and the Hugging Face "
                "Hub could not provide it (offline mode, no network, no cached copy, or an unknown id). Only "
                f"{OLMO_TOKENIZER_ID!r} has an embedded offline copy."
            ) from error
        logger.info(
            "Tokenizer %s is not reachable on the Hub; using the embedded copy in %s",
            name_or_path,
            TOKENIZER_DIR,
        )
        tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    return _require_fast(tokenizer, name_or_path)


__all__ = ["OLMO_TOKENIZER_ID", "load_tokenizer"]
