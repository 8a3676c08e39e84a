"""Loader throughput: the seed baseline's data path against ours (uncached first epoch, then RAM-cached).

    .venv/bin/python bench/bench_data.py                       # 1400 synthetic 384x512 JPEGs, 2 workers
    .venv/bin/python bench/bench_data.py --noise 6             # noisier photos (the demo data's), 44 KiB each
    .venv/bin/python bench/bench_data.py --n 7000 --workers 4 --repeat 5 --no-breakdown
    .venv/bin/python bench/bench_data.py --data_dir /data/train/images     # your own photos instead

Every pipeline reads the same JPEGs in the same order (shuffle off) through DataLoaders with the same settings,
and ends with the same normalized 3x128x96 float32 tensors in the training process:
  a   the seed baseline: PIL open + convert('RGB') at full size, Resize((128, 96)), ToTensor, Normalize;
  b   ours, first epoch, as train.py runs it (--cache auto is ram): the RamCache is built (decode_fixed, JPEG draft
      mode, in --workers + 1 forked processes, at most one per core), then one epoch is read;
  b'  ours with --cache none: the workers decode every image every epoch (decode_fixed);
  c   ours, cached epoch: each batch is one copy out of the RamCache, in the training process (as engine.fit
      reads it: worker processes would only add the hand-over).
Ours is BaseAugmentation's eval transform split as engine.fit splits it (augmentation.split_for_device): the
loader hands over uint8 tensors and the training process normalizes each batch (timed; a GPU would do it).
Workers are persistent and started by one untimed pass, so every pipeline then reads the JPEGs from the OS page
cache, not from the disk; the table gives the median of --repeat timed passes (and of --repeat cache builds).
The breakdown then times each stage alone, in this process.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, default_collate
from torchvision import transforms

import augmentation
import cache as cache_module
import dataset as dataset_module
import demo
import imaging
import loop
import subset as subset_module
import utils

RESIZE = (128, 96)  # (H, W) network input, train.py's default --resize


class SeedBaselineDataset(Dataset):
    """The seed baseline's reading: every image decoded at full size by PIL, then the transform."""

    def __init__(self, paths: Sequence[Path], labels: Sequence[int], transform: Callable) -> None:
        self.paths, self.labels, self.transform = list(paths), list(labels), transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = Image.open(self.paths[index]).convert("RGB")
        return self.transform(image), int(self.labels[index])


class ReadyTensors(Dataset):
    """The same ready tensor for every index: what is left is the loader's own cost (collate, hand-over)."""

    def __init__(self, tensor: torch.Tensor, n: int) -> None:
        self.tensor, self.n = tensor, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.tensor, 0


def make_loader(data: Dataset, args: argparse.Namespace) -> DataLoader:
    """--workers processes, except where engine.make_loader uses none (batches copied out of the RAM cache)."""
    workers = loop.loader_workers(data, args.workers)
    return DataLoader(
        data,
        batch_size=args.batch_size,
        shuffle=False,
        num_workers=workers,
        persistent_workers=workers > 0,
        prefetch_factor=2 if workers > 0 else None,
    )


def images_per_second(
    loader: DataLoader, repeat: int, on_batch: Callable[[torch.Tensor], torch.Tensor] | None = None
) -> tuple[float, float, str]:
    """(median, best) images/s over `repeat` full passes after one untimed pass that starts the workers, and
    the shape and dtype of one image's tensor as the training process receives it; `on_batch` (the device
    part of the transform) is applied to every batch and timed."""
    kind = ""
    for images, _ in loader:
        kind = f"{'x'.join(map(str, images.shape[1:]))} {str(images.dtype).removeprefix('torch.')}"
    rates = []
    for _ in range(repeat):
        start, count = time.perf_counter(), 0
        for images, _ in loader:
            if on_batch is not None:
                images = on_batch(images)
            count += len(images)
        rates.append(count / (time.perf_counter() - start))
    return statistics.median(rates), max(rates), kind


