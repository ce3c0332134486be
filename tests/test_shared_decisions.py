"""Decisions all ranks share: a time budget or a NaN on one rank stops every rank, without a hang."""

import os
import time

import pytest
import torch

from tests.conftest import crop_dataset, run_ranks


def _learner(rank):
    from fastai.data.core import DataLoaders
    from torch.utils.data import DataLoader

    from carp_fast.carp import CARPConfig, carp_learner

    config = CARPConfig(arch="resnet10_tiny", n_prototypes=64, block_size=16, hidden_dim=32, embed_dim=16,
                        batch_size=4, global_batch=8, log_every=1, precision="fp32")
    data = crop_dataset(n_images=8, seed=rank)  # 2 batches of 4 per rank and epoch
    dls = DataLoaders(DataLoader(data, batch_size=4), DataLoader(crop_dataset(n_images=0), batch_size=4))
    torch.manual_seed(0)
    return carp_learner(dls, config, progress=False)


def _env(rank, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", ACCELERATE_USE_CPU="1")


def _budget_worker(rank, port, queue):
    from fastai.callback.core import Callback

    from carp_fast.callbacks import TimeBudget

    class SlowMainProcess(Callback):
        """Rank 0's epochs take 3 s longer (a k-NN, a checkpoint): only its clock overruns."""

        def after_epoch(self):
            if rank == 0:
                time.sleep(3.0)

    _env(rank, port)
    learn = _learner(rank)
    learn.add_cbs([SlowMainProcess(), TimeBudget(minutes=5 / 60)])
    learn.fit(5)
    queue.put((rank, (learn.epoch, learn.stopped_early)))


@pytest.mark.slow
def test_time_budget_stops_every_rank_after_the_same_epoch():
    # Rank 0 projects 2 x (epoch + 3 s) > 5 s after its first epoch; rank 1 alone would go on
    # and wait forever in the next epoch's all-reduce.
    results = run_ranks(_budget_worker, 2, timeout=240)
    assert results[0] == results[1] == (0, True)


def _nan_worker(rank, port, queue):
    from fastai.callback.core import Callback

    from carp_fast.callbacks import NonFiniteLossError

    class PoisonRankOne(Callback):
        """Rank 1's logged loss of its second batch is NaN; rank 0's is finite.

        (A NaN in CARP's inputs reaches every rank's loss in the same step through the
        entropy term's all-reduce; a rank-local one, as here, shows the shared decision.)
        """

        order = -50  # after_loss before CARPStats reads the parts

        def after_loss(self):
            if rank == 1 and self.learn.train_iter == 1:
                parts = self.learn.loss_func.parts
                self.learn.loss_func.parts = parts._replace(total=torch.full_like(parts.total, float("nan")))

    _env(rank, port)
    learn = _learner(rank)
    learn.add_cb(PoisonRankOne())
    try:
        learn.fit(3)
        outcome = "finished"
    except NonFiniteLossError as error:
        outcome = f"stopped at {learn.train_iter}: {error}"
    queue.put((rank, outcome))
    # Both ranks left fit by an exception: close the groups (the gloo flags' group too) before the
    # interpreter exits, or a communication thread still running there can abort the process
    # (seen once in CI: exit -6, "terminate called without an active exception").
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_a_nan_on_one_rank_stops_every_rank_at_the_same_step():
    results = run_ranks(_nan_worker, 2, timeout=240)
    assert results[0].startswith("stopped at 2") and results[1].startswith("stopped at 2")
    assert "another process" in results[0]  # rank 0's own loss was still finite


def _plan_worker(rank, port, queue):
    from fastai.callback.core import Callback

    from carp_fast.callbacks import TimeBudget

    class SlowerMainProcess(Callback):
        """Rank 0's steps take longer than rank 1's: their clocks would plan different lengths."""

        def before_batch(self):
            time.sleep(0.3 if rank == 0 else 0.05)

    _env(rank, port)
    learn = _learner(rank)
    learn.add_cbs([SlowerMainProcess(), TimeBudget(minutes=12 / 60, margin=0.2, warmup=1, measure=2, measure_seconds=0.2)])
    learn.fit(1000)
    queue.put((rank, (learn.plan["steps"], learn.train_iter, learn.epoch, learn.stopped_early)))


@pytest.mark.slow
def test_every_rank_follows_the_main_process_plan():
    results = run_ranks(_plan_worker, 2, timeout=240)
    assert results[0] == results[1]  # the same plan, the same steps, the same last epoch
    steps, train_iter, _, stopped_early = results[0]
    assert train_iter == steps < 2000 and not stopped_early


@pytest.mark.parametrize("stop, status, closed", [(None, None, True), ("non-finite", 3, True), ("settings", 2, False)])
def test_a_run_leaves_its_process_group_where_every_process_ends_together(tmp_path, stop, status, closed):
    """A finished run and a non-finite stop (every rank stops at the same step) close the group
    before the exit, which could otherwise abort at interpreter exit; a settings error, which one
    rank may meet alone, leaves it (with NCCL, closing while a peer waits in a collective can hang)."""
    import torch.distributed as dist

    from carp_fast.callbacks import NonFiniteError
    from carp_fast.run import SettingsError, command_line

    @command_line
    def run():
        if stop == "non-finite":
            raise NonFiniteError("loss is nan")
        if stop == "settings":
            raise SettingsError("--batch-size must be > 0")
        return "summary"

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        if status is None:
            assert run() == "summary"
        else:
            with pytest.raises(SystemExit) as exit_:
                run()
            assert exit_.value.code == status
        assert dist.is_initialized() != closed
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
