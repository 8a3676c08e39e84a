"""Training images/s of the default pretrained backbone: model only, each speed flag, fed by our loader, and timm's.

    .venv/bin/python bench/bench_pretrained.py --steps 20                                   # demo data
    .venv/bin/python bench/bench_pretrained.py --data ../shared/data/maskdev --timm_train /tmp/timm_peer/train.py
    .venv/bin/python bench/bench_pretrained.py --resize2 192 144 --threads 1 --no-compile    # a loaded machine

The model, augmentation and normalization are what train.py picks for the mask data, resolved by train.py's own
functions (resolve_defaults, resolve_weights, augment_on_device, normalization): MultiHeadModel over
tf_efficientnet_lite0 from the installed ImageNet weights, FaceAugmentation at the weights' mean/std, --gpu_aug on.
Every row trains a fresh copy of it in fp32 with the body of train.py's loop (channels_last on the input when set,
forward, the per-task cross-entropy, zero_grad, backward, AdamW).

Model-only rows train on batches already in memory: the first batches (at most 8) of the loader-fed feed below,
augmented and normalized once beforehand, cycled; the --resize2 row trains on those batches resized (bilinear).
--freeze_stages N builds the model with train.py's --freeze_stages (timm's freeze: the stem and first stages get no
gradient); --compile is torch.compile of the model, its first (compiling) step untimed and its seconds printed, or
the reason it failed in place of a number.
The loader-fed row is engine.fit's feed: bench_train.training_loader (engine.make_loader with train.py's flags,
EpochSampler order) over the images decoded once into a RamCache, then, with --gpu_aug, augmentation.BatchAugment
on the batch in the training process before each step (engine.build_split). Its ratio to the first row says what
the data path costs the loop (target >= 0.95).
Our rows run --warmup untimed steps each, then --steps timed steps in --rounds alternating blocks, so that a change
in background load hits every row alike.

--timm_train runs timm's train.py (github.com/huggingface/pytorch-image-models; not in the timm wheel) in a
subprocess over a folder of symlinks to the same images, one folder per 18-class label, holding
(--warmup + --steps) x --batch_size of them so that its one epoch is that many steps (its training loader drops
the last partial batch): tf_efficientnet_lite0, --num-classes 18, --input-size 3 H W, --opt adamw, --no-prefetcher,
--workers = train.py's --num_workers, our torch threads, its own per-image augmentation from the JPEG files, random
initial weights (--pretrained would download; speed does not depend on the weights). On the CPU: a launcher sets its
parser's `device` default and its functions' torch.device defaults (train_one_epoch(device=cuda) in older copies) to
cpu. Its row is --steps x --batch_size over the step times it logs (--log-interval 1) after its first --warmup steps.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import augmentation
import cache as cache_module
import demo
import imaging
import loss as loss_module
import model as model_module
import options
import rundir
import subset as subset_module
import train
import utils
from bench.bench_train import forever, training_loader

IN_MEMORY_BATCHES = 8  # batches the model-only rows cycle through (an epoch of them would take GBs)
FREEZE_STAGES = (2, 3)

# Runs timm's train.py on the CPU without editing it: argv = [launcher, train.py, device, torch threads, *its flags].
TIMM_LAUNCHER = """
import importlib.util, sys, torch
path, device = sys.argv[1], sys.argv[2]
torch.set_num_threads(int(sys.argv[3]))
spec = importlib.util.spec_from_file_location("timm_train", path)
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
module.parser.set_defaults(device=device)
for fn in vars(module).values():
    if getattr(fn, "__module__", None) == "timm_train" and getattr(fn, "__defaults__", None):
        fn.__defaults__ = tuple(torch.device(device) if isinstance(d, torch.device) else d for d in fn.__defaults__)
sys.argv = [path, *sys.argv[4:]]
module.main()
"""
TIMM_STEP = re.compile(r"Train: \d+ \[\s*(\d+)/\d+ .*?Time: ([\d.]+)s")


@dataclass
class Row:
    """One setting: its own model and optimizer, its feed, and whether the input goes channels_last."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    criterion: nn.Module
    batches: Iterator
    channels_last: bool = False


def train_step(row: Row, images: torch.Tensor, targets: torch.Tensor) -> None:
    """The body of loop.train_one_epoch in fp32 (bench_train.train_step's F.cross_entropy does not fit a
    multi-head model's outputs: the criterion is the per-task one train.py builds)."""
    if row.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    outputs = row.model(images)
    loss = row.criterion(outputs.float(), targets)
    row.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    row.optimizer.step()


