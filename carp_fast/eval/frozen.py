"""The frozen backbone ``carp-fast eval`` evaluates, resolved once from the command line.

:meth:`FrozenBackbone.from_args` reads the checkpoint once (memory-mapped: only its small
config is touched) for what the evaluation needs to know of it: the architecture (``--arch``
or the checkpoint's) and the view its own training run evaluated with. The weights are
loaded later, at most once, and only if a split's features are not in the cache. Every
protocol then asks it for features of its views (a labelled ``--data`` set, or lists of
image files) and gets them with the settings that made them, which are the cache key and
the record's extraction settings.

This module also owns the command line's weights, extraction and data options, which
configure it.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Sequence

import torch
import torch.nn as nn

from .data import file_list_batches, split_batches
from .features import Features, cached_features

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]


class TrainedView(NamedTuple):
    """The view a training run's own k-NN evaluated with, on its ``--data``."""

    data: str | None
    size: int
    resize: int | None


@dataclass(frozen=True)
class FrozenBackbone:
    """A checkpoint's backbone and how its features are extracted (the common options)."""

    checkpoint: str
    which: str
    arch: str
    trained_view: TrainedView | None  # None: not this project's checkpoint, or it names none
    load: Callable[[], nn.Module]  # the backbone in eval mode; loaded on the first call only
    backend: str  # resolved: "dali" or "torchvision"
    device: str | None
    amp: bool | None
    batch_size: int
    workers: int
    cache_dir: Path | None  # None: --no-cache
    progress: bool

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> FrozenBackbone:
        """Read ``--checkpoint`` once and resolve the options of :func:`add_arguments`.

        Raises:
            FileNotFoundError, ValueError: as :func:`.checkpoints.read_checkpoint`; an
                ``--backend`` that is not installed.
        """
        from carp_fast.pipelines.loaders import resolve_backend

        from . import checkpoints

        weights_only = not args.trust_checkpoint
        contents = checkpoints.read_checkpoint(args.checkpoint, weights_only=weights_only, mmap=True)
        arch = checkpoints.infer_arch(contents) if args.arch is None else args.arch

        @functools.cache
        def load() -> nn.Module:
            # From the file, not the memory map above: the map is not held open through a long
            # extraction, during which a checkpoint rewritten in place would change under it.
            return checkpoints.load_backbone(args.checkpoint, arch, args.which, weights_only=weights_only)

        return cls(
            checkpoint=args.checkpoint,
            which=args.which,
            arch=arch,
            trained_view=_trained_view(contents),
            load=load,
            backend=resolve_backend(args.backend),
            device=args.device,
            amp=args.amp,
            batch_size=args.batch_size,
            workers=args.workers,
            cache_dir=None if args.no_cache else args.cache_dir,
            progress=not args.no_progress,
        )

    def settings(self, **view: Any) -> dict[str, Any]:
        """What changes the features: the network, its arch, the image pipeline and ``view``."""
        return {"which": self.which, "arch": self.arch, "backend": self.backend, **view}

    def features(self, split: str, settings: Mapping[str, Any], batches: Callable[[], Batches],
                 wrap: Callable[[nn.Module], nn.Module] | None = None) -> Features:  # fmt: skip
        """Cached features of one split; on a miss, ``batches()`` are fed to the backbone, or to
        ``wrap(backbone)`` (e.g. multi-scale) when given."""

        def model() -> nn.Module:
            return self.load() if wrap is None else wrap(self.load())

        return cached_features(
            model,
            batches,
            checkpoint=self.checkpoint,
            split=split,
            settings=settings,
            cache_dir=self.cache_dir,
            device=self.device,
            amp=self.amp,
            progress=self.progress,
        )

    def labelled_features(self, args: argparse.Namespace, *, splits: Sequence[str] = ("train", "test"),
                          subset_file: Path | None = None) -> tuple[dict[str, Any], list[Features]]:  # fmt: skip
        """:class:`Features` of the ``splits`` of ``--data`` (options of
        :func:`add_labelled_arguments`; train: only the images of ``subset_file`` when given),
        and the settings that made them."""
        size, resize = self.labelled_view(args.data, args.size, args.resize)
        settings = self.settings(data=args.data, size=size, resize=resize)
        out = []
        for split in splits:
            limit = args.train_limit if split == "train" else args.test_limit
            subset = subset_file if split == "train" else None
            batches = functools.partial(
                split_batches, args.data, split, size=size, resize=resize, batch_size=self.batch_size,
                workers=self.workers, backend=self.backend, device=self.device, limit=limit,
                seed=args.subset_seed, subset_file=subset,
            )  # fmt: skip
            limited = {"limit": limit, "subset_seed": args.subset_seed} if limit is not None else {"limit": None}
            if subset is not None:
                limited.update(subset_file=str(subset.resolve()), subset_mtime=subset.stat().st_mtime_ns)
            out.append(self.features(split, {**settings, **limited}, batches))
        warn_one_class(args.data, dict(zip(splits, out)))
        return settings, out

    def labelled_view(self, data: str, size: int | None, resize: int | None) -> tuple[int, int | None]:
        """``(size, resize)`` of ``--data``'s images: the command line's when it names either;
        else the view the checkpoint's run evaluated with, when it was trained on this data
        (so the CLI measures what the run's own k-NN did: the embedded default's is whole
        28 px images shrunk to 18 px); else 28 px and no resize for Fashion-MNIST, 224 and
        256 otherwise."""
        trained = self.trained_view
        if not (size or resize) and trained is not None and _same_data(trained.data, data):
            return trained.size, trained.resize
        small = data == "fashion-mnist"
        size = size or (28 if small else 224)
        # Fashion-MNIST is 28 px: no resize unless another size is asked for (None = none).
        return size, resize or ((None if size == 28 else size) if small else 256)

    def file_features(self, files: Mapping[str, Sequence[str]], view: Mapping[str, Any],
                      batches: Callable[[Sequence[str]], Batches],
                      wrap: Callable[[nn.Module], nn.Module] | None = None) -> tuple[dict[str, Any], list[Features]]:  # fmt: skip
        """Features of lists of image files (e.g. ``{"queries": [...], "database": [...]}``),
        one cached split per list, fed as ``batches(paths)``, and the settings that made them
        (:meth:`settings` of ``view``). Each feature's label is its image's position."""
        settings = self.settings(**view)
        return settings, [self.features(name, settings, functools.partial(batches, paths), wrap)
                          for name, paths in files.items()]  # fmt: skip

    def centre_crops(self, size: int, resize: int | None) -> Callable[[Sequence[str]], Batches]:
        """``batches(paths)``: the shorter side resized to ``resize``, a centre crop of ``size``,
        through this run's image pipeline."""
        return functools.partial(file_list_batches, size=size, resize=resize, batch_size=self.batch_size,
                                 workers=self.workers, backend=self.backend, device=self.device)  # fmt: skip


