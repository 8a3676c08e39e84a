"""The run layout: where a run lives and what it holds, read and written in one place.

    model/exp/                  a run: config.json, best.pth, last.pth, log.csv, TensorBoard events
    model/exp2/                 the next run named exp (a run directory is never reused)
    model/kf/fold0/ ... foldK/  a k-fold run (--fold all): config.json at the top, one run per fold, oof.csv

    python -c "import rundir; print(rundir.newest_run('model'))"
    python -c "import rundir; print(rundir.read_config('model/exp')['model'])"

A checkpoint carries the run's whole config, so `load_model` rebuilds a model from a `best.pth` copied
anywhere, with or without the config.json beside it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import augmentation
import labels
import model as model_module
import settings
import utils
from utils import UserError

CONFIG = "config.json"
CHECKPOINTS = ("best", "last")
FOLD_DIR = re.compile(r"fold(\d+)")  # fold subdirectories of a k-fold run: fold0, fold1, ...

# Keys of config.json that are facts about the data and the machine, not flags: a recipe (--config) ignores them.
DATA_FACTS = (
    "weights",  # where the starting weights came from (weights.resolve's record)
    "num_classes",
    "class_names",
    "mean",
    "std",
    "load_size",
    "world_size",
    "global_batch_size",
    "run_dir",
    "fold_index",
    "skipped_images",
    "label_fix_report",
    "pseudo_label_counts",
    "versions",
    "git_commit",
    "command",
    "train_images",
    "val_images",
    "split_digest",
    "resumed",
    "trackers",
    "pruned",
    "flag_defaults",
)


def check_run_name(name: str, flag: str = "--name") -> None:
    """A `UserError` unless `name` is one folder name: a run lives in {model_dir}/{name} (an empty name, '..' or a
    path put it beside or outside --model_dir, where runs.py and inference.py's newest run never look)."""
    if name in ("", ".", "..") or any(c in name for c in ("/", "\\", "\0")):
        raise UserError(
            f"{flag} {name!r} must be one folder name (no '/', not '', '.' or '..'): the run goes in "
            "--model_dir/NAME; to put runs elsewhere, pass --model_dir"
        )


def increment_path(path: str | os.PathLike) -> Path:
    """Create and return a new directory `path`, else `path2`, `path3`, ...; never reuses one.

    `mkdir` without `exist_ok` is atomic, so two runs started at once still get different directories.
    """
    path = Path(path)
    settings.make_dir(path.parent, "--model_dir", "SM_MODEL_DIR")
    n = 1
    while True:
        candidate = path if n == 1 else path.with_name(f"{path.name}{n}")
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            n += 1


def remove_unused(run_dir: Path) -> None:
    """Remove a run directory this process created when the run was refused before its first checkpoint (a bad
    weights file, a flag that does not fit the data): a refused run leaves no directory behind to list or
    resume. A directory holding any checkpoint is kept."""
    if run_dir.is_dir() and not any(run_dir.rglob("*.pth")):
        shutil.rmtree(run_dir, ignore_errors=True)


def fold_dir(run_dir: Path, fold: int) -> Path:
    return run_dir / f"fold{fold}"


def fold_dirs(folder: Path) -> list[Path]:
    """The `fold{k}` subdirectories of a k-fold run directory that hold a config.json, by fold number."""
    if not folder.is_dir():
        return []
    folds = [p for p in folder.iterdir() if FOLD_DIR.fullmatch(p.name) and (p / CONFIG).is_file()]
    return sorted(folds, key=lambda p: int(p.name[4:]))


def is_fold_of_kfold_run(config: dict[str, Any]) -> bool:
    """A config of one fold of a `--fold all` run (its directory sits in the k-fold run's directory)."""
    return config.get("fold") == "all" and config.get("fold_index") is not None


def save_config(config: dict[str, Any], run_dir: Path) -> None:
    utils.save_json(config, run_dir / CONFIG)


def read_config(run_dir: Path) -> dict[str, Any]:
    """The run's config.json, checked for what rebuilding its model needs."""
    path = run_dir / CONFIG
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path} does not exist: pass a run directory written by train.py") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is damaged ({utils.reason(e)}); retrain or restore it") from None
    return check_config(config, path)


def check_config(config: Any, where: Path) -> dict[str, Any]:
    missing = [k for k in ("model", "num_classes", "augmentation") if not isinstance(config, dict) or k not in config]
    if missing:
        raise UserError(f"{where} is damaged (no {', '.join(missing)}); retrain or restore it")
    return config


def class_names_of(config: dict[str, Any]) -> list[str]:
    """The run's class names; the class indices as text for a run whose config.json predates class_names."""
    return [str(n) for n in config.get("class_names") or range(config["num_classes"])]


