"""Training datasets and their splits (holdout and k-fold); the eval data inference.py reads lives in evaldata.py,
the mask competition's label rules in labels.py, the splits in splits.py, image decoding in imaging.py.

python -c "import dataset; print(len(dataset.MaskSplitByProfileDataset('data/demo/train/images')))"
python -c "import dataset; d = dataset.ImageFolderDataset('data/flowers'); print(d.class_names, d.fold_ids(5))"
python -c "import dataset; print(dataset.CSVDataset('data/labels.csv', label_column='species').class_names)"
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image
from torch.utils.data import Dataset

import imaging
import labels
import settings
import splits
import utils
from utils import UserError

# What counts as an image file, by extension in any case (the formats PIL reads that datasets ship in).
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".ppm", ".pgm", ".tif", ".tiff", ".webp")

# Mean/std of the competition's training images, as the seed baseline used them (RGB, 0..1 scale).
SEED_MEAN, SEED_STD = (0.548, 0.504, 0.479), (0.237, 0.247, 0.246)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def is_hidden(path: Path, root: Path | None = None) -> bool:
    """Whether `path`, or a folder between `root` and it, is hidden: hidden files and macOS resource forks
    (`._x.jpg`) are never data."""
    parts = path.relative_to(root).parts if root is not None else (path.name,)
    return any(part.startswith(".") for part in parts)


def is_image(path: Path, root: Path | None = None) -> bool:
    """Whether the file `path` is an image: an IMG_EXTENSIONS extension in any case and not hidden (see `is_hidden`).
    The one rule of every dataset here and of inference's folders of images."""
    return path.suffix.lower() in IMG_EXTENSIONS and not is_hidden(path, root)


# ---------------------------------------------------------------------------------------------------
# Indexing the competition layout.
@dataclass
class MaskIndex:
    """What `index_mask_folder` found: one row per image, folders that do not parse, and warnings."""

    images: pd.DataFrame  # path, person (folder name), id, gender, race, age, mask, stem
    bad_folders: list[str] = field(default_factory=list)  # "name (why)"
    warnings: list[str] = field(default_factory=list)  # one line each, naming the path and what was done


def index_mask_folder(data_dir: str | os.PathLike) -> MaskIndex:
    """Index `{data_dir}/{id}_{gender}_{race}_{age}/{mask1..5,incorrect_mask,normal}.{jpg,jpeg,png}`.

    Extensions in any case; hidden files, `._*` forks and other names are skipped. Reports (never raises for)
    folders whose names do not parse; warns about persons with missing or extra shots, ids used by two
    folders (kept on one side of every split) and a `train.csv` beside the folder that disagrees with it.
    """
    data_dir = settings.need(data_dir, True, f"data directory {data_dir}", "pass --data_dir or set SM_CHANNEL_TRAIN")
    check_layout_level(data_dir)
    rows, bad, missing, extra = [], [], [], []
    for folder in sorted(p for p in data_dir.iterdir() if p.is_dir() and not is_hidden(p)):
        try:
            pid, gender, race, age = labels.parse_profile(folder.name)
        except ValueError as e:
            bad.append(f"{folder.name} ({e})")
            continue
        found: dict[str, Path] = {}
        for path in sorted(folder.iterdir()):
            if not is_image(path):
                continue
            stem = path.stem.lower()
            if stem not in labels.MASK_FILES or stem in found:  # e.g. mask6.jpg, or mask1.jpg next to mask1.png
                extra.append(str(path))
                continue
            found[stem] = path
            rows.append((str(path), folder.name, pid, gender, race, age, labels.MASK_FILES[stem], stem))
        if found and len(found) < len(labels.MASK_FILES):
            missing.append(f"{folder.name} ({', '.join(s for s in labels.MASK_FILES if s not in found)})")
    images = pd.DataFrame(rows, columns=["path", "person", "id", "gender", "race", "age", "mask", "stem"])
    if images.empty and not bad:
        raise UserError(
            f"no images found in {data_dir}: expected {{id}}_{{gender}}_{{race}}_{{age}}/mask1.jpg ... folders "
            "(pass the train/images directory as --data_dir)"
        )
    warnings = []
    if missing:
        warnings.append(
            f"{len(missing)} person(s) in {data_dir} lack shots: {utils.listing(missing)}; training uses the rest"
        )
    if extra:
        warnings.append(f"{len(extra)} file(s) are not one of the seven shots and are ignored: {utils.listing(extra)}")
    folders_per_id = images.groupby("id")["person"].unique()
    shared = [f"{i} ({', '.join(f)})" for i, f in folders_per_id.items() if len(f) > 1]
    if shared:
        warnings.append(
            f"{len(shared)} id(s) name several folders, kept together in every split: {utils.listing(shared)}"
        )
    warnings += _check_train_csv(data_dir.parent / "train.csv", images)
    return MaskIndex(images, bad, warnings)


