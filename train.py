"""Train a classifier and write a run directory: config.json, best.pth, last.pth, log.csv, TensorBoard events.

python train.py                                            # the demo data (generated once), default recipe
python train.py --data_dir /data/train/images --model resnet18 --criterion focal --epochs 20
SM_CHANNEL_TRAIN=/data/train/images python train.py --resize 256 192 --batch_size 32 --name r18
"""

from __future__ import annotations

import argparse
import csv
import functools
import io
import sys
import time
from argparse import Namespace
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

import augmentation as augmentation_module
import cache as cache_module
import dataset as dataset_module
import demo
import loss as loss_module
import model as model_module
import utils
from utils import UserError

SCHEDULERS = ("none", "step", "cosine")


def dataset_classes() -> dict[str, type]:
    return utils.module_classes(dataset_module, lambda c: hasattr(c, "split_dataset"))


def optimizer_names() -> list[str]:
    return sorted(
        n
        for n, c in vars(torch.optim).items()
        if isinstance(c, type) and issubclass(c, torch.optim.Optimizer) and c is not torch.optim.Optimizer
    )


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=utils.HelpFormatter)
    data = p.add_argument_group("data")
    data.add_argument(
        "--data_dir",
        default=utils.env_value("SM_CHANNEL_TRAIN"),
        help=f"folder of person folders [$SM_CHANNEL_TRAIN; when unset: {demo.DEFAULT_TRAIN_DIR} if it "
        f"exists, else the demo data in {demo.DEMO_DIR}, generated once]",
    )
    data.add_argument(
        "--dataset",
        default="MaskSplitByProfileDataset",
        help=f"dataset class in dataset.py. {utils.describe(dataset_classes())}",
    )
    data.add_argument(
        "--val_ratio", type=float, default=0.2, help="share of persons (or images) held out for validation"
    )
    data.add_argument(
        "--age_bounds",
        type=int,
        nargs=2,
        default=[30, 60],
        metavar=("YOUNG", "OLD"),
        help="age band edges in years: < YOUNG, YOUNG..OLD-1, >= OLD",
    )
    data.add_argument(
        "--augmentation",
        default="BaseAugmentation",
        help=f"augmentation preset in augmentation.py. {utils.describe(augmentation_module.augmentation_classes())}",
    )
    data.add_argument(
        "--cache",
        choices=("auto", "none", "ram", "disk"),
        default="auto",
        help="decoded images kept after the first pass: in memory (shared by all workers), as files reused by "
        "later runs, or none; auto: ram when it fits in a quarter of the free memory, else disk",
    )
    data.add_argument(
        "--cache_dir",
        default=utils.env_value("CACHE_DIR", "./cache"),
        help="folder of the disk cache [$CACHE_DIR]",
    )
    data.add_argument(
        "--pin_memory",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="page-locked batches for faster copies to the GPU (default: on with CUDA)",
    )
    data.add_argument(
        "--persistent_workers",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="keep loader workers alive between epochs",
    )
    data.add_argument(
        "--prefetch_factor",
        type=int,
        default=int(utils.env_value("PREFETCH_FACTOR", 2)),
        help="batches each worker prepares ahead [$PREFETCH_FACTOR]",
    )
    data.add_argument(
        "--skip_bad_images",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="train without unreadable images (listed in the run's bad_images.tsv) instead of stopping",
    )
    data.add_argument(
        "--resize",
        type=int,
        nargs=2,
        default=[128, 96],
        metavar=("H", "W"),
        help="network input height and width in pixels",
    )
    data.add_argument(
        "--mean_std",
        choices=("seed", "imagenet", "compute"),
        default="seed",
        help="normalization: the competition's values, ImageNet's, or computed from a sample of images",
    )
    data.add_argument(
        "--num_workers",
        type=int,
        default=int(utils.env_value("NUM_WORKERS", utils.default_num_workers())),
        help="data loader processes [$NUM_WORKERS; default: CPU cores - 1, at most 8]",
    )

    net = p.add_argument_group("model")
    net.add_argument(
        "--model",
        default="BaseModel",
        help=f"any timm architecture name, or a class in model.py. {utils.describe(model_module.model_classes())}",
    )
    net.add_argument(
        "--pretrained",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="start from timm's published weights (downloads them; needs a network)",
    )
    net.add_argument("--pretrained_path", default=None, help="start from weights in this local file (head replaced)")

    opt = p.add_argument_group("optimization")
    opt.add_argument("--epochs", type=int, default=12, help="passes over the training split")
    opt.add_argument("--batch_size", type=int, default=64, help="training images per step")
    opt.add_argument("--valid_batch_size", type=int, default=256, help="images per validation batch")
    opt.add_argument("--optimizer", default="AdamW", help="class name in torch.optim")
    opt.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    opt.add_argument("--weight_decay", type=float, default=1e-2, help="weight decay (L2 for SGD, decoupled for AdamW)")
    opt.add_argument("--momentum", type=float, default=0.9, help="momentum, for optimizers that take one")
    opt.add_argument(
        "--scheduler",
        choices=SCHEDULERS,
        default="cosine",
        help="lr schedule per epoch: constant, x gamma every lr_decay_step epochs, or cosine to 0",
    )
    opt.add_argument("--lr_decay_step", type=int, default=20, help="epochs between lr drops (step scheduler)")
    opt.add_argument("--gamma", type=float, default=0.5, help="lr factor at each drop (step scheduler)")
    opt.add_argument("--criterion", default="cross_entropy", help=f"loss: {', '.join(loss_module.criterion_names())}")
    opt.add_argument(
        "--patience",
        type=int,
        default=0,
        help="stop after this many epochs without a better validation macro F1 (0: never)",
    )

    run = p.add_argument_group("runtime")
    run.add_argument("--seed", type=int, default=42, help="seed for the split, initialisation and augmentation")
    run.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    run.add_argument(
        "--data_parallel",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="use every visible GPU through DataParallel",
    )
    run.add_argument(
        "--model_dir",
        default=utils.env_value("SM_MODEL_DIR", "./model"),
        help="where run directories are created [$SM_MODEL_DIR]",
    )
    run.add_argument("--name", default="exp", help="run directory name; exp, exp2, ... never overwritten")
    return p


