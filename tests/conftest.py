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

os.environ["WANDB_MODE"] = "offline"  # --wandb in any test (the README's examples too) writes local files only

SLOWEST = ("test_quick_start_run_command_trains_and_writes_a_submission",)  # minutes: the README's full demo run


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The slowest tests first, so that parallel workers (pytest-xdist) share the rest while they run."""
    items.sort(key=lambda item: item.name not in SLOWEST)


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny demo data set in the competition layout: 12 training persons, 2 eval persons (read-only)."""
    return demo.make_demo_data(tmp_path_factory.mktemp("data") / "demo", n_train=12, n_eval=2, seed=1)


def write_folder_dataset(root: Path, n_per_class: int = 12) -> Path:
    """Two classes told apart by color, a folder each; file names carry a group ('g03cat_1.png': group g03cat)."""
    from PIL import Image

    for label, color in (("cat", (220, 40, 40)), ("dog", (40, 40, 220))):
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            Image.new("RGB", (40, 30), color).save(root / label / f"g{i // 2:02d}{label}_{i % 2}.png")
    return root


def write_label_csv(folder: Path, path: Path) -> Path:
    """A CSV (file, species, scene) over the images of `write_folder_dataset(folder)`, paths relative to it."""
    import pandas as pd

    rows = [(str(p.relative_to(path.parent)), p.parent.name, p.name[:6]) for p in sorted(folder.glob("*/*.png"))]
    pd.DataFrame(rows, columns=["file", "species", "scene"]).to_csv(path, index=False)
    return path


def tiny_run_args(demo_root: Path, *extra: str) -> list[str]:
    """train.py flags for a one-epoch run on the tiny demo data at 64x48, on the small from-scratch BaseModel
    backbone unless `extra` names a model (a checkpoint of kilobytes, not Lite0's 50 MB: the tests of the run
    machinery measure files, disks and epochs; tests/test_weights.py and the Quick start test run the default)."""
    own = {"--model", "--backbone", "--config", "--resume"} & set(extra)
    small = [] if own else ["--backbone", "BaseModel"]
    return ["--data_dir", str(demo_root / "train/images"), "--epochs", "1", "--resize", "64", "48", *small, *extra]


def run_script(
    script: str, *args: str, cwd: Path, env: dict[str, str] | None = None, timeout: int = 300, isolated: bool = False
):
    """Run one of the project's scripts as a user would, in `cwd`, with a clean SM_* environment: its command
    line, exit code, stdout and stderr. In this process by default (a new Python pays about 7 s of imports
    before the first line of a script; the suite starts some 200); `isolated` starts a real process, for the
    tests where the process itself is the subject (signals, the README's own commands)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SM_") and k != "NUM_WORKERS"}
    clean.update(env or {})
    if isolated:
        return subprocess.run(
            [sys.executable, str(ROOT / script), *args], cwd=cwd, env=clean, capture_output=True, text=True,
            timeout=timeout,
        )  # fmt: skip
    return run_in_process(ROOT / script, list(args), cwd, clean)


def one_error_line(result) -> str:
    """The one error line of a script that stopped on a user mistake (exit code 2, no traceback)."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def run_in_process(script: Path, argv: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """`python script argv...` executed here as `__main__` (runpy), with its own working directory, environment,
    sys.argv and warnings shown once as a new interpreter shows them; the process state is restored after."""
    import contextlib
    import io
    import runpy
    import traceback
    import warnings

    out, err = io.StringIO(), io.StringIO()

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        err.write(warnings.formatwarning(message, category, filename, lineno, line))

    saved_env, saved_cwd, saved_argv = dict(os.environ), os.getcwd(), sys.argv
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    sys.argv = [str(script), *argv]
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
            warnings.simplefilter("default")
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.showwarning = show
            try:
                runpy.run_path(str(script), run_name="__main__")
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
                if isinstance(e.code, str):
                    err.write(e.code + "\n")
            except KeyboardInterrupt:
                raise
            except BaseException:  # what an uncaught exception does to a real process: traceback, exit 1
                traceback.print_exc(file=err)
                code = 1
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        os.chdir(saved_cwd)
        sys.argv = saved_argv
    return subprocess.CompletedProcess([sys.executable, str(script), *argv], code, out.getvalue(), err.getvalue())
