"""Tell the training loader which epoch is starting."""

from __future__ import annotations

from fastai.callback.core import Callback, TrainEvalCallback


class EpochSync(Callback):
    """Calls ``dls.train.set_epoch(epoch)`` before every training epoch.

    fastai never does (it never calls ``DistributedSampler.set_epoch`` either), and a
    resumed fit skips its first epochs without iterating the loader: without this the
    resumed epochs would replay the shuffles of epochs 0, 1, ... .
    """

    order, run_valid = TrainEvalCallback.order + 1, False  # once fastai has set the epoch

    def before_train(self):
        "Select the epoch's order (and augmentation seeds) in the loader."
        set_epoch = getattr(self.learn.dls.train, "set_epoch", None)
        if set_epoch is not None:
            set_epoch(self.learn.epoch)
