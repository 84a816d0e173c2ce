"""Evaluate a pico checkpoint (or any causal LM) with lm-evaluation-harness.

    python eval/run.py --model runs/pico-decoder-demo/checkpoints/step_150
    python eval/run.py --model pico-lm/pico-decoder-tiny --tasks pico_paloma_tinsy,hellaswag,arc_easy
    python eval/run.py --model DIR --tasks pico_arc_easy,pico_hellaswag --limit 100 --output results/demo

Runs lm-eval's `simple_evaluate` with pico-hf's tasks (package data of pico_hf: `python -m
pico_hf.evaluation.tasks_dir` prints their folder) next to lm-eval's own, prints a table and
writes `results.json` (lm-eval's results plus a `pico_hf` section) and `results.md` to `--output`.
pico-hf tasks: `pico_paloma` (Paloma-style rolling perplexity on the embedded held-out split),
`pico_paloma_tinsy` (the same on the Hub's pico-lm/pretokenized-paloma-tinsy), `pico_hellaswag` and
`pico_arc_easy` (lm-eval's hellaswag / arc_easy on validation sets that ship offline), `pico_blimp` (the 67 BLiMP
sub-tasks and their mean, shipped offline); the `pico` tag runs them all. Tasks whose data is on the Hub are skipped, with a one-line reason, when the Hub is unreachable.
`--paloma [DATASET]` adds the value the published runs report (pico-lm/perplexity: mean per-text perplexity).
"""

from __future__ import annotations

import argparse
import fnmatch
import logging
import re
import sys
from pathlib import Path

from pico_hf.evaluation.tasks_dir import TASKS_DIR  # light: no torch before the arguments are checked

PALOMA_TINSY = (
    "pico-lm/pretokenized-paloma-tinsy"  # harness.PALOMA_TINSY: named here, --help imports no torch
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python eval/run.py",
        description=__doc__.split("\n\n")[0],
        epilog="Example: " + __doc__.split("\n")[2],
    )
    parser.add_argument("--model", help="checkpoint directory or Hub id")
    parser.add_argument(
        "--tasks", default="pico", help="comma-separated task, group or tag names (default: %(default)s)"
    )
    parser.add_argument("--limit", type=float, help="documents per task (a fraction when < 1)")
    parser.add_argument("--batch_size", type=int, default=8, help="(default: %(default)s)")
    parser.add_argument("--output", type=Path, help="results folder (default: eval_results/<model name>)")
    parser.add_argument("--num_fewshot", type=int)
    parser.add_argument("--device", help="cuda, cpu, ... (default: cuda when available)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--tokenizer", help="tokenizer name or path, for checkpoints saved without one")
    parser.add_argument(
        "--trust_remote_code", action="store_true", help="for non-pico models with custom code"
    )
    parser.add_argument(
        "--bootstrap_iters", type=int, default=100_000, help="for stderr (default: %(default)s)"
    )
    parser.add_argument(
        "--paloma",
        nargs="?",
        const=PALOMA_TINSY,
        metavar="DATASET",
        help=f"also compute the published runs' perplexity (default dataset: {PALOMA_TINSY}; 'embedded' or a path)",
    )
    parser.add_argument("--paloma_max_length", type=int, help="(default: the model's context, at most 2048)")
    parser.add_argument(
        "--list",
        nargs="?",
        const="*",
        metavar="PATTERN",
        help="list tasks, groups and tags (pico-hf's first; those matching PATTERN, e.g. 'arc*'), then exit",
    )
    args = parser.parse_args(argv)
    if args.list is None and not args.model:
        parser.error("--model is required")
    if args.limit is not None and args.limit <= 0:
        parser.error("--limit must be positive")
    if args.batch_size < 1:
        parser.error("--batch_size must be positive")
    return args


def default_output(model: str) -> Path:
    return Path("eval_results") / re.sub(r"[^A-Za-z0-9._-]+", "__", model.strip("/")).strip("_")


def list_tasks(pattern: str) -> str:
    """pico-hf's tasks and tags first, then lm-eval's groups and tags, then lm-eval's tasks; a pattern
    without wildcards matches names that contain it."""
    from pico_hf.evaluation.harness import task_manager

    if not any(ch in pattern for ch in "*?["):
        pattern = f"*{pattern}*"
    pico, everything = task_manager(TASKS_DIR, include_defaults=False), task_manager(TASKS_DIR)
    ours = set(pico.all_tasks)
    sections = [
        ("pico-hf tasks", pico.all_subtasks),
        ("pico-hf tags and groups", [*pico.all_groups, *pico.all_tags]),
        (
            "lm-eval groups and tags",
            [n for n in [*everything.all_groups, *everything.all_tags] if n not in ours],
        ),
        ("lm-eval tasks", [n for n in everything.all_subtasks if n not in ours]),
    ]
    lines = []
    for title, names in sections:
        matching = sorted(set(fnmatch.filter(names, pattern)))
        lines.append(f"{title} ({len(matching)}):")
        lines.extend(f"  {name}" for name in matching)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list is not None:
        print(list_tasks(args.list))
        return 0
    # Heavy imports (torch, transformers, lm-eval) once the arguments are known to be good.
    import datasets
    import transformers

    from pico_hf.evaluation.harness import (
        EvaluationError,
        evaluate,
        load_model,
        resolve_tasks,
        task_manager_for,
    )

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()

    tasks = [name.strip() for name in args.tasks.split(",") if name.strip()]
    manager = task_manager_for(tasks, TASKS_DIR)
    try:
        resolve_tasks(tasks, manager)  # unknown names fail before the model loads
        model, tokenizer = load_model(
            args.model, args.device, args.dtype, args.tokenizer, args.trust_remote_code
        )
        report = evaluate(
            model,
            tokenizer,
            tasks,
            manager,
            limit=args.limit,
            batch_size=args.batch_size,
            num_fewshot=args.num_fewshot,
            bootstrap_iters=args.bootstrap_iters,
            model_name=args.model,
            paloma=args.paloma,
            paloma_max_length=args.paloma_max_length,
        )
    except EvaluationError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    json_path, md_path = report.write(args.output or default_output(args.model))
    print(report.markdown())
    print(f"Wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
