"""Every model in model.py (found automatically) and a timm model: 18 class scores and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import labels
import model
from utils import UserError

TIMM_MODEL = "resnet10t"  # a small timm architecture; built from scratch, nothing is downloaded


@pytest.mark.parametrize("name", [*model.model_classes(), TIMM_MODEL])
def test_model_outputs_and_gradients(name):
    torch.manual_seed(0)
    net = model.build_model(name, num_classes=18, **labels.model_kwargs())  # as train.py builds every model
    x = torch.randn(2, 3, 64, 48)  # portrait, H != W
    out = net(x)
    # Raw outputs may be laid out per task (a multi-head model's are 8 wide); class scores are always 18 wide.
    assert out.ndim == 2 and out.shape[0] == 2
    logits = model.to_class_logits(out, net)
    assert logits.shape == (2, 18)
    F.cross_entropy(logits, torch.tensor([0, 17])).backward()
    grads = [p.grad for p in net.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_unknown_model_lists_valid_names_and_closest():
    with pytest.raises(UserError, match=r"--model 'BaseModle' is unknown\. Did you mean 'BaseModel'\?.*BaseModel"):
        model.build_model("BaseModle", 18)


def test_pretrained_path_loads_backbone_and_replaces_head(tmp_path):
    torch.manual_seed(0)
    source = model.build_model(TIMM_MODEL, num_classes=1000)  # stands in for ImageNet weights
    torch.save(source.state_dict(), tmp_path / "weights.pth")
    net = model.build_model(TIMM_MODEL, num_classes=18, pretrained_path=tmp_path / "weights.pth")
    src, dst = source.state_dict(), net.state_dict()
    assert torch.equal(src["conv1.0.weight"], dst["conv1.0.weight"])
    assert dst["fc.weight"].shape == (18, src["fc.weight"].shape[1])
    assert net(torch.randn(1, 3, 64, 48)).shape == (1, 18)


def test_pretrained_path_accepts_our_checkpoints(tmp_path):
    source = model.BaseModel(num_classes=18)
    torch.save({"model": {f"module.{k}": v for k, v in source.state_dict().items()}}, tmp_path / "best.pth")
    net = model.build_model("BaseModel", num_classes=3, pretrained_path=tmp_path / "best.pth")
    assert torch.equal(net.features[0][0].weight, source.features[0][0].weight)


def test_pretrained_path_errors_are_clear(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        model.build_model("BaseModel", 18, pretrained_path=tmp_path / "missing.pth")
    torch.save(model.BaseModel(18).state_dict(), tmp_path / "other.pth")
    with pytest.raises(UserError, match="does not fit --model"):
        model.build_model(TIMM_MODEL, 18, pretrained_path=tmp_path / "other.pth")
    with pytest.raises(UserError, match="no published weights"):
        model.build_model("BaseModel", 18, pretrained=True)