def check_layout_level(data_dir: Path) -> None:
    """`--data_dir` one level off in the competition layout (`train/`, `eval/` or the folder above them) is
    named with the folder to pass, instead of asking to rename `images` or `train` as if they were persons."""
    children = {p.name for p in data_dir.iterdir() if p.is_dir() and not is_hidden(p)}
    for name in children:
        with contextlib.suppress(ValueError):
            labels.parse_profile(name)
            return  # some person folder is here: the level is right
    if (data_dir / "info.csv").is_file():
        train = data_dir.parent / "train/images"
        hint = f"; the training images are {train}" if train.is_dir() else ""
        raise UserError(
            f"--data_dir {data_dir} is an eval folder (info.csv): train on the folder of person folders{hint}, and "
            f"give {data_dir} to inference.py --data_dir"
        )
    for below in ("images", "train/images"):
        if below.split("/")[0] in children and (data_dir / below).is_dir():
            raise UserError(f"--data_dir {data_dir} is the folder above the person folders: pass {data_dir / below}")


def _check_train_csv(path: Path, images: pd.DataFrame) -> list[str]:
    """Warnings where the competition's train.csv disagrees with the folders (the folders are what is used)."""
    if not path.is_file():
        return []
    try:
        table = pd.read_csv(path, dtype=str)
    except (OSError, ValueError, pd.errors.ParserError) as e:
        return [f"{path} cannot be read ({utils.reason(e)}); labels come from the folder names"]
    if "path" not in table.columns:
        return [f"{path} has no 'path' column; labels come from the folder names"]
    listed, present = set(table["path"]), set(images["person"])
    out = []
    if listed - present:
        out.append(
            f"{path} lists {len(listed - present)} folder(s) that are not in {path.parent / 'images'}: "
            f"{utils.listing(sorted(listed - present))}"
        )
    if present - listed:
        out.append(
            f"{len(present - listed)} folder(s) are missing from {path}: {utils.listing(sorted(present - listed))}"
        )
    if {"gender", "age"} <= set(table.columns):
        folders = images.drop_duplicates("person").set_index("person")
        differ = [
            row["path"]
            for _, row in table[table["path"].isin(present)].iterrows()
            if str(row["gender"]).lower() != labels.GENDER_NAMES[folders.at[row["path"], "gender"]]
            or str(row["age"]) != str(folders.at[row["path"], "age"])
        ]
        if differ:
            out.append(
                f"{len(differ)} row(s) of {path} disagree with their folder name: {utils.listing(differ)}; "
                "the folder name is used"
            )
    return out


