"""train.py's flags: every flag with its default and help, by group (the add_*_flags), and what each must be,
checked before any data is read: every numeric flag within its range (FLAG_RANGES), names that exist (dataset,
augmentation, model, optimizer, criterion), and combinations that work.

    python train.py --patience -1        # error: --patience -1 must be 0 (off) or more
    python train.py --model resnet99     # error: the closest name and the valid ones
"""

from __future__ import annotations

import argparse
import sys
from argparse import Namespace
from collections.abc import Callable
from typing import Any

import augmentation as augmentation_module
import dataset as dataset_module
import demo
import devices
import engine
import loss as loss_module
import model as model_module
import rundir
import schedule
import settings
import splits
import utils
import weights as weights_module
from utils import UserError

# The fine-tuning defaults for pretrained weights, chosen by measurement (README, Results)
BACKBONE_LR_SCALE = 1.0  # --backbone_lr_scale
FREEZE_STAGES = 3  # --freeze_stages: the stem and the first two stages of blocks, for a timm architecture


def dataset_classes() -> dict[str, type]:
    return utils.module_classes(dataset_module, lambda c: hasattr(c, "split_dataset"))


# ---------------------------------------------------------------------------------------------------
# The flags, by --help group.
def add_data_flags(data: argparse._ArgumentGroup) -> None:
    data.add_argument(
        "--data_dir",
        default=settings.env_value("SM_CHANNEL_TRAIN"),
        help=f"folder of person folders [$SM_CHANNEL_TRAIN; when unset: {demo.DEFAULT_TRAIN_DIR} if it "
        f"exists, else the demo data in {demo.DEMO_DIR}, generated once]",
    )
    data.add_argument(
        "--dataset",
        default="MaskSplitByProfileDataset",
        help=f"dataset class in dataset.py. {utils.describe(dataset_classes())}",
    )
    data.add_argument(
        "--split",
        choices=splits.SPLITS,
        default="auto",
        help="how validation images are chosen: by class share, by group (a person, a source photo), or both; auto: "
        "both when the data has groups",
    )
    data.add_argument(
        "--group_pattern",
        default=None,
        help="ImageFolderDataset: regex whose first group, found in a file name, is the image's group (e.g. '^(.+?)_')",
    )
    data.add_argument(
        "--image_column", default=None, help="CSVDataset: column of image paths (default: path/image/file)"
    )
    data.add_argument("--label_column", default="label", help="CSVDataset: column of labels")
    data.add_argument("--group_column", default=None, help="CSVDataset: column of group ids for grouped splits")
    data.add_argument(
        "--image_root", default=None, help="CSVDataset: folder the image paths are relative to (default: the CSV's)"
    )
    data.add_argument("--n_splits", type=int, default=5, help="folds of the k-fold split (with --fold)")
    data.add_argument(
        "--fold",
        default=None,
        help="train fold i (0..n_splits-1) of a grouped, stratified k-fold, or 'all' folds into fold0/, fold1/, ... "
        "with out-of-fold predictions in oof.csv (default: one holdout split of --val_ratio)",
    )
    data.add_argument(
        "--label_fixes",
        default=None,
        metavar="CSV",
        help="corrected labels applied while indexing: rows id,field,value (id: a person id or an image path; "
        "field: gender, age or mask; label for folder/CSV data), e.g. 000123,gender,female",
    )
    data.add_argument(
        "--sampler",
        choices=("shuffle", "weighted"),
        default="shuffle",
        help="training order: each image once per epoch, or drawn by inverse class frequency (with replacement)",
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
        "--train_age_bounds",
        type=int,
        nargs=2,
        default=None,
        metavar=("YOUNG", "OLD"),
        help="mask datasets: the age band edges training learns (e.g. 30 58: persons of 58 and 59 learnt as old); "
        "validation, the metric and the predictions keep --age_bounds (default: --age_bounds)",
    )
    data.add_argument(
        "--age_sigma",
        type=float,
        default=0.0,
        metavar="YEARS",
        help="mask datasets: learn the age band as probabilities from the age in years, blurred by a normal "
        "distribution of this spread (near a band edge, part of the other band); 0: the band alone",
    )