def check_args(args: Namespace) -> None:
    """Reject impossible flags and unknown names before any data is read."""
    if not 0 < args.val_ratio < 1:
        raise UserError(f"--val_ratio {args.val_ratio} must be between 0 and 1 (e.g. 0.2)")
    for flag in ("epochs", "batch_size", "valid_batch_size", "lr_decay_step", "prefetch_factor"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag} {getattr(args, flag)} must be at least 1")
    if min(args.resize) < 8:
        raise UserError(f"--resize {args.resize[0]} {args.resize[1]}: height and width must be at least 8 pixels")
    if args.lr <= 0:
        raise UserError(f"--lr {args.lr} must be positive")
    if args.num_workers < 0:
        raise UserError(f"--num_workers {args.num_workers} must be 0 or more")
    if not args.age_bounds[0] < args.age_bounds[1]:
        raise UserError(f"--age_bounds {args.age_bounds[0]} {args.age_bounds[1]}: the first must be below the second")
    for flag, classes in (
        ("--dataset", dataset_classes()),
        ("--augmentation", augmentation_module.augmentation_classes()),
    ):
        value = getattr(args, flag[2:])
        if value not in classes:
            raise UserError(utils.unknown_name_message(flag, value, classes))
    if args.optimizer not in optimizer_names():
        raise UserError(utils.unknown_name_message("--optimizer", args.optimizer, optimizer_names()))
    model_module.check_model_name(args.model)
    loss_module.check_criterion_name(args.criterion)
    if args.pretrained_path and not Path(args.pretrained_path).is_file():
        raise UserError(
            f"--pretrained_path {args.pretrained_path} does not exist: give the path of a local weights file"
        )


def prepare_images(
    data: torch.utils.data.Dataset, size: Sequence[int], args: Namespace
) -> tuple[dict[str, str], cache_module.RamCache | cache_module.DiskCache | None]:
    """Decode every image once before training, into the cache when there is one: stop with all unreadable
    images listed, or drop them (--skip_bad_images). Returns ({path: reason} of dropped images, cache)."""
    paths = [str(p) for p in data.image_paths]
    decode = functools.partial(dataset_module.decode_fixed, size=tuple(size))
    workers = args.num_workers + 1  # the loader workers do not exist yet: use their cores
    kind = cache_module.choose_kind(args.cache, len(paths), size)
    if kind == "none":
        cache, bad = None, cache_module.find_unreadable(paths, decode, workers)
    else:
        cache = cache_module.build_cache(kind, paths, size, decode, workers, args.cache_dir)
        bad = cache.bad
        print(cache.report)
    if not bad:
        return bad, cache
    listing = utils.listing([f"{p} ({r})" for p, r in bad.items()], limit=10, sep="; ")
    if not args.skip_bad_images:
        raise UserError(
            f"{len(bad)} image(s) cannot be read: {listing}. Replace or remove them, or pass --skip_bad_images"
        )
    print(
        f"warning: skipping {len(bad)} unreadable image(s), listed in the run's bad_images.tsv: {listing}",
        file=sys.stderr,
    )
    if cache is not None:
        cache.keep(np.array([p not in bad for p in paths]))
    data.remove(bad)
    return bad, cache


