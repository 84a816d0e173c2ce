"""Hugging Face Hub helpers: knowing quickly whether the Hub can be reached.

huggingface_hub retries unreachable hosts with backoff (tens of seconds per file). pico-hf keeps the real Hub
code paths but falls back to embedded assets offline, so it asks once, cheaply, whether the endpoint
answers, and goes straight to local files when it does not. The question is asked with huggingface_hub's own
HTTP client, so its offline mode, proxies (HTTPS_PROXY, HTTP_PROXY, NO_PROXY) and certificates apply.
"""

from __future__ import annotations

import os
import threading
import time

from huggingface_hub import constants, get_session, is_offline_mode

_TRUE = {"1", "ON", "YES", "TRUE"}
FAILURE_TTL_S = 30.0  # an endpoint that did not answer is asked again after this (the network may come back)
_ANSWERS: dict[str, tuple[bool, float]] = {}  # endpoint -> (answered, when asked)
_LOCK = threading.Lock()


def offline_requested() -> bool:
    """huggingface_hub's offline mode, or HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE set since it was imported."""
    if is_offline_mode():
        return True
    return any(
        os.environ.get(name, "").upper() in _TRUE for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def _endpoint_answers(endpoint: str, timeout: float) -> bool:
    with _LOCK:
        answered, asked = _ANSWERS.get(endpoint, (False, -FAILURE_TTL_S))
        if answered or time.monotonic() - asked < FAILURE_TTL_S:
            return answered
    try:
        # Any HTTP answer (even an error status) means requests get through.
        get_session().head(endpoint, timeout=timeout, follow_redirects=False)
        answered = True
    except Exception:  # connection refused, DNS failure, timeout, proxy error, offline mode
        answered = False
    with _LOCK:
        _ANSWERS[endpoint] = (answered, time.monotonic())
    return answered


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether Hub requests can succeed: not in offline mode and the endpoint answers an HTTP request."""
    return not offline_requested() and _endpoint_answers(constants.ENDPOINT, timeout)
