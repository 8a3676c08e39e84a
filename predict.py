"""The one prediction loop and its precision: `evaluate` predicts a loader's batches in order, each TTA view in
its own pass, under torchrun gathering every rank's share back in order. Validation (engine.py) and inference
(ensemble members, TTA views) both call it, so a model is scored exactly as it is submitted.

    python train.py --amp bf16                    # mixed precision (autocast) in training and validation
    python inference.py --tta flip --save_probs   # each view one pass; probabilities averaged
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

import augmentation
import devices
import model as model_module
import utils
from utils import UserError

AMP_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


# ---------------------------------------------------------------------------------------------------
# Mixed precision
def check_amp(amp: str, device: torch.device) -> None:
    """Refuse a precision the device cannot run, with the alternative."""
    if amp == "fp16" and device.type != "cuda":
        raise UserError(f"--amp fp16 needs a CUDA GPU (device is {device}); on a CPU use --amp bf16 or --amp off")
    if amp == "bf16" and device.type == "cuda" and not bf16_native(device):
        name = torch.cuda.get_device_name(device)
        raise UserError(f"--amp bf16: {name} ({device}) has no native bfloat16 (it would be emulated, slowly); use "
                        "--amp fp16")  # fmt: skip
    if amp not in ("off", *AMP_DTYPES):
        raise UserError(f"--amp {amp} is unknown: choose off, fp16 or bf16")


def bf16_native(device: torch.device) -> bool:
    """bfloat16 in hardware on this GPU (Ampere and later): torch's default check also counts emulation, which
    lets T4 and V100 through to run slowly or fail."""
    with torch.cuda.device(device):
        return torch.cuda.is_bf16_supported(including_emulation=False)


def autocast(amp: str, device: torch.device) -> contextlib.AbstractContextManager:
    """torch.autocast for `amp` (fp16/bf16) on `device`, or a no-op for off."""
    if amp == "off":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AMP_DTYPES[amp])


class AutocastReplica(nn.Module):
    """The model under autocast from inside its own forward, for DataParallel: each replica runs in a thread of
    its own, where DataParallel re-enters autocast without the dtype (torch 2.14), and a new thread's autocast
    dtype is fp16. A bf16 run would train in fp16 without loss scaling; here every replica keeps `amp`."""

    wraps_module = True

    def __init__(self, module: nn.Module, amp: str, device: torch.device) -> None:
        super().__init__()
        self.module, self.amp, self.device_type = module, amp, device.type

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with autocast(self.amp, torch.device(self.device_type)):
            return self.module(*args, **kwargs)


def make_scaler(amp: str, device: torch.device) -> torch.amp.GradScaler:
    """A GradScaler, active only for fp16 (bf16 has fp32's range and needs no loss scaling)."""
    return torch.amp.GradScaler(device.type, enabled=amp == "fp16")


# ---------------------------------------------------------------------------------------------------
# The one prediction loop.
@dataclass
class Evaluation:
    """What `evaluate` returns: raw outputs of the untouched view, class probabilities averaged over the views,
    and, with targets, loss (with a criterion), accuracy and macro F1."""

    outputs: torch.Tensor
    probs: torch.Tensor
    metrics: dict[str, float] = field(default_factory=dict)


def gather_in_order(part: torch.Tensor) -> torch.Tensor:
    """Every rank's share of a strided split (rank r holds items r, r + world, ...) back in item order."""
    parts = devices.gather_objects(part)
    if len(parts) == 1:
        return part
    shape = next((p for p in parts if len(p)), part)  # a rank with nothing to predict sends an empty (0, 0) part
    out = torch.empty(sum(len(p) for p in parts), *shape.shape[1:], dtype=shape.dtype)
    for r, p in enumerate(parts):
        if len(p):
            out[r :: len(parts)] = p
    return out


def rank_share(subset: torch.utils.data.Dataset, rank: int, world: int) -> torch.utils.data.Dataset:
    """This rank's items of `subset` for `evaluate`: every world-th one, so the gather restores the order."""
    return subset if world == 1 else torch.utils.data.Subset(subset, range(rank, len(subset), world))


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    loader: Any,
    device: torch.device,
    *,
    views: Sequence[str] = ("identity",),
    batch_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    amp: str = "off",
    channels_last: bool = False,
    criterion: nn.Module | None = None,
    targets: Sequence[int] | None = None,
    num_classes: int | None = None,
    progress: str | None = None,
) -> Evaluation:
    """Predict every batch `(images, _)` of `loader` in order, each TTA view (augmentation.VIEWS, taken after
    `batch_transform`, the normalization the loader left to the device) in its own forward pass. Under torchrun
    the loader holds this rank's `rank_share` and the result is every rank's, gathered in order."""
    model.eval()
    outputs, probs = [], []
    for images, _ in tqdm(loader, desc=progress, leave=False, disable=progress is None or not sys.stderr.isatty()):
        images = images.to(device, non_blocking=True)
        if batch_transform is not None:
            images = batch_transform(images)
        total = torch.zeros((), device=device)
        for k, name in enumerate(views):
            view = augmentation.VIEWS[name](images)
            if channels_last:
                view = view.contiguous(memory_format=torch.channels_last)
            with autocast(amp, device):
                out = model(view).float()
            if k == 0:
                outputs.append(out)
            total = total + torch.softmax(model_module.to_class_logits(out, model), dim=1)
        probs.append(total / len(views))  # kept on the device: one copy to the host at the end, not one a batch
    if not outputs:  # this rank's share is empty: more ranks than images
        outputs, probs = [torch.empty(0, 0)], [torch.empty(0, 0)]
    outputs, probs = torch.cat(outputs).cpu(), torch.cat(probs).cpu()
    result = Evaluation(gather_in_order(outputs), gather_in_order(probs))
    if targets is not None:
        truth = torch.as_tensor(np.asarray(targets), dtype=torch.int64)
        preds = result.probs.argmax(1).numpy()
        result.metrics = {
            "acc": float((preds == truth.numpy()).mean()),
            "f1": utils.macro_f1(truth.numpy(), preds, num_classes),
        }
        if criterion is not None:
            result.metrics["loss"] = criterion(result.outputs.to(device), truth.to(device)).item()
    return result
