"""Training criteria, built by name with `create_criterion`; all work for any number of classes.

    python train.py --criterion focal
    python -c "import loss; print(loss.create_criterion('label_smoothing', smoothing=0.1))"
    python -c "import loss; print(loss.create_criterion('focal', tasks=(3, 2, 3), task_weights=(1, 0.5, 1)))"

Every criterion takes `(input, target)`: input (N, K) logits; target (N,) class indices, or (N, K) class
probabilities whose rows sum to 1 (as mixup and cutmix make) where its class attribute `soft_targets` is True.
For a multi-head model, `create_criterion(name, tasks=...)` wraps the criterion in a `MultiTaskLoss`.

To add a loss, define an `nn.Module` here and add it to `_criterion_entrypoints`; its constructor takes what
it needs from `num_classes`, `class_counts`, `weight` (per-class tensor) and its own keyword arguments. Set
`soft_targets = True` on it once its forward also handles (N, K) probability targets.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import utils
from utils import UserError


def inverse_frequency_weights(class_counts: Sequence[int]) -> torch.Tensor:
    """Weights n / (K * count_k), so a balanced set gets all ones; a class with no samples gets weight 0."""
    counts = torch.as_tensor(class_counts, dtype=torch.float32)
    present = counts > 0
    weights = torch.zeros_like(counts)
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return weights


def _log_softmax(input: torch.Tensor) -> torch.Tensor:
    """Log-probabilities in at least float32: half-precision logits (autocast) lose too much in these sums."""
    return F.log_softmax(input, dim=-1, dtype=torch.promote_types(input.dtype, torch.float32))


def _check_soft(input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """`target` as probabilities in `input`'s dtype, after checking it is one row of K classes per sample."""
    assert target.shape == input.shape, f"soft targets must be (N, K) like the logits {tuple(input.shape)}"
    return target.to(input.dtype)


