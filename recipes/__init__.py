"""Recipes: scripts that read top to bottom, installed as ``carp_fast.recipes``.

Run one as a file (``python recipes/fashion_mnist.py``, ``accelerate launch
recipes/in1k_mc.py --data ...``) or by name (``carp-fast train --recipe in1k_mc ...``).
"""
