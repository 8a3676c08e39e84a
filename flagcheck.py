"""What train.py's flags must be, checked before any data is read: every numeric flag within its range
(FLAG_RANGES), names that exist (dataset, augmentation, model, optimizer, criterion), and combinations that work.

    python train.py --patience -1        # error: --patience -1 must be 0 (off) or more
    python train.py --model resnet99     # error: the closest name and the valid ones
"""

from __future__ import annotations

import math
from argparse import Namespace
from collections.abc import Callable
from pathlib import Path

import augmentation as augmentation_module
import dataset as dataset_module
import loss as loss_module
import model as model_module
import schedule
import splits
import utils
from utils import UserError


def dataset_classes() -> dict[str, type]:
    return utils.module_classes(dataset_module, lambda c: hasattr(c, "split_dataset"))


def at_least(low: float) -> tuple[str, Callable[[float], bool]]:
    return f"at least {low:g}", lambda v: v >= low


FLAG_RANGES: dict[str, tuple[str, Callable[[float], bool]]] = {  # every numeric flag: what it must be
    "n_splits": at_least(2),
    "val_ratio": ("between 0 and 1 (e.g. 0.2)", lambda v: 0 < v < 1),
    "age_bounds": at_least(1),
    "prefetch_factor": at_least(1),
    "resize": ("at least 8 pixels", lambda v: v >= 8),
    "num_workers": ("0 or more", lambda v: v >= 0),
    "epochs": at_least(1),
    "batch_size": at_least(1),
    "valid_batch_size": at_least(1),
    "lr": ("positive", lambda v: v > 0),
    "weight_decay": ("0 or more", lambda v: v >= 0),
    "momentum": ("in [0, 1)", lambda v: 0 <= v < 1),
    "warmup_epochs": ("0 (off) or more", lambda v: v >= 0),
    "lr_decay_step": at_least(1),
    "gamma": ("in (0, 1], the factor the rate is multiplied by", lambda v: 0 < v <= 1),
    "task_weights": ("0 or more", lambda v: v >= 0),
    "ema": ("a decay in [0, 1), e.g. 0.999 (0: off)", lambda v: 0 <= v < 1),
    "swa_start": ("0 (off) or an epoch to start from", lambda v: v >= 0),
    "swa_lr": ("positive", lambda v: v > 0),
    "kd_alpha": ("in [0, 1], the distillation term's share", lambda v: 0 <= v <= 1),
    "kd_temperature": ("positive", lambda v: v > 0),
    "grad_accum": at_least(1),
    "clip_grad": ("0 (off) or more", lambda v: v >= 0),
    "mixup": ("0 (off) or more", lambda v: v >= 0),
    "cutmix": ("0 (off) or more", lambda v: v >= 0),
    "mix_prob": ("a probability in (0, 1]", lambda v: 0 < v <= 1),
    "patience": ("0 (off) or more", lambda v: v >= 0),
    "seed": ("0 or more (numpy takes no negative seed)", lambda v: 0 <= v < 2**32),
    "dist_timeout": ("positive (minutes)", lambda v: v > 0),
}


def check_ranges(args: Namespace) -> None:
    """Every numeric flag within its range (FLAG_RANGES), finite: nan and inf pass no comparison here."""
    for flag, (rule, ok) in FLAG_RANGES.items():
        value = getattr(args, flag, None)
        values = list(value) if isinstance(value, (list, tuple)) else [] if value is None else [value]
        if not all(math.isfinite(v) and ok(v) for v in values):
            shown = " ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)
            raise UserError(f"--{flag} {shown} must be {rule}" + (" (each)" if len(values) > 1 else ""))


def check_args(args: Namespace) -> None:
    """Reject impossible flags and unknown names before any data is read."""
    check_ranges(args)
    if args.task_weights is not None and not sum(args.task_weights) > 0:
        raise UserError(f"--task_weights {' '.join(map(str, args.task_weights))}: at least one must be above 0")
    if args.swa_start > args.epochs:
        raise UserError(f"--swa_start {args.swa_start} is past --epochs {args.epochs}: start SWA at an epoch that is "
                        f"trained, e.g. --swa_start {max(1, args.epochs * 3 // 4)}")  # fmt: skip
    if args.swa_lr is not None and not args.swa_start:
        raise UserError(f"--swa_lr {args.swa_lr:g} needs --swa_start EPOCH (SWA is off)")
    if args.warmup_epochs > args.epochs:
        raise UserError(f"--warmup_epochs {args.warmup_epochs} must not exceed --epochs {args.epochs}")
    if (args.mixup or args.cutmix) and not loss_module.accepts_soft_targets(args.criterion):
        raise UserError(
            f"--criterion {args.criterion} cannot learn from the soft targets of --mixup/--cutmix: use "
            f"{', '.join(n for n in loss_module.criterion_names() if loss_module.accepts_soft_targets(n))}"
        )
    if args.num_workers < 0:
        raise UserError(f"--num_workers {args.num_workers} must be 0 or more")
    if args.fold is not None and args.fold != "all":
        if not args.fold.isdigit():
            raise UserError(f"--fold {args.fold} must be a fold number (0..{args.n_splits - 1}) or all")
    fold = None if args.fold in (None, "all") else int(args.fold)
    splits.check_split_args(args.split, fold, args.n_splits)
    if not args.age_bounds[0] < args.age_bounds[1]:
        raise UserError(f"--age_bounds {args.age_bounds[0]} {args.age_bounds[1]}: the first must be below the second")
    for flag, classes in (
        ("--dataset", dataset_classes()),
        ("--augmentation", augmentation_module.augmentation_classes()),
    ):
        value = getattr(args, flag[2:])
        if value is not None and value not in classes:
            raise UserError(utils.unknown_name_message(flag, value, classes))
    if args.optimizer not in schedule.optimizer_names():
        raise UserError(utils.unknown_name_message("--optimizer", args.optimizer, schedule.optimizer_names()))
    if args.model is not None:
        model_module.check_model_name(args.model)
    if args.backbone:
        model_module.check_backbone_name(args.backbone)
    loss_module.check_criterion_name(args.criterion)
    if args.class_weights and not loss_module.accepts_class_weights(args.criterion):
        valid = [n for n in loss_module.criterion_names() if loss_module.accepts_class_weights(n)]
        raise UserError(f"--class_weights: --criterion {args.criterion} takes no class weights; use {', '.join(valid)}")
    if args.label_fixes and not Path(args.label_fixes).is_file():
        problem = "is a folder" if Path(args.label_fixes).is_dir() else "does not exist"
        raise UserError(f"--label_fixes {args.label_fixes} {problem}: give a CSV file of id,field,value rows")
    if args.pretrained_path and not Path(args.pretrained_path).is_file():
        raise UserError(
            f"--pretrained_path {args.pretrained_path} does not exist: give the path of a local weights file"
        )
