"""Distillation: a student learns from an ensemble of trained runs (--teacher), so a submission that an ensemble
scored costs one forward pass.

    python train.py --data_dir D --teacher model/a model/b model/c --kd_alpha 0.7 --kd_temperature 2

The teachers (runs, k-fold runs or best.pth files, any architecture, single- or multi-head) predict the batch
the student trains on, augmented and mixed alike, in eval mode and without gradients. The student's loss is

    alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * criterion(student, labels)

where x_T is the softmax of the class logits over T and teacher_T is the weighted mean of the teachers'.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import devices
import model as model_module
import rundir
from utils import UserError


def resolve_teachers(entries: Sequence[str], class_names: Sequence[str]) -> list[rundir.Member]:
    """The teachers' checkpoints, each trained on the student's classes (else one line naming the first that
    differs)."""
    members = rundir.resolve_members(entries, None, "best", flag="--teacher")
    for m in members:
        why = rundir.class_difference(rundir.class_names_of(m.config), class_names)
        if why:
            raise UserError(
                f"--teacher {m.checkpoint} was trained on other classes than this data's ({why}): distil only from "
                "runs on the same classes"
            )
    return members


class Teachers(nn.Module):
    """The frozen ensemble: each member's model in eval mode, given the student's batch in its own input (its
    normalization and size), and the members' tempered class probabilities averaged by weight."""

    def __init__(self, members: Sequence[rundir.Member], student: dict[str, Any], device: torch.device) -> None:
        super().__init__()
        self.models = nn.ModuleList()
        self.weights, self.inputs = [m.weight for m in members], []
        for m in members:
            net, config = rundir.load_model(m.checkpoint, m.config)
            self.models.append(net.to(device).eval().requires_grad_(False))
            self.inputs.append(_input_change(student, config, device))
        self.train(False)

    def train(self, mode: bool = True) -> Teachers:  # always in eval mode: BatchNorm statistics, no dropout
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor, temperature: float) -> torch.Tensor:
        probs = 0
        for net, weight, change in zip(self.models, self.weights, self.inputs, strict=True):
            logits = model_module.to_class_logits(net(change(images)).float(), net)
            probs = probs + weight * F.softmax(logits / temperature, dim=1)
        return probs

    def from_logits(self, logits: torch.Tensor, temperature: float) -> torch.Tensor:
        """The ensemble's tempered probabilities from the members' cached class logits (N, members, classes)."""
        weights = torch.tensor(self.weights, dtype=logits.dtype, device=logits.device).view(1, -1, 1)
        return (weights * F.softmax(logits / temperature, dim=2)).sum(1)

    def cache_logits(self, subset: Any, loader_of: Any, device: torch.device, batch_transform: Any) -> torch.Tensor:
        """--kd_cache: every member's class logits of every image of `subset` (un-augmented: the eval
        transform), (N, members, classes) on the CPU, predicted once by predict.evaluate (under torchrun split
        between the ranks and gathered). `loader_of(subset)` is its prediction loader."""
        import predict

        loader, parts = loader_of(predict.rank_share(subset, devices.rank(), devices.world_size())), []
        for net, change in zip(self.models, self.inputs, strict=True):

            def view(x: torch.Tensor, change: Any = change) -> torch.Tensor:
                return change(batch_transform(x) if batch_transform is not None else x)

            result = predict.evaluate(net, loader, device, batch_transform=view, progress="teacher logits")
            parts.append(model_module.to_class_logits(result.outputs, net))
        return torch.stack(parts, dim=1)


def _input_change(student: dict[str, Any], teacher: dict[str, Any], device: torch.device) -> Any:
    """The student's normalized batch as the teacher was trained to see it: renormalized and resized if needed."""
    same_norm = list(student["mean"]) == list(teacher["mean"]) and list(student["std"]) == list(teacher["std"])
    size = tuple(teacher["resize"])
    same_size = tuple(student["resize"]) == size
    if same_norm and same_size:
        return lambda x: x

    def view(values: Sequence[float]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float32, device=device).view(1, 3, 1, 1)

    scale = view(student["std"]) / view(teacher["std"])
    shift = (view(student["mean"]) - view(teacher["mean"])) / view(teacher["std"])

    def change(x: torch.Tensor) -> torch.Tensor:
        x = x if same_norm else x * scale.to(x.dtype) + shift.to(x.dtype)
        return x if same_size else F.interpolate(x, size=size, mode="bilinear", align_corners=False)

    return change


def kd_loss(
    student_logits: torch.Tensor, teacher_probs: torch.Tensor, base_loss: torch.Tensor, alpha: float, temperature: float
) -> torch.Tensor:
    """alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * base_loss (Hinton et al. 2015: T^2 keeps the soft
    term's gradients at the scale of the hard one's)."""
    log_student = F.log_softmax(student_logits.float() / temperature, dim=1)
    kl = F.kl_div(log_student, teacher_probs, reduction="batchmean")
    return alpha * temperature**2 * kl + (1 - alpha) * base_loss
