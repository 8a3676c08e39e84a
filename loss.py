"""Training criteria, built by name with `create_criterion`; all work for any number of classes.

    python train.py --criterion focal
    python -c "import loss; print(loss.create_criterion('label_smoothing', smoothing=0.1))"

To add a loss, define an `nn.Module` here and add it to `_criterion_entrypoints`; its constructor takes
what it needs from `num_classes`, `class_counts` and its own keyword arguments.
"""

from __future__ import annotations

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


class CrossEntropyLoss(nn.CrossEntropyLoss):
    """Plain cross-entropy."""


class WeightedCrossEntropyLoss(nn.CrossEntropyLoss):
    """Cross-entropy weighted by inverse class frequency of the training split (for imbalanced classes)."""

    def __init__(self, class_counts: Sequence[int]) -> None:
        super().__init__(weight=inverse_frequency_weights(class_counts))


class FocalLoss(nn.Module):
    """Focal loss (Lin et al., 2017): cross-entropy scaled by (1 - p_true)^gamma to focus on hard examples."""

    def __init__(self, gamma: float = 2.0, weight: torch.Tensor | None = None) -> None:
        super().__init__()
        self.gamma = gamma
        self.register_buffer("weight", weight)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        log_prob = F.log_softmax(input, dim=-1)
        prob = log_prob.exp()
        return F.nll_loss((1 - prob) ** self.gamma * log_prob, target, weight=self.weight)


class LabelSmoothingLoss(nn.CrossEntropyLoss):
    """Cross-entropy against targets smoothed by `smoothing`, spread evenly over all classes."""

    def __init__(self, smoothing: float = 0.1) -> None:
        super().__init__(label_smoothing=smoothing)


class F1Loss(nn.Module):
    """1 - macro soft-F1 over all `num_classes` classes (probabilities in place of hard counts)."""

    def __init__(self, num_classes: int, epsilon: float = 1e-7) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.epsilon = epsilon

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        prob = F.softmax(input, dim=-1)
        truth = F.one_hot(target, self.num_classes).to(prob.dtype)
        tp = (prob * truth).sum(0)
        fp = (prob * (1 - truth)).sum(0)
        fn = ((1 - prob) * truth).sum(0)
        f1 = 2 * tp / (2 * tp + fp + fn + self.epsilon)
        return 1 - f1.mean()


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


def create_criterion(name: str, **kwargs: Any) -> nn.Module:
    """The criterion `name`, given whichever of `kwargs` its constructor accepts (e.g. num_classes, class_counts)."""
    check_criterion_name(name)
    entry = _criterion_entrypoints[name]
    return entry(**utils.filter_kwargs(entry, kwargs))
