"""`pip install .` installs carp_fast and nothing else at the top level, recipes and pipelines inside it."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_holds_only_carp_fast_with_every_module(tmp_path):
    # Build from a copy: setuptools leaves build/ beside the sources, and stale files there
    # would go into later wheels.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("carp_fast", "pipelines", "recipes"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(src)],
        check=True, capture_output=True,
    )
    (wheel,) = tmp_path.glob("carp_fast-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top_level == {"carp_fast"}
    # Every module of the source tree is in the wheel: pipelines/ as carp_fast/pipelines/.
    sources = {f"carp_fast/{p.relative_to(ROOT / 'carp_fast')}" for p in (ROOT / "carp_fast").rglob("*.py")}
    for folder in ("pipelines", "recipes"):
        sources |= {f"carp_fast/{folder}/{p.relative_to(ROOT / folder)}" for p in (ROOT / folder).rglob("*.py")}
    missing = sorted(sources - set(names))
    assert not missing, f"modules left out of the wheel (add their package to pyproject.toml): {missing}"
