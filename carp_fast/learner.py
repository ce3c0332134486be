"""The one Learner of every method: fastai's, on Accelerate's devices, resumable.

:func:`method_learner` takes a :class:`~carp_fast.method.Method` and its config and adds
what every method shares: the device and processes from Accelerate (synchronised BatchNorm and
DistributedDataParallel with several processes, channels_last where it pays), gradient
accumulation toward the global batch, the precision callbacks, epoch sync, the device
recorder and the progress display. The method brings its model, loss, optimizer and
callbacks (:mod:`carp_fast.carp`, :mod:`carp_fast.massl.method`).
"""

from __future__ import annotations

import inspect
import itertools

import torch
from fastai.callback.core import CancelEpochException, TrainEvalCallback
from fastai.learner import Learner

from .accelerator import check_accelerator, make_accelerator
from .callbacks.accumulation import GradientAccumulation
from .callbacks.channels_last import ChannelsLastInputs
from .callbacks.data_wait import DataWait
from .callbacks.epoch_sync import EpochSync
from .callbacks.precision import auto_channels_last, precision_callbacks
from .callbacks.preemption import Preemption
from .callbacks.progress import RichProgress
from .callbacks.recorder import DeviceRecorder
from .method import Method, MethodConfig
from .sync_bn import convert_sync_batchnorm


class PretrainLearner(Learner):
    """fastai's Learner, able to start a fit at batch ``first_batch`` of epoch ``first_epoch``
    (a resumed run; :func:`carp_fast.checkpoint.restore_checkpoint` sets both).

    fastai's own ``fit(start_epoch=...)`` cancels the skipped epochs one by one, which still
    runs every callback's ``after_epoch`` for them (metrics, checkpoints, k-NN); here they
    are simply not iterated. Inside the first epoch, a loader with ``set_epoch(epoch,
    start_batch=b)`` (:class:`carp_fast.pipelines.EpochLoader`) starts at batch b with the
    batches an uninterrupted epoch has there; another loader has its first b batches read
    and dropped (exact only if its order does not depend on the random state).
    """

    first_epoch = first_batch = 0

    def _do_fit(self):
        try:
            self.epoch = min(self.first_epoch, self.n_epoch) - 1  # stays the last epoch if none is left
            epoch = self.first_epoch
            while epoch < self.n_epoch:  # re-read: a TimeBudget sets n_epoch once it has planned the fit
                self.epoch = epoch
                self._with_events(self._do_epoch, "epoch", CancelEpochException)
                epoch += 1
        finally:
            self.first_epoch = self.first_batch = 0  # a resume applies to one fit
            for cb in self.cbs:  # fastai skips after_fit when fit raises: signal handlers go back here
                if isinstance(cb, Preemption):
                    cb.release()

    def all_batches(self):
        "fastai's, from batch ``first_batch`` in the first training epoch of a resumed fit."
        start = self.first_batch if self.training else 0
        if not start:
            return super().all_batches()
        self.first_batch, self.n_iter = 0, len(self.dl)
        set_epoch = getattr(self.dl, "set_epoch", None)
        if set_epoch is not None and "start_batch" in inspect.signature(set_epoch).parameters:
            set_epoch(self.epoch, start_batch=start)
            batches = iter(self.dl)
        else:
            batches = itertools.islice(self.dl, start, None)
        for i, batch in enumerate(batches, start):
            self.one_batch(i, batch)


def method_learner(
    method: Method, dls, config: MethodConfig, *, accelerator=None, cbs=None, path: str = ".", progress: bool = True,
    model=None,
) -> PretrainLearner:
    """A fastai Learner that trains ``method`` on ``dls``.

    Args:
        method: the method (:data:`carp_fast.carp.CARP`, :data:`carp_fast.massl.MASSL`).
        dls: fastai ``DataLoaders`` whose training batches are
            ``(crop_0 [N,3,G,G], ..., crop_{V-1} [N,3,L,L], labels [N])`` with the
            ``config.global_crops`` global crops first (see ``carp_fast.pipelines.crop_dataloaders``).
        config: the run's settings, an instance of ``method.config``.
        accelerator: an ``accelerate.Accelerator``; :func:`~carp_fast.accelerator.make_accelerator`
            makes one if None. Its device is used, and with several processes the model is
            wrapped in DistributedDataParallel.
        cbs: extra callbacks (e.g. :class:`~carp_fast.callbacks.KNNMonitor`).
        path: fastai's working directory (``learn.save`` writes under ``path/models``).
        progress: let :class:`~carp_fast.callbacks.RichProgress` display (it always measures
            ``learn.images_per_s``).
        model: the module to train instead of ``method.build_model(config)`` (another backbone).

    Returns:
        a :class:`PretrainLearner` (``learn.fit(epochs)`` trains; a Checkpointer resumes it),
        with ``learn.method``, ``learn.config`` and ``learn.accelerator`` set.

    Raises:
        ValueError: ``config`` is not ``method.config``'s, the global batch does not split
            over the processes, or ``method.check`` refuses the model.
    """
    if not isinstance(config, method.config):
        raise ValueError(f"config: {method.name} needs a {method.config.__name__}, got a {type(config).__name__}")
    # One precision: the config's callbacks; an Accelerator that would autocast too is refused.
    accelerator = make_accelerator() if accelerator is None else accelerator
    check_accelerator(accelerator)
    device, n_proc = accelerator.device, accelerator.num_processes
    n_acc = config.accumulation_steps(n_proc)
    model = method.build_model(config) if model is None else model
    method.check(model, config, n_proc)  # before the first step

    precision = config.resolved_precision(device)
    channels_last = auto_channels_last(device, precision) if config.channels_last is None else config.channels_last
    if n_proc > 1 and config.sync_bn:
        model = convert_sync_batchnorm(model)
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if n_proc > 1:
        if accelerator.ddp_handler is None:  # a caller's own DistributedDataParallelKwargs win
            from accelerate.utils import DistributedDataParallelKwargs

            # GlobalBatchNorm keeps the BatchNorm statistics equal and the loss broadcasts the
            # partition: DDP's default re-broadcast of every buffer before every forward (16
            # times a step with accumulation) would only cost time.
            accelerator.ddp_handler = DistributedDataParallelKwargs(broadcast_buffers=False)
        model = accelerator.prepare_model(model)
    if all(hasattr(dl, "to") for dl in dls.loaders):
        dls.device = device  # fastai loaders move their batches themselves
    else:
        dls._device = device  # plain torch loaders: the Learner moves each batch

    callbacks = [
        TrainEvalCallback(),
        EpochSync(),
        DataWait(),
        DeviceRecorder(valid_metrics=len(dls.valid) > 0 if dls.valid is not None else False),
        GradientAccumulation(n_acc),
        *precision_callbacks(precision, device),
        *method.callbacks(config),
    ]
    callbacks.append(RichProgress(images_per_batch=config.batch_size * n_proc, show=progress))
    learn = PretrainLearner(
        dls, model, loss_func=method.loss(config), opt_func=method.optimizer(config), lr=config.peak_lr(),
        splitter=method.splitter,
        cbs=callbacks + list(cbs or []), path=path, default_cbs=False,
    )
    if channels_last:
        learn.add_cb(ChannelsLastInputs())
    learn.logger = lambda *args: None  # RichProgress prints the epoch lines instead
    learn.method, learn.config, learn.accelerator = method, config, accelerator
    return learn

