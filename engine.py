"""One training run as an object: `RunState` holds everything a run is (model, EMA, optimizer, schedule,
scaler, early stopping, epoch and step, best score, RNG states, the folds still to train); its `state_dict()`
is the checkpoint and `load_state_dict()` is resume. `fit` trains one split with it and validates through
`predict.evaluate`, the prediction loop inference uses.

    python train.py --amp bf16 --scheduler onecycle --warmup_epochs 1 --ema 0.999 --mixup 0.2
    python train.py --cutmix 1.0 --cutmix_mode vertical --grad_accum 2 --clip_grad 5
    python train.py --resume model/exp            # continue a stopped run in the same directory

The engine reads the run's config dict (resolved flags and data facts), never the command line.
"""

from __future__ import annotations

import dataclasses
import math
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import DataLoader, Dataset

import augmentation
import cam
import devices
import distill
import loss as loss_module
import model as model_module
import predict
import report
import rundir
import schedule as schedule_module
import splits
import subset as subset_module
import utils
from loop import EpochSampler, LoopSettings, make_loader, train_one_epoch

# ---------------------------------------------------------------------------------------------------
# Compile


def maybe_compile(model: nn.Module, enabled: bool, resize: Sequence[int], device: torch.device) -> nn.Module:
    """torch.compile(model) when --compile works here; else a warning and the eager model."""
    if not enabled:
        return model
    compiled = torch.compile(model)
    try:
        with torch.no_grad():
            compiled.eval()(torch.zeros(2, 3, *resize, device=device))
    except Exception as e:  # missing compiler toolchain, unsupported platform or op
        print(
            f"warning: --compile failed here ({utils.reason(e, 160)}); training without it",
            file=sys.stderr,
        )
        return model
    return compiled


# ---------------------------------------------------------------------------------------------------
# What the loop reads from the run's config.
EVAL_METRICS = {"macro_f1": "f1", "accuracy": "acc", "loss": "loss"}  # --eval_metric -> the row's val_* column
EpochHook = Callable[[dict[str, Any]], bool]  # an epoch's log.csv row -> True to stop the run here (a sweep's pruner)


class Pruned(Exception):  # noqa: N818 (not an error: the sweep's pruner ended the run, saved first)
    """A run ended after `epoch` by its `on_epoch` hook, with last.pth saved and config.json marked `pruned`."""

    def __init__(self, run_dir: Path, epoch: int) -> None:
        super().__init__(f"pruned after epoch {epoch}")
        self.run_dir, self.epoch = run_dir, epoch


def score_of(metrics: dict[str, float], eval_metric: str) -> float:
    """The number to maximize for `--eval_metric`: macro F1, accuracy, or minus the loss."""
    value = metrics[EVAL_METRICS[eval_metric]]
    return -value if eval_metric == "loss" else value


