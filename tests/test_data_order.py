"""The global data order: drawn from the seed, the same for streamed and memory-mapped data, for any process
count and across resumes; each process reads only its own sequences of memory-mapped data, and a stream is read
once, by process 0, which dispatches the others' micro-batches."""

import itertools
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import StopAfter, assert_bitwise_equal, final_weights, make_pretokenized, train

from pico_hf.training.data import (
    BatchLayout,
    DataError,
    PretokenizedStream,
    TrainingSequences,
    training_sequences,
)

SEQ_LEN, VOCAB = 16, 128


@pytest.fixture
def shards(tmp_path):
    """45 rows of 33 tokens (90 sequences of 16 tokens) in two parquet shards."""
    make_pretokenized(tmp_path / "shards" / "a.parquet", n_rows=24, row_length=33)
    make_pretokenized(tmp_path / "shards" / "b.parquet", n_rows=21, row_length=33, seed=1)
    return str(tmp_path / "shards")


def stream(data, seed=42, streaming=False, block_rows=8192):
    return PretokenizedStream(data, SEQ_LEN, VOCAB, streaming=streaming, seed=seed, block_rows=block_rows)


def read(source, start, batch_size, count, state=None):
    return list(itertools.islice(source.batches(start, batch_size, state), count))


def as_rows(batches):
    return [tuple(row) for batch, _ in batches for row in batch.tolist()]


@pytest.mark.parametrize("streaming", [False, True])
def test_seeds_order_the_same_sequences_differently_within_an_epoch(shards, streaming):
    stored = as_rows(read(stream(shards, seed=None, streaming=streaming), 0, 10, 9))  # one epoch: 90
    assert stored == as_rows(read(stream(shards, seed=None, streaming=streaming), 0, 9, 10))
    orders = {seed: as_rows(read(stream(shards, seed, streaming), 0, 10, 9)) for seed in (1, 2)}
    assert orders[1] != orders[2] and stored not in orders.values()
    for order in orders.values():
        assert sorted(order) == sorted(stored)  # a permutation of the epoch's sequences
    assert as_rows(read(stream(shards, 1, streaming), 0, 10, 9)) == orders[1]  # the same seed, the same order
    # The next epoch is another permutation of the same sequences.
    next_epoch = as_rows(read(stream(shards, 1, streaming), 90, 10, 9))
    assert next_epoch != orders[1] and sorted(next_epoch) == sorted(stored)


@pytest.mark.parametrize("block_rows", [8192, 4])
def test_streamed_and_memory_mapped_data_give_the_same_order(shards, block_rows):
    mapped = read(stream(shards, 7, block_rows=block_rows), 0, 8, 30)  # 240 positions: 2.7 epochs
    streamed = read(stream(shards, 7, streaming=True, block_rows=block_rows), 0, 8, 30)
    assert as_rows(mapped) == as_rows(streamed)
    if block_rows == 4:  # small blocks: sequences stay within their block of 4 rows (8 sequences)
        stored = as_rows(read(stream(shards, None), 0, 8, 1))
        assert sorted(as_rows(mapped)[:8]) == sorted(stored)


@pytest.mark.parametrize("block_rows", [8192, 4])
def test_a_shuffled_stream_resumes_exactly_from_every_saved_position(shards, block_rows):
    source = stream(shards, 3, streaming=True, block_rows=block_rows)
    batches = read(source, 0, 6, 40)  # across blocks and epochs, batches straddling both
    for (_, position), (expected, _) in itertools.pairwise(batches):
        resumed = stream(shards, 3, streaming=True, block_rows=block_rows)
        batch, _ = next(resumed.batches(position["sequence"], 6, position))
        assert torch.equal(batch, expected), position
        assert resumed.tokens_read <= (block_rows + 6) * 33  # at most its block re-read, not the stream
    # Without a saved state (an older checkpoint), the stream is read up to the position.
    batch, _ = next(stream(shards, 3, streaming=True, block_rows=block_rows).batches(6 * 25, 6))
    assert torch.equal(batch, batches[25][0])


