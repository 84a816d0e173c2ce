"""The Hub commit queue: which commits a checkpoint becomes, and `HubPublisher`, which pushes them in order
(retrying, never holding up training). The commits and the policy are described in `pico_hf.hub.publish`."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import struct
import tempfile
import threading
import time
import warnings
from collections import deque
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import CommitOperationAdd, HfApi, constants, get_token

from ..hub_access import hub_reachable, offline_requested
from ..training.config import ConfigError

logger = logging.getLogger("pico_hf.training.hub")  # under the training logger: same console and log file

RETRY_DELAYS: tuple[float, ...] = (1.0, 2.0)  # pico-train's backoff: two retries, 1 s then 2 s apart
CONFIG_FILE = "training_config.yaml"
MAIN = "main"
METRICS_FILE = "metrics.jsonl"  # in the run's logs folder, as TENSORBOARD_DIR
TENSORBOARD_DIR = "tensorboard"
STAGING_PREFIX = ".hub-upload-"  # hard links of a checkpoint's files while they upload early

# Learning-dynamics entries of one split: `{split}_{activations|weights|gradients}.{safetensors|pt}` files and
# the `{split}_data/` dataset folder.
_LD_STATES = re.compile(r"^(?P<split>.+?)_(?:activations|weights|gradients)\.(?:safetensors|pt)$")
_LD_DATA = re.compile(r"^(?P<split>.+)_data$")
_SPLIT_ORDER = ("train", "val")  # pico-train saves train, then val; other splits follow alphabetically
_TOKENIZER_FILES = re.compile(
    r"^(?:tokenizer.*|special_tokens_map\.json|added_tokens\.json|vocab\.(?:json|txt)|merges\.txt"
    r"|spiece\.model|sentencepiece\.bpe\.model|chat_template\.(?:jinja|json))$"
)
_STEP_DIR = re.compile(r"^step_(\d+)$")
_EVAL_FILE = re.compile(r"^step_(\d+)\.json$")

# The learning-dynamics `{split}_data/` folder holds an .arrow file; huggingface_hub warns about data files in
# model repos on every such commit. pico-train stores them there on purpose.
warnings.filterwarnings(
    "ignore", message="It seems that you are about to commit a data file", category=UserWarning
)


class HubSetupError(ConfigError):
    """The Hub cannot be used as configured (offline, no token, repo or branch cannot be created)."""


class HubPushError(RuntimeError):
    """Some commits could not be pushed; the local checkpoints are complete and can be pushed later.

    `command` is the one command that completes the push, when there is one."""

    def __init__(self, message: str, command: str | None = None) -> None:
        super().__init__(message)
        self.command = command


def _status(error: BaseException) -> int | None:
    response = getattr(error, "response", None)
    return getattr(response, "status_code", None)


# --- what to push -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunFolders:
    """Folder names inside a run and its checkpoints; the same names are used in the Hub repo."""

    checkpoints: str = "checkpoints"
    fabric_state: str = "fabric_state"
    learning_dynamics: str = "learning_dynamics"
    eval_results: str = "eval_results"
    logs: str = "logs"

    @classmethod
    def from_checkpointing(cls, checkpointing: Any) -> RunFolders:
        return cls(
            checkpoints=checkpointing.checkpoints_dir,
            fabric_state=checkpointing.fabric_checkpoint_dir,
            learning_dynamics=checkpointing.learning_dynamics_dir,
            eval_results=checkpointing.evaluation.eval_results_dir,
            logs=checkpointing.logs_dir,
        )

    @classmethod
    def from_run_dir(cls, run_dir: Path) -> RunFolders:
        """The names recorded in the run's training_config.yaml, else the defaults."""
        checkpointing = _saved_config(run_dir).get("checkpointing") or {}
        defaults = cls()
        return cls(
            checkpoints=checkpointing.get("checkpoints_dir") or defaults.checkpoints,
            fabric_state=checkpointing.get("fabric_checkpoint_dir") or defaults.fabric_state,
            learning_dynamics=checkpointing.get("learning_dynamics_dir") or defaults.learning_dynamics,
            eval_results=(checkpointing.get("evaluation") or {}).get("eval_results_dir")
            or defaults.eval_results,
            logs=checkpointing.get("logs_dir") or defaults.logs,
        )


