"""fastai adapter: wrap pretraining / evaluation loaders in a `DataLoaders`.

fastai's `Learner` iterates `for b in dl`, reads `len(dl)`, splits a batch into
`xb = b[:n_inp]` and `yb = b[n_inp:]` (so the model gets the crops as separate
arguments and the loss the labels), and reads `dls.device`, `dls.train_ds`. Our
loaders provide those directly; they are not wrapped in fastai's `DataLoader` (which
would re-collate) nor in `DistributedDL` (which breaks with DALI and on CPU; the
pipelines shard themselves).
"""

from __future__ import annotations

from fastai.data.core import DataLoaders

from carp_fast.pipelines.epoch_loader import EpochLoader, resolve_device


class EmptyLoader:
    """A loader of length 0 (no validation set); fastai skips its epoch."""

    dataset = None

    def __init__(self, device=None) -> None:
        self.device = resolve_device(device)  # `DataLoaders(..., device=)` sets it again via `to`

    def __len__(self) -> int:
        return 0

    def __iter__(self):
        return iter(())

    def to(self, device) -> "EmptyLoader":
        self.device = resolve_device(device)
        return self


class CropDataLoaders(DataLoaders):
    """`DataLoaders` over `EpochLoader`s: `.train`, `.valid`, `.device`, and fastai's `one_batch` and
    `show_batch`, which it forwards to `.train` (`EpochLoader.one_batch` leaves the epoch alone)."""

    def __init__(self, train: EpochLoader, valid: EpochLoader | EmptyLoader, device=None) -> None:
        device = resolve_device(device if device is not None else train.device)
        super().__init__(train, valid, device=device)
        # No `n_inp`: fastai's default split (inputs = all but the last entry, targets =
        # (labels,)) fits multi-crop training batches and 2-entry evaluation batches alike.


def crop_dataloaders(train_loader: EpochLoader, valid_loader: EpochLoader | None = None, device=None) -> CropDataLoaders:
    """fastai `DataLoaders` whose `.train` / `.valid` are our loaders (valid may be empty)."""
    if not isinstance(train_loader, EpochLoader):
        raise ValueError(f"train_loader must come from pretrain_loader/eval_loader, got {type(train_loader).__name__}")
    valid = valid_loader if valid_loader is not None else EmptyLoader()  # CropDataLoaders moves it to the device
    return CropDataLoaders(train_loader, valid, device=device)