def test_a_saved_position_of_the_other_order_is_refused(shards):
    from pico_hf.training.config import ConfigError

    _, shuffled = read(stream(shards, 3, streaming=True), 0, 6, 1)[0]
    _, in_order = read(stream(shards, None, streaming=True), 0, 6, 1)[0]
    with pytest.raises(ConfigError, match=r"resume it with data\.dataloader\.shuffle=true"):
        next(stream(shards, None, streaming=True).batches(6, 6, shuffled))
    with pytest.raises(ConfigError, match=r"resume it with data\.dataloader\.shuffle=false"):
        next(stream(shards, 3, streaming=True).batches(6, 6, in_order))


@pytest.mark.parametrize("streaming", [False, True])
def test_any_process_count_trains_on_the_same_global_batches(shards, streaming):
    def micro_batches(processes, index, steps=5):
        source = stream(shards, 5, streaming)
        layout = BatchLayout(8, 2, processes, index)
        sequences = itertools.islice(iter(TrainingSequences(source, layout)), 2 * steps)
        return [m["input_ids"] for m in sequences], source

    one, single = micro_batches(1, 0)
    (first, p0), (second, p1) = micro_batches(2, 0), micro_batches(2, 1)
    # Global micro-batch g*P + p of each step: process 0 holds the first half of each of one process's.
    for step_one, a, b in zip(one, first, second, strict=True):
        assert torch.equal(torch.cat([a, b]), step_one)
    if streaming:  # no random access: without a dispatching process 0, each process reads the stream through
        assert p0.sequences_read == p1.sequences_read >= single.sequences_read
    else:  # each process reads only its own sequences: half of one process's reads
        assert single.sequences_read == 5 * 8
        assert p0.sequences_read == p1.sequences_read == single.sequences_read // 2
        assert p0.tokens_read == single.tokens_read // 2


# --- streamed data on two real processes: process 0 reads and dispatches ----------------------------------