@dataclass(frozen=True)
class PlannedCommit:
    """One commit: its title and the files it uploads, as (local file, path in the repo); a file's content
    may be given as bytes instead (the run's curves as they were at the commit's step)."""

    step: int
    title: str
    files: tuple[tuple[Path | bytes, str], ...]

    @property
    def size(self) -> int:
        return sum(
            len(local) if isinstance(local, bytes) else local.stat().st_size for local, _ in self.files
        )


def _saved_config(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        return {}
    try:
        loaded = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML: {error}") from error
    return loaded if isinstance(loaded, dict) else {}


def _visible(path: Path) -> bool:
    return not path.name.startswith(".")


def _files_under(folder: Path, repo_prefix: str) -> list[tuple[Path, str]]:
    """Every file below `folder` (hidden ones excluded), with its path in the repo under `repo_prefix`."""
    found = []
    for file in sorted(folder.rglob("*")):
        relative = file.relative_to(folder)
        if file.is_file() and all(not part.startswith(".") for part in relative.parts):
            found.append((file, f"{repo_prefix}/{relative.as_posix()}"))
    return found


def _is_checkpoint(step_dir: Path) -> bool:
    # Checkpoints are renamed into place when complete, so a step folder with its model config is finished.
    return step_dir.is_dir() and (step_dir / "config.json").is_file()


def checkpoint_steps(run_dir: Path, folders: RunFolders = RunFolders()) -> list[int]:
    """The steps of the run's complete checkpoints, ascending."""
    checkpoints = Path(run_dir) / folders.checkpoints
    if not checkpoints.is_dir():
        return []
    steps = []
    for entry in checkpoints.iterdir():
        match = _STEP_DIR.match(entry.name)
        if match and not entry.is_symlink() and _is_checkpoint(entry):
            steps.append(int(match[1]))
    return sorted(steps)


def run_curves(run_dir: Path, step: int, folders: RunFolders = RunFolders()) -> list[tuple[bytes, str]]:
    """The run's curves as they were at `step`, with their paths in the repo: the rows of
    `logs/metrics.jsonl` of steps <= `step`, and each TensorBoard event file of `logs/tensorboard/` with the
    events of steps <= `step`. A resumed run drops the rows of the steps it replays from metrics.jsonl, so
    at every step this is what the local file held then, and at the last step the local file itself. Files
    with nothing logged by then are left out."""
    logs = Path(run_dir) / folders.logs
    curves = []
    metrics = logs / METRICS_FILE
    if metrics.is_file():
        rows = [line for line in metrics.read_text().splitlines() if line.strip()]
        kept = "".join(row + "\n" for row in rows if json.loads(row).get("step", 0) <= step)
        if kept:
            curves.append((kept.encode(), f"{folders.logs}/{METRICS_FILE}"))
    events = logs / TENSORBOARD_DIR
    for path in sorted(events.rglob("events.out.tfevents.*")) if events.is_dir() else []:
        records = _events_up_to(path.read_bytes(), step)
        if len(records) > 1:  # more than the file's header (its version record)
            curves.append((b"".join(records), f"{folders.logs}/{path.relative_to(logs).as_posix()}"))
    return curves


def _events_up_to(events: bytes, step: int) -> list[bytes]:
    """The records of a TensorBoard event file (TFRecord framing: length u64, its CRC u32, the Event proto,
    its CRC u32) whose events belong to steps <= `step`, byte for byte; a record still being written at the
    end is left out."""
    from tensorboard.compat.proto.event_pb2 import Event

    kept, offset = [], 0
    while offset + 12 <= len(events):
        (length,) = struct.unpack_from("<Q", events, offset)
        end = offset + 12 + length + 4
        if end > len(events):
            break
        if Event.FromString(events[offset + 12 : offset + 12 + length]).step <= step:
            kept.append(events[offset:end])
        offset = end
    return kept


def _learning_dynamics_commits(step: int, folder: Path, repo_dir: str) -> list[PlannedCommit]:
    if not folder.is_dir():
        return []
    by_split: dict[str, list[tuple[Path, str]]] = {}
    others: list[tuple[Path, str]] = []
    for entry in sorted(filter(_visible, folder.iterdir())):
        states, data = _LD_STATES.match(entry.name), _LD_DATA.match(entry.name)
        if entry.is_file() and states:
            by_split.setdefault(states["split"], []).append((entry, f"{repo_dir}/{entry.name}"))
        elif entry.is_dir() and data:
            by_split.setdefault(data["split"], []).extend(_files_under(entry, f"{repo_dir}/{entry.name}"))
        elif entry.is_file():
            others.append((entry, f"{repo_dir}/{entry.name}"))
        else:
            others.extend(_files_under(entry, f"{repo_dir}/{entry.name}"))
    splits = [s for s in _SPLIT_ORDER if s in by_split] + sorted(set(by_split) - set(_SPLIT_ORDER))
    if not splits:
        if others:
            logger.warning("%s has no learning-dynamics split files; not pushed", folder)
        return []
    by_split[splits[-1]].extend(others)  # e.g. metrics.json: computed once both splits are there
    return [
        PlannedCommit(step, f"Saving Learning Dynamics Data ({split}) -- Step {step}", tuple(by_split[split]))
        for split in splits
    ]


def _evaluation_commit(step: int, folder: Path, repo_dir: str) -> PlannedCommit | None:
    if not (folder / f"step_{step}.json").is_file():
        return None  # no evaluation at this step
    files = []
    for local, in_repo in _files_under(folder, repo_dir):
        match = _EVAL_FILE.match(local.name)
        if match is None or int(match[1]) <= step:  # the folder as it was at step N
            files.append((local, in_repo))
    return PlannedCommit(step, f"Saving Evaluation Results -- Step {step}", tuple(files))


def plan_checkpoint_commits(
    run_dir: Path, step: int, folders: RunFolders = RunFolders()
) -> list[PlannedCommit]:
    """The commits that publish checkpoint `step` of the run in `run_dir`, in pico-train's order."""
    run_dir = Path(run_dir)
    step_dir = run_dir / folders.checkpoints / f"step_{step}"
    if not _is_checkpoint(step_dir):
        raise FileNotFoundError(f"{step_dir} is not a complete checkpoint (no config.json)")
    top_level = [p for p in sorted(step_dir.iterdir()) if p.is_file() and _visible(p)]
    model = [(p, p.name) for p in top_level if not _TOKENIZER_FILES.match(p.name)]
    tokenizer = [(p, p.name) for p in top_level if _TOKENIZER_FILES.match(p.name)]

    curves = run_curves(run_dir, step, folders)
    commits = [PlannedCommit(step, f"Saving HF Model -- Step {step}", (*model, *curves))]
    if step == 0:
        commits.append(PlannedCommit(step, "Saving Tokenizer -- Step 0", tuple(tokenizer)))
        config = run_dir / CONFIG_FILE
        if config.is_file():
            commits.append(PlannedCommit(step, "Saving Training Config -- Step 0", ((config, CONFIG_FILE),)))
    fabric = _files_under(step_dir / folders.fabric_state, folders.fabric_state)
    commits.append(PlannedCommit(step, f"Saving Fabric Checkpoint -- Step {step}", tuple(fabric)))
    evaluation = _evaluation_commit(step, run_dir / folders.eval_results, folders.eval_results)
    if evaluation is not None:
        commits.append(evaluation)
    commits += _learning_dynamics_commits(
        step, step_dir / folders.learning_dynamics, folders.learning_dynamics
    )
    return [commit for commit in commits if commit.files]


def final_model_commit(
    run_dir: Path, step: int, branch: str, folders: RunFolders = RunFolders()
) -> PlannedCommit:
    """The commit that puts checkpoint `step` on `main`: its model files, tokenizer and card (README.md)."""
    step_dir = Path(run_dir) / folders.checkpoints / f"step_{step}"
    if not _is_checkpoint(step_dir):
        raise FileNotFoundError(f"{step_dir} is not a complete checkpoint (no config.json)")
    files = tuple((p, p.name) for p in sorted(step_dir.iterdir()) if p.is_file() and _visible(p))
    return PlannedCommit(step, f"Saving Final Model -- Step {step} (run branch '{branch}')", files)


# --- pushing ----------------------------------------------------------------------------------------------


def describe_error(error: BaseException | None) -> str:
    """One line: huggingface_hub's HTTP errors span several lines (status, docs link, server message)."""
    if error is None:
        return "no error recorded"
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith("For more information check")]
    return f"{type(error).__name__}: {' | '.join(lines)}"


