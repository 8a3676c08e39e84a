"""Predict eval images with a trained run, or an ensemble of runs, and write the submission `{output_dir}/output.csv`.

    python inference.py                                     # newest run under ./model, its eval data
    python inference.py --model_dir model/exp3 --data_dir /data/eval --output_dir output
    python inference.py --model_dir model/kfold model/r18 --weights 2 1 --tta flip --save_probs
    SM_CHANNEL_MODEL=model/exp3 SM_CHANNEL_EVAL=/data/eval python inference.py --checkpoint last

Each run's model and eval transform are rebuilt from its config.json: no training flag is repeated. The eval
data is the competition layout (a folder with info.csv and images/), any folder of images (searched
recursively), or a CSV file with a column of image paths.
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import sys
import tempfile
from argparse import Namespace
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

import augmentation as augmentation_module
import cache as cache_module
import dataset as dataset_module
import imaging
import labels
import model as model_module
import utils
from utils import UserError

DEFAULT_EVAL_DIR = "/opt/ml/input/data/eval"  # the competition server's layout
FOLD_DIR = re.compile(r"fold(\d+)")  # fold subdirectories of a k-fold run: fold0, fold1, ...


# ---------------------------------------------------------------------------------------------------
# Test-time augmentation: views of a batch of normalized (N, C, H, W) tensors, after the run's eval transform,
# so they work whatever that transform is. Portrait face photos are left-right symmetric and roughly centred:
# mirrors, small shifts and a slight zoom keep the face whole; vertical flips and rotations would not.
def _shift(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """`x` moved down by `dy` and right by `dx` pixels (negative: up/left); the uncovered edge repeats the border."""
    h, w = x.shape[-2:]
    padded = F.pad(x, (max(dx, 0), max(-dx, 0), max(dy, 0), max(-dy, 0)), mode="replicate")
    top, left = max(-dy, 0), max(-dx, 0)
    return padded[..., top : top + h, left : left + w]


def _step(size: int) -> int:
    return max(1, round(size * 0.05))  # 5% of the side: a few pixels, as far as faces sit off-centre


def _zoom(x: torch.Tensor, scale: float = 1.1) -> torch.Tensor:
    """The central 1/scale of `x`, resized back to its size (the face seen 10% closer)."""
    h, w = x.shape[-2:]
    ch, cw = round(h / scale), round(w / scale)
    top, left = (h - ch) // 2, (w - cw) // 2
    return F.interpolate(x[..., top : top + ch, left : left + cw], size=(h, w), mode="bilinear", align_corners=False)


VIEWS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "identity": lambda x: x,
    "hflip": lambda x: x.flip(-1),
    "up": lambda x: _shift(x, -_step(x.shape[-2]), 0),
    "down": lambda x: _shift(x, _step(x.shape[-2]), 0),
    "left": lambda x: _shift(x, 0, -_step(x.shape[-1])),
    "right": lambda x: _shift(x, 0, _step(x.shape[-1])),
    "zoom": _zoom,
    "zoom_hflip": lambda x: _zoom(x).flip(-1),
}
TTA = {
    "none": ("identity",),
    "flip": ("identity", "hflip"),
    "flip_shift": ("identity", "hflip", "up", "down", "left", "right"),
    "flip_zoom": ("identity", "hflip", "zoom", "zoom_hflip"),
}


def tta_views(presets: Sequence[str]) -> tuple[str, ...]:
    """The views of the `--tta` presets, each once, in order."""
    return tuple(dict.fromkeys(view for preset in presets for view in TTA[preset]))


@torch.no_grad()
def predict_probs(
    model: torch.nn.Module,
    loader: Any,
    device: torch.device,
    views: Sequence[str] = ("identity",),
    progress: str | None = None,
    batch_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """(N, num_classes) class probabilities of every batch `(images, _)` of `loader`, averaged over `views`
    (taken after `batch_transform`, the normalization the loader left to the device)."""
    from tqdm import tqdm

    model.eval()
    out = []
    for images, _ in tqdm(loader, desc=progress, leave=False, disable=progress is None or not sys.stderr.isatty()):
        images = images.to(device, non_blocking=True)
        if batch_transform is not None:
            images = batch_transform(images)
        total = torch.zeros(())
        for name in views:  # one forward pass per view, so the identity view sees exactly the untouched batch
            logits = model_module.to_class_logits(model(VIEWS[name](images)), model).float().cpu()
            total = total + torch.softmax(logits, dim=1)
        out.append(total / len(views))
    return torch.cat(out)


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=utils.HelpFormatter)
    g = p.add_argument_group("runs")
    g.add_argument(
        "--model_dir",
        nargs="+",
        metavar="RUN",
        default=utils.env_value("SM_CHANNEL_MODEL"),
        help="run directory(ies) written by train.py; a k-fold run directory stands for its fold0/, fold1/, ... "
        "runs. Several: their class probabilities are averaged [$SM_CHANNEL_MODEL (one directory); when "
        "unset: the newest run under $SM_MODEL_DIR or ./model]",
    )
    g.add_argument(
        "--weights",
        type=float,
        nargs="+",
        default=None,
        metavar="W",
        help="one weight (>= 0) per --model_dir entry for the probability average; a k-fold directory's weight "
        "is shared equally by its folds; unset: every entry counts the same",
    )
    g.add_argument("--checkpoint", choices=("best", "last"), default="best", help="which checkpoint of each run")
    g.add_argument(
        "--tta",
        nargs="+",
        choices=tuple(TTA),
        default=["none"],
        help="test-time augmentation; class probabilities are averaged over the views of the given presets: "
        "flip = image + its mirror (2 passes); flip_shift = those + the image moved 5%% of its side up, down, "
        "left, right (6); flip_zoom = image, mirror and both zoomed 10%% on the centre (4)",
    )
    g = p.add_argument_group("data")
    g.add_argument(
        "--data_dir",
        default=utils.env_value("SM_CHANNEL_EVAL"),
        help="eval data: a folder with info.csv and images/ (the competition layout), else any folder of images "
        "(searched recursively; ImageID = path inside it) or a CSV file with a column of image paths "
        f"(relative to the CSV's folder) [$SM_CHANNEL_EVAL; when unset: {DEFAULT_EVAL_DIR} if it exists, else "
        "the eval folder next to the run's training data]",
    )
    g.add_argument(
        "--image_column",
        default=None,
        help="column of image paths when --data_dir is a CSV file (default: the run's --image_column, else the "
        f"first of {', '.join(dataset_module.CSVDataset.IMAGE_COLUMNS)} in the CSV)",
    )
    g.add_argument(
        "--resize",
        type=int,
        nargs=2,
        default=None,
        metavar=("H", "W"),
        help="only checked: must equal each run's training size (pixels) when given",
    )
    g = p.add_argument_group("output")
    g.add_argument(
        "--output_dir",
        default=utils.env_value("SM_OUTPUT_DATA_DIR", "./output"),
        help="where output.csv (and probs.csv) are written [$SM_OUTPUT_DATA_DIR]",
    )
    g.add_argument(
        "--ans_format",
        choices=("index", "name"),
        default="index",
        help="what output.csv's ans column holds: the class index (the competition's format) or the class name",
    )
    g.add_argument(
        "--save_probs",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="also write probs.csv: ImageID and one probability column per class name (for later ensembling)",
    )
    g = p.add_argument_group("runtime")
    g.add_argument("--batch_size", type=int, default=256, help="images per batch")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    g.add_argument(
        "--num_workers",
        type=int,
        default=int(utils.env_value("NUM_WORKERS", utils.default_num_workers())),
        help="data loader processes [$NUM_WORKERS]",
    )
    return p


# ---------------------------------------------------------------------------------------------------
# Runs and ensembles.
def fold_dirs(folder: Path) -> list[Path]:
    """The `fold{k}` subdirectories of a k-fold run directory that hold a config.json, by fold number."""
    if not folder.is_dir():
        return []
    folds = [p for p in folder.iterdir() if FOLD_DIR.fullmatch(p.name) and (p / "config.json").is_file()]
    return sorted(folds, key=lambda p: int(p.name[4:]))


def expand_run_dir(model_dir: str) -> list[Path]:
    """The run directories one --model_dir entry stands for: its folds for a k-fold run, else itself."""
    run = Path(model_dir)
    folds = fold_dirs(run)
    if folds:
        return folds
    if not (run / "config.json").is_file():
        raise UserError(
            f"--model_dir {run} has no config.json: pass a run directory written by train.py "
            "(or a k-fold run directory holding fold0/, fold1/, ...)"
        )
    return [run]


def resolve_run_dir(model_dir: str | None) -> Path:
    """The given run directory, else the most recently trained run (or k-fold run) under $SM_MODEL_DIR or ./model."""
    if model_dir:
        return Path(model_dir)
    root = Path(utils.env_value("SM_MODEL_DIR", "./model"))
    found = [(p, p.parent) for p in root.glob("*/best.pth")]
    found += [(p, p.parent.parent) for p in root.glob("*/fold*/best.pth") if FOLD_DIR.fullmatch(p.parent.name)]
    if not found:
        raise UserError(f"no trained run found under {root}: run python train.py first, or pass --model_dir")
    newest = max(found, key=lambda item: item[0].stat().st_mtime)[1]
    print(f"Using the newest run: {newest}")
    return newest


@dataclass
class Member:
    """One run of the ensemble: where it is, its share of the probability average, its config."""

    run_dir: Path
    weight: float
    config: dict[str, Any]


def resolve_members(model_dirs: Sequence[str], weights: Sequence[float] | None) -> list[Member]:
    """Every run of the ensemble with its normalized weight; checks the weights and that the runs share classes."""
    if weights is not None and len(weights) != len(model_dirs):
        raise UserError(
            f"--weights has {len(weights)} value(s) for {len(model_dirs)} --model_dir entr(ies): give one per entry"
        )
    weights = list(weights) if weights is not None else [1.0] * len(model_dirs)
    if any(not np.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise UserError(f"--weights {' '.join(f'{w:g}' for w in weights)}: need numbers >= 0 with a positive sum")
    members = []
    for entry, weight in zip(model_dirs, weights, strict=True):
        runs = expand_run_dir(entry)
        members += [Member(run, weight / len(runs) / sum(weights), read_config(run)) for run in runs]
    first = members[0]
    for other in members[1:]:
        a, b = class_names_of(first.config), class_names_of(other.config)
        if a != b:
            diffs = [f"class {i} is '{x}' vs '{y}'" for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y]
            why = diffs[0] if diffs else f"{len(a)} vs {len(b)} classes"
            raise UserError(
                f"{first.run_dir} and {other.run_dir} predict different classes ({why}): "
                "ensemble only runs trained on the same class_names"
            )
    return members


def read_config(run_dir: Path) -> dict[str, Any]:
    """The run's config.json, checked for what inference needs."""
    try:
        config = json.loads((run_dir / "config.json").read_text())
        config["model"], config["num_classes"], config["augmentation"]  # noqa: B018 - what inference needs
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise UserError(
            f"{run_dir / 'config.json'} is damaged ({type(e).__name__}: {e}); retrain or restore it"
        ) from None
    return config


