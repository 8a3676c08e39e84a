"""The training engine behind train.py: mixed precision, optimizers and schedules, EMA, mixup/cutmix,
gradient accumulation and clipping, a resumable sampler, clean stops on SIGINT/SIGTERM, one training epoch.

    python train.py --amp bf16 --scheduler onecycle --warmup_epochs 1 --ema 0.999 --mixup 0.2
    python train.py --cutmix 1.0 --cutmix_mode vertical --grad_accum 2 --clip_grad 5
    python train.py --resume model/exp            # continue a stopped run in the same directory

Every piece is a function or a small class that train.py composes; tests call them directly.
"""

from __future__ import annotations

import contextlib
import math
import random
import signal
import sys
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

import utils
from utils import UserError

SCHEDULERS = ("none", "step", "cosine", "cosine_restarts", "onecycle", "plateau")
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
# Optimizer and schedule
def optimizer_names() -> list[str]:
    return sorted(
        n
        for n, c in vars(torch.optim).items()
        if isinstance(c, type) and issubclass(c, torch.optim.Optimizer) and c is not torch.optim.Optimizer
    )


def build_optimizer(
    model: nn.Module, name: str, lr: float, weight_decay: float, momentum: float, decay_norm_bias: bool = False
) -> torch.optim.Optimizer:
    """torch.optim.`name` over the model's parameters. Without `decay_norm_bias`, biases and normalization
    weights (every parameter with fewer than 2 dimensions) get no weight decay: shrinking them only hurts."""
    cls = getattr(torch.optim, name)
    params = [p for p in model.parameters() if p.requires_grad]
    if decay_norm_bias or weight_decay == 0:
        groups: list[dict[str, Any]] = [{"params": params}]
    else:
        groups = [
            {"params": [p for p in params if p.ndim > 1]},
            {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0},
        ]
    kwargs = {"lr": lr, "weight_decay": weight_decay, "momentum": momentum}
    return cls(groups, **utils.filter_kwargs(cls, kwargs))


