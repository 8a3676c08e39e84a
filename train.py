"""Train a classifier and write a run directory: config.json, best.pth, last.pth, log.csv, TensorBoard events.

python train.py                                            # the demo data (generated once), default recipe
python train.py --data_dir /data/train/images --model resnet18 --criterion focal --epochs 20
SM_CHANNEL_TRAIN=/data/train/images python train.py --resize 256 192 --batch_size 32 --name r18
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import functools
import os
import sys
from argparse import Namespace
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

import augmentation as augmentation_module
import cache as cache_module
import dataset as dataset_module
import demo
import devices
import distill
import engine
import flagcheck
import imaging
import loss as loss_module
import model as model_module
import predict
import report
import rundir
import schedule
import splits
import utils
from utils import UserError


def get_parser() -> argparse.ArgumentParser:
    p = utils.ArgumentParser(description=__doc__)
    p.add_argument(
        "--config",
        default=None,
        metavar="RECIPE",
        help="a YAML or JSON file of flag: value pairs used as the defaults (flags given here still win); a run's "
        "config.json repeats that run",
    )
    add_data_flags(p.add_argument_group("data"))
    add_loader_flags(p.add_argument_group("data loading"))
    add_model_flags(p.add_argument_group("model"))
    add_optimization_flags(p.add_argument_group("optimization"))
    add_runtime_flags(p.add_argument_group("runtime"))
    return p


def add_data_flags(data: argparse._ArgumentGroup) -> None:
    data.add_argument(
        "--data_dir",
        default=utils.env_value("SM_CHANNEL_TRAIN"),
        help=f"folder of person folders [$SM_CHANNEL_TRAIN; when unset: {demo.DEFAULT_TRAIN_DIR} if it "
        f"exists, else the demo data in {demo.DEMO_DIR}, generated once]",
    )
    data.add_argument(
        "--dataset",
        default="MaskSplitByProfileDataset",
        help=f"dataset class in dataset.py. {utils.describe(flagcheck.dataset_classes())}",
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
        default=False,
        help="start from timm's published weights (downloads them; needs a network)",
    )
    net.add_argument("--pretrained_path", default=None, help="start from weights in this local file (head replaced)")
    net.add_argument(
        "--backbone",
        default=None,
        help="for --model MultiHeadModel: BaseModel, any timm architecture, or path/to/file.py:ClassName (built with "
        "num_classes=0, returning num_features pooled features) under the mask/gender/age heads",
    )


def add_optimization_flags(opt: argparse._ArgumentGroup) -> None:
    opt.add_argument("--epochs", type=int, default=24, help="passes over the training split")
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
        choices=schedule.SCHEDULERS,
        default="cosine",
        help="lr schedule, stepped per iteration: constant, x gamma every lr_decay_step epochs, cosine to 0, "
        "cosine restarting every lr_decay_step epochs, one-cycle, or x gamma after 2 epochs without a better F1",
    )
    opt.add_argument("--warmup_epochs", type=float, default=0.0, help="linear lr warmup from 0, in epochs")
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
        default=utils.env_value("SM_MODEL_DIR", "./model"),
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
        "--channels_last", action=argparse.BooleanOptionalAction, default=False, help="NHWC memory layout (GPUs)"
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
        default=False,
        help="flip, scale/shift, color jitter and normalization on the device, batch-wise, after the cache",
    )


SCHEDULE_FLAGS = ("epochs", "lr", "batch_size", "grad_accum", "scheduler", "warmup_epochs")
MODEL_FLAGS = ("model", "backbone", "dataset", "label_column", "age_bounds", "resize")  # what the weights are of
UNSET = object()  # the default of every flag when finding out which were given (not a str: argparse converts those)


def flag_defaults() -> dict[str, Any]:
    return vars(get_parser().parse_args([]))


def given_flags(argv: Sequence[str]) -> set[str]:
    """The flags written on the command line (not defaulted), by destination name."""
    parser = get_parser()
    parser.set_defaults(**dict.fromkeys(flag_defaults(), UNSET))
    return {k for k, v in vars(parser.parse_args(argv)).items() if v is not UNSET}


# ---------------------------------------------------------------------------------------------------
# Recipes: --config FILE sets defaults; the command line still wins.
def recipe_argv(path: str) -> list[str]:
    """A recipe as command-line words, to be put before the given ones (so that those win)."""
    values, flags = rundir.read_recipe(path), flag_defaults()
    unknown = [k for k in values if k not in flags and k not in rundir.DATA_FACTS]
    if unknown:
        close = difflib.get_close_matches(str(unknown[0]), list(flags), n=1, cutoff=0.5)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise UserError(
            f"--config {path}: '{unknown[0]}' is not a train.py flag{hint}; fix or remove it (python train.py --help "
            "lists the flags)"
        )
    facts = [k for k in values if k not in flags]
    if facts:
        print(f"--config {path}: ignoring what describes the data, measured again: {', '.join(facts)}", file=sys.stderr)
    words: list[str] = []
    for key, value in values.items():
        if key in facts or key in ("config", "resume") or value is None:
            continue
        if isinstance(value, bool):
            words.append(f"--{key}" if value else f"--no-{key}")
        elif isinstance(value, list):
            words += [f"--{key}", *map(str, value)]
        else:
            words += [f"--{key}", str(value)]
    return words


def parse_args(argv: Sequence[str] | None = None) -> Namespace:
    """The flags of `argv` (default: the command line) over those of its --config recipe, if any."""
    argv = list(sys.argv[1:] if argv is None else argv)
    known, _ = get_parser().parse_known_args(argv)
    words = recipe_argv(known.config) if known.config else []
    return get_parser().parse_args([*words, *argv])


# ---------------------------------------------------------------------------------------------------
# Resume: a run directory, a k-fold run (or any of its folds), or a checkpoint.
def resume_args(args: Namespace, argv: Sequence[str]) -> tuple[Namespace, Path, dict[int | None, Path]]:
    """For --resume: (the run's flags overridden by those given now, its directory, {fold: checkpoint given})."""
    run_dir, config, given_checkpoints = rundir.find_resumed_run(Path(args.resume))
    given = given_flags(argv) - {"resume"}
    merged = {k: config[k] for k in vars(args) if k in config}
    merged.update({k: getattr(args, k) for k in given})
    merged["resume"] = str(args.resume)
    check_same_model(args, config, given, run_dir)
    for flag in SCHEDULE_FLAGS:
        if flag in given and getattr(args, flag) != config.get(flag):
            print(
                f"warning: --{flag} {getattr(args, flag)} differs from the run's {config.get(flag)}: the schedule "
                "(and so the result) will differ from an uninterrupted run",
                file=sys.stderr,
            )
    merged["command"] = config.get("command", "")  # how the run began; each resume is recorded in `resumed`
    return Namespace(**{**vars(args), **merged}), run_dir, given_checkpoints


def check_same_model(args: Namespace, config: dict[str, Any], given: set[str], run_dir: Path) -> None:
    """A resumed run keeps what its weights are (architecture, classes, input size): a given flag that changes
    it is refused in one line, before anything is loaded."""
    for flag in MODEL_FLAGS:
        if flag not in given or flag not in config:
            continue
        now, then = getattr(args, flag), config[flag]
        if isinstance(now, str) and model_module.is_file_spec(now) and flag in ("model", "backbone"):
            path, _, name = now.rpartition(":")
            now = f"{Path(path).expanduser().resolve()}:{name}"
        if (list(now) if isinstance(now, (list, tuple)) else now) != then:
            shown = " ".join(map(str, now)) if isinstance(now, (list, tuple)) else now
            raise UserError(
                f"--resume {run_dir}: --{flag} {shown} differs from the run's {then!r}, and a run resumes with its own "
                f"model; drop --{flag}, or start a new run from its recipe: --config {run_dir / 'config.json'} "
                f"--{flag} {shown}"
            )


def fold_plan(config: dict[str, Any]) -> list[int | None]:
    """The folds to train: [None] for the holdout split, [i] for --fold i, [0, ..., K-1] for --fold all."""
    if config["fold"] is None:
        return [None]
    if config["fold"] == "all":
        return list(range(config["n_splits"]))
    return [int(config["fold"])]


# ---------------------------------------------------------------------------------------------------
def main(args: Namespace, argv: Sequence[str] | None = None) -> Path:
    resumed, checkpoints = None, {}
    if args.resume:
        args, resumed, checkpoints = resume_args(args, sys.argv[1:] if argv is None else argv)
    flagcheck.check_args(args)
    rank, world, device = devices.init_distributed(args.device, args.dist_timeout)
    try:
        with contextlib.redirect_stdout(open(os.devnull, "w")) if rank else contextlib.nullcontext():
            return train(args, resumed, checkpoints, world, device)
    finally:
        devices.cleanup_distributed()


def resolve_defaults(args: Namespace, data: Any) -> None:
    """Defaults by data: the mask datasets get the face crop and the mask/gender/age heads (measured on real
    faces, README's Results), any other data a plain resize and a single head. A model file is recorded by its
    absolute path, so a run is rebuilt from any working directory."""
    mask_data = isinstance(data, dataset_module.MaskBaseDataset)
    args.model = args.model or ("MultiHeadModel" if mask_data else "BaseModel")
    args.augmentation = args.augmentation or ("FaceAugmentation" if mask_data else "BaseAugmentation")
    for flag in ("model", "backbone"):
        value = getattr(args, flag)
        if value and model_module.is_file_spec(value):
            path, _, name = value.rpartition(":")
            setattr(args, flag, f"{Path(path).expanduser().resolve()}:{name}")
    model_module.check_backbone_use(args.model, args.backbone)


def normalization(args: Namespace, data: Any, aug_cls: type) -> tuple[Sequence[float], Sequence[float]]:
    if args.mean_std == "compute":
        load_size = aug_cls(resize=args.resize, mean=(0, 0, 0), std=(1, 1, 1)).load_size
        mean, std = imaging.compute_mean_std(data.image_paths, load_size, seed=args.seed)
        print(f"Computed mean {mean} and std {std} from {min(256, len(data))} images")
        return mean, std
    if args.mean_std == "imagenet":
        return dataset_module.IMAGENET_MEAN, dataset_module.IMAGENET_STD
    return dataset_module.SEED_MEAN, dataset_module.SEED_STD


def run_config(
    args: Namespace, data: Any, aug: Any, mean_std: tuple, data_dir: Path, run_dir: Path, bad: dict, world: int
) -> dict[str, Any]:
    """The one config: the resolved flags and the facts of the data, written to config.json and every checkpoint."""
    return {
        **vars(args),
        "data_dir": str(data_dir),
        "num_classes": data.num_classes,
        "class_names": data.class_names,
        "mean": list(mean_std[0]),
        "std": list(mean_std[1]),
        "resize": list(args.resize),
        "load_size": list(aug.load_size),
        "world_size": world,
        "global_batch_size": args.batch_size * world * args.grad_accum,
        "run_dir": str(run_dir),
        "skipped_images": sorted(bad),
        "label_fix_report": data.label_fix_report,
        "versions": utils.library_versions(),
        "git_commit": utils.git_commit(),
        "command": args.command if args.resume else " ".join(sys.argv),
        "flag_defaults": flag_defaults(),  # what runs.py compares an older run's missing flags with
    }


def train(
    args: Namespace,
    resumed: Path | None,
    checkpoints: dict[int | None, Path],
    world: int,
    device: torch.device,
) -> Path:
    predict.check_amp(args.amp, device)
    data_dir = demo.resolve_train_dir(args.data_dir, files_ok=args.dataset == "CSVDataset")
    devices.seed_everything(args.seed)
    data_cls = flagcheck.dataset_classes()[args.dataset]
    data = data_cls(**utils.filter_kwargs(data_cls, {**vars(args), "data_dir": data_dir}))
    resolve_defaults(args, data)
    if args.teacher:  # checked before any image is decoded; recorded by absolute path, for --resume from anywhere
        args.teacher = [str(m.checkpoint.resolve()) for m in distill.resolve_teachers(args.teacher, data.class_names)]
    data.split_dataset() if args.fold is None else data.fold_ids(args.n_splits)  # checked before any decoding
    aug_cls = augmentation_module.augmentation_classes()[args.augmentation]
    mean, std = normalization(args, data, aug_cls)
    aug = aug_cls(resize=args.resize, mean=mean, std=std)
    decode = functools.partial(imaging.decode_fixed, size=tuple(aug.load_size))
    bad_images, cache = cache_module.prepare_images(
        data, decode, aug.load_size, args.cache, args.num_workers + 1, args.cache_dir, args.skip_bad_images
    )  # workers: the loader's do not exist yet, so their cores decode
    run_dir = resumed
    if resumed is not None and devices.rank() == 0:  # what a killed writer left half-written, never to be renamed
        for folder in (run_dir, *rundir.fold_dirs(run_dir)):
            utils.remove_leftovers(folder)
    if run_dir is None:  # rank 0 names the run; every rank writes (only rank 0) into that one directory
        name = str(rundir.increment_path(Path(args.model_dir) / args.name)) if devices.rank() == 0 else None
        run_dir = Path(devices.broadcast_object(name))
    try:
        config = run_config(args, data, aug, (mean, std), data_dir, run_dir, bad_images, world)
        if devices.rank() == 0 and bad_images:
            rows_bad = "".join(f"{p}\t{r}\n" for p, r in bad_images.items())
            utils.atomic_write(run_dir / "bad_images.tsv", lambda f: f.write("path\treason\n" + rows_bad))
        return train_folds(config, data, aug, cache, run_dir, checkpoints if resumed else None, world, device)
    except UserError:
        if resumed is None and devices.rank() == 0:
            rundir.remove_unused(run_dir)
        raise


def train_folds(
    config: dict[str, Any],
    data: Any,
    aug: Any,
    cache: Any,
    run_dir: Path,
    checkpoints: dict[int | None, Path] | None,
    world: int,
    device: torch.device,
) -> Path:
    """Train every fold of the plan into its directory, then write oof.csv for a k-fold run. Resuming
    (`checkpoints` not None), a fold whose last.pth says finished is read back, an interrupted one continues
    from its last.pth (or the checkpoint given for it), and the rest train from the start."""
    plan, results = fold_plan(config), []
    kfold = len(plan) > 1
    if kfold and devices.rank() == 0:
        rundir.save_config({**config, "fold_index": None}, run_dir)
    for k, fold in enumerate(plan):
        fold_dir = rundir.fold_dir(run_dir, fold) if kfold else run_dir
        fold_config = {**config, "fold_index": fold, "run_dir": str(fold_dir)}
        checkpoint = None
        if checkpoints is not None and devices.rank() == 0:
            path = checkpoints.get(fold, fold_dir / "last.pth")
            checkpoint = rundir.resume_checkpoint(path) if path.is_file() else None
        # Only rank 0 reads and writes the run's files: other ranks (other machines, maybe without the shared file
        # system) get the checkpoint from it, and create no folder.
        checkpoint = devices.broadcast_object(checkpoint) if checkpoints is not None else None
        if checkpoint is not None and checkpoint.get("finished") and kfold:
            print(f"Fold {fold} of {config['n_splits']}: finished in {fold_dir}")
            results.append(engine.fold_result(checkpoint))
            continue
        if kfold and devices.rank() == 0:
            fold_dir.mkdir(exist_ok=True)
            print(f"Fold {fold} of {config['n_splits']}: {fold_dir}")
        if checkpoint is not None:
            fold_config["resumed"] = checkpoint["config"].get("resumed", [])
        try:
            result = engine.fit(fold_config, data, aug, cache, fold, fold_dir, device, world, checkpoint, plan[k + 1 :])
        except utils.Stopped as stopped:
            stopped.run_dir = run_dir  # a k-fold run resumes through its own directory
            raise
        results.append(result)
    if kfold and devices.rank() == 0:
        report.write_oof(run_dir, data, results)
    return run_dir


if __name__ == "__main__":
    utils.run_main(lambda argv: main(parse_args(argv), argv), sys.argv[1:])
