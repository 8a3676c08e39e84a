"""The competition toolkit through train.py and inference.py: k-fold with out-of-fold predictions, folder and
CSV data sets end to end, the multi-head model, the weighted sampler and class weights."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

import engine
import utils
from conftest import run_script, tiny_run_args, write_folder_dataset, write_label_csv


def test_fold_all_trains_every_fold_and_writes_complete_out_of_fold_predictions(demo_root, tmp_path):
    done = run_script("train.py", *tiny_run_args(demo_root, "--fold", "all", "--num_workers", "0"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    run = tmp_path / "model/exp"
    assert all((run / f"fold{i}/best.pth").is_file() for i in range(5))
    oof = pd.read_csv(run / "oof.csv")
    images = sorted(str(p) for p in (demo_root / "train/images").glob("*/*.jpg"))
    assert sorted(oof["path"]) == images  # every image exactly once
    assert oof.groupby("group")["fold"].nunique().max() == 1  # a person never straddles folds
    for i in range(5):  # each fold's rows are the validation images of that fold's run
        val = pd.read_csv(run / f"fold{i}/val_predictions.csv")
        assert sorted(val["path"]) == sorted(oof.loc[oof["fold"] == i, "path"])
    printed = float(re.search(r"Out-of-fold macro F1 (\S+)", done.stdout).group(1))
    assert printed == pytest.approx(utils.macro_f1(oof["truth"], oof["pred"], 18), abs=1e-4)
    probs = oof.filter(like="prob_").drop(columns="prob_truth").to_numpy()
    assert np.allclose(probs.sum(1), 1, atol=1e-4)

    inferred = run_script("inference.py", "--model_dir", str(run), "--data_dir", str(demo_root / "eval"), cwd=tmp_path)
    assert inferred.returncode == 0, inferred.stderr
    assert inferred.stdout.count("Predicting") == 5  # the ensemble of the five folds


def test_multi_head_run_trains_and_writes_a_valid_submission(demo_root, tmp_path):
    args = tiny_run_args(demo_root, "--model", "MultiHeadModel", "--task_weights", "1", "2", "2", "--mixup", "0.2")
    trained = run_script("train.py", *args, cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr
    inferred = run_script("inference.py", "--data_dir", str(demo_root / "eval"), cwd=tmp_path)
    assert inferred.returncode == 0, inferred.stderr
    submission = pd.read_csv(tmp_path / "output/output.csv")
    assert len(submission) == 14 and submission["ans"].between(0, 17).all()


def test_folder_per_class_data_trains_and_predicts_with_two_commands(tmp_path):
    write_folder_dataset(tmp_path / "pets")
    trained = run_script(
        "train.py", "--data_dir", str(tmp_path / "pets"), "--dataset", "ImageFolderDataset",
        "--group_pattern", r"^(.+?)_\d+", "--epochs", "2", "--resize", "32", "24", cwd=tmp_path,
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr
    config = pd.read_json(tmp_path / "model/exp/config.json", typ="series")
    assert config["class_names"] == ["cat", "dog"]
    # Not the face defaults: one head on the installed ImageNet weights, a plain resize.
    assert (config["model"], config["augmentation"]) == ("tf_efficientnet_lite0", "BaseAugmentation")
    assert config["weights"]["source"] == "package" and config["mean"] == [0.5, 0.5, 0.5]
    inferred = run_script("inference.py", "--data_dir", str(tmp_path / "pets"), "--ans_format", "name", cwd=tmp_path)
    assert inferred.returncode == 0, inferred.stderr
    submission = pd.read_csv(tmp_path / "output/output.csv")
    assert len(submission) == 24 and set(submission["ans"]) <= {"cat", "dog"}


def test_csv_labelled_data_trains_from_the_csv_file(tmp_path):
    write_folder_dataset(tmp_path / "pets")
    write_label_csv(tmp_path / "pets", tmp_path / "labels.csv")
    trained = run_script(
        "train.py", "--data_dir", str(tmp_path / "labels.csv"), "--dataset", "CSVDataset", "--label_column",
        "species", "--group_column", "scene", "--epochs", "1", "--resize", "32", "24", "--class_weights", cwd=tmp_path,
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr
    config = pd.read_json(tmp_path / "model/exp/config.json", typ="series")
    assert config["class_names"] == ["cat", "dog"] and config["train_images"] + config["val_images"] == 24


def test_weighted_sampler_draws_minority_classes_about_as_often_as_majority_ones():
    targets = np.array([0] * 900 + [1] * 90 + [2] * 10)
    counts = np.bincount(targets)
    sampler = engine.EpochSampler(len(targets), seed=0, weights=1.0 / counts[targets])
    drawn = np.concatenate([targets[list(sampler)] for _ in range(1) for sampler.epoch in range(5)])
    shares = np.bincount(drawn, minlength=3) / len(drawn)
    assert np.allclose(shares, 1 / 3, atol=0.03)
    plain = engine.EpochSampler(len(targets), seed=0)
    assert sorted(plain) == list(range(len(targets)))  # without weights: each image once per epoch


def test_epoch_sampler_partitions_between_processes_and_depends_only_on_seed_and_epoch():
    ranks = [engine.EpochSampler(11, seed=3, rank=r, world_size=2) for r in range(2)]
    for s in ranks:
        s.set_epoch(4)
    both = list(ranks[0]) + list(ranks[1])
    assert len(both) == 12 and set(both) == set(range(11))  # padded by one repeat so each rank has 6
    again = engine.EpochSampler(11, seed=3, rank=0, world_size=2)
    again.set_epoch(4)
    assert list(again) == list(ranks[0])
    again.set_epoch(4, start=2)
    assert list(again) == list(ranks[0])[2:]


def test_class_weights_and_the_weighted_sampler_together_warn_once(capsys, monkeypatch):
    import options
    import train

    options.check_args(train.parse_args(["--class_weights", "--sampler", "weighted"]), train.flag_defaults())
    assert capsys.readouterr().err.count("corrects the class imbalance twice") == 1
    for alone in (["--class_weights"], ["--sampler", "weighted"]):
        options.check_args(train.parse_args(alone), train.flag_defaults())
    monkeypatch.setenv("RANK", "1")  # another torchrun process: rank 0 has said it
    monkeypatch.setenv("WORLD_SIZE", "2")
    options.check_args(train.parse_args(["--class_weights", "--sampler", "weighted"]), train.flag_defaults())
    assert "twice" not in capsys.readouterr().err


def test_class_weights_with_a_criterion_that_takes_none_is_refused(demo_root, tmp_path):
    done = run_script("train.py", *tiny_run_args(demo_root, "--class_weights", "--criterion", "f1"), cwd=tmp_path)
    assert done.returncode == 2
    assert "--class_weights: --criterion f1 takes no class weights" in done.stderr


def test_label_fixes_are_applied_reported_and_saved_and_a_bad_row_names_itself(demo_root, tmp_path):
    person = sorted((demo_root / "train/images").iterdir())[0].name
    pid, gender = person.split("_")[0], person.split("_")[1]
    other = "female" if gender == "male" else "male"
    (tmp_path / "fixes.csv").write_text(f"id,field,value\n{pid},gender,{other}\n")
    done = run_script("train.py", *tiny_run_args(demo_root, "--label_fixes", "fixes.csv"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "Label fixes from fixes.csv: 1 row(s), 7 image label(s) changed" in done.stdout
    config = pd.read_json(tmp_path / "model/exp/config.json", typ="series")
    assert config["label_fix_report"]["changes"] == [[pid, "gender", gender, other]]
    (tmp_path / "bad.csv").write_text(f"id,field,value\n{pid},gender,{other}\n999999,age,40\n")
    bad = run_script("train.py", *tiny_run_args(demo_root, "--label_fixes", "bad.csv"), cwd=tmp_path)
    assert bad.returncode == 2
    assert bad.stderr.startswith("error: --label_fixes bad.csv row 3: id 999999 is not a person")
