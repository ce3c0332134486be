"""``carp-fast train [--recipe NAME | --recipe FILE.py] [options]``: run a recipe.

Recipes are the scripts in the repository's ``recipes/`` folder, installed as
``carp_fast.recipes`` so that a plain (non-editable) install runs them by name too:
``carp-fast train --recipe in1k_mc --data /path/to/imagenet`` is ``accelerate launch
recipes/in1k_mc.py --data /path/to/imagenet`` on one process. The options after the recipe
are the recipe's (``carp-fast train --recipe in1k_mc --help`` lists them).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import pkgutil
from pathlib import Path


def recipe_names() -> list[str]:
    """The recipes that ship with carp_fast."""
    import carp_fast.recipes

    return sorted(m.name for m in pkgutil.iter_modules(carp_fast.recipes.__path__))


def load_recipe(recipe: str):
    """The recipe module named ``recipe`` (or the recipe file ``recipe``, a path ending in .py)."""
    if recipe.endswith(".py"):
        path = Path(recipe)
        if not path.is_file():
            raise FileNotFoundError(f"no recipe file {recipe!r}")
        spec = importlib.util.spec_from_file_location(f"carp_fast_recipe_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    if recipe not in recipe_names():
        raise ValueError(f"no recipe {recipe!r}; the recipes are {', '.join(recipe_names())}, or give a FILE.py")
    return importlib.import_module(f"carp_fast.recipes.{recipe}")


def main(argv: list[str] | None = None) -> dict:
    """Run ``--recipe`` (default: the embedded Fashion-MNIST run) with the remaining options."""
    pre = argparse.ArgumentParser(prog="carp-fast train", add_help=False)
    pre.add_argument("--recipe", default="fashion_mnist")
    known, rest = pre.parse_known_args(argv)
    try:
        recipe = load_recipe(known.recipe)
    except (FileNotFoundError, ValueError) as error:
        pre.error(str(error))
    return recipe.main(rest)