def build_optimizer(args: Namespace, model: torch.nn.Module) -> torch.optim.Optimizer:
    cls = getattr(torch.optim, args.optimizer)
    kwargs = {"lr": args.lr, "weight_decay": args.weight_decay, "momentum": args.momentum}
    return cls(model.parameters(), **utils.filter_kwargs(cls, kwargs))


def build_scheduler(args: Namespace, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    if args.scheduler == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=args.lr_decay_step, gamma=args.gamma)
    if args.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs)
    if args.scheduler == "none":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 1.0)
    raise UserError(f"--scheduler {args.scheduler} is unknown: choose one of {', '.join(SCHEDULERS)}")


def make_loader(
    subset: torch.utils.data.Dataset, batch_size: int, train: bool, args: Namespace, device: torch.device
) -> DataLoader:
    return DataLoader(
        subset,
        batch_size=batch_size,
        shuffle=train,
        # A last training batch of one image breaks BatchNorm; validation always sees every image.
        drop_last=train and len(subset) % batch_size == 1,
        num_workers=args.num_workers,
        pin_memory=device.type == "cuda" if args.pin_memory is None else args.pin_memory,
        persistent_workers=args.num_workers > 0 and args.persistent_workers,
        prefetch_factor=args.prefetch_factor if args.num_workers > 0 else None,
        worker_init_fn=utils.seed_worker,
        generator=torch.Generator().manual_seed(args.seed),
    )


def denormalize(images: torch.Tensor, mean: tuple, std: tuple) -> np.ndarray:
    """Normalized NCHW tensors -> NHWC uint8 arrays for display."""
    x = images * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)
    return (x.clamp(0, 1) * 255).byte().permute(0, 2, 3, 1).numpy()


def log_line(row: dict[str, Any], epochs: int) -> str:
    return (
        f"epoch {row['epoch']:>3}/{epochs} | train loss {row['train_loss']:.4f} acc {row['train_acc']:6.2%} "
        f"f1 {row['train_f1']:.4f} | val loss {row['val_loss']:.4f} acc {row['val_acc']:6.2%} "
        f"f1 {row['val_f1']:.4f} | lr {row['lr']:.2e} | {row['time_s']:.1f}s{' | best' if row['best'] else ''}"
    )


def write_log(path: Path, rows: list[dict[str, Any]]) -> None:
    """Rewrite log.csv atomically with every epoch so far."""

    def write(f: io.TextIOBase) -> None:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)

    utils.atomic_write(path, write)


