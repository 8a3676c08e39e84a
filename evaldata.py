"""The images inference.py predicts, in submission order: the competition's eval folder (`info.csv` and
`images/`), any folder of images, or a CSV of image paths.

    python inference.py --data_dir /data/eval                 # info.csv order, ImageID,ans
    python inference.py --data_dir /data/photos               # every image under the folder, sorted
    python inference.py --data_dir list.csv --image_column file
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image
from torch.utils.data import Dataset

import dataset
import imaging
import settings
import utils
from utils import UserError


class TestDataset(Dataset):
    """The images of `{eval_dir}/info.csv` (column ImageID) in `{eval_dir}/images`, in the CSV's order."""

    def __init__(
        self, eval_dir: str | os.PathLike, transform: Callable | None = None, size: Sequence[int] | None = None
    ) -> None:
        self.eval_dir = Path(eval_dir)
        info_path = self.eval_dir / "info.csv"
        settings.need(info_path, False, str(info_path), "pass the eval directory (with info.csv) as --data_dir")
        self.info = read_id_table(info_path, (), "restore the competition's info.csv")
        self.image_ids = self.info["ImageID"].tolist()
        self.image_paths = [self.eval_dir / "images" / i for i in self.image_ids]
        missing = [str(p) for p in self.image_paths if not p.is_file()]
        if missing:
            raise UserError(
                f"{len(missing)} ImageID(s) of {info_path} have no image: {utils.listing(missing)}; "
                "every listed image needs a prediction, so restore them"
            )
        self.transform = transform
        self.size = size

    def __len__(self) -> int:
        return len(self.image_paths)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        if self.size is None:
            image = imaging.load_image(self.image_paths[index])
        else:
            image = Image.fromarray(imaging.decode_fixed(self.image_paths[index], self.size))
        return (self.transform(image) if self.transform else image), index


class ImageListDataset(Dataset):
    """Given image paths, in order, decoded at `size` (H, W) and transformed, as TestDataset reads info.csv's;
    read from `cache` (cache.RamCache over the same paths at `size`) when given."""

    def __init__(
        self, image_paths: Sequence[Path], transform: Callable, size: Sequence[int], cache: Any = None
    ) -> None:
        self.image_paths = list(image_paths)
        self.transform = transform
        self.size = tuple(size)
        self.cache = cache

    def __len__(self) -> int:
        return len(self.image_paths)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        pixels = (
            self.cache[index] if self.cache is not None else imaging.decode_fixed(self.image_paths[index], self.size)
        )
        return self.transform(Image.fromarray(pixels)), index


def read_id_table(path: Path, columns: str | Sequence[str], fix: str) -> pd.DataFrame:
    """A CSV keyed by ImageID (info.csv, truth.csv) as strings, checked: readable, with the `columns`, and every
    ImageID present once (a duplicate would give the submission a duplicate row); `fix` ends each message."""
    columns = [columns] if isinstance(columns, str) else list(columns)
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (ValueError, UnicodeDecodeError, OSError) as e:  # pandas' parser and empty-file errors are ValueErrors
        raise UserError(f"{path} is not a readable CSV ({utils.reason(e)}): {fix}") from None
    missing = [c for c in ("ImageID", *columns) if c not in table.columns]
    if missing:
        raise UserError(f"{path} has no {', '.join(missing)} column (columns: {', '.join(table.columns)}): {fix}")
    ids = table["ImageID"]
    if (ids.str.strip() == "").any():
        rows = [str(i + 2) for i in np.flatnonzero(ids.str.strip() == "")]
        raise UserError(f"{path} has rows without an ImageID (lines {utils.listing(rows)}): {fix}")
    duplicated = ids[ids.duplicated()].unique().tolist()
    if duplicated:
        raise UserError(f"{path} lists {len(duplicated)} ImageID(s) twice: {utils.listing(duplicated)}: {fix}")
    return table


def read_truth(path: Path, image_ids: Sequence[str], num_classes: int) -> np.ndarray:
    """The true class (truth.csv's `ans`) of every image of `image_ids`, in that order, checked: every image has
    one, and it is an integer class index the model can predict (0 .. num_classes - 1)."""
    fix = "correct truth.csv (ImageID,ans with integer classes) or remove it to skip scoring"
    truth = read_id_table(path, "ans", fix).set_index("ImageID")["ans"].str.strip()
    absent = [i for i in image_ids if i not in truth.index]
    if absent:
        raise UserError(f"{path} has no label for {len(absent)} image(s) of info.csv: {utils.listing(absent)}; {fix}")
    labels = truth.reindex(list(image_ids))
    as_int = pd.to_numeric(labels, errors="coerce")
    bad = labels[as_int.isna() | (as_int != as_int.round()) | (as_int < 0) | (as_int >= num_classes)]
    if len(bad):
        shown = [f"{i}={v!r}" for i, v in bad.items()]
        raise UserError(
            f"{path}: {len(bad)} label(s) are not classes 0..{num_classes - 1} of the model: {utils.listing(shown)}; "
            f"{fix}"
        )
    return as_int.to_numpy().astype(np.int64)


@dataclass
class EvalImages:
    """The images to predict, in submission order: their ImageIDs, paths, and where they came from."""

    source: Path  # the eval folder, image folder or CSV file
    image_ids: list[str]
    image_paths: list[Path]
    competition: bool  # info.csv layout: read through TestDataset, scored against truth.csv

    def dataset(self, transform: Callable, size: Sequence[int], cache: Any = None) -> Dataset:
        """The images as a dataset of (transformed image, index) at decoding size `size` (H, W), read from `cache`
        (over `image_paths` at that size) when given."""
        return ImageListDataset(self.image_paths, transform, size, cache)


def find_eval_images(path: Path, image_column: str | None, config: dict[str, Any]) -> EvalImages:
    """The images of `path` in the competition layout (info.csv), a folder of images, or a CSV of image paths
    (column `image_column`, else the run's: `config` is its config.json)."""
    if path.is_dir() and ((path / "info.csv").is_file() or (path / "images").is_dir()):
        info = path / "info.csv"  # the competition layout needs its list of images
        fix = (
            f"pass the eval directory (with info.csv) as --data_dir, or {path / 'images'} to predict every image in it"
        )
        settings.need(info, False, str(info), fix)
        test_set = TestDataset(path)
        if not test_set.image_ids:  # a submission of no rows would be a silent zero score
            raise UserError(f"{path / 'info.csv'} lists no images (a header only): restore the competition's info.csv")
        return EvalImages(path, test_set.image_ids, test_set.image_paths, competition=True)
    if path.is_dir():
        paths = sorted(
            (p for p in path.rglob("*") if p.is_file() and dataset.is_image(p, path)), key=lambda p: p.as_posix()
        )
        if not paths:
            raise UserError(
                f"no images ({', '.join(dataset.IMG_EXTENSIONS)}) found under --data_dir {path}: pass an "
                "eval folder with info.csv, a folder of images or a CSV file of image paths"
            )
        return EvalImages(path, [p.relative_to(path).as_posix() for p in paths], paths, competition=False)
    if path.is_file():
        table, column, paths = dataset.read_image_csv(path, image_column or config.get("image_column"))
        return EvalImages(path, table[column].tolist(), paths, competition=False)
    raise UserError(
        f"{settings.given('--data_dir', path, 'SM_CHANNEL_EVAL')} does not exist: pass an eval folder with info.csv, a "
        "folder of images or a CSV file"
    )