# ---------------------------------------------------------------------------------------------------
# The state of a run.
@dataclass
class RunState:
    """Everything a training run is. `state_dict()` is the checkpoint, `load_state_dict()` is resume."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    schedule: schedule_module.Schedule
    config: dict[str, Any] = field(default_factory=dict)  # the one config: also config.json
    scaler: torch.amp.GradScaler | None = None
    stopper: utils.EarlyStopping = field(default_factory=utils.EarlyStopping)
    ema: AveragedModel | None = None
    swa: AveragedModel | None = None  # --swa_start: the equal-weight average of the epochs' weights from then on
    epoch: int = 0  # the last finished epoch
    progress: dict[str, Any] | None = None  # the epoch in progress: step, loss_sum, preds, targets, time_s
    best_score: float = -math.inf
    best_epoch: int = 0
    best_probs: torch.Tensor | None = None  # validation probabilities at the best epoch (for oof.csv)
    val_idx: list[int] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)  # log.csv
    folds_left: list[int] = field(default_factory=list)  # of a k-fold run, after this one
    finished: bool = False

    def state_dict(self, weights: nn.Module | None = None, rng: bool = True) -> dict[str, Any]:
        """The checkpoint: `weights` (default: the model) unwrapped, and the rest of the run's state."""
        return {
            "model": utils.clean_state_dict(utils.unwrap_model(weights or self.model).state_dict()),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "swa": self.swa.state_dict() if self.swa is not None else None,
            "stopper": self.stopper.state_dict(),
            "epoch": self.epoch,
            "progress": self.progress,
            "best_score": self.best_score,
            "best_epoch": self.best_epoch,
            "best_probs": self.best_probs,
            "val_idx": list(self.val_idx),
            "rows": self.rows,
            "folds_left": list(self.folds_left),
            "finished": self.finished,
            "rng": devices.rng_state() if rng else None,
            "config": self.config,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint written by `state_dict()` (the random generators included)."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        elif self.scaler is not None and self.scaler.is_enabled():
            print("warning: the run trained without fp16 loss scaling (--amp off or bf16): the GradScaler starts "
                  "fresh at its initial scale", file=sys.stderr)  # fmt: skip
        if self.ema is not None and state.get("ema"):
            self.ema.load_state_dict(state["ema"])
        if self.swa is not None and state.get("swa"):
            self.swa.load_state_dict(state["swa"])
        self.stopper.load_state_dict(state["stopper"])
        self.epoch, self.progress, self.rows = state["epoch"], state["progress"], state["rows"]
        self.best_score, self.best_epoch = state["best_score"], state["best_epoch"]
        self.best_probs, self.val_idx = state.get("best_probs"), list(state.get("val_idx", []))
        self.folds_left, self.finished = list(state.get("folds_left", [])), bool(state.get("finished"))
        if state.get("rng"):
            devices.set_rng_state(state["rng"])

    def keep_own_progress(self, rank: int) -> None:
        """After a resume under DDP: the saved partial epoch holds every rank's share (Trainer.gather_progress),
        so rank 0 keeps it and the other ranks continue from empty shares; the epoch's metrics count each once."""
        if self.progress is not None and rank != 0:
            self.progress.update(loss_sum=0.0, preds=[], targets=[])

    def new_progress(self, epoch: int) -> dict[str, Any]:
        self.progress = {"epoch": epoch, "step": 0, "loss_sum": 0.0, "preds": [], "targets": [], "time_s": 0.0}
        return self.progress


def fold_result(state: dict[str, Any] | RunState) -> dict[str, Any]:
    """What a finished split contributes to oof.csv: validation indices, best probabilities and score."""
    if isinstance(state, RunState):
        state = {"val_idx": state.val_idx, "best_probs": state.best_probs, "best_score": state.best_score,
                 "config": state.config}  # fmt: skip
    probs, metric = state["best_probs"], state["config"].get("eval_metric", "macro_f1")
    return {
        "val_idx": np.asarray(state["val_idx"], dtype=np.int64),
        "probs": probs.numpy() if probs is not None else None,
        # The metric's own value (a loss as a loss): score_of maximizes minus the loss.
        "best_score": -state["best_score"] if metric == "loss" else state["best_score"],
    }


@dataclass
class Split:
    """The training and validation images of one split (the holdout or a fold) and their loaders."""

    train_set: subset_module.ImageSubset
    val_set: subset_module.ImageSubset
    val_source: Dataset  # what the validation loader reads: this rank's share, at its final pixels when made once
    val_idx: np.ndarray
    sampler: EpochSampler
    train_loader: DataLoader
    val_loader: Any  # a DataLoader, or subset.FixedBatches
    batch_transform: Callable[[torch.Tensor], torch.Tensor] | None  # on the device, after the loader
    eval_batch_transform: Callable[[torch.Tensor], torch.Tensor] | None


def build_split(
    config: dict[str, Any], data: Any, aug: Any, cache: Any, fold: int | None, device: torch.device, world: int
) -> Split:
    settings, rank = LoopSettings.from_config(config), devices.rank()
    split = data.split_dataset() if fold is None else data.split_dataset(fold=fold, n_splits=config["n_splits"])
    train_idx, val_idx = split
    # The loaders hand over uint8 pixels and the device normalizes whole batches, when the preset allows it.
    train_transform, batch_transform = augmentation.split_for_device(aug.train_transform)
    eval_transform, eval_batch_transform = augmentation.split_for_device(aug.eval_transform)
    if config.get("gpu_aug"):  # the loader only hands over uint8 pixels; augmentation runs batch-wise on the device
        train_transform = augmentation.to_uint8_tensor
        batch_transform = augmentation.BatchAugment(config["resize"], config["mean"], config["std"], aug.crop_fraction)
    targets = data.training_targets()  # labels, or probabilities (--pseudo_soft, --age_sigma); validation's are labels
    train_set = subset_module.ImageSubset(data, train_idx, train_transform, aug.load_size, cache, targets)
    val_set = subset_module.ImageSubset(data, val_idx, eval_transform, aug.load_size, cache)
    # Validation reads this rank's images at their final size, made once: a pass after that is a copy.
    val_view = predict.rank_share(val_set, rank, world)
    val_view = subset_module.fixed_once(val_view, eval_transform, settings.num_workers) or val_view
    class_counts = np.bincount(train_set.targets, minlength=data.num_classes)
    # Weighted: each image drawn with probability 1 / (its class's count), so every class comes up equally often.
    weights = 1.0 / class_counts[train_set.targets] if config.get("sampler") == "weighted" else None
    sampler = EpochSampler(len(train_set), settings.seed, weights, rank, world)
    return Split(
        train_set,
        val_set,
        val_view,
        np.asarray(val_idx),
        sampler,
        make_loader(train_set, settings.batch_size, settings, device, sampler),
        val_view.batches(settings.valid_batch_size)
        if isinstance(val_view, subset_module.FixedPixels)
        else make_loader(val_view, settings.valid_batch_size, settings, device),
        batch_transform,
        eval_batch_transform,
    )


# ---------------------------------------------------------------------------------------------------
# Building a run
def build_state(config: dict[str, Any], split: Split, num_classes: int, device: torch.device, world: int) -> RunState:
    """A fresh RunState for `config`: model (initialised from the current RNG), EMA, optimizer, schedule, scaler."""
    model = rundir.build_model(
        {**config, "num_classes": num_classes},
        pretrained=config.get("pretrained", False),
        pretrained_path=config.get("pretrained_path"),
    )
    if world > 1 and config.get("sync_bn"):
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(device)
    if config.get("channels_last"):
        model = model.to(memory_format=torch.channels_last)
    optimizer = schedule_module.build_optimizer(
        model, config["optimizer"], config["lr"], config["weight_decay"], config["momentum"],
        config.get("decay_norm_bias", False), config.get("backbone_lr_scale") or 1.0,
    )  # fmt: skip
    steps = math.ceil(len(split.train_loader) / config.get("grad_accum", 1))
    schedule = schedule_module.Schedule(
        optimizer, config["scheduler"], config["epochs"], steps, config.get("warmup_epochs", 0.0),
        config.get("lr_decay_step", 20), config.get("gamma", 0.5), swa_start=config.get("swa_start", 0),
        swa_lr=config.get("swa_lr"),
    )  # fmt: skip
    return RunState(
        model,
        optimizer,
        schedule,
        config,
        scaler=predict.make_scaler(config.get("amp", "off"), device),
        stopper=utils.EarlyStopping(config.get("patience", 0)),
        ema=schedule_module.make_ema(model, config["ema"]) if config.get("ema") else None,
        swa=schedule_module.make_swa(model) if config.get("swa_start") else None,
        val_idx=split.val_idx.tolist(),
    )


def build_criterion(config: dict[str, Any], split: Split, model: nn.Module, num_classes: int) -> nn.Module:
    return loss_module.create_criterion(
        config["criterion"],
        num_classes=num_classes,
        class_counts=np.bincount(split.train_set.targets, minlength=num_classes).tolist(),
        class_weights=config.get("class_weights", False),
        tasks=model_module.task_sizes(model),
        task_weights=config.get("task_weights"),
    )


def wrap_model(model: nn.Module, config: dict[str, Any], device: torch.device, world: int) -> nn.Module:
    """The model as training calls it: compiled (--compile), in DistributedDataParallel or DataParallel."""
    data_parallel = world == 1 and devices.uses_every_gpu(config.get("device", "auto"), device)
    data_parallel = data_parallel and config.get("data_parallel", True)
    compiling = config.get("compile", False)
    if compiling and data_parallel:
        # replicate() of a compiled module writes through to the original and empties it: the first step fails.
        print(
            f"warning: --compile with DataParallel over {torch.cuda.device_count()} GPUs is not supported (a "
            "replicated compiled model loses its weights): training without --compile; launch with torchrun "
            "for compiled multi-GPU training",
            file=sys.stderr,
        )
        compiling = False
    net = maybe_compile(model, compiling, config["resize"], device)
    if world > 1:
        return torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None
        )
    if data_parallel:
        return torch.nn.DataParallel(predict.AutocastReplica(net, config.get("amp", "off"), device))
    return net