def ms_per_call(fn: Callable[[int], object], n: int, repeat: int = 3) -> float:
    """Best over `repeat` rounds of the mean milliseconds of fn(0), ..., fn(n - 1)."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        for i in range(n):
            fn(i)
        best = min(best, (time.perf_counter() - start) / n)
    return best * 1e3


def breakdown(
    cached: subset_module.ImageSubset,
    paths: Sequence[Path],
    load_size: tuple[int, int],
    seed_transform: transforms.Compose,
    eval_transform: Callable,
    args: argparse.Namespace,
) -> None:
    """Per-image milliseconds of each stage on one core, and what they add up to for each pipeline."""
    paths = paths[:140]
    n = len(paths)
    full = [Image.open(p).convert("RGB") for p in paths]
    arrays = [imaging.decode_fixed(p, load_size) for p in paths]
    small = [Image.fromarray(a) for a in arrays]
    resize = seed_transform.transforms[0]
    w, h = full[0].size
    stages = {  # key: (description, one image's work)
        "full": ("full decode: open + convert('RGB')", lambda i: Image.open(paths[i]).convert("RGB")),
        "resize": (f"seed Resize, {w}x{h} -> {RESIZE[1]}x{RESIZE[0]}", lambda i: resize(full[i])),
        "draft": ("draft decode: decode_fixed", lambda i: imaging.decode_fixed(paths[i], load_size)),
        "read": ("cache row -> Image.fromarray", lambda i: Image.fromarray(arrays[i])),
        "float": (
            "seed ToTensor + Normalize of the decoded image",
            lambda i: seed_transform.transforms[2](seed_transform.transforms[1](small[i])),
        ),
        "uint8": ("to_uint8_tensor of the decoded image", lambda i: augmentation.to_uint8_tensor(small[i])),
    }
    gather = (  # what the cached loader does for each batch: ImageSubset.__getitems__, then the collate
        "RAM cache rows -> a collated batch of 64 (ImageSubset.__getitems__), per image",
        lambda i: default_collate(cached.__getitems__([(i + k) % len(cached) for k in range(64)])),
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a loader worker
    cost = {key: ms_per_call(fn, n) for key, (_, fn) in stages.items()}
    stages["gather"] = gather
    cost["gather"] = ms_per_call(gather[1], n // 10) / 64
    torch.set_num_threads(threads)
    one = argparse.Namespace(batch_size=args.batch_size, workers=1)
    h, w = RESIZE
    for key, dtype in (("hand32", torch.float32), ("hand8", torch.uint8)):
        loader = make_loader(ReadyTensors(torch.zeros(3, h, w, dtype=dtype), 16 * args.batch_size), one)
        cost[key] = 1e3 / images_per_second(loader, 3)[0]
        name = str(dtype).removeprefix("torch.")
        stages[key] = (f"loader hand-over of {name} tensors (1 worker: 1 / images/s)", None)
    print(
        "\nper-image cost of each stage alone, in this process with 1 torch thread as in a worker "
        f"(best of 3 rounds over {n} images, ms):"
    )
    _, device_part = augmentation.split_for_device(eval_transform)
    batch = torch.zeros(args.batch_size, 3, h, w, dtype=torch.uint8)
    cost["norm"] = ms_per_call(lambda i: device_part(batch), 20) / args.batch_size
    stages["norm"] = (f"normalize a uint8 batch, per image ({threads} threads, the training process)", None)
    for key, (description, _) in stages.items():
        print(f"  {description:<66} {cost[key]:6.3f}")
    totals = {
        "a": ("full", "resize", "float", "hand32"),
        "b": ("draft", "gather", "norm"),
        "b'": ("draft", "read", "uint8", "hand8", "norm"),
        "c": ("gather", "norm"),
    }
    cores = len(os.sched_getaffinity(0))
    print(f"  sums, and the images/s they allow if all {cores} cores did nothing else:")
    base = sum(cost[k] for k in totals["a"])
    for pipeline, keys in totals.items():
        ms = sum(cost[k] for k in keys)
        print(
            f"    {pipeline:2} = {' + '.join(keys):<36} {ms:6.3f} ms -> {cores * 1e3 / ms:6.0f} images/s, "
            f"{base / ms:4.1f}x a"
        )


def get_parser() -> argparse.ArgumentParser:
    p = utils.ArgumentParser(description=__doc__)
    data = p.add_argument_group("data")
    data.add_argument("--n", type=int, default=1400, help="images to generate (rounded up to persons of 7) or to read")
    data.add_argument(
        "--data_dir", default=None, help="read the first --n images of this folder of person folders instead"
    )
    data.add_argument(
        "--noise",
        type=float,
        default=1.5,
        help="per-pixel noise std of the synthetic photos: 1.5 makes 16 KiB JPEGs, the size of the real 384x512 "
        "face photos at hand (maskdev); the demo data's 6 makes 44 KiB ones, slower to decode at any scale",
    )
    data.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    data.add_argument("--batch_size", type=int, default=64, help="images per batch")
    timing = p.add_argument_group("timing")
    timing.add_argument("--repeat", type=int, default=3, help="timed passes per pipeline; the median is shown")
    timing.add_argument(
        "--breakdown",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time each stage alone (decode, resize, transform, hand-over)",
    )
    return p


def main(args: argparse.Namespace) -> None:
    if args.n < 1 or args.workers < 0 or args.batch_size < 1 or args.repeat < 1:
        raise SystemExit("--n, --batch_size and --repeat must be at least 1 and --workers at least 0")
    mean, std = dataset_module.SEED_MEAN, dataset_module.SEED_STD
    aug = augmentation.BaseAugmentation(RESIZE, mean, std)
    seed_transform = transforms.Compose(
        [
            transforms.Resize(RESIZE, interpolation=transforms.InterpolationMode.BILINEAR),
            transforms.ToTensor(),
            transforms.Normalize(mean=mean, std=std),
        ]
    )
    load_avg = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        if args.data_dir is None:
            demo.make_demo_data(Path(tmp) / "data", n_train=-(-args.n // 7), n_eval=0, seed=0, noise=args.noise)
            data = dataset_module.MaskSplitByProfileDataset(Path(tmp) / "data/train/images")
            print(
                f"wrote {len(data)} synthetic JPEGs (quality 90, noise {args.noise}) in "
                f"{time.perf_counter() - start:.1f}s"
            )
        else:
            data = dataset_module.MaskSplitByProfileDataset(args.data_dir)
        n = min(args.n, len(data))
        everything = np.arange(n)
        image_paths, labels = data.image_paths[:n], data.labels[:n]
        w, h = Image.open(image_paths[0]).size
        kib = statistics.mean(p.stat().st_size for p in image_paths) / 1024
        print(f"{n} images of {args.data_dir or 'synthetic data'}: {w}x{h} (WxH) JPEGs, {kib:.1f} KiB on average")
        print(
            f"batch {args.batch_size} | {args.workers} workers | torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads | {os.cpu_count()} CPUs | load average {load_avg:.2f} at start"
        )
        results = {}
        seed_set = SeedBaselineDataset(image_paths, labels, seed_transform)
        results["a"] = images_per_second(make_loader(seed_set, args), args.repeat)
        loader_part, device_part = augmentation.split_for_device(aug.eval_transform)
        uncached = subset_module.ImageSubset(data, everything, loader_part, aug.load_size, cache=None)
        results["b'"] = images_per_second(make_loader(uncached, args), args.repeat, device_part)

        decode = functools.partial(imaging.decode_fixed, size=aug.load_size)
        paths = [str(p) for p in image_paths]
        builds = []
        for _ in range(args.repeat):
            start = time.perf_counter()
            ram = cache_module.RamCache(paths, aug.load_size, decode, workers=args.workers + 1)  # as train.py
            builds.append(time.perf_counter() - start)
        build_s = statistics.median(builds)
        cached = subset_module.ImageSubset(data, everything, loader_part, aug.load_size, cache=ram)
        results["c"] = images_per_second(make_loader(cached, args), args.repeat, device_part)
        first_epoch_s = build_s + n / results["c"][0]
        results["b"] = (n / first_epoch_s, n / (min(builds) + n / results["c"][1]), results["c"][2])

        names = {
            "a": "seed baseline (full decode + Resize)",
            "b": "ours, first epoch (cache build + 1 pass)",
            "b'": "ours, --cache none (draft decode)",
            "c": "ours, cached epoch (RamCache)",
        }
        base = results["a"][0]
        print(f"\n{'':3} {'pipeline':<41} {'images/s':>9} {'best':>9} {'vs a':>7}  handed over per image")
        for key in names:
            median, best, kind = results[key]
            print(f"{key:3} {names[key]:<41} {median:9.0f} {best:9.0f} {median / base:6.1f}x  {kind}")
        print(f"images/s: median of {args.repeat} passes after one warm-up pass; best: the fastest pass")
        print(
            f"RamCache build: {build_s:.2f}s (median of {args.repeat}) for {len(ram)} images "
            f"({len(ram) / build_s:.0f} images/s, {min(args.workers + 1, utils.usable_cores())} processes), "
            f"{ram.images.nbytes / 2**20:.1f} MiB; first epoch {first_epoch_s:.2f}s"
        )
        print(f"b/a = {results['b'][0] / base:.1f} (target >= 3), c/a = {results['c'][0] / base:.1f} (target >= 15)")
        if args.breakdown:
            breakdown(cached, image_paths, aug.load_size, seed_transform, aug.eval_transform, args)
    print(f"load average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main(get_parser().parse_args())
