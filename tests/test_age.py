"""The age band learnt from the age in years: the ordinal age head, train-time band edges and soft band targets."""

from __future__ import annotations

import itertools
import math
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

import dataset
import engine
import labels
import loss
import model
import rundir
from conftest import run_script, tiny_run_args

COMBINATIONS = list(itertools.product(range(3), range(2), range(3)))  # every (mask, gender, age band)


def ordinal(first: float, second: float, weight: float = 1.0) -> model.OrdinalHead:
    """A 3-band ordinal head on one input feature with the given cut-points: score = weight * x."""
    head = model.OrdinalHead(1, 3)
    with torch.no_grad():
        head.score.weight.fill_(weight)
        head.score.bias.zero_()
        head.first.fill_(first)
        head.gaps.fill_(math.log(math.expm1(second - first)))  # softplus(gaps) = second - first
    return head


def test_ordinal_head_gives_the_hand_computed_probabilities_and_loss():
    head = ordinal(-1.0, 1.0, weight=2.0)
    torch.testing.assert_close(head.cutpoints().detach(), torch.tensor([-1.0, 1.0]))
    out = head(torch.tensor([[0.5]]))  # score 1: P(>= 1) = sigmoid(2), P(>= 2) = sigmoid(0) = 0.5
    p1, p2 = 1 / (1 + math.exp(-2)), 0.5
    expected = torch.tensor([[1 - p1, p1 - p2, p2]])  # 0.1192, 0.3808, 0.5
    torch.testing.assert_close(out.exp(), expected)
    ce = loss.create_criterion("cross_entropy")
    torch.testing.assert_close(ce(out, torch.tensor([1])), torch.tensor(-math.log(p1 - p2)))  # 0.9655
    soft = torch.tensor([[0.0, 0.6, 0.4]])  # as --age_sigma makes for someone near the upper edge
    torch.testing.assert_close(ce(out, soft), torch.tensor(-(0.6 * math.log(p1 - p2) + 0.4 * math.log(p2))))


def test_ordinal_head_is_a_distribution_ordered_by_its_score():
    head = model.OrdinalHead(1, 5)
    with torch.no_grad():
        head.score.weight.fill_(1.0)  # the score is the input
        log_p = head(torch.linspace(-8, 8, 33)[:, None])
    torch.testing.assert_close(log_p.exp().sum(1), torch.ones(33))
    torch.testing.assert_close(F.log_softmax(log_p, 1), log_p)  # its outputs are their own log-softmax
    at_least = log_p.exp().flip(1).cumsum(1).flip(1)  # P(class >= k)
    assert torch.all(at_least[1:] >= at_least[:-1] - 1e-6)  # grows with the score, for every k
    assert torch.all(head.cutpoints().diff() > 0)
    # Untrained, a score of 0 gives every class the same probability.
    with torch.no_grad():
        head.score.weight.zero_(), head.score.bias.zero_()
        torch.testing.assert_close(head(torch.randn(2, 1)).exp(), torch.full((2, 5), 0.2))


def test_ordinal_age_head_decodes_every_combination_to_its_18_class_label():
    net = model.MultiHeadModel(18, **labels.model_kwargs(), age_head="ordinal")
    assert isinstance(net.heads["age"], model.OrdinalHead) and isinstance(net.heads["mask"], torch.nn.Linear)
    width = net.heads["mask"].in_features
    age = net.heads["age"]
    scores = (-8.0, 0.0, 8.0)  # a score inside each band of the cut-points -3, 3
    rows = []
    with torch.no_grad():
        age.first.fill_(-3.0), age.gaps.fill_(math.log(math.expm1(6.0)))
        age.score.weight.zero_()
        for m, g, a in COMBINATIONS:
            age.score.bias.fill_(float(scores[a]))
            mask, gender = torch.full((1, 3), -5.0), torch.full((1, 2), -5.0)
            mask[0, m], gender[0, g] = 5.0, 5.0
            rows.append(torch.cat([mask, gender, age(torch.zeros(1, width))], 1))
    logits = model.to_class_logits(torch.cat(rows), net)
    expected = [labels.encode(m, g, a) for m, g, a in COMBINATIONS]
    assert logits.argmax(1).tolist() == expected and sorted(expected) == list(range(18))
    torch.testing.assert_close(logits.exp().sum(1), torch.ones(18))


