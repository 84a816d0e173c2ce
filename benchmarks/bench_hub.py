"""Hub pushing cost: the demo run (recipes/configs/demo.yaml) with `checkpointing.save_to_hf` on, against a
fake Hub with 200 ms of latency per request and 20 MB/s uploads, vs the same run with pushing off.

Pushes run in the background, so what pushing can add is (a) CPU and disk contention while training and
(b) the wait at the end for the last checkpoint's uploads (and the final model on `main`). Both are reported:
`train_ratio` is the wall time until the last step's checkpoint is on disk, `total_ratio` includes the final
wait. Runs alternate (off, on / on, off, ...) in one process, so drift in machine load hits both alike.
Weights and other binary files go through Xet, as huggingface_hub sends them to the real Hub whenever
hf_xet is installed: hf_xet chunks, compresses and deduplicates them and uploads xorbs and shards to the
fake Hub's CAS server (tests/fake_hub.py); `--lfs` pushes through a Hub without Xet (the LFS batch API).

    python benchmarks/bench_hub.py [--steps 150] [--rounds 1] [--latency 0.2] [--mbps 20] [--lfs]

`--steps` shortens the run, keeping the demo's cadence (a checkpoint every steps/3).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the fake Hub lives with the tests

from fake_hub import FakeHub, point_hub_client_at  # noqa: E402

DEMO = REPO / "recipes" / "configs" / "demo.yaml"
DEMO_STEPS, DEMO_SAVE_EVERY = 150, 50


def run_once(steps: int, push: bool, runs_dir: Path, name: str) -> dict[str, Any]:
    from pico_hf.hub.callback import HubPublishCallback
    from pico_hf.training.config import load_config
    from pico_hf.training.run import build_job

    overrides = [
        f"training.max_steps={steps}",
        f"checkpointing.save_every_n_steps={max(1, steps * DEMO_SAVE_EVERY // DEMO_STEPS)}",
        f"checkpointing.runs_dir={runs_dir}",
        f"checkpointing.run_name={name}",
        "monitoring.logging.log_every_n_steps=1000",
    ]
    if push:
        overrides += [
            "checkpointing.save_to_hf=true",
            f"checkpointing.hf_checkpoint.repo_id=fake-user/{name}",
        ]
    config, _ = load_config(DEMO, overrides)
    config.training_arguments["disable_tqdm"] = True
    start = time.perf_counter()
    job = build_job(config)
    timings: dict[str, float] = {}
    for callback in job.trainer.callback_handler.callbacks:
        if isinstance(callback, HubPublishCallback):
            end = callback.on_train_end

            def timed_end(*args: Any, _end: Any = end, **kwargs: Any) -> Any:
                timings["final_wait_start"] = time.perf_counter()
                return _end(*args, **kwargs)

            callback.on_train_end = timed_end  # type: ignore[method-assign]
    job.trainer.train()
    total = time.perf_counter() - start
    trained = timings.get("final_wait_start", start + total) - start
    return {"total_s": total, "train_s": trained, "final_wait_s": total - trained}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=DEMO_STEPS)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--latency", type=float, default=0.2, help="seconds added to every request")
    parser.add_argument("--mbps", type=float, default=20.0, help="upload bandwidth, MB/s")
    parser.add_argument("--lfs", action="store_true", help="push through a Hub without Xet (LFS)")
    args = parser.parse_args()
    results: dict[bool, list[dict[str, Any]]] = {False: [], True: []}
    with (
        tempfile.TemporaryDirectory() as tmp,
        FakeHub(xet=not args.lfs, lifetime_s=24 * 3600) as hub,  # a slow machine may take hours
        point_hub_client_at(hub, Path(tmp) / "cache"),
    ):
        hub.latency_s, hub.upload_bytes_per_s = args.latency, args.mbps * 1e6
        for round_ in range(args.rounds):
            for push in (False, True) if round_ % 2 == 0 else (True, False):
                name = f"bench-{'push' if push else 'local'}-{round_}"
                results[push].append(run_once(args.steps, push, Path(tmp) / "runs", name))
                print(json.dumps({"push": push, **results[push][-1]}), file=sys.stderr)
        stored_bytes = sum(len(d) for d in hub.lfs_objects.values())
        xorb_bytes = hub.cas.xorb_bytes_received
        commits = sum(len(repo.commits) for repo in hub.repos.values())

    def median(push: bool, key: str) -> float:
        return statistics.median(r[key] for r in results[push])

    print(
        json.dumps(
            {
                "steps": args.steps,
                "latency_s": args.latency,
                "upload_MB_per_s": args.mbps,
                "off_total_s": round(median(False, "total_s"), 1),
                "on_train_s": round(median(True, "train_s"), 1),
                "on_final_wait_s": round(median(True, "final_wait_s"), 1),
                "on_total_s": round(median(True, "total_s"), 1),
                "train_ratio": round(median(True, "train_s") / median(False, "total_s"), 3),
                "total_ratio": round(median(True, "total_s") / median(False, "total_s"), 3),
                "path": "lfs" if args.lfs else "xet",
                "stored_MB": round(stored_bytes / 1e6, 1),  # the binary files, as committed
                "xorb_MB_uploaded": round(xorb_bytes / 1e6, 1),  # what went up through Xet, compressed
                "commits": commits,
            }
        )
    )


if __name__ == "__main__":
    main()
