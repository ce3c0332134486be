"""Which callbacks stay out of fastai's side fits (``lr_find``, ``get_preds``)."""

from __future__ import annotations


def stands_aside(learn) -> bool:
    """True during ``learn.lr_find()`` or ``learn.get_preds()``, as fastai's trackers decide:
    callbacks that write files, evaluate, schedule or stop on a clock then set ``run = False``
    in ``before_fit`` (fastai sets it back after the fit)."""
    return hasattr(learn, "lr_finder") or hasattr(learn, "gather_preds")