def trained(sequences, start, steps):
    """The micro-batches (2 per step) of up to `steps` steps, and the position saved after each step."""
    micro_batches, positions = [], []
    for index, micro_batch in enumerate(itertools.islice(iter(sequences), 2 * steps)):
        micro_batches.append(micro_batch["input_ids"].tolist())
        if index % 2:
            positions.append(sequences.position_after(start + index // 2 + 1))
    return micro_batches, positions


def _dispatching_process(rank, init_file, data, steps, start, result_dir):
    """One of two gloo processes: its micro-batches of `steps` steps from `start` (step, saved position)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        source = stream(data, 3, streaming=True, block_rows=4)
        step, position = start
        sequences = training_sequences(source, BatchLayout(8, 2, 2, rank))  # as the trainer builds them
        sequences.resume_at(step, position)  # as the trainer resumes them
        micro_batches, positions = trained(sequences, step, steps)
        result = {
            "micro_batches": micro_batches,
            "positions": positions,
            "tokens_read": source.tokens_read,
            "data_error": None if sequences.data_error is None else str(sequences.data_error),
        }
        (result_dir / f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def dispatched(tmp_path, data, steps, start=(0, None)):
    """What each of two processes trains on, process 0 reading the stream and dispatching."""
    import torch.multiprocessing as mp

    result_dir = tmp_path / f"dispatched-{start[0]}"
    result_dir.mkdir()
    init_file = result_dir / "init"
    mp.spawn(_dispatching_process, (init_file, data, steps, start, result_dir), nprocs=2)
    return [json.loads((result_dir / f"rank{rank}.json").read_text()) for rank in range(2)]


def test_a_stream_is_read_once_by_process_0_and_dispatched(tmp_path, shards):
    """Two processes over gloo train on exactly what each would keep of the whole stream (positions and
    resume included); process 1 reads nothing, process 0 what one process reads."""
    steps = 14  # 112 of 90 sequences: across blocks of 4 rows and into the second epoch
    two = dispatched(tmp_path, shards, steps)
    for rank, received in enumerate(two):
        source = stream(shards, 3, streaming=True, block_rows=4)
        alone = TrainingSequences(source, BatchLayout(8, 2, 2, rank))  # reads the whole stream itself
        assert (received["micro_batches"], received["positions"]) == trained(alone, 0, steps), rank
        assert received["data_error"] is None
    assert two[1]["tokens_read"] == 0
    assert two[0]["tokens_read"] == source.tokens_read  # what one process reads for the same steps

    # Resumed from the position saved after step 5: the same micro-batches as the uninterrupted run.
    resumed = dispatched(tmp_path, shards, steps - 5, start=(5, two[0]["positions"][4]))
    for received, uninterrupted in zip(resumed, two, strict=True):
        assert received["micro_batches"] == uninterrupted["micro_batches"][2 * 5 :]
        # `datasets` spells a restored stream's state its own way; the rows that follow it are the same.
        assert [without_stream_state(p) for p in received["positions"]] == [
            without_stream_state(p) for p in uninterrupted["positions"][5:]
        ]
    assert resumed[1]["tokens_read"] == 0


def without_stream_state(position):
    return {key: value for key, value in position.items() if key != "datasets"}


def test_a_bad_streamed_row_stops_every_dispatched_process_at_the_same_step(tmp_path, shards):
    import pyarrow as pa
    import pyarrow.parquet as pq

    bad = Path(shards) / "b.parquet"
    table = pq.read_table(bad).to_pylist()
    table[4]["input_ids"][3] = 500  # beyond the vocabulary of 128: row 28 of the stream
    pq.write_table(pa.Table.from_pylist(table), bad)
    two = dispatched(tmp_path, shards, 10)
    message = f"Row 4 of shard {bad} (dataset '{shards}') holds token id 500, outside the model's vocabulary"
    for received in two:
        assert received["data_error"].startswith(message)
        assert len(received["micro_batches"]) == 2 * 7  # steps 0-6; step 7 is block 7, rows 28-31
    with pytest.raises(DataError, match=re.escape(message)):
        list(itertools.islice(stream(shards, 3, streaming=True, block_rows=4).batches(0, 8), 10))


def test_each_process_reads_its_own_sequences_by_index(shards):
    source = stream(shards, 9)
    layout = BatchLayout(global_batch=12, gradient_accumulation_steps=3, num_processes=2, process_index=1)
    assert layout.positions(2).tolist() == [[26, 27], [30, 31], [34, 35]]
    ids = source.sequence_ids(layout.positions(2))
    expected, _ = next(source.batches(24, 12))
    assert torch.equal(source.read(ids).view(6, -1), torch.cat(layout.micro_batches(expected)))
    assert np.array_equal(np.sort(source.sequence_ids(np.arange(90))), np.arange(90))


@pytest.mark.parametrize("streaming", ["false", "true"])
def test_a_resumed_run_reads_the_same_seeded_order(tmp_path, streaming):
    """Bitwise the same final weights after a crash, for streamed (block state saved) and mapped data; with
    shuffle off the same seed trains on the stored order."""
    options = {"data.dataset.streaming": streaming, "training.max_steps": 8, "checkpointing.run_name": "one"}
    train(tmp_path, **options)
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path, callbacks=[StopAfter(5)], **{**options, "checkpointing.run_name": "two"})
    summary, _ = train(tmp_path, **{**options, "checkpointing.run_name": "two"})
    assert summary["resumed_from"].endswith("step_4")
    runs = tmp_path / "runs"
    assert_bitwise_equal(final_weights(runs / "two"), final_weights(runs / "one"))

    # The same seed: the same first batch; the stored order (same initial weights): another one.
    other = {**options, "checkpointing.run_name": "three", "training.max_steps": 1}
    in_order = {**other, "checkpointing.run_name": "four", "data.dataloader.shuffle": "false"}
    train(tmp_path, **other)
    train(tmp_path, **in_order)
    first_loss = [_first_loss(runs / name) for name in ("one", "three", "four")]
    assert first_loss[0] == first_loss[1] != first_loss[2]


def _first_loss(run_dir):
    import json

    lines = (run_dir / "logs" / "metrics.jsonl").read_text().splitlines()
    return next(json.loads(line)["loss"] for line in lines if "loss" in json.loads(line))
