"""Run a sweep on a competition-layout folder, score its best trial on the eval set, and time the trials.

    .venv/bin/python bench/bench_sweep.py --data ../shared/data/maskdev --model_dir /tmp/bench_sweep
    .venv/bin/python bench/bench_sweep.py --data ../shared/data/maskdev --trials 2 --space epochs=1,2

It runs the real sweep.py (flags after `--` go to every trial) and inference.py on the best trial, then prints:
the sweep's wall time, the epochs trained against those the same trials would have trained unpruned (each trial's
sampled --epochs), the best trial's eval macro F1, and each trial's overhead: its wall time less its epochs'
(log.csv's time_s), which is what a trial costs beyond training and validation (data indexing, cache reuse,
building the model, writing the reports).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_recipe import run, score  # noqa: E402

import train  # noqa: E402
import utils  # noqa: E402

TRAIN_EPOCHS = train.flag_defaults()["epochs"]
SPACE = [
    "lr=log:1e-3:1e-2",
    "weight_decay=log:1e-4:1e-1",
    "criterion=cross_entropy,focal,label_smoothing",
    "augmentation=FaceAugmentation,CustomAugmentation,AlbumentationsAugmentation",
    "epochs=int:12:36",
]


def get_parser() -> argparse.ArgumentParser:
    p = utils.ArgumentParser(description=__doc__)
    p.add_argument("--data", required=True, help="folder with train/images and eval/ (info.csv, images/, truth.csv)")
    p.add_argument("--trials", type=int, default=16)
    p.add_argument("--space", nargs="+", default=SPACE, help="sweep.py's --space items")
    p.add_argument("--prune", default="median")
    p.add_argument("--model_dir", default=None, help="where the sweep goes (default: a temporary folder)")
    p.add_argument("train_flags", nargs=argparse.REMAINDER, help="after --: flags for every trial")
    return p


def sampled_epochs(params: str, default: int) -> int:
    words = shlex.split(params)
    return int(words[words.index("--epochs") + 1]) if "--epochs" in words else default


def main(args: argparse.Namespace) -> None:
    data = Path(args.data).resolve()
    extra = [a for a in args.train_flags if a != "--"]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.model_dir or tmp).resolve()
        work.mkdir(parents=True, exist_ok=True)
        command = ["--data_dir", str(data / "train/images"), "--model_dir", str(work / "model"), "--name", "sw",
                   "--trials", str(args.trials), "--prune", args.prune, "--space", *args.space,
                   "--", *extra]  # fmt: skip
        print(f"python sweep.py {shlex.join(command)}", flush=True)
        start = time.time()
        run("sweep.py", *command, cwd=work)
        wall = time.time() - start
        table = pd.read_csv(work / "model/sw/sweep.csv", keep_default_na=False)
        default_epochs = int(extra[extra.index("--epochs") + 1]) if "--epochs" in extra else TRAIN_EPOCHS
        table["unpruned"] = [sampled_epochs(p, default_epochs) for p in table["params"]]
        overheads, epoch_s = [], []
        for _, row in table.iterrows():
            log = pd.read_csv(Path(row["run_dir"]) / "log.csv")
            overheads.append(row["seconds"] - log["time_s"].sum())
            epoch_s += list(log["time_s"])
        table["overhead_s"] = np.round(overheads, 1)
        print(table[["trial", "state", "value", "epochs", "unpruned", "seconds", "overhead_s", "params"]].to_string())
        best = table[table["state"] == "COMPLETE"].sort_values("value", ascending=False).iloc[0]
        run("inference.py", "--model_dir", best["run_dir"], "--data_dir", str(data / "eval"), "--output_dir",
            str(work / "output"), cwd=work)  # fmt: skip
        submission = pd.read_csv(work / "output/output.csv", dtype={"ImageID": str})
        s = score(pd.read_csv(data / "eval/truth.csv", dtype={"ImageID": str}), submission)
        trained, unpruned = table["epochs"].sum(), table["unpruned"].sum()
        print(f"wall {wall / 60:.1f} min | epochs trained {trained} of {unpruned} unpruned ({trained / unpruned:.0%}) "
              f"| {(table['state'] == 'PRUNED').sum()} of "
              f"{len(table)} pruned | best trial {best['trial']} ({best['params']}): val {best['value']:.4f}, eval "
              f"macro F1 {s['f1']:.4f}")  # fmt: skip
        later = overheads[1:] or overheads
        print(
            f"per-trial overhead after the first trial: median {np.median(later):.1f}s, max {max(later):.1f}s "
            f"(first trial {overheads[0]:.1f}s, with the decoding); median epoch {np.median(epoch_s):.1f}s"
        )


if __name__ == "__main__":
    main(get_parser().parse_args())
