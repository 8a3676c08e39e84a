"""Datasets, splits, label rules, image decoding and mean/std statistics.

python -c "import dataset; print(len(dataset.MaskSplitByProfileDataset('data/demo/train/images')))"
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset

import utils
from utils import UserError

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png")

# Mean/std of the competition's training images, as the seed baseline used them (RGB, 0..1 scale).
SEED_MEAN, SEED_STD = (0.548, 0.504, 0.479), (0.237, 0.247, 0.246)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

# ---------------------------------------------------------------------------------------------------
# Labels of the mask competition: class = mask * 6 + gender * 3 + age.
MASK_FILES = {f"mask{i}": 0 for i in range(1, 6)} | {"incorrect_mask": 1, "normal": 2}
MASK_NAMES = ("wear", "incorrect", "not wear")
GENDERS = {"male": 0, "female": 1}
GENDER_NAMES = ("male", "female")
DEFAULT_AGE_BOUNDS = (30, 60)


def age_band(age: int, bounds: Sequence[int] = DEFAULT_AGE_BOUNDS) -> int:
    """0 below bounds[0], 1 from bounds[0] to bounds[1] - 1, 2 from bounds[1] on."""
    return int(age >= bounds[0]) + int(age >= bounds[1])


def age_names(bounds: Sequence[int] = DEFAULT_AGE_BOUNDS) -> tuple[str, str, str]:
    return (f"<{bounds[0]}", f"{bounds[0]}-{bounds[1] - 1}", f">={bounds[1]}")


def encode(mask: Any, gender: Any, age: Any) -> Any:
    """18-class label from mask (0-2), gender (0-1) and age band (0-2); works on ints and arrays."""
    return mask * 6 + gender * 3 + age


def decode(label: Any) -> tuple[Any, Any, Any]:
    """(mask, gender, age band) of an 18-class label; works on ints and arrays."""
    return label // 6, (label // 3) % 2, label % 3


def mask_class_names(bounds: Sequence[int] = DEFAULT_AGE_BOUNDS) -> list[str]:
    """The 18 class names, e.g. 'wear/female/<30', in label order."""
    names = []
    for label in range(18):
        m, g, a = decode(label)
        names.append(f"{MASK_NAMES[m]}/{GENDER_NAMES[g]}/{age_names(bounds)[a]}")
    return names


def parse_profile(name: str) -> tuple[str, int, str, int]:
    """(id, gender, race, age) of a person folder `{id}_{gender}_{race}_{age}`; ValueError saying why not."""
    parts = name.split("_")
    if len(parts) != 4:
        raise ValueError("expected {id}_{gender}_{race}_{age}")
    pid, gender, race, age = parts
    if gender.lower() not in GENDERS:
        raise ValueError(f"gender '{gender}' is not male or female")
    if not age.isdigit():
        raise ValueError(f"age '{age}' is not a whole number")
    return pid, GENDERS[gender.lower()], race, int(age)


def is_hidden(path: Path) -> bool:
    """Hidden files and macOS resource forks (`._x.jpg`) are never images."""
    return path.name.startswith(".")


# ---------------------------------------------------------------------------------------------------
# Decoding.
def load_image(path: str | os.PathLike, min_size: Sequence[int] | None = None) -> Image.Image:
    """Open an image as RGB with its EXIF orientation applied.

    With `min_size` (H, W), a JPEG is decoded at the smallest 1/2, 1/4 or 1/8 scale that is still at least
    that large (PIL draft mode): several times faster, and the resize that follows gives the same picture.
    """
    try:
        return _decode(path, min_size)
    except _DECODE_ERRORS as e:
        raise utils.UnreadableImageError(path, str(e) or type(e).__name__) from None


def decode_fixed(path: str | os.PathLike, size: Sequence[int]) -> np.ndarray:
    """`load_image` at exactly `size` (H, W), as an HxWx3 uint8 array: what the caches store and what the
    datasets read when there is no cache, so both give the transforms the same pixels."""
    image = load_image(path, size)
    if image.size != (size[1], size[0]):
        image = image.resize((size[1], size[0]), Image.BILINEAR)
    return np.asarray(image)


_DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def _decode(path: str | os.PathLike, min_size: Sequence[int] | None) -> Image.Image:
    with Image.open(path) as image:
        if min_size is not None and image.format == "JPEG":
            h, w = int(min_size[0]), int(min_size[1])
            if image.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # stored rotated by 90 degrees
                h, w = w, h
            image.draft(image.mode if image.mode == "CMYK" else "RGB", (w, h))
        image = ImageOps.exif_transpose(image)
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            # Transparent areas become white, not whatever colour the hidden pixels happen to hold.
            background = Image.new("RGBA", image.size, (255, 255, 255, 255))
            image = Image.alpha_composite(background, image.convert("RGBA"))
        return image.convert("RGB")


# ---------------------------------------------------------------------------------------------------
# Splits.
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
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise UserError(f"data directory {data_dir} does not exist: pass --data_dir or set SM_CHANNEL_TRAIN")
    rows, bad, missing, extra = [], [], [], []
    for folder in sorted(p for p in data_dir.iterdir() if p.is_dir() and not is_hidden(p)):
        try:
            pid, gender, race, age = parse_profile(folder.name)
        except ValueError as e:
            bad.append(f"{folder.name} ({e})")
            continue
        found: dict[str, Path] = {}
        for path in sorted(folder.iterdir()):
            if is_hidden(path) or path.suffix.lower() not in IMG_EXTENSIONS:
                continue
            stem = path.stem.lower()
            if stem not in MASK_FILES or stem in found:  # e.g. mask6.jpg, or mask1.jpg next to mask1.png
                extra.append(str(path))
                continue
            found[stem] = path
            rows.append((str(path), folder.name, pid, gender, race, age, MASK_FILES[stem], stem))
        if found and len(found) < len(MASK_FILES):
            missing.append(f"{folder.name} ({', '.join(s for s in MASK_FILES if s not in found)})")
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


def _check_train_csv(path: Path, images: pd.DataFrame) -> list[str]:
    """Warnings where the competition's train.csv disagrees with the folders (the folders are what is used)."""
    if not path.is_file():
        return []
    try:
        table = pd.read_csv(path, dtype=str)
    except (OSError, ValueError, pd.errors.ParserError) as e:
        return [f"{path} cannot be read ({e}); labels come from the folder names"]
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
            if str(row["gender"]).lower() != GENDER_NAMES[folders.at[row["path"], "gender"]]
            or str(row["age"]) != str(folders.at[row["path"], "age"])
        ]
        if differ:
            out.append(
                f"{len(differ)} row(s) of {path} disagree with their folder name: {utils.listing(differ)}; "
                "the folder name is used"
            )
    return out


