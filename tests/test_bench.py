"""The data-path benchmarks run and print their tables (tiny settings; their numbers are never asserted)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT


def bench(script: str, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), *args], capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_bench_data_prints_every_pipeline_and_the_ratios():
    out = bench("bench_data.py", "--n", "14", "--workers", "1", "--batch_size", "7", "--repeat", "1", "--noise", "6")
    assert "noise 6.0" in out
    for key, dtype in {"a": "float32", "b": "uint8", "b'": "uint8", "c": "uint8"}.items():
        assert re.search(rf"(?m)^{key} +.+ \d+ +\d+ +[\d.]+x  3x128x96 {dtype}$", out), out
    assert re.search(r"b/a = [\d.]+ \(target >= 3\), c/a = [\d.]+ \(target >= 15\)", out), out
    assert "per-image cost of each stage" in out


@pytest.mark.parametrize("preset", ["BaseAugmentation", "FaceAugmentation"])
def test_bench_train_prints_a_ratio_per_model(preset):
    out = bench("bench_train.py", "--n", "14", "--workers", "1", "--batch_size", "7", "--models", "BaseModel",
                "--steps", "2", "--rounds", "1", "--warmup", "0", "--augmentation", preset)  # fmt: skip
    assert re.search(r"(?m)^BaseModel +[\d.]+ +[\d.]+ +[\d.]+$", out), out
    workers = 0 if preset == "BaseAugmentation" else 1  # batches copied out of the cache need no worker
    assert f"{preset} | batch 7 | {workers} loader workers" in out, out


def test_bench_memory_prints_a_row_per_worker_count():
    out = bench("bench_memory.py", "--n", "14", "--workers", "0", "1", "--batch_size", "7", "--epochs", "1",
                "--seconds", "1")  # fmt: skip
    rows = re.findall(r"(?m)^ +([01]) +([\d.]+) +[+-][\d.]+ ", out)
    assert [r[0] for r in rows] == ["0", "1"] and all(float(r[1]) > 0 for r in rows), out


def test_bench_memory_counts_one_decode_and_one_cache_copy_for_two_ranks():
    out = bench("bench_memory.py", "--n", "14", "--workers", "0", "--ranks", "2", "--each_rank_decodes", "--batch_size",
                "7", "--epochs", "1", "--seconds", "1")  # fmt: skip
    rows = re.findall(r"(?m)^ +0 .* (\d+) +(\d+) +([\d.]+)(  each rank decodes)?$", out)
    assert [(r[0], r[1], r[3]) for r in rows] == [("2", "14", ""), ("2", "28", "  each rank decodes")], out
    assert abs(float(rows[0][2]) - 1) < 0.05 and abs(float(rows[1][2]) - 2) < 0.05, out


def test_bench_distill_prints_the_three_ways(demo_root, tmp_path):
    from conftest import run_script, tiny_run_args

    done = run_script("train.py", *tiny_run_args(demo_root, "--num_workers", "0", "--name", "teacher"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    data, teacher = str(demo_root / "train/images"), str(tmp_path / "model/teacher")
    out = bench("bench_distill.py", "--data_dir", data, "--teacher", teacher, "--epochs", "1", "--",
                "--resize", "64", "48", "--num_workers", "0")  # fmt: skip
    assert re.search(r"(?m)^plain +[\d.]+ +1\.00 *$", out), out
    assert re.search(r"(?m)^--teacher +[\d.]+ +[\d.]+ *$", out), out
    assert re.search(r"(?m)^--teacher --kd_cache +[\d.]+ +[\d.]+  [\d.]+ s \(teachers' logits\)$", out), out


def test_bench_loggers_prints_the_four_ways(demo_root):
    out = bench("bench_loggers.py", "--data_dir", str(demo_root / "train/images"), "--epochs", "1", "--",
                "--resize", "64", "48", "--num_workers", "0")  # fmt: skip
    for way in ("TensorBoard", r"\+ --wandb \(offline\)", r"\+ --mlflow \(SQLite\)", r"\+ both"):
        assert re.search(rf"(?m)^{way} +[\d.]+ +[\d.]+ +[\d.]+ +-?[\d.]+$", out), out


def test_bench_sweep_prints_the_trials_and_the_summary(demo_root):
    out = bench("bench_sweep.py", "--data", str(demo_root), "--trials", "2", "--space", "lr=log:1e-3:1e-2", "--",
                "--epochs", "1", "--resize", "64", "48", "--num_workers", "0")  # fmt: skip
    assert re.search(r"(?m)^wall [\d.]+ min \| epochs trained 2 of 2 unpruned \(100%\) \| 0 of 2 pruned \| best trial "
                     r"\d \(--lr [\d.e-]+\): val [\d.]+, eval macro F1 [\d.]+$", out), out  # fmt: skip
    assert re.search(r"(?m)^per-trial overhead after the first trial: median [\d.]+s, max [\d.]+s", out), out


def test_bench_eval_prints_both_ways_of_validation_and_inference(demo_root):
    out = bench("bench_eval.py", "--data_dir", str(demo_root / "train/images"), "--eval_dir", str(demo_root / "eval"),
                "--workers", "1", "--repeat", "1")  # fmt: skip
    for what in ("data only", "with the model"):
        for way in ("per image", "made once"):
            assert re.search(rf"(?m)^  {what} +{way} +\d+ images/s  \([\d.]+x\)$", out), out
    for way in (r"before \(per member, per image\)", "decoded and made once"):
        assert re.search(rf"(?m)^  {way} +\d+ images/s  \([\d.]+x\)$", out), out


def test_gpu_check_runs_every_path_the_cpu_can_and_says_which_it_skipped():
    out = bench("gpu_check.py", "--device", "cpu", "--n", "28", "--batch_size", "7", "--steps", "3", "--warmup", "1",
                "--resize", "64", "48", "--backbone", "BaseModel", "--persons", "4")  # fmt: skip
    ok = r" +[\d.]+ +[\d.]+ +[\d.]+ +nan  ok$"
    for path in ("fp32", "bf16", "bf16 \\+ channels_last", "bf16 \\+ channels_last \\+ compile",
                 "bf16 \\+ channels_last \\+ gpu_aug"):  # fmt: skip
        assert re.search(rf"(?m)^{path}{ok}", out), (path, out)
    assert re.search(r"(?m)^fp16 \+ GradScaler +skipped: --amp fp16 needs a CUDA GPU", out), out
    assert re.search(r"(?m)^DataParallel, bf16 \+ gpu_aug +skipped: needs 2 or more GPUs$", out), out
    runs = re.findall(r"(?m)^(train\.py, the GPU recipe's flags|train\.py, defaults|torchrun DDP \(gloo\) x 1) +"
                      r"[\d.]+ +[\d.]+ +off +(True|False)  ok$", out)  # fmt: skip
    # The mask data's defaults augment batch-wise on the device (FaceAugmentation), the GPU recipe names --gpu_aug.
    assert sorted(runs) == [("torchrun DDP (gloo) x 1", "True"), ("train.py, defaults", "True"),
                            ("train.py, the GPU recipe's flags", "True")], out  # fmt: skip


def test_gpu_check_without_a_gpu_ends_with_one_line():
    done = subprocess.run([sys.executable, str(ROOT / "bench/gpu_check.py"), "--device", "cuda"], capture_output=True,
                          text=True, timeout=120, cwd=ROOT)  # fmt: skip
    assert done.returncode == 2 and done.stderr.startswith("error: ") and done.stderr.count("\n") == 1, done.stderr


def test_the_recipe_backbones_build_under_the_multi_head_model_and_plain_is_base_model():
    """bench/recipe_backbones.py (issue 23's width, depth and dropout experiments) as `--backbone FILE:CLASS`."""
    import torch

    import labels
    import model

    spec = str(ROOT / "bench/recipe_backbones.py")
    base = model.BaseModel(num_classes=1).features.state_dict()
    plain = model.class_from_file(f"{spec}:Plain")().features.state_dict()
    assert [(k, v.shape) for k, v in plain.items()] == [(k, v.shape) for k, v in base.items()]
    widths = {}
    for name in ("Plain", "Wide", "Narrow", "Deep", "Dropout5"):
        net = model.build_model("MultiHeadModel", 18, backbone=f"{spec}:{name}", **labels.model_kwargs()).eval()
        assert net(torch.zeros(2, 3, 96, 72)).shape == (2, 8), name  # mask 3 | gender 2 | age 3
        widths[name] = net.backbone.num_features
    assert widths == {"Plain": 768, "Wide": 1024, "Narrow": 512, "Deep": 768, "Dropout5": 768}
    assert model.class_from_file(f"{spec}:Dropout5")().drop.p == 0.5


TIMM_TRAIN = Path("/tmp/timm_peer/train.py")  # timm's train.py, fetched from its repository (not in the wheel)


def test_bench_pretrained_prints_every_row_with_a_rate():
    peer = ["--timm_train", str(TIMM_TRAIN)] if TIMM_TRAIN.is_file() else []
    out = bench("bench_pretrained.py", "--n", "14", "--batch_size", "7", "--workers", "1", "--steps", "2",
                "--rounds", "1", "--warmup", "1", "--resize", "32", "24", "--resize2", "40", "32", "--no-compile",
                "--threads", "1", *peer)  # fmt: skip
    rows = ("model only, --resize 32 24", "model only, --channels_last", "model only, --freeze_stages 2",
            "model only, --freeze_stages 3", "model only, --resize 40 32",
            r"loader-fed, train\.py's feed \(--gpu_aug\)", "model only, --channels_last --freeze_stages 3",
            "loader-fed, --channels_last --freeze_stages 3")  # fmt: skip
    for row in rows:
        found = re.search(rf"(?m)^{row} +([\d.]+) +([\d.]+)$", out)
        assert found and float(found[1]) > 0 and float(found[2]) > 0, (row, out)
    assert re.search(r"(?m)^model only, --compile +skipped: --no-compile$", out), out
    timm = re.search(r"(?m)^timm train\.py, --workers 1 +(?:([\d.]+) +[\d.]+  \(\d+s wall, .+\)|(skipped: .+))$", out)
    assert timm and (float(timm[1]) > 0 if peer else timm[2] is not None), out
    assert re.search(r"(?m)^loader-fed / model only: [\d.]+; with train\.py's defaults \(--channels_last "
                     r"--freeze_stages 3\): [\d.]+ \(target >= 0\.95\)", out), out  # fmt: skip
