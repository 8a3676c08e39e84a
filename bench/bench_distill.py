"""What distillation costs per epoch, side by side: a plain run, `--teacher` (the teachers predict every batch)
and `--teacher --kd_cache` (they predict each image once, before the first epoch). One line per way.

    .venv/bin/python bench/bench_distill.py --data_dir ../shared/data/maskdev/train/images --teacher RUN [RUN ...]

Each way is the real train.py for `--epochs` epochs (default 2); the epoch time is the median of log.csv's
`time_s` (training and validation), and the cache's one-off time is what train.py prints.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import utils  # noqa: E402


def get_parser() -> argparse.ArgumentParser:
    p = utils.ArgumentParser(description=__doc__)
    p.add_argument("--data_dir", required=True, help="train.py --data_dir")
    p.add_argument("--teacher", nargs="+", required=True, help="train.py --teacher")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("train_flags", nargs=argparse.REMAINDER, help="after --: extra train.py flags for every way")
    return p


def epoch_time(data_dir: str, work: Path, name: str, flags: list[str], epochs: int) -> tuple[float, float | None]:
    """(median seconds per epoch, seconds the teachers' cache took or None) of one train.py run."""
    command = [sys.executable, str(ROOT / "train.py"), "--data_dir", data_dir, "--model_dir", str(work / "model"),
               "--name", name, "--epochs", str(epochs), *flags]  # fmt: skip
    done = subprocess.run(command, cwd=work, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"train.py {' '.join(flags)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    run_dir = Path(re.search(r"Run directory: (\S+)", done.stdout).group(1))
    cached = re.search(r"cached in ([\d.]+)s", done.stdout)
    return statistics.median(pd.read_csv(run_dir / "log.csv")["time_s"]), float(cached.group(1)) if cached else None


def main(args: argparse.Namespace) -> None:
    extra = [a for a in args.train_flags if a != "--"]
    teachers = ["--teacher", *[str(Path(t).resolve()) for t in args.teacher]]
    ways = {"plain": [], "--teacher": teachers, "--teacher --kd_cache": [*teachers, "--kd_cache"]}
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = str(Path(args.data_dir).resolve())  # train.py runs in a temporary folder
        rows = {w: epoch_time(data_dir, Path(tmp), f"w{k}", [*f, *extra], args.epochs)
                for k, (w, f) in enumerate(ways.items())}  # fmt: skip
    base = rows["plain"][0]
    print(f"{len(args.teacher)} teacher(s) | {args.epochs} epochs | {args.data_dir}")
    print(f"{'way':<22} {'s/epoch':>8} {'x plain':>8}  once")
    for way, (seconds, cached) in rows.items():
        once = f"{cached:.1f} s (teachers' logits)" if cached is not None else ""
        print(f"{way:<22} {seconds:8.1f} {seconds / base:8.2f}  {once}")


if __name__ == "__main__":
    main(get_parser().parse_args())
