"""Resumable checkpoints: everything a run needs to continue exactly where it stopped.

A checkpoint holds the student and teacher (with the partition sampler's random state),
the optimizer, the gradient scaler (fp16), the gradient-accumulation counter and, when an
epoch ends in the middle of an accumulation, the gradients summed so far; the epoch and
step, every process's random generators, and the settings of the run. Every process calls
:func:`save_checkpoint` (it gathers the per-rank parts); the main one writes, atomically (a
temporary file, then a rename), so a kill -9 while writing leaves the previous checkpoint
intact.
"""

from __future__ import annotations

import os
import random
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from .distributed import unwrap

CHECKPOINT_NAME = "checkpoint.pth"
# Settings that may change between a run and its resumption (budgets, output, logging).
RESUMABLE_CHANGES = frozenset({"epochs", "minutes", "out", "resume", "workers", "log_every", "knn_every", "checkpoint_every", "progress"})


def _rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def rng_states() -> dict:
    """This process's random states (CUDA: the current device's, i.e. this rank's GPU)."""
    states = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        cuda = states["cuda"]
        if isinstance(cuda, (list, tuple)):  # older checkpoints: every device's state
            cuda = cuda[torch.cuda.current_device()] if torch.cuda.current_device() < len(cuda) else None
        if cuda is not None:
            torch.cuda.set_rng_state(cuda)


def _every_rank(obj) -> list:
    """``obj`` of every process, by rank (one collective; ``[obj]`` on one process)."""
    rank, world = _rank_and_world()
    if world == 1:
        return [obj]
    gathered = [None] * world
    dist.all_gather_object(gathered, obj)
    return gathered


def _accumulated_grads(learn) -> dict | None:
    """The gradients summed so far if the epoch ends inside an accumulation, else None.

    With several processes they are first averaged over the ranks, in place: that is what
    DDP's all-reduce at the step does to them anyway (it is linear), so the run goes on
    unchanged and one copy, restored on every rank, resumes it exactly.
    """
    accumulation = getattr(learn, "gradient_accumulation", None)
    if accumulation is None or accumulation.count % accumulation.n_steps == 0:
        return None
    grads = {name: p.grad for name, p in unwrap(learn.model).named_parameters() if p.grad is not None}
    _, world = _rank_and_world()
    if world > 1:
        for g in grads.values():
            dist.all_reduce(g)  # a sum (gloo has no average); one per tensor, once an epoch
            g.div_(world)
    return {name: g.detach().cpu().clone() for name, g in grads.items()}


def _grad_scaler(learn):
    """The fp16 GradScaler (:class:`~carp_fast.callbacks.FP16MixedPrecision` keeps one across fits)."""
    return next((cb.grad_scaler for cb in getattr(learn, "cbs", []) if hasattr(cb, "grad_scaler")), None)


def save_checkpoint(learn, path: str | os.PathLike, *, next_epoch: int, settings: dict) -> Path:
    """Write the state of ``learn`` after a finished epoch; returns the path.

    Call it on every process: the random states and accumulated gradients are gathered
    (collectives), then the main process writes.
    """
    path = Path(path)
    rng, grads = _every_rank(rng_states()), _accumulated_grads(learn)
    if _rank_and_world()[0] != 0:
        return path
    accumulation = getattr(learn, "gradient_accumulation", None)
    scaler = _grad_scaler(learn)
    state = {
        "model": unwrap(learn.model).state_dict(),
        "opt": learn.opt.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "accumulation_count": accumulation.count if accumulation is not None else 0,
        "grads": grads,
        "epoch": next_epoch,
        "train_iter": learn.train_iter,
        "plan": getattr(learn, "plan", None),  # a TimeBudget's plan: the schedules' length
        "rng": rng,  # one dict per rank
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
    """Load ``state`` into ``learn``, on every process, once its optimizer exists and fastai
    has reset its counters (the :class:`~carp_fast.callbacks.Checkpointer` does it in
    ``before_fit``): weights, optimizer, GradScaler, accumulated gradients, random states,
    the step counters, a :class:`~carp_fast.callbacks.TimeBudget`'s plan, and ``learn.first_epoch`` (a :class:`~carp_fast.learner.PretrainLearner`
    starts the fit there)."""
    model = unwrap(learn.model)
    model.load_state_dict(state["model"])
    learn.opt.load_state_dict(state["opt"])
    scaler = _grad_scaler(learn)
    if scaler is not None and state.get("scaler") is not None:
        scaler.load_state_dict(state["scaler"])
    grads = state.get("grads") or {}
    for name, p in model.named_parameters():
        if name in grads:
            p.grad = torch.empty_like(p).copy_(grads[name])  # the parameter's device and layout
    _restore_rng(state["rng"])
    learn.train_iter, learn.first_epoch = state["train_iter"], state["epoch"]
    learn.plan = state.get("plan")  # a TimeBudget goes on with it
    accumulation = getattr(learn, "gradient_accumulation", None)
    if accumulation is not None:
        accumulation.count = state["accumulation_count"]


def _restore_rng(saved: list[dict] | dict) -> None:
    """Each rank takes back its own random states; a change of process count is warned about."""
    saved = [saved] if isinstance(saved, dict) else saved  # checkpoints from before per-rank states
    rank, world = _rank_and_world()
    if len(saved) != world and rank == 0:
        warnings.warn(
            f"checkpoint: random states saved by {len(saved)} processes, resumed on {world}; a rank "
            "without a saved state keeps its seeded one, so augmentations will differ from an uninterrupted run",
            stacklevel=3,
        )
    if rank < len(saved):
        set_rng_states(saved[rank])
