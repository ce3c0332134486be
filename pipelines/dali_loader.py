"""DALI backend: external-source pipelines fed in our own sharded epoch order.

Why external_source and not `fn.readers.file`: the order must be a pure function of
(seed, epoch, shard) shared with the torchvision path (`sharding.py`), epochs must have
an exact, equal length on every rank, and the file list is the pre-flight-scanned one.
Reading the bytes in Python is cheap next to decoding, which DALI does on its threads
('cpu') or with nvJPEG ('mixed').

Reading off the training thread: DALI runs a non-parallel external source's callback in the
thread that calls `next()`, so the files are read by a pool of threads a few batches ahead
(`_feed`), in the list's order. Not DALI's parallel external source: its worker processes
would be started per pipeline (per epoch), with 'spawn' once CUDA is initialised, and the
source pickled to each; reading is I/O, which threads overlap as well (they release the GIL).

One pipeline per epoch, seeded from (seed, shard, epoch): a resumed epoch replays its
augmentations, and an abandoned epoch cannot leak prefetched batches into the next. Not one
pipeline per run: DALI's random operators are seeded when the pipeline is built, so in a
pipeline that lived through several epochs epoch e's crops would depend on every batch drawn
before it, and a resume at epoch e (or mid-epoch) could not replay them without rerunning the
run's earlier epochs.
Pipeline: read (external source: bytes or arrays + labels) -> decode once -> fan out
to the crops (`dali_augment.py`) -> return.
"""

from __future__ import annotations

import gc
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import numpy as np
import torch
import nvidia.dali.fn as fn
import nvidia.dali.types as types
from nvidia.dali import pipeline_def
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

from carp_fast.pipelines.augment import CropSpec, MultiCropConfig
from carp_fast.pipelines.dali_augment import decode, eval_view, multicrop_views
from carp_fast.pipelines.epoch_loader import EpochLoader
from carp_fast.pipelines.sharding import augment_seed, batches


# A process forked after a DALI pipeline existed (a torch DataLoader's workers, for instance)
# inherits the pipeline but not its executor threads: if the pipeline was garbage (an abandoned
# epoch in a reference cycle), a garbage collection in the child runs its destructor, which
# waits forever for those threads. Children leave inherited objects to the parent that owns
# them: gc.freeze() exempts every object alive at the fork from the child's collections.
os.register_at_fork(after_in_child=gc.freeze)


class DaliDeviceError(RuntimeError):
    """DALI failed for want of device memory, or on a CUDA error: not because of an image."""


# What DALI's messages say when the device, not an image, failed (its allocators raise
# "CUDA allocation failed" / std::bad_alloc; the CUDA runtime names its error codes).
_MEMORY = ("CUDA allocation failed", "out of memory", "cudaErrorMemoryAllocation", "bad_alloc", "Can't allocate")
_CUDA = ("CUDA error", "cudaError", "CUDA driver error", "CUDA runtime error", "CUDA_ERROR")


def device_failure(error: Exception) -> str | None:
    """"memory" or "cuda" when DALI's ``error`` is an out-of-memory or CUDA error, else None."""
    text = str(error)
    if any(m.lower() in text.lower() for m in _MEMORY):
        return "memory"
    if any(m in text for m in _CUDA):
        return "cuda"
    return None


READ_THREADS = 8  # threads reading encoded images: overlap the latency of a network file system
READ_AHEAD = 2  # batches being read beyond the one DALI asks for


def _feed(source, batch_list: list[np.ndarray], pending: deque, pool: ThreadPoolExecutor | None) -> Iterator[tuple]:
    """Yield (images, labels) per batch, in order; the I/O step. `pending` remembers what is in flight.

    Encoded images are read by `pool`'s threads, `READ_AHEAD` batches ahead of the one DALI
    asks for: DALI calls a (non-parallel) external source in the thread that trains, which
    then only collects bytes already read. The order is the list's whatever thread reads what.
    """
    if not source.is_encoded or pool is None:
        for idx in batch_list:
            pending.append(idx)
            images = [source.encoded(int(i)) for i in idx] if source.is_encoded else source.arrays(idx)
            yield images, source.labels[idx]
        return
    reading: deque = deque()  # (idx, futures of its images), oldest first
    upcoming = iter(batch_list)

    def read_next() -> None:
        idx = next(upcoming, None)
        if idx is not None:
            reading.append((idx, [pool.submit(source.encoded, int(i)) for i in idx]))

    for _ in range(READ_AHEAD + 1):
        read_next()
    try:
        while reading:
            idx, futures = reading.popleft()
            read_next()
            pending.append(idx)
            yield [f.result() for f in futures], source.labels[idx]
    finally:  # an abandoned epoch: drop what is queued (reads already running finish, unused)
        for _, futures in reading:
            for f in futures:
                f.cancel()


def _read(feed, encoded: bool, gpu: bool):
    images, labels = fn.external_source(source=feed, num_outputs=2, batch=True, dtype=[types.UINT8, types.INT64],
                                        layout=[None if encoded else "HWC", None])
    if encoded:
        images = decode(images, gpu)
    elif gpu:
        images = images.gpu()  # host -> device once; every crop op then runs on the GPU
    return images, labels


@pipeline_def(enable_conditionals=True)
def _pretrain_pipeline(feed, specs: list[CropSpec], mean, std, encoded: bool, gpu: bool):
    images, labels = _read(feed, encoded, gpu)
    views = multicrop_views(images, specs, mean, std)
    return (*views, labels)


