"""Pretokenized training data in the `pico-lm/pretokenized-dolma` format, in a resumable global order.

Rows hold `input_ids` of `k * max_seq_len + 1` tokens (2049 for the published runs, k = 1); a longer row is
read as k windows of `max_seq_len + 1` tokens that share their boundary token, so one corpus serves any
context length. The model sees `window[:-1]` and learns to predict `window[1:]`.

The order is global and deterministic. Sequences are numbered in the dataset's stored order (row by row, the
windows of a row in turn); with a seed, each epoch reads consecutive blocks of `SHUFFLE_BLOCK_ROWS` rows in
turn and the sequences of each block in an order drawn from (seed, epoch, block): a full shuffle of datasets
up to that size, a local one beyond it, and the same order whether the data is streamed or memory-mapped.
Without a seed the stored order is read as is (pico-train's order).

Optimizer step `s` consumes positions `[s*B, (s+1)*B)` of that order (B = `data.dataloader.batch_size`), split
into `G * P` micro-batches (G accumulation steps, P processes); process `p` takes micro-batches `g*P + p`. Any
process count therefore trains on the same global batches, and resuming at step `s` starts exactly at
position `s*B`.

Memory-mapped data is read by index: each process reads only the sequences of its own micro-batches, and a
resume reads nothing it skips. Streamed data has no random access (reaching a row means reading the rows before
it): process 0 reads each global batch and sends every other process its micro-batches, so the stream is read
once whatever the process count; a resume starts from a saved `datasets` stream state (whole shards and record
batches skipped; a shuffled stream re-reads the block it stopped in). The data wraps around at its end.
"""

from __future__ import annotations

import functools
import glob
import itertools
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
import torch.distributed as dist

from ..assets import CORPUS_DIR
from ..hub_access import hub_reachable, offline_requested
from .config import ConfigError

EMBEDDED = "embedded"
INPUT_IDS = "input_ids"
# Rows per shuffle block: a streamed run holds one block in memory (8192 x 2049 int32 tokens, 67 MB, for the
# published runs: 8 global batches) and re-reads at most one on resume. Changing it changes every seeded order.
SHUFFLE_BLOCK_ROWS = 8192
_ORDER_STREAM = 0x5EED  # keeps the data order's draws apart from the run's other (seed, ...) generators


@functools.lru_cache(maxsize=4)
def block_permutation(seed: int, epoch: int, block: int, size: int) -> np.ndarray:
    """The order of one block's `size` sequences in an epoch: a pure function of (seed, epoch, block)."""
    order = np.random.default_rng([seed, _ORDER_STREAM, epoch, block]).permutation(size)
    order.flags.writeable = False  # shared through the cache
    return order


class DataError(ConfigError):
    """A bad row found mid-run in streamed data: the run stops after checkpointing the steps it completed."""


def open_pretokenized(
    name: str, split: str = "train", streaming: bool | None = None, key: str = "data.dataset.name"
):
    """A pretokenized dataset by Hub id, local path (directory, parquet file or glob), or `"embedded"`; `key`
    is the config key that names it (errors say which key to change).

    Returns a `datasets.Dataset` (memory-mapped) or, for streamed Hub data, a `datasets.IterableDataset`."""
    shown = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # "Generating train split" for a local file is noise next to our own count
    try:
        return _open_pretokenized(name, split, streaming, key)
    finally:
        if shown:
            datasets.enable_progress_bars()


