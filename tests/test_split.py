"""Splits: persons never straddle train and validation; stratified; deterministic; no replacement."""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
import pytest

import dataset
import splits
from conftest import run_script, tiny_run_args


def _synthetic(n_persons=200, seed=0):
    rng = np.random.default_rng(seed)
    strata = rng.choice(6, size=n_persons, p=[0.3, 0.25, 0.05, 0.2, 0.15, 0.05])
    groups = np.repeat(np.arange(n_persons), 7)
    return groups, np.repeat(strata, 7), strata


@pytest.mark.parametrize("val_ratio", [0.1, 0.2, 0.33])
def test_group_split_is_disjoint_complete_exact_and_stratified(val_ratio):
    groups, item_strata, person_strata = _synthetic()
    train, val = splits.stratified_group_split(groups, item_strata, val_ratio, seed=3)
    assert not set(groups[train]) & set(groups[val])
    assert sorted(np.concatenate([train, val]).tolist()) == list(range(len(groups)))  # each item once
    n_val_persons = len(set(groups[val]))
    assert n_val_persons == round(val_ratio * 200)
    # Every stratum's share of validation persons is within one person of its quota.
    counts = Counter(person_strata.tolist())
    val_counts = Counter(item_strata[val][::7].tolist())
    for level, n in counts.items():
        assert abs(val_counts[level] - n * n_val_persons / 200) < 1


def test_group_split_is_deterministic_and_seed_dependent():
    groups, strata, _ = _synthetic()
    a = splits.stratified_group_split(groups, strata, 0.2, seed=1)
    b = splits.stratified_group_split(groups, strata, 0.2, seed=1)
    c = splits.stratified_group_split(groups, strata, 0.2, seed=2)
    assert np.array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1])


def test_profile_split_keeps_each_person_on_one_side(demo_root):
    data = dataset.MaskSplitByProfileDataset(demo_root / "train/images", val_ratio=0.25, seed=5)
    train, val = data.split_dataset()
    persons = np.asarray(data.persons)
    assert not set(persons[train]) & set(persons[val])
    assert len(set(persons[val])) == 3  # exactly 25% of 12 persons
    assert len(val) == 3 * 7


def test_image_split_is_exact_and_leaks_persons_as_documented(demo_root):
    data = dataset.MaskBaseDataset(demo_root / "train/images", val_ratio=0.25, seed=5)
    train, val = data.split_dataset()
    assert len(val) == round(0.25 * len(data))
    assert len(set(train) | set(val)) == len(data)
    persons = np.asarray(data.persons)
    assert set(persons[train]) & set(persons[val])  # the reason MaskSplitByProfileDataset is the default


def test_classes_validation_has_and_training_lacks_are_named():
    names = [f"c{i}" for i in range(6)]
    assert splits.unlearnt_classes_warning([0, 1, 2, 2], [2, 1, 0, 0], names) == ""
    line = splits.unlearnt_classes_warning([0], [0, 1, 3, 4, 5, 5], names)
    assert line.startswith("warning: 4 class(es) in validation have no training image (c1, c3, c4 and 1 more)")
    assert "lower --val_ratio" in line


def test_a_split_that_leaves_classes_out_of_training_warns(demo_root, tmp_path):
    """--val_ratio 0.9 of 12 persons trains on one person: three of the 18 classes at most, and the run says so."""
    high = run_script("train.py", *tiny_run_args(demo_root, "--val_ratio", "0.9"), cwd=tmp_path)
    assert high.returncode == 0, high.stderr
    assert re.search(r"^warning: 1[0-9] class\(es\) in validation have no training image \(", high.stderr, re.M)
    usual = run_script("train.py", *tiny_run_args(demo_root, "--name", "usual"), cwd=tmp_path)
    assert usual.returncode == 0 and "no training image" not in usual.stderr
