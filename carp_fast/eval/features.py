"""Frozen-feature extraction, with a disk cache.

Every protocol in :mod:`carp_fast.eval` works on features ``[N, D]`` computed once by the
frozen backbone (the teacher by default, paper appendix B.4). Extraction runs over any
iterable of ``(images [N, 3, S, S] float32, labels [N] int64)`` batches — e.g.
``carp_fast.pipelines.eval_loader(...)`` or a plain ``torch.utils.data.DataLoader`` — batched, in
bf16 autocast on CUDA (fp32 on the CPU, where autocast gains little), with a rich
progress bar.

The cache file is keyed by the checkpoint's absolute path and mtime, the split and every
setting that changes the features (which, arch, image size, ...), so a retrained
checkpoint or a different resize never reuses stale features.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, NamedTuple

import torch
import torch.nn as nn

CACHE_VERSION = 1  # bump when the extraction itself changes


class Features(NamedTuple):
    """Features ``[N, D]`` float32 and labels ``[N]`` int64, both on the CPU."""

    features: torch.Tensor
    labels: torch.Tensor


def extract_features(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    device: torch.device | str | None = None,
    amp: bool | None = None,
    progress: bool = True,
    description: str = "features",
) -> Features:
    """Run ``model`` in eval mode over ``batches`` and collect its outputs.

    Args:
        model: maps images ``[N, 3, S, S]`` to features ``[N, D]``; moved to ``device``
            (channels_last on CUDA) and run in eval mode (BatchNorm running statistics);
            its train/eval mode is restored afterwards.
        batches: ``(images, labels)`` pairs; extra elements in a batch are ignored.
        device: defaults to CUDA when available, else the CPU.
        amp: bf16 autocast; defaults to on for CUDA, off for the CPU.
        progress: show a rich progress bar (total from ``len(batches)`` if defined).

    Returns:
        :class:`Features` with float32 features ``[N, D]`` and int64 labels ``[N]``.

    Memory: features stay on ``device`` until the last batch (no host sync per batch):
    ``N * D * 4`` bytes, 10.5 GB for the ImageNet training set at D = 2048.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if amp is None:
        amp = device.type == "cuda"
    # Moved outside inference mode: parameters created inside it could never be trained.
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    was_training = model.training
    model.eval()
    try:
        features, labels = _extract(model, batches, device, amp, progress, description)
    finally:
        model.train(was_training)
    # Concatenated outside inference mode, so the results are ordinary tensors (a linear
    # probe can be trained on them) without cloning the whole [N, D] matrix on the host.
    return Features(torch.cat(features).cpu(), torch.cat(labels).cpu().long())