def main(args: Namespace) -> Path:
    check_args(args)
    device = utils.select_device(args.device)
    data_dir = demo.resolve_train_dir(args.data_dir)
    utils.seed_everything(args.seed)

    data = dataset_classes()[args.dataset](
        data_dir=data_dir, val_ratio=args.val_ratio, seed=args.seed, age_bounds=args.age_bounds
    )
    num_classes = data.num_classes
    aug_cls = augmentation_module.augmentation_classes()[args.augmentation]
    if args.mean_std == "compute":
        load_size = aug_cls(resize=args.resize, mean=(0, 0, 0), std=(1, 1, 1)).load_size
        mean, std = dataset_module.compute_mean_std(data.image_paths, load_size, seed=args.seed)
        print(f"Computed mean {mean} and std {std} from {min(256, len(data))} images")
    elif args.mean_std == "imagenet":
        mean, std = dataset_module.IMAGENET_MEAN, dataset_module.IMAGENET_STD
    else:
        mean, std = dataset_module.SEED_MEAN, dataset_module.SEED_STD
    aug = aug_cls(resize=args.resize, mean=mean, std=std)
    bad_images, cache = prepare_images(data, aug.load_size, args)

    train_idx, val_idx = data.split_dataset()
    train_set = dataset_module.ImageSubset(data, train_idx, aug.train_transform, aug.load_size, cache)
    val_set = dataset_module.ImageSubset(data, val_idx, aug.eval_transform, aug.load_size, cache)
    train_loader = make_loader(train_set, args.batch_size, True, args, device)
    val_loader = make_loader(val_set, args.valid_batch_size, False, args, device)
    print(
        f"Data: {data_dir} | {len(data)} images, {len(train_set)} train / {len(val_set)} val "
        f"({type(data).__name__}) | device {device}"
    )

    model = model_module.build_model(args.model, num_classes, args.pretrained, args.pretrained_path).to(device)
    if device.type == "cuda" and torch.cuda.device_count() > 1 and args.data_parallel:
        model = torch.nn.DataParallel(model)
    class_counts = np.bincount(train_set.targets, minlength=num_classes).tolist()
    criterion = loss_module.create_criterion(args.criterion, num_classes=num_classes, class_counts=class_counts)
    criterion = criterion.to(device)
    optimizer = build_optimizer(args, model)
    scheduler = build_scheduler(args, optimizer)

    run_dir = utils.increment_path(Path(args.model_dir) / args.name)
    config = {
        **vars(args),
        "data_dir": str(data_dir),
        "num_classes": num_classes,
        "class_names": data.class_names,
        "mean": list(mean),
        "std": list(std),
        "resize": list(args.resize),
        "load_size": list(aug.load_size),
        "train_images": len(train_set),
        "val_images": len(val_set),
        "run_dir": str(run_dir),
        "skipped_images": sorted(bad_images),
        "versions": utils.library_versions(),
        "git_commit": utils.git_commit(),
        "command": " ".join(sys.argv),
    }
    utils.save_json(config, run_dir / "config.json")
    if bad_images:
        rows_bad = "".join(f"{p}\t{r}\n" for p, r in bad_images.items())
        utils.atomic_write(run_dir / "bad_images.tsv", lambda f: f.write("path\treason\n" + rows_bad))
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(run_dir))
    print(f"Run directory: {run_dir}")

    stopper = utils.EarlyStopping(args.patience)
    rows: list[dict[str, Any]] = []
    best_f1, best_epoch = -1.0, 0
    show = min(16, len(val_set))
    val_targets = torch.as_tensor(val_set.targets)
    for epoch in range(1, args.epochs + 1):
        start = time.time()
        model.train()
        train_loss, train_preds, train_targets = 0.0, [], []
        bar = tqdm(train_loader, desc=f"epoch {epoch}", leave=False, disable=not sys.stderr.isatty())
        for images, targets in bar:
            images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
            outputs = model(images)
            loss = criterion(outputs, targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            train_loss += loss.item() * len(targets)
            train_preds.append(outputs.argmax(1).cpu())
            train_targets.append(targets.cpu())
            bar.set_postfix(loss=f"{loss.item():.3f}")
        train_preds, train_targets = torch.cat(train_preds).numpy(), torch.cat(train_targets).numpy()
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()

        logits = utils.predict(model, val_loader, device, progress="validation")
        val_loss = criterion(logits.to(device), val_targets.to(device)).item()
        val_preds = logits.argmax(1).numpy()
        val_f1 = utils.macro_f1(val_set.targets, val_preds, num_classes)
        is_best = val_f1 > best_f1
        row = {
            "epoch": epoch,
            "train_loss": train_loss / len(train_targets),
            "train_acc": float((train_preds == train_targets).mean()),
            "train_f1": utils.macro_f1(train_targets, train_preds, num_classes),
            "val_loss": val_loss,
            "val_acc": float((val_preds == val_set.targets).mean()),
            "val_f1": val_f1,
            "lr": lr,
            "time_s": time.time() - start,
            "best": is_best,
        }
        rows.append(row)
        print(log_line(row, args.epochs), flush=True)
        write_log(run_dir / "log.csv", rows)
        for key in ("loss", "acc", "f1"):
            writer.add_scalar(f"Train/{key}", row[f"train_{key}"], epoch)
            writer.add_scalar(f"Val/{key}", row[f"val_{key}"], epoch)
        writer.add_scalar("Train/lr", lr, epoch)
        images = denormalize(torch.stack([val_set[i][0] for i in range(show)]), mean, std)
        titles = [
            f"truth {data.label_text(val_set.targets[i])}\npred {data.label_text(val_preds[i])}" for i in range(show)
        ]
        colors = ["green" if val_preds[i] == val_set.targets[i] else "red" for i in range(show)]
        writer.add_figure("Val/predictions", utils.image_grid(images, titles, colors=colors), epoch)

        state = {
            "model": model,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": None,
            "epoch": epoch,
            "best_score": max(best_f1, val_f1),
            "config": config,
        }
        if is_best:
            best_f1, best_epoch = val_f1, epoch
            utils.save_checkpoint(run_dir / "best.pth", **state)
        utils.save_checkpoint(run_dir / "last.pth", **state)
        if stopper.step(val_f1):
            print(f"Early stopping: no better validation macro F1 for {args.patience} epochs")
            break
    writer.close()
    print(f"Best validation macro F1 {best_f1:.4f} at epoch {best_epoch}; saved in {run_dir}")
    print(f"Next: python inference.py --model_dir {run_dir}")
    return run_dir


if __name__ == "__main__":
    utils.run_main(main, get_parser().parse_args())