# ---------------------------------------------------------------------------------------------------
# Datasets. Every class indexes its data in `setup()` and offers the same holdout and k-fold splits.
class MaskBaseDataset(Dataset):
    """Mask-competition images; the holdout splits by image, so a person's photos land on both sides (leaky)."""

    num_classes = 18
    # With split "auto", the holdout is by image as in the seed baseline (kept to compare against); k-fold never is.
    image_level_holdout = True

    def __init__(
        self,
        data_dir: str | os.PathLike,
        val_ratio: float = 0.2,
        seed: int = 42,
        age_bounds: Sequence[int] = labels.DEFAULT_AGE_BOUNDS,
        split: str = "auto",
        label_fixes: str | os.PathLike | None = None,
        train_age_bounds: Sequence[int] | None = None,
        age_sigma: float = 0.0,
    ) -> None:
        splits.check_split_args(split)
        self.data_dir = Path(data_dir)
        self.val_ratio = val_ratio
        self.seed = seed
        self.split = split
        self.age_bounds = tuple(age_bounds)
        # What training learns the age band from (validation, splits and metrics keep `age_bounds`).
        self.train_age_bounds = tuple(train_age_bounds or age_bounds)
        self.age_sigma = float(age_sigma)
        self.label_fixes = label_fixes or None
        self.class_names = labels.mask_class_names(self.age_bounds)
        # Per-instance lists: two datasets never share state.
        self.image_paths: list[Path] = []
        self.persons: list[str] = []  # folder name of each image
        self.groups: list[str] = []  # person id of each image: what a split keeps on one side
        self.mask_labels: list[int] = []
        self.gender_labels: list[int] = []
        self.ages: list[int] = []
        self.setup()
        # Fixed here, before any split is made: a person's stratum (gender x age band) follows the fixed labels.
        self.label_fix_report = self.fix_labels(self.label_fixes) if self.label_fixes else None

    def setup(self) -> None:
        """Index the folder (see `index_mask_folder`): stop on folders whose labels cannot be read, warn on the rest."""
        index = index_mask_folder(self.data_dir)
        if index.bad_folders:
            shown = utils.listing(index.bad_folders)
            raise UserError(
                f"{len(index.bad_folders)} folder name(s) in {self.data_dir} do not parse as "
                f"{{id}}_{{gender}}_{{race}}_{{age}}: {shown}. "
                "Rename them (gender male/female, age in years) or move them out"
            )
        for line in index.warnings:
            print(f"warning: {line}", file=sys.stderr)
        images = index.images
        self.image_paths = [Path(p) for p in images["path"]]
        self.persons = images["person"].tolist()
        self.groups = images["id"].tolist()
        self.mask_labels = images["mask"].tolist()
        self.gender_labels = images["gender"].tolist()
        self.ages = images["age"].tolist()

    def fix_labels(self, path: str | os.PathLike) -> dict[str, Any]:
        """Apply a label-fix file (see labels.py): gender and age by person id or path, mask by path only."""
        fields = {
            "gender": labels.FixableField(self.gender_labels, labels.parse_gender, labels.GENDER_NAMES.__getitem__),
            "age": labels.FixableField(self.ages, labels.parse_age),
            "mask": labels.FixableField(
                self.mask_labels, labels.parse_mask, labels.MASK_NAMES.__getitem__, per_image=True
            ),
        }
        return labels.apply_label_fixes(path, fields, self.image_paths, self.data_dir, self.groups, "person")

    @property
    def labels(self) -> np.ndarray:
        """The 18-class label of every image."""
        bands = [labels.age_band(a, self.age_bounds) for a in self.ages]
        return labels.encode(np.asarray(self.mask_labels), np.asarray(self.gender_labels), np.asarray(bands))

    def training_targets(self) -> np.ndarray:
        """What training learns for every image: the 18-class label with the age band cut at `train_age_bounds`
        (the competition's trick: the old band from 58, for training only), or with `age_sigma` (N, 18) class
        probabilities whose age part is `labels.band_probabilities` of the age in years."""
        bands = labels.band_probabilities(self.ages, self.train_age_bounds, self.age_sigma)
        mask, gender = np.asarray(self.mask_labels), np.asarray(self.gender_labels)
        if self.age_sigma <= 0:
            return labels.encode(mask, gender, bands.argmax(1))
        joint = np.zeros((len(self), *labels.TASKS.values()), dtype=np.float32)
        joint[np.arange(len(self)), mask, gender] = bands
        return joint.reshape(len(self), -1)

    def label_text(self, label: int) -> str:
        return self.class_names[int(label)]

    def remove(self, paths: Collection[str]) -> None:
        """Drop the images at `paths` (e.g. unreadable ones) from every per-image list."""
        paths = {str(p) for p in paths}
        keep = [i for i, p in enumerate(self.image_paths) if str(p) not in paths]
        if not keep:
            raise UserError(f"no readable image is left in {self.data_dir}")
        for name in ("image_paths", "persons", "groups", "mask_labels", "gender_labels", "ages"):
            values = getattr(self, name)
            setattr(self, name, [values[i] for i in keep])

    def split_arrays(self, kfold: bool = False) -> tuple[np.ndarray, np.ndarray, str]:
        """(group, stratum) of every image and the groups' name, as `self.split` and the holdout or k-fold ask.

        Grouped splits keep a person's photos together; "both" stratifies persons by gender x age band, which
        also balances the 18 classes because every person has the same seven mask shots.
        """
        split = self.split
        if split == "auto":
            split = "stratified" if self.image_level_holdout and not kfold else "both"
        if split == "stratified":
            return np.arange(len(self)), self.labels, "images"
        bands = np.asarray([labels.age_band(a, self.age_bounds) for a in self.ages], dtype=np.int64)
        strata = np.asarray(self.gender_labels) * 3 + bands if split == "both" else np.zeros_like(bands)
        return np.asarray(self.groups), strata, "persons"

    def fold_ids(self, n_splits: int) -> np.ndarray:
        """Fold (0..n_splits-1) of every image: a stratified group k-fold (see `splits.kfold_ids`, `split_arrays`)."""
        groups, strata, noun = self.split_arrays(kfold=True)
        return splits.kfold_ids(groups, strata, n_splits, self.seed, noun)

    def split_dataset(self, fold: int | None = None, n_splits: int = 5) -> tuple[np.ndarray, np.ndarray]:
        """Indices (train, val): the `val_ratio` holdout, or with `fold` that fold of `fold_ids(n_splits)`."""
        splits.check_split_args(self.split, fold, n_splits)
        if fold is not None:
            return splits.fold_split(self.fold_ids(n_splits), fold)
        groups, strata, _ = self.split_arrays()
        return splits.stratified_group_split(groups, strata, self.val_ratio, self.seed)

    def __len__(self) -> int:
        return len(self.image_paths)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return imaging.load_image(self.image_paths[index]), int(self.labels[index])


