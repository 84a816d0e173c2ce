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

from pico_hf.configuration import error_lines
from pico_hf.training.config import ConfigError, describe_config, load_config

DEMO_CONFIG = Path(__file__).resolve().parent / "configs" / "demo.yaml"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", type=Path, default=DEMO_CONFIG, help="YAML config (default: the demo)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="dotted config overrides")
    if {"-h", "--help"} & set(argv):  # show the values that would run: this config file, these overrides
        known, _ = parser.parse_known_args([a for a in argv if a not in ("-h", "--help")])
        parser.epilog = describe_config(known.config, known.overrides)
    args = parser.parse_args(argv)
    try:
        config, notes = load_config(args.config, args.overrides)
        # Heavy imports (torch, transformers, datasets) only once the arguments are known to be good.
        from pico_hf.hub.commits import HubPushError
        from pico_hf.training.console import INTERRUPTED_EXIT_STATUS, Interrupted
        from pico_hf.training.run import end_process_group, run_training

        try:
            run_training(config, notes)
            end_process_group()
        except Interrupted:  # its one line is already printed
            return INTERRUPTED_EXIT_STATUS
        except HubPushError as error:  # trained and saved; the summary above says what is left to push
            print(f"error: {error}", file=sys.stderr)
            if error.command:
                print(error.command, file=sys.stderr)
            return 1
    except ConfigError as error:  # one `error:` line per problem, every problem found before step 1
        print(error_lines(error), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