# ---------------------------------------------------------------------------------------------------
# The loop over epochs
class Trainer:
    """Trains one split into `run_dir` through its RunState: epochs, validation, reports and checkpoints."""

    def __init__(
        self,
        state: RunState,
        split: Split,
        criterion: nn.Module,
        data: Any,
        run_dir: Path,
        device: torch.device,
        world: int = 1,
        on_epoch: EpochHook | None = None,
    ) -> None:
        self.state, self.split, self.data, self.run_dir, self.device = state, split, data, run_dir, device
        self.on_epoch = on_epoch
        self.settings = LoopSettings.from_config(state.config)
        self.criterion = criterion.to(device)
        self.num_classes = data.num_classes
        self.main_rank = devices.rank() == 0
        self.train_model = wrap_model(state.model, state.config, device, world)
        self.teachers = None
        if state.config.get("teacher"):
            members = distill.resolve_teachers(state.config["teacher"], data.class_names)
            self.teachers = distill.Teachers(members, state.config, device)
            if state.config.get("kd_cache"):
                self.split = self.cache_teacher_logits()
        self.loggers: report.Loggers | None = None  # rank 0's
        self.cam = cam.RunCam(state.config["resize"], data.class_names)  # Grad-CAM in worst_val.png

    def cache_teacher_logits(self) -> Split:
        """--kd_cache: the teachers predict every training image once, un-augmented, and the training loader hands
        their logits over beside each image (no teacher forward pass per step)."""
        start, train, val = time.time(), self.split.train_set, self.split.val_set
        plain = subset_module.ImageSubset(train.dataset, train.indices, val.transform, train.size, train.cache)
        settings = self.settings

        def loader_of(subset: Any) -> DataLoader:
            return make_loader(subset, settings.valid_batch_size, settings, self.device)

        logits = self.teachers.cache_logits(plain, loader_of, self.device, self.split.eval_batch_transform)
        cached = subset_module.ImageSubset(
            train.dataset, train.indices, train.transform, train.size, train.cache, train.given_targets, logits
        )
        print(f"Teachers' logits of {len(cached)} training images cached in {time.time() - start:.1f}s (--kd_cache)")
        loader = make_loader(cached, settings.batch_size, settings, self.device, self.split.sampler)
        return dataclasses.replace(self.split, train_set=cached, train_loader=loader)

    def save(self, name: str, weights: nn.Module | None = None) -> None:
        if self.main_rank:
            state = self.state.state_dict(weights, rng=name == "last.pth")
            utils.save_checkpoint(self.run_dir / name, **state)

    def train_epoch(self, epoch: int, stop: utils.StopRequest) -> dict[str, float] | None:
        """One pass over the training split (or the rest of it, after a resume); None when stopped."""
        start, s = time.time(), self.state
        progress = s.progress if s.progress is not None else s.new_progress(epoch)
        self.split.sampler.set_epoch(epoch, start=progress["step"] * self.settings.batch_size)
        progress["steps"] = progress["step"] + len(self.split.train_loader)
        finished = train_one_epoch(
            self.train_model, self.split.train_loader, self.criterion, s, self.settings, self.device,
            self.num_classes, self.split.batch_transform, stop, self.teachers,
        )  # fmt: skip
        progress["time_s"] += time.time() - start
        if not finished:
            return None
        gathered = devices.gather_objects((progress["loss_sum"], progress["preds"], progress["targets"]))
        preds = torch.cat([t for _, p, _ in gathered for t in p]).numpy()
        targets = torch.cat([t for _, _, g in gathered for t in g]).numpy()
        s.progress = None
        return {
            "train_loss": sum(g[0] for g in gathered) / len(targets),
            "train_acc": float((preds == targets).mean()),
            "train_f1": utils.macro_f1(targets, preds, self.num_classes),
            "time_s": progress["time_s"],
        }

    def validate(self, net: nn.Module, name: str) -> predict.Evaluation:
        return predict.evaluate(
            net, self.split.val_loader, self.device, batch_transform=self.split.eval_batch_transform,
            amp=self.settings.amp, channels_last=self.settings.channels_last, criterion=self.criterion,
            targets=self.split.val_set.targets, num_classes=self.num_classes, progress=name,
        )  # fmt: skip

    def averages(self, epoch: int) -> list[tuple[str, AveragedModel]]:
        """The weight averages validated beside the model this epoch: the EMA, and from --swa_start on the SWA
        average, given this epoch's weights and then its BatchNorm statistics over the training split."""
        s, found = self.state, []
        if s.ema is not None:
            found.append(("ema", s.ema))
        if s.swa is not None and epoch >= s.config["swa_start"]:
            s.swa.update_parameters(s.model)
            self.split.sampler.set_epoch(epoch)  # all of the epoch's batches, after a resume mid-epoch too
            schedule_module.update_bn(s.swa, self.split.train_loader, self.device, self.split.batch_transform)
            devices.average_buffers(s.swa.module)  # each rank's statistics are over its own share
            found.append(("swa", s.swa))
        return found

    def validate_epoch(
        self, epoch: int, train: dict[str, float]
    ) -> tuple[dict[str, Any], predict.Evaluation, nn.Module]:
        """The epoch's row of log.csv, the chosen weights' evaluation and those weights (raw, or EMA when better)."""
        start, metric = time.time(), self.settings.eval_metric
        # The module inside DDP: its forward could broadcast buffers, a collective that a rank without a
        # validation batch never joins.
        net = self.train_model
        net = net.module if isinstance(net, torch.nn.parallel.DistributedDataParallel) else net
        chosen, weights = self.validate(net, "validation"), self.state.model
        row = {"epoch": epoch, **{k: v for k, v in train.items() if k != "time_s"}}
        row.update({f"val_{k}": chosen.metrics[k] for k in ("loss", "acc", "f1")})
        for name, average in self.averages(epoch):
            result = self.validate(average.module, f"validation ({name.upper()})")
            row.update({f"{name}_val_{k}": result.metrics[k] for k in ("loss", "acc", "f1")})
            if score_of(result.metrics, metric) > score_of(chosen.metrics, metric):
                chosen, weights = result, average.module
        val_preds = chosen.probs.argmax(1).numpy()
        row.update(report.task_metrics(self.data, self.split.val_set.targets, val_preds))
        score = score_of(chosen.metrics, metric)
        row.update(
            score=chosen.metrics[EVAL_METRICS[metric]],
            lr=self.state.schedule.lr,
            time_s=train["time_s"] + time.time() - start,
            best=score > self.state.best_score,
        )
        return row, chosen, weights

    def end_epoch(self, row: dict[str, Any], chosen: predict.Evaluation, weights: nn.Module) -> bool:
        """Record the epoch in the state and on disk; True when early stopping ends the run."""
        s, score = self.state, score_of(chosen.metrics, self.settings.eval_metric)
        s.rows.append(row)
        s.epoch = row["epoch"]
        print(report.log_line(row, self.settings.epochs, self.settings.eval_metric), flush=True)
        s.schedule.step_epoch(score, row["epoch"])
        if row["best"]:
            s.best_score, s.best_epoch, s.best_probs = score, row["epoch"], chosen.probs
        stopping = s.stopper.step(score)
        if self.main_rank:
            self.report_epoch(row, chosen, weights)
        return stopping

    def report_epoch(self, row: dict[str, Any], chosen: predict.Evaluation, weights: nn.Module) -> None:
        val_set, config = self.split.val_set, self.state.config
        report.write_log(self.run_dir / "log.csv", self.state.rows)
        val_preds = chosen.probs.argmax(1).numpy()

        # One process reads them as its validation does (every image, made once); under torchrun rank 0 reads
        # only its share there, so it transforms them again.
        source = self.split.val_source if devices.world_size() == 1 else val_set

        def val_inputs(rows: Sequence[int]) -> torch.Tensor:
            """Validation images as the network sees them (normalized)."""
            images = torch.stack([source[i][0] for i in rows])
            transform = self.split.eval_batch_transform
            return images if transform is None else transform(images)

        def first_val_images() -> torch.Tensor:
            return val_inputs(range(min(16, len(val_set))))

        def explain(rows: list[int], preds: list[int], truths: list[int]) -> tuple[np.ndarray, Any] | None:
            images = val_inputs(rows)
            maps = self.cam(weights, images, preds, truths)
            return None if maps is None else (report.denormalize(images.cpu(), config["mean"], config["std"]), maps)

        report.log_epoch(
            self.loggers, row, val_set.targets, val_preds, self.data.class_names, first_val_images,
            config["mean"], config["std"], figures=row["best"],
        )  # fmt: skip
        if row["best"]:
            self.save("best.pth", weights)
            report.write_best_reports(
                self.run_dir, self.data, self.split.val_idx, val_set.targets, chosen.probs.numpy(), val_set.pixels,
                self.loggers, row["epoch"], explain,
            )  # fmt: skip
        self.save("last.pth")

    def gather_progress(self) -> None:
        """Every rank's share of the interrupted epoch's loss and predictions into rank 0's progress, the one
        last.pth saves; on resume the other ranks start their shares empty (`RunState.keep_own_progress`)."""
        p = self.state.progress
        parts = devices.gather_objects((p["loss_sum"], p["preds"], p["targets"]))
        if len(parts) > 1 and self.main_rank:
            p["loss_sum"] = sum(part[0] for part in parts)
            p["preds"], p["targets"] = [t for part in parts for t in part[1]], [t for part in parts for t in part[2]]

    def run(self) -> None:
        """Train the remaining epochs; a signal stops training after the current step, saves last.pth and raises
        utils.Stopped (scripts exit with 128 + the signal's number, so `train.py && inference.py` stops too)."""
        s = self.state
        first = s.progress["epoch"] if s.progress else s.epoch + 1
        with utils.StopRequest() as stop:
            for epoch in range(first, self.settings.epochs + 1):
                train = self.train_epoch(epoch, stop)
                if train is None:
                    self.gather_progress()
                    self.save("last.pth")
                    print(
                        f"Stopped by {stop.signal or 'a signal'} in epoch {epoch} after step {s.progress['step']}; "
                        f"saved {self.run_dir / 'last.pth'}. Continue with: python train.py --resume "
                        f"{shlex.quote(str(self.run_dir))}"
                    )
                    raise utils.Stopped(stop.signal, self.run_dir)
                stopping = self.end_epoch(*self.validate_epoch(epoch, train))
                pruned = self.on_epoch is not None and self.on_epoch(s.rows[-1])  # every epoch is reported
                if pruned and not stopping and epoch < self.settings.epochs:
                    self.prune(epoch)
                if stopping:
                    print(f"Early stopping: no better validation {self.settings.eval_metric} for {s.stopper.patience}"
                          " epochs")  # fmt: skip
                    break
                if devices.any_rank(bool(stop)):
                    print(f"Stopped by {stop.signal} after epoch {epoch}; continue: python train.py --resume "
                          f"{shlex.quote(str(self.run_dir))}")  # fmt: skip
                    raise utils.Stopped(stop.signal, self.run_dir)
        s.finished = True
        self.save("last.pth")

    def prune(self, epoch: int) -> None:
        """End the run after `epoch` as a stopped run ends (last.pth, resumable), marked pruned in config.json."""
        self.state.config["pruned"] = True
        if self.main_rank:
            rundir.save_config(self.state.config, self.run_dir)
        self.save("last.pth")
        print(f"Pruned by the sweep after epoch {epoch}; saved {self.run_dir / 'last.pth'}")
        raise Pruned(self.run_dir, epoch)

    def finish(self) -> None:
        """The run's final metrics (TensorBoard HParams) and where to go next."""
        s, metric = self.state, self.settings.eval_metric
        best_row = next((r for r in s.rows if r["epoch"] == s.best_epoch), {})
        if self.loggers is not None:
            metrics = {"hparam/best_score": best_row.get("score", s.best_score), "hparam/best_epoch": s.best_epoch}
            metrics["hparam/best_val_f1"] = best_row.get("val_f1", 0.0)
            metrics |= {f"hparam/{k}": best_row[k] for k in ("val_mask_acc", "val_gender_acc", "val_age_acc")
                        if k in best_row}  # fmt: skip
            self.loggers.finish(s.config, metrics, [self.run_dir / "best.pth", self.run_dir / rundir.CONFIG])
        name = "macro F1" if metric == "macro_f1" else metric
        print(f"Best validation {name} {best_row.get('score', s.best_score):.4f} at epoch {s.best_epoch}; saved in "
              f"{self.run_dir}")  # fmt: skip
        print(f"Next: python inference.py --model_dir {shlex.quote(str(self.run_dir))}")