def make_row(net: nn.Module, batches: Iterator, train_args: argparse.Namespace, channels_last: bool = False) -> Row:
    """`net` in training mode with train.py's criterion (per task) and AdamW at its --lr and --weight_decay."""
    net = net.train()
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    trainable = [p for p in net.parameters() if p.requires_grad]
    criterion = loss_module.create_criterion(train_args.criterion, tasks=model_module.task_sizes(net))
    optimizer = torch.optim.AdamW(trainable, lr=train_args.lr, weight_decay=train_args.weight_decay)
    return Row(net, optimizer, criterion, batches, channels_last)


def images_per_second(rows: dict[str, Row], steps: int, warmup: int, rounds: int) -> dict[str, float]:
    """`warmup` untimed steps per row, then `steps` timed steps in `rounds` blocks, rows alternating."""
    for row in rows.values():
        for images, targets in itertools.islice(row.batches, warmup):
            train_step(row, images, targets)
    seconds, counts = dict.fromkeys(rows, 0.0), dict.fromkeys(rows, 0)
    for block in range(rounds):
        block_steps = steps // rounds + (block < steps % rounds)
        for name, row in rows.items():
            start = time.perf_counter()
            for images, targets in itertools.islice(row.batches, block_steps):
                train_step(row, images, targets)
                counts[name] += len(images)
            seconds[name] += time.perf_counter() - start
    return {name: counts[name] / seconds[name] for name in rows}


def timm_folder(root: Path, paths: list[str], targets: np.ndarray, count: int, seed: int) -> Path:
    """timm's folder-per-class layout under `root`: train/ with `count` symlinks (cycling over the images in a
    seeded order), validation/ with the first few, so its end-of-epoch validation costs little."""
    order = np.random.default_rng(seed).permutation(len(paths))
    for split, n in (("train", count), ("validation", min(count, 32))):
        for i in range(n):
            k = order[i % len(paths)]
            link = root / split / f"{targets[k]:02d}" / f"{i:06d}{Path(paths[k]).suffix.lower()}"
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(Path(paths[k]).resolve())
    return root


def run_timm(
    script: Path, data_root: Path, resize: tuple[int, int], batch_size: int, workers: int, warmup: int, steps: int
) -> tuple[str, float | None, float]:
    """timm's train.py on the CPU over `data_root`: (what to print, its images/s or None, wall seconds)."""
    flags = [str(data_root), "--model", "tf_efficientnet_lite0", "--num-classes", "18", "--input-size", "3",
             *map(str, resize), "-b", str(batch_size), "--epochs", "1", "--opt", "adamw", "--lr", "1e-3",
             "--no-prefetcher", "--workers", str(workers), "--log-interval", "1", "--checkpoint-hist", "1",
             "--output", str(data_root / "output")]  # fmt: skip
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", TIMM_LAUNCHER, str(script), "cpu", str(torch.get_num_threads()), *flags],
        capture_output=True, text=True, cwd=data_root, timeout=3600,
    )  # fmt: skip
    wall = time.perf_counter() - start
    log = done.stdout + done.stderr
    times = {int(i): float(t) for i, t in TIMM_STEP.findall(log)}
    timed = [t for i, t in times.items() if i >= warmup]
    if done.returncode != 0 or len(timed) < steps or sum(timed) <= 0:
        last = log.strip().splitlines()[-1] if log.strip() else "no output"
        return f"failed (exit {done.returncode}, {len(times)} steps logged): {last[-150:]}", None, wall
    rate = len(timed) * batch_size / sum(timed)
    return f"{rate:10.1f}", rate, wall


def get_parser() -> argparse.ArgumentParser:
    p = utils.ArgumentParser(description=__doc__)
    data = p.add_argument_group("data")
    data.add_argument("--data", default=None, help="competition-layout folder (its train/images) or the folder of "
                      "person folders itself; default: demo data of --n images in a temporary folder")  # fmt: skip
    data.add_argument("--n", type=int, default=700, help="demo images to generate, rounded up to persons of 7")
    data.add_argument("--batch_size", type=int, default=64, help="images per step")
    data.add_argument(
        "--workers", type=int, default=None, help="train.py's --num_workers (and timm's --workers); None: its default"
    )
    net = p.add_argument_group("model")
    net.add_argument("--resize", nargs=2, type=int, default=[192, 144], help="(H, W) input, train.py's --resize")
    net.add_argument("--resize2", nargs=2, type=int, default=[128, 96], help="(H, W) of the second-resolution row")
    net.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True, help="time the --compile row")
    net.add_argument("--seed", type=int, default=0, help="seed of the heads' initialisation and the sampler")
    net.add_argument("--threads", type=int, default=None, help="torch threads of our training process and timm's; "
                     "None: torch's (on a loaded machine 1 is steadier: 2 threads wait on each other)")  # fmt: skip
    timing = p.add_argument_group("timing")
    timing.add_argument("--steps", type=int, default=30, help="timed training steps per row")
    timing.add_argument("--warmup", type=int, default=3, help="untimed steps per row first (allocator, workers)")
    timing.add_argument("--rounds", type=int, default=3, help="blocks the timed steps are split into, rows alternating")
    peer = p.add_argument_group("peer")
    peer.add_argument("--timm_train", default=None, help="timm's train.py (from its GitHub repository): add its row")
    return p


