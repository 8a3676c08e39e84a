"""Every criterion is finite with gradients for 18 classes, and agrees with its definition."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import loss
from utils import UserError

COUNTS = [50, 30, 5, 40, 20, 2, 10, 6, 1, 8, 5, 1, 12, 9, 2, 10, 7, 1]
WEIGHTED = ["cross_entropy", "focal", "label_smoothing"]  # the criteria that take a per-class `weight`


def mix(a: torch.Tensor, b: torch.Tensor, lam: float, num_classes: int) -> torch.Tensor:
    """Soft targets lam * one_hot(a) + (1 - lam) * one_hot(b), as mixup makes them."""
    return lam * F.one_hot(a, num_classes).float() + (1 - lam) * F.one_hot(b, num_classes).float()


@pytest.mark.parametrize("name", loss.criterion_names())
@pytest.mark.parametrize("num_classes", [3, 18])
@pytest.mark.parametrize("soft", [False, True])
def test_every_criterion_is_finite_with_gradients(name, num_classes, soft):
    if soft and not loss.accepts_soft_targets(name):
        pytest.skip(f"{name} takes class indices only")
    torch.manual_seed(0)
    criterion = loss.create_criterion(name, num_classes=num_classes, class_counts=COUNTS[:num_classes])
    logits = torch.randn(16, num_classes, requires_grad=True)
    target = torch.randint(0, num_classes, (16,))
    if soft:  # mixup-style targets: two classes per sample
        target = mix(target, target.roll(1), 0.6, num_classes)
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


def test_soft_targets_and_class_weights_are_declared():
    assert all(loss.accepts_soft_targets(name) for name in loss.criterion_names())
    assert [name for name in loss.criterion_names() if loss.accepts_class_weights(name)] == WEIGHTED
    with pytest.raises(UserError, match="--criterion 'focla' is unknown"):
        loss.accepts_soft_targets("focla")


def test_a_criterion_without_the_flag_does_not_take_soft_targets(monkeypatch):
    class HardOnly(torch.nn.Module):
        """A user's loss written for class indices."""

    monkeypatch.setitem(loss._criterion_entrypoints, "hard_only", HardOnly)
    assert not loss.accepts_soft_targets("hard_only")


@pytest.mark.parametrize("name", loss.criterion_names())
@pytest.mark.parametrize("weighted", [False, True])
def test_one_hot_soft_targets_give_the_hard_target_loss(name, weighted):
    if not loss.accepts_soft_targets(name) or (weighted and not loss.accepts_class_weights(name)):
        pytest.skip(f"{name} does not take this")
    torch.manual_seed(0)
    logits, target = torch.randn(32, 18), torch.randint(0, 18, (32,))
    criterion = loss.create_criterion(name, num_classes=18, class_counts=COUNTS, class_weights=weighted)
    hard, soft = criterion(logits, target), criterion(logits, F.one_hot(target, 18).float())
    assert torch.allclose(soft, hard, atol=1e-6), (soft, hard)


@pytest.mark.parametrize("name", WEIGHTED)  # losses linear in the target when unweighted (F1 is not)
def test_mixup_targets_give_the_mixed_loss(name):
    torch.manual_seed(0)
    logits = torch.randn(32, 18)
    a, b = torch.randint(0, 18, (32,)), torch.randint(0, 18, (32,))
    criterion = loss.create_criterion(name, num_classes=18)
    expected = 0.7 * criterion(logits, a) + 0.3 * criterion(logits, b)
    assert torch.allclose(criterion(logits, mix(a, b, 0.7, 18)), expected, atol=1e-6)
    if name == "cross_entropy":
        by_hand = -(mix(a, b, 0.7, 18) * F.log_softmax(logits, -1)).sum(-1).mean()
        assert torch.allclose(criterion(logits, mix(a, b, 0.7, 18)), by_hand, atol=1e-6)


def test_weighted_soft_cross_entropy_matches_definition():
    torch.manual_seed(0)
    logits, target = torch.randn(32, 18), torch.softmax(torch.randn(32, 18), -1)
    w = loss.inverse_frequency_weights(COUNTS)
    expected = -(w * target * F.log_softmax(logits, -1)).sum() / (w * target).sum()
    criterion = loss.create_criterion("cross_entropy", weight=w)
    assert torch.allclose(criterion(logits, target), expected, atol=1e-6)
    per_sample = loss.CrossEntropyLoss(weight=w, reduction="none")
    one_hot = F.one_hot(target.argmax(1), 18).float()
    assert torch.allclose(per_sample(logits, one_hot), per_sample(logits, target.argmax(1)), atol=1e-6)
    with pytest.raises(AssertionError, match="soft targets must be"):
        criterion(logits, target[:, :3])


def test_weight_kwarg_weights_each_class():
    torch.manual_seed(0)
    logits, target = torch.randn(64, 18), torch.randint(0, 18, (64,))
    w = loss.inverse_frequency_weights(COUNTS)
    weighted_ce = F.cross_entropy(logits, target, weight=w)
    assert not torch.allclose(weighted_ce, F.cross_entropy(logits, target))
    for name, kwargs, expected in [
        ("cross_entropy", {}, weighted_ce),
        ("focal", {"gamma": 0.0}, weighted_ce),
        ("label_smoothing", {"smoothing": 0.1}, F.cross_entropy(logits, target, weight=w, label_smoothing=0.1)),
    ]:
        criterion = loss.create_criterion(name, weight=w, **kwargs)
        assert torch.allclose(criterion(logits, target), expected, atol=1e-6), name
        from_counts = loss.create_criterion(name, class_counts=COUNTS, class_weights=True, **kwargs)
        assert torch.allclose(from_counts.weight, w), name
    focal = loss.create_criterion("focal", weight=w)(logits, target)
    assert not torch.allclose(focal, loss.create_criterion("focal")(logits, target))


def test_class_weights_need_a_criterion_that_takes_them():
    with pytest.raises(UserError, match="--class_weights: --criterion f1 takes no per-class weights.*focal"):
        loss.create_criterion("f1", num_classes=18, class_counts=COUNTS, class_weights=True)