@torch.inference_mode()
def _extract(
    model, batches, device, amp, progress, description
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per-batch features ``[n_b, D]`` float32 (on ``device``) and labels ``[n_b]``.

    These are inference tensors; the caller concatenates them outside inference mode.
    """
    features, labels = [], []
    with progress_bar(progress, f"extracting {description}", _length(batches)) as advance:
        for batch in batches:
            images, targets = batch[0], batch[1]
            images = images.to(device, non_blocking=True)
            if device.type == "cuda":
                images = images.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                out = model(images)
            if out.ndim != 2 or len(out) != len(images):
                raise ValueError(
                    f"model must return features [N, D] with N = {len(images)}, got shape "
                    f"{list(out.shape)}; is fc replaced by nn.Identity?"
                )
            # Outputs stay on the device until the end: no host sync per batch.
            features.append(out.float())
            labels.append(torch.as_tensor(targets).reshape(-1))
            advance()
    if not features:
        raise ValueError("batches is empty: no images to extract features from")
    return features, labels


def check_features(features: torch.Tensor, name: str, *, nonempty: bool = True) -> None:
    """Raise a ValueError unless ``features`` is ``[n, D]`` (with n >= 1 if ``nonempty``).

    ``name`` is the argument's name, used in the message (e.g. ``"test_features"``).
    """
    if features.ndim != 2:
        raise ValueError(f"{name} must be [n, D], got shape {list(features.shape)}")
    if nonempty and len(features) == 0:
        raise ValueError(f"{name} is empty: need at least one feature [n >= 1, D]")


def check_labelled(
    features: torch.Tensor, labels: torch.Tensor, split: str, *, nonempty: bool = True
) -> None:
    """Raise a ValueError unless ``features`` is ``[n, D]`` and ``labels`` is ``[n]``
    non-negative integers (class indices); n >= 1 if ``nonempty``.

    Messages name ``{split}_features`` / ``{split}_labels`` (``split``: e.g. ``"train"``).
    """
    check_features(features, f"{split}_features", nonempty=nonempty)
    if labels.ndim != 1 or len(labels) != len(features):
        raise ValueError(
            f"{split}_labels must be [n] = [{len(features)}] to match {split}_features, "
            f"got shape {list(labels.shape)}"
        )
    if labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"{split}_labels must be non-negative integers, got dtype {labels.dtype}")
    if len(labels) and int(labels.min()) < 0:
        raise ValueError(
            f"{split}_labels must be non-negative integers, got min {int(labels.min())}"
        )


def check_same_dim(
    a: torch.Tensor, b: torch.Tensor, names: tuple[str, str] = ("train_features", "test_features")
) -> None:
    """Raise a ValueError unless ``a`` is ``[n, D]`` and ``b`` is ``[m, D]``, n, m >= 1.

    ``names`` are the two arguments' names, used in the messages.
    """
    check_features(a, names[0])
    check_features(b, names[1])
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"{names[0]} and {names[1]} must share D, got {a.shape[1]} and {b.shape[1]}"
        )


def cache_key(checkpoint: str | os.PathLike | None, split: str, settings: Mapping[str, Any]) -> str:
    """A hex digest of the checkpoint (absolute path, mtime, size), split and settings."""
    identity: dict[str, Any] = {"version": CACHE_VERSION, "split": split, "settings": dict(settings)}
    if checkpoint is not None:
        stat = os.stat(checkpoint)
        identity["checkpoint"] = [os.path.abspath(checkpoint), stat.st_mtime_ns, stat.st_size]
    blob = json.dumps(identity, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


def cached_features(
    make_model: Callable[[], nn.Module],
    make_batches: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]],
    *,
    checkpoint: str | os.PathLike | None,
    split: str,
    settings: Mapping[str, Any],
    cache_dir: str | os.PathLike | None,
    **extract_kwargs: Any,
) -> Features:
    """Features from the cache, or extracted (and cached) on a miss.

    Args:
        make_model, make_batches: called only on a cache miss, so a hit loads neither the
            weights nor the data set.
        checkpoint: the weights file; its path and mtime are part of the key.
        split: e.g. ``"train"`` or ``"test"``.
        settings: everything else that changes the features (which, arch, size, ...);
            JSON-serialisable; stored in the cache file.
        cache_dir: where ``{split}-{key}.pt`` lives; None disables the cache.
        extract_kwargs: passed to :func:`extract_features`.

    Returns:
        :class:`Features`.
    """
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / f"{split}-{cache_key(checkpoint, split, settings)}.pt"
        if path.exists():
            stored = torch.load(path, map_location="cpu", weights_only=True)
            return Features(stored["features"], stored["labels"])
    result = extract_features(make_model(), make_batches(), description=split, **extract_kwargs)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        payload = {
            "features": result.features,
            "labels": result.labels,
            "split": split,
            "settings": json.dumps(dict(settings), sort_keys=True, default=str),
            "checkpoint": None if checkpoint is None else os.path.abspath(checkpoint),
        }
        torch.save(payload, tmp)
        os.replace(tmp, path)  # atomic: an interrupted run never leaves a torn cache file
    return result


def _length(batches: Iterable) -> int | None:
    try:
        return len(batches)  # type: ignore[arg-type]
    except TypeError:
        return None


class progress_bar:
    """Context manager yielding ``advance()``; a rich bar over ``total`` steps (None:
    unknown), or nothing when disabled. Shared by the protocols' long loops."""

    def __init__(self, enabled: bool, description: str, total: int | None):
        self.enabled, self.description, self.total = enabled, description, total

    def __enter__(self) -> Callable[[], None]:
        if not self.enabled:
            return lambda: None
        from rich.progress import Progress  # lazy: keep `import carp_fast.eval` cheap

        self.bar = Progress(transient=True)
        self.bar.__enter__()
        task = self.bar.add_task(self.description, total=self.total)
        return lambda: self.bar.advance(task)

    def __exit__(self, *exc: Any) -> None:
        if self.enabled:
            self.bar.__exit__(*exc)
