"""One pass over a split's training images: the sampler (an order that is a function of seed and epoch, so a
resumed epoch continues where it stopped), the loaders, and the epoch's steps: mixed precision, gradient
accumulation (no_sync under DDP), distillation from teachers, and the loss read on the host every few steps.

engine.py's Trainer calls `train_one_epoch` once an epoch; it reads `LoopSettings`, from the run's config.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

import augmentation
import devices
import distill
import model as model_module
import predict
import utils
from utils import UserError


# ---------------------------------------------------------------------------------------------------
# Sampling
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


# ---------------------------------------------------------------------------------------------------
# What the loop reads from the run's config.
@dataclass(frozen=True)
class LoopSettings:
    """The settings of the epoch loop, read from the run's config (train.py's resolved flags)."""

    epochs: int = 24
    batch_size: int = 64
    valid_batch_size: int = 256
    grad_accum: int = 1
    clip_grad: float = 0.0  # max gradient norm (0: off)
    amp: str = "off"  # off, fp16, bf16
    channels_last: bool = False
    mixup: float = 0.0  # Beta alpha (0: off)
    cutmix: float = 0.0
    cutmix_mode: str = "box"
    mix_prob: float = 1.0  # share of batches mixed
    kd_alpha: float = 0.7  # --teacher: the distillation term's share of the loss
    kd_temperature: float = 2.0
    eval_metric: str = "macro_f1"  # what selects best.pth and drives early stopping and plateau
    patience: int = 0  # epochs without a better score before stopping (0: never)
    seed: int = 42
    num_workers: int = 0
    pin_memory: bool | None = None  # None: on with CUDA
    persistent_workers: bool = True
    prefetch_factor: int = 2

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> LoopSettings:
        return cls(**{f.name: config[f.name] for f in dataclasses.fields(cls) if f.name in config})


# ---------------------------------------------------------------------------------------------------
# One epoch
HOST_SYNC_STEPS = 20  # steps between reads of the loss on the host: each read waits for the GPU's queue to drain


class Tally:
    """The epoch's loss sum and predictions, kept on the device between host reads (each `.item()` or `.cpu()`
    of a CUDA tensor waits for the GPU), and moved into the epoch's progress every `HOST_SYNC_STEPS` steps."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.loss_sum, self.preds, self.targets = device, torch.zeros((), device=device), [], []
        self.last_loss = torch.zeros((), device=device)

    def add(self, loss: torch.Tensor, preds: torch.Tensor, targets: torch.Tensor) -> None:
        self.last_loss = loss.detach()
        self.loss_sum += self.last_loss * len(targets)
        self.preds.append(preds)
        self.targets.append(targets)

    def flush(self, progress: dict[str, Any], bar: Any) -> None:
        """Into `progress`, after deciding across ranks whether any loss was not finite (a rank that raised alone
        would leave the others waiting in their next collective)."""
        loss_sum = float(self.loss_sum)
        if devices.any_rank(not math.isfinite(loss_sum)):
            where = f"became {loss_sum}" if not math.isfinite(loss_sum) else "became inf or nan on another rank"
            raise UserError(f"the loss {where} at epoch {progress['epoch']}: lower --lr, or use --clip_grad 1")
        if self.targets:
            progress["loss_sum"] += loss_sum
            progress["preds"].append(torch.cat(self.preds).cpu())
            progress["targets"].append(torch.cat(self.targets))
            bar.set_postfix(loss=f"{float(self.last_loss):.3f}")
        self.loss_sum.zero_()
        self.preds, self.targets = [], []


