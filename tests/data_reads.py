"""Run a script and record what this process read from its training data (tests only).

    python -m accelerate.commands.launch --config_file recipes/accelerate/cpu.yaml --num_processes 2 \\
        tests/data_reads.py recipes/train.py [overrides ...]

At exit each process writes `$PICO_TEST_READS_DIR/rank<RANK>.json`: the sequences and tokens its
`PretokenizedStream`s read from storage, and the ids of the memory-mapped sequences it read. With
PICO_TEST_SIGKILL_AFTER_STEP=N, rank 0 is killed when step N ends (tests/sigkill.py) and nothing is written.
"""

import atexit
import json
import os
import runpy
import sys
from pathlib import Path

import sigkill  # noqa: F401  (PICO_TEST_SIGKILL_AFTER_STEP)

from pico_hf.training.data import PretokenizedStream

streams: list[PretokenizedStream] = []
sequence_ids: list[int] = []
_init, _read = PretokenizedStream.__init__, PretokenizedStream.read


def init(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    streams.append(self)


def read(self, ids):
    sequence_ids.extend(int(i) for i in ids.ravel())
    return _read(self, ids)


def write_reads() -> None:
    folder = Path(os.environ["PICO_TEST_READS_DIR"])
    folder.mkdir(parents=True, exist_ok=True)
    reads = {
        "sequences_read": sum(s.sequences_read for s in streams),
        "tokens_read": sum(s.tokens_read for s in streams),
        "sequence_ids": sequence_ids,
    }
    (folder / f"rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(reads))


PretokenizedStream.__init__, PretokenizedStream.read = init, read
atexit.register(write_reads)

if __name__ == "__main__":
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
