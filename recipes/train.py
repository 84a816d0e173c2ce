"""Train a pico-decoder the way the pico-lm suite was trained, on the Hugging Face stack.

    accelerate launch recipes/train.py [--config FILE] [section.key=value ...]
    python recipes/train.py                       # recipes/configs/demo.yaml, offline, a few minutes on CPU

The config file has pico-train's sections (data, model, training, evaluation, monitoring, checkpointing) and
an optional `training_arguments` block passed straight to transformers.TrainingArguments.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pico_hf.hub.publish import HubPushError
from pico_hf.training.config import ConfigError, describe_sections, load_config
from pico_hf.training.run import run_training

DEMO_CONFIG = Path(__file__).resolve().parent / "configs" / "demo.yaml"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Sections and keys (defaults are pico-train's):\n" + describe_sections(),
    )
    parser.add_argument("--config", type=Path, default=DEMO_CONFIG, help="YAML config (default: the demo)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="dotted config overrides")
    args = parser.parse_args(argv)
    try:
        config, notes = load_config(args.config, args.overrides)
        run_training(config, notes)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except HubPushError as error:  # trained and saved; the summary above says what is left to push
        print(f"error: {error}", file=sys.stderr)
        if error.command:
            print(error.command, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
