"""The mask/gender/age multi-head model and its loss agree with the 18-class encoding of labels.py."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import labels
import loss
import model
import rundir
from utils import UserError

TIMM_BACKBONE = "mobilenetv3_small_050"  # small and fast; its pooled width (head_hidden_size) != num_features
COUNTS = [50, 30, 5, 40, 20, 2, 10, 6, 1, 8, 5, 1, 12, 9, 2, 10, 7, 1]
COMBINATIONS = list(itertools.product(range(3), range(2), range(3)))  # every (mask, gender, age)


def outputs_for(combinations: list[tuple[int, int, int]], seed: int = 0) -> torch.Tensor:
    """(N, 8) random raw outputs in which each head's largest logit is the given mask, gender and age."""
    torch.manual_seed(seed)
    out = torch.randn(len(combinations), 8)
    for i, (m, g, a) in enumerate(combinations):
        out[i, m] += 10
        out[i, 3 + g] += 10
        out[i, 5 + a] += 10
    return out


TASKS = labels.model_kwargs()["tasks"]  # as train.py and inference.py build multi-head models
SIZES = tuple(TASKS.values())


def multihead(**kwargs) -> model.MultiHeadModel:
    return model.MultiHeadModel(18, **labels.model_kwargs(), **kwargs)


def test_task_layout_matches_the_label_encoding():
    assert SIZES == (3, 2, 3) and math.prod(SIZES) == 18
    net = multihead()
    assert model.task_sizes(net) == SIZES and list(net.heads) == ["mask", "gender", "age"]
    assert [t.tolist() for t in loss.task_targets(torch.arange(18), SIZES)] == [
        list(part) for part in labels.decode(np.arange(18))
    ]


def test_class_logits_decode_every_combination_to_its_class():
    out = outputs_for(COMBINATIONS)
    net = multihead()
    logits = model.to_class_logits(out, net)
    assert logits.shape == (18, 18)
    expected = [labels.encode(m, g, a) for m, g, a in COMBINATIONS]
    assert logits.argmax(1).tolist() == expected and sorted(expected) == list(range(18))
    # The argmax of the joint scores is the combination of the per-task argmaxes, for any outputs.
    mask, gender, age = model.split_tasks(torch.randn(64, 8), net.tasks)
    joint = net.class_logits(torch.cat([mask, gender, age], 1)).argmax(1)
    assert torch.equal(joint, labels.encode(mask.argmax(1), gender.argmax(1), age.argmax(1)))


def test_class_probabilities_are_the_product_of_task_probabilities():
    out = torch.randn(5, 8)
    prob = F.softmax(multihead().class_logits(out), dim=1)
    p_mask, p_gender, p_age = (F.softmax(part, dim=1) for part in model.split_tasks(out, SIZES))
    for m, g, a in COMBINATIONS:
        assert torch.allclose(prob[:, m * 6 + g * 3 + a], p_mask[:, m] * p_gender[:, g] * p_age[:, a], atol=1e-6)
    assert torch.allclose(prob.sum(1), torch.ones(5))


@pytest.mark.parametrize("backbone", ["BaseModel", TIMM_BACKBONE])
def test_multihead_forward_backward(backbone):
    torch.manual_seed(0)
    net = model.build_model("MultiHeadModel", 18, backbone=backbone, **labels.model_kwargs())
    assert model.task_sizes(net) == (3, 2, 3) and model.task_sizes(model.BaseModel(18)) is None
    out = net(torch.randn(2, 3, 64, 48))
    assert out.shape == (2, 8)
    assert model.to_class_logits(out, torch.nn.DataParallel(net)).shape == (2, 18)
    loss.create_criterion("cross_entropy", tasks=model.task_sizes(net))(out, torch.tensor([3, 16])).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
    assert all(head.weight.grad.abs().sum() > 0 for head in net.heads.values())


