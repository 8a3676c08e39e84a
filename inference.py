"""Predict the images of eval/info.csv with a trained run and write the submission `{output_dir}/output.csv`.

    python inference.py                                     # newest run under ./model, its eval data
    python inference.py --model_dir model/exp3 --data_dir /data/eval --output_dir output
    SM_CHANNEL_MODEL=model/exp3 SM_CHANNEL_EVAL=/data/eval python inference.py --checkpoint last

The model and its eval transform are rebuilt from the run's config.json: no training flag is repeated.
"""

from __future__ import annotations

import argparse
import functools
import json
import tempfile
from argparse import Namespace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

import augmentation as augmentation_module
import cache as cache_module
import dataset as dataset_module
import model as model_module
import utils
from utils import UserError

DEFAULT_EVAL_DIR = "/opt/ml/input/data/eval"  # the competition server's layout


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=utils.HelpFormatter)
    p.add_argument(
        "--model_dir",
        default=utils.env_value("SM_CHANNEL_MODEL"),
        help="run directory written by train.py [$SM_CHANNEL_MODEL; when unset: the newest run under "
        "$SM_MODEL_DIR or ./model]",
    )
    p.add_argument(
        "--data_dir",
        default=utils.env_value("SM_CHANNEL_EVAL"),
        help=f"eval folder with info.csv and images/ [$SM_CHANNEL_EVAL; when unset: {DEFAULT_EVAL_DIR} "
        "if it exists, else the eval folder next to the run's training data]",
    )
    p.add_argument(
        "--output_dir",
        default=utils.env_value("SM_OUTPUT_DATA_DIR", "./output"),
        help="where output.csv is written [$SM_OUTPUT_DATA_DIR]",
    )
    p.add_argument("--checkpoint", choices=("best", "last"), default="best", help="which checkpoint of the run")
    p.add_argument("--batch_size", type=int, default=256, help="images per batch")
    p.add_argument(
        "--resize",
        type=int,
        nargs=2,
        default=None,
        metavar=("H", "W"),
        help="only checked: must equal the run's training size when given",
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument(
        "--num_workers",
        type=int,
        default=int(utils.env_value("NUM_WORKERS", utils.default_num_workers())),
        help="data loader processes [$NUM_WORKERS]",
    )
    return p


def resolve_run_dir(model_dir: str | None) -> Path:
    """The given run directory, else the most recently trained run under $SM_MODEL_DIR or ./model."""
    if model_dir:
        run = Path(model_dir)
        if not (run / "config.json").is_file():
            raise UserError(f"--model_dir {run} has no config.json: pass a run directory written by train.py")
        return run
    root = Path(utils.env_value("SM_MODEL_DIR", "./model"))
    runs = sorted(root.glob("*/best.pth"), key=lambda p: p.stat().st_mtime)
    if not runs:
        raise UserError(f"no trained run found under {root}: run python train.py first, or pass --model_dir")
    print(f"Using the newest run: {runs[-1].parent}")
    return runs[-1].parent


def resolve_eval_dir(data_dir: str | None, config: dict[str, Any]) -> Path:
    """The given eval folder, else the competition default, else `eval/` beside the run's `train/images`."""
    if data_dir:
        return Path(data_dir)
    if Path(DEFAULT_EVAL_DIR).is_dir():
        return Path(DEFAULT_EVAL_DIR)
    sibling = Path(config["data_dir"]).parent.parent / "eval"
    if (sibling / "info.csv").is_file():
        return sibling
    raise UserError("no eval data: pass --data_dir (a folder with info.csv and images/) or set SM_CHANNEL_EVAL")


def load_run(run_dir: Path, checkpoint: str, device: torch.device) -> tuple[dict[str, Any], torch.nn.Module]:
    """The run's config and its model with the chosen checkpoint's weights, in eval mode."""
    try:
        config = json.loads((run_dir / "config.json").read_text())
        config["model"], config["num_classes"], config["augmentation"]  # noqa: B018 - what inference needs
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise UserError(
            f"{run_dir / 'config.json'} is damaged ({type(e).__name__}: {e}); retrain or restore it"
        ) from None
    model = model_module.build_model(config["model"], config["num_classes"])
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
    return config, model.to(device).eval()


def check_writable(folder: Path) -> None:
    """Fail before any work when the submission could not be written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise UserError(f"--output_dir {folder} cannot be written ({e.strerror}): pass a writable folder") from None


def write_submission(path: Path, image_ids: list[str], preds: np.ndarray, num_classes: int) -> pd.DataFrame:
    """Check the predictions and write `ImageID,ans` atomically, in the order of info.csv."""
    submission = pd.DataFrame({"ImageID": image_ids, "ans": np.asarray(preds, dtype=np.int64)})
    assert len(submission) == len(image_ids), "one prediction per image"
    assert submission["ans"].between(0, num_classes - 1).all(), "predictions are class indices"
    path.parent.mkdir(parents=True, exist_ok=True)
    utils.atomic_write(path, lambda f: submission.to_csv(f, index=False))
    return submission


def main(args: Namespace) -> Path:
    if args.batch_size < 1:
        raise UserError(f"--batch_size {args.batch_size} must be at least 1")
    run_dir = resolve_run_dir(args.model_dir)
    device = utils.select_device(args.device)
    config, model = load_run(run_dir, args.checkpoint, device)
    if args.resize and list(args.resize) != list(config["resize"]):
        raise UserError(
            f"--resize {args.resize[0]} {args.resize[1]} differs from the run's {config['resize'][0]} "
            f"{config['resize'][1]} (height width): drop --resize, the run's size is used"
        )
    eval_dir = resolve_eval_dir(args.data_dir, config)
    output = Path(args.output_dir) / "output.csv"
    check_writable(output.parent)

    aug_cls = utils.find_class(augmentation_module, config["augmentation"], "the run's augmentation")
    aug = aug_cls(resize=config["resize"], mean=config["mean"], std=config["std"])
    test_set = dataset_module.TestDataset(eval_dir, aug.eval_transform, aug.load_size)
    decode = functools.partial(dataset_module.decode_fixed, size=tuple(aug.load_size))
    bad = cache_module.find_unreadable(test_set.image_paths, decode, workers=args.num_workers + 1)
    if bad:
        listing = utils.listing([f"{p} ({r})" for p, r in bad.items()], limit=10, sep="; ")
        raise UserError(
            f"{len(bad)} eval image(s) cannot be read: {listing}. Every image needs a prediction: "
            "restore them from the competition data"
        )
    loader = DataLoader(
        test_set,
        batch_size=args.batch_size,
        shuffle=False,
        num_workers=args.num_workers,
        pin_memory=device.type == "cuda",
    )
    print(f"Predicting {len(test_set)} images of {eval_dir} with {run_dir / (args.checkpoint + '.pth')} on {device}")
    preds = utils.predict(model, loader, device, progress="inference").argmax(1).numpy()

    submission = write_submission(output, test_set.image_ids, preds, config["num_classes"])
    print(f"Wrote {output} ({len(submission)} rows)")
    truth_path = eval_dir / "truth.csv"  # present for the demo data and development sets, never in a competition
    if truth_path.is_file():
        truth = pd.read_csv(truth_path, dtype={"ImageID": str}).set_index("ImageID")["ans"]
        scored = truth.reindex(submission["ImageID"]).to_numpy()
        f1 = utils.macro_f1(scored, submission["ans"].to_numpy(), config["num_classes"])
        print(f"{truth_path} found: macro F1 {f1:.4f}, accuracy {(scored == submission['ans']).mean():.2%}")
    return output


if __name__ == "__main__":
    utils.run_main(main, get_parser().parse_args())