def add_loader_flags(data: argparse._ArgumentGroup) -> None:
    data.add_argument(
        "--augmentation",
        default=None,
        help="augmentation preset in augmentation.py (default: FaceAugmentation for the mask datasets, else "
        f"BaseAugmentation). {utils.describe(augmentation_module.augmentation_classes())}",
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
        default=settings.env_value("CACHE_DIR", "./cache"),
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
        default=settings.env_int("PREFETCH_FACTOR", 2, "--prefetch_factor", minimum=1),
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
        default=[192, 144],
        metavar=("H", "W"),
        help="network input height and width in pixels",
    )
    data.add_argument(
        "--mean_std",
        choices=("auto", "weights", "seed", "imagenet", "compute"),
        default="auto",
        help="normalization: the one the pretrained weights were trained with (timm's pretrained_cfg), the "
        "competition's values, ImageNet's, or computed from a sample of images; auto: weights when starting from "
        "pretrained weights, else seed",
    )
    data.add_argument(
        "--num_workers",
        type=int,
        default=settings.env_int("NUM_WORKERS", utils.default_num_workers(), "--num_workers"),
        help="data loader processes [$NUM_WORKERS; default: CPU cores - 1, at most 8]",
    )


def add_model_flags(net: argparse._ArgumentGroup) -> None:
    net.add_argument(
        "--model",
        default=None,
        help="any timm architecture name, a class in model.py, or path/to/file.py:ClassName of your own (default: "
        f"MultiHeadModel for the mask datasets, else BaseModel). {utils.describe(model_module.model_classes())}",
    )
    net.add_argument(
        "--pretrained",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="start from ImageNet weights: an installed weights package for the architecture (no network; "
        f"installed: {', '.join(weights_module.installed()) or 'none'}), else timm's hub (online, or its cache); "
        "default: on where a package installs the weights, else off (from a random start)",
    )
    net.add_argument(
        "--pretrained_path", default=None, help="start from weights in this local file (head replaced; wins over "
        "--pretrained)"
    )  # fmt: skip
    net.add_argument(
        "--backbone",
        default=None,
        help="for --model MultiHeadModel: BaseModel, any timm architecture, or path/to/file.py:ClassName (built with "
        "num_classes=0, returning num_features pooled features) under the mask/gender/age heads (default: "
        f"{weights_module.DEFAULT_BACKBONE})",
    )
    net.add_argument(
        "--freeze_stages",
        type=int,
        default=None,
        metavar="N",
        help="pretrained timm backbone: the first N layer groups (the stem, then each stage of blocks) keep their "
        f"weights and get no backward pass (0: train all; default: {FREEZE_STAGES} when starting from a timm "
        "architecture's pretrained weights, else 0)",
    )
    net.add_argument(
        "--freeze_bn",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="pretrained weights: every BatchNorm layer keeps its statistics and affine weights (FrozenBatchNorm2d)",
    )
    net.add_argument(
        "--age_head",
        choices=tuple(model_module.AGE_HEADS),
        default=None,
        help="for --model MultiHeadModel: the age band's layer, linear (a softmax) or ordinal (one score against "
        f"ordered cut-points, model.OrdinalHead) (default: {model_module.DEFAULT_AGE_HEAD})",
    )


def add_optimization_flags(opt: argparse._ArgumentGroup) -> None:
    opt.add_argument("--epochs", type=int, default=6, help="passes over the training split")
    opt.add_argument("--batch_size", type=int, default=64, help="training images per step (per process)")
    opt.add_argument("--valid_batch_size", type=int, default=256, help="images per validation batch")
    opt.add_argument(
        "--optimizer",
        default="AdamW",
        help="class name in torch.optim (those that step without a closure on dense gradients: not LBFGS, "
        "SparseAdam or Muon)",
    )
    opt.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (of the heads)")
    opt.add_argument(
        "--backbone_lr_scale",
        type=float,
        default=None,
        metavar="SCALE",
        help="the backbone's learning rate as a share of --lr, the heads (a timm model's classifier, a multi-head "
        f"model's heads) keeping --lr; default: {BACKBONE_LR_SCALE} when starting from pretrained weights, else 1",
    )
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
        choices=schedule.SCHEDULERS,
        default="cosine",
        help="lr schedule, stepped per iteration: constant, x gamma every lr_decay_step epochs, cosine to 0, "
        "cosine restarting every lr_decay_step epochs, one-cycle, or x gamma after 2 epochs without a better F1",
    )
    opt.add_argument("--warmup_epochs", type=float, default=1.0, help="linear lr warmup from 0, in epochs")
    opt.add_argument("--lr_decay_step", type=int, default=20, help="epochs between lr drops (step) or restarts")
    opt.add_argument("--gamma", type=float, default=0.5, help="lr factor at each drop (step, plateau)")
    add_loss_flags(opt)


