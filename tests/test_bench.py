"""The data-path benchmarks run and print their tables (tiny settings; their numbers are never asserted)."""

from __future__ import annotations

import re
import subprocess
import sys

from conftest import ROOT


def bench(script: str, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), *args], capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_bench_data_prints_every_pipeline_and_the_ratios():
    out = bench("bench_data.py", "--n", "14", "--workers", "0", "--batch_size", "7", "--repeat", "1")
    for key in "abcd":
        assert re.search(rf"(?m)^{key} .+ \d+ +\d+ +[\d.]+x  3x128x96 (float32|uint8)$", out), out
    assert re.search(r"b/a = [\d.]+ \(target >= 3\), c/a = [\d.]+ \(target >= 15\)", out), out
    assert "per-image cost of each stage" in out


def test_bench_train_prints_a_ratio_per_model():
    out = bench("bench_train.py", "--n", "14", "--workers", "0", "--batch_size", "7", "--models", "BaseModel",
                "--steps", "2", "--rounds", "1", "--warmup", "0")  # fmt: skip
    assert re.search(r"(?m)^BaseModel +[\d.]+ +[\d.]+ +[\d.]+$", out), out


def test_bench_memory_prints_a_row_per_worker_count():
    out = bench("bench_memory.py", "--n", "14", "--workers", "0", "1", "--batch_size", "7", "--epochs", "1",
                "--seconds", "1")  # fmt: skip
    rows = re.findall(r"(?m)^ +([01]) +([\d.]+) +[+-][\d.]+ ", out)
    assert [r[0] for r in rows] == ["0", "1"] and all(float(r[1]) > 0 for r in rows), out
