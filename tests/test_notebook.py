"""eda.ipynb runs top to bottom on tiny demo data, draws every plot, and is committed without outputs."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import nbclient
import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "eda.ipynb"


def test_committed_notebook_has_no_outputs() -> None:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    dirty = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and (c.outputs or c.execution_count)]
    assert not dirty, f"cells {dirty} of {NOTEBOOK.name} keep outputs or execution counts: clear them before committing"


def test_notebook_runs_on_demo_data(demo_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The kernel inherits os.environ: point it at the tiny data and at the repo (it starts in tmp_path, not the repo).
    monkeypatch.setenv("SM_CHANNEL_TRAIN", str(demo_root / "train/images"))
    monkeypatch.setenv("EDA_REPO", str(ROOT))
    # A kernel spec of our own, first on the search path, so the kernel is this interpreter (the venv's), not
    # whatever `python3` kernel a user-level Jupyter install registers.
    kernel_dir = tmp_path / "jupyter/kernels/python3"
    kernel_dir.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (kernel_dir / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": "test", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))

    nb = nbformat.read(NOTEBOOK, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell("import sys; print('kernel:', sys.executable)"))
    client = nbclient.NotebookClient(
        nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError, with the cell and its traceback, when a cell fails

    code_cells = [c for c in nb.cells if c.cell_type == "code"]
    errors = [o for c in code_cells for o in c.outputs if o.output_type == "error"]
    assert not errors, errors
    stdout = "".join(o.text for c in code_cells for o in c.outputs if o.output_type == "stream" and o.name == "stdout")
    assert f"kernel: {sys.executable}" in stdout, "the kernel did not run this interpreter"

    plotting = [c for c in code_cells if "plt.show()" in c.source]
    assert len(plotting) >= 6, "the notebook lost some of its plots"
    blank = [c.source.splitlines()[0] for c in plotting if not any("image/png" in o.get("data", {}) for o in c.outputs)]
    assert not blank, f"plotting cells without an image: {blank}"

    counts = re.search(r"(\d+) persons, (\d+) images in ", stdout)
    assert counts, stdout
    assert (int(counts[1]), int(counts[2])) == (12, 84), counts[0]
    assert "persons on both sides: 0" in stdout
    assert not (tmp_path / "data").exists(), "the notebook generated demo data although SM_CHANNEL_TRAIN was set"
