"""Grad-CAM (cam.py): the target layer is found for every model of model.py and for small timm architectures,
the map is for the predicted class, worst_val.png shows each image beside its map, runs.py --cam writes a figure
per class, and a model with no feature map warns once and never ends a run."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import cam
import labels
import model as model_module
import runs
from conftest import run_script, tiny_run_args

SIZE = (64, 48)
NAMES = labels.mask_class_names()


def build(name: str) -> nn.Module:
    if name in model_module.model_classes():
        return model_module.build_model(name, 18, **labels.model_kwargs())
    import timm

    extra = {"img_size": SIZE} if name.startswith("vit") else {}
    return timm.create_model(name, num_classes=18, **extra)


# Every class of model.py (a new one is checked with no edit here), then small timm architectures of each family.
EXPECTED_LAYERS = {"BaseModel": "features", "MultiHeadModel": "backbone.features", "resnet18": "layer4",
                   "efficientnet_b0": "blocks.6", "mobilenetv3_small_050": "blocks.5", "convnext_atto": "stages.3",
                   "vit_tiny_patch16_224": "blocks.11.norm1"}  # fmt: skip
MODELS = sorted(model_module.model_classes()) + [n for n in EXPECTED_LAYERS if n not in model_module.model_classes()]


@pytest.mark.parametrize("name", MODELS)
def test_the_target_layer_is_found_and_the_map_has_the_images_size_and_is_not_constant(name):
    torch.manual_seed(0)
    explainer = cam.Explainer(build(name), SIZE, NAMES)
    if name in EXPECTED_LAYERS:
        assert explainer.layer.name == EXPECTED_LAYERS[name]
    images = torch.randn(4, 3, *SIZE)
    with torch.no_grad():  # the map of the class the model predicts, as the figures draw it
        preds = model_module.to_class_logits(explainer.model(images), explainer.model).argmax(1).tolist()
    maps = explainer.explain(images, preds, preds).maps
    assert maps.shape == (4, *SIZE) and maps.min() >= 0 and maps.max() <= 1
    # The maps vary over the image. An untrained model's map can be all zero where no channel argues for the class
    # (Grad-CAM keeps the positive part), so at least half of them; test_the_map_points_at... checks where.
    assert sum(m.std() > 0.01 for m in maps) >= 2


class TwoColours(nn.Module):
    """Class 0 is the amount of red, class 1 of blue: a red square top left and a blue one bottom right must be
    where the maps of class 0 and class 1 point."""

    def __init__(self, num_classes: int = 2) -> None:
        super().__init__()
        conv = nn.Conv2d(3, 2, 1, bias=False)
        conv.weight.data = torch.tensor([[1.0, 0, 0], [0, 0, 1.0]]).view(2, 3, 1, 1)
        self.features = nn.Sequential(conv, nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(2, num_classes)
        self.head.weight.data, self.head.bias.data = torch.eye(2), torch.zeros(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.features(x)).flatten(1))


def test_the_map_points_at_what_makes_the_predicted_class():
    image = torch.zeros(1, 3, 32, 32)
    image[0, 0, :12, :12] = 1  # red, top left
    image[0, 2, 20:, 20:] = 1  # blue, bottom right
    explainer = cam.Explainer(TwoColours(), (32, 32), ["red", "blue"])
    assert explainer.layer.name == "features"  # the last map before pooling, not the 1x1 pool
    red, blue = explainer.explain(torch.cat([image, image]), [0, 1]).maps
    assert red[:12, :12].mean() > 0.9 and red[20:, 20:].mean() < 0.1
    assert blue[20:, 20:].mean() > 0.9 and blue[:12, :12].mean() < 0.1


def test_a_multi_head_map_is_for_the_task_that_decides_the_class():
    torch.manual_seed(0)
    explainer = cam.Explainer(build("MultiHeadModel"), SIZE, NAMES)
    pred, truth = labels.encode(0, 1, 2), labels.encode(0, 0, 2)  # wrong on gender only
    wrong_age = labels.encode(2, 0, 1)
    _, named = explainer.targets(torch.randn(2, 3, *SIZE), [pred, wrong_age], [truth, labels.encode(2, 0, 0)])
    assert named == ["gender female", "age 30-59"]
    images = torch.randn(1, 3, *SIZE)
    with torch.no_grad():
        outputs = explainer.model(images)[0]
    least = int(np.argmin([outputs[a:b].softmax(0).max() for a, b in ((0, 3), (3, 5), (5, 8))]))
    _, named = explainer.targets(images, [pred], [pred])  # right: its least confident task
    assert named[0].split()[0] == ("mask", "gender", "age")[least]


class NoMap(nn.Module):
    """Pools the image to 8x6 and classifies the pixels: no layer gives a feature map to explain."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d((8, 6))
        self.head = nn.Linear(3 * 8 * 6, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(x).flatten(1))


