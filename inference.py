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
import sys
import tempfile
from argparse import Namespace
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

import augmentation as augmentation_module
import cache as cache_module
import dataset as dataset_module
import devices
import evaldata
import imaging
import predict
import pseudo
import rundir
import settings
import subset
import utils
from utils import UserError

DEFAULT_EVAL_DIR = "/opt/ml/input/data/eval"  # the competition server's layout


def get_parser() -> argparse.ArgumentParser:
    p = utils.ArgumentParser(description=__doc__)
    add_run_flags(p.add_argument_group("runs"))
    add_data_flags(p.add_argument_group("data"))
    add_output_flags(p.add_argument_group("output"))
    add_runtime_flags(p.add_argument_group("runtime"))
    return p


def add_run_flags(g: argparse._ArgumentGroup) -> None:
    g.add_argument(
        "--model_dir",
        nargs="+",
        metavar="RUN",
        default=settings.env_value("SM_CHANNEL_MODEL"),
        help="run directory(ies) written by train.py, or checkpoint files (a best.pth copied anywhere rebuilds its "
        "model alone); a k-fold run directory stands for its fold0/, fold1/, ... runs. Several: their class "
        "probabilities are averaged [$SM_CHANNEL_MODEL (one directory); when "
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
        choices=tuple(augmentation_module.TTA),
        default=["none"],
        help="test-time augmentation; class probabilities are averaged over the views of the given presets: "
        "flip = image + its mirror (2 passes); flip_shift = those + the image moved 5%% of its side up, down, "
        "left, right (6); flip_zoom = image, mirror and both zoomed 10%% on the centre (4)",
    )


