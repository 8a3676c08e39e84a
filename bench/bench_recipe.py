"""Train with the project's defaults on a competition-layout folder, predict its eval set, score it: one line.

    .venv/bin/python bench/bench_recipe.py --data ../shared/data/maskdev
    .venv/bin/python bench/bench_recipe.py --data ../shared/data/maskdev --seeds 1 2 3
    .venv/bin/python bench/bench_recipe.py --data ../shared/data/maskdev -- --model MultiHeadModel --epochs 20

It runs the real train.py and inference.py (flags after `--` go to train.py), with only the data paths
given, so what it measures is what a user gets from `python train.py`.
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import f1_score

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import labels  # noqa: E402
import utils  # noqa: E402


def get_parser() -> argparse.ArgumentParser:
    p = utils.ArgumentParser(description=__doc__)
    p.add_argument("--data", required=True, help="folder with train/images and eval/ (info.csv, images/, truth.csv)")
    p.add_argument("--seeds", type=int, nargs="+", default=[42], help="one training per seed")
    p.add_argument("--model_dir", default=None, help="where the runs go (default: a temporary folder)")
    p.add_argument("train_flags", nargs=argparse.REMAINDER, help="after --: extra train.py flags")
    return p


def run(script: str, *args: str, cwd: Path) -> tuple[str, float]:
    start = time.time()
    done = subprocess.run([sys.executable, str(ROOT / script), *args], cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{script} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done.stdout, time.time() - start


def score(truth: pd.DataFrame, submission: pd.DataFrame) -> dict[str, float]:
    scored = truth.set_index("ImageID")["ans"].reindex(submission["ImageID"]).to_numpy()
    preds = submission["ans"].to_numpy()
    out = {"f1": utils.macro_f1(scored, preds, 18), "acc": float((scored == preds).mean())}
    for task, t, p in zip(labels.TASKS, labels.decode(scored), labels.decode(preds), strict=True):
        out[task] = float((t == p).mean())
    old = [c for c in range(18) if labels.decode(c)[2] == 2]  # the six classes of the oldest age band
    out["old_f1"] = float(np.mean(f1_score(scored, preds, labels=old, average=None, zero_division=0)))
    return out


def finished_run(train_output: str, cwd: Path) -> Path:
    """The run train.py (started in `cwd`) names last, `Next: python inference.py --model_dir RUN`: the whole run,
    which for `--fold all` is the k-fold directory (each fold's own `Run directory:` line comes first)."""
    lines = re.findall(r"^Next: python inference\.py --model_dir (.+)$", train_output, re.M)
    return cwd / shlex.split(lines[-1])[0]


def images_trained(run_dir: Path) -> int:
    """Training images x epochs, over the folds of a k-fold run."""
    dirs = [d for d in sorted(run_dir.glob("fold*")) if (d / "log.csv").is_file()] or [run_dir]
    return sum(
        int(pd.read_json(d / "config.json", typ="series")["train_images"]) * len(pd.read_csv(d / "log.csv"))
        for d in dirs
    )


def caller_path(word: str) -> str:
    """A train.py word that names a file from where this script was started (`--label_fixes flips.csv`, `--backbone
    bench/recipe_backbones.py:Wide`), made absolute: the runs start in the model folder."""
    import model

    path, sep, name = word.rpartition(":") if model.is_file_spec(word) else (word, "", "")
    return str(Path(path).resolve()) + sep + name if Path(path).is_file() else word


def main(args: argparse.Namespace) -> None:
    data = Path(args.data).resolve()
    extra = [caller_path(a) for a in args.train_flags if a != "--"]
    n_eval = len(pd.read_csv(data / "eval/info.csv"))
    truth_path = data / "eval/truth.csv"
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.model_dir or tmp).resolve()
        work.mkdir(parents=True, exist_ok=True)
        for seed in args.seeds:
            name = f"recipe_seed{seed}"
            out, train_s = run(
                "train.py", "--data_dir", str(data / "train/images"), "--model_dir", str(work / "model"),
                "--name", name, "--seed", str(seed), *extra, cwd=work,
            )  # fmt: skip
            run_dir = finished_run(out, work)
            trained = images_trained(run_dir)
            _, infer_s = run(
                "inference.py", "--model_dir", str(run_dir), "--data_dir", str(data / "eval"),
                "--output_dir", str(work / f"output_{seed}"), cwd=work,
            )  # fmt: skip
            submission = pd.read_csv(work / f"output_{seed}/output.csv", dtype={"ImageID": str})
            line = f"seed {seed}: train {train_s:.0f}s ({trained / train_s:.0f} img/s) infer {infer_s:.0f}s"
            if truth_path.is_file():
                s = score(pd.read_csv(truth_path, dtype={"ImageID": str}), submission)
                results.append(s)
                line = (
                    f"seed {seed}: eval macro F1 {s['f1']:.4f} acc {s['acc']:.1%} | mask {s['mask']:.1%} gender "
                    f"{s['gender']:.1%} age {s['age']:.1%} | oldest band's classes F1 {s['old_f1']:.3f} | train "
                    f"{train_s:.0f}s ({trained / train_s:.0f} img/s) | inference {infer_s:.1f}s "
                    f"({n_eval / infer_s:.0f} img/s)"
                )
            print(line, flush=True)
    if len(results) > 1:
        f1 = np.array([r["f1"] for r in results])
        old = np.mean([r["old_f1"] for r in results])
        print(
            f"mean eval macro F1 {f1.mean():.4f} (std {f1.std(ddof=1):.4f}, min {f1.min():.4f}, max {f1.max():.4f}); "
            f"oldest band's classes F1 {old:.3f}"
        )


if __name__ == "__main__":
    main(get_parser().parse_args())
