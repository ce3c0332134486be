"""Count, on any device, the operations that would make the host wait for a GPU.

On a GPU the host queues kernels and runs ahead; an operation whose result the host must
read (``.item()``, ``bool(t)``, ``.tolist()``, ``.cpu()``) or whose output shape depends on
the values (``nonzero``, boolean indexing, ``masked_select``, ``unique``) stops it until the
GPU has caught up. ``torch.cuda.set_sync_debug_mode`` reports them on a GPU only; this
module finds the same operations in any run, on the CPU too, so that a test can hold the
training step to zero of them between logging steps without a GPU.

    counter = HostSyncs()
    learn.add_cb(counter.labels())        # each event tagged with the training iteration
    with counter:
        learn.fit(1)
    counter.events                        # [SyncEvent(op, iteration, where), ...]

What it cannot tell on the CPU: whether a tensor would be on the GPU. A host value read on
purpose (a flag the processes all-reduce on the CPU, the step count torch's optimizers keep
on the host) shows up too; ``where`` (the function that asked) lets the caller name those.
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass

import torch
from fastai.callback.core import Callback
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

# aten ops that read a value back to the host, or whose output shape depends on the values.
SYNC_OPS = frozenset({
    "aten._local_scalar_dense",  # .item(), bool(t), float(t), int(t), `if t:`
    "aten.nonzero", "aten.masked_select", "aten.unique", "aten._unique", "aten._unique2",
    "aten.unique_consecutive", "aten.unique_dim", "aten.repeat_interleave", "aten.equal",
    "aten.is_nonzero", "aten.allclose", "aten.histc", "aten.bincount",
})
# Tensor methods that copy to the host without an aten op on a CPU tensor. ``.to(device)`` is
# left out: on a CPU run it cannot be told from ``.to("cpu")``; the GPU check covers it.
SYNC_METHODS = frozenset({"tolist", "numpy", "cpu"})


@dataclass(frozen=True)
class SyncEvent:
    op: str  # the aten op or tensor method
    iteration: int | None  # the training iteration (``learn.train_iter``) it happened in; None outside batches
    where: str  # "file.py:function" that called it (torch's dispatch and tracing frames skipped)


# Frames between the caller and this module: torch's mode, dispatch and tracing machinery.
_MACHINERY = ("host_syncs.py", "torch/_compile.py", "torch/_dynamo/", "torch/overrides.py", "torch/utils/_python_dispatch.py",
              "torch/_tensor.py")


def _where() -> str:
    for frame in reversed(traceback.extract_stack()):
        if not any(part in frame.filename for part in _MACHINERY):
            return f"{frame.filename.rsplit('/', 1)[-1]}:{frame.name}"
    return ""


def _bool_index(args) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ())


class _Dispatch(TorchDispatchMode):
    def __init__(self, counter: "HostSyncs"):
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket._qualified_op_name.replace("::", ".")
        if name in SYNC_OPS or (name in ("aten.index", "aten.index_put", "aten.index_put_") and _bool_index(args)):
            self.counter.record(name if name in SYNC_OPS else f"{name} (boolean mask)")
        return func(*args, **(kwargs or {}))


class _Function(TorchFunctionMode):
    def __init__(self, counter: "HostSyncs"):
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in SYNC_METHODS:
            self.counter.record(f"Tensor.{name}")
        return func(*args, **(kwargs or {}))


class HostSyncs:
    """A context manager that records every host-waiting operation run inside it (all threads
    that inherit the mode, the autograd engine's included)."""

    def __init__(self):
        self.events: list[SyncEvent] = []
        self.iteration: int | None = None
        self._modes = [_Function(self), _Dispatch(self)]

    def record(self, op: str) -> None:
        self.events.append(SyncEvent(op, self.iteration, _where()))

    def __enter__(self) -> "HostSyncs":
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)

    def labels(self) -> Callback:
        """A fastai callback that tags the events of each training batch with its iteration."""
        return _IterationLabels(self)


class _IterationLabels(Callback):
    order = -100  # before every other callback's before_batch

    def __init__(self, counter: HostSyncs):
        self.counter = counter

    def before_batch(self):
        self.counter.iteration = self.learn.train_iter if self.training else None

    def after_train(self):  # runs first (order): the epoch's end is not a batch
        self.counter.iteration = None