class MaskSplitByProfileDataset(MaskBaseDataset):
    """Mask-competition images split by person, stratified by gender x age (honest validation; the default)."""

    image_level_holdout = False


class ImageFolderDataset(Dataset):
    """Any image set in `data_dir/<class>/<image>` folders; `group_pattern` reads a group id from file names."""

    group_flag = "--group_pattern"  # what gives images their groups, for messages
    layout_hint = "pass the folder of class folders as --data_dir"
    image_root: Path | None = None  # the folder image paths are relative to, when not data_dir (CSVDataset's)

    def __init__(
        self,
        data_dir: str | os.PathLike,
        val_ratio: float = 0.2,
        seed: int = 42,
        split: str = "auto",
        group_pattern: str | None = None,
        label_fixes: str | os.PathLike | None = None,
    ) -> None:
        splits.check_split_args(split)
        self.data_dir = Path(data_dir)
        self.val_ratio = val_ratio
        self.seed = seed
        self.split = split
        self.group_pattern = group_pattern or None
        self.label_fixes = label_fixes or None
        self.class_names: list[str] = []
        self.image_paths: list[Path] = []
        self.labels = np.zeros(0, dtype=np.int64)  # class id of each image: its index in class_names
        self.groups: list[str] = []  # group of each image; its own path when no groups are known
        self.has_groups = False
        self.setup()
        # Fixed here, before any split is made: the strata (classes) follow the fixed labels.
        self.label_fix_report = self.fix_labels(self.label_fixes) if self.label_fixes else None
        self.num_classes = len(self.class_names)
        for alike in labels.look_alike_classes(self.class_names):
            shown = ", ".join(repr(n) for n in alike)
            print(
                f"warning: classes {shown} of {self.data_dir} differ only in case, spacing or leading zeros and train "
                f"as {len(alike)} classes; if they are one class, write them alike",
                file=sys.stderr,
            )
        if self.num_classes < 2:
            raise UserError(
                f"{self.data_dir} holds one class only ({self.class_names[0]}): a classifier needs two or more; "
                f"{self.layout_hint}"
            )
        if split in ("grouped", "both") and not self.has_groups:
            raise UserError(f"--split {split} needs a group per image: pass {self.group_flag}")

    def setup(self) -> None:
        """Index the class folders (recursively, hidden files skipped); warn about non-images and empty classes."""
        root = settings.need(
            self.data_dir, True, f"data directory {self.data_dir}", "pass --data_dir (a folder of class folders)"
        )
        others, empty = [], []
        for folder in sorted(p for p in root.iterdir() if p.is_dir() and not is_hidden(p)):
            files = sorted(p for p in folder.rglob("*") if p.is_file() and not is_hidden(p, folder))
            images = [p for p in files if is_image(p, folder)]
            others += [str(p) for p in files if not is_image(p, folder)]
            if not images:
                empty.append(folder.name)
                continue
            self.image_paths += images
            self.labels = np.append(self.labels, np.full(len(images), len(self.class_names)))
            self.class_names.append(folder.name)
        if not self.image_paths:
            raise UserError(
                f"no images found in {root}: expected {root}/<class>/<image> ({', '.join(IMG_EXTENSIONS)}); "
                "pass the folder that holds the class folders as --data_dir"
            )
        if empty:
            print(f"warning: folder(s) with no image are not classes: {utils.listing(empty)}", file=sys.stderr)
        if others:
            print(f"warning: {len(others)} non-image file(s) ignored: {utils.listing(others)}", file=sys.stderr)
        self.groups = self.read_groups() if self.group_pattern else [str(p) for p in self.image_paths]
        self.has_groups = self.group_pattern is not None

    def read_groups(self) -> list[str]:
        """The group id of every image: the first (...) group of `group_pattern` in its file name, else the match."""
        try:
            pattern = re.compile(self.group_pattern)
        except re.error as e:
            raise UserError(f"--group_pattern '{self.group_pattern}' is not a valid regular expression ({e})") from None
        matches = [pattern.search(p.name) for p in self.image_paths]
        unmatched = [p.name for p, m in zip(self.image_paths, matches, strict=True) if m is None]
        if unmatched:
            raise UserError(
                f"--group_pattern '{self.group_pattern}' does not match {len(unmatched)} file name(s): "
                f"{utils.listing(unmatched, 10)}; fix the pattern (its first (...) group is the group id)"
            )
        return [m.group(1) if pattern.groups else m.group(0) for m in matches]

    def training_targets(self) -> np.ndarray:
        """What training learns for every image: its label."""
        return self.labels

    def fix_labels(self, path: str | os.PathLike) -> dict[str, Any]:
        """Apply a label-fix file (see labels.py): field `label`, a class name, by image path or group id."""
        values = self.labels.tolist()
        field = labels.FixableField(values, labels.class_parser(self.class_names), self.class_names.__getitem__)
        root = self.image_root or self.data_dir
        ids = self.groups if self.has_groups else None
        report = labels.apply_label_fixes(
            path, {"label": field}, self.image_paths, root, ids, "group", f"pass {self.group_flag}"
        )
        self.labels = np.asarray(values, dtype=np.int64)
        present = set(values)
        empty = [name for i, name in enumerate(self.class_names) if i not in present]
        if empty:
            print(f"warning: after the label fixes, class(es) {utils.listing(empty)} have no image", file=sys.stderr)
        return report

    label_text = MaskBaseDataset.label_text

    def remove(self, paths: Collection[str]) -> None:
        """Drop the images at `paths` (e.g. unreadable ones) from every per-image list."""
        paths = {str(p) for p in paths}
        keep = [i for i, p in enumerate(self.image_paths) if str(p) not in paths]
        if not keep:
            raise UserError(f"no readable image is left in {self.data_dir}")
        self.image_paths = [self.image_paths[i] for i in keep]
        self.groups = [self.groups[i] for i in keep]
        self.labels = self.labels[keep]

    def split_arrays(self, kfold: bool = False) -> tuple[np.ndarray, np.ndarray, str]:
        """(group, stratum) of every image and the groups' name, as `self.split` asks.

        "stratified" treats every image as a group stratified by class; "grouped" keeps groups whole, unstratified;
        "both" stratifies by class too: the k-fold balances every class's images over the folds, the holdout (one
        stratum per group) takes each group's rarest class.
        """
        split = self.split
        if split == "auto":
            split = "both" if self.has_groups else "stratified"
        if split == "stratified":
            return np.arange(len(self)), self.labels, "images"
        groups = np.asarray(self.groups)
        if split == "grouped":
            return groups, np.zeros(len(self), dtype=np.int64), f"groups ({self.group_flag})"
        strata = self.labels if kfold else splits.rarest_class_strata(groups, self.labels)
        return groups, strata, f"groups ({self.group_flag})"

    # The mask datasets' code, not a copy: it reads only split_arrays(), seed, val_ratio, labels and image_paths.
    fold_ids = MaskBaseDataset.fold_ids
    split_dataset = MaskBaseDataset.split_dataset
    __len__ = MaskBaseDataset.__len__
    __getitem__ = MaskBaseDataset.__getitem__