def load_model(run_dir: Path, config: dict[str, Any], checkpoint: str) -> torch.nn.Module:
    """The run's model with the chosen checkpoint's weights, on the CPU, in eval mode."""
    # A multi-head model also needs its backbone; build_model drops it when None (other models).
    model = model_module.build_model(
        config["model"], config["num_classes"], backbone=config.get("backbone"), **labels.model_kwargs()
    )
    path = run_dir / f"{checkpoint}.pth"
    if not path.is_file():
        raise UserError(f"{path} does not exist: the run did not finish an epoch; pick another --model_dir")
    state = utils.load_checkpoint(path)["model"]
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise UserError(
            f"{path} does not match the model in {run_dir / 'config.json'} ({str(e).splitlines()[1][:200]})"
        ) from None
    return model.eval()


def build_augmentation(config: dict[str, Any]) -> Any:
    """The run's augmentation preset at its training size and normalization (its eval_transform and load_size)."""
    aug_cls = utils.find_class(augmentation_module, config["augmentation"], "the run's augmentation")
    return aug_cls(resize=config["resize"], mean=config["mean"], std=config["std"])


def class_names_of(config: dict[str, Any]) -> list[str]:
    """The run's class names; the class indices as text for a run whose config.json predates class_names."""
    return [str(n) for n in config.get("class_names") or range(config["num_classes"])]


