"""Publishing a training run to the Hugging Face Hub beside its checkpoints, commit for commit as pico-train.

With `checkpointing.save_to_hf: true`, the run goes to `checkpointing.hf_checkpoint.repo_id` on a branch named
after `checkpointing.run_name` (the repo is created if needed and added to `collection_slug` if one is set).
Every checkpoint `step_N` becomes these commits, in this order (pico-train's titles, and its order: evaluation
results are written before the learning dynamics of the same step):

    Saving HF Model -- Step N                          config, weights, model code, generation config,
                                                       card, and the run's curves up to step N: the rows
                                                       of logs/metrics.jsonl and the TensorBoard events
                                                       of steps <= N (logs/tensorboard/)
    Saving Tokenizer -- Step 0                         step 0 only: the tokenizer files
    Saving Training Config -- Step 0                   step 0 only: training_config.yaml
    Saving Fabric Checkpoint -- Step N                 fabric_state/ (the state to resume from)
    Saving Evaluation Results -- Step N                eval_results/ up to step N, when step_N.json exists
    Saving Learning Dynamics Data (train) -- Step N    learning_dynamics/train_*   (one commit per split
    Saving Learning Dynamics Data (val) -- Step N      learning_dynamics/val_*      present; other files,
                                                       e.g. metrics.json, go with the last split)

The repo's files are the latest state; the history is the record, which is why pico-analyze finds a step by
commit title and reads the repo at that commit.

The token is HF_TOKEN's or the `hf auth login` one. Pushes never hold up training: a checkpoint is queued once
the trainer has published it complete under `checkpoints/step_N/` (`on_checkpoint_published`), and one
background worker pushes the queue in order. Its large files (weights, optimizer state) are uploaded earlier,
as soon as they are written and while the checkpoint is still being evaluated (`HubEarlyUpload`,
huggingface_hub's `preupload_lfs_files`): the commits then only name them, so the last checkpoint of a run
reaches the Hub soon after it is complete. A failed push is retried (pico-train's policy: twice more, after
1 s and 2 s); if it still fails, an error naming the step and commit is logged, training goes on (the
checkpoint is safe on disk), and later pushes wait behind it so the branch history stays in order; the queue
is retried at each new checkpoint and once more at the end. Whatever is still unpushed then makes the run end
with `HubPushError`, which says how to finish the upload:

    python -m pico_hf.hub.publish runs/<run_name> --repo_id <repo_id>

That command (also for runs trained without `save_to_hf`) pushes every local checkpoint in step order with the
same commits, skipping commits whose titles the branch already has, so it completes a partial upload. A
resumed run does the same for the checkpoints that precede it. With `--analysis <folder>` (what
`recipes/analyze.py` wrote for the run), the last checkpoint's card is re-rendered with the analysis plots and
one more commit goes on the branch and on `main`:

    Saving Analysis (<analysis_name>) -- Step N        analysis/<analysis_name>/ (values, plots, report)
                                                       and README.md, the card of step N showing the plots
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..training.config import ConfigError
from .cards import CARD_FILE, Analysis, read_analysis, write_checkpoint_card
from .commits import (
    CONFIG_FILE,
    MAIN,
    HubPublisher,
    HubPushError,
    PlannedCommit,
    RunFolders,
    _files_under,
    _saved_config,
    check_hub_ready,
    checkpoint_steps,
    describe_error,
    final_model_commit,
    plan_checkpoint_commits,
)

logger = logging.getLogger("pico_hf.training.hub")  # under the training logger: same console and log file


# --- what to push ---


def analysis_commit(
    run_dir: Path, step: int, analysis: Analysis, folders: RunFolders = RunFolders()
) -> PlannedCommit:
    """The commit that publishes an analysis of the run (`analysis/<name>/`) with the card of checkpoint
    `step`, which shows its plots (rendered with the analysis beforehand: `write_checkpoint_card`)."""
    card = Path(run_dir) / folders.checkpoints / f"step_{step}" / CARD_FILE
    files = [
        (local, analysis.in_repo(local)) for local, _ in _files_under(analysis.folder, analysis.repo_dir)
    ]
    return PlannedCommit(
        step, f"Saving Analysis ({analysis.name}) -- Step {step}", (*files, (card, CARD_FILE))
    )


# --- pushing an existing run ------------------------------------------------------------------------------


def publish_run(
    run_dir: Path,
    repo_id: str | None = None,
    branch: str | None = None,
    collection_slug: str | None = None,
    steps: Sequence[int] | None = None,
    dry_run: bool = False,
    out: Any = None,
    main: bool = True,
    analysis: Path | None = None,
) -> list[PlannedCommit]:
    """Push a local run's checkpoints in step order with pico-train's commits; return the commits pushed.

    Commits whose titles the branch already has are skipped, so this also completes an interrupted upload.
    Then (unless `main` is false) the last checkpoint pushed, with its card, goes on `main`. With `analysis`
    (an analysis folder of the run, with plots), the last checkpoint's card shows its plots, and the analysis
    with that card is committed to the branch (and `main`) after the checkpoints.
    `repo_id`, `branch` and `collection_slug` default to the run's training_config.yaml (branch: run name)."""
    out = out if out is not None else sys.stdout
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"Run directory {run_dir} does not exist")
    saved = _saved_config(run_dir).get("checkpointing") or {}
    hf = saved.get("hf_checkpoint") or {}
    repo_id = repo_id or hf.get("repo_id")
    if not repo_id:
        raise ConfigError(f"No repo id: pass --repo_id (the run's {CONFIG_FILE} names none)")
    branch = branch or saved.get("run_name") or run_dir.name
    collection_slug = collection_slug or hf.get("collection_slug")
    folders = RunFolders.from_run_dir(run_dir)
    available = checkpoint_steps(run_dir, folders)
    if not available:
        raise ConfigError(
            f"{run_dir / folders.checkpoints} holds no complete checkpoint (step_N/config.json)"
        )
    if steps is not None:
        missing = sorted(set(steps) - set(available))
        if missing:
            raise ConfigError(f"No checkpoint for step(s) {missing} in {run_dir}; available: {available}")
        available = [s for s in available if s in set(steps)]
    found = read_analysis(analysis) if analysis is not None else None
    if found is not None and not (run_dir / CONFIG_FILE).is_file():
        raise ConfigError(
            f"{run_dir / CONFIG_FILE} does not exist: the card that shows the analysis needs it"
        )
    if not dry_run:
        _write_missing_cards(run_dir, available, repo_id, branch, folders)
        if found is not None:
            write_checkpoint_card(run_dir, available[-1], repo_id, branch, found)
    plan = [commit for step in available for commit in plan_checkpoint_commits(run_dir, step, folders)]
    final = final_model_commit(run_dir, available[-1], branch, folders) if main else None
    extra = analysis_commit(run_dir, available[-1], found, folders) if found is not None else None

    if dry_run:
        print(f"Would push {len(plan)} commits from {run_dir} to {repo_id} (branch '{branch}'):", file=out)
        for commit in plan:
            print(f"  {commit.title}  ({_count(commit.files)}, {_human(commit.size)})", file=out)
        if extra is not None:
            print(f"then: {extra.title}  ({_count(extra.files)})", file=out)
        if final is not None:
            print(f"and on '{MAIN}': {final.title}  ({_count(final.files)})", file=out)
            if extra is not None:
                print(f"and on '{MAIN}': {extra.title}", file=out)
        return plan

    check_hub_ready(
        f"Cannot push {run_dir} to {repo_id}:",
        "or run again once the Hub is reachable (nothing was pushed; the local run is unchanged)",
    )
    publisher = HubPublisher(repo_id, branch, collection_slug, run_dir=run_dir)
    publisher.prepare()
    print(f"Pushing {run_dir} to {publisher.where}", file=out)
    pushed = []
    for commit in plan:
        if commit.title in publisher.known_titles:
            print(f"  skip  {commit.title}  (already on the branch)", file=out)
            continue
        try:
            oid = publisher.push(commit)
        except Exception as error:
            raise HubPushError(
                f"Pushing step {commit.step} '{commit.title}' to {publisher.where} failed: "
                f"{describe_error(error)}. "
                "Run the same command again to continue from there."
            ) from error
        print(f"  push  {commit.title}  ({_count(commit.files)}) -> {oid[:8]}", file=out)
        pushed.append(commit)
    print(f"Done: {len(pushed)} pushed, {len(plan) - len(pushed)} already there.", file=out)
    # The analysis follows the checkpoints on the branch; on main, it follows the final model.
    last = [(extra, branch)] if extra is not None else []
    if final is not None:
        last += [(final, MAIN)] + ([(extra, MAIN)] if extra is not None else [])
    for commit, where in last:
        try:
            oid = publisher.push_once(commit, where)
        except Exception as error:
            raise HubPushError(
                f"Pushing '{commit.title}' to '{where}' of {publisher.repo_id} failed: {describe_error(error)}. "
                "Run the same command again to finish."
            ) from error
        state = f"pushed -> {oid[:8]}" if oid else "already there"
        print(f"On '{where}': {commit.title}  ({state})", file=out)
    return pushed


