"""Pseudo-labels: eval images that an ensemble predicted confidently join the training split (never validation).

    python inference.py --model_dir model/a model/b model/c --save_probs          # output/probs.csv, probs.json
    python train.py --data_dir D --pseudo_labels output/probs.csv --pseudo_threshold 0.9
    python train.py --data_dir D --pseudo_labels output/probs.csv --pseudo_soft     # the probabilities as targets

probs.csv is what `inference.py --save_probs` writes (ImageID, then one column per class name); probs.json beside
it records the folder it predicted, where the images are found (or `--pseudo_dir DIR`). An image whose top
probability reaches --pseudo_threshold is used, with its top class as label (--pseudo_soft: its whole row as a
soft target), at most --pseudo_max_share of the training split's size, the most confident first.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

import evaldata
import settings
import utils
from utils import UserError

SIDECAR = "probs.json"  # beside probs.csv: {"images": the folder inference.py predicted, "image_column": ...}


def write_sidecar(probs_csv: Path, images_source: Path, image_column: str | None, models: Sequence[str]) -> None:
    """What `--pseudo_labels` needs to find the images of probs.csv again (inference.py --save_probs)."""
    record = {"images": str(Path(images_source).resolve()), "image_column": image_column, "models": list(models)}
    utils.save_json(record, probs_csv.with_name(SIDECAR))


def read_probs(path: Path, class_names: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """(ImageIDs, probabilities) of a probs.csv over exactly `class_names`, checked: one line for what is wrong."""
    settings.need(path, False, f"--pseudo_labels {path}", "give the probs.csv of inference.py --save_probs")
    try:
        table = pd.read_csv(path, dtype={"ImageID": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise UserError(f"--pseudo_labels {path} cannot be read as CSV ({utils.reason(e)})") from None
    columns = [c for c in table.columns if c != "ImageID"]
    if "ImageID" not in table.columns or columns != list(class_names):
        missing = [c for c in class_names if c not in columns]
        extra = [c for c in columns if c not in class_names]
        why = (
            f"no column {utils.listing(missing)}" if missing
            else f"columns {utils.listing(extra)} are not classes" if extra
            else "the class columns are in another order" if set(columns) == set(class_names)
            else "no ImageID column"
        )  # fmt: skip
        raise UserError(
            f"--pseudo_labels {path} does not hold this data's {len(class_names)} classes ({why}): use the probs.csv "
            "of runs trained on the same classes"
        )
    probs = table[columns].to_numpy(dtype=np.float64, na_value=np.nan)
    bad = ~np.isfinite(probs).all(1) | (probs < 0).any(1) | (np.abs(probs.sum(1) - 1) > 1e-3)
    if bad.any():
        raise UserError(
            f"--pseudo_labels {path}: {int(bad.sum())} row(s) are not probabilities summing to 1 (first: ImageID "
            f"{table['ImageID'].iloc[int(np.argmax(bad))]}); write it again with inference.py --save_probs"
        )
    if table["ImageID"].duplicated().any():
        twice = table["ImageID"][table["ImageID"].duplicated()].iloc[0]
        raise UserError(f"--pseudo_labels {path} lists ImageID {twice} twice: write it again with --save_probs")
    return table["ImageID"].tolist(), probs


def find_images(path: Path, image_ids: Sequence[str], pseudo_dir: str | None) -> list[Path]:
    """The image file of every ImageID: under --pseudo_dir, else the folder probs.json recorded."""
    sidecar, column = path.with_name(SIDECAR), None
    if pseudo_dir is None:
        if not sidecar.is_file():
            raise UserError(
                f"--pseudo_labels {path}: {sidecar} (the folder it predicted) is missing: pass --pseudo_dir with "
                "the eval folder whose images it lists"
            )
        record = json.loads(sidecar.read_text())
        source, column = Path(record["images"]), record.get("image_column")
    else:
        source = Path(pseudo_dir)
    images = evaldata.find_eval_images(source, column, {})
    where = dict(zip(images.image_ids, images.image_paths, strict=True))
    missing = [i for i in image_ids if i not in where or not Path(where[i]).is_file()]
    if missing:
        raise UserError(
            f"--pseudo_labels {path}: {len(missing)} image(s) are not in {source} (first: {missing[0]}): pass "
            "--pseudo_dir with the folder it was predicted from"
        )
    return [Path(where[i]) for i in image_ids]


def select(probs: np.ndarray, threshold: float, cap: int) -> np.ndarray:
    """Rows whose top probability reaches `threshold`, at most `cap` of them, the most confident first (ties in
    file order), returned in file order."""
    confidence = probs.max(1)
    chosen = np.flatnonzero(confidence >= threshold)
    if len(chosen) > cap:
        chosen = chosen[np.argsort(-confidence[chosen], kind="stable")[:cap]]
    return np.sort(chosen)


class WithPseudoLabels:
    """The training data (`base`) plus pseudo-labelled images: indices past the data's own are the pseudo images,
    which every split and fold adds to its training side; validation is only ever the data's own images."""

    def __init__(self, data: Any, paths: Sequence[Path], probs: np.ndarray, soft: bool) -> None:
        self.base, self.pseudo_paths, self.pseudo_probs, self.soft = data, list(paths), probs, soft

    def __getattr__(self, name: str) -> Any:  # class_names, num_classes, label_fix_report, ... of the data
        return getattr(self.__dict__["base"], name)

    def __len__(self) -> int:
        return len(self.base) + len(self.pseudo_paths)

    @property
    def image_paths(self) -> list[Any]:
        return list(self.base.image_paths) + self.pseudo_paths

    @property
    def labels(self) -> np.ndarray:
        return np.concatenate([np.asarray(self.base.labels), self.pseudo_probs.argmax(1)]).astype(np.int64)

    def training_targets(self) -> np.ndarray:
        """What training learns: the data's own targets, then the pseudo images' top class, or with --pseudo_soft
        (or probabilities from the data, --age_sigma) every image's probabilities (one-hot for a class index)."""
        own, pseudo_probs = np.asarray(self.base.training_targets()), self.pseudo_probs.astype(np.float32)
        if not self.soft and own.ndim == 1:
            return np.concatenate([own, pseudo_probs.argmax(1)]).astype(np.int64)
        eye = np.eye(self.base.num_classes, dtype=np.float32)
        own = own.astype(np.float32) if own.ndim == 2 else eye[own]
        return np.concatenate([own, pseudo_probs if self.soft else eye[pseudo_probs.argmax(1)]])

    def pseudo_indices(self) -> np.ndarray:
        return np.arange(len(self.base), len(self))

    def split_dataset(self, fold: int | None = None, n_splits: int = 5) -> tuple[np.ndarray, np.ndarray]:
        train, val = self.base.split_dataset() if fold is None else self.base.split_dataset(fold, n_splits)
        return np.concatenate([np.asarray(train), self.pseudo_indices()]), np.asarray(val)

    def remove(self, paths: Any) -> None:
        """Unreadable images (--skip_bad_images): the data's own from it, pseudo ones from the pseudo list."""
        paths = {str(p) for p in paths}
        keep = [i for i, p in enumerate(self.pseudo_paths) if str(p) not in paths]
        self.pseudo_paths, self.pseudo_probs = [self.pseudo_paths[i] for i in keep], self.pseudo_probs[keep]
        own = paths & {str(p) for p in self.base.image_paths}
        if own:
            self.base.remove(own)

    def report(self) -> dict[str, int]:
        """Pseudo-labelled images per class (their top class), for the log and config.json."""
        counts = np.bincount(self.pseudo_probs.argmax(1), minlength=self.base.num_classes)
        return {name: int(n) for name, n in zip(self.base.class_names, counts, strict=True) if n}


