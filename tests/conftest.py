"""Shared fixtures: tiny data sets generated in temporary folders (never the user's data, never a download)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import demo  # noqa: E402


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny demo data set in the competition layout: 12 training persons, 2 eval persons (read-only)."""
    return demo.make_demo_data(tmp_path_factory.mktemp("data") / "demo", n_train=12, n_eval=2, seed=1)


def tiny_run_args(demo_root: Path, *extra: str) -> list[str]:
    """train.py flags for a one-epoch run on the tiny demo data at 64x48."""
    return ["--data_dir", str(demo_root / "train/images"), "--epochs", "1", "--resize", "64", "48", *extra]


def run_script(script: str, *args: str, cwd: Path, env: dict[str, str] | None = None, timeout: int = 300):
    """Run one of the project's scripts as a user would, in `cwd`, with a clean SM_* environment."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SM_") and k != "NUM_WORKERS"}
    clean.update(env or {})
    return subprocess.run(
        [sys.executable, str(ROOT / script), *args], cwd=cwd, env=clean, capture_output=True, text=True, timeout=timeout
    )