def add_loss_flags(opt: argparse._ArgumentGroup) -> None:
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
        "--eval_metric",
        choices=tuple(engine.EVAL_METRICS),
        default="macro_f1",
        help="what selects best.pth and drives --patience and the plateau schedule: validation macro F1 (the "
        "competition's metric), accuracy, or loss (lower is better)",
    )
    opt.add_argument(
        "--patience",
        type=int,
        default=0,
        help="stop after this many epochs without a better --eval_metric (0: never)",
    )


def add_second_stage_flags(opt: argparse._ArgumentGroup) -> None:
    """After the first models: weight averaging, distillation from them, pseudo-labels from their predictions."""
    opt.add_argument(
        "--swa_start",
        type=int,
        default=0,
        metavar="EPOCH",
        help="keep a stochastic weight average from this epoch on (torch.optim.swa_utils), validated each epoch; "
        "best.pth holds it when it scores better (0: off)",
    )
    opt.add_argument(
        "--swa_lr",
        type=float,
        default=None,
        help="the learning rate SWA anneals to in one epoch and holds (default: the one reached at --swa_start)",
    )
    opt.add_argument(
        "--teacher",
        nargs="+",
        default=None,
        metavar="RUN",
        help="distil from these runs, k-fold runs or .pth files (an ensemble, weighted equally): they predict each "
        "training batch and the student also learns their soft predictions",
    )
    opt.add_argument(
        "--kd_alpha", type=float, default=0.7, help="--teacher: share of the distillation term in the loss"
    )
    opt.add_argument(
        "--kd_temperature", type=float, default=2.0, help="--teacher: softmax temperature of teacher and student"
    )
    opt.add_argument(
        "--kd_cache",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="--teacher: the teachers predict each training image once, un-augmented, instead of every batch "
        "(cheaper on a slow device; the student then learns their view of the plain image)",
    )
    opt.add_argument(
        "--pseudo_labels",
        default=None,
        metavar="PROBS_CSV",
        help="add the eval images this probs.csv (inference.py --save_probs) predicts confidently to the training "
        "split, never to validation",
    )
    opt.add_argument(
        "--pseudo_threshold", type=float, default=0.9, help="--pseudo_labels: the top probability an image needs"
    )
    opt.add_argument(
        "--pseudo_max_share",
        type=float,
        default=0.5,
        help="--pseudo_labels: at most this share of the training split's size, the most confident first",
    )
    opt.add_argument(
        "--pseudo_soft",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="--pseudo_labels: train on the probabilities as soft targets, not the top class",
    )
    opt.add_argument(
        "--pseudo_dir",
        default=None,
        help="--pseudo_labels: the folder its images are in (default: the one probs.json beside it records)",
    )


def add_runtime_flags(run: argparse._ArgumentGroup) -> None:
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
        default=settings.env_value("SM_MODEL_DIR", "./model"),
        help="where run directories are created [$SM_MODEL_DIR]",
    )
    run.add_argument(
        "--sync_bn", action=argparse.BooleanOptionalAction, default=False, help="torchrun: synchronized BatchNorm"
    )
    run.add_argument(
        "--dist_timeout", type=float, default=30.0, help="torchrun: minutes a process waits for the others"
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
        "--channels_last",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="NHWC memory layout of the model and its input (faster on GPUs, and for the default backbone on a CPU: "
        "bench/bench_pretrained.py)",
    )
    run.add_argument(
        "--deterministic",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="deterministic cuDNN/cuBLAS kernels, so a resumed GPU run matches an uninterrupted one (slower; the "
        "CPU is deterministic either way)",
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
        default=None,
        help="flip, scale/shift, color jitter and normalization on the device, batch-wise, after the cache "
        "(augmentation.BatchAugment) (default: on for the preset it reproduces, FaceAugmentation, on a GPU or a CPU; "
        "--no-gpu_aug keeps its per-image steps in loader workers)",
    )


