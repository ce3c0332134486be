"""A run's folder (``--out``): checked before anything is written, and locked while the run lives.

:func:`claim` is what :func:`carp_fast.run.start` calls, on every process; the main process
decides and every process gets the same answer (one ``ValueError``, which the command line
turns into one ``error:`` line and exit status 2):

- ``--out`` naming a file (or a folder that cannot be made or written in) is refused.
- A folder that a live run is using is refused, naming that run's host and process id. The
  lock is ``out/.lock``, held with ``fcntl.flock`` on an open file by the main process only
  (the ranks of one run share the folder): the OS drops it when the process ends, however it
  ends (kill -9 included), so a dead run's lock never blocks. The file stays, naming its last
  holder; it is never deleted, since deleting it would race with a run taking it. Forked
  children (DataLoader workers) close their copy, so the lock ends with the main process.
  A process that already holds the folder (a second run in one Python process, e.g. a
  ``--resume`` after an exception in a notebook or a test) keeps it; :func:`release` gives
  it back at the end of a run (the OS does at exit).
- A folder holding another run's files (:data:`RUN_FILES`) without ``--resume`` is refused,
  offering ``--resume`` or ``--overwrite``; ``--overwrite`` deletes exactly those files first
  (anything else in the folder stays). Two runs never mix their metrics or checkpoints.

Why refuse rather than resume on its own when the settings match (the other way issue 23
allows): a rerun of the same command with the same settings is most often meant as a fresh
run (after a code change, to measure again, or a recipe's defaults rerun), and a silent
resume would append to its metrics, skip finished epochs or, for a finished run, train
nothing; the settings a checkpoint compares (:data:`~carp_fast.checkpoint.RESUMABLE_CHANGES`
aside) cannot tell these apart. A requeued job passes ``--resume`` on purpose, so nothing is
lost by asking. The refusal costs one rerun with a word added; a wrong guess costs a run.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import time
from pathlib import Path

LOCK_NAME = ".lock"
# What a run writes into --out (glob patterns): a folder holding any of them holds a run.
# ``checkpoint*`` covers checkpoint.pth, the kept older checkpoints and temporary files.
RUN_FILES = ("metrics.jsonl*", "summary.json", "baselines.json", "checkpoint*", "backbone_teacher*", "tensorboard")
_SHOW = 4  # files a refusal names

_held: dict[Path, int] = {}  # the folders this process holds: resolved folder -> the lock file's descriptor


def previous_run_files(out: str | os.PathLike) -> list[Path]:
    """The files and folders of :data:`RUN_FILES` in ``out``, sorted (none if it does not exist)."""
    out = Path(out)
    if not out.is_dir():
        return []
    return sorted({p for pattern in RUN_FILES for p in out.glob(pattern)})


def claim(out: str | os.PathLike, *, resume: bool = False, overwrite: bool = False, main: bool = True) -> None:
    """Make ``out``, lock it for this run and, with ``overwrite``, delete a previous run's files.

    Every process of a run calls it; ``main`` (the main process) checks, locks and deletes,
    and its verdict is shared with the other processes (a broadcast when a process group is
    up), so that every process stops alike.

    Raises:
        ValueError: on every process, with one line: ``out`` is a file or cannot be made, a
            live run holds it, or it holds another run's files and neither ``resume`` nor
            ``overwrite`` is given.
    """
    error = None
    if main:
        try:
            _claim_on_main(Path(out), resume=resume, overwrite=overwrite)
        except ValueError as e:
            error = str(e)
    error = _from_main(error)
    if error is not None:
        raise ValueError(error)


def release(out: str | os.PathLike) -> None:
    """Give back this process's lock on ``out`` (nothing if it holds none)."""
    fd = _held.pop(_key(Path(out)), None)
    if fd is not None:
        os.close(fd)  # the last descriptor of the open file: flock's lock goes with it


def holder(out: str | os.PathLike) -> str:
    """Who last held ``out``'s lock, in words (``host H, pid P, since T``), from its lock file."""
    try:
        info = json.loads((Path(out) / LOCK_NAME).read_text())
        return f"host {info['host']}, pid {info['pid']}, since {info['since']}"
    except (OSError, ValueError, KeyError, TypeError):  # absent, or being written at this moment
        return "another process"


# ---- the main process's checks ------------------------------------------------------------


def _claim_on_main(out: Path, *, resume: bool, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} is a file, not a folder: name a folder for the run's outputs")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a parent that is a file, no permission, a read-only disk
        raise ValueError(f"--out {str(out)!r}: cannot make the folder ({e.strerror or e})") from None
    taken = _lock(out)
    try:
        files = previous_run_files(out)
        if files and not resume:
            if not overwrite:
                names = ", ".join(p.name + ("/" if p.is_dir() else "") for p in files[:_SHOW])
                more = f" and {len(files) - _SHOW} more" if len(files) > _SHOW else ""
                raise ValueError(
                    f"--out {str(out)!r} holds another run's files ({names}{more}): add --resume to continue "
                    "that run, or --overwrite to delete them and start afresh (or choose another --out)")
            for path in files:
                shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    except BaseException:
        if taken:
            release(out)
        raise


def _key(out: Path) -> Path:
    return out.resolve()


def _lock(out: Path) -> bool:
    """Take ``out/.lock`` for this process (True), or keep the one it holds already (False)."""
    key = _key(out)
    if key in _held:
        return False
    try:
        import fcntl
    except ImportError:  # not a POSIX system: no lock
        return False
    try:
        fd = os.open(out / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise ValueError(f"--out {str(out)!r}: cannot write in the folder ({e.strerror or e})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise ValueError(f"--out {str(out)!r} is in use by a live run ({holder(out)}): wait for it to end, "
                             "stop it, or choose another --out") from None
        # A file system without flock (some network mounts): run, but say that nothing guards the folder.
        print(f"warning: --out {str(out)!r} cannot be locked ({e.strerror or e}): a second run on it would not be refused",
              flush=True)
        return False
    since = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": since}) + "\n").encode(), 0)
    _held[key] = fd
    return True


def _close_in_child() -> None:
    """In a forked child: close the copies of the lock descriptors (closing, not unlocking: an
    unlock would end the parent's lock too), so that the lock ends with the process that took it."""
    for fd in _held.values():
        try:
            os.close(fd)
        except OSError:
            pass
    _held.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_in_child)


def _from_main(error: str | None) -> str | None:
    """The main process's ``error`` on every process (a broadcast when a process group is up)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return error
    shared = [error]
    dist.broadcast_object_list(shared, src=0)
    return shared[0]
