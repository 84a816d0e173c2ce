"""Loading a run's own checkpoint weights, where a missing tensor is an error rather than a fresh init."""

from __future__ import annotations

from pathlib import Path

import torch


def load_complete_weights(model_class: type, source: str | Path, dtype: torch.dtype) -> torch.nn.Module:
    """`model_class.from_pretrained(source)`, refusing a checkpoint that lacks tensors: from_pretrained would
    initialise them afresh, which is right for putting a head on a backbone but not for continuing a run."""
    model, info = model_class.from_pretrained(source, dtype=dtype, output_loading_info=True)
    if info["missing_keys"]:
        missing = sorted(info["missing_keys"])
        raise ValueError(
            f"Checkpoint {source} lacks {len(missing)} tensor(s) the model needs, e.g. {missing[:3]}: its weights "
            "file does not match its config.json"
        )
    return model