# ---------------------------------------------------------------------------------------------------
# Eval data in any layout (read by dataset.find_eval_images).
def resolve_eval_dir(data_dir: str | None, config: dict[str, Any]) -> Path:
    """The given eval data, else the competition default, else `eval/` beside the run's `train/images`."""
    if data_dir:
        return Path(data_dir)
    if Path(DEFAULT_EVAL_DIR).is_dir():
        return Path(DEFAULT_EVAL_DIR)
    sibling = Path(config["data_dir"]).parent.parent / "eval"
    if (sibling / "info.csv").is_file():
        return sibling
    raise UserError(
        "no eval data: pass --data_dir (a folder with info.csv and images/, a folder of images, or a CSV file of "
        "image paths) or set SM_CHANNEL_EVAL"
    )


# ---------------------------------------------------------------------------------------------------
# Output.
def check_writable(folder: Path) -> None:
    """Fail before any work when the submission could not be written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise UserError(f"--output_dir {folder} cannot be written ({e.strerror}): pass a writable folder") from None


def write_submission(
    path: Path,
    image_ids: list[str],
    preds: np.ndarray,
    num_classes: int,
    class_names: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Check the predictions and write `ImageID,ans` atomically, in the images' order; with `class_names`,
    ans is the class name instead of its index."""
    submission = pd.DataFrame({"ImageID": image_ids, "ans": np.asarray(preds, dtype=np.int64)})
    assert len(submission) == len(image_ids), "one prediction per image"
    assert submission["ans"].between(0, num_classes - 1).all(), "predictions are class indices"
    if class_names is not None:
        submission["ans"] = [class_names[i] for i in submission["ans"]]
    path.parent.mkdir(parents=True, exist_ok=True)
    utils.atomic_write(path, lambda f: submission.to_csv(f, index=False))
    return submission