def warn_one_class(data: str, splits: Mapping[str, Features]) -> bool:
    """One line on stderr when the labelled data hold a single class: in the split a protocol
    fits on (``train``), or in all of ``splits`` together. A k-NN, a linear probe or a few-shot
    classifier then predicts that class (100 % on a one-class test set) and clustering scores
    are trivial, whatever the features. True if it warned."""
    classes = {split: torch.unique(f.labels) for split, f in splits.items() if len(f.labels)}
    if not classes:
        return False
    every = torch.unique(torch.cat(list(classes.values())))
    if len(every) == 1:
        where, label = " and ".join(f"{s} ({len(splits[s].labels)} images)" for s in classes), int(every[0])
    elif "train" in classes and len(classes["train"]) == 1:
        where, label = f"its train split ({len(splits['train'].labels)} images)", int(classes["train"][0])
    else:
        return False
    print(f"carp-fast eval: warning: --data {data!r} has a single class in {where} (label {label}): its scores are "
          "trivial (that class predicted, 100 % on a one-class test set) whatever the features", file=sys.stderr, flush=True)
    return True


def image_source(path: str | os.PathLike) -> dict[str, Any]:
    """What names a protocol's images in the cache key: its ground truth file or data folder."""
    path = Path(path)
    return {"images_from": str(path.resolve()), "images_from_mtime": path.stat().st_mtime_ns}


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "carp_fast" / "features"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The weights and extraction options of every protocol (:meth:`FrozenBackbone.from_args`)."""
    from carp_fast.pipelines.loaders import BACKENDS

    from .checkpoints import WHICH

    g = parser.add_argument_group("weights")
    g.add_argument("--checkpoint", required=True, help="this project's checkpoint, the official code's, or a torchvision state dict")
    g.add_argument("--which", choices=WHICH, default=WHICH[0], help="network to evaluate; the teacher is the paper's choice (appendix B.4)")
    g.add_argument("--arch", default=None, help="backbone architecture; default: the checkpoint's config, else resnet50")
    g.add_argument("--trust-checkpoint", action="store_true", help="unpickle arbitrary objects in the checkpoint (only for files you trust)")
    g = parser.add_argument_group("extraction")
    g.add_argument("--size", type=int, default=None, help="image side fed to the backbone (default: what the checkpoint's run evaluated with on this data, else 28 for fashion-mnist, 224 otherwise)")
    g.add_argument("--resize", type=int, default=None, help="short side before the centre crop (default: the checkpoint's run's, else none for 28 px fashion-mnist, 256 otherwise)")
    g.add_argument("--batch-size", type=int, default=256, help="images per extraction batch; lower it if memory runs out")
    g.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None, help="bf16 autocast (default: on with CUDA)")
    g.add_argument("--workers", type=int, default=2, help="DALI threads or DataLoader worker processes")
    g.add_argument("--backend", choices=BACKENDS, default="auto", help="image pipeline: auto (DALI if installed) | dali | torchvision")
    g.add_argument("--cache-dir", type=Path, default=default_cache_dir(), help="feature cache (default %(default)s)")
    g.add_argument("--no-cache", action="store_true", help="always extract, never read or write the cache")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_labelled_arguments(parser: argparse.ArgumentParser) -> None:
    """The labelled data set of the classification protocols (:meth:`FrozenBackbone.labelled_features`)."""
    g = parser.add_argument_group("data")
    g.add_argument("--data", default="fashion-mnist", help="'fashion-mnist' or an ImageNet-layout directory (train/ and val/ or test/)")
    g.add_argument("--train-limit", type=int, default=None, help="a fixed random subset of the training split (e.g. 20000 for a quick bank)")
    g.add_argument("--test-limit", type=int, default=None, help="a fixed random subset of the test split")
    g.add_argument("--subset-seed", type=int, default=0, help="seed of the --train-limit / --test-limit subsets")


def _trained_view(checkpoint: Any) -> TrainedView | None:
    """The ``data``, ``eval_size`` and ``eval_resize`` a project checkpoint's settings name."""
    settings = checkpoint.get("settings") if isinstance(checkpoint, Mapping) else None
    if not isinstance(settings, Mapping) or not isinstance(settings.get("eval_size"), int):
        return None
    return TrainedView(settings.get("data"), settings["eval_size"], settings.get("eval_resize"))


def _same_data(trained_on: Any, data: str) -> bool:
    """Whether a run's ``--data`` and this command's name the same data set (a name or a folder)."""
    if not isinstance(trained_on, str):
        return False
    if trained_on == data:
        return True
    return "fashion-mnist" not in (trained_on, data) and Path(trained_on).resolve() == Path(data).resolve()
