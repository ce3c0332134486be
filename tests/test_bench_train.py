"""bench-train: the JSON contract on a tiny CPU run, and that the paper's plain step and
carp_fast's Learner are two implementations of one objective (same loss, same weights)."""

import copy
import json

import pytest
import torch
from fastai.callback.core import Callback

from benchmarks import bench_train
from benchmarks.paper_step import PaperStep
from carp_fast.carp import CARPConfig

TINY = ["--arch", "resnet10_tiny", "--global-size", "16", "--local-crops", "2", "--local-size", "8",
        "--prototypes", "256", "--block-size", "32", "--hidden-dim", "64", "--embed-dim", "32",
        "--batch-size", "4", "--steps", "2", "--warmup", "1", "--repeats", "2", "--threads", "1", "--device", "cpu"]


def test_bench_train_prints_json_last(capsys):
    bench_train.main(TINY + ["--logit-bench"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    ips = {name: result[key] for name, key in
           (("ours", "images_per_s"), ("baseline", "baseline_images_per_s"), ("ceiling", "ceiling_images_per_s"))}
    assert all(v > 0 for v in ips.values())
    assert result["ours_over_baseline"] == pytest.approx(ips["ours"] / ips["baseline"], rel=1e-2)
    assert result["ours_over_ceiling"] == pytest.approx(ips["ours"] / ips["ceiling"], rel=1e-2)
    for name, ms in result["step_ms"].items():  # images/s is batch / median step time
        assert ips[name] == pytest.approx(4 / (ms / 1000), rel=1e-2)
        assert len(result["images_per_s_repeats"][name]) == 2
    assert result["loss_finite"] is True
    assert result["peak_memory_mib"] > 0 and "RSS" in result["peak_memory_kind"]
    # Ours runs as the learner would on this CPU; the baseline in fp32 (fp16 is its CUDA path).
    learner_precision = CARPConfig().resolved_precision(torch.device("cpu"))
    assert result["precision"] == learner_precision and result["baseline_precision"] == "fp32"
    assert result["channels_last"] is torch.backends.mkldnn.is_available()  # the learner's CPU default, fp32 and bf16
    assert result["threads"] == 1 and result["host_syncs_per_step"] is None  # CPU: no sync check
    assert result["logit_path"]["block_ms"] > 0 and result["logit_path"]["gather_ms"] > 0


def test_bench_train_rejects_fp16_baseline_on_cpu(capsys):
    with pytest.raises(SystemExit):
        bench_train.main(TINY + ["--baseline-precision", "fp16"])
    assert "fp16" in capsys.readouterr().err


def test_step_timer_counts_only_the_timed_batches():
    """The timer spans batches skip..n-1: a callback that sleeps 20 ms per batch gives >= 20 ms."""
    import time

    class Sleep(Callback):
        def after_batch(self):
            time.sleep(0.02)

    crops = bench_train.synthetic_crops(2, 2, 16, 0, 8, torch.device("cpu"))
    config = CARPConfig(arch="resnet10_tiny", n_prototypes=64, block_size=16, hidden_dim=32, embed_dim=16,
                        batch_size=2, global_batch=2, precision="fp32", sync_bn=False, final_lr=0.0)
    learn, step = bench_train.learner_step(config, crops, steps=3, warmup=2)
    learn.add_cb(Sleep())
    seconds = step()
    assert seconds >= 0.02 and len(learn.step_timer.seconds) == 1
    assert learn.train_iter == 5  # warm-up and timed batches all ran through the Learner


class _Momentum(Callback):
    """Records the teacher momentum the Learner used at each optimizer step."""

    order = 100

    def before_fit(self):
        self.values = []

    def after_step(self):
        self.values.append(self.learn.teacher_momentum)


@pytest.mark.parametrize("local_crops, block_size", [(2, 16), (0, 64), (1, 1)])
def test_paper_step_and_the_learner_agree(local_crops, block_size):
    """Same weights, batch and partitions: the paper's step (full [N, K] logits gathered per
    view, per-parameter LARS and EMA loops) and the Learner (block logits, foreach LARS, lerp
    EMA, fastai callbacks) give the same loss and the same student and teacher after 2 steps."""
    torch.manual_seed(0)
    crops = bench_train.synthetic_crops(3, 2, 16, local_crops, 8, torch.device("cpu"))
    lr = 0.05
    config = CARPConfig(arch="resnet10_tiny", n_prototypes=64, block_size=block_size, hidden_dim=32, embed_dim=16,
                        batch_size=3, global_batch=3, base_lr=lr * 256 / 3, final_lr=lr, precision="fp32",
                        channels_last=False, sync_bn=False, log_every=1)
    learn, _ = bench_train.learner_step(config, crops, steps=1, warmup=1)  # fits of 2 batches
    momentum = _Momentum()
    learn.add_cb(momentum)
    paper = PaperStep(copy.deepcopy(learn.model).train(), "fp32", lr=lr)  # same weights and partitions
    learn.fit(1)
    losses = [r["loss"] for r in learn.carp_stats.history]
    for i, m in enumerate(momentum.values):
        paper.teacher_momentum = m
        assert paper(crops).item() == pytest.approx(losses[i], rel=1e-5, abs=1e-6)
    for net in ("student", "teacher"):
        for (name, p), q in zip(getattr(learn.model, net).named_parameters(), getattr(paper.model, net).parameters()):
            torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=f"{net}.{name}")


def test_ceiling_leaves_no_gradients():
    from carp_fast.carp import CARPStudentTeacher

    model = CARPStudentTeacher(arch="resnet10_tiny", n_prototypes=64, block_size=16, hidden_dim=32, embed_dim=16)
    ceiling = bench_train.CeilingStep(model.train(), "fp32", channels_last=False)
    assert torch.isfinite(ceiling(bench_train.synthetic_crops(2, 2, 16, 2, 8, torch.device("cpu"))))
    assert all(p.grad is None for p in model.parameters())