def test_multihead_errors_are_clear():
    with pytest.raises(UserError, match="only for the 18 mask classes; this data set has 5 classes"):
        model.build_model("MultiHeadModel", 5, **labels.model_kwargs())
    with pytest.raises(UserError, match=r"--backbone 'resnet1' is unknown\. Did you mean"):
        model.build_model("MultiHeadModel", 18, backbone="resnet1", **labels.model_kwargs())
    with pytest.raises(UserError, match=r"--backbone 'BaseModle' is unknown\. Did you mean 'BaseModel'"):
        model.check_backbone_name("BaseModle")
    model.check_backbone_name("BaseModel")
    model.check_backbone_name("resnet10t")
    with pytest.raises(UserError, match="--backbone is for multi-head models"):
        model.build_model("resnet10t", 18, backbone="resnet10t")
    with pytest.raises(UserError, match="--backbone is for multi-head models"):
        model.build_model("BaseModel", 18, backbone="resnet10t")
    with pytest.raises(UserError, match="--backbone BaseModel has no published weights"):
        model.build_model("MultiHeadModel", 18, pretrained=True, **labels.model_kwargs())


def test_pretrained_path_loads_the_backbone_and_leaves_new_heads(tmp_path):
    torch.manual_seed(0)
    import timm

    source = timm.create_model("resnet10t", num_classes=1000)  # stands in for timm's ImageNet weights
    torch.save(source.state_dict(), tmp_path / "timm.pth")
    net = model.build_model(
        "MultiHeadModel", 18, backbone="resnet10t", pretrained_path=tmp_path / "timm.pth", **labels.model_kwargs()
    )
    assert torch.equal(net.backbone.conv1[0].weight, source.conv1[0].weight)
    assert net(torch.randn(1, 3, 64, 48)).shape == (1, 8)

    single = model.BaseModel(num_classes=18)  # one of our single-head checkpoints
    torch.save({"model": single.state_dict()}, tmp_path / "base.pth")
    fresh = model.load_pretrained(multihead(), tmp_path / "base.pth")
    assert sorted(fresh) == sorted(f"heads.{t}.{p}" for t in ("mask", "gender", "age") for p in ("weight", "bias"))

    trained = multihead()  # resuming from a multi-head checkpoint restores everything
    torch.save({"model": {f"module.{k}": v for k, v in trained.state_dict().items()}}, tmp_path / "multi.pth")
    net = model.build_model("MultiHeadModel", 18, pretrained_path=tmp_path / "multi.pth", **labels.model_kwargs())
    assert all(torch.equal(v, trained.state_dict()[k]) for k, v in net.state_dict().items())
    single = model.build_model("BaseModel", 3, pretrained_path=tmp_path / "multi.pth")  # its backbone only
    assert torch.equal(single.features[0][0].weight, trained.backbone.features[0][0].weight)


def test_checkpoints_with_the_heads_mask_gender_age_load_in_inference(tmp_path):
    # The state dict layout every multi-head checkpoint so far has: the head names are part of the file format.
    torch.manual_seed(0)
    width = multihead().heads["mask"].in_features
    state = {k: v for k, v in model.BaseModel(1).state_dict().items() if not k.startswith("classifier")}
    state = {f"backbone.{k}": v for k, v in state.items()}
    for name, size in (("mask", 3), ("gender", 2), ("age", 3)):
        state[f"heads.{name}.weight"], state[f"heads.{name}.bias"] = torch.randn(size, width), torch.randn(size)
    config = {"model": "MultiHeadModel", "num_classes": 18, "backbone": "BaseModel", "augmentation": "BaseAugmentation"}
    torch.save({"model": state, "config": config}, tmp_path / "best.pth")
    net, _ = rundir.load_model(tmp_path / "best.pth")  # strict: every key present, none left over
    assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())
    x = torch.randn(2, 3, 64, 48)
    assert torch.equal(net(x)[:, 3:5], net.heads["gender"](net.backbone(x)))