def soft_cross_entropy(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """Cross-entropy against (N, K) class probabilities that equals `F.cross_entropy` on one-hot targets.

    The weighted mean divides by sum_i sum_k w_k t_ik, the target weight of each sample, as `F.cross_entropy`
    does for class indices; its own probability-target path divides by N instead, so a one-hot target would
    give another loss there once `weight` is set. Smoothing mixes each row with the uniform distribution.
    """
    log_prob = _log_softmax(input)
    target = _check_soft(log_prob, target)
    smoothed = target * (1 - label_smoothing) + label_smoothing / input.shape[-1]
    if weight is not None:
        weight = weight.to(log_prob.dtype)
        smoothed, target = smoothed * weight, target * weight
    per_sample = -(smoothed * log_prob).sum(-1)
    if reduction == "none":
        return per_sample
    if reduction == "sum":
        return per_sample.sum()
    return per_sample.sum() / target.sum()


class CrossEntropyLoss(nn.CrossEntropyLoss):
    """Plain cross-entropy."""

    soft_targets = True

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if not target.is_floating_point():
            return super().forward(input, target)
        return soft_cross_entropy(input, target, self.weight, self.label_smoothing, self.reduction)


class WeightedCrossEntropyLoss(CrossEntropyLoss):
    """Cross-entropy weighted by inverse class frequency of the training split (for imbalanced classes)."""

    def __init__(self, class_counts: Sequence[int]) -> None:
        super().__init__(weight=inverse_frequency_weights(class_counts))


class FocalLoss(nn.Module):
    """Focal loss (Lin et al., 2017): cross-entropy scaled by (1 - p_true)^gamma to focus on hard examples."""

    soft_targets = True

    def __init__(self, gamma: float = 2.0, weight: torch.Tensor | None = None) -> None:
        super().__init__()
        self.gamma = gamma
        self.register_buffer("weight", weight)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        log_prob = _log_softmax(input)
        focal = (1 - log_prob.exp()) ** self.gamma * log_prob
        if not target.is_floating_point():
            return F.nll_loss(focal, target, weight=self.weight)
        # Soft targets: -sum_k t_k w_k (1 - p_k)^gamma log p_k, averaged over the samples' target weights as
        # nll_loss does, so a one-hot target gives the loss of its class index.
        target = _check_soft(focal, target)
        if self.weight is not None:
            target = target * self.weight.to(focal.dtype)
        return -(target * focal).sum() / target.sum()


class LabelSmoothingLoss(CrossEntropyLoss):
    """Cross-entropy against targets smoothed by `smoothing`, spread evenly over all classes."""

    def __init__(self, smoothing: float = 0.1, weight: torch.Tensor | None = None) -> None:
        super().__init__(weight=weight, label_smoothing=smoothing)


class F1Loss(nn.Module):
    """1 - macro soft-F1 over all `num_classes` classes (probabilities in place of hard counts)."""

    soft_targets = True

    def __init__(self, num_classes: int, epsilon: float = 1e-7) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.epsilon = epsilon

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        prob = F.softmax(input, dim=-1, dtype=torch.promote_types(input.dtype, torch.float32))
        if target.is_floating_point():
            truth = _check_soft(prob, target)
        else:
            truth = F.one_hot(target, self.num_classes).to(prob.dtype)
        tp = (prob * truth).sum(0)
        fp = (prob * (1 - truth)).sum(0)
        fn = ((1 - prob) * truth).sum(0)
        f1 = 2 * tp / (2 * tp + fp + fn + self.epsilon)
        return 1 - f1.mean()


def task_targets(target: torch.Tensor, tasks: Sequence[int]) -> list[torch.Tensor]:
    """Per-task targets from joint-class targets, class = row-major index into a grid of shape `tasks`.

    Class indices (N,) are unravelled (for the mask tasks (3, 2, 3): c // 6, c // 3 % 2, c % 3); class
    probabilities (N, prod(tasks)) become each task's marginal (the sum over the other tasks' classes).
    """
    if not target.is_floating_point():
        parts = []
        for size in reversed(tasks):
            parts.append(target % size)
            target = target // size
        return parts[::-1]
    assert target.shape[-1] == math.prod(tasks), f"soft targets must be {math.prod(tasks)} wide for tasks {tasks}"
    if len(tasks) == 1:  # sum over an empty list of dims would sum over all of them
        return [target]
    grid = target.reshape(-1, *tasks)
    dims = range(1, len(tasks) + 1)
    return [grid.sum(dim=[d for d in dims if d != i]) for i in dims]


def task_class_counts(class_counts: Sequence[int], tasks: Sequence[int]) -> list[list[int]]:
    """The number of samples of each class of each task, from the counts of the joint classes."""
    counts = torch.as_tensor(class_counts, dtype=torch.float64)[None]
    return [part[0].round().long().tolist() for part in task_targets(counts, tasks)]


class MultiTaskLoss(nn.Module):
    """Weighted sum of one criterion per task of a multi-head model, against joint-class targets."""

    soft_targets = True

    def __init__(
        self, criteria: Sequence[nn.Module], tasks: Sequence[int], task_weights: Sequence[float] | None = None
    ) -> None:
        super().__init__()
        assert len(criteria) == len(tasks), f"one criterion per task: {len(criteria)} criteria, tasks {tasks}"
        task_weights = [1.0] * len(tasks) if task_weights is None else [float(w) for w in task_weights]
        if len(task_weights) != len(tasks):
            raise UserError(f"--task_weights needs {len(tasks)} numbers, one per task; got {len(task_weights)}")
        if min(task_weights) < 0 or sum(task_weights) == 0:
            raise UserError(f"--task_weights {task_weights} must be >= 0 and not all 0")
        self.criteria = nn.ModuleList(criteria)
        self.tasks = tuple(int(size) for size in tasks)
        self.task_weights = tuple(task_weights)
        self.soft_targets = all(getattr(c, "soft_targets", False) for c in criteria)

    def task_losses(self, input: torch.Tensor, target: torch.Tensor) -> list[torch.Tensor]:
        """Each task's loss: its criterion on its block of `input` against its part of the joint `target`."""
        assert input.shape[-1] == sum(self.tasks), f"outputs are {input.shape[-1]} wide, tasks {self.tasks}"
        logits = input.split(list(self.tasks), dim=-1)
        return [c(x, t) for c, x, t in zip(self.criteria, logits, task_targets(target, self.tasks), strict=True)]

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        losses = self.task_losses(input, target)
        return sum(w * value for w, value in zip(self.task_weights, losses, strict=True))


_criterion_entrypoints = {
    "cross_entropy": CrossEntropyLoss,
    "focal": FocalLoss,
    "label_smoothing": LabelSmoothingLoss,
    "f1": F1Loss,
    "weighted_cross_entropy": WeightedCrossEntropyLoss,
}


def criterion_names() -> list[str]:
    return list(_criterion_entrypoints)


def check_criterion_name(name: str) -> None:
    if name not in _criterion_entrypoints:
        raise UserError(utils.unknown_name_message("--criterion", name, _criterion_entrypoints))


def accepts_soft_targets(name: str) -> bool:
    """Whether criterion `name` takes (N, K) class probabilities as targets, as mixup and cutmix need."""
    check_criterion_name(name)
    return bool(getattr(_criterion_entrypoints[name], "soft_targets", False))


def accepts_class_weights(name: str) -> bool:
    """Whether criterion `name` takes a per-class `weight` tensor (so `class_weights=True` can apply)."""
    check_criterion_name(name)
    return "weight" in utils.filter_kwargs(_criterion_entrypoints[name], {"weight": None})


def create_criterion(
    name: str,
    *,
    tasks: Sequence[int] | None = None,
    task_weights: Sequence[float] | None = None,
    class_weights: bool = False,
    **kwargs: Any,
) -> nn.Module:
    """The criterion `name`, given whichever of `kwargs` its constructor accepts.

    kwargs: `num_classes`, `class_counts` (training samples per class), `weight` (per-class tensor) and the
    criterion's own (`gamma`, `smoothing`, ...). `class_weights=True` sets `weight` to the inverse frequency of
    `class_counts`. `tasks` (the class count of each head of a multi-head model, `model.task_sizes(model)`)
    makes a `MultiTaskLoss`: criterion `name` on each task, built with that task's `num_classes`, marginal
    `class_counts` and (with `class_weights`) marginal weights, summed with `task_weights` (default all 1).
    """
    check_criterion_name(name)
    if tasks is not None:
        return _create_multitask(name, tasks, task_weights, class_weights, kwargs)
    if task_weights is not None:
        raise UserError("--task_weights is for multi-head models (--model MultiHeadModel): drop it")
    entry = _criterion_entrypoints[name]
    if class_weights:
        if not accepts_class_weights(name):
            valid = [n for n in _criterion_entrypoints if accepts_class_weights(n)]
            raise UserError(
                f"--class_weights: --criterion {name} takes no per-class weights; use one of {', '.join(valid)}"
            )
        if kwargs.get("class_counts") is None:
            raise ValueError("class_weights=True needs class_counts")
        kwargs["weight"] = inverse_frequency_weights(kwargs["class_counts"])
    return entry(**utils.filter_kwargs(entry, kwargs))


def _create_multitask(
    name: str,
    tasks: Sequence[int],
    task_weights: Sequence[float] | None,
    class_weights: bool,
    kwargs: dict[str, Any],
) -> MultiTaskLoss:
    """`MultiTaskLoss` of criterion `name` per task; see `create_criterion`."""
    kwargs = dict(kwargs)
    num_classes = kwargs.pop("num_classes", None)
    if num_classes is not None and num_classes != math.prod(tasks):
        raise ValueError(f"num_classes {num_classes} is not the product of the task sizes {tuple(tasks)}")
    if kwargs.get("weight") is not None:
        raise ValueError("a per-class weight cannot be split into tasks: pass class_weights=True and class_counts")
    kwargs.pop("weight", None)
    counts = kwargs.pop("class_counts", None)
    task_counts = task_class_counts(counts, tasks) if counts is not None else [None] * len(tasks)
    criteria = [
        create_criterion(name, num_classes=size, class_counts=c, class_weights=class_weights, **kwargs)
        for size, c in zip(tasks, task_counts, strict=True)
    ]
    return MultiTaskLoss(criteria, tasks, task_weights)
