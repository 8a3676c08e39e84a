"""bench/bench_recipe.py end to end on tiny data, and the per-task metrics it and the epoch line report."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest

import dataset
import labels
import report
from conftest import ROOT, run_script, tiny_run_args


def test_bench_recipe_trains_predicts_and_prints_one_parsable_line(demo_root, tmp_path):
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench/bench_recipe.py"), "--data", str(demo_root), "--model_dir", str(tmp_path),
         "--", "--epochs", "1", "--resize", "64", "48", "--num_workers", "0"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    pattern = (
        r"seed 42: eval macro F1 ([\d.]+) acc ([\d.]+)% \| mask ([\d.]+)% gender ([\d.]+)% age ([\d.]+)% \| "
        r"oldest band's classes F1 ([\d.]+) \| train (\d+)s \((\d+) img/s\) \| inference ([\d.]+)s \((\d+) img/s\)"
    )
    match = re.fullmatch(pattern, done.stdout.strip())
    assert match, done.stdout
    assert 0 <= float(match.group(1)) <= 1 and all(0 <= float(match.group(i)) <= 100 for i in range(2, 6))
    assert 0 <= float(match.group(6)) <= 1


def test_bench_recipe_scores_a_kfold_run_as_a_whole(demo_root, tmp_path):
    """With --fold all, train.py prints each fold's `Run directory:` first; the bench predicts (and counts the
    training images of) the k-fold directory, every fold, not the first fold alone."""
    sys.path.insert(0, str(ROOT / "bench"))
    import bench_recipe

    args = ["--epochs", "1", "--resize", "32", "24", "--num_workers", "0", "--n_splits", "2", "--fold", "all"]
    done = run_script("train.py", *tiny_run_args(demo_root, *args, "--name", "k f"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("Run directory: ") == 2
    assert bench_recipe.finished_run(done.stdout, tmp_path) == tmp_path / "model/k f"  # a space survives the quoting
    folds = [json.loads((tmp_path / f"model/k f/fold{k}/config.json").read_text())["train_images"] for k in (0, 1)]
    assert bench_recipe.images_trained(tmp_path / "model/k f") == sum(folds) > max(folds)  # one epoch each


def test_bench_recipe_finds_a_backbone_file_given_relative_to_where_it_was_started(demo_root, tmp_path):
    """The runs start in the model folder: `--backbone bench/recipe_backbones.py:Narrow` (README, issue 23's
    table) is made absolute first, and the run records that file."""
    done = subprocess.run(
        [sys.executable, "bench/bench_recipe.py", "--data", str(demo_root), "--model_dir", str(tmp_path), "--",
         "--epochs", "1", "--resize", "32", "24", "--num_workers", "0",
         "--backbone", "bench/recipe_backbones.py:Narrow"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    config = json.loads((tmp_path / "model/recipe_seed42/config.json").read_text())
    assert config["backbone"] == f"{ROOT / 'bench/recipe_backbones.py'}:Narrow"


def test_task_metrics_match_a_hand_computed_example():
    data = dataset.MaskBaseDataset.__new__(dataset.MaskBaseDataset)  # only its class names are needed
    data.class_names = labels.mask_class_names()
    enc = labels.encode
    targets = np.array([enc(0, 0, 0), enc(0, 1, 2), enc(1, 0, 1), enc(2, 1, 0)])
    preds = np.array([enc(0, 0, 0), enc(0, 0, 2), enc(1, 0, 0), enc(0, 1, 0)])
    # mask right 3/4 (the last one), gender right 3/4 (the second), age right 3/4 (the third)
    metrics = report.task_metrics(data, targets, preds, worst=2)
    assert metrics["val_mask_acc"] == pytest.approx(0.75)
    assert metrics["val_gender_acc"] == pytest.approx(0.75)
    assert metrics["val_age_acc"] == pytest.approx(0.75)
    # class enc(0,0,0) is predicted right once and also predicted for nothing else: F1 1; the three others 0.
    names = data.class_names
    assert metrics["val_worst"] == f"{names[enc(0, 1, 2)]} 0.00, {names[enc(1, 0, 1)]} 0.00"
