"""The validation split: a fixed 10k of the training images held out of pretraining and the k-NN bank.

Fashion-MNIST has a training split (60k) and a test split (10k), no validation split. Settings
chosen on the test queries are measured on the images they were chosen on, so a run can hold
out :data:`VALIDATION_IMAGES` of the training images instead (``--eval-on validation``,
``carp_fast.run.open_sources``): they are the k-NN's queries, and pretraining and the k-NN bank
draw only from the other 50k. The held-out images are drawn with their own seed,
:data:`VALIDATION_SEED`, not the run's ``--seed``: the same 10k for every method, setting and
seed, so every tuning run is scored on the same queries.
"""

from __future__ import annotations

import numpy as np

from carp_fast.pipelines.sources import ArraySource

VALIDATION_IMAGES = 10_000  # as many as the test split: the two estimates have the same noise
VALIDATION_SEED = 24  # fixed for every method and run (issue 24); independent of --seed


def validation_indices(total: int, n: int = VALIDATION_IMAGES, seed: int = VALIDATION_SEED) -> np.ndarray:
    """The sorted indices of the ``n`` held-out images among ``total`` training images.

    Args:
        total: images in the training split.
        n: images to hold out, ``1 <= n < total``.
        seed: the draw's seed (the default is the one every run uses).

    Returns:
        ``[n]`` int64 indices, sorted; the same for the same ``(total, n, seed)``.
    """
    if not 1 <= n < total:
        raise ValueError(f"a validation split needs 1 <= n < {total} (the training images), got n={n}")
    return np.sort(np.random.default_rng(seed).choice(total, n, replace=False)).astype(np.int64)


def split_validation(source, n: int = VALIDATION_IMAGES, seed: int = VALIDATION_SEED) -> tuple[ArraySource, ArraySource]:
    """``(rest, held_out)``: the training ``source`` without its validation images, and those images.

    Args:
        source: the training split as an :class:`ArraySource` (Fashion-MNIST, or any array
            source); an image folder has a split of its own (``val/``).
        n, seed: as :func:`validation_indices`.

    Returns:
        Two array sources, each in the original order, disjoint, together the whole source.
    """
    if not isinstance(source, ArraySource):
        raise ValueError(f"a validation split is held out of in-memory training images (ArraySource, e.g. "
                         f"'fashion-mnist'), got {type(source).__name__}; an image folder has its own val/: "
                         "use --eval-on test")
    held = validation_indices(len(source), n, seed)
    rest = np.setdiff1d(np.arange(len(source)), held)  # sorted
    return tuple(ArraySource(source.images[idx], source.labels[idx], num_classes=source.num_classes) for idx in (rest, held))