def main(args: argparse.Namespace) -> None:
    if args.n < 1 or args.batch_size < 2 or args.rounds < 1 or args.steps < args.rounds or args.warmup < 0:
        raise SystemExit("error: --n >= 1, --batch_size >= 2, --rounds >= 1, --steps >= --rounds, --warmup >= 0")
    if args.timm_train and not Path(args.timm_train).is_file():
        raise SystemExit(f"error: --timm_train {args.timm_train} is not a file: give the path of timm's train.py")
    if args.data and not Path(args.data).is_dir():
        raise SystemExit(f"error: --data {args.data} is not a folder: give a competition-layout folder")
    flags = ["--batch_size", str(args.batch_size), "--resize", *map(str, args.resize), "--seed", str(args.seed)]
    if args.workers is not None:
        flags += ["--num_workers", str(args.workers)]
    train_args = train.get_parser().parse_args(flags)  # train.py's settings, as a plain run resolves them
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    load_avg = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        if args.data:
            root = Path(args.data)
            images_dir = root / "train/images" if (root / "train/images").is_dir() else root
        else:
            images_dir = demo.make_demo_data(tmp / "data", n_train=-(-args.n // 7), n_eval=0, seed=0) / "train/images"
        data_cls = options.dataset_classes()[train_args.dataset]
        data = data_cls(**utils.filter_kwargs(data_cls, {**vars(train_args), "data_dir": images_dir}))
        train.resolve_defaults(train_args, data)
        source = train.resolve_weights(train_args)  # the installed ImageNet weights of the default backbone
        aug_cls = augmentation.augmentation_classes()[train_args.augmentation]
        gpu_aug = train.augment_on_device(train_args.gpu_aug, aug_cls)
        mean, std = train.normalization(train_args, data, aug_cls, source)
        aug = aug_cls(resize=train_args.resize, mean=mean, std=std)
        paths = [str(p) for p in data.image_paths]
        decode = functools.partial(imaging.decode_fixed, size=tuple(aug.load_size))
        ram = cache_module.RamCache(paths, aug.load_size, decode, workers=train_args.num_workers + 1)
        print(f"{len(data)} images from {images_dir} ({time.perf_counter() - start:.1f}s) | {ram.report}")

        # engine.build_split's training feed: uint8 pixels out of the cache, augmented batch-wise here (--gpu_aug),
        # or the preset's per-image steps in the loader and its normalization here.
        everything = np.arange(len(data))
        if gpu_aug:
            pixels = subset_module.ImageSubset(data, everything, augmentation.to_uint8_tensor, aug.load_size, ram)
            on_device = augmentation.BatchAugment(train_args.resize, mean, std, aug.crop_fraction)
        else:
            loader_part, on_device = augmentation.split_for_device(aug.train_transform)
            pixels = subset_module.ImageSubset(data, everything, loader_part, aug.load_size, ram)
        loader = training_loader(pixels, args.batch_size, train_args)

        def loader_fed() -> Iterator:
            for images, targets in forever(loader):
                yield (images if on_device is None else on_device(images)), targets

        ready = list(itertools.islice(loader_fed(), min(len(loader), IN_MEMORY_BATCHES)))
        ready = [b for b in ready if len(b[0]) == len(ready[0][0])]  # one shape: a compiled model compiles once
        resized = [(F.interpolate(x, size=tuple(args.resize2), mode="bilinear", antialias=True), y) for x, y in ready]

        def build(freeze_stages: int = 0) -> nn.Module:
            """The model as engine.build_state builds it from the run's config."""
            torch.manual_seed(args.seed)  # the heads start alike in every row
            config = {**vars(train_args), "num_classes": data.num_classes, "freeze_stages": freeze_stages}
            return rundir.build_model(config, pretrained=train_args.pretrained, pretrained_path=None)

        h, w = train_args.resize
        rows = {f"model only, --resize {h} {w}": make_row(build(), forever(ready), train_args)}
        rows["model only, --channels_last"] = make_row(build(), forever(ready), train_args, channels_last=True)
        for n in FREEZE_STAGES:
            rows[f"model only, --freeze_stages {n}"] = make_row(build(n), forever(ready), train_args)
        compile_note, compile_row = "skipped: --no-compile", None
        if args.compile:
            row = make_row(build(), forever(ready), train_args)
            row.model = torch.compile(row.model)
            start = time.perf_counter()
            try:
                train_step(row, *ready[0])  # forward and backward graphs compile here
                compile_note, compile_row = f"(first step, compiling: {time.perf_counter() - start:.0f}s)", row
            except Exception as e:  # no compiler toolchain, unsupported op or platform
                compile_note = f"compile failed: {utils.reason(e, 120)}"
        if compile_row is not None:
            rows["model only, --compile"] = compile_row
        h2, w2 = args.resize2
        rows[f"model only, --resize {h2} {w2}"] = make_row(build(), forever(resized), train_args)
        loader_name = "loader-fed, train.py's feed" + (" (--gpu_aug)" if gpu_aug else "")
        rows[loader_name] = make_row(build(), loader_fed(), train_args)
        # train.py's defaults: the fastest correct setting of the rows above (channels_last, the first stages frozen).
        defaults = f"--channels_last --freeze_stages {train_args.freeze_stages}"
        rows[f"model only, {defaults}"] = make_row(build(train_args.freeze_stages), forever(ready), train_args, True)
        rows[f"loader-fed, {defaults}"] = make_row(build(train_args.freeze_stages), loader_fed(), train_args, True)

        print(
            f"{train_args.model} over {train_args.backbone} ({'pretrained' if source else 'random init'}) | "
            f"{train_args.augmentation}, --gpu_aug {gpu_aug} | batch {args.batch_size} | --num_workers "
            f"{train_args.num_workers}: {loader.num_workers} loader workers (none when a batch is one copy out of "
            f"the cache) | torch {torch.__version__}, {torch.get_num_threads()} threads | {os.cpu_count()} CPUs | "
            f"load average {load_avg:.2f} at start"
        )
        print(f"{args.warmup} warm-up + {args.steps} timed steps per row, in {args.rounds} blocks, rows alternating\n")
        start = time.perf_counter()
        rates = images_per_second(rows, args.steps, args.warmup, args.rounds)
        ours_s = time.perf_counter() - start
        order = list(rows)
        if compile_row is None:  # its place in the table, with the reason in place of a number
            order.insert(len(FREEZE_STAGES) + 2, "model only, --compile")

        peer = None
        if args.timm_train:
            folder = timm_folder(tmp / "timm", paths, data.labels, (args.warmup + args.steps) * args.batch_size,
                                 args.seed)  # fmt: skip
            peer = run_timm(Path(args.timm_train).resolve(), folder, tuple(args.resize), args.batch_size,
                            train_args.num_workers, args.warmup, args.steps)  # fmt: skip

    first = rates[order[0]]
    print(f"{'setting':<40} {'images/s':>10} {'ratio':>6}")
    for name in order:
        if name in rates:
            note = f"  {compile_note}" if name == "model only, --compile" else ""
            print(f"{name:<40} {rates[name]:10.1f} {rates[name] / first:6.2f}{note}")
        else:
            print(f"{name:<40} {compile_note}")
    timm_name = f"timm train.py, --workers {train_args.num_workers}"
    if peer is None:
        print(f"{timm_name:<40} skipped: give --timm_train PATH (timm's train.py from its GitHub repository)")
    else:
        text, rate, wall = peer
        ratio = f" {rate / first:6.2f}  ({wall:.0f}s wall, its own loader and augmentation)" if rate else ""
        print(f"{timm_name:<40} {text}{ratio}")
    ratio = rates[loader_name] / first
    default_ratio = rates[f"loader-fed, {defaults}"] / rates[f"model only, {defaults}"]
    print(f"\nloader-fed / model only: {ratio:.2f}; with train.py's defaults ({defaults}): {default_ratio:.2f} "
          f"(target >= 0.95) | our rows {ours_s:.0f}s | "
          f"load average {os.getloadavg()[0]:.2f} at the end")  # fmt: skip


if __name__ == "__main__":
    main(get_parser().parse_args())
