"""Holdout and k-fold splits that keep groups (a person, a source photo) on one side and balance strata (the
gender x age band of a person, the class of an image). dataset.py's classes call these.

    python -c "import splits; print(splits.stratified_group_split([0, 0, 1, 1, 2, 2], [0, 0, 1, 1, 0, 0], 0.34, 0))"
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

import utils
from utils import UserError

# Split choices of every dataset class; "auto" is "both" when a group per image is known, else "stratified".
SPLITS = ("auto", "stratified", "grouped", "both")


def stratified_group_split(
    groups: Sequence[Any], strata: Sequence[Any], val_ratio: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, val) of items such that every group lies on one side.

    Exactly round(val_ratio * number of groups) groups go to validation (at least one, never all), shared
    out over the strata (one stratum per group, e.g. the person's gender x age class) in proportion to their
    size by largest remainder. Deterministic for a seed; every item appears exactly once.
    """
    groups = np.asarray(groups)
    uniq, first, inverse = np.unique(groups, return_index=True, return_inverse=True)
    group_strata = np.asarray(strata)[first]
    n_groups = len(uniq)
    if n_groups < 2:
        raise UserError(f"a split needs at least 2 persons/groups, found {n_groups}: add data or lower --val_ratio")
    n_val = min(max(1, round(val_ratio * n_groups)), n_groups - 1)

    rng = np.random.default_rng(seed)
    levels, counts = np.unique(group_strata, return_counts=True)
    quota = counts * n_val / n_groups
    take = np.floor(quota).astype(int)
    # Largest remainders get the leftover places; ties broken at random so no stratum is always favoured.
    order = np.lexsort((rng.random(len(levels)), -(quota - take)))
    take[order[: n_val - take.sum()]] += 1

    val_groups = []
    for level, k in zip(levels, take, strict=True):
        members = np.flatnonzero(group_strata == level)
        val_groups.extend(rng.permutation(members)[:k])
    is_val = np.zeros(n_groups, dtype=bool)
    is_val[val_groups] = True
    item_is_val = is_val[inverse]
    return np.flatnonzero(~item_is_val), np.flatnonzero(item_is_val)


def kfold_ids(groups: Sequence[Any], strata: Sequence[Any], n_splits: int, seed: int, noun: str) -> np.ndarray:
    """Fold (0..n_splits-1) of every item: scikit-learn's StratifiedGroupKFold, shuffled with `seed`.

    A group never straddles folds; groups are dealt out greedily so every fold gets about the same number of
    items of each stratum (with persons of seven photos, each stratum's persons within one of even).
    `noun` names the groups in the error for too few of them.
    """
    # Imported here: sklearn takes about a second to import, and spawned loader workers re-import this module.
    from sklearn.model_selection import StratifiedGroupKFold

    groups, strata = np.asarray(groups), np.asarray(strata)
    if n_splits < 2:
        raise UserError(f"--n_splits {n_splits}: k-fold needs at least 2 folds")
    n_groups = len(np.unique(groups))
    if n_groups < n_splits:
        raise UserError(
            f"--n_splits {n_splits} needs at least {n_splits} {noun}; found {n_groups}: lower --n_splits or add data"
        )
    if (np.unique(strata, return_counts=True)[1] < n_splits).all():
        strata = np.zeros(len(groups), dtype=np.int64)  # sklearn refuses, and no stratum could reach every fold
    folds = np.empty(len(groups), dtype=np.int64)
    kfold = StratifiedGroupKFold(n_splits, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        # "The least populated class has fewer members than n_splits": expected for rare strata, and harmless.
        warnings.simplefilter("ignore", UserWarning)
        for k, (_, val) in enumerate(kfold.split(np.zeros(len(groups)), strata, groups)):
            folds[val] = k
    return folds


def fold_split(folds: np.ndarray, fold: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, val) where validation is fold `fold` of `folds` (as made by `kfold_ids`)."""
    return np.flatnonzero(folds != fold), np.flatnonzero(folds == fold)


def check_split_args(split: str, fold: int | None = None, n_splits: int = 5) -> None:
    """Stop on a `split` name or a fold number that does not exist."""
    if split not in SPLITS:
        raise UserError(utils.unknown_name_message("--split", split, SPLITS))
    if fold is not None and not 0 <= fold < n_splits:
        raise UserError(f"--fold {fold} does not exist with --n_splits {n_splits}: use 0 to {n_splits - 1}")


def rarest_class_strata(groups: Sequence[Any], labels: np.ndarray) -> np.ndarray:
    """Per item, the rarest class (over the whole data set) in its group: the group's one stratum in a grouped
    holdout, so the few groups that hold a rare class are shared out between train and validation."""
    labels = np.asarray(labels, dtype=np.int64)
    _, inverse = np.unique(np.asarray(groups), return_inverse=True)
    n_classes = int(labels.max()) + 1
    key = np.bincount(labels, minlength=n_classes)[labels] * n_classes + labels  # by rarity, ties by class id
    best = np.full(inverse.max() + 1, np.iinfo(np.int64).max)
    np.minimum.at(best, inverse, key)
    return best[inverse] % n_classes


def unlearnt_classes_warning(train_labels: Sequence[int], val_labels: Sequence[int], class_names: Sequence[str]) -> str:
    """A warning line when validation holds classes the training split has no image of (a high --val_ratio, a
    small data set, a fold of a rare class), or '' when training sees every class validation asks for."""
    missing = sorted(set(np.asarray(val_labels).tolist()) - set(np.asarray(train_labels).tolist()))
    if not missing:
        return ""
    names = ", ".join(str(class_names[c]) if c < len(class_names) else str(c) for c in missing[:3])
    more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
    return (
        f"warning: {len(missing)} class(es) in validation have no training image ({names}{more}); the model cannot "
        "learn them: lower --val_ratio or --n_splits, or add images of them"
    )


def same_split(
    config: dict[str, Any],
    then: dict[str, Any],
    image_paths: Sequence[Any],
    train_idx: Sequence[int],
    val_idx: Sequence[int],
) -> str:
    """The split's fingerprint for `config`; when `then` (the resumed run's config) has another, a `UserError`: the
    data now splits otherwise (images added, removed or renamed), so its validation persons may have trained."""
    root = Path(config["data_dir"])
    root = root if root.is_dir() else root.parent  # a CSV data set: paths under the CSV's folder
    digest = split_digest(image_paths, train_idx, val_idx, root)
    if then.get("split_digest") not in (None, digest):
        raise UserError(
            f"--resume: the data at {config['data_dir']} splits into other images ({len(train_idx)} train / "
            f"{len(val_idx)} val) than the run trained on at {then.get('data_dir')} "
            f"({then.get('train_images')} / {then.get('val_images')}): resume on that data, or start a new run"
        )
    return digest


def split_digest(image_paths: Sequence[Any], train_idx: Sequence[int], val_idx: Sequence[int], root: Any) -> str:
    """A fingerprint of which images train and which validate, by their paths under `root` (the data may move to
    another folder or server and keep it): a resumed run checks that it continues on the split it began with."""
    digest = hashlib.sha1()
    for side in (train_idx, val_idx):
        names = sorted(os.path.relpath(image_paths[i], root) for i in np.asarray(side).tolist())
        digest.update("\n".join(names).encode() + b"\0")
    return digest.hexdigest()[:16]
