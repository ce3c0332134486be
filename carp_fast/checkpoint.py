"""Resumable checkpoints: everything a run needs to continue exactly where it stopped.

A checkpoint holds the student and teacher (with the partition sampler's random state),
the optimizer, the gradient scaler (fp16), the gradient-accumulation counter and, when it
is taken in the middle of an accumulation, the gradients summed so far; the epoch, the
micro-batches of it already done (``batch``, 0 at an epoch's start) and the step, every
process's random generators, and the settings of the run. Every process calls
:func:`save_checkpoint` (it gathers the per-rank parts); the main one writes.

The file is torch's zip format (``torch.load`` reads it as it is) with a zip comment,
``carp_fast {"sha256": ..., "epoch": E, "batch": B}``: the SHA-256 of the bytes before the
comment's 2-byte length field, then of that field as torch wrote it (``00 00``).

Writing (:func:`save_checkpoint`): only a finite state (else :class:`NonFiniteStateError`),
to ``<name>.tmp``, flushed and fsynced; then the older checkpoints move one place
(``checkpoint.pth`` -> ``checkpoint.1.pth`` ..., ``keep`` files in all), the new one is
renamed into place and the folder fsynced. A kill at any moment leaves the previous
checkpoint complete; a full disk raises :class:`DiskFullError`, the previous one untouched.

Reading (:func:`load_newest_checkpoint`): newest first, the first whose checksum matches,
that loads and holds finite tensors; each one skipped is named on one line and, once a
good one is found, set aside as ``<name>.bad`` (so the next rotation keeps the good one).
None: :class:`CheckpointError` naming every file and why.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
import struct
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from .distributed import unwrap

CHECKPOINT_NAME = "checkpoint.pth"
KEEP = 2  # checkpoints kept by default: the newest and the one before it
# Settings that may change between a run and its resumption (budgets, output, logging).
RESUMABLE_CHANGES = frozenset({"epochs", "minutes", "out", "resume", "workers", "log_every", "knn_every", "checkpoint_every", "progress",
                               "checkpoint_minutes", "stop_signals", "overwrite", "device", "linear_probe"})
# Settings added after checkpoints existed, with the value every run before them had: a
# checkpoint without one was written with that value.
ADDED_SETTINGS = {"eval_on": "test", "teacher": True, "entropy_weight": 1.0, "final_entropy_weight": None, "koleo_weight": 0.0}
REQUIRED_KEYS = frozenset({"model", "opt", "epoch", "train_iter", "rng", "settings"})
# The checksum lives inside the file, in its zip comment, rather than in a sidecar: file and
# checksum are renamed, rotated and copied as one, so a kill between two renames cannot pair a
# file with another's checksum, and torch.load (any zip reader) still reads the file as it is.
_COMMENT = b"carp_fast "  # the zip comment's prefix; a JSON object follows
_EOCD, _EOCD_SIZE = b"PK\x05\x06", 22  # zip's end-of-central-directory record, before the comment


class CheckpointError(ValueError):
    """No checkpoint reads and verifies (or, for one file, why it does not)."""


class DiskFullError(OSError):
    """The disk filled while a checkpoint was written; the previous checkpoint is untouched."""


class NonFiniteError(FloatingPointError):
    """Training produced NaN or infinite values; the message names the newest good checkpoint
    of the run, or says that none has been written."""


class NonFiniteStateError(NonFiniteError):
    """The weights or optimizer state to save hold NaN or infinite values: nothing was written."""


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


def _floating(obj, name: str):
    """(name, tensor) of every floating tensor in nested dicts, lists and tuples."""
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point() or obj.is_complex():
            yield name, obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield from _floating(value, f"{name}.{key}" if name else str(key))
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from _floating(value, f"{name}.{i}" if name else str(i))


def non_finite(obj, name: str = "") -> list[str]:
    """Names of the floating tensors in ``obj`` (nested dicts, lists) holding a NaN or an
    infinity; one host sync per device when all are finite."""
    named = list(_floating(obj, name))
    flags: dict[torch.device, list] = {}
    for _, tensor in named:
        flags.setdefault(tensor.device, []).append(torch.isfinite(tensor).all())
    if all(bool(torch.stack(f).all()) for f in flags.values()):
        return []
    return [n for n, tensor in named if not bool(torch.isfinite(tensor).all())]


def last_good(learn) -> str:
    """One clause naming the newest checkpoint this run wrote or resumed from (every one was
    finite when written), or saying there is none: the truth for an error message."""
    last = getattr(learn, "last_checkpoint", None)
    if not last:
        return "no checkpoint has been written yet"
    at = f"epoch {last['epoch']}" + (f", batch {last['batch']}" if last.get("batch") else "")
    return f"the newest good checkpoint is {last['path']} (--resume continues at {at})"


def _note(message: str) -> None:
    """One warning line on stderr, from the main process."""
    if _rank_and_world()[0] == 0:
        print(f"warning: {message}", file=sys.stderr, flush=True)


def save_checkpoint(learn, path: str | os.PathLike, *, next_epoch: int, settings: dict, batch: int = 0,
                    keep: int = KEEP) -> Path:
    """Write the state of ``learn`` to ``path`` (:func:`write_checkpoint`); returns the path.

    ``next_epoch`` is the epoch a resume continues in, after its first ``batch`` micro-batches
    (0: at its start). Call it on every process: each checks that its weights and optimizer
    state are finite, the verdicts travel with the random states (one gather, which the
    check must precede), every rank raises :class:`NonFiniteStateError` together if any is
    not, the accumulated gradients are averaged, then the main process writes and every
    process records ``learn.last_checkpoint``.
    """
    path = Path(path)
    model_state, opt_state = unwrap(learn.model).state_dict(), learn.opt.state_dict()
    bad = non_finite({"model": model_state, "opt": opt_state})
    # A rank's own buffers can differ (broadcast_buffers=False, --no-sync-bn): any rank's
    # verdict counts, shared in the gather the random states need anyway.
    gathered = _every_rank((rng_states(), bool(bad)))
    if any(flag for _, flag in gathered):
        _refuse_non_finite(learn, bad or ["on another process"])
    rng, grads = [r for r, _ in gathered], _accumulated_grads(learn)
    bad = non_finite(grads, "grads") if grads else []  # averaged over the ranks: one verdict
    if bad:
        _refuse_non_finite(learn, bad)
    if _rank_and_world()[0] == 0:
        accumulation = getattr(learn, "gradient_accumulation", None)
        scaler = _grad_scaler(learn)
        state = {
            "model": model_state,
            "opt": opt_state,
            "scaler": scaler.state_dict() if scaler is not None else None,
            "accumulation_count": accumulation.count if accumulation is not None else 0,
            "grads": grads,
            "epoch": next_epoch,
            "batch": batch,  # micro-batches of epoch `epoch` already done
            "train_iter": learn.train_iter,
            "plan": getattr(learn, "plan", None),  # a TimeBudget's plan: the schedules' length
            "rng": rng,  # one dict per rank
            "settings": settings,
        }
        write_checkpoint(state, path, keep=keep)
    learn.last_checkpoint = {"path": str(path), "epoch": next_epoch, "batch": batch}
    return path


def _refuse_non_finite(learn, bad: list[str]) -> None:
    names = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
    epoch = getattr(learn, "epoch", None)
    where = f"micro-batch {learn.train_iter}" + (f" (epoch {epoch})" if isinstance(epoch, int) else "")
    raise NonFiniteStateError(
        f"the weights or optimizer state hold NaN or infinite values at {where}: {names}; this state was not "
        f"saved and {last_good(learn)}. Lower the learning rate, use bf16 instead of fp16, or check the data."
    )


# ---- the file ---------------------------------------------------------------------------------


def _rotated(path: Path, i: int) -> Path:
    """``checkpoint.pth`` (i = 0), ``checkpoint.1.pth``, ``checkpoint.2.pth``, ..."""
    return path if i == 0 else path.with_name(f"{path.stem}.{i}{path.suffix}")


def _older(path: Path) -> dict[int, Path]:
    """The rotated older checkpoints of ``path`` that exist, by index."""
    found = {}
    prefix, suffix = f"{path.stem}.", path.suffix
    for p in path.parent.iterdir() if path.parent.is_dir() else ():
        index = p.name[len(prefix) : len(p.name) - len(suffix)] if p.name.startswith(prefix) and p.name.endswith(suffix) else ""
        if index.isdigit():
            found[int(index)] = p
    return found


def checkpoint_paths(path: str | os.PathLike) -> list[Path]:
    """``path`` and its older checkpoints (``checkpoint.1.pth``, ...) that exist, newest first."""
    path = Path(path)
    older = _older(path)
    return ([path] if path.is_file() else []) + [older[i] for i in sorted(older)]


def _tmp(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")


def remove_stale_tmp(path: str | os.PathLike) -> None:
    """Remove ``<name>.tmp`` (and the ``checkpoint.tmp`` of older versions) that a run killed
    while writing left behind, with a note (main process only)."""
    path = Path(path)
    if _rank_and_world()[0] != 0:
        return
    for tmp in {_tmp(path), path.with_suffix(".tmp")}:
        if tmp.is_file():
            tmp.unlink(missing_ok=True)
            _note(f"removed {tmp}, an unfinished checkpoint left by a run stopped while writing it")


class _HashingFile:
    """The file torch.save writes through, hashing the bytes as they pass (no second read)."""

    def __init__(self, file):
        self.file, self.sha256, self.written = file, hashlib.sha256(), 0

    def write(self, data) -> int:
        n = self.file.write(data)
        self.sha256.update(data)
        self.written += memoryview(data).nbytes
        return n

    def flush(self) -> None:
        self.file.flush()


def _fsync_dir(folder: Path) -> None:
    """Make the renames in ``folder`` durable (where the OS can open a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot fsync a folder
    finally:
        os.close(fd)


def write_atomically(path: str | os.PathLike, data: bytes) -> None:
    """Replace ``path`` by ``data`` at once: a temporary file, fsynced, renamed, folder fsynced."""
    path = Path(path)
    tmp = _tmp(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _size(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _disk_full(error: BaseException) -> bool:
    """ENOSPC or EDQUOT anywhere in the chain, or torch's writer's "unexpected pos"."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if isinstance(error, RuntimeError) and ("unexpected pos" in str(error) or "No space left" in str(error)):
            return True
        error = error.__cause__ or error.__context__
    return False


def write_checkpoint(state: dict, path: str | os.PathLike, *, keep: int = KEEP) -> Path:
    """Write ``state`` to ``path`` with its checksum, atomically, keeping the ``keep`` newest
    checkpoints (the older ones as ``checkpoint.1.pth`` ...). No collectives: the main
    process calls it, or another thread.

    Raises:
        DiskFullError: the disk filled (one line: the folder, the free space); the temporary
            file is removed and the previous checkpoints are as they were.
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_tmp(path)
    tmp, hashing = _tmp(path), None
    try:
        with open(tmp, "w+b") as f:
            hashing = _HashingFile(f)
            torch.save(state, hashing)
            f.seek(-_EOCD_SIZE, os.SEEK_END)
            end = f.read(_EOCD_SIZE)
            if not (end.startswith(_EOCD) and end.endswith(b"\0\0")):
                raise RuntimeError(f"torch.save wrote no zip file without a comment to {tmp}; cannot add the checksum")
            record = {"sha256": hashing.sha256.hexdigest(), "epoch": state.get("epoch"), "batch": state.get("batch", 0)}
            comment = _COMMENT + json.dumps(record).encode()
            f.seek(-2, os.SEEK_END)
            f.write(struct.pack("<H", len(comment)) + comment)
            f.flush()
            os.fsync(f.fileno())
    except BaseException as error:  # a signal's KeyboardInterrupt too: no half file stays
        tmp.unlink(missing_ok=True)
        if isinstance(error, Exception) and _disk_full(error):
            previous = checkpoint_paths(path)
            kept = f"{previous[0]} is unchanged" if previous else "no earlier checkpoint exists"
            full = DiskFullError(
                f"the disk is full: a checkpoint in {path.parent} failed after {_size(hashing.written if hashing else 0)} "
                f"({_size(shutil.disk_usage(path.parent).free)} free); {kept}. Free some space (or use another --out)"
            )
            full.errno = errno.ENOSPC
            raise full from None
        raise
    for i in range(keep - 1, 0, -1):  # the oldest kept is overwritten, the others move one place
        if _rotated(path, i - 1).is_file():
            os.replace(_rotated(path, i - 1), _rotated(path, i))
    os.replace(tmp, path)
    for i, extra in _older(path).items():  # from a run with a larger keep
        if i >= keep:
            extra.unlink(missing_ok=True)
    _fsync_dir(path.parent)
    return path


def verify_checkpoint(path: str | os.PathLike) -> dict:
    """The checksum record of ``path`` once the file matches it: ``{"sha256", "epoch",
    "batch"}``; ``{}`` for a file without one (written before carp_fast stored them).

    Raises:
        CheckpointError: empty, truncated, a foreign zip comment, or a checksum mismatch.
    """
    path = Path(path)
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError("empty (0 bytes)")
    with open(path, "rb") as f:
        f.seek(max(0, size - _EOCD_SIZE - 0xFFFF))
        tail = f.read()
        at = tail.rfind(_EOCD)
        while at >= 0 and at + _EOCD_SIZE + int.from_bytes(tail[at + 20 : at + 22], "little") != len(tail):
            at = tail.rfind(_EOCD, 0, at)
        if at < 0:
            raise CheckpointError(f"truncated ({size} bytes, no end of archive)")
        comment = tail[at + _EOCD_SIZE :]
        if not comment:
            return {}
        try:
            record = json.loads(comment[len(_COMMENT) :]) if comment.startswith(_COMMENT) else None
            expected = record["sha256"]
        except (ValueError, TypeError, KeyError):
            raise CheckpointError("its checksum record is damaged or foreign") from None
        sha256, left = hashlib.sha256(), size - len(comment) - 2
        f.seek(0)
        while left > 0:
            chunk = f.read(min(left, 1 << 23))
            if not chunk:
                break
            sha256.update(chunk)
            left -= len(chunk)
        sha256.update(b"\0\0")  # the comment's length field as torch wrote it
    if sha256.hexdigest() != expected:
        raise CheckpointError("checksum mismatch (the file is corrupted)")
    return record


def read_checkpoint(path: str | os.PathLike) -> dict:
    """One checkpoint file's state, verified: checksum, readable, a training checkpoint,
    finite weights and optimizer state.

    Raises:
        CheckpointError: why it is not (one line, no traceback), or OSError.
    """
    record = verify_checkpoint(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # "failed finding central directory", UnpicklingError, EOFError...
        reason = str(error).strip().splitlines()[0][:160] if str(error).strip() else ""
        raise CheckpointError(f"unreadable ({type(error).__name__}{': ' + reason if reason else ''})") from None
    missing = REQUIRED_KEYS - set(state) if isinstance(state, dict) else REQUIRED_KEYS
    if missing:
        raise CheckpointError(f"not a carp_fast training checkpoint (missing {sorted(missing)})")
    bad = non_finite({"model": state["model"], "opt": state["opt"]})
    if bad:
        raise CheckpointError(f"holds NaN or infinite values ({len(bad)} tensors, e.g. {bad[0]})")
    if not record:
        _note(f"{path} has no checksum (written before carp_fast stored them): loaded unverified")
    return state


def load_newest_checkpoint(path: str | os.PathLike) -> tuple[Path, dict]:
    """The newest of ``path`` and its older checkpoints that :func:`read_checkpoint` accepts,
    and its state; a stale temporary file is removed first. Each newer one skipped is named
    on one line and set aside as ``<name>.bad`` (the main process renames).

    Raises:
        FileNotFoundError: there is no checkpoint.
        CheckpointError: none reads and verifies (one line naming each file and why).
    """
    path = Path(path)
    remove_stale_tmp(path)
    candidates = checkpoint_paths(path)
    if not candidates:
        raise FileNotFoundError(f"no checkpoint to resume from at {path}; start without --resume")
    skipped = []
    for candidate in candidates:
        try:
            state = read_checkpoint(candidate)
        except (CheckpointError, OSError) as error:
            skipped.append((candidate, str(error)))
            continue
        for bad, why in skipped:
            aside = bad.with_name(bad.name + ".bad")
            if _rank_and_world()[0] == 0 and bad.exists():
                os.replace(bad, aside)
            _note(f"skipping checkpoint {bad}: {why}; set aside as {aside.name}, resuming from {candidate.name}")
        return candidate, state
    reasons = "; ".join(f"{p.name}: {why}" for p, why in skipped)
    raise CheckpointError(f"no checkpoint in {path.parent} reads and verifies ({reasons}); start without --resume")


def load_checkpoint(path: str | os.PathLike) -> dict:
    """The state of the newest good checkpoint at ``path`` (:func:`load_newest_checkpoint`)."""
    return load_newest_checkpoint(path)[1]


def check_same_run(saved: dict, current: dict, path) -> None:
    """Raise if the checkpoint's settings differ from this run's in anything but budgets."""
    saved = {**{k: v for k, v in ADDED_SETTINGS.items() if k in current}, **saved}
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
    the step counters, a :class:`~carp_fast.callbacks.TimeBudget`'s plan, and
    ``learn.first_epoch`` and ``learn.first_batch`` (a :class:`~carp_fast.learner.PretrainLearner`
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
    learn.first_batch = state.get("batch", 0)  # micro-batches of that epoch already done
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
