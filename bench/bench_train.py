"""Training throughput fed by our DataLoader (RAM cache on) against the same loop fed by batches already in memory.

    .venv/bin/python bench/bench_train.py                                  # BaseModel and mobilenetv3_small_100
    .venv/bin/python bench/bench_train.py --models resnet18 --steps 30 --workers 2
    .venv/bin/python bench/bench_train.py --augmentation FaceAugmentation --gpu_aug   # per image vs on the device

The loader is engine.make_loader with train.py's flag defaults (persistent workers, prefetch, EpochSampler order)
over an ImageSubset of the --augmentation preset's train_transform reading a RamCache, as engine.fit builds it:
the loader hands over uint8 batches and the training process normalizes them (augmentation.split_for_device);
for BaseAugmentation a batch is one copy out of the cache, made in the training process (loop.loader_workers).
The in-memory feed cycles through one epoch of batches taken from that loader and normalized beforehand. Both
feeds run the same step (forward, cross-entropy, zero_grad, backward, AdamW) on a freshly initialised model,
--warmup untimed steps first. A ratio near 1 means the data path costs the training loop nothing; below 1, the
loop waited for batches or the workers took CPU time from the model.

--gpu_aug adds a third feed, timed in the same alternating blocks: the loader hands over the cached uint8 images
(a copy per batch, no workers) and augmentation.BatchAugment (the preset's steps, batch-wise) runs in the training
process before each step, as engine.fit does with --gpu_aug. Its images/s against the loader's say which way of
augmenting trains faster on this machine.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import os
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

import augmentation
import cache as cache_module
import dataset as dataset_module
import demo
import engine
import imaging
import labels
import model as model_module
import subset as subset_module
import train
import utils
from augmentation import split_for_device

RESIZE = (128, 96)  # (H, W) network input, train.py's default --resize


def train_step(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """One optimisation step, the body of train.py's loop; both feeds call exactly this."""
    outputs = model(images)
    loss = F.cross_entropy(outputs, targets)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


def training_loader(subset: Dataset, batch_size: int, train_args: argparse.Namespace) -> DataLoader:
    """The training loader as engine.fit builds it in a single process: train.py's flags, EpochSampler order."""
    sampler = engine.EpochSampler(len(subset), train_args.seed)
    settings = engine.LoopSettings.from_config(vars(train_args))
    return engine.make_loader(subset, batch_size, settings, torch.device("cpu"), sampler)


def forever(batches: Iterable) -> Iterator:
    """Endless batches: the loader restarts its epoch (its persistent workers stay up), a list starts over."""
    while True:
        yield from batches


def images_per_second(
    name: str, feeds: dict[str, Iterator], steps: int, warmup: int, rounds: int, seed: int
) -> dict[str, float]:
    """Train one fresh `name` per feed (same initial weights) for `warmup` untimed steps, then `steps` timed steps
    in `rounds` alternating blocks, so that a change in background load hits every feed alike; images/s per feed."""
    runs = {}
    for feed in feeds:
        torch.manual_seed(seed)
        model = model_module.build_model(name, 18, **labels.model_kwargs()).train()
        runs[feed] = (model, torch.optim.AdamW(model.parameters(), lr=1e-3))
    for feed, batches in feeds.items():
        for images, targets in itertools.islice(batches, warmup):
            train_step(*runs[feed], images, targets)
    seconds, counts = dict.fromkeys(feeds, 0.0), dict.fromkeys(feeds, 0)
    for block in range(rounds):
        block_steps = steps // rounds + (block < steps % rounds)
        for feed, batches in feeds.items():
            start = time.perf_counter()
            for images, targets in itertools.islice(batches, block_steps):
                train_step(*runs[feed], images, targets)
                counts[feed] += len(images)
            seconds[feed] += time.perf_counter() - start
    return {feed: counts[feed] / seconds[feed] for feed in feeds}


def get_parser() -> argparse.ArgumentParser:
    p = utils.ArgumentParser(description=__doc__)
    data = p.add_argument_group("data")
    data.add_argument("--n", type=int, default=1400, help="images to generate, rounded up to persons of 7")
    data.add_argument(
        "--workers", type=int, default=None, help="DataLoader worker processes; None: train.py's (CPU cores - 1)"
    )
    data.add_argument("--batch_size", type=int, default=64, help="images per step")
    data.add_argument(
        "--augmentation",
        default="BaseAugmentation",
        choices=sorted(augmentation.augmentation_classes()),
        help="preset whose train_transform the loader runs (FaceAugmentation: the mask data's default)",
    )
    data.add_argument(
        "--gpu_aug",
        action="store_true",
        help="also time the feed that augments batch-wise in the training process (train.py --gpu_aug)",
    )
    net = p.add_argument_group("model")
    net.add_argument(
        "--models", nargs="+", default=["BaseModel", "mobilenetv3_small_100"], help="model.py classes or timm names"
    )
    net.add_argument("--seed", type=int, default=0, help="seed of the models' initialisation")
    net.add_argument("--threads", type=int, default=None, help="torch threads of the training process; None: torch's")
    timing = p.add_argument_group("timing")
    timing.add_argument("--steps", type=int, default=60, help="timed training steps per model and feed")
    timing.add_argument("--warmup", type=int, default=5, help="untimed steps per feed first (worker start, allocator)")
    timing.add_argument(
        "--rounds", type=int, default=3, help="blocks the timed steps are split into, feeds alternating"
    )
    return p


