"""Configuration precedence and start-up checks: flag > environment > .env > default; bad input exits 2."""

from __future__ import annotations

import pytest

import inference
import rundir
import train
from conftest import run_script
from utils import UserError


@pytest.fixture()
def no_env(monkeypatch, tmp_path):
    for var in ("SM_CHANNEL_TRAIN", "SM_MODEL_DIR", "SM_CHANNEL_EVAL", "SM_CHANNEL_MODEL", "SM_OUTPUT_DATA_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize(
    ("module", "var", "dest", "default"),
    [
        (train, "SM_MODEL_DIR", "model_dir", "./model"),
        (train, "SM_CHANNEL_TRAIN", "data_dir", None),
        (inference, "SM_CHANNEL_EVAL", "data_dir", None),
        (inference, "SM_CHANNEL_MODEL", "model_dir", None),
        (inference, "SM_OUTPUT_DATA_DIR", "output_dir", "./output"),
    ],
)
def test_flag_beats_env_beats_dotenv_beats_default(no_env, monkeypatch, module, var, dest, default):
    flag = f"--{dest}"
    assert getattr(module.get_parser().parse_args([]), dest) == default
    (no_env / ".env").write_text(f"{var}=from_dotenv\n")
    assert getattr(module.get_parser().parse_args([]), dest) == "from_dotenv"
    monkeypatch.setenv(var, "from_env")
    assert getattr(module.get_parser().parse_args([]), dest) == "from_env"
    given = getattr(module.get_parser().parse_args([flag, "from_flag"]), dest)
    assert given == (["from_flag"] if dest == "model_dir" and module is inference else "from_flag")  # nargs="+"


def test_resize_is_height_then_width(demo_root, tmp_path):
    """--resize H W gives (H, W) tensors in training and the same size in inference, from the run's config."""
    import augmentation
    import dataset
    import evaldata
    import subset as subset_module

    args = train.get_parser().parse_args(["--resize", "40", "24"])
    assert args.resize == [40, 24]
    data = dataset.MaskSplitByProfileDataset(demo_root / "train/images")
    aug = augmentation.FaceAugmentation(args.resize, dataset.SEED_MEAN, dataset.SEED_STD)
    image = subset_module.ImageSubset(data, [0], aug.train_transform, aug.load_size)[0][0]
    assert image.shape == (3, 40, 24)  # portrait photos stay portrait: height first
    config = {"augmentation": "FaceAugmentation", "resize": [40, 24], "mean": [0.5] * 3, "std": [0.2] * 3}
    eval_aug = rundir.build_augmentation(config)
    transform, batch = augmentation.split_for_device(eval_aug.eval_transform)
    x = evaldata.TestDataset(demo_root / "eval", transform, eval_aug.load_size)[0][0]
    assert (batch(x[None]) if batch is not None else x[None]).shape == (1, 3, 40, 24)


@pytest.mark.parametrize(
    ("flag", "value", "listed"),
    [
        ("--model", "BaseModle", "BaseModel"),
        ("--criterion", "focla", "label_smoothing"),
        ("--dataset", "MaskSplitByPersonDataset", "MaskSplitByProfileDataset"),
    ],
)
def test_unknown_name_exits_2_listing_valid_names(tmp_path, demo_root, flag, value, listed):
    result = run_script("train.py", "--data_dir", str(demo_root / "train/images"), flag, value, cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {flag} '{value}' is unknown")
    assert listed in lines[0] and "Traceback" not in result.stderr
    assert not (tmp_path / "model").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--val_ratio", "1.5"], "--val_ratio 1.5"),
        (["--batch_size", "0"], "--batch_size 0"),
        (["--resize", "0", "96"], "--resize 0 96"),
        (["--augmentation", "Nope"], "--augmentation 'Nope'"),
        (["--optimizer", "adam"], "Did you mean 'Adam'"),
        (["--data_dir", "/no/such/dir"], "--data_dir /no/such/dir does not exist"),
    ],
)
def test_bad_values_are_rejected_before_anything_is_written(no_env, args, message):
    parsed = train.get_parser().parse_args([*args, "--model_dir", str(no_env / "model")])
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        train.main(parsed)
    assert not (no_env / "model").exists() and not (no_env / "data").exists()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_asking_for_a_missing_gpu_is_a_clear_error(no_env):
    parsed = train.get_parser().parse_args(["--device", "cuda", "--model_dir", str(no_env / "model")])
    with pytest.raises(UserError, match="--device cuda: no CUDA GPU is visible here"):
        train.main(parsed)
    assert not (no_env / "data").exists()  # rejected before the demo data would be generated


def test_argparse_rejects_malformed_flags(tmp_path):
    result = run_script("train.py", "--resize", "128", cwd=tmp_path)
    assert result.returncode == 2 and "--resize" in result.stderr


def test_inference_without_a_run_is_a_clear_error(tmp_path):
    result = run_script("inference.py", cwd=tmp_path)
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        == "error: no trained run found under model: run python train.py first, or pass --model_dir"
    )
    result = run_script("inference.py", "--model_dir", str(tmp_path), cwd=tmp_path)
    assert result.returncode == 2 and "has no config.json" in result.stderr