def newest_run(root: str | os.PathLike) -> Path:
    """The most recently trained run (or k-fold run) under `root`, by its newest best.pth."""
    root = Path(root)
    found = [(p, p.parent) for p in root.glob("*/best.pth")]
    found += [(p, p.parent.parent) for p in root.glob("*/fold*/best.pth") if FOLD_DIR.fullmatch(p.parent.name)]
    if not found:
        raise UserError(f"no trained run found under {root}: run python train.py first, or pass --model_dir")
    return max(found, key=lambda item: item[0].stat().st_mtime)[1]


def find_runs(root: Path) -> Iterator[tuple[Path, list[Path]]]:
    """(run directory, the directories holding its config.json and log.csv) for every run under `root`: a run
    is itself, a k-fold run is its fold0/, fold1/, ... Fold directories are not listed as runs of their own."""
    for folder, subdirs, files in os.walk(root):
        here = Path(folder)
        folds = fold_dirs(here)
        if folds:
            parts = [f for f in folds if (f / "log.csv").is_file()]
        elif CONFIG in files and "log.csv" in files:
            parts = [here]
        else:
            subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
            continue
        subdirs[:] = []  # nothing below a run directory is another run
        if parts:
            yield here, parts


def checkpoints(
    entry: str | os.PathLike, which: str = "best", flag: str = "--model_dir", env: str | None = None
) -> list[Path]:
    """The checkpoint files one `flag` entry (inference's --model_dir, train.py's --teacher) stands for: a
    checkpoint file itself, the `{which}.pth` of each fold of a k-fold run directory, or the run directory's own."""
    path = Path(entry)
    if path.is_file():
        return [path]
    folds = fold_dirs(path)
    if folds:
        return [f / f"{which}.pth" for f in folds]
    if not path.is_dir():
        given = settings.given(flag, path, env)
        raise UserError(f"{given} does not exist: pass a run directory, a k-fold run or a .pth file")
    if not (path / CONFIG).is_file() and not (path / f"{which}.pth").is_file():
        raise UserError(
            f"{settings.given(flag, path, env)} has no config.json: pass a run directory written by train.py "
            "(or a k-fold run directory holding fold0/, fold1/, ..., or a best.pth file)"
        )
    return [path / f"{which}.pth"]


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint with its config checked: what a model is rebuilt from."""
    settings.need(path, False, str(path), "the run did not finish an epoch; pick another --model_dir")
    checkpoint = utils.load_checkpoint(path)
    if not isinstance(checkpoint, dict) or "model" not in checkpoint:
        raise UserError(f"{path} is not a checkpoint written by train.py (no model weights in it)")
    if not isinstance(checkpoint.get("config"), dict) and (path.parent / CONFIG).is_file():
        checkpoint["config"] = read_config(path.parent)  # older checkpoints: the config.json beside them
    checkpoint["config"] = check_config(checkpoint.get("config"), path)
    return checkpoint


def build_model(config: dict[str, Any], **kwargs: Any) -> torch.nn.Module:
    """The model a run's config describes (weights freshly initialised), e.g. for training or to load into."""
    return model_module.build_model(
        config["model"],
        config["num_classes"],
        backbone=config.get("backbone"),
        # None (runs before --age_head): the model's own default, linear; recorded only for models that take it.
        age_head=config.get("age_head") if model_module.takes_argument(config["model"], "age_head") else None,
        freeze_stages=config.get("freeze_stages") or 0,
        freeze_bn=config.get("freeze_bn") or False,
        **labels.model_kwargs(),
        **kwargs,
    )


def build_augmentation(config: dict[str, Any]) -> Any:
    """The run's augmentation preset at its training size and normalization (its eval_transform and load_size)."""
    aug_cls = utils.find_class(augmentation, config["augmentation"], "the run's augmentation")
    return aug_cls(resize=config["resize"], mean=config["mean"], std=config["std"])


def load_model(path: Path, config: dict[str, Any] | None = None) -> tuple[torch.nn.Module, dict[str, Any]]:
    """(the model of a checkpoint with its weights, on the CPU, in eval mode; the run's config): the model that
    `config` describes (default: the config the checkpoint carries)."""
    checkpoint = load_checkpoint(path)
    config = checkpoint["config"] if config is None else config
    model = build_model(config)
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as e:
        detail = utils.reason(e)
        where = path.parent / CONFIG if (path.parent / CONFIG).is_file() else f"the config inside {path}"
        raise UserError(f"{path} does not match the model in {where} ({detail})") from None
    return model.eval(), config


# ---------------------------------------------------------------------------------------------------
# What `train.py --resume` and `--config` read.
# ---------------------------------------------------------------------------------------------------
# Ensembles: the checkpoints of several runs.
@dataclass
class Member:
    """One model of the ensemble: its checkpoint, its share of the probability average, its run's config."""

    checkpoint: Path
    weight: float
    config: dict[str, Any]