# ---------------------------------------------------------------------------------------------------
# Datasets.
class MaskBaseDataset(Dataset):
    """Mask-competition images split by image: a person's photos land on both sides (leaky validation)."""

    num_classes = 18

    def __init__(
        self,
        data_dir: str | os.PathLike,
        val_ratio: float = 0.2,
        seed: int = 42,
        age_bounds: Sequence[int] = DEFAULT_AGE_BOUNDS,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.val_ratio = val_ratio
        self.seed = seed
        self.age_bounds = tuple(age_bounds)
        self.class_names = mask_class_names(self.age_bounds)
        # Per-instance lists: two datasets never share state.
        self.image_paths: list[Path] = []
        self.persons: list[str] = []  # folder name of each image
        self.groups: list[str] = []  # person id of each image: what a split keeps on one side
        self.mask_labels: list[int] = []
        self.gender_labels: list[int] = []
        self.ages: list[int] = []
        self.setup()

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

    @property
    def labels(self) -> np.ndarray:
        """The 18-class label of every image."""
        bands = [age_band(a, self.age_bounds) for a in self.ages]
        return encode(np.asarray(self.mask_labels), np.asarray(self.gender_labels), np.asarray(bands))

    def label_text(self, label: int) -> str:
        return self.class_names[int(label)]

    def remove(self, paths: Collection[str]) -> None:
        """Drop the images at `paths` (e.g. unreadable ones) from every per-image list."""
        keep = [i for i, p in enumerate(self.image_paths) if str(p) not in paths]
        if not keep:
            raise UserError(f"no readable image is left in {self.data_dir}")
        for name in ("image_paths", "persons", "groups", "mask_labels", "gender_labels", "ages"):
            values = getattr(self, name)
            setattr(self, name, [values[i] for i in keep])

    def split_dataset(self) -> tuple[np.ndarray, np.ndarray]:
        """Indices (train, val): a seeded random split of images, stratified by class."""
        return stratified_group_split(np.arange(len(self)), self.labels, self.val_ratio, self.seed)

    def __len__(self) -> int:
        return len(self.image_paths)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return load_image(self.image_paths[index]), int(self.labels[index])


class MaskSplitByProfileDataset(MaskBaseDataset):
    """Mask-competition images split by person, stratified by gender x age (honest validation; the default)."""

    def split_dataset(self) -> tuple[np.ndarray, np.ndarray]:
        """Indices (train, val): all photos of a person on one side, persons stratified by gender x age band."""
        bands = np.asarray([age_band(a, self.age_bounds) for a in self.ages])
        strata = np.asarray(self.gender_labels) * 3 + bands
        return stratified_group_split(self.groups, strata, self.val_ratio, self.seed)


class ImageSubset(Dataset):
    """A view of some of a dataset's images with its own transform (train and validation never share one)."""

    def __init__(
        self,
        dataset: MaskBaseDataset,
        indices: Sequence[int],
        transform: Callable,
        size: Sequence[int],
        cache: Any = None,
    ) -> None:
        self.dataset = dataset
        self.indices = np.asarray(indices, dtype=np.int64)
        self.transform = transform
        self.size = tuple(size)  # (H, W) images are decoded at, before the transform
        self.cache = cache  # cache.RamCache / DiskCache over the dataset's images, or None
        assert cache is None or cache[0].shape[:2] == self.size, "the cache holds images of the size decoded here"
        self.targets = np.asarray(dataset.labels)[self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        j = int(self.indices[i])
        pixels = self.cache[j] if self.cache is not None else decode_fixed(self.dataset.image_paths[j], self.size)
        return self.transform(Image.fromarray(pixels)), int(self.targets[i])


class TestDataset(Dataset):
    """The images of `{eval_dir}/info.csv` (column ImageID) in `{eval_dir}/images`, in the CSV's order."""

    def __init__(
        self, eval_dir: str | os.PathLike, transform: Callable | None = None, size: Sequence[int] | None = None
    ) -> None:
        self.eval_dir = Path(eval_dir)
        info_path = self.eval_dir / "info.csv"
        if not info_path.is_file():
            raise UserError(f"{info_path} does not exist: pass the eval directory (with info.csv) as --data_dir")
        try:
            self.info = pd.read_csv(info_path, dtype={"ImageID": str})
        except (ValueError, UnicodeDecodeError, pd.errors.EmptyDataError) as e:
            raise UserError(f"{info_path} is not a readable CSV ({e}): restore the competition's info.csv") from None
        if "ImageID" not in self.info.columns:
            raise UserError(f"{info_path} has no ImageID column (columns: {', '.join(self.info.columns)})")
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
            image = load_image(self.image_paths[index])
        else:
            image = Image.fromarray(decode_fixed(self.image_paths[index], self.size))
        return (self.transform(image) if self.transform else image), index


def compute_mean_std(
    paths: Sequence[str | os.PathLike], min_size: Sequence[int] | None, max_images: int = 256, seed: int = 0
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std (0..1 scale) over all pixels of a random sample of images.

    The std is that of the pooled pixels, sqrt(E[x^2] - E[x]^2), not an average of per-image stds.
    """
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(paths), size=min(max_images, len(paths)), replace=False)
    total = np.zeros(3)
    total_sq = np.zeros(3)
    count = 0
    for i in chosen:
        pixels = np.asarray(load_image(paths[i], min_size), dtype=np.float64).reshape(-1, 3) / 255.0
        total += pixels.sum(0)
        total_sq += (pixels**2).sum(0)
        count += len(pixels)
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 0.0))
    return tuple(round(float(v), 4) for v in mean), tuple(round(float(v), 4) for v in std)
