"""Optimizers by torch.optim name, learning-rate schedules stepped per iteration (with warmup), and the EMA of
the weights: what `--optimizer`, `--scheduler`, `--warmup_epochs` and `--ema` build.

    python train.py --optimizer SGD --lr 0.05 --scheduler step --lr_decay_step 4 --gamma 0.3
    python train.py --scheduler onecycle --warmup_epochs 2 --ema 0.999
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import torch
from torch import nn
from torch.optim import lr_scheduler
from torch.optim.swa_utils import SWALR, AveragedModel, get_ema_multi_avg_fn

import model as model_module
import utils
from utils import UserError

SCHEDULERS = ("none", "step", "cosine", "cosine_restarts", "onecycle", "plateau")


def optimizer_names() -> list[str]:
    """torch.optim's optimizers that can train the way train.py does (`trains_here`): the --optimizer choices."""
    return [name for name in sorted(vars(torch.optim)) if trains_here(name)]


def check_optimizer(name: str) -> None:
    """A `UserError` naming the choices unless --optimizer `name` is one of `optimizer_names`."""
    if trains_here(name):
        return
    if hasattr(torch.optim, name):
        raise UserError(
            f"--optimizer {name} cannot train the way train.py does (a step per batch without a closure, on dense "
            f"gradients, for parameters of every shape): use one of {', '.join(optimizer_names())}"
        )
    raise UserError(utils.unknown_name_message("--optimizer", name, optimizer_names()))


@functools.cache
def trains_here(name: str) -> bool:
    """Whether torch.optim.`name` is an optimizer that `build_optimizer` builds over parameters of every shape and
    that steps without a closure on dense gradients: tried once on a tiny conv-BN model, with the random state put
    back. LBFGS wants a closure, SparseAdam sparse gradients, Muon 2-D parameters only: --optimizer refuses them in
    one line instead of failing at the first step."""
    cls = getattr(torch.optim, name, None)
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer) and cls is not torch.optim.Optimizer):
        return False
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        probe = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
        try:
            optimizer = build_optimizer(probe, name, lr=1e-3, weight_decay=1e-4, momentum=0.9)
            probe(torch.ones(2, 1, 4, 4)).sum().backward()
            optimizer.step()
        except Exception:  # noqa: BLE001 (any refusal: the optimizer cannot train this way)
            return False
    return True