def test_age_head_is_recorded_and_old_runs_rebuild_with_a_linear_head():
    config = {"model": "MultiHeadModel", "num_classes": 18, "backbone": None}
    assert isinstance(rundir.build_model(config).heads["age"], torch.nn.Linear)  # a config before --age_head
    assert isinstance(rundir.build_model({**config, "age_head": "ordinal"}).heads["age"], model.OrdinalHead)
    with pytest.raises(model.UserError, match="--age_head is for multi-head models"):
        model.build_model("BaseModel", 18, age_head="ordinal", **labels.model_kwargs())
    with pytest.raises(model.UserError, match="--age_head is for multi-head models"):
        model.build_model("resnet18", 18, age_head="ordinal")


def test_band_probabilities_blur_only_near_the_edges():
    ages = np.arange(0, 101)
    hard = labels.band_probabilities(ages, (30, 60))
    assert hard.argmax(1).tolist() == [labels.age_band(a) for a in ages] and np.all(hard.max(1) == 1)
    soft = labels.band_probabilities(ages, (30, 60), sigma=2.0)
    np.testing.assert_allclose(soft.sum(1), 1, atol=1e-6)
    assert soft.argmax(1).tolist() == [labels.age_band(a) for a in ages]  # the own band keeps the largest share
    # 59: the middle of the year is 59.5, half a year under 60; P(>= 60) = 1 - Phi(0.5 / 2) = 0.40129.
    np.testing.assert_allclose(soft[59], [0.0, 0.59871, 0.40129], atol=1e-5)
    np.testing.assert_allclose(soft[60], [0.0, 0.40129, 0.59871], atol=1e-5)
    np.testing.assert_allclose(soft[45], [0.0, 1.0, 0.0], atol=1e-6)  # 7.5 spreads from both edges


@pytest.fixture
def mask_data_with_59(demo_root, tmp_path):
    """The tiny demo training data with one person renamed to be 59: 30-59 under --age_bounds 30 60."""
    root = tmp_path / "images"
    shutil.copytree(demo_root / "train/images", root)
    first = sorted(p for p in root.iterdir() if p.is_dir())[0]
    pid, gender, race, _ = first.name.split("_")
    first.rename(root / f"{pid}_{gender}_{race}_59")
    return root, pid


def test_train_age_bounds_and_sigma_change_only_what_training_learns(mask_data_with_59):
    root, pid = mask_data_with_59
    plain = dataset.MaskSplitByProfileDataset(root)
    moved = dataset.MaskSplitByProfileDataset(root, train_age_bounds=(30, 58))
    his = np.asarray(plain.groups) == pid
    assert np.array_equal(moved.labels, plain.labels) and moved.class_names == plain.class_names
    assert set(labels.decode(plain.labels[his])[2]) == {1}  # 30-59 for validation and the metric
    assert set(labels.decode(moved.training_targets()[his])[2]) == {2}  # learnt as >=58
    others = ~his & (np.asarray(plain.ages) < 58) | (np.asarray(plain.ages) >= 60)
    assert np.array_equal(moved.training_targets()[others], plain.labels[others])
    assert np.array_equal(moved.split_dataset()[1], plain.split_dataset()[1])  # the same persons validated
    soft = dataset.MaskSplitByProfileDataset(root, age_sigma=2.0).training_targets()
    assert soft.shape == (len(plain), 18) and np.allclose(soft.sum(1), 1)
    assert np.array_equal(soft.argmax(1), plain.labels)
    grid = soft.reshape(-1, 3, 2, 3)
    assert np.array_equal(grid.sum((2, 3)).argmax(1), plain.mask_labels) and np.allclose(grid.sum((2, 3)).max(1), 1)
    np.testing.assert_allclose(grid[his].sum((1, 2))[:, 1:], [[0.59871, 0.40129]] * int(his.sum()), atol=1e-5)


