"""Optimizers by torch.optim name, learning-rate schedules stepped per iteration (with warmup), and the EMA of
the weights: what `--optimizer`, `--scheduler`, `--warmup_epochs` and `--ema` build.

    python train.py --optimizer SGD --lr 0.05 --scheduler step --lr_decay_step 4 --gamma 0.3
    python train.py --scheduler onecycle --warmup_epochs 2 --ema 0.999
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import utils
from utils import UserError

SCHEDULERS = ("none", "step", "cosine", "cosine_restarts", "onecycle", "plateau")


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


def make_ema(model: nn.Module, decay: float) -> AveragedModel:
    """torch's AveragedModel as an exponential moving average of the weights (and BatchNorm buffers)."""
    return AveragedModel(utils.unwrap_model(model), multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
