"""What experiment tracking costs a run, side by side: TensorBoard alone (always on), `--wandb` in offline mode,
`--mlflow` into a new SQLite store, and both. One line per way.

    .venv/bin/python bench/bench_loggers.py --data_dir ../shared/data/maskdev/train/images

Each way is the real train.py for `--epochs` epochs (default 3) in its own process. `wall` is the process's
time from start to exit (imports, decoding, the tracker's start and finish included); `epochs` is the sum of
log.csv's `time_s` (training and validation), so `wall - epochs` is everything else, the loggers' cost in it.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import utils  # noqa: E402


def get_parser() -> argparse.ArgumentParser:
    p = utils.ArgumentParser(description=__doc__)
    p.add_argument("--data_dir", required=True, help="train.py --data_dir")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("train_flags", nargs=argparse.REMAINDER, help="after --: extra train.py flags for every way")
    return p


def run(data_dir: str, work: Path, name: str, flags: list[str], epochs: int) -> tuple[float, float]:
    """(wall seconds of the process, seconds of its epochs by log.csv) of one train.py run."""
    command = [sys.executable, str(ROOT / "train.py"), "--data_dir", data_dir, "--model_dir", str(work / "model"),
               "--name", name, "--epochs", str(epochs), *flags]  # fmt: skip
    start = time.perf_counter()
    env = {**os.environ, "WANDB_MODE": "offline"}
    done = subprocess.run(command, cwd=work, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if done.returncode != 0 or "logging is off" in done.stderr:
        raise SystemExit(f"train.py {' '.join(flags)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return wall, float(pd.read_csv(work / "model" / name / "log.csv")["time_s"].sum())


def main(args: argparse.Namespace) -> None:
    extra = [a for a in args.train_flags if a != "--"]
    with tempfile.TemporaryDirectory() as tmp:
        store = f"sqlite:///{Path(tmp) / 'mlflow.db'}"
        ways = {
            "TensorBoard": [],
            "+ --wandb (offline)": ["--wandb", "bench"],
            "+ --mlflow (SQLite)": ["--mlflow", store],
            "+ both": ["--wandb", "bench", "--mlflow", store],
        }
        data_dir = str(Path(args.data_dir).resolve())  # train.py runs in a temporary folder
        rows = {way: run(data_dir, Path(tmp), f"w{k}", [*flags, *extra], args.epochs)
                for k, (way, flags) in enumerate(ways.items())}  # fmt: skip
    base = rows["TensorBoard"][0]
    print(f"{args.epochs} epochs | {args.data_dir}")
    print(f"{'way':<22} {'wall s':>8} {'x alone':>8} {'epochs s':>9} {'other s':>8}")
    for way, (wall, epochs) in rows.items():
        print(f"{way:<22} {wall:8.1f} {wall / base:8.2f} {epochs:9.1f} {wall - epochs:8.1f}")


if __name__ == "__main__":
    main(get_parser().parse_args())