def add_pseudo_labels(data: Any, args: Any) -> WithPseudoLabels:
    """`data` with the confident rows of --pseudo_labels, capped at --pseudo_max_share of its training split."""
    path = Path(args.pseudo_labels)
    ids, probs = read_probs(path, data.class_names)
    fold = None if args.fold is None else 0 if args.fold == "all" else int(args.fold)
    n_train = len((data.split_dataset() if fold is None else data.split_dataset(fold, args.n_splits))[0])
    chosen = select(probs, args.pseudo_threshold, int(args.pseudo_max_share * n_train))
    paths = find_images(path, [ids[i] for i in chosen], args.pseudo_dir)
    out = WithPseudoLabels(data, paths, probs[chosen], args.pseudo_soft)
    reached = int((probs.max(1) >= args.pseudo_threshold).sum())
    capped = (
        f", capped at {len(chosen)} by --pseudo_max_share {args.pseudo_max_share:g}" if reached > len(chosen) else ""
    )
    per_class = ", ".join(f"{k} {v}" for k, v in out.report().items()) or "none"
    print(
        f"Pseudo-labels: {len(chosen)} of {len(ids)} images of {path} reach --pseudo_threshold "
        f"{args.pseudo_threshold:g}{capped} ({'soft' if args.pseudo_soft else 'hard'} targets; training split "
        f"{n_train} images); per class: {per_class}"
    )
    return out