def test_a_run_with_train_age_bounds_validates_and_scores_at_age_bounds(mask_data_with_59, demo_root, tmp_path):
    root, pid = mask_data_with_59
    flags = ["--train_age_bounds", "30", "58", "--age_head", "ordinal", "--fold", "all", "--n_splits", "2"]
    result = run_script("train.py", "--data_dir", str(root), "--epochs", "1", "--resize", "64", "48", *flags,
                        cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr
    run_dir = tmp_path / "model/exp"
    config = rundir.read_config(run_dir)
    assert config["train_age_bounds"] == [30, 58] and config["age_head"] == "ordinal"
    assert config["class_names"] == labels.mask_class_names((30, 60))
    oof = pd.read_csv(run_dir / "oof.csv")
    his = oof[oof["path"].str.contains(f"{pid}_")]
    assert len(his) == 7 and set(his["truth"] % 3) == {1}  # validated as 30-59
    # Each fold trains on its training side's moved bands and validates on the other side's own.
    for fold in (0, 1):
        fold_config = rundir.read_config(run_dir / f"fold{fold}")
        data = dataset.MaskSplitByProfileDataset(root, train_age_bounds=(30, 58))
        split = engine.build_split(fold_config, data, rundir.build_augmentation(fold_config), None, fold,
                                   torch.device("cpu"), 1)  # fmt: skip
        train_his = np.asarray(data.groups)[split.train_set.indices] == pid
        val_his = np.asarray(data.groups)[split.val_set.indices] == pid
        assert train_his.any() != val_his.any()
        assert set(split.train_set.targets[train_his] % 3) <= {2} and set(split.val_set.targets[val_his] % 3) <= {1}
    predicted = run_script("inference.py", "--model_dir", str(run_dir), "--data_dir", str(demo_root / "eval"),
                           cwd=tmp_path)  # fmt: skip
    assert predicted.returncode == 0, predicted.stderr
    submission = pd.read_csv(tmp_path / "output/output.csv")
    assert len(submission) == len(pd.read_csv(demo_root / "eval/info.csv")) and submission["ans"].between(0, 17).all()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--model", "BaseModel", "--age_head", "ordinal"], "--age_head ordinal is for multi-head models"),
        (["--age_head", "cumulative"], "invalid choice: 'cumulative'"),
        (["--train_age_bounds", "58", "30"], "--train_age_bounds 58 30: the first must be below the second"),
        (["--train_age_bounds", "0", "58"], "--train_age_bounds 0 58 must be at least 1"),
        (["--age_sigma", "-1"], "--age_sigma -1 must be 0 (off) or more years"),
        (["--age_sigma", "nan"], "--age_sigma nan must be"),
        (["--age_sigma", "2", "--mixup", "0.2"], "--age_sigma cannot be mixed by --mixup/--cutmix"),
    ],
)
def test_bad_age_flags_exit_2_with_one_line(demo_root, tmp_path, flags, message):
    result = run_script("train.py", *tiny_run_args(demo_root, *flags), cwd=tmp_path)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) <= 2 and not (tmp_path / "model").exists()


@pytest.mark.parametrize("flag", [["--train_age_bounds", "30", "58"], ["--age_sigma", "2"]])
def test_age_flags_on_other_data_are_refused(tmp_path, flag):
    from conftest import write_folder_dataset

    folder = write_folder_dataset(tmp_path / "pets")
    flags = ["--data_dir", str(folder), "--dataset", "ImageFolderDataset", "--epochs", "1", *flag]
    result = run_script("train.py", *flags, cwd=tmp_path)
    assert result.returncode == 2 and f"{flag[0]} is for the mask datasets" in result.stderr, result.stderr


def test_resume_refuses_another_age_head(demo_root, tmp_path):
    first = run_script("train.py", *tiny_run_args(demo_root, "--epochs", "2", "--age_head", "ordinal"), cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    run_dir = tmp_path / "model/exp"
    again = run_script("train.py", "--resume", str(run_dir), "--age_head", "linear", cwd=tmp_path)
    assert again.returncode == 2 and "--age_head linear differs from the run's 'ordinal'" in again.stderr
