"""Every criterion is finite with gradients for 18 classes, and agrees with its definition."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import loss
from utils import UserError

COUNTS = [50, 30, 5, 40, 20, 2, 10, 6, 1, 8, 5, 1, 12, 9, 2, 10, 7, 1]


@pytest.mark.parametrize("name", loss.criterion_names())
@pytest.mark.parametrize("num_classes", [3, 18])
def test_every_criterion_is_finite_with_gradients(name, num_classes):
    torch.manual_seed(0)
    criterion = loss.create_criterion(name, num_classes=num_classes, class_counts=COUNTS[:num_classes])
    logits = torch.randn(16, num_classes, requires_grad=True)
    target = torch.randint(0, num_classes, (16,))
    value = criterion(logits, target)
    assert value.ndim == 0 and torch.isfinite(value)
    value.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_focal_with_gamma_zero_is_cross_entropy():
    logits, target = torch.randn(32, 18), torch.randint(0, 18, (32,))
    focal = loss.create_criterion("focal", gamma=0.0)
    assert torch.allclose(focal(logits, target), F.cross_entropy(logits, target), atol=1e-6)
    assert loss.create_criterion("focal")(logits, target) < F.cross_entropy(logits, target)


def test_label_smoothing_matches_definition():
    logits, target = torch.randn(32, 18), torch.randint(0, 18, (32,))
    eps = 0.1
    soft = torch.full((32, 18), eps / 18).scatter_(1, target[:, None], 1 - eps + eps / 18)
    expected = -(soft * F.log_softmax(logits, -1)).sum(-1).mean()
    assert torch.allclose(loss.create_criterion("label_smoothing", smoothing=eps)(logits, target), expected, atol=1e-6)


def test_f1_loss_is_near_zero_for_confident_correct_predictions():
    target = torch.arange(18).repeat(2)
    perfect = F.one_hot(target, 18).float() * 50
    criterion = loss.create_criterion("f1", num_classes=18)
    assert criterion(perfect, target) < 1e-3
    assert criterion(torch.zeros(36, 18), target) > 0.9


def test_weighted_cross_entropy_upweights_rare_classes():
    weights = loss.inverse_frequency_weights([90, 10, 0])
    assert weights[1] == pytest.approx(9 * weights[0])
    assert weights[2] == 0  # absent from training: never a target
    criterion = loss.create_criterion("weighted_cross_entropy", class_counts=[90, 10, 0])
    assert torch.allclose(criterion.weight, weights)


def test_unknown_criterion_lists_names():
    with pytest.raises(UserError, match=r"--criterion 'focla' is unknown\. Did you mean 'focal'\?"):
        loss.create_criterion("focla")
