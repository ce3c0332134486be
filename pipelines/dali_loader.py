"""DALI backend: external-source pipelines fed in our own sharded epoch order.

Why external_source and not `fn.readers.file`: the order must be a pure function of
(seed, epoch, shard) shared with the torchvision path (`sharding.py`), epochs must have
an exact, equal length on every rank, and the file list is the pre-flight-scanned one.
Reading the bytes in Python is cheap next to decoding, which DALI does on its threads
('cpu') or with nvJPEG ('mixed').

One pipeline per epoch, seeded from (seed, shard, epoch): a resumed epoch replays its
augmentations, and an abandoned epoch cannot leak prefetched batches into the next.
Pipeline: read (external source: bytes or arrays + labels) -> decode once -> fan out
to the crops (`dali_augment.py`) -> return.
"""

from __future__ import annotations

from collections import deque
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


def _feed(source, batch_list: list[np.ndarray], pending: deque) -> Iterator[tuple]:
    """Yield (images, labels) per batch; the I/O step. `pending` remembers what is in flight."""
    for idx in batch_list:
        pending.append(idx)
        labels = source.labels[idx]
        if source.is_encoded:
            yield [source.encoded(int(i)) for i in idx], labels
        else:
            yield source.arrays(idx), labels


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
        pipe = self._build(_feed(self.source, batch_list, pending), epoch)
        it = None
        try:
            for _ in batch_list:
                try:
                    if it is None:  # builds and prefetches: decoding starts here
                        # size=-1: the epoch ends when the feed runs out; PARTIAL keeps a short last eval batch.
                        it = DALIGenericIterator([pipe], self._names, size=-1, last_batch_policy=LastBatchPolicy.PARTIAL)
                    out = next(it)[0]
                except RuntimeError as e:
                    raise self._decode_error(pending, e) from e
                pending.popleft()
                yield tuple(out[k] for k in self._names)
        finally:
            del it, pipe  # free the pipeline's threads and buffers now, not at the next GC

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
