"""Train a classifier and write a run directory: config.json, best.pth, last.pth, log.csv, TensorBoard events.

python train.py                                            # the demo data (generated once), default recipe
python train.py --data_dir /data/train/images --model resnet18 --criterion focal --epochs 20
SM_CHANNEL_TRAIN=/data/train/images python train.py --resize 256 192 --batch_size 32 --name r18
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
import time
from argparse import Namespace
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

import augmentation as augmentation_module
import cache as cache_module
import dataset as dataset_module
import demo
import engine
import loss as loss_module
import model as model_module
import report
import utils
from utils import UserError


def dataset_classes() -> dict[str, type]:
    return utils.module_classes(dataset_module, lambda c: hasattr(c, "split_dataset"))


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
    net.add_argument(
        "--backbone",
        default=None,
        help="for --model MultiHeadModel: BaseModel or any timm architecture under the mask/gender/age heads",
    )

    opt = p.add_argument_group("optimization")
    opt.add_argument("--epochs", type=int, default=12, help="passes over the training split")
    opt.add_argument("--batch_size", type=int, default=64, help="training images per step (per process)")
    opt.add_argument("--valid_batch_size", type=int, default=256, help="images per validation batch")
    opt.add_argument("--optimizer", default="AdamW", help="class name in torch.optim")
    opt.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    opt.add_argument("--weight_decay", type=float, default=1e-2, help="weight decay (L2 for SGD, decoupled for AdamW)")
    opt.add_argument(
        "--decay_norm_bias",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="also decay biases and normalization weights (off: they get no weight decay)",
    )
    opt.add_argument("--momentum", type=float, default=0.9, help="momentum, for optimizers that take one")
    opt.add_argument(
        "--scheduler",
        choices=engine.SCHEDULERS,
        default="cosine",
        help="lr schedule, stepped per iteration: constant, x gamma every lr_decay_step epochs, cosine to 0, "
        "cosine restarting every lr_decay_step epochs, one-cycle, or x gamma after 2 epochs without a better F1",
    )
    opt.add_argument("--warmup_epochs", type=float, default=0.0, help="linear lr warmup from 0, in epochs")
    opt.add_argument("--lr_decay_step", type=int, default=20, help="epochs between lr drops (step) or restarts")
    opt.add_argument("--gamma", type=float, default=0.5, help="lr factor at each drop (step, plateau)")
    opt.add_argument(
        "--criterion",
        default="cross_entropy",
        help=f"loss: {', '.join(loss_module.criterion_names())} (per task for a multi-head model)",
    )
    opt.add_argument(
        "--class_weights",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="weight the loss by inverse class frequency of the training split",
    )
    opt.add_argument(
        "--task_weights",
        type=float,
        nargs=3,
        default=None,
        metavar=("MASK", "GENDER", "AGE"),
        help="multi-head model: weights of the three task losses (default 1 1 1)",
    )
    opt.add_argument(
        "--ema", type=float, default=0.0, metavar="DECAY", help="validate and keep an EMA of the weights (0: off)"
    )
    opt.add_argument("--grad_accum", type=int, default=1, help="micro-batches per optimizer step")
    opt.add_argument("--clip_grad", type=float, default=0.0, help="clip the gradient norm to this (0: off)")
    opt.add_argument("--mixup", type=float, default=0.0, metavar="ALPHA", help="mixup with Beta(ALPHA, ALPHA) (0: off)")
    opt.add_argument("--cutmix", type=float, default=0.0, metavar="ALPHA", help="cutmix with Beta(ALPHA, ALPHA)")
    opt.add_argument(
        "--cutmix_mode",
        choices=("box", "vertical"),
        default="box",
        help="cutmix patch: a random box, or everything right of a random column (suits portrait faces)",
    )
    opt.add_argument("--mix_prob", type=float, default=1.0, help="share of batches mixed when mixup/cutmix is on")
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
    run.add_argument(
        "--resume",
        default=None,
        metavar="RUN_DIR_OR_CHECKPOINT",
        help="continue a run in its directory from last.pth (or the given checkpoint); flags given here override "
        "its config",
    )
    run.add_argument("--amp", choices=("off", "fp16", "bf16"), default="off", help="mixed precision (fp16: CUDA only)")
    run.add_argument(
        "--channels_last", action=argparse.BooleanOptionalAction, default=False, help="NHWC memory layout (GPUs)"
    )
    run.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="torch.compile the model (falls back to eager with a warning where unsupported)",
    )
    run.add_argument(
        "--gpu_aug",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="flip, scale/shift, color jitter and normalization on the device, batch-wise, after the cache",
    )
    return p


def check_args(args: Namespace) -> None:
    """Reject impossible flags and unknown names before any data is read."""
    if not 0 < args.val_ratio < 1:
        raise UserError(f"--val_ratio {args.val_ratio} must be between 0 and 1 (e.g. 0.2)")
    for flag in ("epochs", "batch_size", "valid_batch_size", "lr_decay_step", "prefetch_factor", "grad_accum"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag} {getattr(args, flag)} must be at least 1")
    if min(args.resize) < 8:
        raise UserError(f"--resize {args.resize[0]} {args.resize[1]}: height and width must be at least 8 pixels")
    if args.lr <= 0:
        raise UserError(f"--lr {args.lr} must be positive")
    if not 0 <= args.ema < 1:
        raise UserError(f"--ema {args.ema} must be a decay in [0, 1), e.g. 0.999 (0: off)")
    for flag in ("mixup", "cutmix", "clip_grad", "warmup_epochs"):
        if getattr(args, flag) < 0:
            raise UserError(f"--{flag} {getattr(args, flag)} must be 0 (off) or more")
    if args.warmup_epochs >= args.epochs and args.scheduler != "none":
        raise UserError(f"--warmup_epochs {args.warmup_epochs} must be below --epochs {args.epochs}")
    if (args.mixup or args.cutmix) and not loss_module.accepts_soft_targets(args.criterion):
        raise UserError(
            f"--criterion {args.criterion} cannot learn from the soft targets of --mixup/--cutmix: use "
            f"{', '.join(n for n in loss_module.criterion_names() if loss_module.accepts_soft_targets(n))}"
        )
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
    if args.optimizer not in engine.optimizer_names():
        raise UserError(utils.unknown_name_message("--optimizer", args.optimizer, engine.optimizer_names()))
    model_module.check_model_name(args.model)
    if args.backbone:
        model_module.check_backbone_name(args.backbone)
    loss_module.check_criterion_name(args.criterion)
    if args.class_weights and not loss_module.accepts_class_weights(args.criterion):
        valid = [n for n in loss_module.criterion_names() if loss_module.accepts_class_weights(n)]
        raise UserError(f"--class_weights: --criterion {args.criterion} takes no class weights; use {', '.join(valid)}")
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


def make_loader(
    subset: torch.utils.data.Dataset,
    batch_size: int,
    args: Namespace,
    device: torch.device,
    sampler: engine.EpochSampler | None = None,
) -> DataLoader:
    """A training loader (with `sampler`: the order is a function of seed and epoch, see EpochSampler) or a
    validation loader (in order, every image once)."""
    return DataLoader(
        subset,
        batch_size=batch_size,
        sampler=sampler,
        # A last training batch of one image breaks BatchNorm; validation always sees every image.
        drop_last=sampler is not None and len(sampler) % batch_size == 1,
        num_workers=args.num_workers,
        pin_memory=device.type == "cuda" if args.pin_memory is None else args.pin_memory,
        persistent_workers=args.num_workers > 0 and args.persistent_workers,
        prefetch_factor=args.prefetch_factor if args.num_workers > 0 else None,
        worker_init_fn=utils.seed_worker,
        generator=torch.Generator().manual_seed(args.seed),
    )


SCHEDULE_FLAGS = ("epochs", "lr", "batch_size", "grad_accum", "scheduler", "warmup_epochs")


def given_flags(argv: Sequence[str]) -> set[str]:
    """The flags written on the command line (not defaulted), by destination name."""
    parser = get_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


def resume_args(args: Namespace, argv: Sequence[str]) -> tuple[Namespace, Path, dict[str, Any]]:
    """For --resume: (the run's flags overridden by those given now, its directory, the checkpoint)."""
    target = Path(args.resume)
    path = target / "last.pth" if target.is_dir() else target
    if not path.is_file():
        raise UserError(f"--resume {args.resume}: no checkpoint at {path}; give a run directory with last.pth")
    checkpoint = utils.load_checkpoint(path)
    if "rng" not in checkpoint:
        raise UserError(f"--resume {path} holds no training state (only weights): resume from a run's last.pth")
    config = checkpoint["config"]
    given = given_flags(argv) - {"resume"}
    merged = {k: config[k] for k in vars(args) if k in config}
    merged.update({k: getattr(args, k) for k in given})
    merged["resume"] = str(path)
    for flag in SCHEDULE_FLAGS:
        if flag in given and getattr(args, flag) != config.get(flag):
            print(
                f"warning: --{flag} {getattr(args, flag)} differs from the run's {config.get(flag)}: the schedule "
                "(and so the result) will differ from an uninterrupted run",
                file=sys.stderr,
            )
    return Namespace(**{**vars(args), **merged}), Path(config["run_dir"]), checkpoint


def main(args: Namespace, argv: Sequence[str] | None = None) -> Path:
    checkpoint = None
    if args.resume:
        args, run_dir, checkpoint = resume_args(args, sys.argv[1:] if argv is None else argv)
    check_args(args)
    device = utils.select_device(args.device)
    engine.check_amp(args.amp, device)
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
    train_transform, batch_transform = aug.train_transform, None
    if args.gpu_aug:  # the loader only hands over uint8 pixels; augmentation runs batch-wise on the device
        train_transform = augmentation_module.to_uint8_tensor
        batch_transform = augmentation_module.BatchAugment(args.resize, mean, std, aug.crop_fraction)
    train_set = dataset_module.ImageSubset(data, train_idx, train_transform, aug.load_size, cache)
    val_set = dataset_module.ImageSubset(data, val_idx, aug.eval_transform, aug.load_size, cache)
    sampler = engine.EpochSampler(len(train_set), args.seed)
    train_loader = make_loader(train_set, args.batch_size, args, device, sampler)
    val_loader = make_loader(val_set, args.valid_batch_size, args, device)
    print(
        f"Data: {data_dir} | {len(data)} images, {len(train_set)} train / {len(val_set)} val "
        f"({type(data).__name__}) | device {device}"
    )

    model = model_module.build_model(
        args.model, num_classes, args.pretrained, args.pretrained_path, backbone=args.backbone
    ).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    ema = engine.make_ema(model, args.ema) if args.ema else None
    class_counts = np.bincount(train_set.targets, minlength=num_classes).tolist()
    criterion = loss_module.create_criterion(
        args.criterion,
        num_classes=num_classes,
        class_counts=class_counts,
        class_weights=args.class_weights,
        tasks=model_module.task_sizes(model),
        task_weights=args.task_weights,
    )
    criterion = criterion.to(device)
    optimizer = engine.build_optimizer(
        model, args.optimizer, args.lr, args.weight_decay, args.momentum, args.decay_norm_bias
    )
    steps_per_epoch = len(train_loader)
    schedule = engine.Schedule(
        optimizer,
        args.scheduler,
        args.epochs,
        math.ceil(steps_per_epoch / args.grad_accum),
        args.warmup_epochs,
        args.lr_decay_step,
        args.gamma,
    )
    scaler = engine.make_scaler(args.amp, device)
    stopper = utils.EarlyStopping(args.patience)
    rows: list[dict[str, Any]] = []
    best_f1, best_epoch, first_epoch, progress = -1.0, 0, 1, None
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        schedule.load_state_dict(checkpoint["scheduler"])
        scaler.load_state_dict(checkpoint["scaler"])
        if ema is not None and checkpoint.get("ema"):
            ema.load_state_dict(checkpoint["ema"])
        stopper.load_state_dict(checkpoint["stopper"])
        rows, best_f1, best_epoch = checkpoint["rows"], checkpoint["best_score"], checkpoint["best_epoch"]
        progress = checkpoint["progress"]
        first_epoch = progress["epoch"] if progress else checkpoint["epoch"] + 1
        engine.set_rng_state(checkpoint["rng"])
        config = checkpoint["config"]
        resumed = {"from_epoch": checkpoint["epoch"], "command": " ".join(sys.argv)}
        config["resumed"] = [*config.get("resumed", []), resumed]
        steps = f" and {progress['step']} steps of epoch {progress['epoch']}" if progress else ""
        print(f"Resuming {run_dir} after epoch {checkpoint['epoch']}{steps}")
    else:
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
    train_model = engine.maybe_compile(model, args, device)
    if device.type == "cuda" and torch.cuda.device_count() > 1 and args.data_parallel:
        train_model = torch.nn.DataParallel(train_model)
    utils.save_json(config, run_dir / "config.json")
    if bad_images:
        rows_bad = "".join(f"{p}\t{r}\n" for p, r in bad_images.items())
        utils.atomic_write(run_dir / "bad_images.tsv", lambda f: f.write("path\treason\n" + rows_bad))
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(run_dir))
    print(f"Run directory: {run_dir}")

    val_targets = torch.as_tensor(val_set.targets)
    to_logits = functools.partial(model_module.to_class_logits, model=model)

    def state(epoch: int, progress: dict[str, Any] | None, weights: torch.nn.Module) -> dict[str, Any]:
        return {
            "model": weights,
            "optimizer": optimizer.state_dict(),
            "scheduler": schedule.state_dict(),
            "scaler": scaler.state_dict(),
            "ema": ema.state_dict() if ema is not None else None,
            "epoch": epoch,
            "progress": progress,
            "best_score": best_f1,
            "best_epoch": best_epoch,
            "stopper": stopper.state_dict(),
            "rows": rows,
            "rng": engine.rng_state(),
            "config": config,
        }

    with engine.StopRequest() as stop:
        for epoch in range(first_epoch, args.epochs + 1):
            start = time.time()
            if progress is None:
                progress = {"epoch": epoch, "step": 0, "loss_sum": 0.0, "preds": [], "targets": [], "time_s": 0.0}
            sampler.set_epoch(epoch, start=progress["step"] * args.batch_size)
            progress["steps"] = progress["step"] + len(train_loader)
            finished = engine.train_one_epoch(
                train_model,
                train_loader,
                criterion,
                optimizer,
                schedule,
                device,
                args,
                num_classes,
                progress,
                scaler,
                ema,
                batch_transform,
                stop,
                to_logits,
            )
            progress["time_s"] += time.time() - start
            if not finished:
                utils.save_checkpoint(run_dir / "last.pth", **state(epoch - 1, progress, model))
                writer.close()
                print(
                    f"Stopped by {stop.signal} in epoch {epoch} after step {progress['step']}; saved "
                    f"{run_dir / 'last.pth'}. Continue with: python train.py --resume {run_dir}"
                )
                return run_dir
            train_preds, train_targets = torch.cat(progress["preds"]).numpy(), torch.cat(progress["targets"]).numpy()
            train_loss, train_time = progress["loss_sum"] / len(train_targets), progress["time_s"]
            progress = None

            start = time.time()
            with engine.autocast(args.amp, device):
                outputs = utils.predict(train_model, val_loader, device, progress="validation")
            val_loss = criterion(outputs.to(device), val_targets.to(device)).item()
            val_preds = to_logits(outputs).argmax(1).numpy()
            val_f1 = utils.macro_f1(val_set.targets, val_preds, num_classes)
            score, best_weights = val_f1, model
            row = {
                "epoch": epoch,
                "train_loss": train_loss,
                "train_acc": float((train_preds == train_targets).mean()),
                "train_f1": utils.macro_f1(train_targets, train_preds, num_classes),
                "val_loss": val_loss,
                "val_acc": float((val_preds == val_set.targets).mean()),
                "val_f1": val_f1,
            }
            if ema is not None:
                with engine.autocast(args.amp, device):
                    ema_outputs = utils.predict(ema.module, val_loader, device, progress="validation (EMA)")
                ema_preds = to_logits(ema_outputs).argmax(1).numpy()
                row["ema_val_f1"] = utils.macro_f1(val_set.targets, ema_preds, num_classes)
                if row["ema_val_f1"] > val_f1:
                    score, best_weights, val_preds = row["ema_val_f1"], ema.module, ema_preds
            is_best = score > best_f1
            row.update({"lr": schedule.lr, "time_s": train_time + time.time() - start, "best": is_best})
            rows.append(row)
            print(report.log_line(row, args.epochs), flush=True)
            schedule.step_epoch(score)
            report.write_log(run_dir / "log.csv", rows)
            report.log_epoch(
                writer,
                row,
                val_set.targets,
                val_preds,
                data.class_names,
                lambda: torch.stack([val_set[i][0] for i in range(min(16, len(val_set)))]),
                mean,
                std,
            )

            if is_best:
                best_f1, best_epoch = score, epoch
                utils.save_checkpoint(run_dir / "best.pth", **{**state(epoch, None, best_weights), "rng": None})
                per_class = report.class_report(val_set.targets, val_preds, data.class_names)
                utils.atomic_write(run_dir / "best_report.csv", functools.partial(per_class.to_csv, index=False))
            stopping = stopper.step(score)
            utils.save_checkpoint(run_dir / "last.pth", **state(epoch, None, model))
            if stopping:
                print(f"Early stopping: no better validation macro F1 for {args.patience} epochs")
                break
            if stop:
                print(f"Stopped by {stop.signal} after epoch {epoch}; continue: python train.py --resume {run_dir}")
                break
    writer.close()
    print(f"Best validation macro F1 {best_f1:.4f} at epoch {best_epoch}; saved in {run_dir}")
    print(f"Next: python inference.py --model_dir {run_dir}")
    return run_dir


if __name__ == "__main__":
    utils.run_main(main, get_parser().parse_args())
