"""carp_fast.eval imports cheaply and exposes every protocol."""

from __future__ import annotations

import subprocess
import sys

import carp_fast.eval


def test_lazy_names_resolve():
    for name in carp_fast.eval.__all__:
        assert getattr(carp_fast.eval, name) is not None, name


def test_knn_import_is_cheap():
    # The training loop's k-NN monitor imports this; faiss loads the CUDA runtime.
    code = (
        "import sys, carp_fast.eval.knn, carp_fast.eval; "
        "heavy = [m for m in ('faiss', 'sklearn', 'matplotlib', 'rich', 'fastai') if m in sys.modules]; "
        "print(heavy)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