def lr_factor(
    name: str, step: int, total: int, steps_per_epoch: int, warmup: int, decay_epochs: int, gamma: float
) -> float:
    """The lr multiplier after `step` optimizer steps (of `total`): linear warmup over `warmup` steps, then
    the schedule `name` (none, step, cosine, cosine_restarts). Closed forms, so resume is exact."""
    if step < warmup:
        return (step + 1) / warmup
    if name == "none":
        return 1.0
    if name == "step":
        return gamma ** (step // (decay_epochs * steps_per_epoch))
    if name == "cosine":
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    if name == "cosine_restarts":  # SGDR: cosine to 0 every `decay_epochs` epochs, then back to the peak
        period = decay_epochs * steps_per_epoch
        return 0.5 * (1 + math.cos(math.pi * ((step - warmup) % period) / period))
    raise UserError(f"--scheduler {name} is unknown: choose one of {', '.join(SCHEDULERS)}")


class Schedule:
    """The learning rate of every step: warmup, then a per-step schedule; `plateau` cuts the lr by `gamma` after
    `patience` epochs without a better validation macro F1 (stepped per epoch)."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        name: str,
        epochs: int,
        steps_per_epoch: int,
        warmup_epochs: float = 0.0,
        decay_epochs: int = 20,
        gamma: float = 0.5,
        patience: int = 2,
    ) -> None:
        self.optimizer, self.name = optimizer, name
        self.steps_per_epoch = steps_per_epoch
        self.total = epochs * steps_per_epoch
        self.warmup = min(self.total, round(warmup_epochs * steps_per_epoch))
        self.decay_epochs, self.gamma = decay_epochs, gamma
        self.base_lrs = [g["lr"] for g in optimizer.param_groups]
        self.step_count = 0
        self.plateau = None
        self.onecycle = None
        if name == "onecycle":  # its own rise: the warmup epochs, or 30% of training without them
            pct = self.warmup / self.total if self.warmup else 0.3
            self.onecycle = torch.optim.lr_scheduler.OneCycleLR(
                optimizer, max_lr=self.base_lrs, total_steps=self.total, pct_start=min(max(pct, 1e-3), 0.999)
            )
        elif name == "plateau":
            self.plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
                optimizer, mode="max", factor=gamma, patience=patience
            )
        if self.onecycle is None:
            self._apply()

    def _apply(self) -> None:
        if self.plateau is not None:  # warmup only; afterwards ReduceLROnPlateau owns the lr
            if self.step_count <= self.warmup and self.warmup:
                for group, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
                    group["lr"] = base * min(1.0, (self.step_count + 1) / self.warmup)
            return
        factor = lr_factor(
            self.name, self.step_count, self.total, self.steps_per_epoch, self.warmup, self.decay_epochs, self.gamma
        )
        for group, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = base * factor

    def step_batch(self) -> None:
        """After each optimizer step."""
        self.step_count += 1
        if self.onecycle is not None:
            if self.step_count < self.total:
                self.onecycle.step()
        else:
            self._apply()

    def step_epoch(self, score: float) -> None:
        """After each validation, with its macro F1."""
        if self.plateau is not None and self.step_count >= self.warmup:
            self.plateau.step(score)

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def state_dict(self) -> dict[str, Any]:
        inner = self.onecycle or self.plateau
        return {"step_count": self.step_count, "inner": inner.state_dict() if inner is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step_count = state["step_count"]
        inner = self.onecycle or self.plateau
        if inner is not None:
            inner.load_state_dict(state["inner"])


# ---------------------------------------------------------------------------------------------------
# EMA, mixup / cutmix
def make_ema(model: nn.Module, decay: float) -> AveragedModel:
    """torch's AveragedModel as an exponential moving average of the weights (and BatchNorm buffers)."""
    return AveragedModel(utils.unwrap_model(model), multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def cutmix_box(height: int, width: int, lam: float, mode: str) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of the patch pasted from the other image; its area is about 1 - lam.

    `vertical` cuts at a random column: the left part from one face, the right from another, so each part
    keeps its eyes and mask region (a box would often paste someone's mouth over a mask)."""
    if mode == "vertical":
        left = round(width * lam)
        return 0, height, left, width
    cut_h, cut_w = round(height * math.sqrt(1 - lam)), round(width * math.sqrt(1 - lam))
    cy, cx = int(torch.randint(height, ())), int(torch.randint(width, ()))
    top, bottom = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
    left, right = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
    return top, bottom, left, right


def mix_batch(
    images: torch.Tensor,
    targets: torch.Tensor,
    num_classes: int,
    mixup: float = 0.0,
    cutmix: float = 0.0,
    cutmix_mode: str = "box",
    prob: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup (alpha `mixup`) or cutmix (alpha `cutmix`; one of the two at random when both are set) on a batch
    with probability `prob`. Returns the images and soft targets (N, num_classes) that sum to 1 per row."""
    soft = F.one_hot(targets, num_classes).to(torch.float32)
    if (mixup <= 0 and cutmix <= 0) or float(torch.rand(())) >= prob:
        return images, soft
    use_cutmix = cutmix > 0 and (mixup <= 0 or float(torch.rand(())) < 0.5)
    alpha = cutmix if use_cutmix else mixup
    lam = float(np.clip(torch.distributions.Beta(alpha, alpha).sample(), 0.0, 1.0))
    perm = torch.randperm(len(images)).to(images.device)
    if use_cutmix:
        top, bottom, left, right = cutmix_box(images.shape[-2], images.shape[-1], lam, cutmix_mode)
        images = images.clone()
        images[..., top:bottom, left:right] = images[perm][..., top:bottom, left:right]
        lam = 1 - (bottom - top) * (right - left) / (images.shape[-2] * images.shape[-1])
    else:
        images = lam * images + (1 - lam) * images[perm]
    return images, lam * soft + (1 - lam) * soft[perm]


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
    schedule: Schedule,
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
        mixed, soft = mix_batch(images, targets, num_classes, args.mixup, args.cutmix, args.cutmix_mode, args.mix_prob)
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
        if stop and progress["step"] % accum == 0:
            return False
    return True