class CSVDataset(ImageFolderDataset):
    """Images listed in a CSV with a label column (and optionally a group column); paths relative to `image_root`."""

    group_flag = "--group_column"
    layout_hint = "check --label_column"
    IMAGE_COLUMNS = ("path", "image", "file", "filename")  # tried in order when `image_column` is not given

    def __init__(
        self,
        data_dir: str | os.PathLike,
        val_ratio: float = 0.2,
        seed: int = 42,
        split: str = "auto",
        image_column: str | None = None,
        label_column: str = "label",
        group_column: str | None = None,
        image_root: str | os.PathLike | None = None,
        label_fixes: str | os.PathLike | None = None,
    ) -> None:
        self.image_column = image_column or None
        self.label_column = label_column
        self.group_column = group_column or None
        self.image_root = Path(image_root) if image_root else None  # default: the CSV's folder (set by setup)
        super().__init__(data_dir, val_ratio, seed, split, label_fixes=label_fixes)

    def setup(self) -> None:
        """Read the CSV (`data_dir`, or the only CSV in that folder); stop on missing columns or images."""
        path = find_csv(self.data_dir)
        root = self.image_root = self.image_root or path.parent
        settings.need(root, True, f"--image_root {root}", "pass the folder the CSV's paths are relative to")
        columns = {self.label_column: "--label_column", self.group_column: "--group_column"}
        fix = "fix the paths or pass --image_root (the folder they are relative to)"
        table, _, self.image_paths = read_image_csv(path, self.image_column, root, fix, columns)
        values = table[self.label_column].str.strip()
        if (values == "").any():
            rows = [str(i + 2) for i in np.flatnonzero(values == "")]  # line numbers, the header being line 1
            raise UserError(f"{path} has no label ('{self.label_column}') on line(s) {utils.listing(rows, 10)}")
        self.class_names = class_order(values.unique())
        self.labels = values.map({name: i for i, name in enumerate(self.class_names)}).to_numpy(np.int64)
        # A row with no group value is its own group rather than one big group of all such rows.
        groups = table[self.group_column] if self.group_column else pd.Series([""] * len(table))
        self.groups = [g or str(p) for g, p in zip(groups, self.image_paths, strict=True)]
        self.has_groups = self.group_column is not None