def _open_pretokenized(name: str, split: str, streaming: bool | None, key: str):
    if name == EMBEDDED:
        folder = CORPUS_DIR / ("train" if split == "train" else "validation")
        return datasets.load_dataset(
            "parquet", data_files=sorted(map(str, folder.glob("*.parquet"))), split="train"
        )
    path = Path(name)
    if path.exists() or glob.has_magic(name):
        if path.is_dir() and (path / "dataset_info.json").exists():
            return datasets.load_from_disk(str(path))
        if path.is_dir():
            files = sorted(map(str, path.rglob("*.parquet")))
            if not files:
                raise ConfigError(f"{key}: dataset directory {path} holds no parquet files")
        else:
            files = sorted(glob.glob(name)) if glob.has_magic(name) else [str(path)]
            if not files:
                raise ConfigError(f"{key}: no files match dataset pattern {name}")
        return datasets.load_dataset("parquet", data_files=files, split="train", streaming=bool(streaming))
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise ConfigError(f"{key}: dataset path {name} does not exist")
    if not hub_reachable() and not offline_requested():
        raise ConfigError(
            f"{key}: dataset '{name}' is not a local path and the Hugging Face Hub is unreachable. Offline, use "
            f"{key}=embedded or a local path (or set HF_HUB_OFFLINE=1 to use a cached copy)."
        )
    try:
        return datasets.load_dataset(name, split=split, streaming=True if streaming is None else streaming)
    except Exception as error:  # datasets raises several types for unreachable or unknown repos
        raise ConfigError(
            f"{key}: dataset '{name}' is neither a local path nor a reachable Hub dataset "
            f"({type(error).__name__}: {error}). Offline, use {key}=embedded or a local path."
        ) from error


def local_shard_rows(dataset: datasets.IterableDataset) -> list[tuple[str, int]] | None:
    """[(parquet file, row count)] of a stream over local parquet files, from their footers; None otherwise."""
    import pyarrow.parquet as pq

    iterable = dataset._ex_iterable  # datasets keeps the shard files on the innermost examples iterable
    while hasattr(iterable, "ex_iterable"):
        iterable = iterable.ex_iterable
    files = list(getattr(iterable, "kwargs", {}).get("files") or [])
    if not files or not all(isinstance(f, str) and Path(f).is_file() for f in files):
        return None
    return [(f, pq.ParquetFile(f).metadata.num_rows) for f in files]


def check_columns(dataset, name: str) -> None:
    columns = dataset.column_names if dataset.column_names is not None else list(dataset.features or {})
    if INPUT_IDS not in columns:
        raise ConfigError(f"Dataset '{name}' has no '{INPUT_IDS}' column (columns: {columns})")


def windows_per_row(row_length: int, max_seq_len: int, where: str) -> int:
    """How many training sequences of `max_seq_len + 1` tokens a row of `row_length` tokens holds."""
    if row_length < max_seq_len + 1 or (row_length - 1) % max_seq_len != 0:
        raise ConfigError(
            f"{where} has {row_length} tokens; rows must hold k * max_seq_len + 1 tokens "
            f"(max_seq_len={max_seq_len}, e.g. {max_seq_len + 1})"
        )
    return (row_length - 1) // max_seq_len


def check_token_ids(batch: torch.Tensor, vocab_size: int, where: str) -> None:
    low, high = int(batch.min()), int(batch.max())
    if low < 0 or high >= vocab_size:
        raise ConfigError(
            f"{where} holds token id {high if high >= vocab_size else low}, outside the model's "
            f"vocabulary of {vocab_size} (model.vocab_size)"
        )


@dataclass(frozen=True)
class BatchLayout:
    """How a global batch splits into micro-batches across accumulation steps and processes."""

    global_batch: int
    gradient_accumulation_steps: int
    num_processes: int
    process_index: int

    def __post_init__(self) -> None:
        parts = self.gradient_accumulation_steps * self.num_processes
        if self.global_batch % parts:
            raise ConfigError(
                f"data.dataloader.batch_size ({self.global_batch}) must be divisible by "
                f"training.optimization.gradient_accumulation_steps ({self.gradient_accumulation_steps}) x "
                f"processes ({self.num_processes}) = {parts}"
            )

    @property
    def micro_batch(self) -> int:
        return self.global_batch // (self.gradient_accumulation_steps * self.num_processes)

    def by_process(self, step_batch: torch.Tensor) -> torch.Tensor:
        """(P, G, m, T+1): every process's micro-batches of one step's (B, T+1) global batch, in accumulation
        order; micro-batch g*P + p belongs to process p."""
        g, n, m = self.gradient_accumulation_steps, self.num_processes, self.micro_batch
        return step_batch.reshape(g, n, m, *step_batch.shape[1:]).transpose(0, 1)

    def micro_batches(self, step_batch: torch.Tensor) -> list[torch.Tensor]:
        """This process's micro-batches of one step's (B, T+1) global batch, in accumulation order."""
        return list(self.by_process(step_batch)[self.process_index])

    def positions(self, step: int) -> np.ndarray:
        """(G, m) positions in the global order of this process's micro-batches of optimizer step `step`."""
        m, p, n = self.micro_batch, self.process_index, self.num_processes
        micro_batch_index = np.arange(self.gradient_accumulation_steps)[:, None] * n + p
        return step * self.global_batch + micro_batch_index * m + np.arange(m)[None, :]