def _write_missing_cards(
    run_dir: Path, steps: Sequence[int], repo_id: str, branch: str, folders: RunFolders
) -> None:
    """Checkpoints saved without a card (older runs) get one before they are pushed."""
    if not (run_dir / CONFIG_FILE).is_file():
        return  # e.g. a bare pico-train export: nothing to render the card from
    for step in steps:
        if not (run_dir / folders.checkpoints / f"step_{step}" / CARD_FILE).is_file():
            write_checkpoint_card(run_dir, step, repo_id, branch)


def _count(files: Sequence[object]) -> str:
    return f"{len(files)} file{'' if len(files) == 1 else 's'}"


def _human(size: int) -> str:
    value = float(size)
    for unit in ("B", "kB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} TB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pico_hf.hub.publish",
        description="Push a local pico training run to the Hugging Face Hub, checkpoint by checkpoint, with "
        "pico-train's commits (commits already on the branch are skipped).",
    )
    parser.add_argument("run_dir", type=Path, help="the run directory, e.g. runs/my-run")
    parser.add_argument(
        "--repo_id", "--repo-id", dest="repo_id", help="default: the run's hf_checkpoint.repo_id"
    )
    parser.add_argument("--branch", help="default: the run name")
    parser.add_argument("--collection_slug", "--collection-slug", dest="collection_slug")
    parser.add_argument("--steps", type=int, nargs="+", help="only these checkpoint steps")
    parser.add_argument(
        "--dry-run", "--dry_run", dest="dry_run", action="store_true", help="list, push nothing"
    )
    parser.add_argument(
        "--no-main",
        "--no_main",
        dest="main",
        action="store_false",
        help="leave 'main' alone (by default "
        "the last checkpoint pushed and its card go on 'main', as the final model)",
    )
    parser.add_argument(
        "--analysis",
        type=Path,
        help="an analysis of the run (the folder recipes/analyze.py wrote, with plots/): pushed after the "
        "checkpoints, and the last checkpoint's card shows its plots",
    )
    args = parser.parse_args(argv)
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
        logger.addHandler(handler)
    try:
        publish_run(
            args.run_dir,
            args.repo_id,
            args.branch,
            args.collection_slug,
            args.steps,
            args.dry_run,
            main=args.main,
            analysis=args.analysis,
        )
    except (ConfigError, HubPushError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2 if isinstance(error, ConfigError) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