@pipeline_def
def _eval_pipeline(feed, size: int, resize: int | None, mean, std, encoded: bool, gpu: bool):
    images, labels = _read(feed, encoded, gpu)
    return eval_view(images, size, resize, mean, std), labels


class DaliLoader(EpochLoader):
    """Pretraining (multi-crop) or evaluation loader on DALI.

    `workers` is DALI's `num_threads`. On a CUDA `device` the pipeline decodes with
    nvJPEG and runs every op on that GPU (device_id = its index, the local rank);
    otherwise it runs on the CPU with `device_id=None`. `graph` holds the pipeline's
    arguments other than mean and std, which come from the loader's own.
    """

    backend = "dali"

    def __init__(self, source, *, n_views: int, graph: dict, workers: int, **kw) -> None:
        super().__init__(source, **kw)
        if workers < 1:
            raise ValueError(f"workers (DALI threads) must be >= 1, got {workers}")
        self.workers, self._graph = workers, graph
        self._pool: ThreadPoolExecutor | None = None  # READ_THREADS, started on the first epoch
        self._names = [f"view{i}" for i in range(n_views)] + ["labels"]  # V views, then the labels

    def _build(self, feed, epoch: int):
        gpu = self.device.type == "cuda"
        pipeline = _pretrain_pipeline if self.train else _eval_pipeline
        return pipeline(feed=feed, encoded=self.source.is_encoded, gpu=gpu, mean=self.mean, std=self.std,
                        **self._graph, batch_size=self.bs, num_threads=self.workers,
                        device_id=self.device.index if gpu else None,
                        seed=augment_seed(self.seed, self.shard_id, epoch), prefetch_queue_depth=2)

    def _produce(self, order: np.ndarray, epoch: int) -> Iterator[tuple[torch.Tensor, ...]]:
        batch_list = batches(order, self.bs)
        pending: deque = deque()
        if self._pool is None and self.source.is_encoded:
            self._pool = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="carp_fast-read")
        pipe = self._build(_feed(self.source, batch_list, pending, self._pool), epoch)
        it = None
        try:
            for step in range(len(batch_list)):
                try:
                    if it is None:  # builds and prefetches: decoding starts here
                        # size=-1: the epoch ends when the feed runs out; PARTIAL keeps a short last eval batch.
                        it = DALIGenericIterator([pipe], self._names, size=-1, last_batch_policy=LastBatchPolicy.PARTIAL)
                    out = next(it)[0]
                except RuntimeError as e:
                    if device_failure(e) is not None:
                        raise self._device_error(e, step, epoch) from e
                    raise self._decode_error(pending, e) from e
                pending.popleft()
                yield tuple(out[k] for k in self._names)
        finally:
            del it, pipe  # free the pipeline's threads and buffers now, not at the next GC

    def _crops(self) -> str:
        """The crops in words: ``2x224+6x96`` (pretraining) or ``224 from 256`` (evaluation)."""
        if self.train:
            sizes = [spec.size for spec in self._graph["specs"]]
            return "+".join(f"{sizes.count(s)}x{s}" for s in dict.fromkeys(sizes))
        resize = self._graph["resize"]
        return f"{self._graph['size']}{'' if resize is None else f' from {resize}'}"

    def _device_error(self, error: Exception, step: int, epoch: int) -> DaliDeviceError:
        """Out of memory or a CUDA error inside DALI: say so, with the sizes that set its memory."""
        what = device_failure(error)
        where = f"batch {step} of epoch {epoch} on {self.device}"
        sizes = f"batch_size={self.bs} per process, crops {self._crops()}, {self.workers} DALI threads"
        if what == "memory":
            advice = ("DALI allocates from its own pool, beside torch's caching allocator: lower the batch size "
                      "(raise gradient accumulation to keep the global batch), use fewer or smaller crops, or leave "
                      "DALI more memory (a smaller model batch, PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True)")
            head = "DALI ran out of memory"
        else:
            advice = "check the GPU (nvidia-smi), the driver and that DALI's CUDA build matches it"
            head = "DALI hit a CUDA error"
        return DaliDeviceError(f"{head} at {where} ({sizes}); not a broken image. {advice}. "
                               f"DALI said: {str(error).strip()[:500]}")

    def _decode_error(self, pending: deque, error: Exception) -> RuntimeError:
        """Name the images of the oldest batch in flight: DALI's own message names none."""
        names = [self.source.name(int(i)) for i in (pending[0] if pending else [])]
        return RuntimeError(
            f"DALI failed on a batch holding one of these {len(names)} images: {names[:8]}"
            f"{' ...' if len(names) > 8 else ''}. The pre-flight scan (strict=True) lists files it can "
            f"detect as broken. DALI said: {str(error)[:500]}")


def dali_pretrain_loader(source, crops: MultiCropConfig, *, workers: int, **kw) -> DaliLoader:
    specs = crops.crop_specs()
    return DaliLoader(source, n_views=len(specs), graph=dict(specs=specs), workers=workers, train=True,
                      mean=crops.mean, std=crops.std, **kw)


def dali_eval_loader(source, *, size: int, resize: int | None, mean, std, workers: int, **kw) -> DaliLoader:
    return DaliLoader(source, n_views=1, graph=dict(size=size, resize=resize), workers=workers, train=False, seed=0,
                      mean=mean, std=std, **kw)
