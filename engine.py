"""The training engine behind train.py: mixed precision, optimizers and schedules, EMA, mixup/cutmix,
gradient accumulation and clipping, a resumable sampler, clean stops on SIGINT/SIGTERM, one training epoch.

    python train.py --amp bf16 --scheduler onecycle --warmup_epochs 1 --ema 0.999 --mixup 0.2
    python train.py --cutmix 1.0 --cutmix_mode vertical --grad_accum 2 --clip_grad 5
    python train.py --resume model/exp            # continue a stopped run in the same directory

Every piece is a function or a small class that train.py composes; tests call them directly.
"""

from __future__ import annotations

import contextlib
import functools
import math
import random
import signal
import sys
import time
from argparse import Namespace
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import DataLoader
from tqdm import tqdm

import augmentation
import dataset as dataset_module
import labels
import loss as loss_module
import model as model_module
import report
import schedule as schedule_module
import utils
from utils import UserError

AMP_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


# ---------------------------------------------------------------------------------------------------
# Mixed precision
def check_amp(amp: str, device: torch.device) -> None:
    """Refuse a precision the device cannot run, with the alternative."""
    if amp == "fp16" and device.type != "cuda":
        raise UserError(f"--amp fp16 needs a CUDA GPU (device is {device}); on a CPU use --amp bf16 or --amp off")
    if amp == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError("--amp bf16: this GPU has no bfloat16 support; use --amp fp16")
    if amp not in ("off", *AMP_DTYPES):
        raise UserError(f"--amp {amp} is unknown: choose off, fp16 or bf16")


def autocast(amp: str, device: torch.device) -> contextlib.AbstractContextManager:
    """torch.autocast for `amp` (fp16/bf16) on `device`, or a no-op for off."""
    if amp == "off":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AMP_DTYPES[amp])


def make_scaler(amp: str, device: torch.device) -> torch.amp.GradScaler:
    """A GradScaler, active only for fp16 (bf16 has fp32's range and needs no loss scaling)."""
    return torch.amp.GradScaler(device.type, enabled=amp == "fp16")