def build_optimizer(
    model: nn.Module,
    name: str,
    lr: float,
    weight_decay: float,
    momentum: float,
    decay_norm_bias: bool = False,
    backbone_lr_scale: float = 1.0,
) -> torch.optim.Optimizer:
    """torch.optim.`name` over the model's trainable parameters. Without `decay_norm_bias`, biases and
    normalization weights (every parameter with fewer than 2 dimensions) get no weight decay: shrinking them only
    hurts. The heads (`model.head_parameters`) learn at `lr`, the rest at `lr * backbone_lr_scale`: pretrained
    features move less than the new layers on them."""
    cls = getattr(torch.optim, name)
    heads = {id(p) for p in model_module.head_parameters(model)} if backbone_lr_scale != 1 else set()
    groups: list[dict[str, Any]] = []
    for is_head in (False, True):
        params = [p for p in model.parameters() if p.requires_grad and (id(p) in heads) == is_head]
        rate = {} if is_head or backbone_lr_scale == 1 else {"lr": lr * backbone_lr_scale}
        if decay_norm_bias or weight_decay == 0:
            groups.append({"params": params, **rate})
        else:
            groups.append({"params": [p for p in params if p.ndim > 1], **rate})
            groups.append({"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0, **rate})
    groups = [g for g in groups if g["params"]]
    kwargs = {"lr": lr, "weight_decay": weight_decay, "momentum": momentum}
    return cls(groups, **utils.filter_kwargs(cls, kwargs))


class Schedule:
    """The learning rate of every step: a linear warmup over `warmup_epochs`, then the torch.optim.lr_scheduler
    of `name`, stepped per optimizer step; `plateau` cuts the lr by `gamma` after `patience` epochs without a
    better validation macro F1 (ReduceLROnPlateau, stepped per epoch once the warmup is over).

    After warmup step w of W the lr is base * (w + 1) / W; then, at step s of `total` (s >= W):
    none: base; step: base * gamma ** (s // (decay_epochs * steps_per_epoch)), counted from step 0;
    cosine: base * (1 + cos(pi * (s - W) / max(1, total - W))) / 2, 0 at the end; cosine_restarts: the same
    cosine over every decay_epochs * steps_per_epoch steps, back to base after each; onecycle: OneCycleLR, whose
    rise is the warmup (30% of training without one). tests/test_library_parity.py holds these closed forms."""

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
        swa_start: int = 0,
        swa_lr: float | None = None,
    ) -> None:
        if name not in SCHEDULERS:
            raise UserError(f"--scheduler {name} is unknown: choose one of {', '.join(SCHEDULERS)}")
        self.optimizer, self.name = optimizer, name
        self.steps_per_epoch = steps_per_epoch
        self.total = epochs * steps_per_epoch
        self.warmup = min(self.total, round(warmup_epochs * steps_per_epoch))
        self.decay_epochs, self.gamma = decay_epochs, gamma
        self.base_lrs = [g["lr"] for g in optimizer.param_groups]
        self.step_count = 0
        self.swa_start, self.swa_lr, self.swa = swa_start, swa_lr, None
        self.plateau = None
        if name == "plateau":
            self.plateau = lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=gamma, patience=patience)
        self.inner = self._build()
        # Steps the per-step scheduler takes: OneCycleLR refuses a step past its last; a cosine stepped past its
        # end would rise again; the plateau's warmup has reached the base lr after step W - 1.
        if name == "onecycle":
            self.last_step = self.total - 1
        elif name == "plateau":
            self.last_step = max(self.warmup - 1, 0)
        else:
            self.last_step = self.total

    def _build(self) -> lr_scheduler.LRScheduler | None:
        """A fresh per-step scheduler at step 0 (None for `none` without warmup), from the base lrs."""
        optimizer, warmup, total = self.optimizer, self.warmup, self.total
        for group, base in zip(optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = group["initial_lr"] = base  # a loaded optimizer state may carry another run's
        if self.name == "onecycle":  # its own rise: the warmup epochs, or 30% of training without them
            pct = warmup / total if warmup else 0.3
            return lr_scheduler.OneCycleLR(
                optimizer, max_lr=self.base_lrs, total_steps=total, pct_start=min(max(pct, 1e-3), 0.999)
            )
        # (w + 1) / W at warmup step w: LinearLR reaches end_factor after total_iters steps.
        rise = None
        if warmup:
            rise = lr_scheduler.LinearLR(optimizer, start_factor=1 / warmup, total_iters=max(1, warmup - 1))
        period = self.decay_epochs * self.steps_per_epoch
        if self.name in ("none", "plateau"):  # constant after warmup (plateau's cuts are ReduceLROnPlateau's)
            return rise
        if self.name == "step":
            # StepLR's drops every `period` steps counted from step 0, warmup included: SequentialLR restarts
            # the count after the warmup, so the drops are milestones shifted back by it (those at or before
            # the warmup's end apply at once when it ends).
            drops = [k * period - warmup for k in range(1, total // period + 1)]
            main = lr_scheduler.MultiStepLR(optimizer, milestones=drops, gamma=self.gamma)
        elif self.name == "cosine":
            main = lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, total - warmup))
        else:  # cosine_restarts, SGDR: cosine to 0 every `period` steps, then back to the peak
            main = lr_scheduler.CosineAnnealingWarmRestarts(optimizer, T_0=period)
        return main if rise is None else lr_scheduler.SequentialLR(optimizer, [rise, main], milestones=[warmup])

    def step_batch(self) -> None:
        """After each optimizer step."""
        self.step_count += 1
        if self.swa is None and self.inner is not None and self.step_count <= self.last_step:
            self.inner.step()

    def step_epoch(self, score: float, epoch: int = 0) -> None:
        """After each validation, with its macro F1. From epoch --swa_start on, SWALR sets the lr: annealed in one
        epoch (cosine) to --swa_lr (default: the lr reached) and held; the per-step schedule stops."""
        if self.swa_start and epoch >= self.swa_start:
            if self.swa is None:
                self.swa = SWALR(self.optimizer, self.swa_lr or self.lr, anneal_epochs=1, anneal_strategy="cos")
            else:
                self.swa.step()
        elif self.plateau is not None and self.step_count >= self.warmup:
            self.plateau.step(score)

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def state_dict(self) -> dict[str, Any]:
        """The step reached and the plateau's state (what follows from the flags is rebuilt, not saved)."""
        return {
            "step_count": self.step_count,
            "inner": self.plateau.state_dict() if self.plateau else None,
            "swa": self.swa.state_dict() if self.swa is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state`: the per-step scheduler is rebuilt and stepped to the saved step, which gives the
        lr an uninterrupted run has there, and, when a resumed run changes --epochs or --lr, the schedule of the
        new flags at that step. After the plateau's warmup the lr is the loaded optimizer's, as ReduceLROnPlateau
        last set it."""
        self.step_count = state["step_count"]
        if state.get("swa") is not None:  # in SWA: the lr is the loaded optimizer's, as SWALR last set it
            lrs = [g["lr"] for g in self.optimizer.param_groups]
            self.swa = SWALR(self.optimizer, self.swa_lr or self.lr, anneal_epochs=1, anneal_strategy="cos")
            self.swa.load_state_dict(state["swa"])
            for group, lr in zip(self.optimizer.param_groups, lrs, strict=True):
                group["lr"] = lr
            return
        if self.plateau is not None:
            self.plateau.load_state_dict(state["inner"])
            if self.step_count >= self.warmup:
                return
        with warnings.catch_warnings():  # replayed steps precede this optimizer's first step: torch warns
            warnings.simplefilter("ignore", UserWarning)
            self.inner = self._build()
            if self.inner is not None:
                for _ in range(min(self.step_count, self.last_step)):
                    self.inner.step()


def make_ema(model: nn.Module, decay: float) -> AveragedModel:
    """torch's AveragedModel as an exponential moving average of the weights (and BatchNorm buffers)."""
    return AveragedModel(utils.unwrap_model(model), multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def make_swa(model: nn.Module) -> AveragedModel:
    """torch's AveragedModel as the equal-weight average of the weights it is given (`update_parameters`), for
    --swa_start; its BatchNorm statistics are recomputed with `update_bn` before it is validated."""
    return AveragedModel(utils.unwrap_model(model))


def update_bn(swa: AveragedModel, loader: Any, device: torch.device, transform: Any = None) -> None:
    """torch.optim.swa_utils.update_bn over the training loader's batches, as the device sees them (`transform`:
    the normalization or batch augmentation the loader leaves to it)."""
    from torch.optim.swa_utils import update_bn as torch_update_bn

    def batches() -> Any:
        for images, _ in loader:
            images = images.to(device, non_blocking=True)
            yield transform(images) if transform is not None else images

    with torch.no_grad():
        torch_update_bn(batches(), swa.module)
