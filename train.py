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
from typing import Any, NoReturn

import torch

import augmentation as augmentation_module
import cache as cache_module
import dataset as dataset_module
import demo
import devices
import distill
import engine
import imaging
import loggers
import model as model_module
import options
import predict
import pseudo
import report
import rundir
import utils
import weights
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
    options.add_data_flags(p.add_argument_group("data"))
    options.add_loader_flags(p.add_argument_group("data loading"))
    options.add_model_flags(p.add_argument_group("model"))
    options.add_optimization_flags(p.add_argument_group("optimization"))
    options.add_second_stage_flags(p.add_argument_group("second stage (SWA, distillation, pseudo-labels)"))
    options.add_runtime_flags(p.add_argument_group("runtime"))
    loggers.add_flags(p.add_argument_group("experiment tracking (TensorBoard always; console in train.log)"))
    return p


SCHEDULE_FLAGS = ("epochs", "lr", "batch_size", "grad_accum", "scheduler", "warmup_epochs")
# What the weights are of: a resumed run refuses to change them.
MODEL_FLAGS = ("model", "backbone", "age_head", "dataset", "label_column", "age_bounds", "resize")
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
    checker = get_parser()  # one parser checks every pair, its errors raised (see recipe_words)
    checker.error = refused  # type: ignore[method-assign]
    values, flags = rundir.read_recipe(path), vars(checker.parse_args([]))
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
        if key in facts or key in ("config", "resume") or (value is None and flags[key] is None):
            continue  # null where the flag's default is None (a run's config.json): the default
        words += recipe_words(path, key, value, flags[key], checker)
    return words


def refused(message: str) -> NoReturn:
    raise UserError(message)


def recipe_words(path: str, key: str, value: Any, default: Any, checker: argparse.ArgumentParser) -> list[str]:
    """One recipe pair as command-line words, checked by train.py's own parser: a value it refuses (a list for a
    one-value flag, `epochs:` left empty, a word for a number) is a `UserError` naming the file and the pair."""
    if value is None:
        raise UserError(f"--config {path}: '{key}' has no value; write one (the default is {default!r}) or delete it")
    if isinstance(default, bool) and not isinstance(value, bool):
        raise UserError(f"--config {path}: '{key}: {value}' is refused: {key} takes true or false")
    if isinstance(value, bool):
        words = [f"--{key}" if value else f"--no-{key}"]
    elif isinstance(value, list):
        words = [f"--{key}", *map(str, value)]
    else:
        words = [f"--{key}", str(value)]
    try:
        checker.parse_args(words)
    except UserError as e:
        raise UserError(
            f"--config {path}: '{key}: {value}' is refused ({e}); fix the value (python train.py --help lists the "
            "flags)"
        ) from None
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
def main(args: Namespace, argv: Sequence[str] | None = None, on_epoch: engine.EpochHook | None = None) -> Path:
    """Train the run `args` describes (`argv`: the words given, for --resume); `on_epoch` is a sweep's pruner."""
    resumed, checkpoints = None, {}
    if args.resume:
        args, resumed, checkpoints = resume_args(args, sys.argv[1:] if argv is None else argv)
    options.check_args(args, flag_defaults())
    loggers.check(vars(args))
    rank, world, device = devices.init_distributed(args.device, args.dist_timeout)
    try:
        with contextlib.redirect_stdout(open(os.devnull, "w")) if rank else report.ConsoleLog() as console:
            return train(args, resumed, checkpoints, world, device, on_epoch, None if rank else console)
    finally:
        devices.cleanup_distributed()


def resolve_defaults(args: Namespace, data: Any) -> None:
    """Defaults by data: the mask datasets get the face crop and the mask/gender/age heads (measured on real
    faces, README's Results), any other data a plain resize and a single head. A model file is recorded by its
    absolute path, so a run is rebuilt from any working directory."""
    mask_data = dataset_module.is_mask_data(data)
    args.model = args.model or ("MultiHeadModel" if mask_data else weights.DEFAULT_BACKBONE)
    args.augmentation = args.augmentation or ("FaceAugmentation" if mask_data else "BaseAugmentation")
    if args.backbone is None and model_module.takes_argument(args.model, "backbone"):
        args.backbone = weights.DEFAULT_BACKBONE  # recorded: a run's config names its backbone
    for flag in ("model", "backbone"):
        value = getattr(args, flag)
        if value and model_module.is_file_spec(value):
            path, _, name = value.rpartition(":")
            setattr(args, flag, f"{Path(path).expanduser().resolve()}:{name}")
    model_module.check_multi_head_use(args.model, backbone=args.backbone, age_head=args.age_head)
    if args.age_head is None and model_module.takes_argument(args.model, "age_head"):
        args.age_head = model_module.DEFAULT_AGE_HEAD
    given = [f for f, on in (("--train_age_bounds", args.train_age_bounds), ("--age_sigma", args.age_sigma)) if on]
    if given and not mask_data:
        raise UserError(f"{given[0]} is for the mask datasets (age in years in the folder names); drop it")