def find_csv(path: Path) -> Path:
    """`path` if it is a file, else the only CSV in folder `path` (a SageMaker channel is a folder)."""
    if path.is_file():
        return path
    if not path.is_dir():
        raise UserError(f"CSV file {path} does not exist: pass the labels CSV as --data_dir")
    found = sorted(p for p in path.glob("*.csv") if not is_hidden(p))
    if len(found) != 1:
        names = utils.listing([p.name for p in found]) or "none"
        raise UserError(f"{path} is a folder with {len(found)} CSV files ({names}): pass the labels CSV as --data_dir")
    return found[0]


def read_image_csv(
    path: Path,
    column: str | None = None,
    root: Path | None = None,
    fix: str = "fix the paths (relative to the CSV's folder) or restore the images",
    columns: dict[str | None, str] | None = None,
) -> tuple[pd.DataFrame, str, list[Path]]:
    """(table, image column, image paths) of a CSV file that lists images, one per row in the file's order: the
    CSVDataset's and inference's reader. The image column is `column`, else the first of CSVDataset.IMAGE_COLUMNS
    in the file; paths are relative to `root` (default: the CSV's folder), absolute ones stay as they are.

    Every cell is read as text, none as NaN: labels and ids are names, "NA" and "007" included. A `UserError` names
    the file when it cannot be read, lacks the image column or one of `columns` ({column: its flag}; None: not
    asked for), has no rows or an empty path, or lists images that are not files (`fix` says what to do).
    """
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (ValueError, UnicodeDecodeError) as e:  # pandas' parser and empty-file errors are ValueErrors
        raise UserError(
            f"{path} is not a readable CSV file ({utils.reason(e)}): pass a CSV file with a header row"
        ) from None
    names = ", ".join(map(str, table.columns))
    tried = [column] if column else list(CSVDataset.IMAGE_COLUMNS)
    image_column = next((c for c in tried if c in table.columns), None)
    if image_column is None:
        raise UserError(
            f"{path} has no {' or '.join(repr(c) for c in tried)} column (columns: {names}): pass --image_column "
            "with the column of image paths"
        )
    for other, flag in (columns or {}).items():
        if other is not None and other not in table.columns:
            raise UserError(f"{path} has no column '{other}' ({flag}); its columns: {names}")
    if table.empty:
        raise UserError(f"no images found: {path} has no rows")
    empty = [str(i + 2) for i in np.flatnonzero(table[image_column] == "")]  # line numbers, the header being line 1
    if empty:
        raise UserError(
            f"{path} has no image path ('{image_column}') on line(s) {utils.listing(empty, 10)}: every row needs one"
        )
    root = root or path.parent
    paths = [root / p for p in table[image_column]]
    missing = [p for p, full in zip(table[image_column], paths, strict=True) if not full.is_file()]
    if missing:
        raise UserError(
            f"{len(missing)} image(s) listed in {path} are not files under {root}: {utils.listing(missing, 10)}; {fix}"
        )
    return table, image_column, paths


def class_order(values: Sequence[str]) -> list[str]:
    """Class names sorted: as numbers when every label is a whole number (so 2 comes before 10), else as text."""
    if all(re.fullmatch(r"[+-]?\d+", v) for v in values):
        return sorted(values, key=lambda v: (int(v), v))
    return sorted(values)


def is_mask_data(data: Any) -> bool:
    """The mask competition's data (its three tasks), also under a wrapper that keeps it as `base` (pseudo.py)."""
    return isinstance(getattr(data, "base", data), MaskBaseDataset)
