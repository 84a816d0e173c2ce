"""Hugging Face Hub helpers: knowing quickly whether the Hub can be reached.

huggingface_hub retries unreachable hosts with backoff (tens of seconds per file). pico-hf keeps the real Hub
code paths but falls back to embedded assets offline, so it asks once, cheaply, whether the endpoint
answers, and goes straight to local files when it does not.
"""

from __future__ import annotations

import functools
import os
import socket
from urllib.parse import urlparse

from huggingface_hub import constants

_TRUE = {"1", "ON", "YES", "TRUE"}


def offline_requested() -> bool:
    """HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE, read now (huggingface_hub reads them once, at import)."""
    if constants.HF_HUB_OFFLINE:
        return True
    return any(
        os.environ.get(name, "").upper() in _TRUE for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


@functools.lru_cache(maxsize=8)
def _endpoint_answers(endpoint: str, timeout: float) -> bool:
    parsed = urlparse(endpoint)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether Hub requests can succeed: not in offline mode and the endpoint accepts a connection."""
    return not offline_requested() and _endpoint_answers(constants.ENDPOINT, timeout)