def resolve_members(
    model_dirs: Sequence[str],
    weights: Sequence[float] | None,
    which: str = "best",
    flag: str = "--model_dir",
    env: str | None = None,
) -> list[Member]:
    """Every checkpoint of an ensemble (inference's --model_dir, train.py's --teacher) with its normalized weight;
    checks the weights and that they share classes. An entry is a run directory, a k-fold run directory (its folds
    share the entry's weight) or a .pth file."""
    if weights is not None and len(weights) != len(model_dirs):
        raise UserError(
            f"--weights has {len(weights)} value(s) for {len(model_dirs)} {flag} entr(ies): give one per entry"
        )
    weights = list(weights) if weights is not None else [1.0] * len(model_dirs)
    if any(not np.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise UserError(f"--weights {' '.join(f'{w:g}' for w in weights)}: need numbers >= 0 with a positive sum")
    members = []
    for entry, weight in zip(model_dirs, weights, strict=True):
        paths = checkpoints(entry, which, flag, env)
        members += [Member(p, weight / len(paths) / sum(weights), member_config(p)) for p in paths]
    seen: dict[Path, Path] = {}
    for member in members:  # the same run twice (a shell glob, a k-fold run and one of its folds) counts it double
        twice = seen.setdefault(member.checkpoint.resolve(), member.checkpoint)
        if twice is not member.checkpoint:
            also = f" (also as {twice})" if twice != member.checkpoint else ""
            more = "; --weights counts one run more than another" if flag == "--model_dir" else ""
            raise UserError(f"{flag} names the checkpoint {member.checkpoint} twice{also}: give each run once{more}")
    first = members[0]
    for other in members[1:]:
        why = class_difference(class_names_of(first.config), class_names_of(other.config))
        if why:
            raise UserError(
                f"{first.checkpoint.parent} and {other.checkpoint.parent} predict different classes ({why}): "
                "ensemble only runs trained on the same class_names"
            )
    return members


def class_difference(a: Sequence[str], b: Sequence[str]) -> str | None:
    """The first way two class lists differ ("class 3 is 'x' vs 'y'", "18 vs 3 classes"), None when equal."""
    a, b = list(a), list(b)
    if a == b:
        return None
    diffs = [f"class {i} is '{x}' vs '{y}'" for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y]
    return diffs[0] if diffs else f"{len(a)} vs {len(b)} classes"


def member_config(checkpoint: Path) -> dict[str, Any]:
    """The run's config.json beside the checkpoint, else the config the checkpoint carries."""
    if (checkpoint.parent / CONFIG).is_file():
        return read_config(checkpoint.parent)
    return load_checkpoint(checkpoint)["config"]


def read_recipe(path: str) -> dict[str, Any]:
    """The flag: value pairs of a YAML or JSON recipe file."""
    file = settings.need(path, False, f"--config {path}", "give a YAML or JSON file of flag: value pairs")
    try:
        if file.suffix.lower() == ".json":
            values = json.loads(file.read_text())
        else:
            import yaml

            values = yaml.safe_load(file.read_text())
    except Exception as e:  # a YAML or JSON syntax error: its own message says where
        raise UserError(f"--config {path} cannot be read ({utils.reason(e)})") from None
    if not isinstance(values, dict):
        raise UserError(f"--config {path} must hold flag: value pairs (a mapping), not {type(values).__name__}")
    return values


def resume_checkpoint(path: Path) -> dict[str, Any]:
    checkpoint = utils.load_checkpoint(path)
    if not isinstance(checkpoint, dict) or not checkpoint.get("rng") or "config" not in checkpoint:
        raise UserError(f"--resume {path} holds no training state (only weights): resume from a run's last.pth")
    return checkpoint


def find_resumed_run(target: Path) -> tuple[Path, dict[str, Any], dict[int | None, Path]]:
    """(the run's directory, its config, {fold: the checkpoint given}) for `--resume target`."""
    if target.is_file():
        config = resume_checkpoint(target)["config"]
        kfold = is_fold_of_kfold_run(config)
        return (target.parent.parent if kfold else target.parent), config, {config.get("fold_index"): target}
    if (target / "last.pth").is_file():
        config = resume_checkpoint(target / "last.pth")["config"]
        return (target.parent if is_fold_of_kfold_run(config) else target), config, {}
    folds = fold_dirs(target)
    if (target / CONFIG).is_file() and read_config(target).get("fold") == "all":
        return target, read_config(target), {}
    if folds:  # a k-fold run without its own config.json: the first fold's, for the whole run
        return target, {**read_config(folds[0]), "fold_index": None}, {}
    raise UserError(f"--resume {target}: no checkpoint at {target / 'last.pth'}; give a run directory with last.pth")