def fit(
    config: dict[str, Any],
    data: Any,
    aug: Any,
    cache: Any,
    fold: int | None,
    run_dir: Path,
    device: torch.device,
    world: int = 1,
    checkpoint: dict[str, Any] | None = None,
    folds_left: Sequence[int | None] = (),
    on_epoch: EpochHook | None = None,
) -> dict[str, Any]:
    """Train one split (the holdout or one fold) into `run_dir`, from the start or from `checkpoint`. Returns the
    split's `fold_result` (for out-of-fold predictions); a signal raises utils.Stopped after saving last.pth.
    `on_epoch` sees each epoch's row after it is recorded; True ends the run there with `Pruned`."""
    devices.set_deterministic(config.get("deterministic", False))
    devices.seed_everything(config["seed"])  # each split alone: --fold 2 trains as fold 2 of --fold all does
    split = build_split(config, data, aug, cache, fold, device, world)
    kind = type(getattr(data, "base", data)).__name__  # pseudo-labels: the data's own class
    print(
        f"Data: {config['data_dir']} | {len(data)} images, {len(split.train_set)} train / {len(split.val_set)} val "
        f"({kind}) | device {device}{f' x {world} processes' if world > 1 else ''}"
    )
    class_names = getattr(data, "class_names", [])
    warning = splits.unlearnt_classes_warning(split.train_set.targets, split.val_set.targets, class_names)
    if warning and devices.rank() == 0:  # stderr is every rank's: one line, not one per process
        print(warning, file=sys.stderr)
    then = (checkpoint or {}).get("config", {})  # a resume continues on the split it began with
    config["split_digest"] = splits.same_split(config, then, data.image_paths, split.train_set.indices, split.val_idx)
    state = build_state(config, split, data.num_classes, device, world)
    state.folds_left = [f for f in folds_left if f is not None]
    if checkpoint is not None:
        state.load_state_dict(checkpoint)
        state.config["resumed"] = [
            *state.config.get("resumed", []),
            {"from_epoch": state.epoch, "command": " ".join(sys.argv)},
        ]
        steps = f" and {state.progress['step']} steps of epoch {state.progress['epoch']}" if state.progress else ""
        print(f"Resuming {run_dir} after epoch {state.epoch}{steps}")
    if world > 1:
        state.keep_own_progress(devices.rank())
        devices.seed_for_rank(devices.rank())
    config.update(train_images=len(split.train_set), val_images=len(split.val_set))
    trainer = Trainer(state, split, build_criterion(config, split, state.model, data.num_classes), data, run_dir,
                      device, world, on_epoch)  # fmt: skip
    if trainer.main_rank:
        trainer.loggers = report.Loggers(config, run_dir)  # first: config.json keeps the trackers' run ids
        rundir.save_config(config, run_dir)
    print(f"Run directory: {run_dir}")
    try:
        trainer.run()
        trainer.finish()
    finally:
        if trainer.loggers is not None:
            trainer.loggers.close(state.finished)
    return fold_result(state)
