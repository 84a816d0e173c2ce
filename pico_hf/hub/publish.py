"""Publishing a run's checkpoints to the Hugging Face Hub, beside where they are written."""

from __future__ import annotations

from transformers import TrainerCallback


def build_hub_callbacks(config, run) -> list[TrainerCallback]:
    return []