def test_task_targets_of_soft_targets_are_the_marginals():
    torch.manual_seed(0)
    target = torch.softmax(torch.randn(4, 18), 1)
    mask, gender, age = loss.task_targets(target, (3, 2, 3))
    assert mask.shape == (4, 3) and gender.shape == (4, 2) and age.shape == (4, 3)
    by_hand = torch.zeros(4, 3)  # each marginal is the sum over the other tasks' classes
    for c in range(18):
        by_hand[:, c // 6] += target[:, c]
    assert torch.allclose(mask, by_hand)
    assert torch.allclose(gender[:, 1], target[:, [3, 4, 5, 9, 10, 11, 15, 16, 17]].sum(1))
    assert torch.allclose(age[:, 2], target[:, 2::3].sum(1))
    assert loss.task_class_counts(COUNTS, (3, 2, 3)) == [
        [sum(COUNTS[:6]), sum(COUNTS[6:12]), sum(COUNTS[12:])],
        [sum(COUNTS[c] for c in range(18) if c // 3 % 2 == g) for g in range(2)],
        [sum(COUNTS[a::3]) for a in range(3)],
    ]


def test_multitask_loss_is_the_weighted_sum_of_task_losses():
    torch.manual_seed(0)
    out, target = torch.randn(32, 8), torch.randint(0, 18, (32,))
    weights = (1.0, 0.5, 2.0)
    criterion = loss.create_criterion("focal", tasks=(3, 2, 3), task_weights=weights, gamma=2.0, num_classes=18)
    m, g, a = labels.decode(target)

    def focal(logits: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        p = F.softmax(logits, 1).gather(1, t[:, None])[:, 0]
        return (-((1 - p) ** 2) * p.log()).mean()

    expected = 1.0 * focal(out[:, :3], m) + 0.5 * focal(out[:, 3:5], g) + 2.0 * focal(out[:, 5:], a)
    assert torch.allclose(criterion(out, target), expected, atol=1e-6)
    assert [c.gamma for c in criterion.criteria] == [2.0] * 3


def test_multitask_cross_entropy_is_the_joint_cross_entropy():
    # -log(p_mask p_gender p_age) = sum of the task cross-entropies, so with unit task weights the multi-task
    # loss equals cross-entropy on the 18 class logits, for class indices and for (mixup) probabilities alike.
    torch.manual_seed(0)
    out, target = torch.randn(32, 8), torch.randint(0, 18, (32,))
    criterion = loss.create_criterion("cross_entropy", tasks=(3, 2, 3))
    joint = model.combine_tasks(out, SIZES)
    assert torch.allclose(criterion(out, target), F.cross_entropy(joint, target), atol=1e-5)
    soft = 0.7 * F.one_hot(target, 18).float() + 0.3 * F.one_hot(target.roll(1), 18).float()
    assert torch.allclose(criterion(out, soft), F.cross_entropy(joint, soft), atol=1e-5)


@pytest.mark.parametrize("name", loss.criterion_names())
def test_every_criterion_works_per_task_with_soft_targets(name):
    torch.manual_seed(0)
    out = torch.randn(16, 8, requires_grad=True)
    target = torch.randint(0, 18, (16,))
    criterion = loss.create_criterion(name, tasks=(3, 2, 3), num_classes=18, class_counts=COUNTS)
    assert criterion.soft_targets == loss.accepts_soft_targets(name)
    value = criterion(out, target)
    value.backward()
    assert value.ndim == 0 and torch.isfinite(value) and out.grad.abs().sum() > 0
    if criterion.soft_targets:
        assert torch.allclose(criterion(out, F.one_hot(target, 18).float()), value, atol=1e-6)


def test_multitask_class_weights_come_from_marginal_counts():
    criterion = loss.create_criterion("label_smoothing", tasks=(3, 2, 3), class_counts=COUNTS, class_weights=True)
    for c, counts in zip(criterion.criteria, loss.task_class_counts(COUNTS, (3, 2, 3)), strict=True):
        assert torch.allclose(c.weight, loss.inverse_frequency_weights(counts))
    weighted = loss.create_criterion("weighted_cross_entropy", tasks=(3, 2, 3), class_counts=COUNTS)
    assert torch.allclose(weighted.criteria[0].weight, criterion.criteria[0].weight)


def test_multitask_arguments_are_checked():
    with pytest.raises(UserError, match="--task_weights needs 3 numbers"):
        loss.create_criterion("cross_entropy", tasks=(3, 2, 3), task_weights=(1, 1))
    with pytest.raises(UserError, match="must be >= 0 and not all 0"):
        loss.create_criterion("cross_entropy", tasks=(3, 2, 3), task_weights=(1, -1, 1))
    with pytest.raises(UserError, match="--task_weights is for multi-head models"):
        loss.create_criterion("cross_entropy", task_weights=(1, 1, 1))
    with pytest.raises(ValueError, match="cannot be split into tasks"):
        loss.create_criterion("cross_entropy", tasks=(3, 2, 3), weight=torch.ones(18))
    with pytest.raises(ValueError, match="not the product of the task sizes"):
        loss.create_criterion("cross_entropy", tasks=(3, 2, 3), num_classes=5)