TRAINING_REMEDY = (
    "or set checkpointing.save_to_hf=false and push the run later with `python -m pico_hf.hub.publish`"
)


def check_hub_ready(
    what: str = "checkpointing.save_to_hf is true but", remedy: str = TRAINING_REMEDY
) -> None:
    """Fail fast, before any training or upload, when pushes cannot work: offline, unreachable, or no token.
    `what` begins each message (what was attempted), `remedy` ends it."""
    endpoint = constants.ENDPOINT
    if offline_requested():
        raise HubSetupError(
            f"{what} Hugging Face Hub access is switched off (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE is "
            f"set): unset it, {remedy}"
        )
    if not hub_reachable():
        raise HubSetupError(
            f"{what} the Hugging Face Hub at {endpoint} cannot be reached: check the network, HF_ENDPOINT "
            f"and any proxy (HTTPS_PROXY, NO_PROXY), {remedy}"
        )
    if get_token() is None:
        raise HubSetupError(
            f"{what} no Hugging Face token is available: set HF_TOKEN or run `hf auth login`, {remedy}"
        )


class HubPublisher:
    """Creates the repo and branch, then pushes commits to the branch in order, in the background or now.

    Background pushes run on huggingface_hub's single worker thread (`HfApi.run_as_future`), first in, first
    out. After a push fails for good, the ones behind it wait (so the branch never records a later step
    before an earlier one) until the next `submit` or `finish` tries again."""

    def __init__(
        self,
        repo_id: str,
        branch: str,
        collection_slug: str | None = None,
        api: HfApi | None = None,
        run_dir: Path | None = None,
    ) -> None:
        if not repo_id:
            raise HubSetupError(
                "No Hub repo id: set checkpointing.hf_checkpoint.repo_id (e.g. my-user/my-run)"
            )
        self.repo_id, self.branch, self.collection_slug = repo_id, branch, collection_slug
        self.run_dir = run_dir  # named in error messages
        self.api = api if api is not None else HfApi()
        self.known_titles: set[str] = set()
        self.pushed: list[tuple[PlannedCommit, str]] = []  # (commit, commit oid), in push order
        self.retries = 0  # attempts after a failed one, over all pushes
        self._head: str | None = None  # the branch head our next commit goes on top of
        self._pending: deque[PlannedCommit] = deque()
        self._blocked: tuple[PlannedCommit, BaseException] | None = None
        self._futures: list[Future[None]] = []
        self._lock = threading.Lock()

    @property
    def where(self) -> str:
        return f"{self.api.endpoint}/{self.repo_id} (branch '{self.branch}')"

    def prepare(self) -> None:
        """Create the repo (if needed), add it to the collection, create the branch; learn what it holds."""
        try:
            repo = self.api.create_repo(self.repo_id, exist_ok=True)
            self.repo_id = repo.repo_id  # a bare name becomes "<user>/<name>"
            if self.collection_slug:
                self.api.add_collection_item(self.collection_slug, self.repo_id, "model", exists_ok=True)
            self.api.create_branch(self.repo_id, branch=self.branch, exist_ok=True)
            # A branch that exists (a resumed run, a re-push) keeps its commits: they are not pushed again.
            history = self.api.list_repo_commits(self.repo_id, revision=self.branch)
            existing = {c.title for c in history}
            self._head = history[0].commit_id
        except Exception as error:
            raise HubSetupError(
                f"Could not set up the Hub repo {self.where}: {describe_error(error)}"
            ) from error
        with self._lock:
            self.known_titles |= existing

    def submit(self, commits: Iterable[PlannedCommit]) -> None:
        """Queue commits for the background worker (those the branch already has are skipped)."""
        with self._lock:
            skip = self.known_titles | {c.title for c in self._pending}
            self._pending.extend(c for c in commits if c.title not in skip)
            if self._blocked is not None:
                logger.warning(
                    "Retrying the Hub push of '%s' and the %d after it",
                    self._blocked[0].title,
                    len(self._pending) - 1,
                )
                self._blocked = None
        self._futures = [f for f in self._futures if not f.done()]
        self._futures.append(self.api.run_as_future(self._drain))

    def finish(self) -> None:
        """Wait for every queued push (retrying a failed one once more); raise HubPushError if any is left."""
        wait(self._futures)  # let pushes in flight settle first, so a failure among them gets its retry below
        with self._lock:
            retry, queued = self._blocked is not None, len(self._pending)
        if retry:
            self.submit([])
        if queued:
            logger.info("Waiting for %d Hub push(es) to %s to finish", queued, self.where)
        wait(self._futures)
        with self._lock:
            left, blocked = list(self._pending), self._blocked
        if left:
            commit, error = blocked if blocked is not None else (left[0], None)
            command = self.completing_command()
            raise HubPushError(
                f"{len(left)} Hub commit(s) to {self.where} were not pushed, from step {commit.step} "
                f"'{commit.title}' on ({describe_error(error)}). The checkpoints are complete on disk; "
                f"push them with: {command}",
                command,
            )

    def completing_command(self) -> str:
        """The command that pushes whatever this run's branch (and `main`) still lacks."""
        return (
            f"python -m pico_hf.hub.publish {self.run_dir or 'RUN_DIR'} --repo_id {self.repo_id} "
            f"--branch {self.branch}"
        )

    def push(self, commit: PlannedCommit, branch: str | None = None) -> str:
        """Push one commit now (with retries) on top of the branch head this publisher knows, and return its
        commit id. A head moved by another writer is never overwritten: the push fails (HTTP 412)."""
        branch = branch or self.branch
        last_error: BaseException | None = None
        for attempt in range(len(RETRY_DELAYS) + 1):
            if attempt > 0:
                head = self._head_commit(branch)
                if head is not None and head.title == commit.title:  # the failed attempt landed after all
                    self._landed(commit, head.commit_id, branch)
                    return head.commit_id
                self.retries += 1
                logger.warning(
                    "Hub push of '%s' failed (attempt %d of %d): %s; retrying in %.0f s",
                    commit.title,
                    attempt,
                    len(RETRY_DELAYS) + 1,
                    describe_error(last_error),
                    RETRY_DELAYS[attempt - 1],
                )
                time.sleep(RETRY_DELAYS[attempt - 1])
            parent = self._head if branch == self.branch else self._head_oid(branch)
            try:
                info = self.api.create_commit(
                    self.repo_id,
                    # One commit per title, whatever the number or size of files (upload_folder may split).
                    operations=[
                        CommitOperationAdd(
                            path_in_repo=in_repo,
                            path_or_fileobj=local if isinstance(local, bytes) else str(local),
                        )
                        for local, in_repo in commit.files
                    ],
                    commit_message=commit.title,
                    revision=branch,
                    parent_commit=parent,
                )
            except Exception as error:
                last_error = error
                if _status(error) == 412:  # someone else moved the branch: retrying would overwrite them
                    break
                continue
            self._landed(commit, info.oid, branch)
            return info.oid
        assert last_error is not None
        if _status(last_error) == 412:
            raise HubPushError(
                f"The branch '{branch}' of {self.repo_id} was changed by another writer while this run was "
                f"pushing to it ('{commit.title}' was not pushed, nothing was overwritten)"
            ) from last_error
        raise last_error

    def _landed(self, commit: PlannedCommit, oid: str, branch: str) -> None:
        with self._lock:
            if branch == self.branch:
                self._head = oid
                self.known_titles.add(commit.title)
            self.pushed.append((commit, oid))

    def _head_commit(self, branch: str) -> Any:
        try:
            return self.api.list_repo_commits(self.repo_id, revision=branch)[0]
        except Exception:
            return None

    def _head_oid(self, branch: str) -> str | None:
        head = self._head_commit(branch)
        return head.commit_id if head is not None else None

    def push_final(self, run_dir: Path, step: int, folders: RunFolders) -> str | None:
        """Put checkpoint `step` (model, tokenizer, card) on `main`, as pico-train's published repos hold
        their final model there; returns the commit id, or None when `main` already has it."""
        return self.push_once(final_model_commit(run_dir, step, self.branch, folders), MAIN)

    def push_once(self, commit: PlannedCommit, branch: str) -> str | None:
        """Push `commit` to `branch` unless the branch's history has its title; returns the commit id or None."""
        if commit.title in {c.title for c in self.api.list_repo_commits(self.repo_id, revision=branch)}:
            return None
        return self.push(commit, branch=branch)

    def upload_early(self, files: Sequence[tuple[Path, str]], staging_parent: Path) -> None:
        """Upload the LFS files among `files` (local file, path in the repo) now, in the background worker's
        queue, without committing: the commit that adds them later finds them on the Hub and uploads nothing.
        huggingface_hub is handed paths, which its Xet path takes (an open file would make it fall back to
        plain HTTP). The checkpoint folder is renamed into place while the upload may still run, so the files
        are hard-linked into a staging folder in `staging_parent` (outside the checkpoint, on the same disk)
        first, removed once the upload is done. Best effort: a failure leaves the upload to the commit, with
        its retries."""
        with self._lock:
            blocked = self._blocked is not None
        if blocked or not files:  # the Hub is failing: don't add uploads that would delay the retries
            return
        staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=staging_parent))
        try:
            staged = []
            for index, (local, in_repo) in enumerate(files):
                link = staging / f"{index}-{local.name}"
                os.link(local, link)  # the same bytes, under a name the rename does not move
                staged.append((link, in_repo))
        except OSError as error:
            shutil.rmtree(staging, ignore_errors=True)
            logger.debug("Early upload to %s skipped, left to the commit: %s", self.where, error)
            return

        def upload() -> None:
            try:
                operations = [
                    CommitOperationAdd(path_in_repo=in_repo, path_or_fileobj=str(link))
                    for link, in_repo in staged
                ]
                self.api.preupload_lfs_files(self.repo_id, additions=operations, revision=self.branch)
            except Exception as error:
                logger.debug(
                    "Early upload to %s failed, left to the commit: %s", self.where, describe_error(error)
                )
            finally:
                shutil.rmtree(staging, ignore_errors=True)

        self._futures = [f for f in self._futures if not f.done()]
        self._futures.append(self.api.run_as_future(upload))

    def _drain(self) -> None:
        while True:
            with self._lock:
                if self._blocked is not None or not self._pending:
                    return
                commit = self._pending[0]
            try:
                oid = self.push(commit)
            except Exception as error:
                with self._lock:
                    self._blocked = (commit, error)
                    waiting = len(self._pending) - 1
                logger.error(
                    "Hub push FAILED for step %d, commit '%s' to %s after %d attempts: %s. Training goes on; "
                    "this push and the %d after it wait, and are retried at the next checkpoint and at the "
                    "end.",
                    commit.step,
                    commit.title,
                    self.where,
                    len(RETRY_DELAYS) + 1,
                    describe_error(error),
                    waiting,
                )
                return
            with self._lock:
                self._pending.popleft()
                step_done = not self._pending or self._pending[0].step != commit.step
            logger.debug("Pushed '%s' to %s (%s)", commit.title, self.where, oid[:8])
            if step_done:
                logger.info("Pushed checkpoint step_%d to %s (%s)", commit.step, self.where, oid[:8])