def train_one_epoch(
    model: nn.Module,
    loader: Any,
    criterion: nn.Module,
    state: Any,  # engine.RunState
    settings: LoopSettings,
    device: torch.device,
    num_classes: int,
    batch_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    stop: utils.StopRequest | None = None,
    teachers: distill.Teachers | None = None,
) -> bool:
    """Train `model` (the state's model, maybe wrapped) over `loader`, accumulating into `state.progress`
    (step, steps, loss_sum, preds, targets: what a resumed epoch needs to continue its metrics), learning from
    `teachers` too when given. Returns False when `stop` interrupted the epoch."""
    model.train()
    progress, optimizer = state.progress, state.optimizer
    scaler = state.scaler or predict.make_scaler("off", device)
    accum, mixing = settings.grad_accum, settings.mixup > 0 or settings.cutmix > 0
    # Host reads at optimizer steps only; one process checks for a stop every step (free), DDP ranks agree on it
    # at the host reads (a collective).
    interval, alone = accum * max(1, HOST_SYNC_STEPS // accum), not devices.is_distributed()
    tally = Tally(device)
    bar = tqdm(loader, desc=f"epoch {progress['epoch']}", leave=False, disable=not sys.stderr.isatty())
    optimizer.zero_grad(set_to_none=True)
    for images, labels, *cached in bar:  # cached: the teachers' logits of the batch's images (--kd_cache)
        images, targets = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        if batch_transform is not None:
            images = batch_transform(images)
        if settings.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        if targets.is_floating_point():  # soft targets already (--pseudo_soft; never mixed: options)
            mixed, soft, labels = images, targets, labels.argmax(1)
        else:
            mixed, soft = augmentation.mix_batch(
                images, targets, num_classes, settings.mixup, settings.cutmix, settings.cutmix_mode, settings.mix_prob
            )
        # Step every `accum` micro-batches, and on the epoch's last batch so no gradient is carried over. Under
        # DDP the micro-batches before a step skip the gradient all-reduce (no_sync): one per optimizer step.
        stepping = (progress["step"] + 1) % accum == 0 or progress["step"] + 1 == progress["steps"]
        with contextlib.nullcontext() if stepping or not hasattr(model, "no_sync") else model.no_sync():
            with predict.autocast(settings.amp, device):
                outputs = model(mixed)
                loss = criterion(outputs.float(), soft if mixing or targets.is_floating_point() else targets)
                if teachers is not None:  # the same augmented, mixed batch; or the cached un-augmented images
                    temperature = settings.kd_temperature
                    taught = (teachers.from_logits(cached[0].to(device), temperature) if cached
                              else teachers(mixed, temperature))  # fmt: skip
                    loss = distill.kd_loss(model_module.to_class_logits(outputs.float(), model), taught, loss,
                                           settings.kd_alpha, temperature)  # fmt: skip
            scaler.scale(loss / accum).backward()
        progress["step"] += 1
        if stepping:
            if settings.clip_grad:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), settings.clip_grad)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            state.schedule.step_batch()
            if state.ema is not None:
                state.ema.update_parameters(utils.unwrap_model(model))
        tally.add(loss, model_module.to_class_logits(outputs.detach().float(), model).argmax(1), labels)
        synced = progress["step"] % interval == 0 or progress["step"] == progress["steps"]
        if synced:
            tally.flush(progress, bar)
        if progress["step"] % accum == 0 and (alone or synced) and devices.any_rank(bool(stop)):
            tally.flush(progress, bar)  # all ranks stop at the same step
            return False
    return True


# ---------------------------------------------------------------------------------------------------
# Loaders
def loader_workers(subset: torch.utils.data.Dataset, num_workers: int) -> int:
    """`num_workers`, or none when each batch is one copy out of the RAM cache (ImageSubset.gather): handing
    batches over from worker processes costs more than making them (bench/bench_data.py)."""
    base = subset.dataset if isinstance(subset, torch.utils.data.Subset) else subset
    return 0 if getattr(base, "gather", False) else num_workers


def make_loader(
    subset: torch.utils.data.Dataset,
    batch_size: int,
    settings: LoopSettings,
    device: torch.device,
    sampler: EpochSampler | None = None,
) -> DataLoader:
    """A training loader (with `sampler`: the order is a function of seed and epoch, see EpochSampler) or a
    validation loader (in order, every image once)."""
    workers = loader_workers(subset, settings.num_workers)
    return DataLoader(
        subset,
        batch_size=batch_size,
        sampler=sampler,
        # A last training batch of one image breaks BatchNorm; validation always sees every image.
        drop_last=sampler is not None and len(sampler) % batch_size == 1,
        num_workers=workers,
        pin_memory=device.type == "cuda" if settings.pin_memory is None else settings.pin_memory,
        persistent_workers=workers > 0 and settings.persistent_workers,
        prefetch_factor=settings.prefetch_factor if workers > 0 else None,
        worker_init_fn=devices.seed_worker,
        generator=torch.Generator().manual_seed(settings.seed + devices.RANK_SEED_STRIDE * devices.rank()),  # workers
    )
