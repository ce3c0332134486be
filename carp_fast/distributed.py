"""Decisions every process must share, taken once and sent to all.

A decision one rank takes alone (stop on a clock, stop on a NaN) leaves the other ranks
waiting in the next collective until the job's timeout kills it. Each helper here is one
tiny collective over CPU tensors (a gloo group beside NCCL's), so that it never makes the host
wait for a GPU, and a no-op in a single process.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def world_size() -> int:
    """The processes of the default group (1 without torch.distributed)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside DistributedDataParallel (or ``model`` itself)."""
    return getattr(model, "module", model)


_host_group_of: tuple = (None, None)  # (the default group it was made for, the gloo group)


def _host_group():
    """A gloo group over the default group's processes (the default group itself when it is gloo),
    made once. Flags are host values: all-reduced as CPU tensors over gloo, reading them back
    never waits for a GPU, where an NCCL all-reduce of a CUDA tensor would make the host wait
    for every kernel queued before it."""
    global _host_group_of
    if dist.get_backend() == "gloo":
        return None
    if _host_group_of[0] is not dist.group.WORLD:  # a new default group (a test's second run)
        _host_group_of = (dist.group.WORLD, dist.new_group(backend="gloo"))  # collective: every rank is here
    return _host_group_of[1]


def _flag_tensor(*values: int) -> torch.Tensor:
    return torch.tensor([int(v) for v in values], dtype=torch.int64)  # on the CPU: see _host_group


def main_process_value(value: int) -> int:
    """The main process's integer ``value`` on every rank (a broadcast from rank 0)."""
    if world_size() == 1:
        return value
    tensor = _flag_tensor(value)
    dist.broadcast(tensor, src=0, group=_host_group())
    return int(tensor.item())


def main_process_decides(flag: bool) -> bool:
    """The main process's ``flag`` on every rank (a broadcast from rank 0)."""
    return bool(main_process_value(int(flag)))


def any_process(flag: bool) -> bool:
    """True on every rank when ``flag`` is True on at least one (an all-reduce of the maximum)."""
    return shared_flags(flag)[0]


def main_process() -> bool:
    """True on rank 0 (and without torch.distributed)."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def shared_flags(*flags: bool) -> tuple[bool, ...]:
    """Each flag True on every rank when it is True on at least one: one all-reduce of the
    maximum for all of them (a flag only the main process computes is its value everywhere)."""
    if world_size() == 1:
        return tuple(bool(f) for f in flags)
    tensor = _flag_tensor(*(bool(f) for f in flags))
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=_host_group())
    return tuple(bool(v) for v in tensor.tolist())