def resolve_weights(args: Namespace) -> weights.Weights | None:
    """Where the model's starting weights come from (--pretrained_path, an installed package, timm's hub), found
    before any file is written; --pretrained unset is on where a package installs the architecture's weights.
    Sets the flags that follow from it: --pretrained, --backbone_lr_scale, --freeze_stages."""
    arch = model_module.weights_architecture(args.model, args.backbone)
    flag = "--backbone" if arch != args.model else "--model"
    if args.pretrained is None:
        args.pretrained = weights.package_file(arch) is not None
    source = weights.resolve(arch, args.pretrained_path, args.pretrained, flag)
    if args.backbone_lr_scale is None:
        args.backbone_lr_scale = options.BACKBONE_LR_SCALE if source else 1.0
    if args.freeze_stages is None:  # timm's layer groups name the stages of its architectures
        args.freeze_stages = options.FREEZE_STAGES if source and model_module.is_timm_name(arch) else 0
    if (args.freeze_stages or args.freeze_bn) and source is None:
        shown = f"--freeze_stages {args.freeze_stages}" if args.freeze_stages else "--freeze_bn"
        raise UserError(f"{shown} holds layers as they start, and {flag} {arch} starts from a random init: add "
                        "--pretrained or --pretrained_path FILE, or drop it")  # fmt: skip
    print(f"Weights: {flag} {arch} from {weights.describe(source)}")
    return source


def augment_on_device(flag: bool | None, aug_cls: type) -> bool:
    """--gpu_aug as given, else on when BatchAugment reproduces the preset (FaceAugmentation): batch-wise on the
    training device, a GPU's or the CPU's, where it also trains faster than the loader workers' per-image steps
    (bench/bench_train.py --gpu_aug: 1.03x to 1.15x on 2 cores; README, Data loading speed)."""
    return getattr(aug_cls, "batch_equivalent", False) if flag is None else flag


def normalization(
    args: Namespace, data: Any, aug_cls: type, source: weights.Weights | None
) -> tuple[Sequence[float], Sequence[float]]:
    """--mean_std: auto is the pretrained weights' own normalization (timm's pretrained_cfg of a timm
    architecture), else the seed's."""
    arch = model_module.weights_architecture(args.model, args.backbone)
    cfg = weights.pretrained_cfg(arch)
    choice = args.mean_std if args.mean_std != "auto" else "weights" if source and cfg else "seed"
    if choice == "weights":
        if cfg is None:
            raise UserError(f"--mean_std weights: {arch} has no pretrained configuration in timm; use --mean_std "
                            "seed, imagenet or compute")  # fmt: skip
        return cfg.mean, cfg.std
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
        "pseudo_label_counts": data.report() if isinstance(data, pseudo.WithPseudoLabels) else None,
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
    on_epoch: engine.EpochHook | None = None,
    console: report.ConsoleLog | None = None,
) -> Path:
    predict.check_amp(args.amp, device)
    data_dir = demo.resolve_train_dir(args.data_dir, files_ok=args.dataset == "CSVDataset")
    devices.seed_everything(args.seed)
    data_cls = options.dataset_classes()[args.dataset]
    data = data_cls(**utils.filter_kwargs(data_cls, {**vars(args), "data_dir": data_dir}))
    resolve_defaults(args, data)
    source = resolve_weights(args)
    if args.pseudo_labels:
        args.pseudo_labels = str(Path(args.pseudo_labels).resolve())
        data = pseudo.add_pseudo_labels(data, args)
    if args.teacher:  # checked before any image is decoded; recorded by absolute path, for --resume from anywhere
        args.teacher = [str(m.checkpoint.resolve()) for m in distill.resolve_teachers(args.teacher, data.class_names)]
    data.split_dataset() if args.fold is None else data.fold_ids(args.n_splits)  # checked before any decoding
    aug_cls = augmentation_module.augmentation_classes()[args.augmentation]
    args.gpu_aug = augment_on_device(args.gpu_aug, aug_cls)
    mean, std = normalization(args, data, aug_cls, source)
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
    if console is not None:
        console.attach(run_dir)
    try:
        config = run_config(args, data, aug, (mean, std), data_dir, run_dir, bad_images, world)
        config["weights"] = source.record if source else None
        if devices.rank() == 0 and bad_images:
            rows_bad = "".join(f"{p}\t{r}\n" for p, r in bad_images.items())
            utils.atomic_write(run_dir / "bad_images.tsv", lambda f: f.write("path\treason\n" + rows_bad))
        resumed_from = checkpoints if resumed else None
        return train_folds(config, data, aug, cache, run_dir, resumed_from, world, device, on_epoch)
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
    on_epoch: engine.EpochHook | None = None,
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
        if checkpoint is not None:  # the resumes so far, and the W&B and MLflow runs it continues
            fold_config["resumed"] = checkpoint["config"].get("resumed", [])
            fold_config["trackers"] = dict(checkpoint["config"].get("trackers", {}))
        try:
            result = engine.fit(
                fold_config, data, aug, cache, fold, fold_dir, device, world, checkpoint, plan[k + 1 :], on_epoch
            )
        except utils.Stopped as stopped:
            stopped.run_dir = run_dir  # a k-fold run resumes through its own directory
            raise
        results.append(result)
    if kfold and devices.rank() == 0:
        report.write_oof(run_dir, data, results)
    return run_dir


if __name__ == "__main__":
    utils.run_main(lambda argv: main(parse_args(argv), argv), sys.argv[1:])