def add_data_flags(g: argparse._ArgumentGroup) -> None:
    g.add_argument(
        "--data_dir",
        default=settings.env_value("SM_CHANNEL_EVAL"),
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


def add_output_flags(g: argparse._ArgumentGroup) -> None:
    g.add_argument(
        "--output_dir",
        default=settings.env_value("SM_OUTPUT_DATA_DIR", "./output"),
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


def add_runtime_flags(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--batch_size", type=int, default=256, help="images per batch")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    g.add_argument(
        "--amp",
        choices=("run", "off", "fp16", "bf16"),
        default="run",
        help="precision: run = each run's own --amp on a GPU (bf16 falls back to fp16 where the GPU has no native "
        "bfloat16) and off on a CPU",
    )
    g.add_argument(
        "--num_workers",
        type=int,
        default=settings.env_int("NUM_WORKERS", utils.default_num_workers(), "--num_workers"),
        help="data loader processes [$NUM_WORKERS]",
    )


# ---------------------------------------------------------------------------------------------------
# Eval data in any layout (read by evaldata.find_eval_images).
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
    settings.make_dir(folder, "--output_dir", "SM_OUTPUT_DATA_DIR")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        given = settings.given("--output_dir", folder, "SM_OUTPUT_DATA_DIR")
        raise UserError(f"{given} cannot be written ({e.strerror}): pass a writable folder") from None


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


RANGES: dict[str, settings.Range] = {  # every numeric flag: what it must be (settings.check_ranges)
    "weights": ("0 or more, with a positive sum", lambda v: v >= 0),
    "resize": ("at least 8 pixels", lambda v: v >= 8),
    "batch_size": settings.at_least(1),
    "num_workers": ("0 or more", lambda v: v >= 0),
}


def check_members(args: Namespace) -> list[rundir.Member]:
    # $SM_CHANNEL_MODEL gives one directory; the flag gives a list.
    model_dirs = [args.model_dir] if isinstance(args.model_dir, str) else list(args.model_dir or [])
    if not model_dirs:
        newest = rundir.newest_run(settings.env_value("SM_MODEL_DIR", "./model"))
        print(f"Using the newest run: {newest}")
        model_dirs = [str(newest)]
    members = rundir.resolve_members(model_dirs, args.weights, args.checkpoint, env="SM_CHANNEL_MODEL")
    for m in members:
        if args.resize and list(args.resize) != list(m.config["resize"]):
            raise UserError(
                f"--resize {args.resize[0]} {args.resize[1]} differs from the run's {m.config['resize'][0]} "
                f"{m.config['resize'][1]} (height width) in {m.checkpoint}: drop --resize, the run's size is used"
            )
    return members


class EvalPixels:
    """The eval images decoded once per load size, into a RAM cache that also finds the unreadable ones, and made
    once per eval transform into their final pixels (subset.fixed_once): an ensemble's members and TTA views
    (taken on batches, predict.evaluate) share them. Images too many for the memory are decoded per pass."""

    def __init__(self, images: evaldata.EvalImages, num_workers: int) -> None:
        self.images, self.num_workers = images, num_workers
        self.decoded: dict[tuple[int, ...], Any] = {}
        self.fixed: dict[tuple, Any] = {}

    def check(self, load_size: Sequence[int]) -> Any:
        """The decoded images at `load_size` (None where they do not fit in memory: only checked); a UserError
        listing every unreadable one."""
        size = tuple(load_size)
        if size in self.decoded:
            return self.decoded[size]
        paths = [str(p) for p in self.images.image_paths]
        decode = functools.partial(imaging.decode_fixed, size=size)
        kind = "ram" if cache_module.choose_kind("auto", len(paths), size) == "ram" else "none"
        bad, cache = cache_module.decoded_once(paths, decode, size, kind, self.num_workers + 1, cache_dir="")
        if bad:
            images = self.images
            listing = utils.listing([f"{p} ({r})" for p, r in bad.items()], limit=10, sep="; ")
            fix = (
                "restore them from the competition data"
                if images.competition
                else f"restore them or fix {images.source}"
            )
            raise UserError(
                f"{len(bad)} eval image(s) cannot be read: {listing}. Every image needs a prediction: {fix}"
            )
        self.decoded[size] = cache
        return cache

    def dataset(self, aug: Any, config: dict[str, Any]) -> Dataset:
        """What a member with preset `aug` (its run's `config`) reads: (loader part of its eval transform, index)."""
        transform, _ = augmentation_module.split_for_device(aug.eval_transform)
        key = (config["augmentation"], tuple(config["resize"]), tuple(aug.load_size))
        if key not in self.fixed:
            view = self.images.dataset(transform, aug.load_size, self.check(aug.load_size))
            self.fixed[key] = subset.fixed_once(view, transform, self.num_workers) or view
        return self.fixed[key]


def member_amp(flag: str, config: dict[str, Any], device: torch.device) -> str:
    """The precision a member predicts in: `--amp`, or for `run` its run's own where this device has it."""
    if flag != "run":
        return flag  # checked by main
    amp = config.get("amp", "off") if device.type == "cuda" else "off"
    return "fp16" if amp == "bf16" and not predict.bf16_native(device) else amp


def predict_member(
    model: torch.nn.Module,
    aug: Any,
    pixels: EvalPixels,
    args: Namespace,
    device: torch.device,
    config: dict[str, Any],
) -> np.ndarray:
    """One model's class probabilities for every image, averaged over the TTA views (predict.evaluate), in its
    run's precision and memory layout."""
    _, batch_transform = augmentation_module.split_for_device(aug.eval_transform)
    source = pixels.dataset(aug, config)
    if isinstance(source, subset.FixedPixels):
        loader = source.batches(args.batch_size)
    else:
        loader = DataLoader(
            source, batch_size=args.batch_size, shuffle=False, num_workers=args.num_workers,
            pin_memory=device.type == "cuda",
        )  # fmt: skip
    views = augmentation_module.tta_views(args.tta)
    channels_last = bool(config.get("channels_last")) and device.type == "cuda"
    model = model.to(device, memory_format=torch.channels_last if channels_last else torch.preserve_format)
    result = predict.evaluate(
        model, loader, device, views=views, batch_transform=batch_transform, amp=member_amp(args.amp, config, device),
        channels_last=channels_last, progress="inference",
    )  # fmt: skip
    model.cpu()  # one model on the accelerator at a time
    return result.probs.double().numpy()


def main(args: Namespace) -> Path:
    settings.check_ranges(args, RANGES)
    members = check_members(args)
    config = members[0].config
    images = evaldata.find_eval_images(resolve_eval_dir(args.data_dir, config), args.image_column, config)
    device = devices.select_device(args.device)
    if args.amp != "run":
        predict.check_amp(args.amp, device)
    # Every checkpoint is loaded (on the CPU) before anything is written, so a bad run fails without output.
    used = [m for m in members if m.weight > 0]
    models = [rundir.load_model(m.checkpoint, m.config)[0] for m in used]
    augs = [rundir.build_augmentation(m.config) for m in used]
    output = Path(args.output_dir) / "output.csv"
    check_writable(output.parent)
    pixels = EvalPixels(images, args.num_workers)
    for aug in augs:  # every image decoded (and checked) once per load size, before any model predicts
        pixels.check(aug.load_size)

    probs = np.zeros((len(images.image_ids), config["num_classes"]))
    for m, model, aug in zip(used, models, augs, strict=True):
        share = f", weight {m.weight:.3g}" if len(members) > 1 else ""
        amp = member_amp(args.amp, m.config, device)
        print(
            f"Predicting {len(images.image_ids)} images of {images.source} with {m.checkpoint} on {device} "
            f"({len(augmentation_module.tta_views(args.tta))} TTA view(s), amp {amp}{share})"
        )
        probs += m.weight * predict_member(model, aug, pixels, args, device, m.config)
    preds = probs.argmax(1)

    names = rundir.class_names_of(config)
    ans_names = names if args.ans_format == "name" else None
    submission = write_submission(output, images.image_ids, preds, config["num_classes"], ans_names)
    print(f"Wrote {output} ({len(submission)} rows)")
    if args.save_probs:
        write_probs(output.with_name("probs.csv"), images.image_ids, probs, names)
        pseudo.write_sidecar(
            output.with_name("probs.csv"), images.source, args.image_column, [str(m.checkpoint) for m in used]
        )
        print(f"Wrote {output.with_name('probs.csv')} ({len(names)} class probabilities per image)")
    truth_path = images.source / "truth.csv"  # present for the demo data and development sets, never in a competition
    if images.competition and truth_path.is_file():  # checked after writing: a bad truth.csv keeps the submission
        scored = evaldata.read_truth(truth_path, images.image_ids, config["num_classes"])
        f1 = utils.macro_f1(scored, preds, config["num_classes"])
        print(f"{truth_path} found: macro F1 {f1:.4f}, accuracy {(scored == preds).mean():.2%}")
    return output


if __name__ == "__main__":
    utils.run_main(lambda argv: main(get_parser().parse_args(argv)), sys.argv[1:])  # $NUM_WORKERS's errors too
