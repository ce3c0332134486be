"""Resumable checkpoints: everything a run needs to continue exactly where it stopped.

A checkpoint holds the student and teacher (with the partition sampler's random state),
the optimizer, the gradient scaler (fp16), the gradient-accumulation counter, the epoch
and step, every random generator's state, and the settings of the run. It is written
atomically (a temporary file, then a rename), so a kill -9 while writing leaves the
previous checkpoint intact.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

from .callbacks.accumulation import GradientAccumulation

CHECKPOINT_NAME = "checkpoint.pth"
# Settings that may change between a run and its resumption (budgets, output, logging).
RESUMABLE_CHANGES = frozenset({"epochs", "minutes", "out", "resume", "workers", "log_every", "knn_every", "checkpoint_every", "progress"})


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)


def rng_states() -> dict:
    states = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_checkpoint(learn, path: str | os.PathLike, *, next_epoch: int, settings: dict) -> Path:
    """Write the state of ``learn`` after a finished epoch; returns the path."""
    path = Path(path)
    accumulation = getattr(learn, "gradient_accumulation", None)
    scaler = getattr(getattr(learn, "mixed_precision", None), "scaler", None)
    state = {
        "model": _unwrap(learn.model).state_dict(),
        "opt": learn.opt.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "accumulation_count": accumulation.count if isinstance(accumulation, GradientAccumulation) else 0,
        "epoch": next_epoch,
        "train_iter": learn.train_iter,
        "rng": rng_states(),
        "settings": settings,
    }
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read a checkpoint written by :func:`save_checkpoint` (a clear error if it is none)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint to resume from at {path}; start without --resume")
    state = torch.load(path, map_location="cpu", weights_only=False)
    missing = {"model", "opt", "epoch", "train_iter", "rng", "settings"} - set(state)
    if missing:
        raise ValueError(f"{path} is not a carp_fast training checkpoint (missing {sorted(missing)})")
    return state


def check_same_run(saved: dict, current: dict, path) -> None:
    """Raise if the checkpoint's settings differ from this run's in anything but budgets."""
    keys = (set(saved) | set(current)) - RESUMABLE_CHANGES
    differ = sorted(k for k in keys if saved.get(k) != current.get(k))
    if differ:
        details = ", ".join(f"{k}: checkpoint {saved.get(k)!r} vs now {current.get(k)!r}" for k in differ[:6])
        raise ValueError(
            f"--resume: {path} comes from another configuration ({details}); resume with the same "
            "settings or start a new --out directory"
        )


def restore_checkpoint(learn, state: dict) -> None:
    """Load ``state`` into ``learn`` (after ``learn.create_opt()``)."""
    _unwrap(learn.model).load_state_dict(state["model"])
    learn.opt.load_state_dict(state["opt"])
    scaler = getattr(getattr(learn, "mixed_precision", None), "scaler", None)
    if scaler is not None and state.get("scaler") is not None:
        scaler.load_state_dict(state["scaler"])
    set_rng_states(state["rng"])