class PretokenizedStream:
    """The global order of training sequences (max_seq_len + 1 tokens each), readable from any position.

    `seed`: the order is shuffled within blocks of `block_rows` rows, drawn from (seed, epoch, block); None
    reads the dataset's stored order. `sequences_read` / `tokens_read` count what was read from storage."""

    def __init__(
        self,
        name: str,
        max_seq_len: int,
        vocab_size: int,
        streaming: bool | None = None,
        seed: int | None = None,
        block_rows: int = SHUFFLE_BLOCK_ROWS,
    ) -> None:
        self.name = name
        self.max_seq_len = max_seq_len
        self.vocab_size = vocab_size
        self.seed = seed
        self.block_rows = block_rows
        self.sequences_read = 0
        self.tokens_read = 0
        self.dataset = open_pretokenized(name, "train", streaming)
        check_columns(self.dataset, name)
        self.streaming = isinstance(self.dataset, datasets.IterableDataset)
        if self.streaming:
            # What can be checked before step 1 without reading the stream: the column's type, and the shards'
            # row counts when they are local files. Each row is checked as it is read.
            feature = (self.dataset.features or {}).get(INPUT_IDS)
            value = getattr(feature, "feature", None)
            if feature is not None and not str(getattr(value, "dtype", "")).startswith(("int", "uint")):
                raise ConfigError(
                    f"Dataset '{name}' column '{INPUT_IDS}' is {feature}, not a list of integer token ids"
                )
            self.shard_rows = local_shard_rows(self.dataset)
            first = next(iter(self.dataset.select_columns([INPUT_IDS])))[INPUT_IDS]
            self.row_length = len(first)
            self.windows = windows_per_row(self.row_length, max_seq_len, f"Row 0 of dataset '{name}'")
            self.num_rows = sum(rows for _, rows in self.shard_rows) if self.shard_rows else None
        else:
            self.shard_rows = None
            self._check_all_rows()
            self._index_chunks()

    def _check_all_rows(self) -> None:
        """Lengths and ids of every row, vectorised over the memory-mapped arrow table."""
        if len(self.dataset) == 0:
            raise ConfigError(f"Dataset '{self.name}' is empty")
        column = self.dataset.data.column(INPUT_IDS)
        lengths = pc.list_value_length(column)
        self.row_length = int(pc.min(lengths).as_py())
        self.windows = windows_per_row(self.row_length, self.max_seq_len, f"A row of dataset '{self.name}'")
        if pc.max(lengths).as_py() != self.row_length:
            bad = int(pc.index(lengths, pc.max(lengths)).as_py())
            raise ConfigError(
                f"Rows of dataset '{self.name}' differ in length: row 0.. has {self.row_length} tokens, "
                f"row {bad} has {pc.max(lengths).as_py()}; all rows must have the same length"
            )
        values = pc.list_flatten(column)
        low, high = pc.min_max(values).values()
        if low.as_py() < 0 or high.as_py() >= self.vocab_size:
            raise ConfigError(
                f"Dataset '{self.name}' holds token id {high.as_py() if high.as_py() >= self.vocab_size else low.as_py()}, "
                f"outside the model's vocabulary of {self.vocab_size} (model.vocab_size)"
            )
        self.num_rows = len(self.dataset)

    def _index_chunks(self) -> None:
        """Zero-copy numpy views of the memory-mapped column (row offsets and token values, per arrow chunk),
        so that reading a sequence touches only its own `max_seq_len + 1` tokens."""
        self._chunks: list[tuple[np.ndarray, np.ndarray]] = []
        starts = [0]
        for chunk in self.dataset.data.column(INPUT_IDS).chunks:
            if isinstance(chunk, pa.FixedSizeListArray):
                offsets = (np.arange(len(chunk) + 1) + chunk.offset) * chunk.type.list_size
            else:  # list / large_list: offsets already count from the start of `values`
                offsets = chunk.offsets.to_numpy()
            self._chunks.append((offsets, chunk.values.to_numpy(zero_copy_only=False)))
            starts.append(starts[-1] + len(chunk))
        self._chunk_starts = np.asarray(starts[:-1])

    @property
    def num_sequences(self) -> int | None:
        return None if self.num_rows is None else self.num_rows * self.windows

    def where(self, row_index: int) -> str:
        """A streamed row by shard file and row within it when the shards are local, else by stream index."""
        if self.shard_rows:
            row = row_index % sum(rows for _, rows in self.shard_rows)
            for file, rows in self.shard_rows:
                if row < rows:
                    return f"Row {row} of shard {file} (dataset '{self.name}')"
                row -= rows
        return f"Row {row_index} of the stream of dataset '{self.name}'"

    def _split_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """(R, k*T + 1) rows -> (R*k, T + 1) windows sharing boundary tokens."""
        return rows.unfold(1, self.max_seq_len + 1, self.max_seq_len).reshape(-1, self.max_seq_len + 1)

    # --- memory-mapped data: the order by index, and reads of single sequences ---------------------------------

    def sequence_ids(self, positions: np.ndarray) -> np.ndarray:
        """Which sequence of the dataset (row * k + window) stands at each position of the global order."""
        total = self.num_sequences
        positions = np.asarray(positions, dtype=np.int64)
        if self.seed is None:
            return positions % total
        epoch, index = np.divmod(positions, total)
        per_block = self.block_rows * self.windows
        block, offset = np.divmod(index, per_block)
        ids = np.empty_like(positions)
        for e, b in {(int(e), int(b)) for e, b in zip(epoch.ravel(), block.ravel(), strict=True)}:
            chosen = (epoch == e) & (block == b)
            size = min(per_block, total - b * per_block)
            ids[chosen] = b * per_block + block_permutation(self.seed, e, b, size)[offset[chosen]]
        return ids

    def read(self, sequence_ids: np.ndarray) -> torch.Tensor:
        """(n, T+1) token ids of the given sequences, read from the memory-mapped data (repeats allowed)."""
        span = self.max_seq_len + 1
        sequence_ids = np.asarray(sequence_ids, dtype=np.int64).ravel()
        rows, windows = np.divmod(sequence_ids, self.windows)
        chunk_of = np.searchsorted(self._chunk_starts, rows, side="right") - 1
        out = np.empty((len(sequence_ids), span), dtype=np.int64)
        for c in np.unique(chunk_of):
            chosen = chunk_of == c
            offsets, values = self._chunks[c]
            starts = offsets[rows[chosen] - self._chunk_starts[c]] + windows[chosen] * self.max_seq_len
            out[chosen] = values[starts[:, None] + np.arange(span)[None, :]]
        self.sequences_read += len(sequence_ids)
        self.tokens_read += out.size
        return torch.from_numpy(out)

    # --- the global batches, for any data -------------------------------------------------------------------

    def batches(
        self, start: int, batch_size: int, stream_state: dict | None = None
    ) -> Iterator[tuple[torch.Tensor, dict]]:
        """Yield (batch of `batch_size` sequences, position after it), forever, from position `start`."""
        if self.streaming and self.seed is not None:
            yield from self._shuffled_stream_batches(start, batch_size, stream_state)
            return
        if self.streaming:
            yield from self._streamed_batches(start, batch_size, stream_state)
            return
        position = start
        while True:
            batch = self.read(self.sequence_ids(np.arange(position, position + batch_size)))
            position += batch_size
            yield batch, {"sequence": position}

    # --- streamed data ----------------------------------------------------------------------------------------

    def _checked(self, ids: torch.Tensor, row_index: int) -> torch.Tensor:
        """A streamed row, checked like row 0 (its length, its ids), counted as read."""
        if ids.numel() != self.row_length:
            raise DataError(
                f"{self.where(row_index)} has {ids.numel()} tokens, expected {self.row_length} like row 0"
            )
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size):
            bad = int(ids.max()) if int(ids.max()) >= self.vocab_size else int(ids.min())
            raise DataError(
                f"{self.where(row_index)} holds token id {bad}, outside the model's vocabulary of "
                f"{self.vocab_size} (model.vocab_size)"
            )
        self.sequences_read += self.windows
        self.tokens_read += ids.numel()
        return ids

    def _streamed_batches(
        self, start: int, batch_size: int, stream_state: dict | None
    ) -> Iterator[tuple[torch.Tensor, dict]]:
        """The stored order, row by row: a bad row is found when the step that needs it is read."""
        dataset = self.dataset.select_columns([INPUT_IDS])
        if stream_state is not None and "block" in stream_state:
            raise ConfigError(
                f"The checkpoint's position in dataset '{self.name}' is one of a shuffled order: resume it "
                "with data.dataloader.shuffle=true"
            )
        skip_windows = start % self.windows if stream_state is None else stream_state["window"]
        if stream_state is not None:
            dataset.load_state_dict(stream_state["datasets"])
        elif start >= self.windows:
            dataset = dataset.skip(start // self.windows)  # no saved state: reading ahead is the only way
        previous_state = dataset.state_dict()  # the position before the row being read
        pending: list[torch.Tensor] = []
        pending_count = 0
        position = start
        row_index = start // self.windows
        while True:
            for row in dataset:
                state = dataset.state_dict()  # the position after this row
                ids = self._checked(torch.as_tensor(row[INPUT_IDS], dtype=torch.long), row_index)
                row_index += 1
                windows = self._split_rows(ids[None])[skip_windows:]
                for offset, window in enumerate(windows, start=skip_windows):
                    pending.append(window)
                    pending_count += 1
                    position += 1
                    if pending_count == batch_size:
                        done_row = offset + 1 == self.windows
                        after = {
                            "sequence": position,
                            "datasets": state if done_row else previous_state,
                            "window": 0 if done_row else offset + 1,
                        }
                        yield torch.stack(pending), after
                        pending, pending_count = [], 0
                skip_windows = 0
                previous_state = state
            dataset = self.dataset.select_columns([INPUT_IDS])  # end of data: wrap around
            previous_state = dataset.state_dict()

    def _shuffled_stream_batches(
        self, start: int, batch_size: int, stream_state: dict | None
    ) -> Iterator[tuple[torch.Tensor, dict]]:
        """Blocks of `block_rows` rows read in stream order, each shuffled as `sequence_ids` shuffles it; a
        position is the stream state at its block's start plus the sequences consumed in the block."""
        assert self.seed is not None
        dataset = self.dataset.select_columns([INPUT_IDS])
        epoch, block, offset, skip = 0, 0, 0, start  # no saved state: read from the start up to `start`
        if stream_state is not None:
            if "block" not in stream_state:
                raise ConfigError(
                    f"The checkpoint's position in dataset '{self.name}' is one of its stored order: resume it "
                    "with data.dataloader.shuffle=false"
                )
            dataset.load_state_dict(stream_state["datasets"])
            epoch, block, offset, skip = (
                stream_state["epoch"],
                stream_state["block"],
                stream_state["offset"],
                0,
            )
        rows = self._checked_rows(dataset, block * self.block_rows)
        pending: list[torch.Tensor] = []
        pending_count, position = 0, start
        while True:
            block_state = dataset.state_dict()
            read = list(itertools.islice(rows, self.block_rows))
            if len(read) < self.block_rows:  # the end of the data: the next block starts the next epoch
                next_dataset = self.dataset.select_columns([INPUT_IDS])
                following = (next_dataset.state_dict(), epoch + 1, 0)
            else:
                next_dataset = dataset
                following = (dataset.state_dict(), epoch, block + 1)
            if read:
                windows = self._split_rows(torch.stack(read))
                windows = windows[torch.tensor(block_permutation(self.seed, epoch, block, len(windows)))]
                if skip:
                    skipped = min(skip, len(windows) - offset)
                    offset, skip = offset + skipped, skip - skipped
                while offset < len(windows):
                    take = min(batch_size - pending_count, len(windows) - offset)
                    pending.append(windows[offset : offset + take])
                    pending_count, offset, position = pending_count + take, offset + take, position + take
                    if pending_count == batch_size:
                        if offset == len(windows):
                            state, at_epoch, at_block = following
                            after = {"datasets": state, "epoch": at_epoch, "block": at_block, "offset": 0}
                        else:
                            after = {
                                "datasets": block_state,
                                "epoch": epoch,
                                "block": block,
                                "offset": offset,
                            }
                        yield torch.cat(pending).long(), {"sequence": position, **after}
                        pending, pending_count = [], 0
            elif epoch == 0 and block == 0:
                raise ConfigError(f"Dataset '{self.name}' is empty")
            if next_dataset is not dataset:
                dataset = next_dataset
                rows = self._checked_rows(dataset, 0)
            _, epoch, block = following
            offset = 0

    def _checked_rows(self, dataset: datasets.IterableDataset, row_index: int) -> Iterator[torch.Tensor]:
        """The stream's rows from where it stands, checked, as int32 (a block holds many)."""
        for row in dataset:
            yield self._checked(torch.as_tensor(row[INPUT_IDS], dtype=torch.long), row_index).int()
            row_index += 1


class TrainingSequences(torch.utils.data.IterableDataset):
    """This process's training micro-batches, from optimizer step `start_step` on.

    Memory-mapped data: each process reads only its own micro-batches' sequences. Streamed data: the whole
    global batch is read at once, by process 0 when `dispatch_group` is given (see `data_dispatch_group`),
    which sends each process its micro-batches; the other processes read nothing. Either way one saved
    position serves every process count."""

    def __init__(
        self,
        stream: PretokenizedStream,
        layout: BatchLayout,
        start_step: int = 0,
        stream_state: dict | None = None,
        dispatch_group: dist.ProcessGroup | None = None,
    ) -> None:
        super().__init__()
        self.stream = stream
        self.layout = layout
        self.dispatch_group = dispatch_group
        self.resume_at(start_step, stream_state)
        self.data_error: DataError | None = None

    def resume_at(self, step: int, stream_state: dict | None = None) -> None:
        self.start_step = step
        self.stream_state = stream_state
        # Stream position after each step read so far; a checkpoint looks up its own step.
        self._positions = {step: stream_state or {"sequence": step * self.layout.global_batch}}

    def position_after(self, step: int) -> dict[str, Any]:
        """Where the stream stands once `step` optimizer steps are done (what a checkpoint at `step` saves)."""
        return self._positions[step]

    def _record(self, step: int, position: dict[str, Any]) -> None:
        self._positions = {k: v for k, v in self._positions.items() if k >= step - 1}
        self._positions[step + 1] = position

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if self.stream.streaming and self.dispatch_group is not None:
            yield from self._dispatched()
            return
        if self.stream.streaming:
            yield from self._from_global_batches()
            return
        layout, span = self.layout, self.stream.max_seq_len + 1
        for step in itertools.count(self.start_step):
            positions = layout.positions(step)
            sequences = self.stream.read(self.stream.sequence_ids(positions)).view(*positions.shape, span)
            self._record(step, {"sequence": (step + 1) * layout.global_batch})
            for micro_batch in sequences:
                yield to_model_inputs(micro_batch)

    def _global_batches(self) -> Iterator[tuple[torch.Tensor, dict]]:
        start = self.start_step * self.layout.global_batch
        global_batches = self.stream.batches(start, self.layout.global_batch, self.stream_state)
        for step, (batch, position) in enumerate(global_batches, start=self.start_step):
            check_token_ids(batch, self.stream.vocab_size, f"Training batch of step {step}")
            yield batch, position

    def _from_global_batches(self) -> Iterator[dict[str, torch.Tensor]]:
        try:
            for step, (batch, position) in enumerate(self._global_batches(), start=self.start_step):
                self._record(step, position)
                for micro_batch in self.layout.micro_batches(batch):
                    yield to_model_inputs(micro_batch)
        except DataError as error:
            # No micro-batch of this step was handed out (a global batch is read whole): end the data here and
            # let the trainer checkpoint the steps done, then report the error.
            self.data_error = error

    def _dispatched(self) -> Iterator[dict[str, torch.Tensor]]:
        """Process 0 reads each global batch and scatters it: a header (the position after the step, or why
        there is no step) to every process, then each process's (G, m, T+1) micro-batches."""
        layout, group = self.layout, self.dispatch_group
        shape = (layout.gradient_accumulation_steps, layout.micro_batch, self.stream.max_seq_len + 1)
        reader = self._global_batches() if layout.process_index == 0 else None
        for step in itertools.count(self.start_step):
            header: list[Any] = [None]
            parts = None
            if reader is not None:
                try:
                    batch, header[0] = next(reader)
                except DataError as error:
                    header[0] = {"data_error": str(error)}
                except BaseException as error:  # the others wait for this step: let them stop too
                    header[0] = {"failed": f"{type(error).__name__}: {error}"}
                    dist.broadcast_object_list(header, src=0, group=group)
                    raise
                else:
                    # Token ids travel as int32 (half the bytes of int64; any vocabulary fits).
                    parts = list(layout.by_process(batch).to(torch.int32).contiguous().unbind())
            dist.broadcast_object_list(header, src=0, group=group)
            position = header[0]
            if "data_error" in position:  # the same stop on every process, as if each had read the row
                self.data_error = DataError(position["data_error"])
                return
            if "failed" in position:
                raise RuntimeError(f"Process 0 stopped reading the training data: {position['failed']}")
            mine = torch.empty(shape, dtype=torch.int32)
            dist.scatter(mine, parts, src=0, group=group)
            self._record(step, position)
            for micro_batch in mine.long():
                yield to_model_inputs(micro_batch)


def training_sequences(stream: PretokenizedStream, layout: BatchLayout) -> TrainingSequences:
    """This process's `TrainingSequences`: a stream on several processes is read by process 0 alone, which
    dispatches the micro-batches. Collective when it dispatches: every process calls it."""
    dispatch = stream.streaming and layout.num_processes > 1
    return TrainingSequences(stream, layout, dispatch_group=data_dispatch_group() if dispatch else None)


def data_dispatch_group() -> dist.ProcessGroup:
    """A CPU (gloo) group over all processes for dispatching streamed batches, apart from the training's group:
    that one's backend (nccl on GPUs) may not carry CPU tensors, and its collectives (gradients, evaluation)
    never interleave with these. Collective: every process calls it, in the same order."""
    return dist.new_group(backend="gloo")


def to_model_inputs(sequences: torch.Tensor) -> dict[str, torch.Tensor]:
    """(m, T+1) sequences -> model inputs. `labels` follow the transformers convention (aligned with the
    inputs, shifted inside the model); `shift_labels` carries the already-shifted targets, including the
    last token's, so every one of the T positions is trained as in pico-train."""
    inputs = sequences[:, :-1]
    return {"input_ids": inputs, "labels": inputs, "shift_labels": sequences[:, 1:]}


def save_position(path: Path, step: int, position: dict[str, Any]) -> None:
    path.write_text(json.dumps({"step": step, **position}))


def load_position(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.exists() else None
