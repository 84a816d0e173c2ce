"""What a training run shows and records: the log file that copies the console, and interrupts as one line.

- `log_console(path)`: every line written to stdout or stderr also goes to `logs/log_<time>.log`, time-stamped,
  without progress-bar redraws; an exception that ends the run is written there too (its traceback, or the
  one-line message of a config error).
- `interrupts_end_cleanly(trainer)`: Ctrl-C (SIGINT) or SIGTERM ends the run with one line naming the step and
  the last complete checkpoint, removes any half-written checkpoint, and raises `Interrupted` (exit status 130).
"""

from __future__ import annotations

import contextlib
import logging
import re
import signal
import sys
import threading
import traceback
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import IO, Any

# tqdm's bar: "  40%|████      | 4/10 [00:01<00:02, 2.9it/s]" (or without the bar when the width is unknown).
_PROGRESS_BAR = re.compile(r"(\d+%\|)|(\d+/\d+ \[[\d:<?]+)|(^\s*$)")
INTERRUPTED_EXIT_STATUS = 130


class Interrupted(KeyboardInterrupt):
    """The run was stopped by SIGINT or SIGTERM; `str()` is the line shown to the user."""


class _Tee:
    """A text stream that writes through to `stream` and copies finished lines to `log`."""

    def __init__(self, stream: IO[str], log: IO[str]) -> None:
        self._stream, self._log, self._pending = stream, log, ""

    def write(self, text: str) -> int:
        written = self._stream.write(text)
        self._pending += text
        *lines, self._pending = self._pending.split("\n")
        if "\r" in self._pending:  # a bar being redrawn: only its latest state matters
            self._pending = self._pending[self._pending.rindex("\r") :]
        for line in lines:
            if "\r" in line:  # what is left after the last carriage return is what the terminal shows
                line = line[line.rindex("\r") + 1 :]
                if _PROGRESS_BAR.search(line):
                    continue
            _write_line(self._log, line)
        return written

    def flush(self) -> None:
        self._stream.flush()
        self._log.flush()

    def __getattr__(self, name: str) -> Any:  # isatty, fileno, encoding, ... as the real stream
        return getattr(self._stream, name)


def _write_line(log: IO[str], line: str) -> None:
    log.write(f"{datetime.now():%Y-%m-%d %H:%M:%S} {line}\n" if line else "\n")
    log.flush()


@contextlib.contextmanager
def log_console(path: Path | None) -> Iterator[None]:
    """Copy stdout and stderr to `path` (appending) while the block runs; `None` copies nothing."""
    if path is None:
        yield
        return
    from ..configuration import error_lines
    from .config import ConfigError  # light: no torch

    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as log:
        saved = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = _Tee(sys.stdout, log), _Tee(sys.stderr, log)
        # Logging handlers made earlier (transformers', datasets', pico-hf's) hold the real streams.
        handlers = [
            (handler, handler.stream)
            for logger in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
            for handler in getattr(logger, "handlers", [])
            if isinstance(handler, logging.StreamHandler) and handler.stream in saved
        ]
        for handler, stream in handlers:
            handler.setStream(sys.stdout if stream is saved[0] else sys.stderr)
        try:
            yield
        except Interrupted:
            raise  # its line was already printed, through the tee
        except ConfigError as error:
            for line in error_lines(error).split("\n"):
                _write_line(log, line)
            raise
        except BaseException:
            for line in traceback.format_exc().rstrip("\n").split("\n"):
                _write_line(log, line)
            raise
        finally:
            for tee in (sys.stdout, sys.stderr):
                if isinstance(tee, _Tee) and tee._pending.strip("\r ") and not tee._pending.startswith("\r"):
                    _write_line(log, tee._pending)
            sys.stdout, sys.stderr = saved
            for handler, stream in handlers:
                handler.setStream(stream)


def _raise_keyboard_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def interrupts_end_cleanly(trainer: Any) -> Iterator[None]:
    """SIGINT and SIGTERM stop training with one line and exit status 130, never a half-written checkpoint."""
    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield
        return
    previous = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)  # schedulers send SIGTERM before a kill
    try:
        yield
    except KeyboardInterrupt as error:
        if isinstance(error, Interrupted):
            raise
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not interrupt the cleanup
        try:
            run = trainer.run
            if trainer.args.process_index == 0:
                run.remove_partial_checkpoints()
            latest = run.latest_checkpoint()
            step = trainer.state.global_step
            where = f"the last checkpoint is {latest.name}" if latest else "no checkpoint was saved"
            for callback in trainer.callback_handler.callbacks:  # end the bar now, not when Python exits
                if getattr(callback, "training_bar", None) is not None:
                    callback.training_bar.close()
                    callback.training_bar = None
            if trainer.args.process_index == 0:
                resume = "run the same command to resume" if latest else "run the same command to start again"
                print(f"Interrupted at step {step}; {where}; {resume}", file=sys.stderr, flush=True)
        finally:
            signal.signal(signal.SIGINT, previous[0])
        raise Interrupted(f"Interrupted at step {step}; {where}") from None
    finally:
        signal.signal(signal.SIGINT, previous[0])
        signal.signal(signal.SIGTERM, previous[1])