def main(args: argparse.Namespace) -> None:
    if args.n < 1 or args.batch_size < 1 or args.steps < args.rounds or args.rounds < 1 or args.warmup < 0:
        raise SystemExit("--n, --batch_size and --rounds must be at least 1, --steps at least --rounds, --warmup >= 0")
    for name in args.models:
        model_module.check_model_name(name)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    flags = ["--batch_size", str(args.batch_size), "--resize", *map(str, RESIZE), "--seed", str(args.seed)]
    if args.workers is not None:
        flags += ["--num_workers", str(args.workers)]
    train_args = train.get_parser().parse_args(flags)  # train.py's loader settings, as a plain run resolves them
    mean, std = dataset_module.SEED_MEAN, dataset_module.SEED_STD
    aug = augmentation.augmentation_classes()[args.augmentation](RESIZE, mean, std)
    load_avg = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        demo.make_demo_data(Path(tmp) / "data", n_train=-(-args.n // 7), n_eval=0, seed=0)
        data = dataset_module.MaskSplitByProfileDataset(Path(tmp) / "data/train/images")
        print(f"wrote {len(data)} JPEGs in {time.perf_counter() - start:.1f}s")
        decode = functools.partial(imaging.decode_fixed, size=aug.load_size)
        paths = [str(p) for p in data.image_paths]
        ram = cache_module.RamCache(paths, aug.load_size, decode, workers=train_args.num_workers + 1)
        print(ram.report)

    loader_part, device_part = split_for_device(aug.train_transform)
    subset = subset_module.ImageSubset(data, np.arange(len(data)), loader_part, aug.load_size, cache=ram)
    loader = training_loader(subset, args.batch_size, train_args)

    def on_device(batches: Iterable) -> Iterator:
        """What engine.train_one_epoch does first with every batch (the device is the CPU here)."""
        for images, targets in batches:
            yield (images if device_part is None else device_part(images)), targets

    in_memory = list(on_device(loader))  # one epoch of ready batches
    feeds = {"loader": lambda: on_device(forever(loader))}
    if args.gpu_aug:  # engine.build_split's --gpu_aug: uint8 images out of the cache, augmented batch-wise here
        pixels = subset_module.ImageSubset(data, np.arange(len(data)), augmentation.to_uint8_tensor, aug.load_size, ram)
        device_aug = augmentation.BatchAugment(RESIZE, mean, std, aug.crop_fraction)
        device_loader = training_loader(pixels, args.batch_size, train_args)
        feeds["device aug"] = lambda: ((device_aug(x), y) for x, y in forever(device_loader))
    print(
        f"{len(data)} images | {args.augmentation} | batch {args.batch_size} | {loader.num_workers} loader workers "
        f"(--num_workers {train_args.num_workers}; none when batches are copied out of the cache) | "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads | {os.cpu_count()} CPUs | "
        f"load average {load_avg:.2f} at start"
    )
    print(
        f"{args.warmup} warm-up + {args.steps} timed steps per feed, timed in {args.rounds} blocks that alternate "
        "in memory, loader, in memory, ...\n"
    )
    device_columns = f" {'device aug':>10} {'device aug/in memory':>21} {'device aug/loader':>18}"
    device_columns = device_columns if args.gpu_aug else ""
    print(f"{'model':<24} {'in memory':>10} {'loader':>10} {'loader/in memory':>17}{device_columns}   (images/s)")
    for name in args.models:
        named = {"in memory": forever(in_memory), **{feed: make() for feed, make in feeds.items()}}
        rates = images_per_second(name, named, args.steps, args.warmup, args.rounds, args.seed)
        memory_rate, loader_rate = rates["in memory"], rates["loader"]
        row = f"{name:<24} {memory_rate:10.1f} {loader_rate:10.1f} {loader_rate / memory_rate:17.2f}"
        if args.gpu_aug:
            device_rate = rates["device aug"]
            row += f" {device_rate:10.1f} {device_rate / memory_rate:21.2f} {device_rate / loader_rate:18.2f}"
        print(row, flush=True)
    default_feed = "device aug" if args.gpu_aug else "loader"  # train.py's feed for FaceAugmentation: --gpu_aug
    print(f"\ntarget: {default_feed}/in memory >= 0.95 | load average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main(get_parser().parse_args())
