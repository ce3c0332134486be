"""The notebooks run top to bottom (issue #6).

Each notebook is executed in memory with nbclient, in a kernel running this interpreter,
with ``CARP_NOTEBOOK_BUDGET=ci`` (a tiny run: a few minutes on 2 CPU cores) and
``notebooks/`` as the working directory. The committed files are never rewritten. Beyond
"no cell raised", the executed outputs must hold the plots and the numbers the notebook
exists to show.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
QUICKSTART = NOTEBOOKS / "01_quickstart.ipynb"
PARTITIONS = NOTEBOOKS / "02_random_partitions.ipynb"


def execute(path: Path, monkeypatch) -> nbformat.NotebookNode:
    """Run every cell of `path` (a copy in memory) under the ci budget; raise on the first error."""
    from nbclient import NotebookClient

    monkeypatch.setenv("CARP_NOTEBOOK_BUDGET", "ci")  # the kernel inherits this process's environment
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    nb = nbformat.read(path, as_version=4)
    # kernel "python3" with argv[0] == "python" is launched as sys.executable by jupyter_client,
    # so the kernel runs this interpreter (the venv), whatever `python` is on PATH.
    client = NotebookClient(nb, kernel_name="python3", timeout=600, resources={"metadata": {"path": str(NOTEBOOKS)}})
    client.execute()
    return nb


def outputs(nb: nbformat.NotebookNode) -> tuple[str, int]:
    """(all text the code cells wrote or displayed, number of PNG images displayed)."""
    text, images = [], 0
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.output_type == "stream":
                text.append(out.text)
            elif out.output_type in ("execute_result", "display_data"):
                text.append(out.data.get("text/plain", ""))
                images += "image/png" in out.data
    return "\n".join(text), images


def percents(pattern: str, text: str) -> list[float]:
    values = [float(v) for v in re.findall(pattern, text)]
    assert all(0.0 <= v <= 100.0 for v in values), values
    return values


@pytest.mark.parametrize("path", [QUICKSTART, PARTITIONS], ids=lambda p: p.name)
def test_notebook_is_committed_without_outputs(path):
    """Committed notebooks hold code only: no outputs, no execution counts, a budget switch."""
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code, f"{path.name} has no code cells"
    for cell in code:
        assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: clear the outputs before committing"
    assert 'os.environ.get("CARP_NOTEBOOK_BUDGET", "full")' in code[0].source
    assert not re.search(r"\b_[a-z]\w*\(|\.\_[a-z]", "\n".join(c.source for c in code)), "use the public API only"


def test_kernel_runs_this_interpreter():
    from jupyter_client.kernelspec import KernelSpecManager

    spec = KernelSpecManager().get_kernel_spec("python3")
    assert spec.argv[0] in ("python", "python3", sys.executable), spec.argv


@pytest.mark.slow
def test_quickstart_runs(monkeypatch):
    nb = execute(QUICKSTART, monkeypatch)
    text, images = outputs(nb)
    # crops, training curves, prototype usage, the 2-D map, retrieval
    assert images >= 5, f"expected 5 plots, got {images}"
    (init,) = percents(r"k-NN top-1 at random init: ([\d.]+) %", text)
    assert percents(r"-> ([\d.]+) % after training", text)
    assert re.search(r"\d+ images use \d+ of 1024 prototypes", text)


@pytest.mark.slow
def test_random_partitions_runs(monkeypatch):
    nb = execute(PARTITIONS, monkeypatch)
    text, images = outputs(nb)
    assert images >= 2, f"expected the block-size and the K-sweep plots, got {images}"
    assert percents(r"k-NN top-1 at random init: ([\d.]+) %", text)
    # the summary table has one row per setting, with its k-NN top-1 column: the block-size sweep
    # (one block, with the teacher), random against fixed partitions, the K sweep
    for name in ("K=4096 B=16 random", "K=4096 B=256 random", "K=4096 B=4096 random (one block)",
                 "K=4096 B=256 fixed", "K=256 B=64 random", "K=16384 B=64 random"):
        assert name in text
    assert "k-NN top-1" in text