def write_probs(path: Path, image_ids: list[str], probs: np.ndarray, class_names: Sequence[str]) -> None:
    """`ImageID` and one probability column per class, atomically (float64 text, exact when read back)."""
    assert probs.shape == (len(image_ids), len(class_names)), "one probability per image and class"
    table = pd.DataFrame(probs, columns=list(class_names))
    table.insert(0, "ImageID", image_ids)
    utils.atomic_write(path, lambda f: table.to_csv(f, index=False))


def main(args: Namespace) -> Path:
    if args.batch_size < 1:
        raise UserError(f"--batch_size {args.batch_size} must be at least 1")
    # $SM_CHANNEL_MODEL gives one directory; the flag gives a list.
    model_dirs = [args.model_dir] if isinstance(args.model_dir, str) else list(args.model_dir or [])
    model_dirs = model_dirs or [str(resolve_run_dir(None))]
    members = resolve_members(model_dirs, args.weights)
    for m in members:
        if args.resize and list(args.resize) != list(m.config["resize"]):
            raise UserError(
                f"--resize {args.resize[0]} {args.resize[1]} differs from the run's {m.config['resize'][0]} "
                f"{m.config['resize'][1]} (height width) in {m.run_dir}: drop --resize, the run's size is used"
            )
    config = members[0].config
    images = dataset_module.find_eval_images(resolve_eval_dir(args.data_dir, config), args.image_column, config)
    device = utils.select_device(args.device)
    views = tta_views(args.tta)

    # Every checkpoint is loaded (on the CPU) before anything is written, so a bad run fails without output.
    used = [m for m in members if m.weight > 0]
    models = [load_model(m.run_dir, m.config, args.checkpoint) for m in used]
    augs = [build_augmentation(m.config) for m in used]
    output = Path(args.output_dir) / "output.csv"
    check_writable(output.parent)

    decode = functools.partial(imaging.decode_fixed, size=tuple(augs[0].load_size))
    bad = cache_module.find_unreadable([str(p) for p in images.image_paths], decode, workers=args.num_workers + 1)
    if bad:
        listing = utils.listing([f"{p} ({r})" for p, r in bad.items()], limit=10, sep="; ")
        fix = "restore them from the competition data" if images.competition else f"restore them or fix {images.source}"
        raise UserError(f"{len(bad)} eval image(s) cannot be read: {listing}. Every image needs a prediction: {fix}")

    probs = np.zeros((len(images.image_ids), config["num_classes"]))
    for m, model, aug in zip(used, models, augs, strict=True):
        transform, batch_transform = augmentation_module.split_for_device(aug.eval_transform)
        loader = DataLoader(
            images.dataset(transform, aug.load_size),
            batch_size=args.batch_size,
            shuffle=False,
            num_workers=args.num_workers,
            pin_memory=device.type == "cuda",
        )
        share = f", weight {m.weight:.3g}" if len(members) > 1 else ""
        checkpoint = m.run_dir / f"{args.checkpoint}.pth"
        print(
            f"Predicting {len(images.image_ids)} images of {images.source} with {checkpoint} on {device} "
            f"({len(views)} TTA view(s){share})"
        )
        member_probs = predict_probs(model.to(device), loader, device, views, "inference", batch_transform)
        probs += m.weight * member_probs.double().numpy()
        model.cpu()  # one model on the accelerator at a time
    preds = probs.argmax(1)

    names = class_names_of(config)
    ans_names = names if args.ans_format == "name" else None
    submission = write_submission(output, images.image_ids, preds, config["num_classes"], ans_names)
    print(f"Wrote {output} ({len(submission)} rows)")
    if args.save_probs:
        write_probs(output.with_name("probs.csv"), images.image_ids, probs, names)
        print(f"Wrote {output.with_name('probs.csv')} ({len(names)} class probabilities per image)")
    truth_path = images.source / "truth.csv"  # present for the demo data and development sets, never in a competition
    if images.competition and truth_path.is_file():
        truth = pd.read_csv(truth_path, dtype={"ImageID": str}).set_index("ImageID")["ans"]
        scored = truth.reindex(submission["ImageID"]).to_numpy()
        f1 = utils.macro_f1(scored, preds, config["num_classes"])
        print(f"{truth_path} found: macro F1 {f1:.4f}, accuracy {(scored == preds).mean():.2%}")
    return output


if __name__ == "__main__":
    utils.run_main(main, get_parser().parse_args())