FLAG_RANGES: dict[str, settings.Range] = {  # every numeric flag: what it must be
    "n_splits": settings.at_least(2),
    "val_ratio": ("between 0 and 1 (e.g. 0.2)", lambda v: 0 < v < 1),
    "age_bounds": settings.at_least(1),
    "train_age_bounds": settings.at_least(1),
    "age_sigma": ("0 (off) or more years", lambda v: v >= 0),
    "prefetch_factor": settings.at_least(1),
    "resize": ("at least 8 pixels", lambda v: v >= 8),
    "num_workers": ("0 or more", lambda v: v >= 0),
    "epochs": settings.at_least(1),
    "batch_size": settings.at_least(1),
    "valid_batch_size": settings.at_least(1),
    "lr": ("positive", lambda v: v > 0),
    "backbone_lr_scale": ("in (0, 1], a share of --lr", lambda v: 0 < v <= 1),
    "freeze_stages": ("0 (off) or more", lambda v: v >= 0),
    "weight_decay": ("0 or more", lambda v: v >= 0),
    "momentum": ("in [0, 1)", lambda v: 0 <= v < 1),
    "warmup_epochs": ("0 (off) or more", lambda v: v >= 0),
    "lr_decay_step": settings.at_least(1),
    "gamma": ("in (0, 1], the factor the rate is multiplied by", lambda v: 0 < v <= 1),
    "task_weights": ("0 or more", lambda v: v >= 0),
    "ema": ("a decay in [0, 1), e.g. 0.999 (0: off)", lambda v: 0 <= v < 1),
    "swa_start": ("0 (off) or an epoch to start from", lambda v: v >= 0),
    "swa_lr": ("positive", lambda v: v > 0),
    "kd_alpha": ("in [0, 1], the distillation term's share", lambda v: 0 <= v <= 1),
    "kd_temperature": ("positive", lambda v: v > 0),
    "pseudo_threshold": ("a probability in (0, 1]", lambda v: 0 < v <= 1),
    "pseudo_max_share": ("positive (a share of the training split's size)", lambda v: v > 0),
    "grad_accum": settings.at_least(1),
    "clip_grad": ("0 (off) or more", lambda v: v >= 0),
    "mixup": ("0 (off) or more", lambda v: v >= 0),
    "cutmix": ("0 (off) or more", lambda v: v >= 0),
    "mix_prob": ("a probability in (0, 1]", lambda v: 0 < v <= 1),
    "patience": ("0 (off) or more", lambda v: v >= 0),
    "seed": ("0 or more (numpy takes no negative seed)", lambda v: 0 <= v < 2**32),
    "dist_timeout": ("positive (minutes)", lambda v: v > 0),
}


# ---------------------------------------------------------------------------------------------------
# What each flag must be.
def check_soft_targets(args: Namespace) -> None:
    """Flags that train on class probabilities need a criterion that learns from them, and are not mixed."""
    soft = [f for f, on in (("--pseudo_soft", args.pseudo_soft), ("--age_sigma", args.age_sigma)) if on]
    for wanted, flags in ((args.mixup or args.cutmix, "--mixup/--cutmix"), (soft, " and ".join(soft))):
        if wanted and not loss_module.accepts_soft_targets(args.criterion):
            raise UserError(
                f"--criterion {args.criterion} cannot learn from the soft targets of {flags}: use "
                f"{', '.join(n for n in loss_module.criterion_names() if loss_module.accepts_soft_targets(n))}"
            )
    if soft and (args.mixup or args.cutmix):
        off = "hard pseudo-labels (no --pseudo_soft)" if soft[0] == "--pseudo_soft" else "--age_sigma 0"
        raise UserError(f"{soft[0]} cannot be mixed by --mixup/--cutmix (they mix class labels): use {off} with them")


# A flag that acts only through another: (whether that one is on, what to add). Given without it, it would change
# nothing while the user believes it does; a value equal to the default is no change, so recipes pass.
NEEDS: dict[str, tuple[Callable[[Namespace], Any], str]] = {
    "kd_alpha": (lambda a: a.teacher, "--teacher RUN [RUN ...]"),
    "kd_temperature": (lambda a: a.teacher, "--teacher RUN [RUN ...]"),
    "kd_cache": (lambda a: a.teacher, "--teacher RUN [RUN ...]"),
    "pseudo_threshold": (lambda a: a.pseudo_labels, "--pseudo_labels PROBS_CSV"),
    "pseudo_max_share": (lambda a: a.pseudo_labels, "--pseudo_labels PROBS_CSV"),
    "pseudo_soft": (lambda a: a.pseudo_labels, "--pseudo_labels PROBS_CSV"),
    "pseudo_dir": (lambda a: a.pseudo_labels, "--pseudo_labels PROBS_CSV"),
    "swa_lr": (lambda a: a.swa_start, "--swa_start EPOCH"),
    "mix_prob": (lambda a: a.mixup or a.cutmix, "--mixup ALPHA or --cutmix ALPHA"),
    "cutmix_mode": (lambda a: a.cutmix, "--cutmix ALPHA"),
    "lr_decay_step": (lambda a: a.scheduler in ("step", "cosine_restarts"), "--scheduler step or cosine_restarts"),
    "gamma": (lambda a: a.scheduler in ("step", "plateau"), "--scheduler step or plateau"),
    "wandb_entity": (lambda a: a.wandb, "--wandb PROJECT"),
    "wandb_group": (lambda a: a.wandb, "--wandb PROJECT"),
    "mlflow_experiment": (lambda a: a.mlflow, "--mlflow [URI]"),
}


