"""Validation passes and inference, images/s: read per image (the eval transform on every pass, the way before
issue 21) against made once at the final size (subset.fixed_once, inference.EvalPixels), side by side.

    .venv/bin/python bench/bench_eval.py --data_dir ../shared/data/maskdev/train/images \
        --eval_dir ../shared/data/maskdev/eval
    .venv/bin/python bench/bench_eval.py --workers 2 --repeat 5

Validation: a 20% person split of --data_dir with FaceAugmentation's eval transform at 128x96, its images in the
RAM cache (as train.py holds them); each pass feeds MultiHeadModel (BaseModel backbone) in eval mode; "data only"
iterates the loader alone. Inference: a 2-member ensemble with --tta flip over --eval_dir, from the images on
disk: before, every image decoded to check it, then decoded and transformed again per member; now, decoded once
(the check too) and transformed once. The medians of --repeat runs; one untimed pass first warms the page cache.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from torch.utils.data import DataLoader

import augmentation
import cache as cache_module
import dataset as dataset_module
import demo
import evaldata
import imaging
import inference
import labels
import model as model_module
import predict
import subset as subset_module
import utils

RESIZE = (128, 96)


def get_parser() -> argparse.ArgumentParser:
    p = utils.ArgumentParser(description=__doc__)
    p.add_argument("--data_dir", default=None, help="mask training images (default: a generated demo set)")
    p.add_argument("--eval_dir", default=None, help="eval folder with info.csv (default: the demo set's)")
    p.add_argument("--workers", type=int, default=utils.default_num_workers(), help="loader workers")
    p.add_argument("--repeat", type=int, default=3, help="timed runs per way (the median is printed)")
    return p


def median_time(fn, repeat: int) -> float:
    fn()  # warm: page cache, worker start-up paths, allocator
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def validation(data_dir: Path, workers: int, repeat: int) -> None:
    data = dataset_module.MaskSplitByProfileDataset(data_dir)
    _, val_idx = data.split_dataset()
    aug = augmentation.FaceAugmentation(resize=RESIZE, mean=dataset_module.SEED_MEAN, std=dataset_module.SEED_STD)
    transform, normalize = augmentation.split_for_device(aug.eval_transform)
    decode = functools.partial(imaging.decode_fixed, size=tuple(aug.load_size))
    cache = cache_module.build_cache("ram", [str(p) for p in data.image_paths], aug.load_size, decode, workers + 1)
    per_image = subset_module.ImageSubset(data, val_idx, transform, aug.load_size, cache)
    start = time.perf_counter()
    fixed = subset_module.fixed_once(per_image, transform, workers)
    made = time.perf_counter() - start
    net = model_module.build_model("MultiHeadModel", 18, **labels.model_kwargs()).eval()
    loaders = {
        "per image": DataLoader(per_image, batch_size=256, num_workers=workers, persistent_workers=workers > 0),
        "made once": fixed.batches(256),
    }
    print(f"Validation: {len(per_image)} images of {data_dir}, {workers} workers; made once in {made:.2f}s")
    cpu = torch.device("cpu")
    ways = {
        "data only": lambda loader: [normalize(x) for x, _ in loader],
        "with the model": lambda loader: predict.evaluate(net, loader, cpu, batch_transform=normalize),
    }
    for what, run in ways.items():
        rates = []
        for name, loader in loaders.items():
            seconds = median_time(functools.partial(run, loader), repeat)
            rates.append(len(per_image) / seconds)
            print(f"  {what:15s} {name:10s} {rates[-1]:8.0f} images/s  ({rates[-1] / rates[0]:.2f}x)")


def inference_pass(images: evaldata.EvalImages, aug, workers: int, once: bool) -> None:
    """Two members and flip TTA on the BaseModel multi-head model, as inference.py predicts them."""
    net = model_module.build_model("MultiHeadModel", 18, **labels.model_kwargs()).eval()
    transform, normalize = augmentation.split_for_device(aug.eval_transform)
    config = {"augmentation": "FaceAugmentation", "resize": list(RESIZE)}
    if once:
        pixels = inference.EvalPixels(images, workers)
        pixels.check(aug.load_size)
    else:
        decode = functools.partial(imaging.decode_fixed, size=tuple(aug.load_size))
        cache_module.find_unreadable([str(p) for p in images.image_paths], decode, workers + 1)
    for _ in range(2):
        source = pixels.dataset(aug, config) if once else images.dataset(transform, aug.load_size)
        loader = source.batches(256) if once else DataLoader(source, batch_size=256, num_workers=workers)
        predict.evaluate(
            net, loader, torch.device("cpu"), views=augmentation.tta_views(["flip"]), batch_transform=normalize
        )


def main(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    data_dir, eval_dir = args.data_dir, args.eval_dir
    if data_dir is None or eval_dir is None:
        root = demo.make_demo_data(Path("data/bench_eval"), n_train=60, n_eval=40, seed=3)
        data_dir, eval_dir = data_dir or root / "train/images", eval_dir or root / "eval"
    validation(Path(data_dir), args.workers, args.repeat)
    images = evaldata.find_eval_images(Path(eval_dir), None, {})
    aug = augmentation.FaceAugmentation(resize=RESIZE, mean=dataset_module.SEED_MEAN, std=dataset_module.SEED_STD)
    print(f"Inference: {len(images.image_ids)} images of {eval_dir}, 2 members, --tta flip, {args.workers} workers")
    rates = []
    for name, once in (("before (per member, per image)", False), ("decoded and made once", True)):
        seconds = median_time(lambda once=once: inference_pass(images, aug, args.workers, once), args.repeat)
        rates.append(len(images.image_ids) / seconds)
        print(f"  {name:32s} {rates[-1]:8.0f} images/s  ({rates[-1] / rates[0]:.2f}x)")


if __name__ == "__main__":
    main(get_parser().parse_args())