def test_a_model_with_no_feature_map_has_no_layer():
    with pytest.raises(cam.NoCamLayer, match="no layer of NoMap outputs a spatial feature map"):
        cam.find_layer(NoMap(18), SIZE)


WIDTH_ALONE, WIDTH_WITH_MAPS = 4 * 216, 8 * 216  # utils.image_grid: 4 images a row, or 4 image-map pairs


def test_worst_val_shows_each_image_beside_its_map_and_runs_cam_writes_a_figure_per_class(demo_root, tmp_path):
    done = run_script("train.py", *tiny_run_args(demo_root, "--num_workers", "0"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "Grad-CAM" not in done.stderr
    assert Image.open(tmp_path / "model/exp/worst_val.png").width == WIDTH_WITH_MAPS
    figures = runs.main(runs.get_parser().parse_args(["--cam", str(tmp_path / "model/exp"), "--images", "2"]))
    table = runs.read_predictions(tmp_path / "model/exp")[0]
    expected = sorted(f"class{k:02d}.png" for k in table["truth"].unique())  # every class with validation images
    assert sorted(p.rsplit("/", 1)[1] for p in figures["figure"]) == expected
    shown = Image.open(tmp_path / "model/exp/cam" / expected[0])
    assert shown.width == WIDTH_WITH_MAPS  # at most 2 right + 2 wrong images: one row of four pairs


def test_a_run_of_a_model_with_no_feature_map_finishes_with_one_warning(demo_root, tmp_path):
    (tmp_path / "nomap.py").write_text(
        "from torch import nn\n\n\n"
        "class NoMap(nn.Module):\n"
        "    def __init__(self, num_classes):\n"
        "        super().__init__()\n"
        "        self.pool = nn.AdaptiveAvgPool2d((8, 6))\n"
        "        self.head = nn.Linear(3 * 8 * 6, num_classes)\n\n"
        "    def forward(self, x):\n"
        "        return self.head(self.pool(x).flatten(1))\n"
    )
    args = tiny_run_args(demo_root, "--model", "nomap.py:NoMap", "--epochs", "2", "--num_workers", "0")
    done = run_script("train.py", *args, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    warnings = [line for line in done.stderr.splitlines() if "Grad-CAM" in line]
    assert warnings == [
        "warning: no Grad-CAM maps for this run (no layer of NoMap outputs a spatial feature map (N, C, H, W)); "
        "worst_val.png shows the images alone"
    ]
    assert Image.open(tmp_path / "model/exp/worst_val.png").width == WIDTH_ALONE
    refused = run_script("runs.py", "--cam", "model/exp", cwd=tmp_path)
    assert refused.returncode == 2 and refused.stderr.strip().splitlines() == [
        f"error: --cam model/exp: no Grad-CAM for --model {tmp_path / 'nomap.py'}:NoMap (no layer of NoMap outputs a "
        "spatial feature map (N, C, H, W))"
    ]