def check_needs(args: Namespace, defaults: dict[str, Any]) -> None:
    """A flag set away from its default without the flag it acts through (`NEEDS`) is one line, not ignored."""
    for flag, (on, needs) in NEEDS.items():
        value = getattr(args, flag, None)
        if flag in defaults and value != defaults[flag] and not on(args):
            shown = "" if isinstance(value, bool) else f" {value:g}" if isinstance(value, float) else f" {value}"
            raise UserError(f"--{flag}{shown} needs {needs}: without it --{flag} changes nothing")


def check_args(args: Namespace, defaults: dict[str, Any]) -> None:
    """Reject impossible flags and unknown names before any data is read (`defaults`: train.py's flag defaults)."""
    settings.check_ranges(args, FLAG_RANGES)
    check_needs(args, defaults)
    if args.task_weights is not None and not sum(args.task_weights) > 0:
        raise UserError(f"--task_weights {' '.join(map(str, args.task_weights))}: at least one must be above 0")
    if args.swa_start > args.epochs:
        raise UserError(f"--swa_start {args.swa_start} is past --epochs {args.epochs}: start SWA at an epoch that is "
                        f"trained, e.g. --swa_start {max(1, args.epochs * 3 // 4)}")  # fmt: skip
    if args.warmup_epochs > args.epochs:
        raise UserError(f"--warmup_epochs {args.warmup_epochs} must not exceed --epochs {args.epochs}")
    check_soft_targets(args)
    rundir.check_run_name(args.name)
    for entry in args.teacher or []:  # each exists, before the data is read (or the demo data made)
        rundir.checkpoints(entry, "best", "--teacher")
    if args.kd_cache and (args.mixup or args.cutmix):
        raise UserError("--kd_cache holds the teachers' view of each plain image, which --mixup/--cutmix would not "
                        "match: drop --kd_cache (the teachers then see each mixed batch)")  # fmt: skip
    if args.fold is not None and args.fold != "all":
        if not args.fold.isdigit():
            raise UserError(f"--fold {args.fold} must be a fold number (0..{args.n_splits - 1}) or all")
    fold = None if args.fold in (None, "all") else int(args.fold)
    splits.check_split_args(args.split, fold, args.n_splits)
    for flag in ("age_bounds", "train_age_bounds"):
        bounds = getattr(args, flag)
        if bounds is not None and not bounds[0] < bounds[1]:
            raise UserError(f"--{flag} {bounds[0]} {bounds[1]}: the first must be below the second")
    for flag, classes in (
        ("--dataset", dataset_classes()),
        ("--augmentation", augmentation_module.augmentation_classes()),
    ):
        value = getattr(args, flag[2:])
        if value is not None and value not in classes:
            raise UserError(utils.unknown_name_message(flag, value, classes))
    schedule.check_optimizer(args.optimizer)
    if args.model is not None:
        model_module.check_model_name(args.model)
    if args.backbone:
        model_module.check_backbone_name(args.backbone)
    loss_module.check_criterion_name(args.criterion)
    if args.class_weights and args.sampler == "weighted" and (devices.distributed_env() or (0,))[0] == 0:  # once
        print("warning: --class_weights with --sampler weighted corrects the class imbalance twice (the rare classes "
              "then count about their rarity squared); keep one of the two", file=sys.stderr)  # fmt: skip
    if args.class_weights and not loss_module.accepts_class_weights(args.criterion):
        valid = [n for n in loss_module.criterion_names() if loss_module.accepts_class_weights(n)]
        raise UserError(f"--class_weights: --criterion {args.criterion} takes no class weights; use {', '.join(valid)}")
    if args.label_fixes:
        settings.need(
            args.label_fixes, False, f"--label_fixes {args.label_fixes}", "give a CSV file of id,field,value rows"
        )
    if args.pretrained_path:
        model_module.check_pretrained_path(args.pretrained_path)
