"""bench-train: the JSON contract on a tiny CPU run, and that the baseline step and our step
are two implementations of one objective (same loss, same parameters after a step)."""

import copy
import json

import pytest
import torch

from carp_fast import bench_train
from carp_fast.learner import CARPConfig
from carp_fast.networks import StudentTeacher

TINY = ["--arch", "resnet10_tiny", "--global-size", "16", "--local-crops", "2", "--local-size", "8",
        "--prototypes", "256", "--block-size", "32", "--hidden-dim", "64", "--embed-dim", "32",
        "--batch-size", "4", "--steps", "1", "--warmup", "1", "--repeats", "2", "--threads", "1", "--device", "cpu"]


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
    # Ours runs as the learner would on this CPU; the baseline in fp32 (no fp16 on the CPU).
    learner_precision = CARPConfig().resolved_precision(torch.device("cpu"))
    assert result["precision"] == learner_precision and result["baseline_precision"] == "fp32"
    assert result["channels_last"] is (learner_precision == "bf16")
    assert result["threads"] == 1 and result["host_syncs_per_step"] is None  # CPU: no sync check
    assert result["compile"] is None
    assert result["logit_path"]["block_ms"] > 0 and result["logit_path"]["gather_ms"] > 0


def test_bench_train_rejects_fp16_on_cpu(capsys):
    with pytest.raises(SystemExit):
        bench_train.main(TINY + ["--precision", "fp16"])
    assert "fp16 needs a CUDA device" in capsys.readouterr().err


@pytest.mark.parametrize("local_crops, block_size", [(2, 16), (0, 64), (1, 1)])
def test_baseline_and_our_step_agree(local_crops, block_size):
    """Same weights, batch and partition: same loss, and the same student and teacher
    after two steps (foreach LARS vs per-parameter LARS, lerp EMA vs the p.data loop)."""
    torch.manual_seed(0)
    model = StudentTeacher(arch="resnet10_tiny", n_prototypes=64, block_size=block_size, hidden_dim=32, embed_dim=16)
    baseline_model = copy.deepcopy(model).train()
    ours = bench_train.OurStep(model.train(), "fp32", channels_last=False, compile_mode=None)
    baseline = bench_train.BaselineStep(baseline_model, "fp32")
    crops = bench_train.synthetic_crops(3, 2, 16, local_crops, 8, torch.device("cpu"))
    for _ in range(2):
        torch.testing.assert_close(ours(crops), baseline(crops), rtol=1e-5, atol=1e-6)
    for net in ("student", "teacher"):
        for (name, p), q in zip(getattr(model, net).named_parameters(), getattr(baseline_model, net).parameters()):
            torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=f"{net}.{name}")


def test_ceiling_leaves_no_gradients():
    model = StudentTeacher(arch="resnet10_tiny", n_prototypes=64, block_size=16, hidden_dim=32, embed_dim=16)
    ceiling = bench_train.CeilingStep(bench_train.OurStep(model.train(), "fp32", False, None))
    assert torch.isfinite(ceiling(bench_train.synthetic_crops(2, 2, 16, 2, 8, torch.device("cpu"))))
    assert all(p.grad is None for p in model.parameters())