# ---------------------------------------------------------------------------------------------------
# Sampling and stopping
class EpochSampler(torch.utils.data.Sampler[int]):
    """Training order for one epoch: a permutation (or inverse-frequency weighted draws, with replacement)
    that depends only on (seed, epoch), partitioned between `world_size` processes; `start` skips the batches
    already trained when a run resumes in the middle of an epoch."""

    def __init__(
        self,
        n: int,
        seed: int,
        weights: np.ndarray | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.n, self.seed, self.rank, self.world_size = n, seed, rank, world_size
        self.weights = None if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        self.epoch, self.start = 0, 0
        self.per_rank = math.ceil(n / world_size)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def order(self) -> list[int]:
        """This rank's whole order for the epoch (before skipping)."""
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        if self.weights is None:
            indices = torch.randperm(self.n, generator=g)
        else:
            indices = torch.multinomial(self.weights, self.n, replacement=True, generator=g)
        indices = indices.tolist()
        indices += indices[: self.per_rank * self.world_size - self.n]  # pad so every rank gets as many
        return indices[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self.order()[self.start :])

    def __len__(self) -> int:
        return self.per_rank - self.start


class StopRequest:
    """Catch SIGINT/SIGTERM during training: the current step finishes, then the loop saves and exits.

    A second signal stops at once (the default handler), for a run that does not react."""

    def __init__(self) -> None:
        self.signal: str | None = None
        self.previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signal = signal.Signals(signum).name
        print(f"\n{self.signal} received: finishing this step, then saving last.pth", file=sys.stderr, flush=True)
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def __enter__(self) -> StopRequest:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread: no handlers
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def __bool__(self) -> bool:
        return self.signal is not None


# ---------------------------------------------------------------------------------------------------
# Resume and compile
def rng_state() -> dict[str, Any]:
    """Every random generator's state, in types a weights_only checkpoint can hold."""
    np_state = np.random.get_state(legacy=False)
    return {
        "python": random.getstate(),
        "numpy": {**np_state, "state": {"key": np_state["state"]["key"].tolist(), "pos": np_state["state"]["pos"]}},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np_state = state["numpy"]
    np.random.set_state(
        {
            **np_state,
            "state": {"key": np.array(np_state["state"]["key"], dtype=np.uint32), "pos": np_state["state"]["pos"]},
        }
    )
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def maybe_compile(model: nn.Module, args: Any, device: torch.device) -> nn.Module:
    """torch.compile(model) when --compile works here; else a warning and the eager model."""
    if not args.compile:
        return model
    compiled = torch.compile(model)
    try:
        with torch.no_grad():
            compiled.eval()(torch.zeros(2, 3, *args.resize, device=device))
    except Exception as e:  # missing compiler toolchain, unsupported platform or op
        print(
            f"warning: --compile failed here ({type(e).__name__}: {str(e).splitlines()[0][:160]}); training without it",
            file=sys.stderr,
        )
        return model
    return compiled


# ---------------------------------------------------------------------------------------------------
# One epoch
def train_one_epoch(
    model: nn.Module,
    loader: torch.utils.data.DataLoader,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    schedule: schedule_module.Schedule,
    device: torch.device,
    args: Any,
    num_classes: int,
    progress: dict[str, Any],
    scaler: torch.amp.GradScaler | None = None,
    ema: AveragedModel | None = None,
    batch_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    stop: StopRequest | None = None,
    to_class_logits: Callable[[torch.Tensor], torch.Tensor] = lambda x: x,
) -> bool:
    """Train over `loader`, accumulating into `progress` (step, loss_sum, preds, targets: what a resumed
    epoch needs to continue its metrics). Returns False when `stop` interrupted the epoch.

    `args` supplies amp, grad_accum, clip_grad, mixup, cutmix, cutmix_mode, mix_prob, channels_last."""
    model.train()
    scaler = scaler or make_scaler("off", device)
    accum = args.grad_accum
    bar = tqdm(loader, desc=f"epoch {progress['epoch']}", leave=False, disable=not sys.stderr.isatty())
    optimizer.zero_grad(set_to_none=True)
    for images, targets in bar:
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        if batch_transform is not None:
            images = batch_transform(images)
        if args.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        mixed, soft = augmentation.mix_batch(
            images, targets, num_classes, args.mixup, args.cutmix, args.cutmix_mode, args.mix_prob
        )
        mixing = args.mixup > 0 or args.cutmix > 0
        with autocast(args.amp, device):
            outputs = model(mixed)
            loss = criterion(outputs.float(), soft if mixing else targets)
        scaler.scale(loss / accum).backward()
        progress["step"] += 1
        # Step every `accum` micro-batches, and on the epoch's last batch so no gradient is carried over.
        if progress["step"] % accum == 0 or progress["step"] == progress["steps"]:
            if args.clip_grad:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            schedule.step_batch()
            if ema is not None:
                ema.update_parameters(utils.unwrap_model(model))
        if not torch.isfinite(loss):
            raise UserError(
                f"the loss became {loss.item()} at epoch {progress['epoch']}: lower --lr, or use --clip_grad 1"
            )
        progress["loss_sum"] += loss.item() * len(targets)
        progress["preds"].append(to_class_logits(outputs.detach().float()).argmax(1).cpu())
        progress["targets"].append(targets.cpu())
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if progress["step"] % accum == 0 and utils.any_rank(bool(stop)):  # all ranks stop at the same step
            return False
    return True


# ---------------------------------------------------------------------------------------------------
# Loaders and the loop over epochs
def loader_workers(subset: torch.utils.data.Dataset, num_workers: int) -> int:
    """`num_workers`, or none when each batch is one copy out of the RAM cache (ImageSubset.gather): handing
    batches over from worker processes costs more than making them (bench/bench_data.py)."""
    base = subset.dataset if isinstance(subset, torch.utils.data.Subset) else subset
    return 0 if getattr(base, "gather", False) else num_workers


def make_loader(
    subset: torch.utils.data.Dataset,
    batch_size: int,
    args: Namespace,
    device: torch.device,
    sampler: EpochSampler | None = None,
) -> DataLoader:
    """A training loader (with `sampler`: the order is a function of seed and epoch, see EpochSampler) or a
    validation loader (in order, every image once)."""
    workers = loader_workers(subset, args.num_workers)
    return DataLoader(
        subset,
        batch_size=batch_size,
        sampler=sampler,
        # A last training batch of one image breaks BatchNorm; validation always sees every image.
        drop_last=sampler is not None and len(sampler) % batch_size == 1,
        num_workers=workers,
        pin_memory=device.type == "cuda" if args.pin_memory is None else args.pin_memory,
        persistent_workers=workers > 0 and args.persistent_workers,
        prefetch_factor=args.prefetch_factor if workers > 0 else None,
        worker_init_fn=utils.seed_worker,
        generator=torch.Generator().manual_seed(args.seed),
    )


def fit(
    args: Namespace,
    data: Any,
    aug: Any,
    cache: Any,
    fold: int | None,
    run_dir: Path,
    config: dict[str, Any],
    checkpoint: dict[str, Any] | None,
    rank: int,
    world: int,
    device: torch.device,
) -> dict[str, Any] | None:
    """Train one split (the holdout or one fold) into `run_dir`. Returns the validation indices and the class
    probabilities of the best epoch (for out-of-fold predictions), or None when a signal stopped training."""
    num_classes, main_rank = data.num_classes, rank == 0
    train_idx, val_idx = data.split_dataset() if fold is None else data.split_dataset(fold=fold, n_splits=args.n_splits)
    # The loaders hand over uint8 pixels and the device normalizes whole batches, when the preset allows it.
    train_transform, batch_transform = augmentation.split_for_device(aug.train_transform)
    eval_transform, eval_batch_transform = augmentation.split_for_device(aug.eval_transform)
    if args.gpu_aug:  # the loader only hands over uint8 pixels; augmentation runs batch-wise on the device
        train_transform = augmentation.to_uint8_tensor
        batch_transform = augmentation.BatchAugment(args.resize, config["mean"], config["std"], aug.crop_fraction)
    train_set = dataset_module.ImageSubset(data, train_idx, train_transform, aug.load_size, cache)
    val_set = dataset_module.ImageSubset(data, val_idx, eval_transform, aug.load_size, cache)
    class_counts = np.bincount(train_set.targets, minlength=num_classes)
    # Weighted: each image drawn with probability 1 / (its class's count), so every class comes up equally often.
    weights = 1.0 / class_counts[train_set.targets] if args.sampler == "weighted" else None
    sampler = EpochSampler(len(train_set), args.seed, weights, rank, world)
    train_loader = make_loader(train_set, args.batch_size, args, device, sampler)
    # Each rank validates every world-th image; gathered back in order, every image counts exactly once.
    val_part = torch.utils.data.Subset(val_set, range(rank, len(val_set), world))
    val_loader = make_loader(val_part, args.valid_batch_size, args, device)
    print(
        f"Data: {config['data_dir']} | {len(data)} images, {len(train_set)} train / {len(val_set)} val "
        f"({type(data).__name__}) | device {device}{f' x {world} processes' if world > 1 else ''}"
    )

    model = model_module.build_model(
        args.model, num_classes, args.pretrained, args.pretrained_path, backbone=args.backbone, **labels.model_kwargs()
    )
    if world > 1 and args.sync_bn:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    ema = schedule_module.make_ema(model, args.ema) if args.ema else None
    criterion = loss_module.create_criterion(
        args.criterion,
        num_classes=num_classes,
        class_counts=class_counts.tolist(),
        class_weights=args.class_weights,
        tasks=model_module.task_sizes(model),
        task_weights=args.task_weights,
    ).to(device)
    optimizer = schedule_module.build_optimizer(
        model, args.optimizer, args.lr, args.weight_decay, args.momentum, args.decay_norm_bias
    )
    steps = math.ceil(len(train_loader) / args.grad_accum)
    schedule = schedule_module.Schedule(
        optimizer, args.scheduler, args.epochs, steps, args.warmup_epochs, args.lr_decay_step, args.gamma
    )
    scaler = make_scaler(args.amp, device)
    stopper = utils.EarlyStopping(args.patience)
    rows: list[dict[str, Any]] = []
    best_f1, best_epoch, first_epoch, progress, best_probs = -1.0, 0, 1, None, None
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
        set_rng_state(checkpoint["rng"])
        config["resumed"] = [
            *config.get("resumed", []),
            {"from_epoch": checkpoint["epoch"], "command": " ".join(sys.argv)},
        ]
        steps_done = f" and {progress['step']} steps of epoch {progress['epoch']}" if progress else ""
        print(f"Resuming {run_dir} after epoch {checkpoint['epoch']}{steps_done}")
    train_model = maybe_compile(model, args, device)
    if world > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(
            train_model, device_ids=[device.index] if device.type == "cuda" else None
        )
    elif device.type == "cuda" and torch.cuda.device_count() > 1 and args.data_parallel:
        train_model = torch.nn.DataParallel(train_model)
    config.update(train_images=len(train_set), val_images=len(val_set))
    writer = None
    if main_rank:
        utils.save_json(config, run_dir / "config.json")
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(run_dir))
    print(f"Run directory: {run_dir}")

    val_targets = torch.as_tensor(val_set.targets)

    def first_val_images() -> torch.Tensor:
        """The first 16 validation images as the network sees them, for TensorBoard."""
        images = torch.stack([val_set[i][0] for i in range(min(16, len(val_set)))])
        return images if eval_batch_transform is None else eval_batch_transform(images)

    to_logits = functools.partial(model_module.to_class_logits, model=model)

    def validate(net: torch.nn.Module, name: str) -> torch.Tensor:
        with autocast(args.amp, device):
            part = utils.predict(net, val_loader, device, progress=name, batch_transform=eval_batch_transform)
        outputs = torch.empty(len(val_set), *part.shape[1:])
        for r, p in enumerate(utils.gather_objects(part)):
            outputs[r::world] = p
        return outputs

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
            "rng": rng_state(),
            "config": config,
        }

    with StopRequest() as stop:
        for epoch in range(first_epoch, args.epochs + 1):
            start = time.time()
            if progress is None:
                progress = {"epoch": epoch, "step": 0, "loss_sum": 0.0, "preds": [], "targets": [], "time_s": 0.0}
            sampler.set_epoch(epoch, start=progress["step"] * args.batch_size)
            progress["steps"] = progress["step"] + len(train_loader)
            finished = train_one_epoch(
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
                if main_rank:
                    utils.save_checkpoint(run_dir / "last.pth", **state(epoch - 1, progress, model))
                    writer.close()
                print(
                    f"Stopped by {stop.signal or 'a signal'} in epoch {epoch} after step {progress['step']}; saved "
                    f"{run_dir / 'last.pth'}. Continue with: python train.py --resume {run_dir}"
                )
                return None
            gathered = utils.gather_objects((progress["loss_sum"], progress["preds"], progress["targets"]))
            train_preds = torch.cat([t for _, p, _ in gathered for t in p]).numpy()
            train_targets = torch.cat([t for _, _, g in gathered for t in g]).numpy()
            train_loss, train_time = sum(g[0] for g in gathered) / len(train_targets), progress["time_s"]
            progress = None

            start = time.time()
            outputs = validate(train_model, "validation")
            val_loss = criterion(outputs.to(device), val_targets.to(device)).item()
            probs = torch.softmax(to_logits(outputs), 1)
            val_preds = probs.argmax(1).numpy()
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
                ema_probs = torch.softmax(to_logits(validate(ema.module, "validation (EMA)")), 1)
                row["ema_val_f1"] = utils.macro_f1(val_set.targets, ema_probs.argmax(1).numpy(), num_classes)
                if row["ema_val_f1"] > val_f1:
                    score, best_weights, probs = row["ema_val_f1"], ema.module, ema_probs
                    val_preds = probs.argmax(1).numpy()
            row.update(report.task_metrics(data, val_set.targets, val_preds))
            is_best = score > best_f1
            row.update({"lr": schedule.lr, "time_s": train_time + time.time() - start, "best": is_best})
            rows.append(row)
            print(report.log_line(row, args.epochs), flush=True)
            schedule.step_epoch(score)
            if is_best:
                best_f1, best_epoch, best_probs = score, epoch, probs.numpy()
            stopping = stopper.step(score)
            if main_rank:
                report.write_log(run_dir / "log.csv", rows)
                report.log_epoch(
                    writer,
                    row,
                    val_set.targets,
                    val_preds,
                    data.class_names,
                    first_val_images,
                    config["mean"],
                    config["std"],
                )
                if is_best:
                    utils.save_checkpoint(run_dir / "best.pth", **{**state(epoch, None, best_weights), "rng": None})
                    report.write_best_reports(
                        run_dir, data, val_idx, val_set.targets, probs.numpy(), val_set.pixels, writer, epoch
                    )
                utils.save_checkpoint(run_dir / "last.pth", **state(epoch, None, model))
            if stopping:
                print(f"Early stopping: no better validation macro F1 for {args.patience} epochs")
                break
            if utils.any_rank(bool(stop)):
                print(f"Stopped by {stop.signal} after epoch {epoch}; continue: python train.py --resume {run_dir}")
                return None
    if writer is not None:
        best_row = next(r for r in rows if r["epoch"] == best_epoch)
        metrics = {"hparam/best_val_f1": best_f1, "hparam/best_epoch": best_epoch}
        metrics |= {
            f"hparam/{k}": best_row[k] for k in ("val_mask_acc", "val_gender_acc", "val_age_acc") if k in best_row
        }
        report.log_hparams(writer, config, metrics)
        writer.close()
    print(f"Best validation macro F1 {best_f1:.4f} at epoch {best_epoch}; saved in {run_dir}")
    print(f"Next: python inference.py --model_dir {run_dir}")
    return {"val_idx": val_idx, "probs": best_probs, "best_f1": best_f1}
